"""The source checkpoint, streamed: a meta skeleton plus its shard index, whose outer weights (embedding,
final norm, LM head) and blocks are loaded one at a time and released again.

:func:`blockwise_logits` is that streamed pass over the whole model with nothing compressed.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import models
from ..calibration import CalibrationBatch
from ..streaming import CheckpointIndex, key_mapping, materialize, release
from ..vision import checkpoint_prefixes, feature_blocks
from .activations import ActivationStore, StackInputs, block_inputs, default_host_budget, move_tensors
from .block import run_block

__all__ = ["SourceCheckpoint", "blockwise_logits", "default_device"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class SourceCheckpoint:
    """The source checkpoint as a meta skeleton plus shard index; loads and releases modules on demand.

    ``stacks`` lists its block stacks in the order the build streams them (a vision tower's, then the
    decoder's); ``prefix`` and ``stack`` are the decoder's."""

    def __init__(self, model_path, device, dtype) -> None:
        self.path = Path(model_path)
        self.config = models.load_config(self.path)
        self.index = CheckpointIndex(self.path)
        self.model = models.skeleton(self.config)
        self.stacks = models.block_stacks(self.model)
        self.prefix, self.stack = self.stacks[-1]
        self.device = torch.device(device)
        self.dtype = dtype or _config_dtype(self.config)
        models.tie_embeddings(self.model)
        self.key_of = key_mapping((name for name, _ in self.model.named_parameters()), self.index,
                                  checkpoint_prefixes(self.config))
        self.parameters = sum(p.numel() for p in self.model.parameters())  # before any compression

    def units(self) -> list[tuple[str, int]]:
        """``(stack prefix, block index)`` of every block, in build order."""
        return [(prefix, index) for prefix, stack in self.stacks for index in range(len(stack))]

    def outer_names(self) -> list[str]:
        """Full names of the parameters outside the block stacks (embeddings, norms, projector, LM head)."""
        within = tuple(prefix + "." for prefix, _ in self.stacks)
        return [name for name, _ in self.model.named_parameters() if not name.startswith(within)]

    def _stacks_within(self, child: str) -> tuple[str, ...]:
        """The block stacks' names local to top-level ``child`` (to skip them)."""
        return tuple(prefix[len(child) + 1:] + "." for prefix, _ in self.stacks if prefix.startswith(child + "."))

    def load_outer(self) -> None:
        for name, module in self.model.named_children():
            materialize(module, name, self.index, self.device, self.dtype, self.key_of,
                        skip=self._stacks_within(name))
            models.tie_embeddings(self.model)  # a tied LM head then holds the loaded embedding

    def release_outer(self) -> None:
        for name, module in self.model.named_children():
            release(module, skip=self._stacks_within(name))
        models.tie_embeddings(self.model)

    def block(self, prefix: str, index: int) -> nn.Module:
        return self.model.get_submodule(prefix)[index]

    def load_block(self, index: int, prefix: str | None = None) -> nn.Module:
        prefix = prefix or self.prefix
        return materialize(self.block(prefix, index), f"{prefix}.{index}", self.index, self.device, self.dtype,
                           self.key_of)

    def capture(self, batches: list[CalibrationBatch], store: ActivationStore, prefix: str | None = None,
                replay: dict[int, dict[int, Tensor]] | None = None) -> StackInputs:
        """Fill ``store`` with the first block's input of stack ``prefix`` (default: the decoder's) per batch
        that reaches it (the store's slots number those batches in order), and return those batches' block
        keyword arguments (host) and token masks.

        The vision tower's blocks see only the batches with images, every token counting. For the decoder of
        a vision-language model, ``replay`` gives per batch the vision blocks' outputs the model reads
        (:func:`emloc.vision.feature_blocks`): the model's own code merges them into the text embeddings."""
        prefix = prefix or self.prefix
        stack = self.model.get_submodule(prefix)
        vision = prefix != self.prefix
        inputs = StackInputs(prefix)
        for slot, batch in enumerate(batches):
            if vision and not batch.images:
                continue
            images = {k: v.to(self.device) for k, v in batch.images.items()}
            ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
            with _replaying(self, None if vision else replay, slot):
                hidden, kwargs = models.capture_block_inputs(self.model, ids, mask, stack=stack, **images)
            store.put(len(inputs.slots), hidden)
            inputs.add(slot, move_tensors(kwargs, "cpu"),
                       torch.ones(hidden.shape[:-1], dtype=torch.bool) if vision else batch.attention_mask)
        return inputs


def _replaying(source: SourceCheckpoint, replay: dict[int, dict[int, Tensor]] | None, slot: int):
    """The vision blocks' recorded outputs of batch ``slot`` stand in for the vision tower's blocks."""
    if replay is None or len(source.stacks) == 1:
        return contextlib.nullcontext()
    return models.replaying(source.model, source.stacks[0][1],
                            {block: outputs[slot].to(source.device) for block, outputs in replay.items()
                             if slot in outputs})


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def blockwise_logits(model_path, batches: list[CalibrationBatch], *, device=None, dtype=None) -> list[Tensor]:
    """Logits of the source model computed block by block through the streaming path, with nothing
    compressed: one block's weights at a time, every stack in turn (a vision tower, then the decoder). This
    is the pass the build runs, and what must reproduce the full model's logits exactly."""
    source = SourceCheckpoint(model_path, device or default_device(), dtype)
    with tempfile.TemporaryDirectory() as spill:
        store = ActivationStore(Path(spill), default_host_budget())
        replay: dict[int, dict[int, Tensor]] = {}
        for prefix, stack in source.stacks:
            source.load_outer()
            inputs = source.capture(batches, store, prefix, replay)
            features = feature_blocks(source.config, len(stack)) if prefix != source.prefix else set()
            for index in range(len(stack)):
                block = source.load_block(index, prefix)
                run_block(block, block_inputs(store, inputs, index, source.device), store.put)
                release(block)
                if index in features:
                    replay[index] = inputs.recorded(store)
        source.load_outer()
        logits = []
        for slot, b in enumerate(batches):
            images = {k: v.to(source.device) for k, v in b.images.items()}
            with _replaying(source, replay, slot):
                logits.append(models.logits_from_hidden(source.model, b.input_ids.to(source.device),
                                                        b.attention_mask.to(source.device),
                                                        store.get(slot, source.device), **images))
        return logits
