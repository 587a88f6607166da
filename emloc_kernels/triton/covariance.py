"""Streaming covariance ``cov += x_sel^T x_sel`` (docs/design.md §1.1, §4.2).

One program owns one tile pair ``(i, j)`` with ``i <= j`` of the ``(n, n)`` result: the grid is 1-D over
the upper-triangular tile pairs, so the symmetric half below the diagonal costs no FLOPs. Each program
walks the tokens in blocks, loads the two column slices of ``x`` in their own dtype (no fp32 copy of ``x``
ever exists), zeroes the rows the mask leaves out at load time, and accumulates in fp32. It then adds the
tile to ``cov[i, j]`` and, off the diagonal, its transpose to ``cov[j, i]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import dot_options, on_device


@triton.jit
def _tile_pair(pid):
    """The ``pid``-th upper-triangular tile pair ``(row, col)``, ``row <= col``, enumerated column by column.

    Column ``c`` holds pairs ``c * (c + 1) / 2 .. c * (c + 1) / 2 + c``; the float square root gives ``c``,
    and the two corrections keep it exact where an approximate GPU square root lands on the wrong side
    of a triangular number.
    """
    col = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) * 0.5).to(tl.int32)
    col = tl.where(col * (col + 1) // 2 > pid, col - 1, col)
    col = tl.where((col + 1) * (col + 2) // 2 <= pid, col + 1, col)
    return pid - col * (col + 1) // 2, col


@triton.jit
def _covariance_kernel(
    cov_ptr, x_ptr, mask_ptr,
    T, n,
    stride_cov_r, stride_cov_c, stride_x_t, stride_x_n, stride_mask,
    HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    tile_i, tile_j = _tile_pair(tl.program_id(0))
    # int64 offsets: token (or, for column-major x, feature) index times stride passes 2^31 on wide layers.
    cols_i = (tile_i * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols_j = (tile_j * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    in_i = cols_i < n
    in_j = cols_j < n
    tokens = tl.arange(0, BLOCK_T).to(tl.int64)

    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        rows = start + tokens
        selected = rows < T
        if HAS_MASK:
            selected = selected & (tl.load(mask_ptr + rows * stride_mask, mask=selected, other=0) != 0)
        # Loading masked-out rows as zero (instead of multiplying them by zero) keeps NaN/inf in padding out.
        row_offsets = rows * stride_x_t
        x_i_t = tl.load(  # (BLOCK_N, BLOCK_T): x[rows, cols_i]^T, read straight in transposed order
            x_ptr + row_offsets[None, :] + cols_i[:, None] * stride_x_n,
            mask=in_i[:, None] & selected[None, :], other=0.0,
        )
        x_j = tl.load(
            x_ptr + row_offsets[:, None] + cols_j[None, :] * stride_x_n,
            mask=selected[:, None] & in_j[None, :], other=0.0,
        )
        acc = tl.dot(x_i_t.to(DOT_DTYPE), x_j.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    in_tile = in_i[:, None] & in_j[None, :]
    upper = cov_ptr + cols_i[:, None] * stride_cov_r + cols_j[None, :] * stride_cov_c
    tl.store(upper, tl.load(upper, mask=in_tile) + acc, mask=in_tile)
    if tile_i != tile_j:
        # cov[j, i] laid out in the tile's (i, j) order: the mirror update needs no transpose of acc.
        lower = cov_ptr + cols_j[None, :] * stride_cov_r + cols_i[:, None] * stride_cov_c
        tl.store(lower, tl.load(lower, mask=in_tile) + acc, mask=in_tile)


def _launch_config(x: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_T, num_warps): 16-bit inputs run on tensor cores and afford wider tiles than the
    fp32 FMA path, whose (BLOCK_N, BLOCK_N) accumulator lives in registers."""
    if x.dtype == torch.float32:
        return 64, 32, 4
    return 128, 32, 8


def covariance_update(cov: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Add ``x[mask]^T x[mask]`` to ``cov`` in place.

    Args:
        cov: ``(n, n)`` float32 accumulator, any strides.
        x: ``(T, n)`` fp32/fp16/bf16 activations, any strides (read in place, never copied or upcast).
        mask: optional ``(T,)`` bool tensor; rows where it is False contribute nothing.
    """
    T, n = x.shape
    with on_device("covariance_update", cov, x, mask):
        if T == 0 or n == 0:
            return
        block_n, block_t, num_warps = _launch_config(x)
        tiles = triton.cdiv(n, block_n)
        dot = dot_options(x)
        _covariance_kernel[(tiles * (tiles + 1) // 2,)](
            cov, x, mask,
            T, n,
            cov.stride(0), cov.stride(1), x.stride(0), x.stride(1), 0 if mask is None else mask.stride(0),
            HAS_MASK=mask is not None,
            DOT_DTYPE=dot.dtype,
            INPUT_PRECISION=dot.precision,
            BLOCK_N=block_n,
            BLOCK_T=block_t,
            num_warps=num_warps,
        )
