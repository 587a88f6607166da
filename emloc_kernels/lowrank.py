"""Activation-aware low-rank factors of a linear layer (DESIGN 1.2, 1.3, 1.3b).

Both forms give the minimiser of ``||(W - u v) X^T||_F`` over rank-r matrices (the whitened form exactly
while ``X^T X`` is nonsingular, to within the eigenvalue clamp otherwise):

* :func:`whitened_lowrank` works in input space: truncated SVD of ``W S`` where ``C = X^T X = S S^T``,
  taken from the ``n x n`` eigenproblem of ``(W S)^T W S``. Best when ``m > n``; the whitening is computed
  once per input group and shared by its linears.
* :func:`projected_lowrank` works in output space: ``u = P_r``, the top-r eigenvectors of the output
  covariance ``Y^T Y = W C W^T``, and ``v = P_r^T W``. Best when ``m <= n``; needs no inverse, no clamp.

``method="randomized"`` replaces the full SVD / eigendecomposition with a range finder (oversampling and
power iterations), ``O(m n r)`` instead of ``O(m n min(m, n))``. The GEMMs that carry a diagonal scaling or
a final cast go through :func:`emloc_kernels.ops.scaled_matmul`; the factorisations stay in torch.linalg.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from . import ops

Method = Literal["exact", "randomized"]
METHODS = ("exact", "randomized")


@dataclass(frozen=True)
class Whitening:
    """``S = basis @ diag(scale)`` with ``C = S S^T``; hence ``S^-1 = diag(1 / scale) @ basis^T``.

    ``basis (n, n)`` holds the eigenvectors of the covariance, ``scale (n,)`` the square roots of its
    (clamped) eigenvalues, both in the covariance's dtype (fp32 or fp64).
    """

    basis: Tensor
    scale: Tensor

    @property
    def features(self) -> int:
        """The number of input features ``n``."""
        return self.basis.shape[0]


def whitening(cov: Tensor, eps: float = 1e-7) -> Whitening:
    """Eigen-based whitening of an input covariance ``cov (n, n)`` (DESIGN 1.2).

    The eigendecomposition runs on ``cov / (trace / n)`` for conditioning; eigenvalues below ``eps`` (relative
    to that normalisation) are clamped up to it so that ``S`` is invertible, then scaled back.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"whitening: covariance must be square (n, n), got {tuple(cov.shape)}")
    if cov.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"whitening: covariance must be float32 or float64, got {cov.dtype}")
    if not eps > 0:
        raise ValueError(f"whitening: eps must be > 0 so that S is invertible, got {eps}")
    n = cov.shape[0]
    norm = torch.diagonal(cov).sum() / n
    if cov.device.type != "meta" and not bool(torch.isfinite(norm) & (norm > 0)):
        raise ValueError(f"whitening: covariance trace is {norm.item() * n}; it holds no calibration data")
    eigvals, basis = torch.linalg.eigh(cov / norm)
    scale = torch.sqrt(eigvals.clamp_min(eps) * norm)
    return Whitening(basis=basis, scale=scale)


def _check_args(fn: str, weight: Tensor, rank: int, method: str, oversample: int, power_iters: int) -> None:
    """Fail before any work with an error naming the function and the argument at fault."""
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"{fn}: weight must be a 2-D (out, in) float tensor, got {weight.dtype} {tuple(weight.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(weight.shape):
        raise ValueError(f"{fn}: rank must be an int in [1, {min(weight.shape)}] for weight {tuple(weight.shape)}, got {rank!r}")
    if method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {METHODS}, got {method!r}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"{fn}: oversample and power_iters must be >= 0, got {oversample} and {power_iters}")


def _range_finder(apply, apply_t, n: int, k: int, like: Tensor, power_iters: int, generator) -> Tensor:
    """Orthonormal basis (.., k) of the range of an operator on ``n``-vectors given by ``apply`` (z -> A z) and
    ``apply_t`` (z -> A^T z): ``k`` Gaussian probes in ``like``'s dtype and device, then power iterations
    (re-orthonormalised each step so small singular directions are not lost to rounding)."""
    probes = torch.randn(n, k, dtype=like.dtype, device=like.device, generator=generator)
    basis = torch.linalg.qr(apply(probes)).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(apply_t(basis)).Q
        basis = torch.linalg.qr(apply(basis)).Q
    return basis


