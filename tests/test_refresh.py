"""Refreshing the emulator during training (docs/design.md §1.9): a build calibrated with a LoRA adapter
factors the original weights under the LoRA-shifted covariances; training swaps those factors in, records the
emulator it trained on last, and resumes an interrupted refresh to the same weights."""
from __future__ import annotations

import random

import pytest
import torch
import transformers

import emloc
from checkpoints import make_chat_data, make_checkpoint
from emloc import models, training
from emloc.build import BuildError, builder, read_emloc_section
from emloc.build.settings import calibration_batches
from emloc.errors import UserError
from emloc.healing import HealConfig
from emloc.layers import EmulatorLinear
from emloc.lora import LoraAdapter, lora_modules
from emloc.training import TrainConfig
from emloc.training.refresh import refresh_emulator, refresh_steps
from utils import assert_close

pytestmark = pytest.mark.usefixtures("torch_backend")
FAST = dict(device="cpu", max_samples=6, max_length=48, batch_size=3, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("refresh")
    model = make_checkpoint(root / "model", "llama", hidden_size=48, intermediate_size=80)
    data = make_chat_data(root / "chat.jsonl", n=10, seed=3)
    emulator = emloc.build_emulator(model, data, root / "emulator", 0.5, **FAST)
    return {"root": root, "model": model, "data": data, "emulator": emulator}


def _random_adapter(model_dir, seed: int, r: int = 3, zero_b: bool = False) -> LoraAdapter:
    """A LoRA adapter on every block linear with random A and B (B zero when ``zero_b``)."""
    generator = torch.Generator().manual_seed(seed)
    skeleton = models.skeleton(models.load_config(model_dir))
    weights = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            a = torch.randn(r, module.in_features, generator=generator) / module.in_features ** 0.5
            b = torch.zeros(module.out_features, r) if zero_b else torch.randn(module.out_features, r,
                                                                                  generator=generator)
            weights[name] = (a, b)
    return LoraAdapter(weights, r=r, alpha=2.0 * r)


def _products(emulator_dir) -> dict[str, torch.Tensor]:
    model = emloc.load_emulator(emulator_dir)
    return {n: (m.u.double() @ m.v.double()) for n, m in model.named_modules() if isinstance(m, EmulatorLinear)}


def _reference(tiny, adapter: LoraAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """In float64, the whole original model with ``adapter`` on the build's calibration batches: per linear,
    the rank-r optimum ``P_r P_r^T W`` under the covariance ``C`` of its (shifted) inputs, ``C`` and ``W``."""
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float64,
                                                                 attn_implementation="eager")
    adapter.apply_to(original)
    for module in lora_modules(original).values():
        module.lora_a.data, module.lora_b.data = module.lora_a.data.double(), module.lora_b.data.double()
    ranks = {n: info["rank"] for n, info in read_emloc_section(tiny["emulator"])["modules"].items()}
    covariances = {n: torch.zeros(original.get_submodule(n).in_features, original.get_submodule(n).in_features,
                                  dtype=torch.float64) for n in ranks}
    mask = {}

    def accumulate(name):
        def hook(module, args):
            x = args[0][mask["m"]]
            covariances[name].add_(x.T @ x)
        return hook

    hooks = [original.get_submodule(n).register_forward_pre_hook(accumulate(n)) for n in ranks]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["model"])
    with torch.no_grad():
        for batch in calibration_batches(tiny["data"], tokenizer, FAST["max_samples"], FAST["max_length"],
                                         FAST["batch_size"], 0):
            mask["m"] = batch.attention_mask.bool()
            original(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for hook in hooks:
        hook.remove()
    products = {}
    for name, rank in ranks.items():
        weight = original.get_submodule(name).weight.detach()
        _, vectors = torch.linalg.eigh(weight @ covariances[name] @ weight.T)
        top = vectors[:, -rank:]
        products[name] = top @ top.T @ weight, covariances[name], weight
    return products


def _output_error(product: torch.Tensor, expected: torch.Tensor, covariance: torch.Tensor,
                  weight: torch.Tensor) -> float:
    """``||(product - expected) X^T|| / ||W X^T||`` on the activations of ``covariance = X^T X``: the error
    the factorisation is judged by, blind to input directions the activations do not excite."""
    diff = product - expected
    return float((torch.trace(diff @ covariance @ diff.T) / torch.trace(weight @ covariance @ weight.T)).sqrt())


def test_refresh_steps_are_evenly_spaced_inside_the_run():
    assert refresh_steps(40, 3) == [10, 20, 30]
    assert refresh_steps(4, 3) == [1, 2, 3]
    assert refresh_steps(10, 0) == []
    rng = random.Random(0)
    for _ in range(200):
        steps, count = rng.randint(1, 500), rng.randint(0, 12)
        found = refresh_steps(steps, count)
        assert found == sorted(set(found)) and all(0 < s < steps for s in found) and len(found) <= count
        if steps > 2 * (count + 1):  # room for every refresh: each falls within a step of its even spacing
            assert [abs(s - steps * (i + 1) / (count + 1)) <= 0.5 for i, s in enumerate(found)] == [True] * count


def test_a_build_with_an_adapter_factors_the_original_under_the_shifted_activations(tiny):
    adapter = _random_adapter(tiny["model"], seed=1)
    refreshed = emloc.build_emulator(tiny["model"], tiny["data"], tiny["root"] / "shifted", 0.5, adapter=adapter,
                                     **FAST)
    built, reference, plain = _products(refreshed), _reference(tiny, adapter), _products(tiny["emulator"])
    assert set(built) == set(reference) == set(plain)
    unshifted = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}  # they read the embedding, before any LoRA
    for name, (expected, covariance, weight) in reference.items():
        error = _output_error(built[name], expected, covariance, weight)
        assert error < 1e-4, f"{name}: refreshed factors off the float64 optimum by {error:.2e}"
        moved = _output_error(plain[name], expected, covariance, weight)
        assert moved < 1e-5 if name in unshifted else moved > 1e-3, f"{name}: the factors moved by {moved:.2e}"
    assert not lora_modules(emloc.load_emulator(refreshed)), "the refreshed emulator saved LoRA weights"
    assert read_emloc_section(refreshed)["adapter"] == adapter.content_hash() != _random_adapter(
        tiny["model"], seed=4).content_hash()
    assert "adapter" not in read_emloc_section(tiny["emulator"])
    ranks = {n: info["rank"] for n, info in read_emloc_section(refreshed)["modules"].items()}
    assert ranks == {n: info["rank"] for n, info in read_emloc_section(tiny["emulator"])["modules"].items()}


