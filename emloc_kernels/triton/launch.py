"""What every Triton launcher shares: the device check before a launch and the operands of ``tl.dot``.

One definition keeps the kernels to one precision policy (docs/kernels.md): products accumulate in fp32,
fp32 dots are IEEE rather than TF32 because the products feed eigensolvers, and 16-bit operands stay on the
tensor cores, except bf16 in the interpreter, whose ``tl.dot`` returns garbage for it (docs/design.md §4.7).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton.language as tl

from ..backend import TRITON_DTYPES, device_problem, triton_interpreted

# The kernels' dtypes as Triton names them (tl.float16, tl.bfloat16, tl.float32).
_TL_DTYPES = {dtype: getattr(tl, str(dtype).removeprefix("torch.")) for dtype in TRITON_DTYPES}


class Dot(NamedTuple):
    """The constexprs of one ``tl.dot``: the dtype both operand tiles are cast to, and its ``input_precision``
    (None: Triton's default, which only matters for fp32 operands)."""

    dtype: tl.dtype
    precision: str | None


def upcast_dot(*tensors: torch.Tensor | None) -> bool:
    """Whether a dot of ``tensors`` must multiply in fp32 although they are 16-bit: bf16 operands under the
    interpreter. On the GPU the bf16 tensor-core dot is kept."""
    return triton_interpreted() and any(t is not None and t.dtype == torch.bfloat16 for t in tensors)


def dot_options(*operands: torch.Tensor) -> Dot:
    """The dot of ``operands`` in their promoted dtype (fp32 when fp16 meets bf16 or fp32, and where
    :func:`upcast_dot` says so), IEEE-exact when that dtype is fp32."""
    dtype = torch.float32 if upcast_dot(*operands) else functools.reduce(
        torch.promote_types, (t.dtype for t in operands))
    return Dot(_TL_DTYPES[dtype], "ieee" if dtype == torch.float32 else None)


@contextlib.contextmanager
def on_device(op: str, *tensors: torch.Tensor | None) -> Iterator[None]:
    """The scope of ``op``'s launches on ``tensors`` (None entries are ignored).

    Refuses with a ``RuntimeError`` naming ``op`` where no kernel can run on them (CPU tensors outside the
    interpreter), rather than leaving Triton to fail on a pointer or fall back elsewhere; on CUDA it makes
    their device the current one, the device Triton launches on.
    """
    present = tuple(t for t in tensors if t is not None)
    problem = device_problem(present)
    if problem is not None:
        raise RuntimeError(f"{op}: cannot launch its Triton kernel: {problem}")
    with torch.cuda.device(present[0].device) if present[0].is_cuda else contextlib.nullcontext():
        yield
