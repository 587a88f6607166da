"""What counts as bad input, and the checks of plain values that every stage and command shares.

Every error that a user can fix (an option, a file, a model, the output directory, a full disk) is a
:class:`UserError` whose message names the culprit; the command line prints it as one line and exits with
:data:`USER_ERROR`, the status argparse uses for a bad option. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import math

USER_ERROR = 2


class UserError(ValueError):
    """Bad input or a refused operation; the message names the option, file, module or directory at fault."""


class OutputError(UserError, OSError):
    """Writing an output failed (full disk, read-only file system, ...); the message names the file."""


class BuildError(UserError):
    """The build cannot go on; the message names the option, file, block or module at fault."""


class EmlocWarning(UserWarning):
    """Input that works but is likely to give a poor result; the command line prints it as one line."""


def check_int(value, name: str, minimum: int = 1, error: type[Exception] = UserError) -> int:
    """``value`` if it is an integer of at least ``minimum``, else ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(f"{name}: must be an integer of at least {minimum}, got {value!r}")
    return value


def check_float(value, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                error: type[Exception] = UserError) -> float:
    """``value`` as a float if it is a finite number in the interval from ``low`` to ``high`` (each end closed
    unless ``*_open``), else ``error`` naming ``name``. NaN is outside every interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise error(f"{name}: must be in {interval}, got {value!r}")
    return float(value)


def check_ratio(value, name: str, error: type[Exception] = UserError) -> float:
    """A compression ratio: the fraction of a linear's parameters kept, in (0, 1]."""
    try:
        return check_float(value, name, 0, 1, low_open=True, error=error)
    except error:
        raise error(f"{name}: compression ratio must be in (0, 1], got {value!r}") from None
