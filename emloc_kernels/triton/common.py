"""Small pieces every Triton launcher needs."""
from __future__ import annotations

import torch

from ..backend import triton_interpreted


def upcast_dot(*tensors: torch.Tensor | None) -> bool:
    """Whether kernels must upcast their ``tl.dot`` operands to fp32 (a constexpr switch for the launcher).

    Triton's CPU interpreter returns garbage for ``tl.dot`` on bf16 operands (docs/design.md §4.7); on the GPU the
    bf16 tensor-core dot is kept.
    """
    return triton_interpreted() and any(t is not None and t.dtype == torch.bfloat16 for t in tensors)
