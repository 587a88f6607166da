"""Where a model's parts sit in training: the compute device, the input embedding on the host, and gradient
checkpointing (activations recomputed in backward instead of kept).

Healing (:mod:`emloc.healing`) and the memory plan's dry run place a model by these same rules.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..vision import is_vision_language


def compute_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: the LM head's device (the input embedding may be on the host)."""
    return model.get_output_embeddings().weight.device


def host_embedding(model: nn.Module, on_device: bool) -> nn.Module | None:
    """The input embedding that stays on the host in training: None with ``on_device`` or when it is tied to
    the LM head (the head needs it on the device). The memory plan and its dry run count it by this rule."""
    embedding = model.get_input_embeddings()
    tied = embedding.weight is model.get_output_embeddings().weight
    return None if on_device or tied else embedding


def place_input_embedding(model: nn.Module, on_device: bool) -> bool:
    """Move the input embedding to the host (:func:`host_embedding`) or to the compute device.

    It is only looked up, so on the host it costs the device nothing but the looked-up rows, which
    :class:`emloc.training.CausalLMLoss` moves over. Returns whether the embedding is on the host afterwards.
    """
    host = host_embedding(model, on_device)
    if host is not None and is_vision_language(model.config):
        raise UserError("TrainConfig.embeddings_on_device: a vision-language model looks its embedding up inside "
                        "its own forward, on the device; set embeddings_on_device=True")
    if host is not None:
        host.to("cpu")
    else:
        model.get_input_embeddings().to(compute_device(model))
    return host is not None


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in backward (non-reentrant: works with frozen inputs and DDP)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"gradient checkpointing: {type(model).__name__} does not support it; "
                         "set gradient_checkpointing=False")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
