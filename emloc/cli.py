"""The ``emloc`` command line: one sub-command per pipeline stage, each defined in ``emloc.commands``.

Exit status: 0 on success, 1 when ``emloc plan`` finds that nothing fits, :data:`emloc.errors.USER_ERROR` (2)
for bad input of any command (an option, a file, a model, the output directory, a full disk), printed as
one line ``emloc COMMAND: message`` without a traceback. :func:`main` is the one place that does so.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings

from .errors import USER_ERROR, EmlocWarning, UserError
from .progress import close_bars

# Each name is a module ``emloc.commands.<name>`` exposing ``add_parser(subparsers)``, which registers
# the sub-command and sets ``func(args) -> int`` as its default.
COMMANDS: tuple[str, ...] = ("build", "plan", "train", "correct", "export", "run", "demo")


class _UsageError(UserError):
    """A bad option or argument of the command line ``prog`` (``emloc`` or ``emloc build``, ...)."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """Hands a bad option to :func:`main` (``emloc build: argument --samples: ...``) instead of exiting."""

    def error(self, message: str):
        raise _UsageError(self.prog, message)


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


def describe(exc: Exception, args: argparse.Namespace | None) -> str:
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
    prefix, args = "emloc", None
    try:
        args, unknown = build_parser().parse_known_args(argv)
        prefix = f"emloc {args.command}"
        if unknown:  # named for the sub-command, whose --help lists what it takes
            raise _UsageError(prefix, f"unrecognized arguments: {' '.join(unknown)}")
        with _warnings_as_lines(prefix):
            return int(args.func(args) or 0)
    except (UserError, OSError) as exc:
        close_bars()  # the bars the error interrupted end first, so the message has a line of its own
        print(f"{exc.prog if isinstance(exc, _UsageError) else prefix}: {describe(exc, args)}", file=sys.stderr)
        return USER_ERROR


@contextlib.contextmanager
def _warnings_as_lines(prefix: str):
    """Print each :class:`EmlocWarning` as one line ``PREFIX: warning: message``; others as Python does."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, EmlocWarning):
            print(f"{prefix}: warning: {message}", file=sys.stderr)
        else:
            default_show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        default_show = warnings.showwarning
        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
