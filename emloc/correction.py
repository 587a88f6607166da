"""LoRA correction (docs/design.md §1.10): move a LoRA trained on the emulator onto the original weights.

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

from .build import read_emloc_section
from .errors import UserError
from .files import read_json
from .lora import LoraAdapter
from .progress import track
from .streaming import CheckpointIndex, key_mapping
from .vision import CHECKPOINT_PREFIXES


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
    if a.shape[0] > a.shape[1]:
        raise UserError(f"LoRA correction: rank {a.shape[0]} exceeds the layer's {a.shape[1]} input features")
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

    Raises :class:`~emloc.errors.UserError` if the emulator was built from another model (the content
    hash of every shard, recorded in its config), if the adapter records that it was trained on another
    emulator, or if an adapter module is not a linear of the original model or does not fit its shape.
    """
    where = adapter if not isinstance(adapter, LoraAdapter) else "the adapter"
    if not isinstance(adapter, LoraAdapter):
        adapter = LoraAdapter.load(adapter)
    original, emulator = CheckpointIndex(original_path), CheckpointIndex(emulator_path)
    if check_source:
        check_emulator_source(emulator_path, original)
    check_trained_on(adapter, read_emloc_section(emulator_path), emulator_path, where)
    key_of = weight_keys(adapter, original)
    corrected = {}
    for name, (a, b) in track(adapter.weights.items(), "correcting LoRA", "layer", enabled=progress):
        weight = original.load([key_of[name]], device)[key_of[name]]
        check_adapter_shapes(name, a, b, weight.shape, original_path)
        if f"{name}.u" in emulator:
            factors = emulator.load([f"{name}.u", f"{name}.v"], device)
            emulated = (factors[f"{name}.u"], factors[f"{name}.v"])
        else:
            emulated = emulator.load([f"{name}.weight"], device)[f"{name}.weight"]
        a_t, b_hat = correct_layer(a.to(device), b.to(device), adapter.scaling, weight, emulated, clamp)
        corrected[name] = (a_t.to("cpu", dtype), b_hat.to("cpu", dtype))
        del weight, emulated
    extra = {**adapter.extra, "corrected": True, "clamp": clamp}
    return LoraAdapter(corrected, r=adapter.r, alpha=adapter.alpha, rslora=adapter.rslora, dropout=adapter.dropout,
                       base_model=str(original_path), extra=extra)


def check_trained_on(adapter: LoraAdapter, section: dict, emulator_path, where) -> None:
    """Raise :class:`~emloc.errors.UserError` if ``adapter`` records an emulator other than the one whose
    ``emloc`` config section is ``section`` (another model, ratio, rank or calibration gives other shards,
    hence another content hash). An adapter without the record (PEFT's own, or trained on a model loaded
    some other way) cannot be checked and is taken as it is."""
    record = adapter.extra.get("emulator")
    recorded = record.get("content_hash") if isinstance(record, dict) else None
    actual = section.get("content_hash")
    if recorded is not None and recorded != actual:
        trained_on = record.get("path") or "another emulator"
        raise UserError(f"{where}: the adapter was trained on {trained_on} (emulator content hash "
                        f"{recorded[:12]}...), not on the emulator at {emulator_path} "
                        f"({actual[:12] + '...' if actual else 'which records no content hash'}); correct it with "
                        "the emulator it was trained on")


def check_emulator_source(emulator_path: str | os.PathLike, original: CheckpointIndex) -> None:
    """Raise :class:`~emloc.errors.UserError` if the emulator was not built from ``original``: the content
    hash in its ``emloc`` config (index and the bytes of every shard, :meth:`CheckpointIndex.content_hash`)
    must be the model's."""
    section = read_emloc_section(emulator_path)
    if "content_hash" not in section:  # the field arrived with source hashes over the shards' bytes
        raise UserError(f"{emulator_path}: built by an earlier emloc, whose record of its source covers the "
                        "layout only, not the weights; rebuild it (emloc build --overwrite) so that correction "
                        f"can check it was built from {original.directory}")
    recorded, actual = section["source"]["hash"], original.content_hash()
    if recorded != actual:
        raise UserError(f"the emulator at {emulator_path} was built from a different model than "
                        f"{original.directory} (source content hash {recorded[:12]}... in its config, "
                        f"{actual[:12]}... for the model given)")


def weight_keys(adapter: LoraAdapter, model: CheckpointIndex) -> dict[str, str]:
    """The checkpoint key of each adapter module's weight (checkpoints may prefix module names differently).

    Raises :class:`~emloc.errors.UserError` naming the first adapter module that has no weight in the model's
    checkpoint.
    """
    config = model.directory / "config.json"
    model_type = read_json(config).get("model_type") if config.is_file() else None
    key_of = key_mapping([f"{name}.weight" for name in adapter.weights], model, CHECKPOINT_PREFIXES.get(model_type, ()))
    keys = {name: key_of(f"{name}.weight") for name in adapter.weights}
    for name, key in keys.items():
        if key not in model:
            raise UserError(f"LoRA adapter module {name!r} is not a layer of the model at {model.directory} "
                             f"(no tensor {key!r} in its checkpoint)")
    return keys


def check_adapter_shapes(name: str, a: Tensor, b: Tensor, shape, where) -> None:
    """Raise :class:`~emloc.errors.UserError` if LoRA ``a (k, n)``, ``b (m, k)`` cannot sit on a weight of
    ``shape (m, n)``."""
    if len(shape) != 2 or a.ndim != 2 or b.ndim != 2 or (b.shape[0], a.shape[1]) != tuple(shape) \
            or a.shape[0] != b.shape[1]:
        raise UserError(f"LoRA adapter module {name!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                         f"not fit the weight of shape {tuple(shape)} in {where}")
