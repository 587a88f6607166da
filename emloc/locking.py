"""One writer per output directory: an exclusive lock held while a stage writes it.

Two builds into one directory would interleave their blocks, two runs would share checkpoint temp
directories; with the lock the second fails at once, naming the first. The lock is ``flock`` on
``.<name>.lock`` *beside* the directory, so that a directory swapped for a new one (export, adapters) keeps
its lock. The kernel drops a lock when its holder dies, SIGKILL included: a lock file a killed run leaves
behind holds nothing, and the next run takes it over. The file records the holder (pid, host, command line,
start time) for the message of a refused process.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from .errors import UserError

__all__ = ["LockError", "holds_output_lock", "output_lock"]

# Locks this process holds: (lock file, thread) -> depth. A stage that calls another stage on the same
# directory (the command line, then the API) takes the lock once; another thread contends like a process.
_held: dict[tuple[str, int], int] = {}


class LockError(UserError):
    """Another process (or thread) is writing the output directory."""


def _lock_path(directory: Path) -> Path:
    directory = directory.absolute()
    return directory.with_name(f".{directory.name}.lock")


def _unwritable(directory: Path, exc: OSError) -> UserError:
    return UserError(f"{directory}: cannot write the output there ({exc.strerror or exc})")


def check_output_dir(directory: Path) -> None:
    """Refuse an output path that is a file, and create its parent (the place of the lock file)."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: exists and is not a directory")
    try:
        _lock_path(directory).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(directory, exc) from None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0))
        return f"pid {info['pid']} on {info['host']}, since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"


def _acquire(lock: Path, directory: Path) -> int:
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _unwritable(directory, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockError(f"{directory}: another emloc process is writing it ({holder}); wait for it to "
                            "finish or choose another directory") from None
        try:  # the holder before us may have removed the file between our open and our flock
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


@contextlib.contextmanager
def output_lock(directory):
    """Hold the exclusive lock on output ``directory`` (which need not exist yet) for the ``with`` body.

    Raises :class:`LockError` naming the holder when another process or thread holds it, and
    :class:`~emloc.errors.UserError` when the path is a file or its parent cannot be written. Re-entrant
    within one thread."""
    directory = Path(directory)
    lock = _lock_path(directory)
    key = (str(lock), threading.get_ident())
    if key in _held:
        _held[key] += 1
        try:
            yield directory
        finally:
            _held[key] -= 1
        return
    check_output_dir(directory)
    fd = _acquire(lock, directory)
    _held[key] = 1
    try:
        yield directory
    finally:
        del _held[key]
        lock.unlink(missing_ok=True)  # before the lock goes: a process that opened it re-checks the inode
        os.close(fd)


def holds_output_lock(parameter: str):
    """Decorator: the function runs holding :func:`output_lock` on its argument named ``parameter``, from
    its first line (a second writer fails before any work) to its return."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            with output_lock(signature.bind(*args, **kwargs).arguments[parameter]):
                return function(*args, **kwargs)

        return locked

    return decorate
