"""emloc_kernels: the device ops of emloc.

Public API (the contract the pipeline and users call):

* :func:`covariance_update` - streaming ``X^T X`` accumulation with a padding mask.
* :func:`whitening`, :func:`whitened_lowrank`, :func:`projected_lowrank` - activation-aware low-rank factors.
* :func:`emulator_linear` - the fused emulator layer ``U (V x) + b + s B (A x)`` with autograd.
* :func:`scaled_matmul` - the GEMM with fused diagonal scalings and final cast the factor code is built on.
* :func:`lm_head_cross_entropy` - LM head and cross entropy chunk by chunk, so full logits never exist.

Each op with a Triton kernel runs it on CUDA tensors (or in the interpreter with ``TRITON_INTERPRET=1``) and
the torch reference otherwise; ``EMLOC_BACKEND=torch|triton`` overrides (see :mod:`emloc_kernels.backend`).
The chunked loss is plain torch on every device (see :mod:`emloc_kernels.cross_entropy`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .cross_entropy import lm_head_cross_entropy
from .lowrank import Whitening, projected_lowrank, whitened_lowrank, whitening

__all__ = [
    "Whitening",
    "covariance_update",
    "emulator_linear",
    "lm_head_cross_entropy",
    "projected_lowrank",
    "scaled_matmul",
    "whitened_lowrank",
    "whitening",
]

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def covariance_update(cov: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Accumulate ``cov += x_sel^T x_sel`` in place and return ``cov``.

    Args:
        cov: ``(n, n)`` float32 accumulator (float64 allowed on the CPU).
        x: ``(..., n)`` activations in fp32/fp16/bf16, any strides; never copied to fp32.
        mask: optional bool tensor of shape ``x.shape[:-1]``; only tokens where it is True count
            (pass the attention mask to keep padding out).
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance_update: cov must be square (n, n), got {tuple(cov.shape)}")
    n = cov.shape[0]
    if cov.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"covariance_update: cov must be float32 (or float64), got {cov.dtype}")
    if x.shape[-1:] != (n,):
        raise ValueError(f"covariance_update: x has {x.shape[-1] if x.ndim else 0} features, cov is ({n}, {n})")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"covariance_update: x must be fp32/fp16/bf16, got {x.dtype}")
    if x.device != cov.device:
        raise ValueError(f"covariance_update: x is on {x.device}, cov on {cov.device}")
    x2d = x.reshape(-1, n)
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != x.shape[:-1]:
            raise ValueError(
                f"covariance_update: mask must be bool of shape {tuple(x.shape[:-1])}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        mask = mask.reshape(-1).to(x.device)
        if mask.device.type == "cpu" and bool(mask.all()):
            mask = None  # the reference path would gather a full copy of x to drop nothing
    ops.covariance_update(cov, x2d, mask)
    return cov


def scaled_matmul(
    a: Tensor,
    b: Tensor,
    row_scale: Tensor | None = None,
    inner_scale: Tensor | None = None,
    col_scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``diag(row_scale) @ a @ diag(inner_scale) @ b @ diag(col_scale)``, fp32 accumulation, cast to ``out_dtype``.

    ``a (m, k)``, ``b (k, n)``; every scale is optional; ``out_dtype`` defaults to the promoted input dtype.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"scaled_matmul: cannot multiply {tuple(a.shape)} by {tuple(b.shape)}")
    for name, scale, size in (("row_scale", row_scale, a.shape[0]), ("inner_scale", inner_scale, a.shape[1]),
                              ("col_scale", col_scale, b.shape[1])):
        if scale is not None and scale.shape != (size,):
            raise ValueError(f"scaled_matmul: {name} must have shape ({size},), got {tuple(scale.shape)}")
    return ops.scaled_matmul(a, b, row_scale, inner_scale, col_scale, out_dtype)


def emulator_linear(
    x: Tensor,
    v: Tensor,
    u: Tensor,
    bias: Tensor | None = None,
    lora_a: Tensor | None = None,
    lora_b: Tensor | None = None,
    scaling: float = 1.0,
) -> Tensor:
    """The emulator layer with optional LoRA: ``y = (x v^T) u^T + bias + scaling * (x lora_a^T) lora_b^T``.

    Args:
        x: ``(..., n)`` input; ``y`` has shape ``(..., m)`` and the dtype of ``x``.
        v: ``(r, n)`` and u: ``(m, r)``: the frozen low-rank factors of the emulated weight.
        bias: optional ``(m,)``.
        lora_a: optional ``(k, n)`` and lora_b: ``(m, k)``, given together.
        scaling: the LoRA scaling ``s`` (alpha / k, or alpha / sqrt(k) for rsLoRA).

    Differentiable in ``x``, ``lora_a``, ``lora_b`` and ``bias``; ``u`` and ``v`` must not require grad.
    Backward saves only ``x`` and ``x lora_a^T``.
    """
    if v.ndim != 2 or u.ndim != 2 or u.shape[1] != v.shape[0]:
        raise ValueError(f"emulator_linear: u (m, r) and v (r, n) do not fit: u {tuple(u.shape)}, v {tuple(v.shape)}")
    m, n = u.shape[0], v.shape[1]
    if x.shape[-1:] != (n,):
        raise ValueError(f"emulator_linear: x has {x.shape[-1] if x.ndim else 0} features, v expects {n}")
    if u.requires_grad or v.requires_grad:
        raise ValueError("emulator_linear: the emulator factors u and v are frozen; they must not require grad")
    if bias is not None and bias.shape != (m,):
        raise ValueError(f"emulator_linear: bias must have shape ({m},), got {tuple(bias.shape)}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("emulator_linear: lora_a and lora_b must be given together")
    if lora_a is not None and (
        lora_a.ndim != 2 or lora_a.shape[1] != n or lora_b.shape != (m, lora_a.shape[0])
    ):
        raise ValueError(
            f"emulator_linear: LoRA shapes do not fit a ({m}, {n}) layer: "
            f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
        )
    y, _ = ops.emulator_linear(x.reshape(-1, n), v, u, bias, lora_a, lora_b, float(scaling))
    return y.reshape(*x.shape[:-1], m)
