"""Plain PyTorch implementations of every emloc op: the specification the Triton kernels, and the chunked
LM-head loss, are tested against.

They favour clarity over speed and accumulate in fp32 (fp64 for fp64 inputs), casting only the final
result, which is exactly what the kernels must reproduce. Those with a Triton kernel are also the torch
backend that builds run on a CPU, so where the kernel's own savings cost no clarity they keep them: the
covariance computes only its upper triangle, and the scaled product makes no full-size temporaries.
"""
from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def covariance_update(cov: Tensor, x: Tensor, mask: Tensor | None = None, panel: int = 128) -> Tensor:
    """``cov += x_sel^T x_sel`` in place; ``x_sel`` holds the rows of ``x (T, n)`` where ``mask (T,)`` is True.

    The update is symmetric, so, as in the kernel, only its upper triangle is computed, in row panels of
    ``panel`` features from the diagonal to the last column, and each panel's off-diagonal part is added
    below the diagonal too: about half the FLOPs of one full GEMM on wide inputs.
    """
    if mask is not None:
        x = x[mask]
    x = x.to(cov.dtype)
    n = x.shape[1]
    if n <= panel:
        return cov.addmm_(x.T, x)
    for start in range(0, n, panel):
        stop = min(start + panel, n)
        rows = x[:, start:stop].T @ x[:, start:]  # update rows start:stop, columns start:
        cov[start:stop, start:] += rows
        cov[stop:, start:stop] += rows[:, stop - start:].T
    return cov


def scaled_matmul(
    a: Tensor,
    b: Tensor,
    row_scale: Tensor | None = None,
    inner_scale: Tensor | None = None,
    col_scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``diag(row_scale) @ a @ diag(inner_scale) @ b @ diag(col_scale)``, accumulated in fp32, cast at the end.

    ``a (m, k)``, ``b (k, n)``, ``row_scale (m,)``, ``inner_scale (k,)``, ``col_scale (n,)``, each scale optional.
    The result has ``out_dtype``, by default the promoted dtype of ``a`` and ``b``.
    """
    result_dtype = out_dtype if out_dtype is not None else torch.promote_types(a.dtype, b.dtype)
    acc = accumulation_dtype(a, b)
    a, b = a.to(acc), b.to(acc)
    if inner_scale is not None:  # applied to the smaller operand: a scaled copy of it is the only temporary
        if a.numel() <= b.numel():
            a = a * inner_scale.to(acc)
        else:
            b = b * inner_scale.to(acc)[:, None]
    out = a @ b
    if row_scale is not None:  # the product is fresh: scaled in place
        out.mul_(row_scale.to(acc)[:, None])
    if col_scale is not None:
        out.mul_(col_scale.to(acc))
    return out.to(result_dtype)


def emulator_linear_forward(
    x: Tensor,
    v: Tensor,
    u: Tensor,
    bias: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """``y = (x v^T) u^T + bias + scaling (x a^T) b^T`` on ``x (T, n)``; also returns ``xa = x a^T`` for backward.

    ``v (r, n)``, ``u (m, r)``, ``bias (m,)``, ``lora_a (k, n)``, ``lora_b (m, k)``. Without LoRA, ``xa`` has
    shape ``(T, 0)``. ``y`` and ``xa`` have the dtype of ``x``.
    """
    acc = accumulation_dtype(x, v, u)
    xf = x.to(acc)
    y = (xf @ v.to(acc).T) @ u.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    if lora_a is not None:
        xa = xf @ lora_a.to(acc).T
        y = y + scaling * (xa @ lora_b.to(acc).T)
    else:
        xa = xf.new_empty(x.shape[0], 0)
    return y.to(x.dtype), xa.to(x.dtype)


def emulator_linear_backward(
    grad_y: Tensor,
    x: Tensor,
    xa: Tensor,
    v: Tensor,
    u: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    scaling: float,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of :func:`emulator_linear_forward` w.r.t. ``x``, ``lora_a`` and ``lora_b`` (u and v are frozen).

    ``dx = (dy u) v + scaling (dy b) a``, ``da = scaling (dy b)^T x``, ``db = scaling dy^T xa``; each in the
    dtype of the tensor it is the gradient of. The bias gradient is ``dy.sum(0)`` and is left to the caller.
    """
    acc = accumulation_dtype(grad_y, x, v, u)
    dy = grad_y.to(acc)
    dx = (dy @ u.to(acc)) @ v.to(acc)
    grad_a = grad_b = None
    if lora_a is not None:
        dya = scaling * (dy @ lora_b.to(acc))
        dx = dx + dya @ lora_a.to(acc)
        grad_a = (dya.T @ x.to(acc)).to(lora_a.dtype)
        grad_b = (scaling * (dy.T @ xa.to(acc))).to(lora_b.dtype)
    return dx.to(x.dtype), grad_a, grad_b


def lm_head_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    normalizer: float | Tensor,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """``sum_t CE(softcap(hidden_t weight^T), labels_t) / normalizer`` from the full ``(N, V)`` logits.

    ``hidden (N, h)``, ``weight (V, h)``, ``labels (N,)`` with ``ignore_index`` where there is no loss; softcap
    is ``c tanh(logits / c)``. Returns the scalar loss (fp32, fp64 for fp64 inputs; differentiable through
    autograd) and where the argmax of the logits is the label (False where it is ignored). The chunked
    :func:`emloc_kernels.lm_head_cross_entropy` must agree with it without ever holding all the logits.
    """
    acc = accumulation_dtype(hidden, weight)
    logits = hidden.to(acc) @ weight.to(acc).T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss / normalizer, (logits.argmax(-1) == labels) & (labels != ignore_index)
