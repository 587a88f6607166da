"""EmulatorLinear: the dense layer it emulates, its LoRA (alpha / r and rsLoRA scaling), dropout and freezing."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from emloc import EmulatorLinear
from tests.utils import assert_close

N, M, RANK = 27, 35, 9


def emulator(dtype=torch.float32, bias=True) -> EmulatorLinear:
    u = (torch.randn(M, RANK) / RANK**0.5).to(dtype)
    v = (torch.randn(RANK, N) / N**0.5).to(dtype)
    return EmulatorLinear.from_factors(u, v, torch.randn(M).to(dtype) if bias else None)


def dense(layer: EmulatorLinear) -> nn.Linear:
    """The float64 nn.Linear with weight ``u v`` (and the layer's bias)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(layer.u.double() @ layer.v.double())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.double())
    return linear


def random_lora(layer: EmulatorLinear, r: int, **kwargs) -> None:
    """Attach LoRA and give ``lora_b`` nonzero values (its PEFT init is zero, which would hide the branch)."""
    layer.add_lora(r, **kwargs)
    with torch.no_grad():
        layer.lora_b.copy_(torch.randn_like(layer.lora_b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_equals_dense_linear(seed, dtype, bias):
    layer = emulator(dtype, bias)
    x = torch.randn(2, 5, N).to(dtype)
    y = layer(x)
    assert (y.shape, y.dtype) == ((2, 5, M), dtype)
    assert_close(y, dense(layer)(x.double()), dtype)


def test_from_factors_shares_storage(seed):
    u, v = torch.randn(M, RANK), torch.randn(RANK, N)
    layer = EmulatorLinear.from_factors(u, v)
    assert layer.u.data_ptr() == u.data_ptr() and layer.v.data_ptr() == v.data_ptr()
    assert (layer.in_features, layer.out_features, layer.rank, layer.bias) == (N, M, RANK, None)


@pytest.mark.parametrize("rslora,expected_scaling", [(False, 16 / 4), (True, 16 / math.sqrt(4))],
                         ids=["alpha/r", "rslora"])
def test_lora_equals_merged_weight(seed, rslora, expected_scaling):
    """With LoRA the layer computes ``(u v + s B A) x + bias``, s = alpha / r or alpha / sqrt(r)."""
    layer = emulator()
    random_lora(layer, 4, alpha=16, rslora=rslora)
    assert layer.lora_scaling == expected_scaling
    merged = dense(layer)
    with torch.no_grad():
        merged.weight += expected_scaling * layer.lora_b.double() @ layer.lora_a.double()
    x = torch.randn(11, N)
    assert_close(layer(x), merged(x.double()), torch.float32)


def test_fresh_lora_is_a_no_op(seed):
    layer = emulator()
    x = torch.randn(6, N)
    before = layer(x)
    layer.add_lora(8)
    assert layer.lora_a.abs().sum() > 0 and layer.lora_b.abs().sum() == 0
    assert torch.equal(layer(x), before)


def test_only_lora_trains(seed):
    layer = emulator()
    random_lora(layer, 4)
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["lora_a", "lora_b"]
    layer(torch.randn(7, N)).square().sum().backward()
    assert layer.u.grad is None and layer.v.grad is None and layer.bias.grad is None
    assert layer.lora_a.grad.abs().sum() > 0 and layer.lora_b.grad.abs().sum() > 0


@pytest.mark.parametrize("base,lora", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)], ids=str)
def test_dropout_path(seed, base, lora):
    """In training the LoRA input is dropped out: y = base(x) + s B A dropout(x); in eval it is the fused path."""
    layer = emulator(base)
    random_lora(layer, 4, alpha=8, dropout=0.5, dtype=lora)
    x = torch.randn(13, N).to(base)

    layer.train()
    rng = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(rng)  # replay the same dropout mask
    dropped = nn.functional.dropout(x.to(lora), 0.5, training=True).double()
    assert (dropped == 0).any()
    base_ref = dense(EmulatorLinear.from_factors(layer.u, layer.v, layer.bias))(x.double())
    expected = base_ref + layer.lora_scaling * dropped @ layer.lora_a.double().T @ layer.lora_b.double().T
    assert y.dtype == base
    assert_close(y, expected, base)

    optimizer = torch.optim.SGD([layer.lora_a, layer.lora_b], lr=0.1)
    frozen = [t.clone() for t in (layer.u, layer.v, layer.bias)]
    before = layer.lora_a.detach().clone(), layer.lora_b.detach().clone()
    layer(x).float().square().mean().backward()
    optimizer.step()
    assert not torch.equal(layer.lora_a, before[0]) and not torch.equal(layer.lora_b, before[1])
    assert all(torch.equal(t, f) for t, f in zip((layer.u, layer.v, layer.bias), frozen, strict=True))

    layer.eval()
    merged = dense(layer)
    with torch.no_grad():
        merged.weight += layer.lora_scaling * layer.lora_b.double() @ layer.lora_a.double()
    assert_close(layer(x), merged(x.double()), base)
