"""pytest-benchmark: emloc's build against the baseline build, side by side in one run (CPU, fp32).

The three builds run on the same checkpoint and calibration set; after them, the last test checks that the
comparison is fair (the exact build's ``u v`` products match the baseline's to 1e-4, the randomized one's
reconstruction error is within 2% of the optimum) and that the speed-ups of the medians meet their targets.

    OMP_NUM_THREADS=1 TRITON_INTERPRET=0 pytest -q benchmarks/test_build.py --benchmark-only
"""
from __future__ import annotations

import pytest

from build_workload import (Workload, emulator_factors, error_ratios, product_error, require_compiled_backend,
                            run_baseline, run_ours, set_threads)

WORKLOAD = Workload()
ROUNDS = 3
SPEEDUP_TARGETS = {"exact": 3.0, "randomized": 6.0}

medians: dict[str, float] = {}
results: dict[str, object] = {}


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    require_compiled_backend()
    set_threads(None)
    directory = tmp_path_factory.mktemp("build-bench")
    model, data = WORKLOAD.create(directory)
    return directory, model, data


def _bench(benchmark, name: str, fn, *args):
    benchmark.group = "emulator build: " + WORKLOAD.describe()
    benchmark.name = name
    results[name] = benchmark.pedantic(fn, args=args, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    medians[name] = benchmark.stats.stats.median


def test_baseline_build(benchmark, workload):
    directory, model, data = workload
    _bench(benchmark, "baseline", run_baseline, model, data, directory / "baseline", WORKLOAD)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_emloc_build(benchmark, workload, svd):
    directory, model, data = workload
    _bench(benchmark, svd, run_ours, model, data, directory / svd, WORKLOAD, svd)


def test_fair_and_fast(workload):
    missing = {"baseline", "exact", "randomized"} - set(results)
    if missing:
        pytest.skip(f"needs the timed builds {sorted(missing)} of this run")
    baseline = results["baseline"]
    assert product_error(emulator_factors(results["exact"]), baseline) <= 1e-4
    ratios = error_ratios(emulator_factors(results["randomized"]), baseline)
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 1.02, f"randomized: {worst} reconstruction error {ratios[worst]:.4f}x the optimum"
    speedups = {svd: medians["baseline"] / medians[svd] for svd in SPEEDUP_TARGETS}
    print("\nspeed-up of the median over the baseline's: "
          + ", ".join(f"{svd} {value:.2f}x (target {SPEEDUP_TARGETS[svd]:.0f}x)" for svd, value in speedups.items()))
    assert all(speedups[svd] >= target for svd, target in SPEEDUP_TARGETS.items()), speedups
