"""Keeping a long streaming job's host memory to what it holds live (glibc; a no-op elsewhere).

glibc serves a request from free heap space when some fits; otherwise one of at least its mmap threshold
gets a mapping of its own, returned to the OS on free. The threshold starts at 128 KiB and rises to the size
of each mapped buffer freed (up to 32 MiB), so after the first large free a build's block-sized transients
(MLP activations, eigenvectors, weight Grams) come from the heap and, once freed, stay resident among
buffers that live longer (covariances, factors), and the resident set grows with the number of blocks.
:func:`large_buffers_unmapped` around the whole build keeps it to the live tensors (docs/build.md has the
measurement).
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

__all__ = ["LARGE_BUFFER", "large_buffers_unmapped", "return_freed_memory"]

LARGE_BUFFER = 1 << 20
"""Allocations from this size up get a mapping of their own inside :func:`large_buffers_unmapped`."""

_M_MMAP_THRESHOLD = -3  # mallopt parameter, malloc.h
_DYNAMIC_THRESHOLD_MAX = 32 << 20  # where glibc's own rule leaves the threshold after a large free (64-bit)


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6") if sys.platform == "linux" else None
    except OSError:  # another C library (musl): nothing to tune
        return None


_LIBC = _glibc()


def return_freed_memory() -> None:
    """Hand the heap pages freed so far back to the OS (``malloc_trim``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def large_buffers_unmapped(threshold: int = LARGE_BUFFER) -> Iterator[None]:
    """Inside the block (or the decorated function), an allocation of at least ``threshold`` bytes that
    free heap space cannot serve is mapped on its own and goes back to the OS as soon as it is freed, so
    the resident set follows the live buffers. Enter it before the work that grows the heap: free heap space
    left from earlier still serves large buffers, and keeps them resident once freed.

    Costs a page fault per fresh page (docs/build.md: the CPU time it adds to a build). glibc cannot return to its
    dynamic threshold once one is set, so on exit the threshold is left at 32 MiB, the value that rule
    reaches after the first large buffer is freed.
    """
    if _LIBC is None or not _LIBC.mallopt(_M_MMAP_THRESHOLD, threshold):
        yield
        return
    try:
        yield
    finally:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_THRESHOLD_MAX)
