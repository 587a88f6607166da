"""The ``kernels`` part of ``make gpu-check``: each Triton kernel against its naive torch baseline on the GPU.

At real 7B and 32B shapes in bf16 (``shapes.py``), with the baselines of ``test_kernels.py`` and the bytes and
FLOPs of ``kernel_cost.py`` for both sides:

* ``covariance_update`` over one padded calibration micro-batch, at every distinct input width;
* ``scaled_matmul`` as the whitened factors use it, ``W S`` and ``v = R^T S^-1``, on the ``m > n`` linears;
* ``emulator_linear`` forward, and forward + backward, on every distinct linear: the fused kernels against
  four cuBLAS GEMMs (``U``, ``V`` and the separate LoRA ``A``, ``B``) under autograd.

Each row gives both sides' median times, TFLOP/s and GB/s, and the fraction of this device's peak: the
roofline time (the FLOPs at the bf16 peak of a large cuBLAS GEMM, or the bytes at the bandwidth of a
device-to-device copy, both measured first in this run, whichever is longer) over the measured time. Each
row also compares the two sides' outputs: both approximate the same float64 result within ``REL_TOL`` of
their dtype, so they must agree within twice that.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.append(str(BENCHMARKS.parent / "tests"))  # after benchmarks/: its conftest is the one imported

import kernel_cost  # noqa: E402
from emloc_kernels import covariance_update, emulator_linear, scaled_matmul  # noqa: E402
from emloc_kernels.backend import use_triton  # noqa: E402
from shapes import (  # noqa: E402
    CALIBRATION_TOKENS,
    COVARIANCE_WIDTHS,
    LINEARS,
    LORA_ALPHA,
    LORA_RANK,
    TRAINING_TOKENS,
    emulator_rank,
)
from test_kernels import PADDING, forward_backward, naive_covariance, naive_emulator  # noqa: E402
from utils import REL_TOL, rel_error  # noqa: E402

DEVICE, DTYPE = "cuda", torch.bfloat16
MODELS = ("7B", "32B")
ROUNDS, QUICK_ROUNDS = 10, 5
GEMM_SIZE = 8192  # the square bf16 GEMM whose rate is the FLOP peak
COPY_BYTES = 4 << 30  # the device copy whose rate is the bandwidth peak


def median_ms(fn, rounds: int) -> float:
    """Median milliseconds of ``fn()`` over ``rounds`` calls timed by CUDA events, after one untimed call
    (which pays for compiling and autotuning)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _gemm_ms(rounds: int) -> float:
    """Median ms of a GEMM_SIZE^3 bf16 ``torch.mm``; its tensors are freed on return."""
    a, b = (torch.randn(GEMM_SIZE, GEMM_SIZE, device=DEVICE, dtype=DTYPE) for _ in range(2))
    out = torch.empty_like(a)
    return median_ms(lambda: torch.mm(a, b, out=out), rounds)


def _copy_ms(rounds: int) -> float:
    """Median ms of a COPY_BYTES device-to-device copy; its buffers are freed on return."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), rounds)


def measure_peaks(rounds: int) -> dict:
    """The device's bf16 dense GEMM rate (cuBLAS) and its memory bandwidth (a device copy: read + write)."""
    gemm_ms = _gemm_ms(rounds)
    copy_ms = _copy_ms(rounds)
    torch.cuda.empty_cache()
    return {"gemm_shape": f"{GEMM_SIZE}^3", "gemm_tflops": 2 * GEMM_SIZE**3 / gemm_ms / 1e9,
            "copy_bytes": COPY_BYTES, "copy_gbps": 2 * COPY_BYTES / copy_ms / 1e6}


def rates(cost: kernel_cost.Cost, ms: float, peaks: dict) -> dict:
    """Time, rates and the fraction of the roofline that ``cost`` reached in ``ms``."""
    roofline_ms = max(cost.flops / (peaks["gemm_tflops"] * 1e9), cost.bytes / (peaks["copy_gbps"] * 1e6))
    return {"ms": ms, "tflops": cost.flops / ms / 1e9, "gbps": cost.bytes / ms / 1e6, "of_peak": roofline_ms / ms}


def row(op: str, shape: str, costs: tuple[kernel_cost.Cost, kernel_cost.Cost], times: tuple[float, float],
        outputs: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype, peaks: dict) -> dict:
    """One table row: both sides' rates and the worst relative difference of their outputs."""
    bound = 2 * REL_TOL[dtype]
    diff = max(rel_error(ours, theirs) for ours, theirs in outputs)
    return {"op": op, "shape": shape, "emloc": rates(costs[0], times[0], peaks),
            "naive": rates(costs[1], times[1], peaks), "rel_diff": diff, "bound": bound, "ok": diff <= bound}


def _of_models(names) -> list[str]:
    return [name for name in names if name.split()[0] in MODELS]


def _randn(*shape: int, dtype=DTYPE) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype) / shape[-1] ** 0.5


def bench_covariance(width: str, rounds: int, peaks: dict) -> dict:
    n, T = COVARIANCE_WIDTHS[width], CALIBRATION_TOKENS
    x = torch.randn(T, n, device=DEVICE, dtype=DTYPE)
    mask = torch.rand(T, device=DEVICE) >= PADDING
    assert use_triton("covariance_update", x), "covariance_update would not run its Triton kernel"
    outputs = []
    for fn in (covariance_update, naive_covariance):
        cov = torch.zeros(n, n, device=DEVICE)
        fn(cov, x, mask)
        outputs.append(cov)
    cov = torch.zeros(n, n, device=DEVICE)
    times = tuple(median_ms(lambda fn=fn: fn(cov, x, mask), rounds) for fn in (covariance_update, naive_covariance))
    costs = (kernel_cost.covariance_fused(n, T), kernel_cost.covariance_naive(n, T))
    return row("covariance_update", f"{width} n={n} T={T}", costs, times, [tuple(outputs)], torch.float32, peaks)


