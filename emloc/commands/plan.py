"""``emloc plan MODEL_OR_CONFIG --budget 24GiB``: per-stage device and host memory, the largest compression
ratio that fits, and optionally a dry run of the pipeline at full size on meta tensors to check it."""
from __future__ import annotations

import argparse
import json

from ..memory import plan, reference_configs
from ..memory.planner import DEFAULT_HEAL_RANK
from .options import (
    add_batch_argument,
    add_lora_rank_argument,
    add_refreshes_argument,
    add_samples_argument,
    add_svd_argument,
    natural_int,
    positive_int,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="plan the memory of every stage and the compression ratio that fits a budget",
        description="Memory of building the emulator, training LoRA on it (and refreshing it), correcting and "
                    "exporting it, per stage and term, from a config alone. Without --ratio / --emulator-params, "
                    f"picks the largest ratio that fits. Shipped configs: {', '.join(reference_configs())}.")
    parser.add_argument("model", help="model directory, config.json, or the name of a shipped config")
    parser.add_argument("--budget", default="24GiB", help="device memory per stage (24GiB, 20GB, ...; default 24GiB)")
    parser.add_argument("--seq-len", type=positive_int, default=2048, help="training sequence length (default 2048)")
    add_batch_argument(parser, "training micro-batch (default %(default)s)", default=1)
    add_lora_rank_argument(parser, "LoRA rank on every decoder linear")
    add_samples_argument(parser)
    parser.add_argument("--heal-rank", type=natural_int, default=DEFAULT_HEAL_RANK,
                        help="heal adapter rank when the build heals (`--heal-steps`; default 0: it does not)")
    add_refreshes_argument(parser)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float, help="plan this compression ratio instead of searching")
    target.add_argument("--emulator-params", help="plan the smallest ratio giving this many parameters (e.g. 5B)")
    parser.add_argument("--vision", choices=("compress", "dense"), default="compress",
                        help="compress a vision tower or keep it dense (frozen either way; default compress)")
    add_svd_argument(parser)
    parser.add_argument("--embeddings-on-device", action="store_true",
                        help="keep the input embedding on the device in training (default: on the host)")
    parser.add_argument("--dry-run", action="store_true",
                        help="also run the pipeline's code at full size on meta tensors and compare per stage")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = plan(args.model, args.budget, args.seq_len, args.batch, args.lora_r, args.samples, ratio=args.ratio,
                  emulator_params=args.emulator_params, vision=args.vision, svd=args.svd,
                  embeddings_on_device=args.embeddings_on_device, heal_rank=args.heal_rank, refreshes=args.refreshes)
    checked = None
    if args.dry_run:
        from ..memory.dry_run import verify

        checked = verify(result)
    if args.json:
        out = result.to_dict()
        if checked is not None:
            out["dry_run"] = {name: {"planned_bytes": p, "measured_bytes": m} for name, (p, m) in checked.items()}
        print(json.dumps(out, indent=2))
    else:
        print(result.table())
        if checked is not None:
            print("\ndry run (meta device, the pipeline's code)   planned GiB   measured GiB   difference")
            for name, (planned, measured) in checked.items():
                print(f"  {name:<42}{planned / 2**30:12.2f}{measured / 2**30:15.2f}"
                      f"{(planned - measured) / measured:12.1%}")
    return 0 if result.fits else 1
