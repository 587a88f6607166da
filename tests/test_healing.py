"""Healing the emulator: the chunked KL against float64, the factor merge, and the healed build (equal
parameters, lower KL to the original, resume after an interruption with identical bytes, bad settings)."""
import json

import pytest
import torch

import emloc
from checkpoints import make_chat_data, make_checkpoint
from emloc.build import BuildError, build_emulator, load_emulator
from emloc.build import heal as build_module
from emloc.healing import HealConfig, add_heal_adapter, heal_rank, lm_head_kl_divergence, merge_heal
from utils import assert_close, non_contiguous

pytestmark = pytest.mark.usefixtures("torch_backend")

FAST = dict(device="cpu", max_samples=8, max_length=40, batch_size=4, progress=False)
HEAL = HealConfig(rank=4, steps=12, batch_size=4, learning_rate=3e-3, gradient_checkpointing=False)


def _reference_kl(student, teacher, weight, normalizer, softcap):
    s, t = student.double() @ weight.double().T, teacher.double() @ weight.double().T
    if softcap:
        s, t = torch.tanh(s / softcap) * softcap, torch.tanh(t / softcap) * softcap
    log_s, log_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    return (log_t.exp() * (log_t - log_s)).sum() / normalizer


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_kl_matches_float64_reference_with_gradient(softcap, chunk):
    rows, hidden, vocab = 23, 19, 37
    student = torch.randn(rows, hidden, requires_grad=True)
    teacher = non_contiguous(torch.randn(rows, hidden))
    weight = torch.randn(vocab, hidden) / hidden**0.5
    loss = lm_head_kl_divergence(student, teacher, weight, 11.0, chunk, softcap)
    loss.backward()
    reference_student = student.detach().double().requires_grad_(True)
    expected = _reference_kl(reference_student, teacher, weight, 11.0, softcap)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), torch.float32, what="KL")
    assert_close(student.grad, reference_student.grad, torch.float32, what="KL gradient")


def test_kl_is_zero_for_identical_states_and_positive_otherwise():
    hidden = torch.randn(9, 8)
    weight = torch.randn(13, 8)
    assert abs(float(lm_head_kl_divergence(hidden, hidden, weight, 1.0))) < 1e-6
    assert float(lm_head_kl_divergence(hidden + 0.1 * torch.randn(9, 8), hidden, weight, 1.0)) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_heal_adds_the_adapter_to_the_emulated_weight(dtype):
    m, n, r, k = 13, 11, 5, 3
    u, v = torch.randn(m, r).to(dtype), torch.randn(r, n).to(dtype)
    a, sb = torch.randn(k, n), torch.randn(m, k)
    merged_u, merged_v = merge_heal(u, v, a, sb)
    assert merged_u.shape == (m, r) and merged_v.shape == (r, n) and merged_u.dtype == dtype
    # the last k directions are replaced by the adapter, the first r - k kept
    expected = u[:, :r - k].double() @ v[:r - k].double() + sb.to(dtype).double() @ a.to(dtype).double()
    assert_close(merged_u.double() @ merged_v.double(), expected, torch.float64, what="U' V'")


def test_heal_adapter_starts_at_the_emulator_and_trains_its_tail_directions():
    layer = emloc.EmulatorLinear.from_factors(torch.randn(9, 6), torch.randn(6, 7))
    model = torch.nn.Sequential(layer)
    x = torch.randn(4, 7)
    before = model(x)
    parameters = add_heal_adapter(model, {"0": 2})
    assert layer.rank == 4 and layer.u.shape == (9, 4) and [p.shape for p in parameters] == [(2, 7), (9, 2)]
    assert all(p.requires_grad and p.dtype == torch.float32 for p in parameters) and not layer.u.requires_grad
    assert_close(model(x), before, torch.float32, what="emulator with its tail as adapter")


def test_heal_rank_takes_at_most_half_the_budget():
    config = HealConfig(rank=32)
    assert heal_rank(None, 100) == 0
    assert heal_rank(config, 100) == 32
    assert heal_rank(config, 41) == 20


@pytest.mark.parametrize("field,value", [("rank", 0), ("steps", -1), ("batch_size", 2.5), ("learning_rate", 0.0),
                                         ("learning_rate", float("nan"))])
def test_heal_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"heal {field}"):
        HealConfig(**{field: value})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    model = make_checkpoint(root / "model", "llama", num_layers=2, hidden_size=64)
    return model, make_chat_data(root / "data.jsonl", n=12)


def test_healed_build_keeps_the_parameter_count_and_lowers_the_kl(source, tmp_path):
    model, data = source
    plain = build_emulator(model, data, tmp_path / "plain", 0.5, **FAST)
    healed = build_emulator(model, data, tmp_path / "healed", 0.5, heal=HEAL, **FAST)
    plain_report = json.loads((plain / "emloc-report.json").read_text())
    report = json.loads((healed / "emloc-report.json").read_text())
    assert report["parameters_after"] == plain_report["parameters_after"]
    assert report["heal"]["kl_after"] < 0.9 * report["heal"]["kl_before"]
    ranks = {name: info["rank"] for name, info in report["modules"].items()}
    assert ranks == {name: info["rank"] for name, info in plain_report["modules"].items()}
    emulator = load_emulator(healed)
    layer = emulator.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, emloc.EmulatorLinear) and layer.u.shape[1] == ranks["model.layers.0.self_attn.q_proj"]
    assert torch.isfinite(layer.u).all() and torch.isfinite(layer.v).all()


def test_interrupted_merge_resumes_to_identical_bytes(source, tmp_path, monkeypatch):
    model, data = source
    whole = build_emulator(model, data, tmp_path / "whole", 0.5, heal=HEAL, **FAST)
    saves = []
    original_save = build_module.save_tensors

    def crash_on_second_healed_block(path, tensors):
        if any(key.endswith(".u") for key in tensors) and (path.parent / build_module.HEAL_ADAPTER).is_file():
            saves.append(path)
            if len(saves) == 2:
                raise KeyboardInterrupt("killed while merging")
        original_save(path, tensors)

    monkeypatch.setattr(build_module, "save_tensors", crash_on_second_healed_block)
    with pytest.raises(KeyboardInterrupt):
        build_emulator(model, data, tmp_path / "cut", 0.5, heal=HEAL, **FAST)
    monkeypatch.setattr(build_module, "save_tensors", original_save)
    resumed = build_emulator(model, data, tmp_path / "cut", 0.5, heal=HEAL, **FAST)
    for shard in sorted(whole.glob("model-*.safetensors")):
        assert (resumed / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert json.loads((resumed / "config.json").read_text())["emloc"]["modules"] == \
        json.loads((whole / "config.json").read_text())["emloc"]["modules"]


def test_heal_needs_the_original_propagation(source, tmp_path):
    model, data = source
    with pytest.raises(BuildError, match="propagate"):
        build_emulator(model, data, tmp_path / "e", 0.5, heal=HEAL, propagate="emulator", **FAST)
