"""``make gpu-check`` (``benchmarks/gpu_check.py``) on the CPU: what it does without a GPU, its arguments, its
verdict and its report from made-up results, and its parts' bookkeeping (test shards, JUnit reports).

The GPU is lent rarely and briefly, so the logic around the measurements must be right before it is."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_tests  # noqa: E402

GiB = 1 << 30


def test_without_cuda_it_says_so_in_one_line_and_exits_at_once(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == gpu_check.EXIT_NO_CUDA != 0
    assert len(lines) == 1 and lines[0].startswith("no CUDA device: "), lines
    assert not (tmp_path / "out").exists(), "nothing is written without a GPU"
    assert time.perf_counter() - started < 30


def test_default_arguments_run_every_part():
    args = gpu_check.parse_args([])
    assert args.parts == ["tests", "kernels", "pipeline", "reference"]
    assert (args.out, args.quick, args.reference, args.part) == \
        (Path("gpu-check-results").resolve(), False, "llama3-8b", None)
    assert args.work == args.out / "work"


def test_parts_run_in_pipeline_order_whatever_the_order_given():
    assert gpu_check.parse_args(["--parts", "kernels, tests"]).parts == ["tests", "kernels"]
    assert gpu_check.parse_args(["--parts", "reference,pipeline", "--quick"]).parts == ["pipeline", "reference"]


@pytest.mark.parametrize("parts, message", [("tests,gpu", "unknown part"), (",", "unknown part"),
                                            ("reference", "reference part times the blocks the pipeline")])
def test_bad_parts_are_a_usage_error(capsys, parts, message):
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args(["--parts", parts])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_child_env_compiles_the_kernels_and_finds_the_checkout(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("EMLOC_BACKEND", "torch")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = gpu_check.child_env(123.4)
    assert "TRITON_INTERPRET" not in env and "EMLOC_BACKEND" not in env
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]
    assert env["EMLOC_GPU_CHECK_BUDGET"] == "123"


# --- verdict and report from made-up results ----------------------------------------------------------


def stage(name: str, measured_gib: float, planned_gib: float) -> dict:
    return {"name": name, "seconds": 1.5, "measured_bytes": int(measured_gib * GiB),
            "planned_bytes": int(planned_gib * GiB)}


def rates(ms: float) -> dict:
    return {"ms": ms, "tflops": 500.0, "gbps": 3000.0, "of_peak": 0.6}


def results(**changes) -> dict:
    """A passing run of every part, with ``changes`` applied to its parts."""
    parts = {
        "tests": {"status": "ok", "seconds": 120.0, "budget_s": 150, "passed": 361, "failed": 0, "errors": 0,
                  "skipped": 0, "failures": [], "shards": 8, "selection": "-m 'not slow'"},
        "kernels": {"status": "ok", "seconds": 60.0, "budget_s": 90, "rounds": 10,
                    "peaks": {"gemm_shape": "8192^3", "gemm_tflops": 750.0, "copy_bytes": 4 * GiB,
                              "copy_gbps": 4000.0},
                    "rows": [{"op": "emulator_linear fwd", "shape": "32B up", "emloc": rates(0.5), "naive": rates(1.0),
                              "rel_diff": 1e-3, "bound": 6e-2, "ok": True}]},
        "pipeline": {"status": "ok", "seconds": 100.0, "budget_s": 130, "models": [
            {"key": "llama3-8b", "name": "Llama-3-8B", "describe": "2 blocks of Llama-3-8B",
             "construction_seconds": 10.0,
             "stages": [stage("construction", 3.0, 3.2), stage("training", 9.5, 9.0), stage("export", 0.0, 1.0)]}]},
        "reference": {"status": "ok", "seconds": 40.0, "budget_s": 70,
                      "current": {"name": "Llama-3-8B", "started_s": 5.0},
                      "models": [{"name": "Llama-3-8B", "seconds": 35.0, "measured_bytes": 6 * GiB}]},
    }
    for name, change in changes.items():
        parts[name] = change(parts[name])
    return {"device": {"name": "NVIDIA H200", "memory_bytes": 141 * 10**9, "capability": "9.0",
                       "multiprocessors": 132, "count": 1, "torch": "2.11.0", "cuda": "12.8", "triton": "3.6.0",
                       "python": "3.12.3"},
            "started": "2026-01-01 00:00:00 UTC", "quick": False, "seconds": 400.0, "parts": parts}


def test_a_clean_run_has_no_problems():
    assert gpu_check.problems(results()) == []


def test_memory_up_to_ten_percent_over_the_plan_passes_and_beyond_fails():
    def training_at(gib):
        def change(part):
            part["models"][0]["stages"][1] = stage("training", gib, 9.0)
            return part
        return change

    assert gpu_check.problems(results(pipeline=training_at(9.0 * 1.099))) == []
    found = gpu_check.problems(results(pipeline=training_at(9.0 * 1.11)))
    assert found == ["pipeline: Llama-3-8B training: 9.99 GiB measured, 1.11x the plan's 9.00 GiB"]


def test_failed_tests_and_kernel_mismatches_are_problems():
    def failing(part):
        return {**part, "failed": 1, "failures": [{"test": "tests/test_lowrank.py::test_x[a]", "message": "boom"}]}

    def mismatch(part):
        part["rows"][0].update(rel_diff=0.2, ok=False)
        return part

    found = gpu_check.problems(results(tests=failing, kernels=mismatch))
    assert found == ["tests: tests/test_lowrank.py::test_x[a]: boom",
                     "kernels: emulator_linear fwd 32B up: emloc differs from the baseline by 2.00e-01 (bound 6.0e-02)"]


def test_many_failed_tests_are_counted_not_all_listed():
    def failing(part):
        failures = [{"test": f"t{i}", "message": "m"} for i in range(gpu_check.MAX_LISTED + 5)]
        return {**part, "failed": len(failures), "failures": failures}

    found = gpu_check.problems(results(tests=failing))
    assert len(found) == gpu_check.MAX_LISTED + 1 and found[-1].startswith("tests: 5 more failures")


@pytest.mark.parametrize("name, status, fails", [("kernels", "timeout", True), ("pipeline", "error", True),
                                                 ("tests", "skipped", True), ("reference", "timeout", False),
                                                 ("reference", "skipped", False), ("reference", "error", True)])
def test_a_part_that_did_not_finish_is_a_problem_unless_it_is_the_reference(name, status, fails):
    found = gpu_check.problems(results(**{name: lambda part: {**part, "status": status,
                                                                   "error": "Traceback\nRuntimeError: x"}}))
    assert bool(found) is fails
    if fails:
        assert found[0].startswith(f"{name}: {status}") and found[0].endswith("RuntimeError: x")


def test_report_names_the_device_and_holds_every_table(tmp_path):
    run = results()
    run["problems"] = gpu_check.problems(run)
    gpu_check.write_report(tmp_path, run)
    assert json.loads((tmp_path / "results.json").read_text()) == run
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# emloc GPU check: NVIDIA H200\n")
    assert "**PASS**" in summary
    assert "361 passed, 0 failed, 0 errors, 0 skipped, in 8 parallel pytest shards" in summary
    assert "bf16 cuBLAS GEMM 8192^3: 750 TFLOP/s; device copy of 4 GiB: 4000 GB/s" in summary
    assert "| emulator_linear fwd | 32B up | 1.000 | 0.500 | 2.00x | 500 | 3000 | 60% | 60% | ok |" in summary
    assert "| Llama-3-8B | training | 1.5 | 9.50 | 9.00 | 1.06 |" in summary
    assert "| Llama-3-8B | 35.0 | 10.0 | 3.50x |" in summary


def test_report_of_a_failed_run_lists_its_problems_and_bounds_an_unfinished_reference(tmp_path):
    def stopped(part):
        return {**part, "status": "timeout", "seconds": 70.0, "models": []}

    run = results(reference=stopped, kernels=lambda part: {**part, "status": "error", "error": "CUDA error"})
    run["problems"] = gpu_check.problems(run)
    gpu_check.write_report(tmp_path, run)
    summary = (tmp_path / "summary.md").read_text()
    assert "**FAIL: 1 problem(s)**" in summary and "- kernels: error: CUDA error" in summary
    assert "| Llama-3-8B | > 65 (stopped) | 10.0 | > 6.5x |" in summary


def test_driver_runs_the_parts_reports_and_sets_the_exit_status(tmp_path, monkeypatch):
    recorded = results()
    monkeypatch.setattr(gpu_check, "cuda_missing", lambda: None)
    monkeypatch.setattr(gpu_check, "device_info", lambda: recorded["device"])
    spawned = []

    def spawn(name, args, budget):
        spawned.append((name, budget))
        return recorded["parts"][name]

    monkeypatch.setattr(gpu_check, "spawn_part", spawn)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--parts", "tests,kernels"]) == 0
    assert spawned == [("tests", 150), ("kernels", 90)]
    assert (out / "summary.md").is_file() and json.loads((out / "results.json").read_text())["problems"] == []

    recorded["parts"]["kernels"]["status"] = "timeout"
    assert gpu_check.main(["--out", str(out), "--parts", "kernels"]) == gpu_check.EXIT_FAILED
    assert "kernels: timeout" in (out / "summary.md").read_text()


def test_a_part_past_its_budget_is_stopped_with_its_children(tmp_path):
    """The tests part starts pytest processes; at the budget the whole process group goes, and the record
    says timeout."""
    args = gpu_check.parse_args(["--out", str(tmp_path), "--parts", "tests"])
    started = time.perf_counter()
    record = gpu_check.spawn_part("tests", args, 1.5)
    assert time.perf_counter() - started < 10
    assert record["part"] == "tests" and record["status"] == "timeout" and record["budget_s"] == 2
    assert (tmp_path / "tests.log").is_file()


def test_a_part_that_raises_records_its_traceback(tmp_path, monkeypatch):
    def broken(record, args):
        record.update(peaks={"gemm_tflops": 1.0})
        raise RuntimeError("the device fell over")

    monkeypatch.setitem(sys.modules, "fake_part", types.SimpleNamespace(run_kernels=broken))
    monkeypatch.setitem(gpu_check.PARTS, "kernels", gpu_check.Part("fake_part", 5))
    monkeypatch.setenv("EMLOC_GPU_CHECK_BUDGET", "5")
    assert gpu_check.main(["--part", "kernels", "--out", str(tmp_path)]) == gpu_check.EXIT_FAILED
    record = json.loads((tmp_path / "kernels.json").read_text())
    assert record["status"] == "error" and record["budget_s"] == 5.0 and record["peaks"] == {"gemm_tflops": 1.0}
    assert record["error"].rstrip().endswith("RuntimeError: the device fell over")


# --- the tests part's bookkeeping ---------------------------------------------------------------------


def test_shards_keep_each_test_function_whole_and_balance_the_rest():
    ids = ([f"tests/a.py::test_big[{i}]" for i in range(6)] + [f"tests/a.py::test_mid[{i}]" for i in range(3)]
           + ["tests/b.py::test_one", "tests/b.py::test_two[x]", "tests/b.py::test_two[y]"])
    groups = gpu_tests.shards(ids, 3)
    assert sorted(len(g) for g in groups) == [3, 3, 6]
    assert sorted(sum(groups, [])) == sorted(ids)
    for group in groups:
        functions = {node.split("[")[0] for node in group}
        assert all(all(n in group for n in ids if n.split("[")[0] == f) for f in functions)
        assert group == sorted(group, key=ids.index), "collection order is kept within a shard"
    assert len(gpu_tests.shards(ids[:2], 8)) == 1, "no more shards than test functions"


def test_junit_reports_are_read_and_merged(tmp_path):
    report = tmp_path / "tests-0.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="tests.test_lowrank" name="test_a[1]"/>'
        '<testcase classname="tests.test_lowrank" name="test_a[2]">'
        '<failure message="AssertionError: relative error 1e-2 &gt; 1e-5&#10;more">trace</failure></testcase>'
        '<testcase classname="tests.test_covariance" name="test_b"><skipped message="no NVIDIA backend"/></testcase>'
        '<testcase classname="tests.test_covariance" name="test_c"><error message="fixture broke"/></testcase>'
        '</testsuite></testsuites>')
    read = gpu_tests.read_junit(report)
    assert {k: read[k] for k in ("passed", "failed", "errors", "skipped")} == \
        {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert read["failures"] == [
        {"test": "tests/test_lowrank.py::test_a[2]", "message": "AssertionError: relative error 1e-2 > 1e-5"},
        {"test": "tests/test_covariance.py::test_c", "message": "fixture broke"}]
    merged = gpu_tests.merge([read, read])
    assert merged["passed"] == 2 and len(merged["failures"]) == 4