def bench_weight_times_whitening(name: str, rounds: int, peaks: dict) -> dict:
    """``W S = W Q diag(scale)``: a bf16 weight times the fp32 eigenbasis, the scale in the epilogue."""
    m, n = LINEARS[name]
    weight, basis = _randn(m, n), torch.linalg.qr(torch.randn(n, n, device=DEVICE)).Q
    scale = torch.rand(n, device=DEVICE) + 0.5

    def ours():
        return scaled_matmul(weight, basis, None, None, scale, torch.float32)

    def naive():
        return weight.float() @ (basis * scale)

    times = (median_ms(ours, rounds), median_ms(naive, rounds))
    costs = (kernel_cost.weight_times_whitening(m, n, True), kernel_cost.weight_times_whitening(m, n, False))
    return row("scaled_matmul W S", f"{name} {m}x{n}", costs, times, [(ours(), naive())], torch.float32, peaks)


def bench_right_factor(name: str, rounds: int, peaks: dict) -> dict:
    """``v = diag(root) R_r^T diag(1 / scale) Q^T``: both scalings fused, ``Q^T`` read in place."""
    m, n = LINEARS[name]
    r = emulator_rank(m, n)
    basis = torch.linalg.qr(torch.randn(n, n, device=DEVICE)).Q
    right, root = torch.randn(n, r, device=DEVICE), torch.rand(r, device=DEVICE) + 0.5
    scale = torch.rand(n, device=DEVICE) + 0.5

    def ours():
        return scaled_matmul(right.T, basis.T, root, 1.0 / scale, None, torch.float32)

    def naive():
        return (root[:, None] * right.T) @ (basis.T / scale[:, None])

    times = (median_ms(ours, rounds), median_ms(naive, rounds))
    costs = (kernel_cost.right_factor(r, n, True), kernel_cost.right_factor(r, n, False))
    return row("scaled_matmul v", f"{name} r={r} n={n}", costs, times, [(ours(), naive())], torch.float32, peaks)


def emulator_inputs(m: int, n: int, r: int, training: bool) -> tuple:
    """``(x, v, u, bias, lora_a, lora_b, scaling)`` of one training micro-batch, as ``test_kernels.py`` has them."""
    x = _randn(TRAINING_TOKENS, n).requires_grad_(training)
    lora = (_randn(LORA_RANK, n).requires_grad_(training), _randn(m, LORA_RANK).requires_grad_(training))
    return (x, _randn(r, n), _randn(m, r), _randn(m), *lora, LORA_ALPHA / LORA_RANK)


def _outputs(fn, args: tuple, grad: torch.Tensor | None) -> list[torch.Tensor]:
    """``y``, and with ``grad`` the gradients of x, lora_a and lora_b, from one fresh call (copies: the timed
    calls that follow accumulate into the same ``.grad`` tensors)."""
    if grad is None:
        with torch.no_grad():
            return [fn(*args)]
    leaves = (args[0], args[4], args[5])
    for t in leaves:
        t.grad = None
    y = fn(*args)
    y.backward(grad)
    return [y.detach(), *(t.grad.clone() for t in leaves)]


def bench_emulator(name: str, training: bool, rounds: int, peaks: dict) -> dict:
    m, n = LINEARS[name]
    r, T = emulator_rank(m, n), TRAINING_TOKENS
    args = emulator_inputs(m, n, r, training)
    assert use_triton("emulator_linear", *args[:6]), "emulator_linear would not run its Triton kernels"
    grad = torch.randn(T, m, device=DEVICE, dtype=DTYPE) if training else None
    outputs = list(zip(_outputs(emulator_linear, args, grad), _outputs(naive_emulator, args, grad), strict=True))
    times = []
    for fn in (emulator_linear, naive_emulator):
        if training:
            times.append(median_ms(lambda fn=fn: forward_backward(fn, grad, *args), rounds))
        else:
            with torch.no_grad():
                times.append(median_ms(lambda fn=fn: fn(*args), rounds))
    costs = tuple(kernel_cost.emulator_forward(m, n, r, LORA_RANK, T, fused)
                  + (kernel_cost.emulator_backward(m, n, r, LORA_RANK, T, fused) if training else kernel_cost.NONE)
                  for fused in (True, False))
    op = "emulator_linear fwd+bwd" if training else "emulator_linear fwd"
    return row(op, f"{name} {m}x{n} r={r} T={T}", costs, tuple(times), outputs, DTYPE, peaks)


def benchmarks(quick: bool) -> list:
    """``(function, *arguments)`` of every row, in table order; --quick keeps the 32B shapes only."""
    models = ("32B",) if quick else MODELS
    pick = [name for name in _of_models(LINEARS) if name.split()[0] in models]
    whitened = [name for name in pick if LINEARS[name][0] > LINEARS[name][1]]
    return ([(bench_covariance, width) for width in _of_models(COVARIANCE_WIDTHS) if width.split()[0] in models]
            + [(bench_weight_times_whitening, name) for name in whitened]
            + [(bench_right_factor, name) for name in whitened]
            + [(bench_emulator, name, training) for training in (False, True) for name in pick])


def run_kernels(record, args) -> None:
    """Measure the peaks, then every row, recording each as it comes."""
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    peaks = measure_peaks(rounds)
    record.update(peaks=peaks, rounds=rounds, dtype=str(DTYPE))
    for fn, *params in benchmarks(args.quick):
        record.append("rows", fn(*params, rounds, peaks))
        torch.cuda.empty_cache()
