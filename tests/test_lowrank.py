"""Low-rank factor construction: the scaled GEMM kernel and the whitened / output-space factors.

scaled_matmul runs its Triton kernel (interpreted on the CPU) and is compared with a float64 product of the
same inputs. The factor tests check the optimality that defines the method (docs/design.md §1.3, §1.4): ``u v``
minimises ``||(W - u v) X^T||_F`` over rank-r matrices, with minimum ``sqrt(sum_{i>r} sigma_i(W X^T)^2)``.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys

import pytest
import torch

from emloc_kernels import projected_lowrank, scaled_matmul, whitened_lowrank, whitening
from layer_shapes import scaled_matmul_cases
from utils import DEVICE, FLOAT_DTYPES, REL_TOL, assert_close, non_contiguous

F64 = torch.float64


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (an error, not a fallback, if they cannot run)."""
    monkeypatch.setenv("EMLOC_BACKEND", "triton")


# --- scaled_matmul ------------------------------------------------------------------------------------

# Sizes avoid multiples of every tile size the kernel uses (16 to 128), so partial tiles are exercised.
M, K, N = 37, 70, 45


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of a 2-D ``t`` in the given memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":  # column-major, as Q^T or u^T are passed
        return t.T.contiguous().T
    if layout == "strided":  # every other row and every third column of a larger buffer
        out = torch.empty(2 * t.shape[0], 3 * t.shape[1], dtype=t.dtype, device=t.device)[::2, ::3]
        return out.copy_(t)
    raise ValueError(layout)


def _strided_vector(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(2 * t.shape[0], dtype=t.dtype, device=t.device)[::2].copy_(t)


def _scales(m: int, k: int, n: int, present=(True, True, True)):
    """Positive scales in [0.5, 1.5) (as eigenvalue roots are), None where absent."""
    return tuple(torch.rand(size, device=DEVICE) + 0.5 if on else None
                 for size, on in zip((m, k, n), present, strict=True))


def _expected(a, b, row, inner, col) -> torch.Tensor:
    out = a.to(F64)
    if inner is not None:
        out = out * inner.to(F64)
    out = out @ b.to(F64)
    if row is not None:
        out = out * row.to(F64)[:, None]
    if col is not None:
        out = out * col.to(F64)
    return out


def _tolerance(*dtypes: torch.dtype) -> float:
    """The bound of the least precise dtype involved (inputs or output)."""
    return max(REL_TOL[d] for d in dtypes)


@pytest.mark.parametrize("present", list(itertools.product((False, True), repeat=3)),
                         ids=lambda p: "".join(n if on else "-" for n, on in zip("ric", p, strict=True)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_scaled_matmul_every_scale_combination(triton_backend, seed, dtype, present):
    a, b = torch.randn(M, K, device=DEVICE).to(dtype), torch.randn(K, N, device=DEVICE).to(dtype)
    scales = _scales(M, K, N, present)
    out = scaled_matmul(a, b, *scales)
    assert out.dtype == dtype
    assert_close(out, _expected(a, b, *scales), dtype, what=f"scaled_matmul seed={seed}")


@pytest.mark.parametrize("present", list(itertools.product((False, True), repeat=3)),
                         ids=lambda p: "".join(n if on else "-" for n, on in zip("ric", p, strict=True)))
@pytest.mark.parametrize("shape", [(9, 40, 70), (70, 40, 9)], ids=("a-smaller", "b-smaller"))
def test_scaled_matmul_torch_backend(torch_backend, seed, shape, present):
    """The torch backend scales the smaller operand and the fresh product in place: the same result, and
    its (non-contiguous) inputs untouched."""
    m, k, n = shape
    a, b = non_contiguous(torch.randn(m, k, device=DEVICE)), non_contiguous(torch.randn(n, k, device=DEVICE)).T
    before = a.clone(), b.clone()
    scales = _scales(m, k, n, present)
    assert_close(scaled_matmul(a, b, *scales), _expected(a, b, *scales), torch.float32,
                 what=f"scaled_matmul (torch) seed={seed}")
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]), "scaled_matmul wrote to its inputs"


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, K, N), (M, 1, N), (M, K, 1), (65, 97, 33), *scaled_matmul_cases()],
                         ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_scaled_matmul_sizes(triton_backend, seed, dtype, shape):
    m, k, n = shape
    a, b = torch.randn(m, k, device=DEVICE).to(dtype), torch.randn(k, n, device=DEVICE).to(dtype)
    scales = _scales(m, k, n)
    assert_close(scaled_matmul(a, b, *scales), _expected(a, b, *scales), dtype, what=f"scaled_matmul seed={seed}")


