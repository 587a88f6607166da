"""Activation-aware low-rank factors of a linear layer (docs/design.md §1.2-1.4).

Both forms give the minimiser of ``||(W - u v) X^T||_F`` over rank-r matrices (the whitened form exactly
while ``X^T X`` is nonsingular, to within the eigenvalue clamp otherwise):

* :func:`whitened_lowrank` works in input space: truncated SVD of ``W S`` where ``C = X^T X = S S^T``,
  taken from the ``n x n`` eigenproblem of ``(W S)^T W S``. Best when ``m > n``; the whitening is computed
  once per input group and shared by its linears.
* :func:`projected_lowrank` works in output space: ``u = P_r``, the top-r eigenvectors of the output
  covariance ``Y^T Y = W C W^T``, and ``v = P_r^T W``. Best when ``m <= n``; needs no inverse, no clamp.

``method="randomized"`` replaces the eigendecomposition of the ``k x k`` symmetric matrix (Gram or output
covariance) with a range finder (oversampling and power iterations), ``O(k^2 r)`` instead of ``O(k^3)``. The
GEMMs that carry a diagonal scaling or a final cast go through :func:`emloc_kernels.ops.scaled_matmul`; the
factorisations stay in torch.linalg.
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
    """Eigen-based whitening of an input covariance ``cov (n, n)`` (docs/design.md §1.2).

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
        raise ValueError(f"{fn}: rank must be an int in [1, {min(weight.shape)}] for weight {tuple(weight.shape)}, "
                         f"got {rank!r}")
    if method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {METHODS}, got {method!r}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"{fn}: oversample and power_iters must be >= 0, got {oversample} and {power_iters}")


def _range_finder(sym: Tensor, k: int, power_iters: int, generator) -> Tensor:
    """Orthonormal basis (n, k) of the dominant range of a symmetric ``sym (n, n)``: ``k`` Gaussian probes in
    its dtype and device, then ``power_iters`` power iterations of ``sym^2`` (re-orthonormalised after each
    product so small directions are not lost to rounding)."""
    probes = torch.randn(sym.shape[0], k, dtype=sym.dtype, device=sym.device, generator=generator)
    basis = torch.linalg.qr(sym @ probes).Q
    for _ in range(2 * power_iters):
        basis = torch.linalg.qr(sym @ basis).Q
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
    under the calibration covariance (docs/design.md §1.3): ``W S = P diag(sigma) R^T``, ``u = P_r diag(sqrt sigma_r)``,
    ``v = diag(sqrt sigma_r) R_r^T S^-1``. Returned in the whitening's dtype (fp32 unless it is fp64).

    ``method="exact"`` takes ``R`` and ``sigma^2`` from the eigendecomposition of the ``n x n`` Gram matrix
    ``(W S)^T W S``, formed as ``S^T (W^T W) S`` (``n <= m`` is where this form is used), and
    ``P_r diag(sigma_r) = W (S R_r)``; the ``m x n`` product ``W S`` is never materialised.
    ``method="randomized"`` replaces that eigendecomposition with a range finder on the Gram matrix from
    ``rank + oversample`` Gaussian probes refined by ``power_iters`` power iterations (``generator`` seeds
    the probes), then Rayleigh-Ritz.

    With ``with_error`` a third value is returned: the relative reconstruction error
    ``||(W - u v) S|| / ||W S||`` (0-d, from the spectrum; ``S S^T`` is the clamped covariance).
    """
    _check_args("whitened_lowrank", weight, rank, method, oversample, power_iters)
    if weight.shape[1] != whitening.features or weight.device != whitening.basis.device:
        raise ValueError(
            f"whitened_lowrank: weight ({weight.shape[1]} input features, on {weight.device}) does not fit the "
            f"whitening ({whitening.features} features, on {whitening.basis.device})"
        )
    dtype, basis, scale = whitening.basis.dtype, whitening.basis, whitening.scale
    # (W S)^T W S = diag(s) Q^T (W^T W) Q diag(s): from the symmetric n x n W^T W, never the m x n W S
    weight_gram = torch.zeros(whitening.features, whitening.features, dtype=dtype, device=weight.device)
    ops.covariance_update(weight_gram, weight, None)
    gram = ops.scaled_matmul(basis.T, weight_gram @ basis, scale, None, scale, dtype)
    del weight_gram
    kept, right, error = _top_eigen(gram, rank, method, oversample, power_iters, generator)  # sigma^2, R
    # sqrt(sigma) split evenly between u and v; the floor keeps a rank-deficient W S finite.
    root = kept.clamp_min(kept[0] * torch.finfo(dtype).eps + torch.finfo(dtype).tiny).sqrt().sqrt()
    # u = W S R_r diag(1 / root) = P_r diag(sqrt sigma_r): S R_r first (n, r), then one GEMM with W
    u = ops.scaled_matmul(weight, ops.scaled_matmul(basis, right, None, scale, 1.0 / root, dtype),
                          None, None, None, dtype)
    # v = diag(root) R_r^T diag(1 / scale) Q^T: both scalings fused into one GEMM reading Q^T in place.
    v = ops.scaled_matmul(right.T, basis.T, root, 1.0 / scale, None, dtype)
    return (u, v, error) if with_error else (u, v)


def _top_eigen(sym: Tensor, rank: int, method: Method, oversample: int, power_iters: int,
               generator) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``rank`` eigenvalues (descending, clamped at 0) and eigenvectors ``(n, rank)`` of a symmetric
    positive semi-definite ``sym (n, n)``, and ``sqrt(energy outside them / trace)``. ``method="randomized"``
    is a range finder on ``sym`` followed by Rayleigh-Ritz."""
    if method == "exact":
        energies, vectors = torch.linalg.eigh(sym)
        residual, total = energies[:-rank].clamp_min(0).sum(), energies.clamp_min(0).sum()
    else:
        k = min(rank + oversample, sym.shape[0])
        basis = _range_finder(sym, k, power_iters, generator)
        energies, small = torch.linalg.eigh(basis.T @ sym @ basis)
        vectors = basis @ small[:, -rank:]
        total = torch.diagonal(sym).sum()
        residual = total - energies[-rank:].sum()
    return energies[-rank:].flip(-1).clamp_min(0), vectors[:, -rank:].flip(-1), _relative_error(residual, total)


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
    """Output-space factors (docs/design.md §1.4): ``u = P_r`` (m, r), the top-r eigenvectors of ``out_cov = Y^T Y``
    (the layer's output covariance without bias, or ``W C W^T``), and ``v = P_r^T W`` (r, n). Returned in
    out_cov's dtype.

    Exact even when the covariance is singular (fewer calibration tokens than features): nothing is inverted.
    ``method="randomized"`` is a range finder on ``out_cov`` followed by Rayleigh-Ritz. With ``with_error`` a
    third value is returned: the relative reconstruction error ``||(W - u v) X^T|| / ||W X^T||`` (0-d, from the
    eigenvalues).
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
    _, u, error = _top_eigen(out_cov, rank, method, oversample, power_iters, generator)
    v = ops.scaled_matmul(u.T, weight, None, None, None, out_cov.dtype)
    return (u, v, error) if with_error else (u, v)
