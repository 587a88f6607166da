"""The baseline build of ``benchmarks/baseline_build.py`` is right, so that measuring against it is fair.

Its factors are checked against the optimum of docs/design.md §1.3 computed independently in float64 from the
activations of each calibration sample run alone (no padding anywhere), and against emloc's build on the
same checkpoint and calibration file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from checkpoints import make_checkpoint
from emloc.ranks import compressed_rank
from utils import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baseline_build import baseline_build, block_linears  # noqa: E402
from build_workload import Workload, emulator_factors, product_error, run_baseline, run_ours  # noqa: E402

RATIO = 0.4


def padded_batches(samples: list[torch.Tensor], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches with a pad id that is a real token."""
    batches = []
    for start in range(0, len(samples), batch_size):
        group = samples[start:start + batch_size]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), 5, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, sample in enumerate(group):
            ids[row, :len(sample)] = sample
            mask[row, :len(sample)] = 1
        batches.append((ids, mask))
    return batches


def unpadded_inputs(model, samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every block linear's input rows, float64, from each sample run alone through the model."""
    rows: dict[str, list[torch.Tensor]] = {}
    linears = block_linears(model)
    handles = [module.register_forward_hook(
        lambda _m, inputs, _o, name=name: rows.setdefault(name, []).append(inputs[0][0].double()))
        for name, module in linears.items()]
    with torch.no_grad():
        for sample in samples:
            model(input_ids=sample[None])
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in rows.items()}


def optimum(weight: torch.Tensor, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The best rank-r ``W'`` under ``||(W - W') X^T||_F`` and that minimum, by Eckart-Young on ``Y = X W^T``."""
    y = x @ weight.T
    left, sigma, _ = torch.linalg.svd(y.T, full_matrices=False)
    projector = left[:, :rank] @ left[:, :rank].T
    return projector @ weight, float(sigma[rank:].square().sum().sqrt())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("baseline") / "llama", num_layers=2, hidden_size=48,
                           intermediate_size=100, num_heads=4, num_kv_heads=2, seed=3)


def test_rank_rule():
    assert compressed_rank(0.4, 64, 64) == 12  # floor(0.4 * 64 * 64 / 128)
    assert compressed_rank(0.5, 100, 48) == 16
    assert compressed_rank(1.0, 64, 64) is None  # a rank-32 pair of 64 x 64 saves nothing
    assert compressed_rank(0.001, 64, 64) == 1  # the smallest ratios keep one direction


def test_baseline_matches_float64_optimum(tiny_model, seed):
    """u v is the float64 optimum (1e-4 relative, fp32 build) and attains the Eckart-Young minimum;
    padding changes nothing, since the reference activations come from unpadded samples."""
    generator = torch.Generator().manual_seed(seed)
    samples = [torch.randint(3, 200, (int(n),), generator=generator)
               for n in torch.randint(20, 61, (9,), generator=generator)]  # ~360 tokens > 100 features
    factors = baseline_build(tiny_model, padded_batches(samples, 4), RATIO)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    inputs = unpadded_inputs(model, samples)
    linears = block_linears(model)
    assert set(factors) == set(linears) and len(factors) == 14
    for name, linear in linears.items():
        weight, x = linear.weight.detach(), inputs[name]
        rank = compressed_rank(RATIO, *weight.shape)
        best, minimum = optimum(weight, x, rank)
        built = factors[name].u.double() @ factors[name].v.double()
        assert factors[name].u.shape == (weight.shape[0], rank) and factors[name].v.shape == (rank, weight.shape[1])
        assert_close(built, best, rtol=1e-4, what=f"{name} u v (seed {seed})")
        residual = float(torch.linalg.matrix_norm((weight - built) @ x.T))
        assert abs(residual - minimum) <= 1e-4 * minimum, f"{name}: residual {residual} vs minimum {minimum}"
        assert_close(factors[name].covariance, x.T @ x, rtol=1e-5, what=f"{name} covariance")


def test_baseline_writes_emulator_weights(tiny_model, tmp_path, seed):
    """The saved file holds u, v in place of each compressed weight and every other tensor unchanged."""
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(seed)
    samples = [torch.randint(3, 200, (64,), generator=generator) for _ in range(6)]
    factors = baseline_build(tiny_model, padded_batches(samples, 3), RATIO, tmp_path / "emulator")
    saved = load_file(tmp_path / "emulator" / "model.safetensors")
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    for name, low in factors.items():
        assert f"{name}.weight" not in saved
        assert torch.equal(saved[f"{name}.u"], low.u) and torch.equal(saved[f"{name}.v"], low.v)
    kept = {name for name in original if name.rpartition(".")[0] not in factors}
    assert kept and kept <= set(saved)
    for name in kept:
        assert torch.equal(saved[name], original[name]), name


def test_baseline_agrees_with_emloc_build(torch_backend, tmp_path):
    """On the same calibration tokens, the baseline's ``u v`` equal those of emloc's exact build (1e-4
    relative, fp32), through both of emloc's routes: whitened (q, o, gate, up) and output-space (k, v, down)."""
    workload = Workload(num_layers=2, hidden_size=48, intermediate_size=100, num_heads=4, num_kv_heads=2,
                        vocab_size=512, samples=8, max_length=40)  # 320 tokens over a 508-word vocabulary
    model, data = workload.create(tmp_path)
    baseline = run_baseline(model, data, None, workload)
    ours = emulator_factors(run_ours(model, data, tmp_path / "emulator", workload, "exact"))
    assert len(baseline) == 14
    assert product_error(ours, baseline) <= 1e-4
