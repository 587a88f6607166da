"""Reading a finished emulator directory back: its config's ``emloc`` section, and the emulator itself as
an ordinary transformers causal LM.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import models
from ..errors import BuildError
from ..files import read_json
from ..layers import EmulatorLinear
from ..streaming import CheckpointIndex, materialize
from .directory import CONFIG

__all__ = ["load_emulator", "read_emloc_section"]


def read_emloc_section(path) -> dict:
    """The ``emloc`` section of the config of the emulator directory ``path`` (what the build recorded:
    source, compression, calibration, ranks, content hash); :class:`BuildError` if it has none."""
    config_path = Path(path) / CONFIG
    config = read_json(config_path) if config_path.is_file() else None
    section = config.get("emloc") if isinstance(config, dict) else None
    if not isinstance(section, dict):
        raise BuildError(f"{path}: not an emloc emulator directory (config.json without an 'emloc' section)")
    return section


def load_emulator(path, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Load an emulator directory as an ordinary transformers causal LM whose compressed linears are
    :class:`emloc.EmulatorLinear`. Needs nothing from the source model.

    Args:
        path: a directory written by :func:`~emloc.build_emulator`.
        device: where to put the model (default CPU).
        dtype: cast floating-point weights to this dtype (default: the dtype it was built in).
    """
    path = Path(path)
    section = read_emloc_section(path)
    model = models.skeleton(models.load_config(path))
    for name, info in section["modules"].items():
        linear = model.get_submodule(name)
        model.set_submodule(name, EmulatorLinear(
            linear.in_features, linear.out_features, info["rank"], bias=linear.bias is not None,
            device="meta", dtype=linear.weight.dtype))
    models.tie_embeddings(model)
    index = CheckpointIndex(path)
    for name, module in model.named_children():
        materialize(module, name, index, device or "cpu", dtype)
        models.tie_embeddings(model)
    model.to(device or "cpu")
    return model
