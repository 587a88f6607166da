"""``make gpu-check``: every figure a GPU can give about emloc, in one command that fits a 10-minute window.

A GPU is lent rarely and briefly, so everything that needs one is prepared here and runs in one go, under
8 minutes, with the machine's own Python (nothing is installed; the checkout is put on ``PYTHONPATH``).
Four parts, each in a process of its own with its own time budget, so that a part that hangs or crashes
the CUDA context costs only its own figures:

* ``tests``: the kernel tests natively on the GPU (no interpreter): every op against float64 in fp32,
  fp16 and bf16 at the default suite's shapes and at real 7B / 32B layer shapes, and ``torch.compile`` of
  an ``EmulatorLinear`` (``gpu_tests.py``);
* ``kernels``: each kernel against its naive torch baseline at 7B / 32B shapes, with medians, TFLOP/s,
  GB/s and the fraction of this device's peak measured in the same run (``gpu_kernels.py``);
* ``pipeline``: build, train, correct and export a few blocks of Llama-3-8B and Qwen2.5-32B at their real
  layer shapes, the peak device memory of every stage beside the plan's (``gpu_pipeline.py``);
* ``reference``: the reference construction algorithm on the same blocks, for the build's speed-up.

Results go to ``--out`` (``results.json``, ``summary.md``). The exit status is 1 when a kernel test fails,
a kernel's output disagrees with its baseline, a stage's memory is more than 10% above its plan, or a
part fails or runs out of its time; 0 when all is well. Without a CUDA device it says so in one line and
exits with 3 at once.

    python3 benchmarks/gpu_check.py --out gpu-check-results [--parts tests,kernels] [--quick]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

EXIT_FAILED = 1
EXIT_NO_CUDA = 3
MEMORY_TOLERANCE = 1.10  # a stage may use up to 10% more device memory than its plan
TOTAL_BUDGET_S = 460  # the whole check, parts and driver; the window is 10 minutes, the target 8
MAX_LISTED = 20  # failed tests named in the problems; the summary names them all
GiB = 1 << 30


@dataclass(frozen=True)
class Part:
    """One part of the check: the module that runs it, its time budget, and whether running out of it is
    a failure (the reference build only bounds a speed-up from below when it does not finish)."""

    module: str
    budget_s: int
    timeout_fails: bool = True


PARTS = {
    "tests": Part("gpu_tests", 150),
    "kernels": Part("gpu_kernels", 90),
    "pipeline": Part("gpu_pipeline", 130),
    "reference": Part("gpu_pipeline", 70, timeout_fails=False),
}


# --- arguments ----------------------------------------------------------------------------------------


def _part_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(PARTS)}")
    if "reference" in names and "pipeline" not in names:
        raise argparse.ArgumentTypeError("the reference part times the blocks the pipeline part builds: "
                                         "add pipeline")
    return [name for name in PARTS if name in names]  # always in this order: reference needs pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--out", type=Path, default=Path("gpu-check-results"),
                        help="folder for results.json, summary.md and the parts' logs (default %(default)s)")
    parser.add_argument("--parts", type=_part_list, default=list(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases (bf16 tests, 32B kernel shapes), rounds, blocks and steps")
    parser.add_argument("--reference", default="llama3-8b",
                        help="models whose reference build is timed, comma-separated, or 'none' (default "
                             "%(default)s; qwen2.5-32b's eigendecompositions of 27648 x 27648 take minutes)")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # a part's own process
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the parts run from the repository root
    args.work = args.out / "work"  # checkpoints the pipeline writes and the reference reads; removed at the end
    return args


# --- the device ---------------------------------------------------------------------------------------


def cuda_missing() -> str | None:
    """Why this machine cannot run the check (no torch, a CPU-only build, no visible device), or None."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable ({exc})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "torch.cuda.is_available() is False" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None
                                                        else " (no driver or no device)")
    return None


def device_info() -> dict:
    """What the summary names the run by: the device and the software around it."""
    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"name": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count, "count": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version()}


