"""Benchmark set-up: the device, the dtype and the scale of the shapes to time, and a summary of speed-ups.

On a GPU the ops run their Triton kernels at the true layer sizes of 7B- and 32B-class models in bf16.
On the CPU they run the torch reference (the interpreter would time Python, so ``TRITON_INTERPRET`` is
switched off here) in fp32 at the same shapes scaled down 16x, so the whole suite takes minutes.
"""
from __future__ import annotations

import os
import platform
from collections import defaultdict

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SCALE = 1 if ON_GPU else 16  # layer shapes (benchmarks/shapes.py) are divided by this
ROUNDS = 20 if ON_GPU else 5  # timed rounds per benchmark: a fixed count keeps the CPU suite to minutes


def scaled(size: int) -> int:
    """A layer dimension at this machine's benchmark scale."""
    return max(1, size // SCALE)


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def pytest_configure(config):
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "0"


def pytest_report_header(config):
    if ON_GPU:
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    backend = "Triton kernels" if ON_GPU else "torch reference (no GPU)"
    return f"emloc kernels: {machine}; {backend}; {DTYPE}; layer shapes / {SCALE}; torch {torch.__version__}"


MEDIANS: dict[str, dict[str, float]] = defaultdict(dict)


@pytest.fixture
def timed(benchmark):
    """``timed(group, impl, fn, *args, rounds=ROUNDS)``: benchmark ``fn(*args)`` as ``impl`` within ``group``.

    Each group holds the naive baseline and the emloc variants on the same inputs; the session ends with
    the median speed-up of every variant over the baseline.
    """

    def run(group: str, impl: str, fn, *args, rounds: int = ROUNDS):
        def call():
            fn(*args)
            synchronize()

        benchmark.group = group
        benchmark.extra_info["impl"] = impl
        call()  # warm-up outside the timing: the first call pays for imports, op registration and compilation
        benchmark.pedantic(call, rounds=rounds)
        if benchmark.stats is not None:
            MEDIANS[group][impl] = benchmark.stats.stats.median

    return run


def pytest_terminal_summary(terminalreporter):
    rows = [
        (group, impl, timings["naive"], median)
        for group, timings in MEDIANS.items() if "naive" in timings
        for impl, median in timings.items() if impl != "naive"
    ]
    if not rows:
        return
    width = max(len(group) for group, *_ in rows)
    terminalreporter.section("emloc vs naive baseline (medians, same run)")
    terminalreporter.write_line(
        f"{'group':<{width}}  {'variant':<18} {'naive ms':>10} {'emloc ms':>10} {'speed-up':>9}")
    for group, impl, naive, median in rows:
        terminalreporter.write_line(
            f"{group:<{width}}  {impl:<18} {naive * 1e3:>10.3f} {median * 1e3:>10.3f} {naive / median:>8.2f}x"
        )
