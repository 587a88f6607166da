"""The source checkpoint, streamed: a meta skeleton plus its shard index, whose outer weights (embedding,
final norm, LM head) and blocks are loaded one at a time and released again.

:func:`blockwise_logits` is that streamed pass over the whole model with nothing compressed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import models
from ..calibration import CalibrationBatch
from ..streaming import CheckpointIndex, key_mapping, materialize, release
from .activations import ActivationStore, block_inputs, default_host_budget, move_tensors
from .block import run_block

__all__ = ["SourceCheckpoint", "blockwise_logits", "default_device"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class SourceCheckpoint:
    """The source checkpoint as a meta skeleton plus shard index; loads and releases modules on demand."""

    def __init__(self, model_path, device, dtype) -> None:
        self.path = Path(model_path)
        self.config = models.load_config(self.path)
        self.index = CheckpointIndex(self.path)
        self.model = models.skeleton(self.config)
        self.prefix, self.stack = models.block_stack(self.model)
        self.device = torch.device(device)
        self.dtype = dtype or _config_dtype(self.config)
        models.tie_embeddings(self.model)
        self.key_of = key_mapping((name for name, _ in self.model.named_parameters()), self.index)
        self.parameters = sum(p.numel() for p in self.model.parameters())  # before any compression

    def outer_names(self) -> list[str]:
        """Full names of the parameters outside the block stack (embedding, final norm, LM head)."""
        return [name for name, _ in self.model.named_parameters() if not name.startswith(self.prefix + ".")]

    def _stack_within(self, child: str) -> str | None:
        """The block stack's name local to top-level ``child`` (to skip it), None if it is elsewhere."""
        return self.prefix[len(child) + 1:] + "." if self.prefix.startswith(child + ".") else None

    def load_outer(self) -> None:
        for name, module in self.model.named_children():
            materialize(module, name, self.index, self.device, self.dtype, self.key_of, skip=self._stack_within(name))
            models.tie_embeddings(self.model)  # a tied LM head then holds the loaded embedding

    def release_outer(self) -> None:
        for name, module in self.model.named_children():
            release(module, skip=self._stack_within(name))
        models.tie_embeddings(self.model)

    def load_block(self, index: int) -> nn.Module:
        return materialize(self.stack[index], f"{self.prefix}.{index}", self.index, self.device, self.dtype,
                           self.key_of)

    def capture(self, batches: list[CalibrationBatch], store: ActivationStore) -> list[list[dict]]:
        """Fill ``store`` with block 0's input per batch; return per batch the kwargs of every block (host)."""
        kwargs_per_batch = []
        for slot, batch in enumerate(batches):
            hidden, kwargs = models.capture_block_inputs(
                self.model, batch.input_ids.to(self.device), batch.attention_mask.to(self.device))
            store.put(slot, hidden)
            kwargs_per_batch.append(move_tensors(kwargs, "cpu"))
        return kwargs_per_batch


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def blockwise_logits(model_path, batches: list[CalibrationBatch], *, device=None, dtype=None) -> list[Tensor]:
    """Logits of the source model computed block by block through the streaming path, with nothing
    compressed: one block's weights at a time. This is the pass the build runs, and what must reproduce
    the full model's logits exactly."""
    source = SourceCheckpoint(model_path, device or default_device(), dtype)
    with tempfile.TemporaryDirectory() as spill:
        store = ActivationStore(Path(spill), default_host_budget())
        source.load_outer()
        kwargs = source.capture(batches, store)
        for index in range(len(source.stack)):
            block = source.load_block(index)
            run_block(block, block_inputs(store, kwargs, batches, index, source.device), store.put)
            release(block)
        return [models.logits_from_hidden(source.model, b.input_ids.to(source.device),
                                          b.attention_mask.to(source.device), store.get(slot, source.device))
                for slot, b in enumerate(batches)]
