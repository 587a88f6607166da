"""Speed of emloc's build against the baseline build, side by side on one model and one calibration set.

Rounds interleave the three builds (baseline, ours exact, ours randomized) so that load on a shared CPU
hits them alike; the table gives medians, the speed-up of each median over the baseline's, and the check
that makes the comparison fair: the largest relative difference of the ``u v`` products from the
baseline's (exact), and the reconstruction error over the exact optimum's (randomized).

    OMP_NUM_THREADS=1 python benchmarks/build_speed.py --layers 4 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from build_workload import (Workload, emulator_factors, error_ratios, product_error, require_compiled_backend,
                            run_baseline, run_ours, set_threads)

TARGETS = {"exact": 3.0, "randomized": 6.0}


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def measure(workload: Workload, rounds: int, directory: Path) -> dict:
    """Median seconds of each build over ``rounds`` interleaved rounds, and the factors' agreement."""
    model, data = workload.create(directory)
    times = {"baseline": [], "exact": [], "randomized": []}
    for _ in range(rounds):
        seconds, baseline = timed(run_baseline, model, data, directory / "baseline", workload)
        times["baseline"].append(seconds)
        for svd in ("exact", "randomized"):
            seconds, _ = timed(run_ours, model, data, directory / svd, workload, svd)
            times[svd].append(seconds)
    exact = emulator_factors(directory / "exact")
    ratios = error_ratios(emulator_factors(directory / "randomized"), baseline)
    return {
        "median": {name: statistics.median(values) for name, values in times.items()},
        "times": times,
        "product_error": product_error(exact, baseline),
        "exact_error_ratio": max(error_ratios(exact, baseline).values()),
        "randomized_error_ratio": max(ratios.values()),
        "randomized_mean_error_ratio": statistics.fmean(ratios.values()),
    }


def report(workload: Workload, result: dict) -> str:
    median = result["median"]
    lines = [workload.describe(), "",
             f"{'build':<22}{'median s':>10}{'min s':>9}{'max s':>9}{'speed-up':>10}{'target':>8}"]
    for name in ("baseline", "exact", "randomized"):
        label = "baseline (reference)" if name == "baseline" else f"emloc svd={name}"
        speedup = median["baseline"] / median[name]
        target = f"{TARGETS[name]:.0f}x" if name in TARGETS else ""
        times = result["times"][name]
        lines.append(f"{label:<22}{median[name]:>10.2f}{min(times):>9.2f}{max(times):>9.2f}"
                     f"{speedup:>9.2f}x{target:>8}")
    lines += ["",
              f"exact: largest relative difference of u v from the baseline's  {result['product_error']:.2e}"
              f"  (target <= 1e-4)",
              f"exact: worst reconstruction error / optimum                   {result['exact_error_ratio']:.5f}",
              f"randomized: worst reconstruction error / optimum              {result['randomized_error_ratio']:.5f}"
              f"  (target <= 1.02; mean {result['randomized_mean_error_ratio']:.5f})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Workload()
    parser.add_argument("--layers", type=int, default=defaults.num_layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden_size)
    parser.add_argument("--mlp", type=int, default=defaults.intermediate_size)
    parser.add_argument("--samples", type=int, default=defaults.samples)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default OMP_NUM_THREADS or 1)")
    args = parser.parse_args()
    require_compiled_backend()
    set_threads(args.threads)
    workload = Workload(num_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.mlp,
                        samples=args.samples, max_length=args.max_length)
    with tempfile.TemporaryDirectory(prefix="emloc-build-speed-") as directory:
        print(report(workload, measure(workload, args.rounds, Path(directory))))


if __name__ == "__main__":
    main()
