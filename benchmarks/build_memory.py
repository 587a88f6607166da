"""Peak host memory of emloc's build: a 12-block and a 48-block model of the same width, and the baseline.

Each build runs in a fresh subprocess that first imports everything it needs (torch, transformers, emloc
and the architecture's modeling module), then records its resident set size (RSS) as its baseline and
resets the kernel's high-water mark; after the build, the high-water mark (VmHWM) is its peak. The peak
above the baseline is compared with the bound of the streaming design: twice the largest single unit of
the checkpoint (one block's weights, or the embedding or LM head) plus the calibration activations.

    OMP_NUM_THREADS=1 python benchmarks/build_memory.py
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from build_workload import Workload, require_compiled_backend, set_threads

MiB = 1 << 20
BUILDERS = ("emloc", "baseline")
BLOCK_KEY = re.compile(r"(.*\.layers\.\d+)\.")
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _status_bytes(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (peak RSS needs Linux)")


def child(builder: str, model: Path, data: Path, output: Path, workload: Workload) -> dict:
    """Run one build in this process; return its RSS after imports and its peak RSS, in bytes."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import emloc  # noqa: F401
    from build_workload import run_baseline, run_ours

    MODEL_FOR_CAUSAL_LM_MAPPING[type(transformers.AutoConfig.from_pretrained(model))]  # imports the modeling code
    gc.collect()
    baseline = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    if builder == "emloc":
        run_ours(model, data, output, workload, "exact")
    else:
        run_baseline(model, data, output, workload)
    return {"rss_after_imports": baseline, "peak_rss": _status_bytes("VmHWM")}


def run_child(builder: str, model: Path, data: Path, output: Path, workload: Workload) -> dict:
    """:func:`child` in a fresh interpreter; returns its measurements."""
    command = [sys.executable, __file__, "--child", builder, str(model), str(data), str(output),
               "--workload", json.dumps(dataclasses.asdict(workload))]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    if done.returncode != 0:
        raise RuntimeError(f"{builder} build of {model} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_unit(model: Path) -> tuple[str, int]:
    """The checkpoint's largest single unit, one block or one tensor outside the blocks, and its bytes."""
    from safetensors import safe_open

    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    units: dict[str, int] = {}
    for file in sorted(set(index.values())):
        with safe_open(model / file, framework="pt") as shard:
            for key in shard.keys():
                block = BLOCK_KEY.match(key)
                unit = block.group(1) if block else key
                tensor = shard.get_slice(key)
                units[unit] = units.get(unit, 0) + math.prod(tensor.get_shape()) * ITEMSIZE[tensor.get_dtype()]
    name = max(units, key=units.get)
    return name, units[name]


def measure(widths: Workload, layers: tuple[int, ...], directory: Path, baseline: bool = True) -> list[dict]:
    """Peak RSS of emloc's build for each block count, and (unless ``baseline`` is False) of the baseline on
    the smallest model."""
    rows = []
    for count in layers:
        workload = dataclasses.replace(widths, num_layers=count)
        model, data = workload.create(directory / f"{count}-blocks")
        unit, unit_bytes = largest_unit(model)
        activations = workload.samples * workload.max_length * workload.hidden_size * 4
        for builder in BUILDERS if count == min(layers) and baseline else ("emloc",):
            result = run_child(builder, model, data, directory / f"{count}-{builder}", workload)
            rows.append({"blocks": count, "builder": builder, "unit": unit, "unit_bytes": unit_bytes,
                         "activations": activations, "bound": 2 * unit_bytes + activations, **result})
    return rows


def report(widths: Workload, rows: list[dict]) -> str:
    lines = [f"{widths.describe().split(';')[0].replace(f'{widths.num_layers} blocks, ', '')}; "
             f"{widths.samples} samples x {widths.max_length} tokens; svd exact; fp32 on the CPU",
             "", f"{'blocks':>6}  {'build':<9}{'after imports':>14}{'peak':>10}{'above':>10}{'bound':>10}"
             f"{'above/bound':>12}   (MiB)"]
    for row in rows:
        above = row["peak_rss"] - row["rss_after_imports"]
        lines.append(f"{row['blocks']:>6}  {row['builder']:<9}{row['rss_after_imports'] / MiB:>14.1f}"
                     f"{row['peak_rss'] / MiB:>10.1f}{above / MiB:>10.1f}{row['bound'] / MiB:>10.1f}"
                     f"{above / row['bound']:>12.2f}")
    first = rows[0]
    lines.append(f"\nbound = 2 x largest unit ({first['unit']}, {first['unit_bytes'] / MiB:.1f} MiB) "
                 f"+ calibration activations ({first['activations'] / MiB:.1f} MiB)")
    ours = [row for row in rows if row["builder"] == "emloc"]
    small, large = ours[0], ours[-1]
    small_above = small["peak_rss"] - small["rss_after_imports"]
    large_above = large["peak_rss"] - large["rss_after_imports"]
    lines.append(f"peak RSS, {large['blocks']} vs {small['blocks']} blocks: "
                 f"{large['peak_rss'] / small['peak_rss'] - 1:+.1%} (target within 20%); above the post-import RSS: "
                 f"{large_above / small_above - 1:+.1%}")
    base = next((row for row in rows if row["builder"] == "baseline"), None)
    if base is not None:
        base_above = base["peak_rss"] - base["rss_after_imports"]
        lines.append(f"peak RSS, emloc / baseline at {base['blocks']} blocks: "
                     f"{small['peak_rss'] / base['peak_rss']:.2f} "
                     f"(above the post-import RSS: {small_above / base_above:.2f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("BUILDER", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 48])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mlp", type=int, default=1536)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default OMP_NUM_THREADS or 1)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the baseline build (it loads the whole model: slow and large at wide shapes)")
    args = parser.parse_args()
    require_compiled_backend()
    set_threads(args.threads)
    if args.child:
        builder, model, data, output = args.child
        print(json.dumps(child(builder, Path(model), Path(data), Path(output),
                               Workload(**json.loads(args.workload)))))
        return
    widths = Workload(hidden_size=args.hidden, intermediate_size=args.mlp, samples=args.samples,
                      max_length=args.max_length)
    with tempfile.TemporaryDirectory(prefix="emloc-build-memory-") as directory:
        rows = measure(widths, tuple(sorted(args.layers)), Path(directory), baseline=not args.no_baseline)
        print(report(widths, rows))


if __name__ == "__main__":
    main()
