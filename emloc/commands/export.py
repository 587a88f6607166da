"""``emloc export ADAPTER_DIR --model MODEL_DIR --out DIR [--merge]``: a PEFT adapter (and merged weights)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a corrected adapter for the original model",
        description="Write OUT/adapter, loadable with peft.PeftModel.from_pretrained(original, OUT/adapter), and with "
                    "--merge OUT/merged, the original checkpoint with the LoRA merged in, shard by shard.")
    parser.add_argument("adapter", help="corrected adapter directory (from `emloc correct`)")
    parser.add_argument("--model", required=True, help="original model directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--merge", action="store_true", help="also write merged safetensors shards")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export

    out = export(args.adapter, args.model, args.out, merge=args.merge)
    print(f"adapter -> {out / 'adapter'}" + (f"\nmerged  -> {out / 'merged'}" if args.merge else ""))
    return 0