@pytest.mark.parametrize("layouts", [("transposed", "transposed"), ("transposed", "contiguous"),
                                     ("contiguous", "transposed"), ("strided", "transposed"),
                                     ("transposed", "strided"), ("strided", "strided")], ids="-".join)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_scaled_matmul_non_contiguous(triton_backend, seed, dtype, layouts):
    a = _layout(torch.randn(M, K, device=DEVICE).to(dtype), layouts[0])
    b = _layout(torch.randn(K, N, device=DEVICE).to(dtype), layouts[1])
    scales = tuple(_strided_vector(s) for s in _scales(M, K, N))
    assert_close(scaled_matmul(a, b, *scales), _expected(a, b, *scales), dtype, what=f"scaled_matmul seed={seed}")


@pytest.mark.parametrize("a_dtype, b_dtype, out_dtype", [
    (torch.bfloat16, torch.float32, None),  # a bf16 weight times an fp32 eigenbasis
    (torch.float16, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.bfloat16, None),  # promotes to fp32
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.float16, torch.float32),
    (torch.float32, torch.float32, torch.float16),
    (torch.float32, torch.float32, torch.float64),
], ids=str)
def test_scaled_matmul_mixed_dtypes(triton_backend, seed, a_dtype, b_dtype, out_dtype):
    a = torch.randn(M, K, device=DEVICE).to(a_dtype)
    b = _layout(torch.randn(K, N, device=DEVICE).to(b_dtype), "transposed")
    scales = _scales(M, K, N)
    out = scaled_matmul(a, b, *scales, out_dtype=out_dtype)
    assert out.dtype == (out_dtype or torch.promote_types(a_dtype, b_dtype))
    assert_close(out, _expected(a, b, *scales), rtol=_tolerance(a_dtype, b_dtype, out.dtype),
                 what=f"scaled_matmul seed={seed}")


@pytest.mark.parametrize("a_dtype, b_dtype, precision", [
    (torch.float32, torch.float32, "ieee"),
    (torch.bfloat16, torch.float32, "ieee"),
    (torch.float16, torch.float16, None),
], ids=str)
def test_scaled_matmul_requests_ieee_fp32_dots(a_dtype, b_dtype, precision):
    """The interpreter computes every fp32 dot exactly whatever ``input_precision`` says, so a TF32 dot (about
    1e-3 relative error on the GPU) would pass every comparison above: check the request itself."""
    from emloc_kernels.triton.launch import dot_options

    assert dot_options(torch.randn(2, 2).to(a_dtype), torch.randn(2, 2).to(b_dtype)).precision == precision


# Compiles the kernel as the launcher would configure it on a GPU (largest tile config, every scale) for
# sm_90 and reports whether the PTX uses tensor cores (wgmma) and TF32. Runs in a fresh process: the
# interpreter patches triton.language, so nothing compiles for a GPU in an interpreted process.
_COMPILE_FOR_HOPPER = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from emloc_kernels.triton import lowrank
from emloc_kernels.triton.launch import dot_options

kernel, config = lowrank._scaled_matmul_kernel.fn, lowrank._configs()[0]
for dtype, ptr in ((torch.float32, "*fp32"), (torch.bfloat16, "*bf16"), (torch.float16, "*fp16")):
    x = torch.zeros(1, 1, dtype=dtype)
    dot = dot_options(x, x)
    constexprs = dict(HAS_ROW=True, HAS_INNER=True, HAS_COL=True, DOT_DTYPE=dot.dtype, INPUT_PRECISION=dot.precision,
                      **config.kwargs)
    signature = {p.name: "constexpr" if p.is_constexpr else ptr if p.name.endswith("_ptr") else "i32"
                 for p in kernel.params}
    ptx = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                         target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=config.num_warps, num_stages=config.num_stages)).asm["ptx"]
    print(str(dtype), "wgmma" in ptx, "tf32" in ptx)
