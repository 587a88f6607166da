"""emulator_linear: forward and gradients against float64, the Triton path in the interpreter, fakes, compile.

Inputs are drawn in the tested dtype and the float64 reference is computed from those very values, so the
measured error is the kernel's own (fp32 accumulation, intermediate and output rounding), bounded per
dtype by ``tests.utils.REL_TOL``.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import emloc_kernels
from emloc import EmulatorLinear
from emloc_kernels.triton import emulator_linear as triton_emulator_linear
from tests.layer_shapes import emulator_cases
from tests.utils import DEVICE, FLOAT_DTYPES, assert_close, non_contiguous

# (tokens, in n, emulator rank r, out m, LoRA rank k): size one everywhere, odd sizes straddling the
# interpreter's 32-wide tiles, and a rank wider than one tile.
SHAPES = [(1, 1, 1, 1, 1), (37, 70, 19, 45, 5), (20, 33, 40, 17, 3)]
SCALING = 0.75


def make_layer(n, r, m, k, dtype, lora_dtype=None, bias=True, lora=True, device=DEVICE):
    """Random emulator factors (frozen) and optionally a bias and LoRA weights (trainable), all nonzero."""
    lora_dtype = lora_dtype or dtype

    def randn(*shape):
        return torch.randn(*shape, device=device)

    return {
        "v": (randn(r, n) / n**0.5).to(dtype),
        "u": (randn(m, r) / r**0.5).to(dtype),
        "bias": randn(m).to(dtype).requires_grad_() if bias else None,
        "lora_a": (randn(k, n) / n**0.5).to(lora_dtype).requires_grad_() if lora else None,
        "lora_b": randn(m, k).to(lora_dtype).requires_grad_() if lora else None,
    }


def reference(x, params, scaling):
    """The layer in float64 autograd, from the same values."""
    d = {name: None if t is None else t.detach().double().requires_grad_(t.requires_grad)
         for name, t in params.items()}
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    y = (x64 @ d["v"].T) @ d["u"].T
    if d["bias"] is not None:
        y = y + d["bias"]
    if d["lora_a"] is not None:
        y = y + scaling * (x64 @ d["lora_a"].T) @ d["lora_b"].T
    return y, x64, d


def check_forward_backward(x, params, dtype, scaling=SCALING, grad_y=None):
    """Run emulator_linear and its backward, and compare y and every gradient with float64."""
    y = emloc_kernels.emulator_linear(x, params["v"], params["u"], params["bias"], params["lora_a"],
                                      params["lora_b"], scaling)
    y_ref, x64, ref = reference(x, params, scaling)
    # the same layer on absolute values: per element, the magnitude of the terms summed (see assert_close)
    y_mag, x_mag, mag = reference(x.detach().abs().requires_grad_(x.requires_grad),
                                  {k: None if t is None else t.detach().abs().requires_grad_(t.requires_grad)
                                   for k, t in params.items()}, abs(scaling))
    assert y.dtype == x.dtype
    errors = {"y": assert_close(y, y_ref, dtype, what="y", magnitude=y_mag)}
    if grad_y is None:
        grad_y = torch.randn(y.shape, device=y.device).to(y.dtype)
    y.backward(grad_y)
    y_ref.backward(grad_y.double())
    y_mag.backward(grad_y.double().abs())
    leaves = [("x", x, x64, x_mag), *((k, params[k], ref[k], mag[k]) for k in ("bias", "lora_a", "lora_b"))]
    for name, leaf, leaf_ref, leaf_mag in leaves:
        if leaf is None or not leaf.requires_grad:
            continue
        assert leaf.grad is not None, f"no gradient for {name}"
        assert leaf.grad.dtype == leaf.dtype, f"grad of {name} is {leaf.grad.dtype}, expected {leaf.dtype}"
        errors[name] = assert_close(leaf.grad, leaf_ref.grad, dtype, what=f"grad {name}", magnitude=leaf_mag.grad)
    return errors


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels: an environment where they cannot run fails instead of falling back."""
    monkeypatch.setenv("EMLOC_BACKEND", "triton")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, *emulator_cases()], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,lora", [(True, True), (False, True), (True, False)], ids=["bias+lora", "lora", "bias"])
def test_matches_float64(triton_backend, seed, dtype, shape, bias, lora):
    t, n, r, m, k = shape
    params = make_layer(n, r, m, k, dtype, bias=bias, lora=lora)
    x = torch.randn(t, n, device=DEVICE).to(dtype).requires_grad_()
    check_forward_backward(x, params, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_3d_non_contiguous_inputs(triton_backend, seed, dtype):
    """3-D x that is a strided view, transposed factor views, and the zero-stride gradient of ``y.sum()``."""
    n, r, m, k = 23, 11, 29, 4
    params = make_layer(n, r, m, k, dtype)
    params["v"] = params["v"].T.contiguous().T  # column-major (r, n)
    params["u"] = non_contiguous(params["u"])
    x = non_contiguous(torch.randn(3, 5, n, device=DEVICE).to(dtype)).requires_grad_()
    grad_y = torch.ones((), device=DEVICE).to(dtype).expand(3, 5, m)
    assert grad_y.stride() == (0, 0, 0)
    check_forward_backward(x, params, dtype, grad_y=grad_y)


@pytest.mark.parametrize("base,lora", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)], ids=str)
def test_mixed_dtypes(triton_backend, seed, base, lora):
    """An fp32 LoRA on a bf16 base (and the reverse): every gradient comes back in its own tensor's dtype."""
    n, r, m, k = 37, 13, 41, 6
    params = make_layer(n, r, m, k, base, lora_dtype=lora)
    x = torch.randn(9, n, device=DEVICE).to(base).requires_grad_()
    check_forward_backward(x, params, torch.bfloat16)


