"""``emloc run MODEL_DIR --data FILE --out DIR [--ratio R]``: build, train, correct and export in one go."""
from __future__ import annotations

import argparse

from .options import (
    add_clamp_argument,
    add_heal_arguments,
    add_samples_argument,
    add_svd_argument,
    add_vision_ratio_argument,
    clamp,
    heal_config,
)
from .train import add_training_arguments, train_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="build the emulator, train LoRA, correct and export it",
        description="The whole EMLoC path. Each stage writes under --out and a rerun resumes at the first unfinished "
                    "one; a summary (sizes, losses, eval accuracy of the original before and after) ends the run.")
    parser.add_argument("model", help="original model directory (safetensors + tokenizer)")
    parser.add_argument("--data", required=True, help="training data; calibration samples are drawn from it too")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--ratio", type=float, default=None,
                        help="compression ratio of the emulator (default 0.4; with --budget the largest that fits)")
    add_vision_ratio_argument(parser)
    parser.add_argument("--budget", default=None, metavar="SIZE",
                        help="device memory to fit (24GiB, 20GB, ...): build and training follow the memory plan")
    add_samples_argument(parser)
    add_svd_argument(parser)
    parser.add_argument("--correction", choices=("none", "paper"), default="none",
                        help="export the adapter as trained on the (healed) emulator, or after the paper's "
                             "correction (default none: it transfers better, docs/design.md §1.10)")
    add_clamp_argument(parser)
    parser.add_argument("--merge", action="store_true", help="also write the merged checkpoint")
    parser.add_argument("--no-eval", action="store_true", help="skip evaluating the original model")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --out that holds a run with other settings")
    add_heal_arguments(parser)
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipeline import run as run_pipeline

    summary = run_pipeline(args.model, args.data, args.out, args.ratio, vision_ratio=args.vision_ratio,
                           train_config=train_config(args, None),
                           clamp=clamp(args), correction=args.correction, heal=heal_config(args),
                           damping=args.damping, merge=args.merge, device=args.device,
                           dtype=args.dtype, max_samples=args.samples, svd=args.svd,
                           evaluate_original=not args.no_eval, budget=args.budget, overwrite=args.overwrite)
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """The summary as a few lines of text for the command line."""
    params, size, trained = summary["parameters"], summary["bytes"], summary["train"]
    lines = [
        f"parameters   original {params['original']:,}  emulator {params['emulator']:,} "
        f"({params['emulator'] / params['original']:.1%})",
        f"weights      original {size['original'] / 2**20:.1f} MiB  emulator {size['emulator'] / 2**20:.1f} MiB",
        f"training     {trained['steps']} steps, loss {trained['first_loss']:.4f} -> {trained['last_loss']:.4f}"
        + (f", emulator eval loss {trained['eval_loss']:.4f}" if "eval_loss" in trained else ""),
    ]
    for label, metrics in summary.get("original_eval", {}).items():
        accuracy = metrics.get("eval_exact_match")
        lines.append(f"original {label:<12} eval loss {metrics['eval_loss']:.4f}"
                     + (f", exact match {accuracy:.1%}" if accuracy is not None else ""))
    if "memory_plan" in summary:
        followed = summary["memory_plan"]
        s = followed["settings"]
        peaks = ", ".join(f"{name} {peak / 2**30:.2f}" for name, peak in followed["device_peak_bytes"].items())
        lines.append(f"memory plan  budget {followed['budget_bytes'] / 2**30:.2f} GiB, ratio {followed['ratio']:.3f}, "
                     f"peak GiB {peaks}; calibration micro-batch {s['calibration_micro_batch']}, LM-head chunk "
                     f"{s['lm_head_chunk']}, embedding on {'device' if s['embeddings_on_device'] else 'host'}")
    lines += [f"{name:<12} {path}" for name, path in summary["outputs"].items()]
    return "\n".join(lines)
