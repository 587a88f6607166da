"""The GEMM behind the low-rank factors: ``diag(row) @ a @ diag(inner) @ b @ diag(col)``
(docs/design.md §1.3, §1.4, §4.3).

The inner scaling multiplies each a-tile in registers and the row/column scalings and the cast to the output
dtype happen in the epilogue, so no scaled intermediate (``W diag(s)``, ``diag(1/s) Q^T``) is ever written
to memory. Inputs keep their strides (transposed views such as ``Q^T`` are read in place) and may differ
in dtype; accumulation is fp32, and fp32 dots are IEEE-exact because the products feed SVDs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from .launch import dot_options, on_device


def _configs() -> list[triton.Config]:
    if triton_interpreted():
        # A single config: the autotuner would otherwise time every candidate in the (slow) interpreter.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "DOT_DTYPE", "HAS_INNER"])
@triton.jit
def _scaled_matmul_kernel(
    a_ptr, b_ptr, out_ptr, row_ptr, inner_ptr, col_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    stride_row, stride_inner, stride_col,
    HAS_ROW: tl.constexpr, HAS_INNER: tl.constexpr, HAS_COL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M consecutive row tiles sweep the column tiles together, so each
    # b tile is reused from L2 by the whole group.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    # int64 offsets: strides of transposed views times tile indices can pass 2^31 on large layers.
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    in_m = rm < M
    in_n = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = rk < K - k0
        a = tl.load(a_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
        if HAS_INNER:
            inner = tl.load(inner_ptr + (k0 + rk) * stride_inner, mask=in_k, other=0.0)
            a = a.to(tl.float32) * inner.to(tl.float32)[None, :]
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_ROW:
        acc *= tl.load(row_ptr + rm * stride_row, mask=in_m, other=0.0).to(tl.float32)[:, None]
    if HAS_COL:
        acc *= tl.load(col_ptr + rn * stride_col, mask=in_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


def scaled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    row_scale: torch.Tensor | None,
    inner_scale: torch.Tensor | None,
    col_scale: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    """``diag(row_scale) @ a @ diag(inner_scale) @ b @ diag(col_scale)`` in one kernel, cast to ``out_dtype``.

    ``a (M, K)`` and ``b (K, N)`` in fp32/fp16/bf16 with any strides; scales ``(M,)``, ``(K,)``, ``(N,)``
    are optional. With half-precision operands the inner-scaled a-tile is rounded back to the dot dtype
    (tensor cores), so ``a * inner_scale`` must stay in that dtype's range.
    """
    (m, k), n = a.shape, b.shape[1]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    with on_device("scaled_matmul", a, b, row_scale, inner_scale, col_scale):
        out = torch.empty((m, n), dtype=out_dtype or torch.promote_types(a.dtype, b.dtype), device=a.device)
        if m == 0 or n == 0:
            return out
        dot = dot_options(a, b)
        # Absent scales are never loaded (constexpr flags); any pointer fills their slot.
        _scaled_matmul_kernel[grid](
            a, b, out,
            a if row_scale is None else row_scale,
            a if inner_scale is None else inner_scale,
            a if col_scale is None else col_scale,
            m, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            *(0 if s is None else s.stride(0) for s in (row_scale, inner_scale, col_scale)),
            HAS_ROW=row_scale is not None,
            HAS_INNER=inner_scale is not None,
            HAS_COL=col_scale is not None,
            DOT_DTYPE=dot.dtype,
            INPUT_PRECISION=dot.precision,
        )
    return out
