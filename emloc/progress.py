"""Progress of the long stages: a live bar on a terminal, one line per finished task anywhere else.

A tqdm bar redrawn into a redirected log leaves a line per refresh; there, :func:`progress` writes only
``block 3/30: 16 batches in 4.2 s`` once the task is done, and nothing for a task an error interrupted
(the error says where it stopped).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Collection, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class LineProgress:
    """The part of tqdm's interface the stages use, writing one line to ``stream`` when the task is closed
    (none with ``stream`` None)."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, stream: TextIO | None):
        self.total, self.desc, self.unit, self.initial, self.stream = total, desc, unit, initial, stream
        self.n = initial
        self.postfix: dict[str, object] = {}
        self._started = time.perf_counter()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values) -> None:
        """Values the closing line ends with (the last ones set), such as the last loss."""
        self.postfix = values

    def write(self, text: str) -> None:
        """A line of its own, as ``tqdm.write`` prints it above the bar."""
        if self.stream is not None:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the task with its line: what was done and how long it took (once, however often called)."""
        if not self._closed:
            self._closed = True
            self.write(self._summary(time.perf_counter() - self._started))

    def _summary(self, seconds: float) -> str:
        done = self.n - self.initial
        count = f"{done}" if self.total is None or self.n == self.total else f"{done}/{self.total - self.initial}"
        notes = [f"resumed at {self.initial}"] if self.initial else []
        notes += [f"{key}={value}" for key, value in self.postfix.items()]
        return f"{self.desc}: {count} {_plural(self.unit, done)} in {seconds:.1f} s" + (
            f" ({', '.join(notes)})" if notes else "")

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self._closed = True  # interrupted: the error, not a summary, is the last word


def _plural(unit: str, count: int) -> str:
    if count == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def progress(total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0,
             stream: TextIO | None = None) -> tqdm | LineProgress:
    """The progress of one task of ``total`` steps of ``unit``, ``initial`` of them already done.

    A tqdm bar when ``stream`` (standard error by default) is a terminal, else a :class:`LineProgress`
    writing one line as the task closes; with ``enabled`` False it writes nothing. Use it as a context
    manager, or call ``close()`` when the task is done.
    """
    stream = sys.stderr if stream is None else stream
    if enabled and getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream)
    return LineProgress(total, desc, unit, initial, stream if enabled else None)


def track(items: Collection[T], desc: str, unit: str, enabled: bool = True,
          stream: TextIO | None = None) -> Iterator[T]:
    """``items`` one by one, counted as the steps of a :func:`progress` task."""
    with progress(len(items), desc, unit, enabled, stream=stream) as bar:
        for item in items:
            yield item
            bar.update()


def close_bars() -> None:
    """End the bars still drawn on the terminal, so that a message printed next starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
