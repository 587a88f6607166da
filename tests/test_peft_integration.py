"""PEFT on an emulator: LoraConfig with EmulatorLinear registered as a custom LoRA module gives the same outputs
and LoRA gradients as emloc.add_lora, through the fused emulator_linear kernel."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

from checkpoints import make_checkpoint
from emloc import EmulatorLinear, peft_integration
from emloc.lora import LoraAdapter, add_lora, lora_modules
from emloc.peft_integration import EmulatorLoraLayer, register_emulator_lora
from emulators import emulate_in_memory, load_tiny
from utils import assert_close

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return emulate_in_memory(load_tiny(make_checkpoint(tmp_path_factory.mktemp("peft") / "model", "qwen2")))


@pytest.mark.parametrize("alpha, rslora", [(8, False), (24, True)])
def test_peft_lora_on_emulator_matches_add_lora(emulator, seed, monkeypatch, alpha, rslora):
    monkeypatch.setenv("EMLOC_BACKEND", "torch")  # model-sized: the op, not its Triton form, is under test
    ours = copy.deepcopy(emulator)
    add_lora(ours, TARGETS, r=4, alpha=alpha, rslora=rslora)
    config = register_emulator_lora(peft.LoraConfig(r=4, lora_alpha=alpha, use_rslora=rslora,
                                                    target_modules=TARGETS))
    theirs = peft.get_peft_model(copy.deepcopy(emulator), config)
    for name, module in lora_modules(ours).items():
        layer = theirs.base_model.model.get_submodule(name)
        assert isinstance(layer, EmulatorLoraLayer) and isinstance(layer.get_base_layer(), EmulatorLinear)
        assert layer.scaling["default"] == module.lora_scaling
        with torch.no_grad():
            module.lora_b.normal_()  # non-zero B so the LoRA branch matters
            layer.lora_A["default"].weight.copy_(module.lora_a)
            layer.lora_B["default"].weight.copy_(module.lora_b)

    fused_calls = []
    kernel = peft_integration.emulator_linear
    monkeypatch.setattr(peft_integration, "emulator_linear",
                        lambda *args: fused_calls.append(args[4] is not None) or kernel(*args))
    ids = torch.randint(3, 200, (2, 15))
    out_ours, out_theirs = ours(ids).logits, theirs(ids).logits
    assert fused_calls and all(fused_calls) and len(fused_calls) == 2 * len(TARGETS)
    assert_close(out_theirs, out_ours.double(), rtol=1e-5, what="PEFT logits")
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for name, module in lora_modules(ours).items():
        layer = theirs.base_model.model.get_submodule(name)
        assert_close(layer.lora_A["default"].weight.grad, module.lora_a.grad.double(), rtol=1e-5, what=f"{name} dA")
        assert_close(layer.lora_B["default"].weight.grad, module.lora_b.grad.double(), rtol=1e-5, what=f"{name} dB")
    trainable = [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_single_layer_through_the_triton_path(seed, tmp_path):
    """One odd-sized layer with the default backend (Triton, interpreted without a GPU)."""
    u, v, bias = torch.randn(23, 5), torch.randn(5, 19), torch.randn(23)
    model = torch.nn.Sequential(EmulatorLinear.from_factors(u, v, bias))
    ours = copy.deepcopy(model)
    add_lora(ours, ["0"], r=3, alpha=5)
    theirs = peft.get_peft_model(copy.deepcopy(model), register_emulator_lora(
        peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0"])))
    layer = theirs.base_model.model[0]
    with torch.no_grad():
        ours[0].lora_b.normal_()
        layer.lora_A["default"].weight.copy_(ours[0].lora_a)
        layer.lora_B["default"].weight.copy_(ours[0].lora_b)
    x = torch.randn(3, 7, 19)
    assert_close(theirs(x), ours(x).double(), rtol=1e-5, what="layer output")
    with pytest.raises(TypeError, match="no dense weight to merge"):
        theirs.merge_adapter()
    # An adapter saved by PEFT is one emloc reads (for correction and export).
    theirs.save_pretrained(tmp_path)
    adapter = LoraAdapter.load(tmp_path)
    assert adapter.scaling == ours[0].lora_scaling
    assert torch.equal(adapter.weights["0"][0], ours[0].lora_a) and torch.equal(adapter.weights["0"][1], ours[0].lora_b)
