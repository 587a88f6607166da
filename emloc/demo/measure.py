"""Peak memory of one fine-tuning step, measured the same way for every row of the comparison.

It is counted from the tensors a step holds at its peak, the same way on every device (the CPU keeps no
allocator peak): every weight, the gradient and two AdamW moments of each trainable one, and the
activations autograd saves for the backward pass (each storage once).
"""
from __future__ import annotations

import torch
from torch import nn


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def saved_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves during a forward pass of ``model`` on ``batch``,
    not counting the model's own weights."""
    weights = {_storage_key(p) for p in model.parameters()}
    saved: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in weights:
            saved[key] = key[1]
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch).loss  # noqa: B018 - only the saved tensors matter
    return sum(saved.values())


def training_peak_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Peak bytes of one AdamW fine-tuning step of ``model`` on ``batch``: weights, three copies of the
    trainable weights (gradient, two moments) and the saved activations."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weight_bytes + state_bytes + saved_activation_bytes(model, batch)
