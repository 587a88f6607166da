"""The relative reconstruction error the factor functions report from their spectrum (``with_error=True``)
against ``||(W - u v) X^T|| / ||W X^T||`` computed from the returned factors and the activations in float64."""
from __future__ import annotations

import pytest
import torch

from emloc_kernels import projected_lowrank, whitened_lowrank, whitening

F64 = torch.float64


def _measured(w, u, v, x) -> float:
    return (torch.linalg.matrix_norm((w - u.to(F64) @ v.to(F64)) @ x.T) / torch.linalg.matrix_norm(w @ x.T)).item()


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("shape", [(45, 19), (19, 45)])
def test_reported_error_is_the_reconstruction_error(seed, method, dtype, tol, shape):
    m, n = shape
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, dtype=F64, generator=generator)
    # Non-contiguous activations with a decaying spectrum, so the error is well away from 0 and 1.
    x = (torch.randn(3 * n, 71, dtype=F64, generator=generator)[::3].T * torch.linspace(2, 0.1, n, dtype=F64))
    rank = min(m, n) // 3
    probes = torch.Generator().manual_seed(seed + 1)
    white = whitening((x.T @ x).to(dtype))
    out_cov = (x @ w.T).T @ (x @ w.T)
    for form, (u, v, error) in {
        "whitened": whitened_lowrank(w.to(dtype), white, rank, method, generator=probes, with_error=True),
        "projected": projected_lowrank(w.to(dtype), out_cov.to(dtype), rank, method, generator=probes,
                                       with_error=True),
    }.items():
        expected = _measured(w, u, v, x)
        assert 0.05 < expected < 1, f"{form}: degenerate case, error {expected}"
        assert error.shape == () and abs(error.item() / expected - 1) <= tol, (
            f"{form} {method} {dtype} seed={seed}: reported {error.item():.10g}, measured {expected:.10g}")


def test_without_error_two_factors_are_returned(seed):
    generator = torch.Generator().manual_seed(seed)
    w, x = torch.randn(9, 7, generator=generator), torch.randn(30, 7, generator=generator)
    assert len(whitened_lowrank(w, whitening(x.T @ x), 2)) == 2
    assert len(projected_lowrank(w, (x @ w.T).T @ (x @ w.T), 2)) == 2
