"""Bytes moved and FLOPs of emloc's fused kernels against the naive torch baseline, at 7B / 8B / 32B shapes.

Run ``python benchmarks/kernel_cost.py``. Counts are derived from the shapes, no GPU needed.

Traffic model, the same for both sides: every kernel launch reads each operand and writes each result
once (re-reads of tiles served from L2 / shared memory are not counted); activations and weights are bf16,
covariances, whitening and factor intermediates fp32. FLOPs count a multiply-add as two. Eigen- and
singular-value decompositions are counted in FLOPs only (Golub & Van Loan's operation counts), their
traffic depending on the solver.
"""
from __future__ import annotations

from dataclasses import dataclass

from shapes import (
    CALIBRATION_SAMPLES,
    CALIBRATION_TOKENS,
    LINEARS,
    LORA_RANK,
    MODELS,
    RATIO,
    SEQUENCE,
    TRAINING_TOKENS,
    emulator_rank,
)

HALF, FP32 = 2, 4  # bytes per element
COV_BLOCK = 128  # covariance tile of 16-bit inputs (emloc_kernels/triton/covariance.py)
OVERSAMPLE, POWER_ITERS = 16, 2  # randomized range finder defaults
CALIBRATION_TOTAL = CALIBRATION_SAMPLES * SEQUENCE


@dataclass(frozen=True)
class Cost:
    bytes: float
    flops: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.flops + other.flops)

    def __mul__(self, times: float) -> Cost:
        return Cost(self.bytes * times, self.flops * times)


NONE = Cost(0, 0)


# --- covariance ----------------------------------------------------------------------------------------