"""


def test_scaled_matmul_compiles_for_hopper():
    """Without a GPU the interpreter is all that runs the kernel, and it accepts code the compiler may reject
    and ignores input_precision: compile ahead of time for sm_90 (no GPU needed) and read the PTX."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"the kernel does not compile for sm_90:\n{done.stderr[-4000:]}"
    report = {dtype: (tensor_cores, tf32) for dtype, tensor_cores, tf32 in map(str.split, done.stdout.splitlines())}
    assert report == {
        "torch.float32": ("False", "False"),  # IEEE fp32 (FMA): TF32 would cost ~1e-3 of accuracy
        "torch.bfloat16": ("True", "False"),
        "torch.float16": ("True", "False"),
    }, report


def test_scaled_matmul_empty_inner_dimension_writes_zeros(triton_backend):
    out = scaled_matmul(torch.randn(M, 0, device=DEVICE), torch.randn(0, N, device=DEVICE), *_scales(M, 0, N))
    assert torch.equal(out, torch.zeros(M, N, device=DEVICE)), "an empty inner product must be written as zeros"


@pytest.mark.parametrize("args, message", [
    ((torch.randn(3, 4), torch.randn(5, 2)), "cannot multiply"),
    ((torch.randn(3, 4), torch.randn(4, 2), torch.rand(4)), "row_scale must have shape"),
    ((torch.randn(3, 4), torch.randn(4, 2), None, torch.rand(3)), "inner_scale must have shape"),
    ((torch.randn(3, 4), torch.randn(4, 2), None, None, torch.rand(4)), "col_scale must have shape"),
])
def test_scaled_matmul_rejects_mismatched_shapes(args, message):
    with pytest.raises(ValueError, match=message):
        scaled_matmul(*args)


# --- low-rank factors ---------------------------------------------------------------------------------


def _decaying(rows: int, cols: int, decay: float, generator: torch.Generator) -> torch.Tensor:
    """A float64 matrix with singular values ``decay**i`` and random singular vectors."""
    left = torch.linalg.qr(torch.randn(rows, min(rows, cols), dtype=F64, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, min(rows, cols), dtype=F64, generator=generator)).Q
    return left * decay ** torch.arange(min(rows, cols), dtype=F64) @ right.T


def _layer(m: int, n: int, tokens: int, generator: torch.Generator, decay: float | None = None):
    """A float64 weight ``w (m, n)`` and calibration inputs ``x (tokens, n)`` on the test device, drawn on the CPU
    by ``generator`` (the same values on every device)."""
    w = torch.randn(m, n, dtype=F64, generator=generator) if decay is None else _decaying(m, n, decay, generator)
    return w.to(DEVICE), torch.randn(tokens, n, dtype=F64, generator=generator).to(DEVICE)


def _factors(form: str, w, x, rank: int, dtype=F64, weight_dtype=None, **kwargs):
    """``(u, v)`` of the given form from the calibration data: covariances in ``dtype``, the weight in
    ``weight_dtype`` (default ``dtype``)."""
    weight = w.to(weight_dtype or dtype)
    if form == "whitened":
        return whitened_lowrank(weight, whitening((x.T @ x).to(dtype)), rank, **kwargs)
    y = x @ w.T
    return projected_lowrank(weight, (y.T @ y).to(dtype), rank, **kwargs)


def _error(w, u, v, x) -> float:
    """``||(W - u v) X^T||_F``, the output error the factors minimise, in float64."""
    return torch.linalg.matrix_norm((w - u.to(F64) @ v.to(F64)) @ x.T).item()


def _optimum(w, x, rank: int) -> float:
    """Eckart-Young: the least ``||(W - W') X^T||_F`` over rank-r ``W'``."""
    sigma = torch.linalg.svdvals(w @ x.T)
    return sigma[rank:].square().sum().sqrt().item()


