"""Training LoRA on an emulator (docs/design.md §1.8): the loss, one optimizer step, and the loop around them.

* :class:`CausalLMLoss` (``loss``) is a model's whole loss as a module, its LM head and cross entropy chunked
  so full fp32 logits never exist; :func:`training_step` is one optimizer step over micro-batches.
* :func:`place_input_embedding` (``placement``) keeps an untied input embedding on the host: it is only looked
  up, so only the looked-up rows travel to the device (the memory plan's default,
  ``TrainConfig.embeddings_on_device``).
* :func:`train` (``loop``) is the loop, with the :class:`TrainConfig` of ``config``, the cosine schedule of
  ``schedule``, :func:`evaluate` of ``evaluation`` and the checkpoints and resume of ``checkpoints``.
"""
from .checkpoints import ADAPTER_DIR
from .config import TrainConfig
from .evaluation import evaluate
from .loop import REPORT_FILE, train
from .loss import CausalLMLoss, training_step
from .placement import compute_device, enable_checkpointing, host_embedding, place_input_embedding
from .schedule import cosine_schedule

__all__ = ["ADAPTER_DIR", "REPORT_FILE", "CausalLMLoss", "TrainConfig", "compute_device", "cosine_schedule",
           "enable_checkpointing", "evaluate", "host_embedding", "place_input_embedding", "train", "training_step"]
