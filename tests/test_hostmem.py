"""emloc.hostmem on glibc: inside large_buffers_unmapped, freed large buffers leave the resident set.

Each case runs in a fresh interpreter: glibc serves a request from free heap space before it maps
anything, so the heap a long test session leaves behind would hide the effect.
"""
import subprocess
import sys

import pytest

from emloc import hostmem

pytestmark = pytest.mark.skipif(hostmem._LIBC is None, reason="needs glibc (Linux)")

PROBE = """
import sys
from pathlib import Path
import torch
from emloc import hostmem

def anonymous_rss():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024

def returned_after_free(count=12, size=4 << 20):
    # large buffers, each followed by a small one that stays alive and pins the heap the way a block's
    # covariances and factors do; the fraction of the large ones' bytes that leaves the resident set on free
    large, pinned = [], []
    for _ in range(count):
        large.append(torch.ones(size // 4))
        pinned.append(torch.ones(3 << 16))  # 768 KiB: below the threshold, too large for old heap fragments
    before = anonymous_rss()
    del large
    return (before - anonymous_rss()) / (count * size)

torch.ones(4 << 20)  # a 16 MiB mapped buffer freed: glibc's own rule now keeps the 4 MiB ones on the heap
fail = sys.argv[1] == "raise"
try:
    with hostmem.large_buffers_unmapped():
        inside = returned_after_free()
        if fail:
            raise KeyError("inside")
except KeyError:
    pass
print(inside, returned_after_free())
"""


@pytest.mark.parametrize("exit", ["normal", "raise"])
def test_freed_large_buffers_leave_the_resident_set_only_inside_the_block(exit):
    done = subprocess.run([sys.executable, "-c", PROBE, exit], capture_output=True, text=True, check=True)
    inside, after = map(float, done.stdout.split())
    assert inside > 0.9, f"inside the block only {inside:.0%} of the freed bytes left the resident set"
    assert after < 0.5, f"after the block {after:.0%} still left: the threshold was not put back"
