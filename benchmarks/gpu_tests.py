"""The ``tests`` part of ``make gpu-check``: the kernel tests natively on the GPU, in parallel pytest shards.

The same test files as the CPU suite, where the kernels run in Triton's interpreter; here ``TRITON_INTERPRET``
is unset, so every op's compiled kernel is compared with float64 in fp32, fp16 and bf16 (tolerances:
``tests/utils.REL_TOL``), and ``-m "not slow"`` adds the real 7B / 32B layer shapes (marker ``layer_shapes``)
to the default suite's. ``test_emulator_linear`` also compiles an ``EmulatorLinear`` with ``torch.compile``.

Compiling the kernels' specializations, and autotuning ``scaled_matmul`` for every new shape, takes most of
the time, one CPU core per process: the tests run in several pytest processes at once, each test function
whole in one of them, so that its cases share their compiled kernels.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_FILES = ("tests/test_covariance.py", "tests/test_lowrank.py", "tests/test_emulator_linear.py")
MARKERS = "not slow"  # the default suite and the layer_shapes cases
QUICK_KEYWORDS = "bfloat16 or torch_compile"  # --quick: the bf16 cases and the compiled module only
MARGIN_S = 10  # left of the part's budget to write its record after the shards stop


def pytest_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", MARKERS, *args]


def collect(keywords: str | None) -> list[str]:
    """The node ids of the selected kernel tests."""
    command = pytest_command("--collect-only", *(["-k", keywords] if keywords else []), *TEST_FILES)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    if done.returncode != 0 or not ids:
        raise RuntimeError(f"collecting the kernel tests failed ({done.returncode}):\n{done.stdout[-3000:]}"
                           f"{done.stderr[-3000:]}")
    return ids


def shards(node_ids: list[str], count: int) -> list[list[str]]:
    """Split ``node_ids`` into at most ``count`` shards of about equal size, never splitting the cases of one
    test function (largest functions first, each to the smallest shard so far), in collection order within."""
    groups: dict[str, list[str]] = {}
    for node in node_ids:
        groups.setdefault(node.split("[")[0], []).append(node)
    out: list[list[str]] = [[] for _ in range(max(1, min(count, len(groups))))]
    for members in sorted(groups.values(), key=len, reverse=True):
        min(out, key=len).extend(members)
    order = {node: i for i, node in enumerate(node_ids)}
    return [sorted(shard, key=order.__getitem__) for shard in out if shard]


def worker_count() -> int:
    """One pytest process per two CPU cores, 2 to 8: compilation is single-threaded per process."""
    return min(8, max(2, (os.cpu_count() or 2) // 2))


def read_junit(path: Path) -> dict:
    """Counts and failures of one pytest JUnit XML report."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            message = (outcome.get("message") or outcome.text or "").strip().splitlines()
            failures.append({"test": test, "message": (message[0] if message else outcome.tag)[:300]})
    return {**counts, "failures": failures}


def merge(reports: list[dict]) -> dict:
    total = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for report in reports:
        for key in ("passed", "failed", "errors", "skipped"):
            total[key] += report[key]
        total["failures"] += report["failures"]
    return total


def run_tests(record, args) -> None:
    """Collect, shard, run the shards at once within the part's budget, and record the merged counts."""
    keywords = QUICK_KEYWORDS if args.quick else None
    groups = shards(collect(keywords), worker_count())
    selection = f"-m '{MARKERS}'" + (f" -k '{keywords}'" if keywords else "")
    record.update(shards=len(groups), selection=selection, collected=sum(map(len, groups)))
    deadline = time.monotonic() + float(record.data["budget_s"] or 600) - record.elapsed() - MARGIN_S
    running = []
    for i, shard in enumerate(groups):
        report, log = args.out / f"tests-{i}.xml", open(args.out / f"tests-{i}.log", "w")
        process = subprocess.Popen(pytest_command(f"--junitxml={report}", *shard), cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT)
        running.append((process, report, log, len(shard)))
    reports = []
    for process, report, log, size in running:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
            ended = f"pytest ended with {process.returncode} and no report"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            ended = "stopped at the part's time limit"
        log.close()
        if process.returncode in (0, 1) and report.is_file():
            reports.append(read_junit(report))
        else:
            tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            reports.append({"passed": 0, "failed": 0, "errors": size, "skipped": 0, "failures": [
                {"test": f"{report.stem} ({size} tests)", "message": f"{ended}; last output: {tail[0][:300]}"}]})
        record.update(**merge(reports))