def whitened_lowrank(
    weight: Tensor,
    whitening: Whitening,
    rank: int,
    method: Method = "exact",
    oversample: int = 16,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    with_error: bool = False,
) -> tuple[Tensor, ...]:
    """Input-space factors ``u (m, r)``, ``v (r, n)`` with ``u v`` the best rank-r approximation of ``weight``
    under the calibration covariance (DESIGN 1.3): ``W S = P diag(sigma) R^T``, ``u = P_r diag(sqrt sigma_r)``,
    ``v = diag(sqrt sigma_r) R_r^T S^-1``. Returned in the whitening's dtype (fp32 unless it is fp64).

    ``method="exact"`` takes ``R`` and ``sigma^2`` from the eigendecomposition of the ``n x n`` Gram matrix
    ``(W S)^T W S`` (``n <= m`` is where this form is used), and ``P_r diag(sigma_r) = W S R_r``.
    ``method="randomized"`` finds the range of ``W S`` from ``rank + oversample`` Gaussian probes refined by
    ``power_iters`` power iterations (``generator`` seeds the probes).

    With ``with_error`` a third value is returned: the relative reconstruction error
    ``||(W - u v) S|| / ||W S||`` (0-d, from the spectrum; ``S S^T`` is the clamped covariance).
    """
    _check_args("whitened_lowrank", weight, rank, method, oversample, power_iters)
    if weight.shape[1] != whitening.features or weight.device != whitening.basis.device:
        raise ValueError(
            f"whitened_lowrank: weight ({weight.shape[1]} input features, on {weight.device}) does not fit the "
            f"whitening ({whitening.features} features, on {whitening.basis.device})"
        )
    dtype = whitening.basis.dtype
    ws = ops.scaled_matmul(weight, whitening.basis, None, None, whitening.scale, dtype)  # W S, (m, n)
    if method == "exact":
        energies, right = torch.linalg.eigh(ws.T @ ws)  # sigma^2 ascending, R
        right_t = right[:, -rank:].flip(-1).T
        kept = energies[-rank:].flip(-1).clamp_min(0)
        residual, total = energies[:-rank].clamp_min(0).sum(), energies.clamp_min(0).sum()
        # sqrt(sigma) split evenly between u and v; the floor keeps a rank-deficient W S finite.
        floor = kept[0] * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
        root = kept.clamp_min(floor).sqrt().sqrt()
        u = ws @ (right_t.T / root)  # P_r diag(sigma_r) = W S R_r, rescaled to P_r diag(sqrt sigma_r)
    else:
        k = min(rank + oversample, *ws.shape)
        basis = _range_finder(lambda z: ws @ z, lambda z: ws.T @ z, ws.shape[1], k, ws, power_iters, generator)
        small_left, sigma, right_t = torch.linalg.svd(basis.T @ ws, full_matrices=False)
        total = torch.linalg.matrix_norm(ws).square()
        residual = total - sigma[:rank].square().sum()
        root = sigma[:rank].sqrt()
        right_t = right_t[:rank]
        u = ops.scaled_matmul(basis, small_left[:, :rank], None, None, root, dtype)
    # v = diag(root) R_r^T diag(1 / scale) Q^T: both scalings fused into one GEMM reading Q^T in place.
    v = ops.scaled_matmul(right_t, whitening.basis.T, root, 1.0 / whitening.scale, None, dtype)
    return (u, v, _relative_error(residual, total)) if with_error else (u, v)


def _relative_error(residual: Tensor, total: Tensor) -> Tensor:
    """``sqrt(residual / total)`` of two energies (0-d tensors), clamped at 0 against rounding."""
    return (residual.clamp_min(0) / total).sqrt()


def projected_lowrank(
    weight: Tensor,
    out_cov: Tensor,
    rank: int,
    method: Method = "exact",
    oversample: int = 16,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    with_error: bool = False,
) -> tuple[Tensor, ...]:
    """Output-space factors (DESIGN 1.3b): ``u = P_r`` (m, r), the top-r eigenvectors of ``out_cov = Y^T Y``
    (the layer's output covariance without bias, or ``W C W^T``), and ``v = P_r^T W`` (r, n). Returned in
    out_cov's dtype.

    Exact even when the covariance is singular (fewer calibration tokens than features): nothing is inverted.
    ``method="randomized"`` is a range finder on ``out_cov`` followed by Rayleigh-Ritz, as in
    :func:`whitened_lowrank`. With ``with_error`` a third value is returned: the relative reconstruction
    error ``||(W - u v) X^T|| / ||W X^T||`` (0-d, from the eigenvalues).
    """
    _check_args("projected_lowrank", weight, rank, method, oversample, power_iters)
    m = weight.shape[0]
    if out_cov.shape != (m, m) or out_cov.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"projected_lowrank: out_cov must be a float32/float64 ({m}, {m}) tensor for weight "
            f"{tuple(weight.shape)}, got {out_cov.dtype} {tuple(out_cov.shape)}"
        )
    if out_cov.device != weight.device:
        raise ValueError(f"projected_lowrank: out_cov is on {out_cov.device}, weight on {weight.device}")
    if method == "exact":
        energies, eigvecs = torch.linalg.eigh(out_cov)
        u = eigvecs[:, -rank:].flip(-1)
        residual, total = energies[:-rank].clamp_min(0).sum(), energies.clamp_min(0).sum()
    else:
        k = min(rank + oversample, m)
        basis = _range_finder(lambda z: out_cov @ z, lambda z: out_cov @ z, m, k, out_cov, power_iters, generator)
        energies, small = torch.linalg.eigh(basis.T @ out_cov @ basis)
        u = basis @ small[:, -rank:].flip(-1)
        total = torch.diagonal(out_cov).sum()
        residual = total - energies[-rank:].sum()
    v = ops.scaled_matmul(u.T, weight, None, None, None, out_cov.dtype)
    return (u, v, _relative_error(residual, total)) if with_error else (u, v)
