"""``emloc demo``: the whole method on the built-in model and task, against its baselines, in minutes on a CPU."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from .options import positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run EMLoC and its baselines on the built-in model and task; print a table, save a plot",
        description="Fine-tunes the built-in 1M-parameter model (pretrained on the Python standard library) on "
                    "a held-out program-tracing task at two compression ratios: zero-shot, LoRA on the original, "
                    "the emulator's LoRA without and with correction (emloc run), and a smaller model with LoRA. "
                    "Writes table.md, runs.json and accuracy.png to --out.")
    parser.add_argument("--out", type=Path, default=Path("emloc-demo"), help="output directory (default emloc-demo)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds per row (default 3)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="LoRA steps per fine-tuning run (default 300)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads (default 1: the layers are too small to gain from more)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    # Without a GPU the kernels' torch reference is the fast path; the Triton interpreter exists for the tests.
    if not torch.cuda.is_available():
        os.environ.setdefault("EMLOC_BACKEND", "torch")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    from ..demo.compare import Settings, compare
    from ..demo.report import format_table, plot, summarize

    settings = Settings(seeds=tuple(range(args.seeds)))
    if args.steps is not None:
        settings = Settings(seeds=settings.seeds, steps=args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = compare(settings, args.out / "work")
    summaries = summarize(runs)
    table = format_table(summaries)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "runs.json").write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    png = plot(summaries, args.out / "accuracy.png",
               f"EMLoC demo: {settings.model.name}, {len(settings.seeds)} seeds, {settings.steps} LoRA steps")
    print(table)
    print(f"\nwrote {args.out / 'table.md'}, {args.out / 'runs.json'} and {png}")
    return 0
