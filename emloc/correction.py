"""LoRA correction (DESIGN 1.6): move a LoRA trained on the emulator onto the original weights.

For one layer with original weight ``W``, emulated weight ``W' = U V``, LoRA ``A (k, n)``, ``B (m, k)`` and
scaling ``s``:

1. orthonormalise the LoRA input space: ``A^T = P diag(sigma) Q^T``, ``A~ = P^T``, ``B~ = B Q diag(sigma)``
   (``B~ A~ = B A``);
2. misalignment on that space: ``D = (W - W') P``;
3. ``B^ = B~ - D / s``, so ``s B^ A~ = s B A - (W - W') P P^T`` and for every ``x``
   ``(W + s B^ A~) x = W' x_par + W x_perp + s B A x``: on the LoRA input space the original layer with the
   corrected LoRA does exactly what the emulator layer with the trained LoRA did;
4. clamp: where ``mean|D_j / s|`` exceeds ``clamp * mean|B~_j|`` for a direction ``j``, that direction's
   correction is scaled down to exactly ``clamp * mean|B~_j|``.

Dividing by ``s`` is what makes this right for every alpha, rank and rsLoRA. Layers are processed one at a
time, each read from the checkpoint shards on its own.
"""
from __future__ import annotations

import os
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint_io import CheckpointReader, check_emulator_source
from .lora import LoraAdapter


def orthonormalize_lora(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(A~, B~)`` with orthonormal rows in ``A~ (k, n)`` and ``B~ A~ = B A``, via the thin SVD of ``A^T``."""
    p, sigma, qh = torch.linalg.svd(a.T, full_matrices=False)
    return p.T, (b @ qh.T) * sigma


def correct_layer(a: Tensor, b: Tensor, scaling: float, weight: Tensor,
                  emulated: Tensor | tuple[Tensor, Tensor], clamp: float | None = 3.0,
                  dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Correct one layer's LoRA (steps 1 to 4 above); returns ``(A~, B^)`` in ``dtype``.

    Args:
        a, b: the trained LoRA, ``(k, n)`` and ``(m, k)``.
        scaling: the LoRA scaling ``s`` it was trained with (the corrected LoRA keeps it).
        weight: the original ``W (m, n)``.
        emulated: the emulator's weight, as factors ``(U (m, r), V (r, n))`` (never multiplied out) or a dense
            ``(m, n)`` tensor for a layer the emulator kept dense.
        clamp: the cap ``lambda`` on each direction's correction relative to ``mean|B~_j|``; None turns it off.
        dtype: computation dtype (float64 by default: the correction is a difference of close quantities).
    """
    a, b, weight = a.to(dtype), b.to(dtype), weight.to(dtype)
    a_t, b_t = orthonormalize_lora(a, b)
    p = a_t.T
    if isinstance(emulated, tuple):
        u, v = emulated
        emulated_p = u.to(dtype) @ (v.to(dtype) @ p)
    else:
        emulated_p = emulated.to(dtype) @ p
    correction = (weight @ p - emulated_p) / scaling
    if clamp is not None:
        # Per direction j: ratio of the correction's mean magnitude to the LoRA's; above the cap, scale down.
        ratio = correction.abs().mean(0) / b_t.abs().mean(0)
        correction = correction * torch.where(ratio > clamp, clamp / ratio, torch.ones_like(ratio))
    return a_t, b_t - correction


def correct_lora(original_path: str | os.PathLike, emulator_path: str | os.PathLike, adapter: LoraAdapter | str
                 | os.PathLike, clamp: float | None = 3.0, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, check_source: bool = True,
                 progress: bool = True) -> LoraAdapter:
    """Correct an adapter trained on the emulator at ``emulator_path`` for the original model at ``original_path``.

    Streams one layer at a time: ``W`` from the original shards, ``U``/``V`` (or the dense weight) from the
    emulator shards. Computes in float64 on ``device`` and returns the corrected adapter in ``dtype``, with the
    same rank and scaling, ready to export (``lora_A = A~``, ``lora_B = B^``).

    Raises ValueError if the emulator was built from another model (content hash in its config), or if an
    adapter module is not a linear of the original model or does not fit its shape.
    """
    if not isinstance(adapter, LoraAdapter):
        adapter = LoraAdapter.load(adapter)
    original, emulator = CheckpointReader(original_path), CheckpointReader(emulator_path)
    if check_source:
        check_emulator_source(emulator_path, original_path)
    check_adapter_fits(adapter, original)
    corrected = {}
    for name, (a, b) in tqdm(adapter.weights.items(), desc="correcting LoRA", unit="layer", disable=not progress):
        weight = original.get(f"{name}.weight", device)
        if emulator.has(f"{name}.u"):
            emulated = (emulator.get(f"{name}.u", device), emulator.get(f"{name}.v", device))
        else:
            emulated = emulator.get(f"{name}.weight", device)
        a_t, b_hat = correct_layer(a.to(device), b.to(device), adapter.scaling, weight, emulated, clamp)
        corrected[name] = (a_t.to("cpu", dtype), b_hat.to("cpu", dtype))
        del weight, emulated
    extra = {**adapter.extra, "corrected": True, "clamp": clamp}
    return LoraAdapter(corrected, r=adapter.r, alpha=adapter.alpha, rslora=adapter.rslora, dropout=adapter.dropout,
                       base_model=str(original_path), extra=extra)


def check_adapter_fits(adapter: LoraAdapter, model: CheckpointReader) -> None:
    """Raise ValueError naming the module if an adapter layer is not a 2-D weight of ``model`` of matching shape."""
    for name, (a, b) in adapter.weights.items():
        key = f"{name}.weight"
        if not model.has(key):
            raise ValueError(f"LoRA adapter module {name!r} is not a layer of the model at {model.path} "
                             f"(no tensor {key!r} in its checkpoint)")
        shape = model.shape(key)
        if len(shape) != 2 or (b.shape[0], a.shape[1]) != tuple(shape):
            raise ValueError(f"LoRA adapter module {name!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                             f"not fit the model's weight of shape {tuple(shape)} (at {model.path})")
