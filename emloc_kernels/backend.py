"""Which implementation an op runs: the Triton kernel or the plain torch reference.

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (the interpreter the tests
use on machines without a GPU). Everything else runs the reference. ``EMLOC_BACKEND=torch|triton``
overrides the choice; asking for Triton where it cannot run is an error rather than a silent fallback.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend() -> str | None:
    """The backend forced through ``EMLOC_BACKEND``, or None for automatic choice."""
    value = os.environ.get("EMLOC_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"EMLOC_BACKEND={value!r} is not one of {BACKENDS} (or 'auto')")
    return value


def device_problem(tensors: tuple[torch.Tensor, ...]) -> str | None:
    """Why no Triton kernel can run on the devices of ``tensors``, or None where one can: CUDA tensors, or CPU
    tensors under the interpreter. The dispatch and the launchers refuse with this one message."""
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return None
    if devices == {"cpu"} and triton_interpreted():
        return None
    if "meta" in devices:
        return "meta tensors have no data to run a kernel on"
    return (
        f"tensors live on {sorted(devices)}; Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"
    )


def _triton_unavailable_reason(tensors: tuple[torch.Tensor, ...]) -> str | None:
    if not triton_installed():
        return "the triton package is not installed"
    return device_problem(tensors)


def use_triton(op: str, *tensors: torch.Tensor | None) -> bool:
    """Decide whether ``op`` runs its Triton kernel on ``tensors`` (None entries are ignored).

    float64 inputs always take the reference: the kernels are written for fp32/fp16/bf16.
    """
    present = tuple(t for t in tensors if t is not None)
    forced = requested_backend()
    if forced == "torch":
        return False
    reason = _triton_unavailable_reason(present)
    if reason is None and any(t.is_floating_point() and t.dtype not in TRITON_DTYPES for t in present):
        reason = f"dtype {next(t.dtype for t in present if t.dtype not in TRITON_DTYPES)} has no Triton kernel"
    if forced == "triton" and reason is not None:
        raise RuntimeError(f"EMLOC_BACKEND=triton, but {op} cannot run its Triton kernel: {reason}")
    return reason is None
