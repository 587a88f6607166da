"""Shared test helpers: per-dtype tolerances in one place and a verbose comparison against float64."""
from __future__ import annotations

import torch

# Relative error bounds (Frobenius norm of the difference over the norm of the float64 reference) for a
# result computed from inputs of the given dtype with fp32 accumulation. fp16/bf16 are bounded by the
# rounding of the inputs and of the output cast (unit roundoff 2^-11 and 2^-8), times a small growth factor.
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Where the kernel tests run: natively on the GPU where there is one (as `make gpu-check` runs them), else on
# the CPU, the kernels in Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute error when expected is zero).

    Computed on ``expected``'s device: on a GPU a full-size layer's result is compared where it lies,
    without a copy of several GiB to the host."""
    return _relative(*_float64_pair(actual, expected))[0]


def _float64_pair(actual: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    expected = expected.detach().to(torch.float64)
    return actual.detach().to(device=expected.device, dtype=torch.float64), expected


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The relative error of two float64 tensors on one device, and their absolute difference."""
    diff = (actual - expected).abs()
    error = torch.linalg.vector_norm(diff).item()
    scale = torch.linalg.vector_norm(expected).item()
    return (error / scale if scale > 0 else error), diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 rtol: float | None = None, what: str = "result", magnitude: torch.Tensor | None = None) -> float:
    """Assert ``actual`` matches the float64 ``expected`` within the relative tolerance of ``dtype``.

    ``magnitude`` (optional, float64, shaped like ``expected``) is the same computation on the absolute
    values of its inputs: the sum of the magnitudes of the terms behind each element. Where the terms cancel
    (a single output element, say) no normwise relative bound holds for a correct kernel, so the result
    also passes when every element is within ``bound * magnitude`` of the reference: the componentwise
    bound of a rounded sum. Fails with the shape, the relative error, the bound, the worst element and NaN
    count, so a failure explains itself. Returns the relative error (tests may report it).
    """
    dtype = dtype or actual.dtype
    bound = rtol if rtol is not None else REL_TOL[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    nans = int(torch.isnan(actual.detach()).sum())
    assert nans == 0, f"{what}: {nans} NaN of {actual.numel()} elements (unwritten output?)"
    actual64, expected64 = _float64_pair(actual, expected)
    err, diff = _relative(actual64, expected64)
    componentwise = magnitude is not None and bool(
        (diff <= bound * magnitude.detach().to(device=diff.device, dtype=torch.float64)).all())
    if not (err <= bound or componentwise):
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
        raise AssertionError(
            f"{what} ({dtype}, shape {tuple(actual.shape)}): relative error {err:.3e} > {bound:.1e}"
            f"{'' if magnitude is None else ', and beyond the componentwise bound'}; "
            f"worst element {worst}: got {actual64.reshape(-1)[diff.argmax()].item():.6g}, "
            f"expected {expected64.reshape(-1)[diff.argmax()].item():.6g}"
        )
    return err


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout (every other column of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


def cli_error(capsys, argv: list[str]) -> str:
    """Run ``emloc argv`` expecting a user error: exit status 2 returned (a bad option too, not raised as
    SystemExit) and one line ``emloc COMMAND: ...`` on stderr, the last one (progress lines may come before
    it), no traceback. Returns that line."""
    from emloc import cli

    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit status {code}, stderr: {err}"
    lines = err.split("\n")
    messages = [line for line in lines if line.startswith(f"emloc {argv[0]}: ")]
    assert messages == lines[-1:] and "Traceback" not in err, err
    return messages[0]
