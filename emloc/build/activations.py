"""The calibration activations between blocks, kept on the host: one slot per calibration batch, in memory
up to a byte budget and spilled to files beyond it; and the block inputs read back from them.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .block import BlockInput

__all__ = ["ActivationStore", "FiniteSink", "StackInputs", "block_inputs", "default_host_budget", "move_tensors"]


class ActivationStore:
    """Calibration activations between blocks: kept in host memory up to ``budget`` bytes, spilled to
    files under ``spill_dir`` beyond it. Slots are replaced in place as a block's outputs arrive."""

    def __init__(self, spill_dir: Path, budget: int) -> None:
        self.spill_dir, self.budget = spill_dir, budget
        self.slots: dict[int, Tensor | Path] = {}

    def _in_memory(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slots.values() if isinstance(t, Tensor))

    def put(self, slot: int, tensor: Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        previous = self.slots.pop(slot, None)
        if isinstance(previous, Path):
            previous.unlink(missing_ok=True)
        if self._in_memory() + tensor.numel() * tensor.element_size() <= self.budget:
            self.slots[slot] = tensor
        else:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"activations-{slot}.safetensors"
            save_file({"hidden": tensor.contiguous()}, str(path))
            self.slots[slot] = path

    def get(self, slot: int, device) -> Tensor:
        value = self.slots[slot]
        tensor = load_file(str(value))["hidden"] if isinstance(value, Path) else value
        return tensor.to(device)

    def close(self) -> None:
        shutil.rmtree(self.spill_dir, ignore_errors=True)


def default_host_budget() -> int:
    """Half of the host memory available now."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class FiniteSink:
    """Stores each block output in the activation store and records, without a host sync, whether it
    was finite."""

    def __init__(self, store: ActivationStore) -> None:
        self.store, self.flags = store, []

    def __call__(self, slot: int, out: Tensor) -> None:
        self.flags.append(torch.isfinite(out).all())
        self.store.put(slot, out)

    def all_finite(self) -> Tensor | None:
        return torch.stack(self.flags).all() if self.flags else None


def move_tensors(tree, device, memo: dict | None = None):
    """Move the tensors of a kwargs tree to ``device``; a tensor shared within the tree is moved once."""
    memo = {} if memo is None else memo
    if isinstance(tree, Tensor):
        if id(tree) not in memo:
            memo[id(tree)] = (tree, tree.to(device))
        return memo[id(tree)][1]
    if isinstance(tree, dict):
        return {k: move_tensors(v, device, memo) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(move_tensors(v, device, memo) for v in tree)
    return tree


class StackInputs:
    """What the blocks of one stack receive per calibration batch that reaches them (``slots``, the batches'
    indices; the activation store holds the i-th such batch in its slot i): the block keyword arguments caught
    for it, and which tokens count in a covariance."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.slots: list[int] = []
        self.kwargs: list[list[dict]] = []
        self.masks: list[Tensor] = []

    def add(self, slot: int, kwargs: list[dict], mask: Tensor) -> None:
        self.slots.append(slot)
        self.kwargs.append(kwargs)
        self.masks.append(mask)


    def recorded(self, store: ActivationStore) -> dict[int, Tensor]:
        """The stack's current outputs in ``store`` (on the host), by batch index."""
        return {slot: store.get(position, "cpu") for position, slot in enumerate(self.slots)}


def block_inputs(store: ActivationStore, inputs: StackInputs, block: int, device) -> Iterator[BlockInput]:
    """The inputs of block ``block`` of a stack on ``device``, one per batch that reaches it: the stored hidden
    states, the block's keyword arguments caught for that batch, and the mask of the tokens that count."""
    for position, (kwargs, mask) in enumerate(zip(inputs.kwargs, inputs.masks, strict=True)):
        yield BlockInput(store.get(position, device), move_tensors(kwargs[block], device), mask.to(device))