# --- one part, in its own process ---------------------------------------------------------------------


class PartRecord:
    """A part's results, rewritten to ``<out>/<part>.json`` at every update: a part stopped at its time
    limit still leaves what it had measured."""

    def __init__(self, path: Path, name: str, budget_s: float) -> None:
        self.path, self.started = path, time.perf_counter()
        self.data: dict = {"part": name, "status": "running", "budget_s": budget_s}
        self._write()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self._write()

    def append(self, key: str, item: dict) -> None:
        self.data.setdefault(key, []).append(item)
        self._write()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, status: str, error: str | None = None) -> None:
        self.data.update(status=status, seconds=round(self.elapsed(), 1))
        if error is not None:
            self.data["error"] = error
        self._write()

    def _write(self) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=2))
        partial.replace(self.path)  # the driver never reads a half-written file, even after a kill


def run_part_here(name: str, args: argparse.Namespace) -> int:
    """The body of a part's process: run its module and record how it ended."""
    sys.path.insert(0, str(BENCHMARKS))
    record = PartRecord(args.out / f"{name}.json", name, float(os.environ.get("EMLOC_GPU_CHECK_BUDGET", "0")))
    try:
        module = importlib.import_module(PARTS[name].module)
        getattr(module, f"run_{name}")(record, args)
    except Exception:  # noqa: BLE001 - whatever broke is the part's result, with its traceback
        record.finish("error", traceback.format_exc()[-4000:])
        return EXIT_FAILED
    record.finish("ok")
    return 0


def child_env(budget_s: float) -> dict[str, str]:
    """The parts' environment: the kernels compiled (never interpreted), the backend chosen per tensor,
    the checkout importable without an install."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EMLOC_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["EMLOC_GPU_CHECK_BUDGET"] = str(int(budget_s))
    return env


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def spawn_part(name: str, args: argparse.Namespace, budget_s: float) -> dict:
    """Run one part in a fresh process (a session of its own, so that its pytest shards die with it) for
    at most ``budget_s`` seconds; returns its record, marked ``timeout`` or ``error`` as it ended."""
    command = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--out", str(args.out),
               "--reference", args.reference, *(["--quick"] if args.quick else [])]
    log, path = args.out / f"{name}.log", args.out / f"{name}.json"
    path.unlink(missing_ok=True)  # a record left by an earlier run must not pass for this one's
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=child_env(budget_s), stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=budget_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            timed_out = True
    record = json.loads(path.read_text()) if path.is_file() else {"part": name}
    record.update(budget_s=round(budget_s), seconds=round(time.perf_counter() - started, 1))
    if timed_out:
        record["status"] = "timeout"
    elif process.returncode != 0 and record.get("status") in (None, "running", "ok"):
        record.update(status="error", error=f"exit status {process.returncode}; log:\n{_tail(log)}")
    return record


# --- verdict and report -------------------------------------------------------------------------------


def problems(results: dict) -> list[str]:
    """Every reason for a non-zero exit, one line each: failed tests, kernel outputs that disagree with
    their baselines, stages above 1.1x their planned memory, parts that failed or ran out of time."""
    found = []
    for name, part in results["parts"].items():
        status = part.get("status")
        if status in ("timeout", "skipped") and not PARTS[name].timeout_fails:
            continue
        if status != "ok":
            detail = (part.get("error") or "").strip().splitlines()
            found.append(f"{name}: {status}" + (f" after {part.get('seconds')} s" if status == "timeout" else "")
                         + (f": {detail[-1]}" if detail else ""))
    failures = results["parts"].get("tests", {}).get("failures", [])
    found += [f"tests: {failure['test']}: {failure['message']}" for failure in failures[:MAX_LISTED]]
    if len(failures) > MAX_LISTED:
        found.append(f"tests: {len(failures) - MAX_LISTED} more failures (summary.md lists them all)")
    for row in results["parts"].get("kernels", {}).get("rows", []):
        if not row["ok"]:
            found.append(f"kernels: {row['op']} {row['shape']}: emloc differs from the baseline by "
                         f"{row['rel_diff']:.2e} (bound {row['bound']:.1e})")
    for model in results["parts"].get("pipeline", {}).get("models", []):
        for stage in model.get("stages", []):
            if over_plan(stage) > MEMORY_TOLERANCE:
                found.append(f"pipeline: {model['name']} {stage['name']}: {stage['measured_bytes'] / GiB:.2f} GiB "
                             f"measured, {over_plan(stage):.2f}x the plan's {stage['planned_bytes'] / GiB:.2f} GiB")
    return found


def over_plan(stage: dict) -> float:
    """A stage's measured peak over its planned one (infinite for memory the plan did not expect at all)."""
    if stage["planned_bytes"] <= 0:
        return float("inf") if stage["measured_bytes"] > 0 else 0.0
    return stage["measured_bytes"] / stage["planned_bytes"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if i < 2 else "---:" for i in range(len(header))]
    return [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |", *(f"| {' | '.join(r)} |" for r in rows)]


def _tests_section(part: dict) -> list[str]:
    counts = ", ".join(f"{part.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped"))
    lines = ["## Kernel tests, natively on the GPU", "",
             f"{counts}, in {part.get('shards', '?')} parallel pytest shards ({part.get('selection', '')})."]
    lines += [f"- FAILED `{f['test']}`: {f['message']}" for f in part.get("failures", [])]
    return lines