def test_frozen_lora_still_shapes_the_input_gradient(triton_backend, seed):
    """LoRA weights that do not train get no gradient, but their branch still enters ``dx``."""
    params = make_layer(29, 7, 21, 4, torch.float16)
    for name in ("bias", "lora_a", "lora_b"):
        params[name].requires_grad_(False)
    x = torch.randn(11, 29, device=DEVICE).to(torch.float16).requires_grad_()
    check_forward_backward(x, params, torch.float16)
    assert params["lora_a"].grad is None and params["lora_b"].grad is None


class _LaunchSpy:
    """Stands in for a Triton kernel object: records the grids it is launched on, then launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_triton_path_runs_and_splits_long_reductions(triton_backend, seed, monkeypatch):
    """The launchers really run (interpreted without a GPU); a token axis longer than two split-K chunks of this
    machine's tiles splits the LoRA weight gradients."""
    calls = []
    for name in ("emulator_linear_forward", "emulator_linear_backward"):
        launcher = getattr(triton_emulator_linear, name)
        monkeypatch.setattr(triton_emulator_linear, name,
                            lambda *a, _f=launcher, _n=name: calls.append(_n) or _f(*a))
    projection = _LaunchSpy(triton_emulator_linear._projection_kernel)
    expansion = _LaunchSpy(triton_emulator_linear._expansion_kernel)
    monkeypatch.setattr(triton_emulator_linear, "_projection_kernel", projection)
    monkeypatch.setattr(triton_emulator_linear, "_expansion_kernel", expansion)

    n, r, m, k = 40, 9, 45, 5
    params = make_layer(n, r, m, k, torch.float32)
    tokens = 2 * triton_emulator_linear._tiles(torch.empty(0)).min_split_k + 1
    x = torch.randn(tokens, n, device=DEVICE).requires_grad_()
    check_forward_backward(x, params, torch.float32)
    assert calls == ["emulator_linear_forward", "emulator_linear_backward"]
    assert len(projection.grids) == 2 and len(expansion.grids) == 4  # y; dx, da, db
    assert any(grid[2] > 1 for grid in expansion.grids), f"no split-K launch among {expansion.grids}"


# Run in a fresh interpreter without TRITON_INTERPRET, so that the kernels are compilable JITFunctions.
# The launchers run for real on CPU tensors with their GPU tile configuration; the kernel objects are
# replaced by recorders, and each recorded launch is compiled for sm_90 (no GPU needed). The device check,
# which refuses CPU tensors outside the interpreter, is lifted: no kernel runs on them.
_COMPILE_LAUNCHES_FOR_HOPPER = """
import contextlib, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from emloc_kernels.triton import emulator_linear as K

launches = []
def recorder(kernel):
    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((kernel, args, kwargs))
    return Recorder()
K._projection_kernel, K._expansion_kernel = recorder(K._projection_kernel), recorder(K._expansion_kernel)
K.on_device = lambda op, *tensors: contextlib.nullcontext()

bf16, fp32 = torch.bfloat16, torch.float32
x, dy = torch.randn(300, 64, dtype=bf16), torch.randn(300, 48, dtype=bf16)
v, u, bias = torch.randn(16, 64, dtype=bf16), torch.randn(48, 16, dtype=bf16), torch.randn(48, dtype=bf16)
a, b = torch.randn(8, 64, dtype=fp32), torch.randn(48, 8, dtype=fp32)
_, xa = K.emulator_linear_forward(x, v, u, bias, a, b, 0.5)
K.emulator_linear_backward(dy, x, xa, v, u, a, b, 0.5)

types = {fp32: "*fp32", bf16: "*bf16"}
for kernel, args, kwargs in launches:
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages")}
    runtime = [name for name in kernel.arg_names if name not in kwargs]
    signature = {name: types[arg.dtype] if isinstance(arg, torch.Tensor) else "fp32" if isinstance(arg, float)
                 else "i32" for name, arg in zip(runtime, args)}
    signature.update(dict.fromkeys(kwargs, "constexpr"))
    ptx = triton.compile(ASTSource(kernel, signature, kwargs), target=GPUTarget("cuda", 90, 32),
                         options=options).asm["ptx"]
    print(kernel.__name__, kwargs["DOT1"], kwargs["DOT2"], "wgmma" in ptx, "tf32" in ptx)
"""


