"""pytest-benchmark: emloc's build against the baseline build, side by side in one run (CPU, fp32).

The builds run on the same checkpoint and calibration set, the baseline first. Each emloc variant then
checks that the comparison is fair (exact: the ``u v`` products match the baseline's to 1e-4; randomized:
every linear's reconstruction error within 2% of the exact optimum) and that its median beats the
baseline's by the target factor.

    OMP_NUM_THREADS=1 pytest -q benchmarks/test_build.py --benchmark-only --benchmark-timer time.process_time

On a shared CPU, time CPU seconds (``--benchmark-timer time.process_time``, meaningful with one thread):
wall-clock medians then measure the neighbours' load as much as the builds.
"""
from __future__ import annotations

import pytest

from build_workload import (
    FLAGSHIP_PROPORTIONS,
    SPEEDUP_TARGETS,
    emulator_factors,
    error_ratios,
    product_error,
    require_compiled_backend,
    run_baseline,
    run_ours,
    set_threads,
)

WORKLOAD = FLAGSHIP_PROPORTIONS
ROUNDS = 3
ERROR_RATIO_BOUND = 1.02  # randomized reconstruction error over the exact optimum's

baseline_run: dict[str, object] = {}


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    require_compiled_backend()
    set_threads(None)
    directory = tmp_path_factory.mktemp("build-bench")
    model, data = WORKLOAD.create(directory)
    return directory, model, data


def _timed(benchmark, name: str, fn, *args):
    """Median seconds of ``rounds`` calls of ``fn(*args)`` and the last call's result."""
    benchmark.group = "emulator build: " + WORKLOAD.describe()
    benchmark.name = name
    result = benchmark.pedantic(fn, args=args, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.median, result


def test_baseline_build(benchmark, workload):
    directory, model, data = workload
    baseline_run["median"], baseline_run["factors"] = _timed(
        benchmark, "baseline", run_baseline, model, data, directory / "baseline", WORKLOAD)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_emloc_build(benchmark, workload, svd):
    directory, model, data = workload
    median, emulator = _timed(benchmark, f"emloc svd={svd}", run_ours, model, data, directory / svd, WORKLOAD, svd)
    if "factors" not in baseline_run:
        pytest.skip("the baseline build did not run in this session")
    ours, baseline = emulator_factors(emulator), baseline_run["factors"]
    if svd == "exact":
        assert product_error(ours, baseline) <= 1e-4
    else:
        ratios = error_ratios(ours, baseline)
        worst = max(ratios, key=ratios.get)
        assert ratios[worst] <= ERROR_RATIO_BOUND, f"{worst}: reconstruction error {ratios[worst]:.4f}x the optimum"
    speedup = baseline_run["median"] / median
    benchmark.extra_info["speedup_over_baseline"] = round(speedup, 3)
    assert speedup >= SPEEDUP_TARGETS[svd], (
        f"svd={svd}: {speedup:.2f}x the baseline's speed, target {SPEEDUP_TARGETS[svd]}x")
