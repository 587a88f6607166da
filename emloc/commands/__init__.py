"""One module per ``emloc`` sub-command: argument parsing and printing only, the work lives in ``emloc``.

Commands raise :class:`emloc.errors.UserError` (or let an ``OSError`` through) for bad input; ``emloc.cli``
prints it as one line. Integer options are checked by the types below, so ``--samples 0`` is refused rather
than taken for a default.
"""
from __future__ import annotations

import argparse


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer of at least {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _integer(text, 1)


def natural_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _integer(text, 0)


def add_heal_arguments(parser: argparse.ArgumentParser) -> None:
    """The healing options shared by ``emloc build`` and ``emloc run`` (off by default; rank from
    :class:`HealConfig`)."""
    from ..healing import HealConfig

    d = HealConfig()
    group = parser.add_argument_group("healing (docs/design.md §1.7)")
    group.add_argument("--heal-steps", type=natural_int, default=0,
                       help=f"distillation steps healing the emulator before training (default 0: off; {d.steps} "
                            "is the tested setting)")
    group.add_argument("--heal-rank", type=positive_int, default=d.rank,
                       help="heal adapter rank per compressed linear, taken from its rank budget (default %(default)s)")
    group.add_argument("--damping", type=float, default=0.0,
                       help="factor against C + damping tr(C)/n I (default 0: the activation-aware optimum)")


def heal_config(args: argparse.Namespace):
    """The :class:`HealConfig` the parsed healing options describe, or None with ``--heal-steps 0``."""
    from ..healing import HealConfig

    return HealConfig(rank=args.heal_rank, steps=args.heal_steps) if args.heal_steps else None
