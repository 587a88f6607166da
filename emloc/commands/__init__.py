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
