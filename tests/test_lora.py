"""LoRA injection: targets by regex or names, fused LoRA on emulator layers and ordinary LoRA on dense ones,
only LoRA trains, the scaling for every alpha / rsLoRA, adapters round-tripping through PEFT's file format."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from emloc import EmulatorLinear
from emloc.lora import LoraAdapter, LoraLinear, add_lora, lora_modules, lora_parameters
from utils import assert_close, non_contiguous


class Block(nn.Module):
    """Two emulator layers and a dense one, named like a decoder block."""

    def __init__(self):
        super().__init__()
        self.q_proj = EmulatorLinear.from_factors(torch.randn(21, 4), torch.randn(4, 17), torch.randn(21))
        self.up_proj = EmulatorLinear.from_factors(torch.randn(29, 5), torch.randn(5, 21))
        self.down_proj = nn.Linear(29, 17)
        self.lm_head = nn.Linear(17, 11, bias=False)

    def forward(self, x):
        return self.lm_head(self.down_proj(torch.relu(self.up_proj(self.q_proj(x)))))

    def get_output_embeddings(self):
        return self.lm_head


def dense_reference(module, x):
    """``W x + b + s B A x`` in float64 from the module's own tensors."""
    if isinstance(module, EmulatorLinear):
        weight, bias = module.u.double() @ module.v.double(), module.bias
    else:
        weight, bias = module.weight.double(), module.bias
    out = x.double() @ weight.T + (0 if bias is None else bias.double())
    return out + module.lora_scaling * (x.double() @ module.lora_a.double().T) @ module.lora_b.double().T


@pytest.mark.parametrize("target, expected", [
    (None, {"q_proj", "up_proj", "down_proj"}),
    (r".*_proj", {"q_proj", "up_proj", "down_proj"}),
    (r"(q|down)_proj", {"q_proj", "down_proj"}),
    (["up_proj"], {"up_proj"}),
])
def test_targets_and_frozen_base(seed, target, expected):
    model = Block()
    names = add_lora(model, target, r=3)
    assert set(names) == expected == set(lora_modules(model))
    assert isinstance(model.down_proj, LoraLinear) == ("down_proj" in expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in expected for ab in "ab"}
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))


def test_target_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"target 'o_proj' matches no linear layer .*q_proj"):
        add_lora(Block(), "o_proj")
    with pytest.raises(ValueError, match=r"target \['lm_head'\] matches no linear layer"):
        add_lora(Block(), ["lm_head"])  # the LM head is never a LoRA target


@pytest.mark.parametrize("r, alpha, rslora", [(3, None, False), (4, 16.0, False), (5, 7.0, True)])
def test_lora_layers_compute_scaled_update(seed, r, alpha, rslora):
    model = Block()
    add_lora(model, r=r, alpha=alpha, rslora=rslora)
    expected_scaling = (alpha or r) / (math.sqrt(r) if rslora else r)
    x = non_contiguous(torch.randn(6, 17))
    for name, module in lora_modules(model).items():
        assert module.lora_scaling == pytest.approx(expected_scaling, rel=1e-15)
        with torch.no_grad():
            module.lora_b.normal_()
        inp = x if name == "q_proj" else non_contiguous(torch.randn(6, module.in_features))
        assert_close(module(inp), dense_reference(module, inp), rtol=1e-5, what=f"{name} with LoRA")
    # Dense LoRA keeps state-dict names: the original weights load into the adapted model unchanged.
    assert {"down_proj.weight", "down_proj.bias", "down_proj.lora_a", "down_proj.lora_b"} <= set(model.state_dict())


def test_adapter_round_trip_and_apply(seed, tmp_path):
    model = Block()
    add_lora(model, r=4, alpha=12, rslora=True)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_b.normal_()
    adapter = LoraAdapter.from_model(model, alpha=12, rslora=True)
    loaded = LoraAdapter.load(adapter.save(tmp_path / "adapter"))
    assert (loaded.r, loaded.alpha, loaded.rslora, loaded.scaling) == (4, 12.0, True, adapter.scaling)
    fresh = Block()
    fresh.load_state_dict(model.state_dict(), strict=False)
    loaded.apply_to(fresh)
    x = torch.randn(5, 17)
    assert_close(fresh(x), model(x).double(), rtol=1e-6, what="model with the reloaded adapter")
    with pytest.raises(ValueError, match="alpha=8, rslora=False give scaling"):
        LoraAdapter.from_model(model, alpha=8)
