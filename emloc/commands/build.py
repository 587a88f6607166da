"""``emloc build``: compress a checkpoint into an emulator directory, block by block."""
from __future__ import annotations

import json
from pathlib import Path

from ..build import REPORT, build_emulator
from ..errors import UserError
from ..files import read_json
from ..pipeline import DEFAULT_RATIO, plan_for_budget
from ..training import TrainConfig
from .options import (
    add_batch_argument,
    add_device_argument,
    add_dtype_argument,
    add_heal_arguments,
    add_lora_rank_argument,
    add_samples_argument,
    add_svd_argument,
    add_vision_ratio_argument,
    heal_config,
    positive_int,
)

CALIBRATION_BATCH = 4  # build_emulator's batch_size


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "build", help="build the emulator of a model from calibration data",
        description="Build the emulator of MODEL_DIR (a transformers causal LM saved as safetensors with its "
        "tokenizer) one block at a time, and write it to --out.",
    )
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    parser.add_argument("--data", type=Path, required=True, metavar="FILE",
                        help="calibration data: JSONL with text, messages or conversations, or .txt")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="emulator directory to write")
    ratio = parser.add_mutually_exclusive_group()
    ratio.add_argument("--ratio", type=float, default=None, metavar="R",
                       help="fraction of each linear's parameters kept, in (0, 1] (default 0.4; with --budget the "
                            "largest that fits)")
    ratio.add_argument("--compress", type=Path, metavar="CONFIG.json",
                       help="JSON object {regex over module names: ratio}; first match wins")
    add_vision_ratio_argument(parser)
    add_samples_argument(parser)
    parser.add_argument("--max-length", type=positive_int, default=2048, help="tokens per sample (default 2048)")
    batch = parser.add_mutually_exclusive_group()
    # No default value: --budget conflicts with --batch whenever it is given, even at the default.
    add_batch_argument(batch, f"samples per calibration batch (default {CALIBRATION_BATCH})")
    batch.add_argument("--budget", default=None, metavar="SIZE",
                       help="device memory to fit (24GiB, 20GB, ...): the ratio (unless given) and the calibration "
                            "batch follow the memory plan, for training with the defaults of `emloc train` after")
    add_lora_rank_argument(parser, "with --budget: the LoRA rank the plan leaves room for")
    add_device_argument(parser)
    add_dtype_argument(parser)
    add_svd_argument(parser)
    parser.add_argument("--propagate", choices=("original", "emulator"), default="original",
                        help="feed each block the original activations or the compressed blocks' outputs")
    parser.add_argument("--seed", type=int, default=0, help="seed drawing the calibration samples")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="rebuild every block even if an interrupted build with the same settings exists")
    parser.add_argument("--overwrite", action="store_true", help="replace a directory built with other settings")
    add_heal_arguments(parser)
    parser.set_defaults(func=run)


def _compression(args) -> float | dict[str, float]:
    if args.compress is None:
        return DEFAULT_RATIO if args.ratio is None else args.ratio
    config = read_json(args.compress)
    if not isinstance(config, dict):
        raise UserError(f"--compress {args.compress}: expected a JSON object {{regex: ratio}}")
    return config


def summary(report: dict) -> str:
    """The build report as text: parameters before and after, then rank and error per module."""
    before, after = report["parameters_before"], report["parameters_after"]
    lines = [f"parameters: {before:,} -> {after:,} ({after / before:.1%})",
             f"{'module':<48} {'rank':>6} {'route':>7} {'rel. error':>10}"]
    for name, info in report["modules"].items():
        lines.append(f"{name:<48} {info['rank']:>6} {info['form']:>7} {info['error']:>10.4f}")
    return "\n".join(lines)


def _planned(args) -> dict:
    """Arguments of the build from the memory plan within ``--budget`` (the ratio unless given)."""
    ratio = _compression(args) if args.ratio is not None or args.compress else None
    heal = heal_config(args)
    training = TrainConfig(max_length=args.max_length, lora_r=args.lora_r)
    followed = plan_for_budget(args.model_dir, args.budget, training, ratio, args.samples, args.svd, args.dtype,
                               heal.rank if heal is not None else 0, args.vision_ratio)
    print(followed.table())
    return followed.build_kwargs()


def run(args) -> int:
    build_args = {"compression": _compression(args), "vision_compression": args.vision_ratio,
                  "max_samples": args.samples, "max_length": args.max_length,
                  "batch_size": CALIBRATION_BATCH if args.batch is None else args.batch, "svd": args.svd}
    if args.budget is not None:
        build_args = _planned(args)
    out = build_emulator(args.model_dir, args.data, args.out, device=args.device, dtype=args.dtype,
                         propagate=args.propagate, resume=args.resume, overwrite=args.overwrite, seed=args.seed,
                         heal=heal_config(args), damping=args.damping, **build_args)
    print(summary(json.loads((out / REPORT).read_text())))
    print(f"emulator written to {out} (report: {out / REPORT})")
    return 0