def _kernels_section(part: dict) -> list[str]:
    peaks = part.get("peaks", {})
    lines = ["## Kernels against their naive torch baselines", ""]
    if peaks:
        lines += [f"Peaks measured in this run: bf16 cuBLAS GEMM {peaks['gemm_shape']}: "
                  f"{peaks['gemm_tflops']:.0f} TFLOP/s; device copy of {peaks['copy_bytes'] / GiB:.0f} GiB: "
                  f"{peaks['copy_gbps']:.0f} GB/s. Medians of {part.get('rounds', '?')} rounds, bf16; "
                  "'of peak' is the roofline time (FLOPs at the GEMM peak or bytes at the copy bandwidth, "
                  "whichever is longer) over the measured time; bytes and FLOPs from `kernel_cost.py`.", ""]
    rows = [[r["op"], r["shape"], f"{r['naive']['ms']:.3f}", f"{r['emloc']['ms']:.3f}",
             f"{r['naive']['ms'] / r['emloc']['ms']:.2f}x", f"{r['emloc']['tflops']:.0f}", f"{r['emloc']['gbps']:.0f}",
             f"{r['emloc']['of_peak']:.0%}", f"{r['naive']['of_peak']:.0%}", "ok" if r["ok"] else "MISMATCH"]
            for r in part.get("rows", [])]
    return lines + _table(["op", "shape", "naive ms", "emloc ms", "speed-up", "emloc TFLOP/s", "emloc GB/s",
                           "emloc of peak", "naive of peak", "output"], rows)


def _pipeline_section(part: dict) -> list[str]:
    lines = ["## The pipeline at real layer shapes", ""]
    rows = []
    for model in part.get("models", []):
        for stage in model.get("stages", []):
            ratio = over_plan(stage)
            rows.append([model["name"], stage["name"], f"{stage['seconds']:.1f}",
                         f"{stage['measured_bytes'] / GiB:.2f}", f"{stage['planned_bytes'] / GiB:.2f}",
                         f"{ratio:.2f}" + (" OVER" if ratio > MEMORY_TOLERANCE else "")])
    described = [f"- {m['name']}: {m['describe']}" for m in part.get("models", [])]
    return lines + described + [""] + _table(
        ["model", "stage", "seconds", "max_memory_allocated GiB", "plan GiB", "measured / plan"], rows)


