"""Fused emulator layer ``y = (x v^T) u^T + bias + s (x a^T) b^T`` and its backward (docs/design.md §1.8, §4.5).

Two GEMM kernels carry all the work, each launched for both passes:

* :func:`_projection_kernel` reads one input once for two weights stacked along the output axis,
  ``o1 = p w1^T`` and ``o2 = s p w2^T``. Forward: ``[h, xa] = x [v; a]^T``. Backward: ``[dy u, s dy b]``.
* :func:`_expansion_kernel` sums two products into one output, ``out = s1 p1 q1 + s2 p2 q2 (+ bias)``.
  Forward: ``y = h u^T + s xa b^T + bias``. Backward: ``dx = (dy u) v + (s dy b) a``, and the LoRA weight
  gradients ``da = (s dy b)^T x`` and ``db = s dy^T xa`` (single products, split along the token axis).

Column tiles run along grid axis 0, so the programs of one row tile, the LoRA columns included, run back
to back and can share that row tile of the input through L2 instead of each fetching it from memory.
The backward needs only ``x`` and ``xa``: ``h`` is not kept, and ``[dy u, s dy b]`` comes from ``dy``.

Inputs keep their strides and may differ in dtype (an fp32 LoRA on a bf16 base). Each product multiplies
its operands in their promoted dtype and accumulates in fp32; fp32 dots are IEEE-exact. Intermediates
(``h``, ``dy u``, ``s dy b``) are stored in the promoted dtype of their operands so that half-precision
layers keep half-precision tensor-core dots in the second GEMM (the reference keeps ``h`` in fp32; the
extra rounding is within the half-precision tolerance); each output is cast once from its fp32 accumulator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from .launch import dot_options, on_device


@triton.jit
def _tile_product(
    p_ptr, q_ptr, off_m, off_n, M, N, k_start, k_end,
    stride_pm, stride_pk, stride_qk, stride_qn,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 tile ``p[off_m:off_m+BLOCK_M, k_start:k_end] @ q[k_start:k_end, off_n:off_n+BLOCK_N]``."""
    # int64 offsets: token index times row stride passes 2^31 on long batches of wide layers.
    rm = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (off_n + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    in_m = rm < M
    in_n = rn < N
    p_ptrs = p_ptr + rm[:, None] * stride_pm + (k_start + rk)[None, :] * stride_pk
    q_ptrs = q_ptr + (k_start + rk)[:, None] * stride_qk + rn[None, :] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        in_k = rk < k_end - k0
        p = tl.load(p_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk
    return acc


@triton.jit
def _store_tile(out_ptr, acc, off_m, off_n, M, N, stride_om, stride_on,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cast an fp32 tile to the output dtype and store its in-bounds part."""
    rm = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (off_n + tl.arange(0, BLOCK_N)).to(tl.int64)
    ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _projection_kernel(
    p_ptr, w1_ptr, w2_ptr, o1_ptr, o2_ptr,
    M, K, N1, N2, scale2,
    stride_pm, stride_pk, stride_w1n, stride_w1k, stride_w2n, stride_w2k,
    stride_o1m, stride_o1n, stride_o2m, stride_o2n,
    DOT1: tl.constexpr, PRECISION1: tl.constexpr, DOT2: tl.constexpr, PRECISION2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``o1 = p w1^T`` and ``o2 = scale2 p w2^T``: one GEMM over the stacked weight ``[w1; w2]``.

    Axis 0 enumerates the column tiles of ``w1`` then those of ``w2`` (narrower: a LoRA rank is small),
    axis 1 the row tiles of ``p``. ``N2 == 0`` launches no ``w2`` tiles.
    """
    pid_n = tl.program_id(0)
    off_m = tl.program_id(1) * BLOCK_M
    tiles1 = tl.cdiv(N1, BLOCK_N1)
    # The branches' tiles differ in width, so each keeps its own names (the compiler merges shared ones).
    if pid_n < tiles1:
        off_n1 = pid_n * BLOCK_N1
        acc1 = _tile_product(p_ptr, w1_ptr, off_m, off_n1, M, N1, 0, K,
                             stride_pm, stride_pk, stride_w1k, stride_w1n,
                             DOT1, PRECISION1, BLOCK_M, BLOCK_N1, BLOCK_K)
        _store_tile(o1_ptr, acc1, off_m, off_n1, M, N1, stride_o1m, stride_o1n, BLOCK_M, BLOCK_N1)
    else:
        off_n2 = (pid_n - tiles1) * BLOCK_N2
        acc2 = _tile_product(p_ptr, w2_ptr, off_m, off_n2, M, N2, 0, K,
                             stride_pm, stride_pk, stride_w2k, stride_w2n,
                             DOT2, PRECISION2, BLOCK_M, BLOCK_N2, BLOCK_K)
        _store_tile(o2_ptr, acc2 * scale2, off_m, off_n2, M, N2, stride_o2m, stride_o2n, BLOCK_M, BLOCK_N2)


@triton.jit
def _expansion_kernel(
    p1_ptr, q1_ptr, p2_ptr, q2_ptr, bias_ptr, out_ptr,
    M, N, K1, K2, scale1, scale2, split_k1,
    stride_p1m, stride_p1k, stride_q1k, stride_q1n,
    stride_p2m, stride_p2k, stride_q2k, stride_q2n,
    stride_bias, stride_os, stride_om, stride_on,
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT1: tl.constexpr, PRECISION1: tl.constexpr, DOT2: tl.constexpr, PRECISION2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K1: tl.constexpr, BLOCK_K2: tl.constexpr,
):
    """``out = scale1 p1 q1 + scale2 p2 q2 + bias`` for one ``(BLOCK_M, BLOCK_N)`` tile.

    Axis 2 splits the first product's reduction into chunks of ``split_k1`` (a multiple of ``BLOCK_K1``):
    split ``s`` writes its partial sum to ``out[s]`` (stride ``stride_os``) and the launcher adds them.
    The second product and the bias are only ever used without splitting.
    """
    off_n = tl.program_id(0) * BLOCK_N
    off_m = tl.program_id(1) * BLOCK_M
    split = tl.program_id(2)
    k_start = split * split_k1
    acc = _tile_product(p1_ptr, q1_ptr, off_m, off_n, M, N, k_start, min(k_start + split_k1, K1),
                        stride_p1m, stride_p1k, stride_q1k, stride_q1n,
                        DOT1, PRECISION1, BLOCK_M, BLOCK_N, BLOCK_K1) * scale1
    if HAS_SECOND:
        acc += scale2 * _tile_product(p2_ptr, q2_ptr, off_m, off_n, M, N, 0, K2,
                                      stride_p2m, stride_p2k, stride_q2k, stride_q2n,
                                      DOT2, PRECISION2, BLOCK_M, BLOCK_N, BLOCK_K2)
    if HAS_BIAS:
        rn = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    _store_tile(out_ptr + split.to(tl.int64) * stride_os, acc, off_m, off_n, M, N, stride_om, stride_on,
                BLOCK_M, BLOCK_N)


# --- launch configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # Smallest reduction chunk a split-K program gets, and the program count splitting aims for.
    min_split_k: int
    target_programs: int


def _tiles(*tensors: torch.Tensor) -> _Tiles:
    """Tile sizes for a product of ``tensors``. The interpreter gets small tiles so tests cover many of them."""
    if triton_interpreted():
        return _Tiles(32, 32, 32, num_warps=4, num_stages=1, min_split_k=64, target_programs=4)
    half = all(t.element_size() <= 2 for t in tensors)
    # Untuned starting points: 16-bit operands run on tensor cores with a deeper K tile than fp32;
    # split-K aims at two programs per SM of an H100 (132 SMs).
    return _Tiles(128, 128, 64 if half else 32, num_warps=8, num_stages=3 if half else 2,
                  min_split_k=1024, target_programs=264)


def _narrow_block(size: int, cap: int) -> int:
    """Tile width for a small dimension (a LoRA rank): the next power of two, at least 16 (``tl.dot``)."""
    return min(cap, max(16, triton.next_power_of_2(size)))


def _project(p: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None, scale2: float,
             dtype2: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(p w1^T, scale2 p w2^T)`` in one launch; ``w1``/``w2`` are ``(N, K)`` views with any strides.

    The first result has the promoted dtype of ``p`` and ``w1``, the second ``dtype2``.
    """
    (m, k), n1 = p.shape, w1.shape[0]
    n2 = 0 if w2 is None else w2.shape[0]
    o1 = torch.empty((m, n1), dtype=torch.promote_types(p.dtype, w1.dtype), device=p.device)
    o2 = None if w2 is None else torch.empty((m, n2), dtype=dtype2, device=p.device)
    if m == 0:
        return o1, o2
    t = _tiles(p, w1)  # sized for the main product; the narrow w2 tiles keep their own dot dtype
    block_n2 = _narrow_block(n2, t.block_n)
    dot1, dot2 = dot_options(p, w1), dot_options(p, w1 if w2 is None else w2)
    w2, o2_arg = (w1, o1) if w2 is None else (w2, o2)  # no w2 tiles are launched when n2 == 0
    grid = (triton.cdiv(n1, t.block_n) + triton.cdiv(n2, block_n2), triton.cdiv(m, t.block_m))
    _projection_kernel[grid](
        p, w1, w2, o1, o2_arg,
        m, k, n1, n2, scale2,
        p.stride(0), p.stride(1), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
        o1.stride(0), o1.stride(1), o2_arg.stride(0), o2_arg.stride(1),
        DOT1=dot1.dtype, PRECISION1=dot1.precision, DOT2=dot2.dtype, PRECISION2=dot2.precision,
        BLOCK_M=t.block_m, BLOCK_N1=t.block_n, BLOCK_N2=block_n2, BLOCK_K=t.block_k,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return o1, o2


def _expand(p1: torch.Tensor, q1: torch.Tensor, out_dtype: torch.dtype, *, scale1: float = 1.0,
            second: tuple[torch.Tensor, torch.Tensor] | None = None, scale2: float = 1.0,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``scale1 p1 q1 + scale2 p2 q2 + bias`` cast to ``out_dtype``; ``second = (p2, q2)`` is optional.

    A single product whose output has few tiles (the LoRA weight gradients: a long token reduction into a
    small matrix) is split along its reduction so that enough programs run; fp32 partials are then summed.
    """
    (m, k1), n = p1.shape, q1.shape[1]
    t = _tiles(p1, q1)  # sized for the first product; the second is a short (LoRA rank) reduction
    splits = 1
    if second is None and bias is None:
        tiles = triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n)
        splits = max(1, min(triton.cdiv(k1, t.min_split_k), t.target_programs // tiles))
    # Chunks are whole K tiles (at least one, so an empty reduction still writes its zeros).
    split_k1 = max(1, triton.cdiv(triton.cdiv(k1, splits), t.block_k)) * t.block_k
    splits = max(1, triton.cdiv(k1, split_k1))
    block_k2 = _narrow_block(second[0].shape[1], t.block_k) if second is not None else 16  # 16: unused
    out = torch.empty((splits, m, n), dtype=torch.float32 if splits > 1 else out_dtype, device=p1.device)
    if m and n:
        p2, q2 = second if second is not None else (p1, q1)
        dot1, dot2 = dot_options(p1, q1), dot_options(p2, q2)
        grid = (triton.cdiv(n, t.block_n), triton.cdiv(m, t.block_m), splits)
        _expansion_kernel[grid](
            p1, q1, p2, q2, p1 if bias is None else bias, out,
            m, n, k1, 0 if second is None else p2.shape[1], scale1, scale2, split_k1,
            p1.stride(0), p1.stride(1), q1.stride(0), q1.stride(1),
            p2.stride(0), p2.stride(1), q2.stride(0), q2.stride(1),
            0 if bias is None else bias.stride(0), out.stride(0), out.stride(1), out.stride(2),
            HAS_SECOND=second is not None, HAS_BIAS=bias is not None,
            DOT1=dot1.dtype, PRECISION1=dot1.precision, DOT2=dot2.dtype, PRECISION2=dot2.precision,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K1=t.block_k, BLOCK_K2=block_k2,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )
    return out[0] if splits == 1 else out.sum(0).to(out_dtype)


# --- launchers called by emloc_kernels.ops ------------------------------------------------------------


def emulator_linear_forward(
    x: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)`` with ``y = (x v^T) u^T + bias + scaling (x a^T) b^T`` and ``xa = x a^T``, both in ``x``'s dtype.

    ``x (T, n)`` with any strides; ``v (r, n)``, ``u (m, r)``, ``bias (m,)``, ``lora_a (k, n)``, ``lora_b (m, k)``.
    Without LoRA ``xa`` is ``(T, 0)``.
    """
    with on_device("emulator_linear", x, v, u, bias, lora_a, lora_b):
        h, xa = _project(x, v, lora_a, 1.0, x.dtype)
        if xa is None:
            xa = x.new_empty((x.shape[0], 0))
            second = None
        else:
            second = (xa, lora_b.T)
        y = _expand(h, u.T, x.dtype, second=second, scale2=scaling, bias=bias)
    return y, xa


def emulator_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, da, db)``: ``dx = (dy u) v + (s dy b) a``, ``da = (s dy b)^T x``, ``db = s dy^T xa``.

    Each gradient has the dtype of the tensor it belongs to; ``da``/``db`` are None without LoRA.
    ``grad_y (T, m)`` may have any strides (including the zero strides of an expanded gradient).
    """
    with on_device("emulator_linear_backward", grad_y, x, xa, v, u, lora_a, lora_b):
        # [dy u, s dy b]: w1 = u^T (r, m), w2 = b^T (k, m); s dy b keeps b's precision for the LoRA gradient.
        lora_b_t = None if lora_b is None else lora_b.T
        dy_u, dy_b = _project(grad_y, u.T, lora_b_t, scaling,
                              grad_y.dtype if lora_b is None else torch.promote_types(grad_y.dtype, lora_b.dtype))
        if lora_a is None:
            return _expand(dy_u, v, x.dtype), None, None
        dx = _expand(dy_u, v, x.dtype, second=(dy_b, lora_a))
        grad_a = _expand(dy_b.T, x, lora_a.dtype)
        grad_b = _expand(grad_y.T, xa, lora_b.dtype, scale1=scaling)
    return dx, grad_a, grad_b