def test_kernels_compile_for_hopper():
    """The interpreter accepts code the compiler rejects (and ignores input_precision): compile every launch
    of a bf16 layer with an fp32 LoRA for sm_90 and read the PTX: bf16 products on tensor cores (wgmma),
    fp32 products IEEE (no TF32)."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_LAUNCHES_FOR_HOPPER], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"a kernel does not compile for sm_90:\n{done.stderr[-4000:]}"
    launches = [line.split() for line in done.stdout.splitlines()]
    # forward: [v; a] projection, y expansion; backward: [u, b] projection, dx, da, db expansions
    assert [name for name, *_ in launches] == ["_projection_kernel", "_expansion_kernel"] + \
        ["_projection_kernel"] + ["_expansion_kernel"] * 3, done.stdout
    for name, dot1, dot2, wgmma, tf32 in launches:
        assert tf32 == "False", f"{name} ({dot1}, {dot2}) multiplies with TF32"
        assert wgmma == str(dot1 == "bf16"), f"{name} ({dot1}, {dot2}): wgmma={wgmma}"


def test_empty_batch(triton_backend, seed):
    params = make_layer(7, 3, 5, 2, torch.float32)
    x = torch.randn(0, 7, device=DEVICE).requires_grad_()
    y = emloc_kernels.emulator_linear(x, *(params[k] for k in ("v", "u", "bias", "lora_a", "lora_b")), SCALING)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 7)
    assert torch.equal(params["lora_a"].grad, torch.zeros(2, 7, device=DEVICE))
    assert torch.equal(params["bias"].grad, torch.zeros(5, device=DEVICE))


def test_gradcheck_reference(seed):
    """float64 takes the reference path; its autograd formula agrees with finite differences."""
    n, r, m, k = 6, 3, 5, 2
    v, u = torch.randn(r, n, dtype=torch.float64), torch.randn(m, r, dtype=torch.float64)
    x, bias, a, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True)
                     for s in ((2, 4, n), (m,), (k, n), (m, k)))
    assert torch.autograd.gradcheck(
        lambda x, bias, a, b: emloc_kernels.emulator_linear(x, v, u, bias, a, b, SCALING), (x, bias, a, b))


@pytest.mark.parametrize("frozen", ["u", "v"])
def test_trainable_factors_are_rejected(seed, frozen):
    params = make_layer(8, 3, 6, 2, torch.float32)
    params[frozen].requires_grad_()
    with pytest.raises(ValueError, match="u and v are frozen"):
        emloc_kernels.emulator_linear(torch.randn(4, 8), *(params[k] for k in ("v", "u", "bias", "lora_a", "lora_b")))


@pytest.mark.parametrize("lora", [True, False])
def test_meta_tensors_flow_through(lora):
    """Shapes and dtypes come out of the fake implementations, forward and backward, without any data."""
    params = make_layer(4096, 512, 11008, 8, torch.bfloat16, lora_dtype=torch.float32, lora=lora, device="meta")
    x = torch.randn(2, 1000, 4096, dtype=torch.bfloat16, device="meta", requires_grad=True)
    y = emloc_kernels.emulator_linear(x, *(params[k] for k in ("v", "u", "bias", "lora_a", "lora_b")), SCALING)
    assert (y.device.type, y.shape, y.dtype) == ("meta", (2, 1000, 11008), torch.bfloat16)
    y.sum().backward()
    for t in (x, *(params[k] for k in ("bias", "lora_a", "lora_b") if params[k] is not None)):
        assert (t.grad.device.type, t.grad.shape, t.grad.dtype) == ("meta", t.shape, t.dtype)


def test_torch_compile_fullgraph_matches_eager(seed):
    """An EmulatorLinear with LoRA compiled whole (inductor, CPU): same output and gradients as eager."""
    params = make_layer(19, 5, 13, 3, torch.float32)
    layers = []
    for _ in range(2):
        layer = EmulatorLinear.from_factors(params["u"], params["v"], params["bias"].detach())
        layer.bias.requires_grad_()
        layer.add_lora(3, alpha=6)
        with torch.no_grad():
            layer.lora_a.copy_(params["lora_a"])
            layer.lora_b.copy_(params["lora_b"])
        layers.append(layer)
    eager, compiled = layers
    x, grad_y = torch.randn(2, 7, 19, device=DEVICE), torch.randn(2, 7, 13, device=DEVICE)
    results = []
    for layer, forward in ((eager, eager), (compiled, torch.compile(compiled, fullgraph=True))):
        xi = x.clone().requires_grad_()
        y = forward(xi)
        y.backward(grad_y)
        results.append([y, xi.grad, layer.bias.grad, layer.lora_a.grad, layer.lora_b.grad])
    for name, got, want in zip(["y", "x", "bias", "lora_a", "lora_b"], results[1], results[0], strict=True):
        assert_close(got, want, torch.float32, what=f"compiled {name}")
