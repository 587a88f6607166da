"""The linear layers LoRA trains on: :class:`EmulatorLinear`, a compressed linear ``y = u (v x) + bias`` with
room for a fused LoRA, and :class:`LoraWeights`, the LoRA weights it shares with :class:`emloc.lora.LoraLinear`.
"""
from __future__ import annotations

import abc
import math

import torch
from torch import Tensor, nn

from emloc_kernels import emulator_linear


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    """The LoRA scaling ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoraWeights(abc.ABC):
    """The LoRA half of a linear layer (a mixin for an ``nn.Module`` with ``in_features`` and ``out_features``).

    Attributes:
        lora_a, lora_b: ``(r, in_features)`` / ``(out_features, r)`` trainable LoRA weights, or None. Their
            names are the state-dict keys every stage reads (checkpoints, correction, export).
        lora_scaling: the LoRA scaling ``s`` (:func:`lora_scaling`).
        lora_dropout: the dropout probability on the LoRA input.

    A layer defines :meth:`_lora_like`, the frozen weight whose device (and by default dtype) LoRA takes.
    """

    in_features: int
    out_features: int
    training: bool
    lora_a: nn.Parameter | None
    lora_b: nn.Parameter | None
    lora_scaling: float
    lora_dropout: float

    @abc.abstractmethod
    def _lora_like(self) -> Tensor:
        """The frozen weight whose device (and by default dtype) the LoRA weights take."""

    def remove_lora(self) -> None:
        """Drop the LoRA weights (or start without any): the layer computes its frozen weight alone."""
        self.lora_a = self.lora_b = None
        self.lora_scaling, self.lora_dropout = 1.0, 0.0

    def add_lora(self, r: int, alpha: float | None = None, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        """Attach trainable LoRA weights of rank ``r``: ``lora_a`` Kaiming-uniform, ``lora_b`` zero (PEFT's init)."""
        like = self._lora_like()
        dtype = dtype or like.dtype
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, device=like.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, device=like.device, dtype=dtype))
        self.lora_scaling = lora_scaling(r, float(r if alpha is None else alpha), rslora)
        self.lora_dropout = dropout

    def lora_delta(self, x: Tensor) -> Tensor:
        """The LoRA update ``s (dropout(x) lora_a^T) lora_b^T``, in the LoRA weights' dtype (an fp32 LoRA on a
        bf16 base stays fp32, as in PEFT)."""
        x = nn.functional.dropout(x.to(self.lora_a.dtype), self.lora_dropout, training=self.training)
        return self.lora_scaling * (x @ self.lora_a.T) @ self.lora_b.T

    def _lora_repr(self) -> str:
        return "" if self.lora_a is None else f", lora_rank={self.lora_a.shape[0]}, lora_scaling={self.lora_scaling:g}"


class EmulatorLinear(LoraWeights, nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding the frozen low-rank factors of the emulated weight.

    ``forward(x) = (x v^T) u^T + bias [+ lora_scaling * (dropout(x) lora_a^T) lora_b^T]``, computed by the
    fused :func:`emloc_kernels.emulator_linear` (one pass over ``x`` for ``[v; lora_a]``). With LoRA dropout
    active in training the LoRA input differs from the base input, so that branch runs unfused.

    Attributes:
        v: ``(rank, in_features)`` frozen factor.
        u: ``(out_features, rank)`` frozen factor.
        bias: ``(out_features,)`` frozen bias or None.
        lora_a, lora_b, lora_scaling, lora_dropout: the LoRA weights (:class:`LoraWeights`).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factory = {"device": device, "dtype": dtype}
        self.v = nn.Parameter(torch.empty(rank, in_features, **factory), requires_grad=False)
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.remove_lora()

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

    def _lora_like(self) -> Tensor:
        return self.u

    def forward(self, x: Tensor) -> Tensor:
        if self.lora_a is None or not (self.training and self.lora_dropout > 0):
            return emulator_linear(x, self.v, self.u, self.bias, self.lora_a, self.lora_b, self.lora_scaling)
        base = emulator_linear(x, self.v, self.u, self.bias)
        return base + self.lora_delta(x).to(base.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}{self._lora_repr()}")