def _reference_section(pipeline: dict, reference: dict) -> list[str]:
    ours = {m["name"]: m["construction_seconds"] for m in pipeline.get("models", [])}
    rows = [[done["name"], f"{done['seconds']:.1f}", f"{ours[done['name']]:.1f}",
             f"{done['seconds'] / ours[done['name']]:.2f}x"] for done in reference.get("models", [])]
    current = reference.get("current")
    if current and current["name"] not in {done["name"] for done in reference.get("models", [])}:
        # stopped at its time limit: the time it had run is a lower bound
        bound = reference.get("seconds", 0.0) - current["started_s"]
        rows.append([current["name"], f"> {bound:.0f} (stopped)", f"{ours[current['name']]:.1f}",
                     f"> {bound / ours[current['name']]:.1f}x"])
    return ["## Emulator construction against the reference algorithm, same blocks", "",
            "The reference: every linear's own input covariance, eigendecomposition and full SVD of `W S` "
            "(`baseline_build.py`), in fp32 on the GPU; emloc: `build_emulator` in bf16, exact factors.", "",
            *_table(["model", "reference s", "emloc s", "speed-up"], rows)]


def summary_markdown(results: dict) -> str:
    """The results as a page: the device, each part's status and time, its tables, and the problems."""
    device, found = results["device"], results["problems"]
    lines = [f"# emloc GPU check: {device['name']}", "",
             f"{device['memory_bytes'] / GiB:.1f} GiB, compute capability {device['capability']}, "
             f"{device['multiprocessors']} SMs; torch {device['torch']} (CUDA {device['cuda']}), triton "
             f"{device['triton']}, Python {device['python']}. Started {results['started']}, "
             f"{results['seconds']:.0f} s in all{' (--quick)' if results.get('quick') else ''}.", "",
             f"**{'PASS' if not found else f'FAIL: {len(found)} problem(s)'}**", ""]
    lines += _table(["part", "status", "seconds", "budget s"],
                    [[name, p.get("status", "?"), f"{p.get('seconds', 0):.0f}", f"{p.get('budget_s', 0)}"]
                     for name, p in results["parts"].items()])
    parts = results["parts"]
    for name, section in (("tests", _tests_section), ("kernels", _kernels_section), ("pipeline", _pipeline_section)):
        if name in parts:
            lines += ["", *section(parts[name])]
    if "reference" in parts and "pipeline" in parts:
        lines += ["", *_reference_section(parts["pipeline"], parts["reference"])]
    if found:
        lines += ["", "## Problems", "", *(f"- {line}" for line in found)]
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: dict) -> None:
    """``results.json`` (everything) and ``summary.md`` (the page) in ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(summary_markdown(results))


# --- the driver ---------------------------------------------------------------------------------------


def run_check(args: argparse.Namespace) -> int:
    """Run the chosen parts one after the other within the total budget, report, and return the exit status."""
    if "reference" in args.parts:
        from gpu_pipeline import reference_models

        reference_models(args.reference)  # a misspelt model name fails now, not after the other parts
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": device_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": args.quick,
               "parts": {}}
    started = time.perf_counter()
    for name in args.parts:
        left = TOTAL_BUDGET_S - (time.perf_counter() - started)
        if left < 20:
            results["parts"][name] = {"part": name, "status": "skipped", "error": "no time left in the total budget"}
            continue
        print(f"gpu-check: {name} (at most {min(PARTS[name].budget_s, left):.0f} s)", flush=True)
        results["parts"][name] = spawn_part(name, args, min(PARTS[name].budget_s, left))
    shutil.rmtree(args.work, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["problems"] = problems(results)
    write_report(args.out, results)
    print(f"gpu-check: {'PASS' if not results['problems'] else 'FAIL'}; {args.out / 'summary.md'}")
    for line in results["problems"]:
        print(f"  {line}")
    return EXIT_FAILED if results["problems"] else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_part_here(args.part, args)
    reason = cuda_missing()
    if reason is not None:
        print(f"no CUDA device: {reason}; gpu-check runs on a CUDA machine only", file=sys.stderr)
        return EXIT_NO_CUDA
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
