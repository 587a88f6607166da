"""Peak live bytes on one device, counted from tensor storages as the code that runs allocates them.

:class:`LiveBytesTracker` is a ``TorchDispatchMode``: every op's outputs on the tracked device are counted
once per storage (outputs that alias an input, views and in-place results, allocate nothing), and uncounted
when the storage dies (a finalizer on the storage object, which torch keeps alive as long as any tensor, view
or autograd saved variable holds the storage). Tensors made before the
tracker starts (parameters, inputs) are counted with :meth:`LiveBytesTracker.adopt`. It works the same on
meta tensors (a full-size dry run that allocates nothing) and on real ones.

Temporaries an op allocates and frees inside its own kernel are not seen (docs/memory.md compares the
count with the allocator's own peak). Library workspace that never becomes a tensor (the eigensolver's and the SVD's
scratch space) is added while its op runs, from :func:`linalg_workspace_bytes`, the one model of it the
analytic plan uses too.
"""
from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytesTracker", "eigh_workspace_bytes", "linalg_workspace_bytes", "svd_workspace_bytes"]


def eigh_workspace_bytes(n: int, itemsize: int = 4) -> int:
    """Scratch of a symmetric ``n x n`` eigendecomposition (divide and conquer, cuSOLVER ``syevd``):
    about ``2 n^2`` values besides the output."""
    return 2 * n * n * itemsize


def svd_workspace_bytes(m: int, n: int, itemsize: int = 4) -> int:
    """Scratch of a thin SVD of an ``m x n`` matrix (``gesvd``): a working copy of the matrix."""
    return m * n * itemsize


def linalg_workspace_bytes(func, args) -> int:
    """Workspace bytes the library allocates internally for ``func`` (0 for every op but eigh and SVD)."""
    packet = getattr(func, "overloadpacket", None)
    if packet is torch.ops.aten._linalg_eigh:
        a = args[0]
        return eigh_workspace_bytes(a.shape[-1], a.element_size())
    if packet is torch.ops.aten._linalg_svd:
        a = args[0]
        return svd_workspace_bytes(a.shape[-2], a.shape[-1], a.element_size())
    return 0


class LiveBytesTracker(TorchDispatchMode):
    """Counts live storage bytes on ``device`` and their peak, optionally per phase.

    Usage::

        with LiveBytesTracker("meta") as tracker:
            tracker.adopt(model.parameters())
            with tracker.phase("forward"):
                loss = model(x)
        tracker.peak, tracker.phase_peaks["forward"]
    """

    def __init__(self, device: str | torch.device = "meta") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.live = 0
        self.peak = 0
        self.phase_peaks: dict[str, int] = defaultdict(int)
        self._phases: list[str] = []
        self._storages: dict[int, int] = {}

    def _on_device(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.device.type == self.device.type

    def _raise_peak(self, value: int) -> None:
        self.peak = max(self.peak, value)
        for name in self._phases:
            self.phase_peaks[name] = max(self.phase_peaks[name], value)

    def _free(self, key: int, nbytes: int) -> None:
        if self._storages.pop(key, None) is not None:
            self.live -= nbytes

    def count(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage if it is on the device and not yet counted."""
        if not self._on_device(tensor):
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._storages:
            return
        nbytes = storage.nbytes()
        self._storages[key] = nbytes
        self.live += nbytes
        self._raise_peak(self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def adopt(self, tensors) -> LiveBytesTracker:
        """Count tensors that exist already (parameters, buffers, inputs)."""
        for tensor in tensors:
            self.count(tensor)
        return self

    def phase(self, name: str):
        """Context manager: also record the peak reached while inside it under ``phase_peaks[name]``."""
        tracker = self

        class _Phase:
            def __enter__(self):
                tracker._phases.append(name)
                tracker.phase_peaks[name] = max(tracker.phase_peaks[name], tracker.live)

            def __exit__(self, *exc):
                tracker._phases.remove(name)

        return _Phase()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: that memory was not allocated by this op
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if self._on_device(t)}
        for tensor in tree_flatten(out)[0]:
            if self._on_device(tensor) and tensor.untyped_storage()._cdata not in inputs:
                self.count(tensor)
        workspace = linalg_workspace_bytes(func, args)
        if workspace and any(self._on_device(a) for a in tree_flatten(args)[0]):
            self._raise_peak(self.live + workspace)
        return out
