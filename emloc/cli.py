"""The ``emloc`` command line: one sub-command per pipeline stage, each defined in ``emloc.commands``.

Exit status: 0 on success, 1 when ``emloc plan`` finds that nothing fits, :data:`emloc.errors.USER_ERROR` (2)
for bad input of any command (an option, a file, a model, the output directory, a full disk), printed as
one line ``emloc COMMAND: message`` without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from tqdm.auto import tqdm

from .errors import USER_ERROR, EmlocWarning, UserError

# Each name is a module ``emloc.commands.<name>`` exposing ``add_parser(subparsers)``, which registers
# the sub-command and sets ``func(args) -> int`` as its default.
COMMANDS: tuple[str, ...] = ("build", "plan", "train", "correct", "export", "run", "demo")


class _Parser(argparse.ArgumentParser):
    """A bad option is one line too (``emloc build: argument --samples: ...``), with the same exit status."""

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="emloc",
        description="Fine-tune a model far larger than your GPU: build an emulator, train LoRA on it, "
        "correct the LoRA and export it for the original model.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"emloc.commands.{name}").add_parser(subparsers)
    return parser


def describe(exc: Exception, args: argparse.Namespace) -> str:
    """One line for a user error: its message, or for an operating-system error the file and the reason
    (the output directory when the system names no file, as a failed write does)."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.errno is not None:
        if exc.filename is not None:
            text = f"{exc.filename}: {exc.strerror}"
        else:
            where = getattr(args, "out", None)
            text = f"{exc.strerror}" + (f" (writing under {where})" if where else "")
    else:
        text = str(exc)
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"emloc {args.command}"

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, EmlocWarning):
            print(f"{prefix}: warning: {message}", file=sys.stderr)
        else:
            default_show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        default_show = warnings.showwarning
        warnings.showwarning = show
        try:
            return int(args.func(args) or 0)
        except (UserError, OSError) as exc:
            for bar in list(getattr(tqdm, "_instances", ())):  # end the bars the error interrupted, then the message
                bar.close()
            print(f"{prefix}: {describe(exc, args)}", file=sys.stderr)
            return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
