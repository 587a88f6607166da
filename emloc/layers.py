"""EmulatorLinear: a compressed linear layer ``y = u (v x) + bias``, with room for a fused LoRA."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from emloc_kernels import emulator_linear


class EmulatorLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding the frozen low-rank factors of the emulated weight.

    ``forward(x) = (x v^T) u^T + bias [+ lora_scaling * (dropout(x) lora_a^T) lora_b^T]``, computed by the
    fused :func:`emloc_kernels.emulator_linear` (one pass over ``x`` for ``[v; lora_a]``). With LoRA dropout
    active in training the LoRA input differs from the base input, so that branch runs unfused.

    Attributes:
        v: ``(rank, in_features)`` frozen factor.
        u: ``(out_features, rank)`` frozen factor.
        bias: ``(out_features,)`` frozen bias or None.
        lora_a, lora_b: ``(k, in_features)`` / ``(out_features, k)`` trainable LoRA weights, or None.
        lora_scaling: the LoRA scaling ``alpha / k`` (``alpha / sqrt(k)`` for rsLoRA).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factory = {"device": device, "dtype": dtype}
        self.v = nn.Parameter(torch.empty(rank, in_features, **factory), requires_grad=False)
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_a: nn.Parameter | None = None
        self.lora_b: nn.Parameter | None = None
        self.lora_scaling = 1.0
        self.lora_dropout = 0.0

    @classmethod
    def from_factors(cls, u: Tensor, v: Tensor, bias: Tensor | None = None) -> EmulatorLinear:
        """Wrap existing factors ``u (m, r)``, ``v (r, n)`` (and bias) without copying them."""
        layer = cls(v.shape[1], u.shape[0], v.shape[0], bias=bias is not None, device="meta", dtype=u.dtype)
        layer.u = nn.Parameter(u.detach(), requires_grad=False)
        layer.v = nn.Parameter(v.detach(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.u.dtype

    def add_lora(self, r: int, alpha: float | None = None, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        """Attach trainable LoRA weights of rank ``r``: ``lora_a`` Kaiming-uniform, ``lora_b`` zero (PEFT's init)."""
        alpha = float(r if alpha is None else alpha)
        dtype = dtype or self.u.dtype
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, device=self.u.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, device=self.u.device, dtype=dtype))
        self.lora_scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        if self.lora_a is None or not (self.training and self.lora_dropout > 0):
            return emulator_linear(x, self.v, self.u, self.bias, self.lora_a, self.lora_b, self.lora_scaling)
        base = emulator_linear(x, self.v, self.u, self.bias)
        # The LoRA branch runs in the LoRA weights' dtype (an fp32 LoRA on a bf16 base stays fp32, as in PEFT).
        dropped = nn.functional.dropout(x.to(self.lora_a.dtype), self.lora_dropout, training=True)
        lora = nn.functional.linear(nn.functional.linear(dropped, self.lora_a), self.lora_b)
        return base + (self.lora_scaling * lora).to(base.dtype)

    def extra_repr(self) -> str:
        lora = "" if self.lora_a is None else f", lora_rank={self.lora_a.shape[0]}, lora_scaling={self.lora_scaling:g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}{lora}")
