"""Correction and export on real checkpoint files: build a tiny emulator, put a LoRA on it, correct it from the
shards, export a PEFT adapter and merged shards. PEFT loads the adapter with no missing or unexpected keys,
transformers loads the merged checkpoint, and both give the same logits (fp32, 1e-5)."""
from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from checkpoints import make_chat_data, make_checkpoint, save_sharded
from emloc.build import build_emulator, load_emulator
from emloc.correction import correct_layer, correct_lora
from emloc.export import export, export_adapter, merge_adapter
from emloc.lora import LoraAdapter, add_lora, lora_modules
from utils import assert_close

pytestmark = pytest.mark.usefixtures("torch_backend")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny original model (qwen2: biased projections), its emulator, and a LoRA with non-zero B on it."""
    root = tmp_path_factory.mktemp("export")
    original = make_checkpoint(root / "model", "qwen2")
    data = make_chat_data(root / "chat.jsonl", n=8)
    emulator_dir = build_emulator(original, data, root / "emulator", 0.3, device="cpu", progress=False)
    model = load_emulator(emulator_dir)
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=16, rslora=True)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_b.normal_(0, 0.05)  # as if trained: B starts at zero
    adapter = LoraAdapter.from_model(model, alpha=16, rslora=True)
    return root, original, emulator_dir, model, adapter


def original_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def test_corrected_file_adapter_reproduces_emulator_layers(built):
    root, original, emulator_dir, model, adapter = built
    corrected = correct_lora(original, emulator_dir, adapter, clamp=None, progress=False)
    reference = original_model(original)
    assert set(corrected.weights) == set(adapter.weights) and corrected.scaling == adapter.scaling
    errors = []
    for name, (a_t, b_hat) in corrected.weights.items():
        emulated, dense = model.get_submodule(name), reference.get_submodule(name)
        a, b = adapter.weights[name]
        x = torch.randn(7, a.shape[0], dtype=torch.float64) @ a.double()  # inputs in the LoRA space
        with torch.no_grad():
            emulated_weight = emulated.u.double() @ emulated.v.double()
            want = x @ emulated_weight.T + adapter.scaling * (x @ a.double().T) @ b.double().T
            got = x @ dense.weight.double().T + corrected.scaling * (x @ a_t.double().T) @ b_hat.double().T
        errors.append(assert_close(got, want, rtol=1e-5, what=f"{name} on the LoRA space"))
        # The file path computes what the in-memory correction computes.
        _, b_mem = correct_layer(a, b, adapter.scaling, dense.weight, (emulated.u, emulated.v), clamp=None)
        assert_close(b_hat, b_mem, rtol=1e-6, what=f"{name} B^ from the shards")
    print(f"largest relative error over {len(errors)} layers: {max(errors):.2e}")


def test_peft_adapter_and_merged_weights_give_the_same_logits(built, tmp_path):
    root, original, emulator_dir, _, adapter = built
    corrected = correct_lora(original, emulator_dir, adapter, progress=False)
    out = export(corrected, original, tmp_path / "export", merge=True, progress=False)

    state = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    peft_model = peft.PeftModel.from_pretrained(original_model(original), out / "adapter")
    result = peft.set_peft_model_state_dict(peft_model, state)
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    for name, (a, b) in corrected.weights.items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert torch.equal(layer.lora_A["default"].weight, a) and torch.equal(layer.lora_B["default"].weight, b)
        assert layer.scaling["default"] == pytest.approx(corrected.scaling, rel=1e-12)

    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32,
                                                               attn_implementation="eager")
    ids = torch.randint(3, 200, (3, 13))
    with torch.no_grad():
        via_peft, via_merge = peft_model(ids).logits, merged(ids).logits
        plain = original_model(original)(ids).logits
    err = assert_close(via_merge, via_peft.double(), rtol=1e-5, what="merged vs PEFT logits")
    assert (via_peft - plain).norm() > 1e-3 * plain.norm(), "the adapter should change the logits"
    print(f"merged vs PEFT logits: relative error {err:.2e}")
    index = json.loads((out / "merged" / "model.safetensors.index.json").read_text())
    assert index == json.loads((original / "model.safetensors.index.json").read_text())


def test_merge_changes_only_adapted_weights(built, tmp_path):
    root, original, _, _, adapter = built
    merge_adapter(adapter, original, tmp_path / "merged", progress=False)
    for shard in sorted(original.glob("*.safetensors")):
        before, after = load_file(str(shard)), load_file(str(tmp_path / "merged" / shard.name))
        assert before.keys() == after.keys()
        for key, weight in before.items():
            name = key.removesuffix(".weight")
            if name in adapter.weights:
                a, b = adapter.weights[name]
                assert_close(after[key], weight.double() + adapter.scaling * b.double() @ a.double(), rtol=1e-6,
                             what=key)
            else:
                assert torch.equal(after[key], weight), f"{key} is not adapted and must be copied unchanged"


def test_bad_adapter_and_foreign_emulator_are_named(built, tmp_path):
    root, original, emulator_dir, _, adapter = built
    name = next(iter(adapter.weights))
    a, b = adapter.weights[name]
    unknown = LoraAdapter({"model.layers.0.mlp.nonexistent_proj": (a, b)}, r=adapter.r, alpha=adapter.alpha)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.nonexistent_proj' is not a layer"):
        export_adapter(unknown, original, tmp_path / "unknown")
    assert not (tmp_path / "unknown").exists()
    misfit = LoraAdapter({name: (a[:, :-1], b)}, r=adapter.r, alpha=adapter.alpha)
    with pytest.raises(ValueError, match=rf"{name}.*do not fit the weight of shape"):
        correct_lora(original, emulator_dir, misfit, progress=False)
    with pytest.raises(ValueError, match=rf"{name}.*do not fit"):
        merge_adapter(misfit, original, tmp_path / "misfit", progress=False)
    other = make_checkpoint(tmp_path / "other", "qwen2", seed=1, vocab_size=300)
    with pytest.raises(ValueError, match="built from a different model"):
        correct_lora(other, emulator_dir, adapter, progress=False)


def test_checkpoint_keys_with_another_prefix(built, tmp_path):
    """A checkpoint saved from an outer model (``language_model.model.layers...``) is read and merged by module."""
    root, original, emulator_dir, _, adapter = built
    state = {}
    for shard in sorted(original.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    save_sharded({f"language_model.{key}": t for key, t in state.items()}, renamed, shards=2)
    expected = correct_lora(original, emulator_dir, adapter, progress=False)
    corrected = correct_lora(renamed, emulator_dir, adapter, check_source=False, progress=False)
    for name, (a, b) in expected.weights.items():
        assert torch.equal(corrected.weights[name][0], a) and torch.equal(corrected.weights[name][1], b)
    merge_adapter(corrected, renamed, tmp_path / "merged", progress=False)
    merge_adapter(expected, original, tmp_path / "reference", progress=False)
    merged, reference = {}, {}
    for shard in (tmp_path / "merged").glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    for shard in (tmp_path / "reference").glob("*.safetensors"):
        reference.update(load_file(str(shard)))
    assert merged.keys() == {f"language_model.{key}" for key in reference}
    assert all(torch.equal(merged[f"language_model.{key}"], t) for key, t in reference.items())
