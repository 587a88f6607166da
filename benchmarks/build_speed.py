"""Speed of emloc's build against the baseline build, side by side on one model and one calibration set.

Rounds interleave the three builds (baseline, ours exact, ours randomized) so that load on a shared CPU
hits them alike. Each build is timed in wall-clock seconds and in CPU seconds of this process (with one
thread, the CPU time is what the build costs, whatever else the machine runs). The table gives medians,
the speed-up of each median over the baseline's, and the check that makes the comparison fair: the largest
relative difference of the ``u v`` products from the baseline's (exact), and the reconstruction error over the
exact optimum's (randomized).

    OMP_NUM_THREADS=1 python benchmarks/build_speed.py                  # the flagship's proportions
    OMP_NUM_THREADS=1 python benchmarks/build_speed.py --mlp 3584       # Llama-3-8B's
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from build_workload import (
    FLAGSHIP_PROPORTIONS,
    SPEEDUP_TARGETS,
    Workload,
    emulator_factors,
    error_ratios,
    product_error,
    require_compiled_backend,
    run_baseline,
    run_ours,
    set_threads,
)

BUILDS = ("baseline", "exact", "randomized")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(times: dict, fn, *args):
    """Call ``fn(*args)``, append its seconds on every clock to ``times[clock]``, return its result."""
    start = {clock: read() for clock, read in CLOCKS.items()}
    result = fn(*args)
    for clock, read in CLOCKS.items():
        times[clock].append(read() - start[clock])
    return result


def measure(workload: Workload, rounds: int, directory: Path) -> dict:
    """Seconds of each build on each clock over ``rounds`` interleaved rounds, and the factors' agreement."""
    model, data = workload.create(directory)
    times = {name: {clock: [] for clock in CLOCKS} for name in BUILDS}
    for _ in range(rounds):
        baseline = timed(times["baseline"], run_baseline, model, data, directory / "baseline", workload)
        for svd in ("exact", "randomized"):
            timed(times[svd], run_ours, model, data, directory / svd, workload, svd)
    exact = emulator_factors(directory / "exact")
    ratios = error_ratios(emulator_factors(directory / "randomized"), baseline)
    return {
        "times": times,
        "product_error": product_error(exact, baseline),
        "exact_error_ratio": max(error_ratios(exact, baseline).values()),
        "randomized_error_ratio": max(ratios.values()),
        "randomized_mean_error_ratio": statistics.fmean(ratios.values()),
    }


def report(workload: Workload, result: dict) -> str:
    times = result["times"]
    rounds = len(times["baseline"]["wall"])
    lines = [workload.describe(), f"{rounds} interleaved rounds; median (min-max) seconds", "",
             f"{'build':<22}{'wall s':>22}{'speed-up':>10}{'cpu s':>22}{'speed-up':>10}{'target':>8}"]
    for name in BUILDS:
        label = "baseline (reference)" if name == "baseline" else f"emloc svd={name}"
        row = f"{label:<22}"
        for clock in CLOCKS:
            values, base = times[name][clock], statistics.median(times["baseline"][clock])
            median = statistics.median(values)
            spread = f"{median:.2f} ({min(values):.2f}-{max(values):.2f})"
            row += f"{spread:>22}{base / median:>9.2f}x"
        lines.append(row + (f"{SPEEDUP_TARGETS[name]:>7.0f}x" if name in SPEEDUP_TARGETS else ""))
    lines += ["",
              f"exact: largest relative difference of u v from the baseline's  {result['product_error']:.2e}"
              f"  (target <= 1e-4)",
              f"exact: worst reconstruction error / optimum                   {result['exact_error_ratio']:.5f}",
              f"randomized: worst reconstruction error / optimum              {result['randomized_error_ratio']:.5f}"
              f"  (target <= 1.02; mean {result['randomized_mean_error_ratio']:.5f})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = FLAGSHIP_PROPORTIONS
    parser.add_argument("--layers", type=int, default=defaults.num_layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden_size)
    parser.add_argument("--mlp", type=int, default=defaults.intermediate_size)
    parser.add_argument("--samples", type=int, default=defaults.samples)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default OMP_NUM_THREADS or 1)")
    args = parser.parse_args()
    require_compiled_backend()
    set_threads(args.threads)
    workload = Workload(num_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.mlp,
                        samples=args.samples, max_length=args.max_length, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="emloc-build-speed-") as directory:
        print(report(workload, measure(workload, args.rounds, Path(directory))))


if __name__ == "__main__":
    main()