FORMS = ("whitened", "projected")


@pytest.mark.parametrize("shape", [(23, 17), (13, 29)], ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_exact_factors_reach_the_eckart_young_optimum(seed, form, shape):
    gen = torch.Generator().manual_seed(seed)
    (m, n), rank = shape, 5
    w, x = _layer(m, n, 3 * n, gen)
    u, v = _factors(form, w, x, rank)
    assert u.shape == (m, rank) and v.shape == (rank, n) and u.dtype == v.dtype == F64
    err, best = _error(w, u, v, x), _optimum(w, x, rank)
    assert abs(err / best - 1) <= 1e-6, f"{form} seed={seed}: error {err:.12g} vs optimum {best:.12g}"


@pytest.mark.parametrize("shape", [(23, 17), (13, 29)], ids=str)
def test_both_forms_give_the_same_product_on_full_rank_data(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    w, x = _layer(*shape, 3 * shape[1], gen)
    whitened, projected = (torch.mm(*_factors(form, w, x, 5)) for form in FORMS)
    assert_close(whitened, projected, rtol=1e-6, what=f"whitened vs projected u v, seed={seed}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_fp32_factors_match_fp64_on_well_conditioned_data(monkeypatch, seed, form, weight_dtype, backend):
    """fp32 covariances (and fp32 or bf16 weights) give the float64 product to fp32 accuracy: the relevant
    conditioning (inputs with 4x more tokens than features, spectrum gaps of 1/0.7) is small, so the bound
    is a few hundred fp32 roundoffs."""
    gen = torch.Generator().manual_seed(seed)
    w, x = _layer(40, 30, 120, gen, decay=0.7)
    w = w.to(weight_dtype).to(F64)  # the float64 reference sees the same rounded weight
    expected = torch.mm(*_factors(form, w, x, 6))  # float64 always takes the reference backend
    monkeypatch.setenv("EMLOC_BACKEND", backend)
    u, v = _factors(form, w, x, 6, torch.float32, weight_dtype)
    assert u.dtype == v.dtype == torch.float32
    assert_close(u @ v, expected, rtol=1e-4, what=f"{form} fp32 u v, seed={seed}")


@pytest.mark.parametrize("backend, dtype", [("torch", F64), ("triton", torch.float32)], ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_randomized_factors_within_two_percent_of_exact(monkeypatch, seed, form, backend, dtype):
    """On a decaying spectrum a range finder of rank + 16 probes with 2 power iterations is near-optimal;
    the layer is wide enough (rank + oversample < min(m, n)) that the probes do not span everything."""
    monkeypatch.setenv("EMLOC_BACKEND", backend)
    gen = torch.Generator().manual_seed(seed)
    w, x = _layer(72, 64, 160, gen, decay=0.9)
    rank = 8
    exact = _error(w, *_factors(form, w, x, rank, dtype), x)
    probes = torch.Generator(DEVICE).manual_seed(seed + 1)
    randomized = _error(w, *_factors(form, w, x, rank, dtype, method="randomized", generator=probes), x)
    assert randomized <= 1.02 * exact, f"{form} seed={seed}: randomized {randomized:.6g} vs exact {exact:.6g}"
    assert randomized >= _optimum(w, x, rank) * (1 - 1e-6), "an error below the optimum means a wrong measure"


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", ["fewer_tokens_than_features", "ill_conditioned"])
def test_singular_covariance_gives_finite_factors_and_projected_stays_optimal(seed, case, form, method):
    gen = torch.Generator().manual_seed(seed)
    m, n, rank = 20, 30, 4
    w, x = _layer(m, n, 10 if case == "fewer_tokens_than_features" else 60, gen)
    if case == "ill_conditioned":  # feature scales over 8 decades: cond(X^T X) ~ 1e16
        x = x * torch.logspace(0, -8, n, dtype=F64)
    for dtype in (F64, torch.float32):
        u, v = _factors(form, w, x, rank, dtype, method=method)
        assert torch.isfinite(u).all() and torch.isfinite(v).all(), f"{form} {case} {dtype}: non-finite factors"
    if form == "projected":
        err, best = _error(w, *_factors(form, w, x, rank, method=method), x), _optimum(w, x, rank)
        assert abs(err / best - 1) <= 1e-6, f"projected {case} seed={seed}: {err:.12g} vs optimum {best:.12g}"


def test_factors_run_the_triton_kernel(monkeypatch, triton_backend):
    """Every scaled GEMM and the W^T W of the fp32 factor construction go through the Triton launchers."""
    from emloc_kernels.triton import covariance
    from emloc_kernels.triton import lowrank as kernels

    calls = {"scaled_matmul": [], "covariance_update": []}
    for module, name in ((kernels, "scaled_matmul"), (covariance, "covariance_update")):
        launcher = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _l=launcher, _n=name: calls[_n].append(args) or _l(*args))
    w, x = _layer(12, 9, 30, torch.Generator().manual_seed(0))
    _factors("whitened", w, x, 3, torch.float32)
    _factors("projected", w, x, 3, torch.float32)
    # whitened: the Gram sandwich, S R, u and v; projected: v
    assert len(calls["scaled_matmul"]) == 5, (
        f"expected 5 scaled GEMMs from the kernel, got {len(calls['scaled_matmul'])}")
    assert len(calls["covariance_update"]) == 1, "W^T W did not run the covariance kernel"


@pytest.mark.parametrize("call, message", [
    (lambda w, wh, c: whitened_lowrank(w, wh, 0), "rank must be an int in \\[1, 6\\]"),
    (lambda w, wh, c: whitened_lowrank(w, wh, 7), "rank must be an int in \\[1, 6\\]"),
    (lambda w, wh, c: projected_lowrank(w, c, 2.5), "rank must be an int"),
    (lambda w, wh, c: projected_lowrank(w, c, True), "rank must be an int"),
    (lambda w, wh, c: whitened_lowrank(w, wh, 2, method="svd"), "method must be one of"),
    (lambda w, wh, c: projected_lowrank(w, c, 2, method="randomized", oversample=-1), "oversample"),
    (lambda w, wh, c: whitened_lowrank(w[:, :5], wh, 2), "does not fit the whitening"),
    (lambda w, wh, c: whitened_lowrank(w[0], wh, 1), "weight must be a 2-D"),
    (lambda w, wh, c: projected_lowrank(w, c[:5, :5], 2), "out_cov must be a float32/float64 \\(6, 6\\)"),
    (lambda w, wh, c: projected_lowrank(w, c.half(), 2), "out_cov must be a float32/float64"),
    (lambda w, wh, c: whitening(c[:, :5]), "covariance must be square"),
    (lambda w, wh, c: whitening(c.half()), "covariance must be float32 or float64"),
    (lambda w, wh, c: whitening(torch.zeros(6, 6)), "holds no calibration data"),
    (lambda w, wh, c: whitening(c, eps=0.0), "eps must be > 0"),
], ids=lambda c: c if isinstance(c, str) else "")
def test_bad_arguments_are_named(call, message):
    w = torch.randn(6, 7)
    x = torch.randn(20, 7)
    cov = (x @ w.T).T @ (x @ w.T)
    with pytest.raises((ValueError, TypeError), match=message):
        call(w, whitening(x.T @ x), cov)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_meta_tensors_flow_through(method):
    """Shapes and dtypes come out of meta inputs without data (the memory dry run relies on it)."""
    m, n, rank = 48, 80, 12
    weight = torch.empty(m, n, dtype=torch.bfloat16, device="meta")
    white = whitening(torch.empty(n, n, device="meta"))
    assert white.basis.shape == (n, n) and white.scale.shape == (n,) and white.basis.is_meta
    for u, v in (whitened_lowrank(weight, white, rank, method),
                 projected_lowrank(weight, torch.empty(m, m, device="meta"), rank, method)):
        assert u.is_meta and v.is_meta
        assert (u.shape, v.shape, u.dtype, v.dtype) == ((m, rank), (rank, n), torch.float32, torch.float32)
    out = scaled_matmul(weight, white.basis, None, None, white.scale)
    assert out.is_meta and out.shape == (m, n) and out.dtype == torch.float32
