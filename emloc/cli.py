"""The ``emloc`` command line: one sub-command per pipeline stage, each defined in ``emloc.commands``."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each name is a module ``emloc.commands.<name>`` exposing ``add_parser(subparsers)``, which registers
# the sub-command and sets ``func(args) -> int`` as its default.
COMMANDS: tuple[str, ...] = ("build", "plan", "train", "correct", "export", "run", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emloc",
        description="Fine-tune a model far larger than your GPU: build an emulator, train LoRA on it, "
        "correct the LoRA and export it for the original model.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"emloc.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
