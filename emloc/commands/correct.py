"""``emloc correct MODEL_DIR EMULATOR_DIR ADAPTER_DIR --out DIR``: correct a LoRA trained on the emulator."""
from __future__ import annotations

import argparse

from .options import add_clamp_argument, clamp


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "correct", help="correct a LoRA trained on an emulator for the original model",
        description="LoRA correction (docs/design.md §1.10), one layer at a time from the shards: the corrected "
                    "adapter makes the original model do on the LoRA input space what the emulator did in training.")
    parser.add_argument("model", help="original model directory")
    parser.add_argument("emulator", help="emulator directory the adapter was trained on")
    parser.add_argument("adapter", help="trained adapter directory (OUT/adapter of `emloc train`)")
    parser.add_argument("--out", required=True, help="directory for the corrected adapter")
    add_clamp_argument(parser)
    parser.add_argument("--device", default="cpu", help="where the float64 correction runs (default cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..correction import correct_lora
    from ..locking import output_lock

    with output_lock(args.out):  # taken first: a second correction into --out fails before computing
        adapter = correct_lora(args.model, args.emulator, args.adapter, clamp(args), device=args.device)
        print(f"corrected {len(adapter.weights)} layers -> {adapter.save(args.out)}")
    return 0
