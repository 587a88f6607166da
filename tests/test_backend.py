"""Backend dispatch: when an op runs its Triton kernel and when the torch reference."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from emloc_kernels import backend, covariance_update, reference, scaled_matmul
from emloc_kernels.triton import covariance as triton_covariance
from emloc_kernels.triton import emulator_linear as triton_emulator_linear
from emloc_kernels.triton import lowrank as triton_lowrank


@pytest.fixture
def env(monkeypatch):
    """Start every case from automatic choice; the case sets what it needs."""
    monkeypatch.delenv("EMLOC_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


@pytest.fixture
def cuda():
    """Makes fake CUDA tensors: they carry a device and dtype without a GPU, and only the decision is tested."""
    mode = FakeTensorMode()

    def make(dtype=torch.float32):
        with mode:
            return torch.empty(4, 4, dtype=dtype, device="cuda")

    return make


def cpu(dtype=torch.float32):
    return torch.randn(4, 4).to(dtype)


@pytest.mark.parametrize("value", ("1", "true"))
def test_cpu_runs_triton_only_when_interpreted(env, value):
    assert not backend.use_triton("op", cpu())
    env.setenv("TRITON_INTERPRET", value)
    assert backend.use_triton("op", cpu(), None, cpu(torch.bfloat16))


@pytest.mark.parametrize("value", ("0", ""))
def test_interpreter_switched_off(env, value):
    env.setenv("TRITON_INTERPRET", value)
    assert not backend.triton_interpreted()
    assert not backend.use_triton("op", cpu())


def test_cuda_tensors_run_triton_without_interpreter(env, cuda):
    assert backend.use_triton("op", cuda())


@pytest.mark.parametrize("interpreted", (False, True))
def test_float64_takes_the_reference(env, interpreted, cuda):
    if interpreted:
        env.setenv("TRITON_INTERPRET", "1")
    assert not backend.use_triton("op", cpu(), cpu(torch.float64))
    assert not backend.use_triton("op", cuda(), cuda(torch.float64))


def test_meta_and_mixed_devices_take_the_reference(env):
    env.setenv("TRITON_INTERPRET", "1")
    meta = torch.empty(4, 4, device="meta")
    assert not backend.use_triton("op", meta)
    assert not backend.use_triton("op", cpu(), meta)


@pytest.mark.parametrize("value", ("triton", " Triton "))
def test_forced_triton(env, value, cuda):
    env.setenv("EMLOC_BACKEND", value)
    assert backend.use_triton("op", cuda())
    env.setenv("TRITON_INTERPRET", "1")
    assert backend.use_triton("op", cpu())


@pytest.mark.parametrize("value", ("torch", "TORCH"))
def test_forced_torch_wins_everywhere(env, value, cuda):
    env.setenv("EMLOC_BACKEND", value)
    env.setenv("TRITON_INTERPRET", "1")
    assert not backend.use_triton("op", cpu())
    assert not backend.use_triton("op", cuda())


@pytest.mark.parametrize("value", ("", "auto", "AUTO"))
def test_auto_values(env, value):
    env.setenv("EMLOC_BACKEND", value)
    assert backend.requested_backend() is None


def test_invalid_value_names_the_variable(env):
    env.setenv("EMLOC_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"EMLOC_BACKEND='cuda' is not one of \('torch', 'triton'\)"):
        backend.use_triton("op", cpu())
    with pytest.raises(ValueError, match=r"EMLOC_BACKEND='cuda'"):
        covariance_update(torch.zeros(4, 4), cpu())


@pytest.mark.parametrize(
    "make, interpreted, match",
    [
        (lambda: (cpu(),), False,
         r"tensors live on \['cpu'\]; Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"),
        (lambda: (torch.empty(4, 4, device="meta"),), True, r"meta tensors have no data"),
        (lambda: (cpu(torch.float64),), True, r"dtype torch.float64 has no Triton kernel"),
    ],
    ids=("cpu-not-interpreted", "meta", "float64"),
)
def test_forced_triton_where_it_cannot_run_is_an_error(env, make, interpreted, match):
    env.setenv("EMLOC_BACKEND", "triton")
    if interpreted:
        env.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match=r"EMLOC_BACKEND=triton, but my_op cannot run its Triton kernel: " + match):
        backend.use_triton("my_op", *make())


def test_missing_triton_package(env, cuda):
    env.setattr(backend, "triton_installed", lambda: False)
    assert not backend.use_triton("op", cuda())
    env.setenv("EMLOC_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="the triton package is not installed"):
        backend.use_triton("op", cuda())


class Calls:
    """Replaces a function with a recording pass-through."""

    def __init__(self, env, module, name):
        self.count, original = 0, getattr(module, name)

        def record(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        env.setattr(module, name, record)


@pytest.mark.parametrize("forced, runs_kernel", ((None, True), ("triton", True), ("torch", False)))
def test_op_dispatch_reaches_the_chosen_implementation(env, forced, runs_kernel):
    env.setenv("TRITON_INTERPRET", "1")
    if forced:
        env.setenv("EMLOC_BACKEND", forced)
    kernel = Calls(env, triton_covariance, "covariance_update")
    ref = Calls(env, reference, "covariance_update")
    cov, x = torch.zeros(5, 5), torch.randn(7, 5)
    covariance_update(cov, x)
    assert (kernel.count, ref.count) == ((1, 0) if runs_kernel else (0, 1))
    torch.testing.assert_close(cov, x.T @ x)


def test_float64_ops_run_the_reference_under_the_interpreter(env):
    env.setenv("TRITON_INTERPRET", "1")
    kernel = Calls(env, triton_covariance, "covariance_update")
    ref_cov = Calls(env, reference, "covariance_update")
    ref_matmul = Calls(env, reference, "scaled_matmul")
    cov, x = torch.zeros(5, 5, dtype=torch.float64), torch.randn(7, 5)
    covariance_update(cov, x)
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    out = scaled_matmul(a, b)
    assert (kernel.count, ref_cov.count, ref_matmul.count) == (0, 1, 1)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, a @ b, rtol=1e-12, atol=0)
    torch.testing.assert_close(cov, x.double().T @ x.double(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_upcast_dot_only_for_bf16_in_the_interpreter(monkeypatch, interpret):
    from emloc_kernels.triton.launch import upcast_dot

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    bf16, fp16, fp32 = (torch.ones(2, dtype=d) for d in (torch.bfloat16, torch.float16, torch.float32))
    assert upcast_dot(fp32, bf16, None) is (interpret == "1")
    assert upcast_dot(fp16, fp32, None) is False
    assert upcast_dot() is False


# Every launcher called straight, past the dispatch, on (4, 4) CPU tensors.
LAUNCHES = {
    "covariance_update": lambda t: triton_covariance.covariance_update(torch.zeros(4, 4), t, None),
    "scaled_matmul": lambda t: triton_lowrank.scaled_matmul(t, t, None, None, None, None),
    "emulator_linear": lambda t: triton_emulator_linear.emulator_linear_forward(t, t, t, None, None, None, 1.0),
    "emulator_linear_backward": lambda t: triton_emulator_linear.emulator_linear_backward(
        t, t, t[:, :0], t, t, None, None, 1.0),
}


@pytest.mark.parametrize("op", LAUNCHES)
def test_launchers_refuse_cpu_tensors_outside_the_interpreter(env, op):
    """A launcher called on CPU tensors outside the interpreter fails before its kernel with the dispatch's
    message, naming the op; nothing runs the reference instead."""
    kernel = Calls(env, reference, "covariance_update")
    matmul = Calls(env, reference, "scaled_matmul")
    with pytest.raises(RuntimeError, match=rf"^{op}: cannot launch its Triton kernel: tensors live on \['cpu'\]; "
                                           r"Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1$"):
        LAUNCHES[op](cpu())
    assert (kernel.count, matmul.count) == (0, 0)