def test_a_zero_adapter_builds_the_plain_emulator(tiny):
    refreshed = emloc.build_emulator(tiny["model"], tiny["data"], tiny["root"] / "zero", 0.5,
                                     adapter=_random_adapter(tiny["model"], seed=2, zero_b=True), **FAST)
    # built here, under this test's backend (the module's emulator may have been built under another)
    plain = emloc.load_emulator(emloc.build_emulator(tiny["model"], tiny["data"], tiny["root"] / "plain", 0.5,
                                                     **FAST)).state_dict()
    for key, value in emloc.load_emulator(refreshed).state_dict().items():
        assert torch.equal(value, plain[key]), key


def test_a_build_refuses_an_adapter_it_cannot_calibrate_with(tiny):
    adapter = _random_adapter(tiny["model"], seed=3)
    with pytest.raises(BuildError, match=r"^adapter: .*does not heal"):
        emloc.build_emulator(tiny["model"], tiny["data"], tiny["root"] / "x", 0.5, adapter=adapter,
                             heal=HealConfig(steps=1), **FAST)
    with pytest.raises(BuildError, match=r"^adapter: .*propagate='original'"):
        emloc.build_emulator(tiny["model"], tiny["data"], tiny["root"] / "x", 0.5, adapter=adapter,
                             propagate="emulator", **FAST)
    outside = LoraAdapter({**adapter.weights, "lm_head": (torch.zeros(3, 48), torch.zeros(256, 3))}, r=3, alpha=6.0)
    with pytest.raises(BuildError, match=r"^adapter: lm_head is not a linear of the model's blocks"):
        emloc.build_emulator(tiny["model"], tiny["data"], tiny["root"] / "x", 0.5, adapter=outside, **FAST)


def _train(tiny, out, **settings):
    model = emloc.load_emulator(tiny["emulator"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["emulator"])
    config = TrainConfig(output_dir=str(out), max_steps=6, micro_batch_size=2, grad_accum=1, lora_r=2, max_length=64,
                         lm_head_chunk=32, eval_fraction=0.0, progress=False, lora_dropout=0.1, refreshes=2,
                         save_steps=100, **settings)
    return model, training.train(model, tiny["data"], config, tokenizer=tokenizer)


def test_training_swaps_in_each_refresh_and_records_the_last(tiny, tmp_path):
    model, result = _train(tiny, tmp_path / "train")
    last = tmp_path / "train" / "refresh-4"  # refreshes after steps 2 and 4 of 6
    assert sorted(p.name for p in (tmp_path / "train").glob("refresh-*")) == ["refresh-4"]
    refreshed, first = emloc.load_emulator(last), emloc.load_emulator(tiny["emulator"])
    for name, module in model.named_modules():
        if isinstance(module, EmulatorLinear):
            assert torch.equal(module.u, refreshed.get_submodule(name).u), name
            assert torch.equal(module.v, refreshed.get_submodule(name).v), name
            assert not torch.equal(module.u, first.get_submodule(name).u), name
    adapter = LoraAdapter.load(result.adapter_dir)
    assert adapter.extra["emulator"] == {"path": str(last), "content_hash": read_emloc_section(last)["content_hash"]}
    assert adapter.trained_on == last


def test_a_run_interrupted_in_a_refresh_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch):
    straight, straight_result = _train(tiny, tmp_path / "straight")
    save, saves = builder._save_block, []

    def interrupted(*args, **kwargs):  # the second refresh dies after its first block
        saves.append(1)
        if len(saves) == 4:
            raise KeyboardInterrupt
        return save(*args, **kwargs)

    monkeypatch.setattr(builder, "_save_block", interrupted)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        _train(tiny, out)
    monkeypatch.setattr(builder, "_save_block", save)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "refresh-2", "refresh-4"]
    resumed, resumed_result = _train(tiny, out)
    assert resumed_result.losses == pytest.approx(straight_result.losses, rel=1e-6)
    for name, module in lora_modules(straight).items():
        assert_close(lora_modules(resumed)[name].lora_b, module.lora_b, rtol=1e-6, what=name)


def test_a_refresh_refuses_a_source_that_changed(tiny, tmp_path):
    data = make_chat_data(tmp_path / "chat.jsonl", n=10, seed=3)
    emulator_dir = emloc.build_emulator(tiny["model"], data, tmp_path / "emulator", 0.5, **FAST)
    model = emloc.load_emulator(emulator_dir)
    emloc.add_lora(model, r=2)
    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match=rf"^refresh: {data} changed since .*emulator was built from it"):
        refresh_emulator(model, tmp_path / "refresh", progress=False)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
    emloc.add_lora(plain, r=2)
    with pytest.raises(UserError, match=r"^refresh: the model is not an emulator"):
        refresh_emulator(plain, tmp_path / "refresh", progress=False)
