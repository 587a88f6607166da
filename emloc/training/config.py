"""The settings of a training run (:class:`TrainConfig`), checked when they are made."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import check_float, check_int
from ..ranks import LORA_RANK

# Refreshes of an emulator's factors per run (docs/design.md §1.9); the real-model benchmark measured 3.
REFRESHES = 3


@dataclass
class TrainConfig:
    """Training settings; the defaults follow the reference recipe (docs/design.md §1.8).

    The global batch per optimizer step is ``micro_batch_size * grad_accum * world_size`` examples. Less obvious
    fields: ``lora_target`` (regex or names, see :func:`emloc.add_lora`; None: every linear but the LM head),
    ``lm_head_chunk`` (tokens per LM-head block: bounds the logits memory), ``eval_fraction`` (held-out share
    of the data), ``eval_steps`` (evaluate every N steps, 0: only at the end), ``save_steps`` (checkpoint every
    N steps), ``max_grad_norm`` (None: no clipping), ``embeddings_on_device`` (False: the input embedding stays
    on the host unless it is tied to the LM head; see :func:`emloc.training.place_input_embedding`), ``refreshes``
    (times the emulator's factors are recomputed from the original with the LoRA so far, evenly spaced; only
    on an emulator loaded from its build directory, see :mod:`emloc.training.refresh`).
    """

    output_dir: str | None = None
    max_steps: int = 500
    micro_batch_size: int = 2
    grad_accum: int = 4
    learning_rate: float = 4e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    lora_r: int = LORA_RANK
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    rslora: bool = False
    lora_target: str | list[str] | None = None
    max_length: int = 2048
    gradient_checkpointing: bool = True
    lm_head_chunk: int = 1024
    embeddings_on_device: bool = True
    eval_fraction: float = 0.05
    eval_steps: int = 0
    save_steps: int = 100
    resume: bool = True
    seed: int = 0
    progress: bool = True
    refreshes: int = REFRESHES

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "lora_r", "lm_head_chunk", "max_length",
                     "save_steps"):
            check_int(getattr(self, name), f"TrainConfig.{name}")
        check_int(self.eval_steps, "TrainConfig.eval_steps", minimum=0)
        check_int(self.refreshes, "TrainConfig.refreshes", minimum=0)
        check_float(self.learning_rate, "TrainConfig.learning_rate", 0, math.inf, low_open=True, high_open=True)
        check_float(self.warmup_ratio, "TrainConfig.warmup_ratio", 0, 1)
        check_float(self.weight_decay, "TrainConfig.weight_decay", 0, math.inf, high_open=True)
        check_float(self.lora_dropout, "TrainConfig.lora_dropout", 0, 1, high_open=True)
        check_float(self.eval_fraction, "TrainConfig.eval_fraction", 0, 1, high_open=True)
        if self.max_grad_norm is not None:
            check_float(self.max_grad_norm, "TrainConfig.max_grad_norm", 0, math.inf, low_open=True, high_open=True)
        if self.lora_alpha is not None:
            check_float(self.lora_alpha, "TrainConfig.lora_alpha", 0, math.inf, low_open=True, high_open=True)