def covariance_fused(n: int, T: int) -> Cost:
    tiles = -(-n // COV_BLOCK)
    pairs = tiles * (tiles + 1) // 2
    return Cost(
        2 * HALF * T * n + T + 2 * FP32 * n * n,  # x streamed as both dot operands, the mask, cov read + written
        pairs * 2 * COV_BLOCK**2 * T,  # upper-triangular tiles only
    )


def covariance_naive(n: int, T: int) -> Cost:
    gather = Cost(HALF * T * n + T + HALF * T * n, 0)  # x[mask]: read x and the mask, write the selection
    cast = Cost(HALF * T * n + FP32 * T * n, 0)  # .float(): read bf16, write an fp32 copy
    gemm = Cost(2 * FP32 * T * n + 2 * FP32 * n * n, 2 * T * n * n)  # addmm_: both operands, cov read + written
    return gather + cast + gemm


def calibration_covariance(n: int, fused: bool) -> Cost:
    """One covariance of width ``n`` over the whole calibration set, in micro-batches."""
    calls = CALIBRATION_TOTAL // CALIBRATION_TOKENS
    return (covariance_fused if fused else covariance_naive)(n, CALIBRATION_TOKENS) * calls


def layer_covariances(model: str, fused: bool) -> Cost:
    """Every covariance one decoder layer needs. Naive: one input covariance per linear. emloc: one per input
    group for the whitened linears (m >= n) and an output covariance for each m < n linear (docs/design.md §1.4)."""
    linears = MODELS[model].values()
    if not fused:
        return sum((calibration_covariance(n, False) for _, n, _ in linears), NONE)
    groups = {group: n for m, n, group in linears if m >= n}
    outputs = [m for m, n, _ in linears if m < n]
    return sum((calibration_covariance(width, True) for width in [*groups.values(), *outputs]), NONE)


# --- low-rank factors ----------------------------------------------------------------------------------


def eigh_flops(n: int) -> float:
    return 9 * n**3  # symmetric QR with eigenvectors


def svd_flops(m: int, n: int) -> float:
    big, small = max(m, n), min(m, n)
    return 6 * big * small**2 + 20 * small**3  # R-SVD, thin factors on both sides


def qr_flops(m: int, k: int) -> float:
    return 4 * m * k * k  # Householder QR with the explicit thin Q


def weight_times_whitening(m: int, n: int, fused: bool) -> Cost:
    """``W S = W Q diag(scale)`` in fp32 from a bf16 weight."""
    if fused:  # one GEMM: the scale in the epilogue, the bf16 weight read as is
        return Cost(HALF * m * n + FP32 * n * n + FP32 * n + FP32 * m * n, 2 * m * n * n)
    scale_basis = Cost(FP32 * n * n + FP32 * n + FP32 * n * n, n * n)  # S = Q * scale
    cast = Cost(HALF * m * n + FP32 * m * n, 0)  # W.float()
    gemm = Cost(FP32 * m * n + FP32 * n * n + FP32 * m * n, 2 * m * n * n)
    return scale_basis + cast + gemm


def right_factor(r: int, n: int, fused: bool) -> Cost:
    """``v = diag(root) R_r^T S^-1 = diag(root) R_r^T diag(1 / scale) Q^T``."""
    if fused:  # one GEMM, both scalings applied to the tiles on the fly
        return Cost(FP32 * (r * n + n * n + r + n + r * n), 2 * r * n * n)
    inverse = Cost(FP32 * (n * n + n + n * n), n * n)  # S^-1 = Q^T / scale
    rows = Cost(FP32 * (r * n + r + r * n), r * n)  # root[:, None] * R_r^T
    gemm = Cost(FP32 * (r * n + n * n + r * n), 2 * r * n * n)
    return inverse + rows + gemm


def factors_naive(m: int, n: int, r: int) -> Cost:
    """Per linear: its own eigh, ``W S``, a full SVD, ``v``."""
    return Cost(0, eigh_flops(n) + svd_flops(m, n)) + weight_times_whitening(m, n, False) + right_factor(r, n, False)


def range_finder_flops(m: int, n: int, k: int) -> float:
    """Randomized range of an (m, n) operator: one product, then two per power iteration, a QR after each."""
    products = (1 + 2 * POWER_ITERS) * 2 * m * n * k
    return products + (1 + POWER_ITERS) * (qr_flops(m, k) + qr_flops(n, k))


def factors_emloc(m: int, n: int, r: int, method: str) -> Cost:
    """Per linear, without the eigh of its group's whitening (counted once per group by the caller)."""
    k = min(r + OVERSAMPLE, m, n)
    if m >= n:  # whitened form
        if method == "exact":
            core = svd_flops(m, n)
        else:  # range finder on W S, small SVD of basis^T W S, u = basis @ left
            core = range_finder_flops(m, n, k) + 2 * m * n * k + svd_flops(k, n) + 2 * m * k * r
        return Cost(0, core) + weight_times_whitening(m, n, True) + right_factor(r, n, True)
    # output-space form: eigenvectors of the (m, m) output covariance, then v = P_r^T W
    if method == "exact":
        core = eigh_flops(m)
    else:  # range finder on Y^T Y, eigh of the projected (k, k) matrix, u = basis @ small
        core = range_finder_flops(m, m, k) + 2 * m * m * k + 2 * m * k * k + eigh_flops(k) + 2 * m * k * r
    return Cost(HALF * m * n + FP32 * (m * r + r * n), core + 2 * r * m * n)


def layer_factors(model: str, method: str | None) -> Cost:
    """Factors of every linear of a decoder layer; ``method=None`` is the naive route."""
    linears = MODELS[model].values()
    if method is None:
        return sum((factors_naive(m, n, emulator_rank(m, n)) for m, n, _ in linears), NONE)
    groups = {group: n for m, n, group in linears if m >= n}  # one whitening eigh per input group
    whitenings = Cost(0, sum(eigh_flops(n) for n in groups.values()))
    return sum((factors_emloc(m, n, emulator_rank(m, n), method) for m, n, _ in linears), whitenings)


# --- emulator_linear -----------------------------------------------------------------------------------


def emulator_forward(m: int, n: int, r: int, k: int, T: int, fused: bool) -> Cost:
    flops = 2 * T * (r + k) * (n + m) + T * m  # the four products, the bias
    if fused:
        project = HALF * (T * n + (r + k) * n + T * (r + k))  # [h, xa] = x [v; a]^T: x read once
        expand = HALF * (T * (r + k) + m * (r + k) + m + T * m)  # y = [h, xa] [u, s b]^T + bias
        return Cost(project + expand, flops)
    linears = HALF * (
        (T * n + r * n + T * r)  # h = x v^T
        + (T * r + m * r + m + T * m)  # h u^T + bias
        + (T * n + k * n + T * k)  # xa = x a^T: x read again
        + (T * k + m * k + T * m)  # xa b^T
        + 2 * T * m  # scaling * (...)
        + 3 * T * m  # the sum
    )
    return Cost(linears, flops + 2 * T * m)


def emulator_backward(m: int, n: int, r: int, k: int, T: int, fused: bool) -> Cost:
    flops = 2 * T * m * (r + k) + 2 * T * (r + k) * n + 2 * T * k * n + 2 * T * m * k + T * m
    bias = HALF * (T * m + m)  # dbias = dy.sum(0), both sides
    if fused:
        project = HALF * (T * m + m * (r + k) + T * (r + k))  # [dy u, s dy b]
        dx = HALF * (T * (r + k) + (r + k) * n + T * n)  # dx = [dy u, s dy b] [v; a]
        da = HALF * (T * k + T * n + k * n)  # da = (s dy b)^T x
        db = HALF * (T * m + T * k + m * k)  # db = s dy^T xa
        return Cost(project + dx + da + db + bias, flops)
    autograd = HALF * (
        2 * T * m  # d(scaling * z) = scaling * dy
        + (T * m + m * k + T * k) + (T * m + T * k + m * k)  # xa b^T: dxa, db
        + (T * k + k * n + T * n) + (T * k + T * n + k * n)  # x a^T: dx part, da
        + (T * m + m * r + T * r)  # h u^T: dh (u frozen)
        + (T * r + r * n + T * n)  # x v^T: dx part
        + 3 * T * n  # the two dx parts summed
    )
    return Cost(autograd + bias, flops + T * m + T * n)


# --- report --------------------------------------------------------------------------------------------


def rows() -> list[tuple[str, str, Cost, Cost]]:
    """(op, shape, emloc, naive) for every op at every model size."""
    out = []
    widths = {}  # each distinct input width once, named after the first model that has it
    for name, (_, n) in LINEARS.items():
        widths.setdefault(n, name.split()[0])
    for n, model in sorted(widths.items()):
        out.append(("covariance_update", f"{model} n={n}, {CALIBRATION_TOTAL} tok",
                    calibration_covariance(n, True), calibration_covariance(n, False)))
    for model in MODELS:
        out.append(("covariances, 1 layer", f"{model}, groups + out-space",
                    layer_covariances(model, True), layer_covariances(model, False)))
    for name, (m, n) in LINEARS.items():
        r = emulator_rank(m, n)
        if m >= n:
            out.append(("scaled_matmul W S", f"{name} {m}x{n}",
                        weight_times_whitening(m, n, True), weight_times_whitening(m, n, False)))
            out.append(("scaled_matmul v", f"{name} r={r} n={n}", right_factor(r, n, True), right_factor(r, n, False)))
    for model in MODELS:
        for method in ("exact", "randomized"):
            out.append((f"factors {method}, 1 layer", model, layer_factors(model, method), layer_factors(model, None)))
    for name, (m, n) in LINEARS.items():
        r, T = emulator_rank(m, n), TRAINING_TOKENS
        shape = f"{name} {m}x{n} r={r} T={T}"
        out.append(("emulator_linear fwd", shape, emulator_forward(m, n, r, LORA_RANK, T, True),
                    emulator_forward(m, n, r, LORA_RANK, T, False)))
        out.append(("emulator_linear bwd", shape, emulator_backward(m, n, r, LORA_RANK, T, True),
                    emulator_backward(m, n, r, LORA_RANK, T, False)))
    return out


def table(entries: list[tuple[str, str, Cost, Cost]]) -> str:
    header = ("op", "shape", "GB emloc", "GB naive", "bytes x", "GFLOP emloc", "GFLOP naive", "FLOPs x")
    lines = [
        (op, shape, f"{ours.bytes / 1e9:.3f}", f"{naive.bytes / 1e9:.3f}",
         f"{naive.bytes / ours.bytes:.2f}" if ours.bytes else "-",
         f"{ours.flops / 1e9:.1f}", f"{naive.flops / 1e9:.1f}", f"{naive.flops / ours.flops:.2f}")
        for op, shape, ours, naive in entries
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = lambda row: "  ".join(  # noqa: E731
        cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
    )
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def main() -> None:
    print(f"emloc kernels vs naive torch: bf16 activations, LoRA r={LORA_RANK}, emulator rank from ratio {RATIO}, "
          f"calibration {CALIBRATION_SAMPLES} x {SEQUENCE} tokens in batches of {CALIBRATION_TOKENS}; "
          f"'x' columns are naive / emloc")
    print(table(rows()))


if __name__ == "__main__":
    main()
