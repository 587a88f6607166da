"""The kernel tests at real 7B and 32B layer shapes, taken from ``benchmarks/shapes.py``.

Every case carries the ``layer_shapes`` marker, which keeps it out of the default suite (pytest.ini): in the
CPU interpreter a single one would run for hours. ``make gpu-check`` runs them natively on a GPU
(``pytest -m "not slow"``), beside the default suite's own shapes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from shapes import (  # noqa: E402
    CALIBRATION_TOKENS,
    COVARIANCE_WIDTHS,
    LINEARS,
    LORA_RANK,
    TRAINING_TOKENS,
    emulator_rank,
)

MODELS = ("7B", "32B")


def _of_models(names) -> list[str]:
    return [name for name in names if name.split()[0] in MODELS]


def _case(values, name: str):
    return pytest.param(values, id=name.replace(" ", "-"), marks=pytest.mark.layer_shapes)


def covariance_cases() -> list:
    """``(tokens, width)``: one calibration micro-batch for every distinct input width, ids by layer."""
    return [_case((CALIBRATION_TOKENS, COVARIANCE_WIDTHS[name]), name) for name in _of_models(COVARIANCE_WIDTHS)]


def emulator_cases() -> list:
    """``(tokens, n, r, m, k)`` of one training micro-batch through every distinct linear, ids by layer."""
    return [_case((TRAINING_TOKENS, n, emulator_rank(m, n), m, LORA_RANK), name)
            for name in _of_models(LINEARS) for m, n in [LINEARS[name]]]


def scaled_matmul_cases() -> list:
    """``(m, k, n)`` of the factor products of every distinct linear: ``W S`` and ``v = R^T S^-1`` on the
    whitened route (``m >= n``), ``v = P_r^T W`` on the output route (``m < n``)."""
    cases = []
    for name in _of_models(LINEARS):
        m, n = LINEARS[name]
        r = emulator_rank(m, n)
        if m >= n:
            cases += [_case((m, n, n), f"{name} WS"), _case((r, n, n), f"{name} v")]
        else:
            cases.append(_case((r, m, n), f"{name} v"))
    return cases
