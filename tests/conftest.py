"""Test-wide setup: Triton runs in its interpreter without a GPU, fresh allocations are poisoned, and the
digest cache lives in a temporary directory.

TRITON_INTERPRET must be set before any Triton kernel is defined, hence at the top of conftest.
"""
import os

import pytest
import torch
import torch.utils._device

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `with torch.device("meta")` recognises factory functions from a table torch builds once; build it now, from
# the real torch.empty*, or a table built while poison_empty's wrappers are in place sends them to the CPU.
torch.utils._device._device_constructors()


def _poisoned(factory):
    """Wrap a torch allocator so floating-point results start as NaN: a kernel that leaves any
    element unwritten (or reads memory it never wrote) then fails its comparison."""

    def allocate(*args, **kwargs):
        out = factory(*args, **kwargs)
        if out.is_floating_point() and out.device.type != "meta":
            out.fill_(float("nan"))
        return out

    return allocate


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


@pytest.fixture(autouse=True, scope="session")
def content_hash_cache(tmp_path_factory):
    """Keep the cache of shard digests (emloc.files.cached_file_sha256) out of the user's home."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture
def seed():
    """A fresh, recorded seed per test: inputs are random but reproducible from the failure message."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value


@pytest.fixture
def torch_backend(monkeypatch):
    """Run the ops on the torch reference. For model-level tests: the Triton kernels are compared with the
    reference in their own tests, and in the CPU interpreter they would make model-level tests minutes long."""
    monkeypatch.setenv("EMLOC_BACKEND", "torch")
