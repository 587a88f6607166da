"""torch.library custom ops: schema, fake (shape) implementation, autograd and backend dispatch.

Each op runs its Triton kernel (``emloc_kernels.triton.*``) or its torch reference
(``emloc_kernels.reference``) as :func:`emloc_kernels.backend.use_triton` decides. The fake
implementations let meta and fake tensors flow through (memory dry runs, ``torch.compile``).
Ops take 2-D inputs; the public wrappers in ``emloc_kernels/__init__`` flatten leading dimensions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .backend import use_triton

# --- covariance ---------------------------------------------------------------------------------------


@torch.library.custom_op("emloc::covariance_update", mutates_args=("cov",))
def covariance_update(cov: Tensor, x: Tensor, mask: Tensor | None) -> None:
    """``cov += x[mask]^T x[mask]`` for ``x (T, n)``, ``mask (T,)`` bool, ``cov (n, n)`` fp32/fp64."""
    if use_triton("covariance_update", cov, x):
        from .triton.covariance import covariance_update as kernel

        kernel(cov, x, mask)
    else:
        reference.covariance_update(cov, x, mask)


@covariance_update.register_fake
def _(cov: Tensor, x: Tensor, mask: Tensor | None) -> None:
    return None


# --- low-rank factor GEMMs ----------------------------------------------------------------------------


@torch.library.custom_op("emloc::scaled_matmul", mutates_args=())
def scaled_matmul(
    a: Tensor,
    b: Tensor,
    row_scale: Tensor | None,
    inner_scale: Tensor | None,
    col_scale: Tensor | None,
    out_dtype: torch.dtype | None,
) -> Tensor:
    """``diag(row_scale) a diag(inner_scale) b diag(col_scale)`` with fp32 accumulation and a fused final cast."""
    if use_triton("scaled_matmul", a, b, row_scale, inner_scale, col_scale):
        from .triton.lowrank import scaled_matmul as kernel

        return kernel(a, b, row_scale, inner_scale, col_scale, out_dtype)
    return reference.scaled_matmul(a, b, row_scale, inner_scale, col_scale, out_dtype)


@scaled_matmul.register_fake
def _(a, b, row_scale, inner_scale, col_scale, out_dtype):
    dtype = out_dtype if out_dtype is not None else torch.promote_types(a.dtype, b.dtype)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=dtype)


# --- fused emulator layer -----------------------------------------------------------------------------


@torch.library.custom_op("emloc::emulator_linear", mutates_args=())
def emulator_linear(
    x: Tensor,
    v: Tensor,
    u: Tensor,
    bias: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, xa)``: ``y = (x v^T) u^T + bias + scaling (x a^T) b^T`` and ``xa = x a^T`` (saved for backward)."""
    if use_triton("emulator_linear", x, v, u, bias, lora_a, lora_b):
        from .triton.emulator_linear import emulator_linear_forward as kernel

        return kernel(x, v, u, bias, lora_a, lora_b, scaling)
    return reference.emulator_linear_forward(x, v, u, bias, lora_a, lora_b, scaling)


@emulator_linear.register_fake
def _(x, v, u, bias, lora_a, lora_b, scaling):
    lora_rank = 0 if lora_a is None else lora_a.shape[0]
    return x.new_empty((x.shape[0], u.shape[0])), x.new_empty((x.shape[0], lora_rank))


@torch.library.custom_op("emloc::emulator_linear_backward", mutates_args=())
def emulator_linear_backward(
    grad_y: Tensor,
    x: Tensor,
    xa: Tensor,
    v: Tensor,
    u: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, da, db)``; without LoRA ``da`` and ``db`` are empty ``(0, n)`` / ``(m, 0)`` tensors."""
    if use_triton("emulator_linear_backward", grad_y, x, v, u, lora_a, lora_b):
        from .triton.emulator_linear import emulator_linear_backward as kernel

        dx, da, db = kernel(grad_y, x, xa, v, u, lora_a, lora_b, scaling)
    else:
        dx, da, db = reference.emulator_linear_backward(grad_y, x, xa, v, u, lora_a, lora_b, scaling)
    if da is None:
        da, db = x.new_empty((0, x.shape[1])), x.new_empty((u.shape[0], 0))
    return dx, da, db


@emulator_linear_backward.register_fake
def _(grad_y, x, xa, v, u, lora_a, lora_b, scaling):
    # Contiguous, like the kernels' results (empty_like would copy the strides of a non-contiguous x).
    dx = x.new_empty(x.shape)
    if lora_a is None:
        return dx, x.new_empty((0, x.shape[1])), x.new_empty((u.shape[0], 0))
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _emulator_linear_setup_context(ctx, inputs, output):
    x, v, u, bias, lora_a, lora_b, scaling = inputs
    _, xa = output
    ctx.save_for_backward(x, xa, v, u, lora_a, lora_b)
    ctx.scaling = scaling
    ctx.bias_dtype = None if bias is None else bias.dtype


def _emulator_linear_backward(ctx, grad_y, grad_xa):
    # grad_xa is never used: xa is an internal output the public wrapper does not return.
    x, xa, v, u, lora_a, lora_b = ctx.saved_tensors
    needs_x, _, _, needs_bias, needs_a, needs_b, _ = ctx.needs_input_grad
    dx = da = db = dbias = None
    if needs_x or needs_a or needs_b:
        dx, da, db = emulator_linear_backward(grad_y, x, xa, v, u, lora_a, lora_b, ctx.scaling)
        dx = dx if needs_x else None
        da = da if needs_a else None
        db = db if needs_b else None
    if needs_bias:
        dbias = grad_y.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, None, None, dbias, da, db, None


emulator_linear.register_autograd(_emulator_linear_backward, setup_context=_emulator_linear_setup_context)
