"""Kernel benchmarks: every emloc op against the naive torch it replaces, on the same inputs.

On a GPU the ops run their Triton kernels at full 7B / 32B layer shapes in bf16. On the CPU (no GPU,
``TRITON_INTERPRET`` switched off by ``conftest.py``) every op runs its torch reference in fp32 at the
shapes scaled down 16x: the CPU figures measure the algorithms (shared whitening, output-space factors,
randomized SVD) and the library's overhead, not the kernels. Run with ``pytest benchmarks --benchmark-only``.

Baselines: ``cov += x[mask].float().T @ x[mask].float()`` (the reference implementation's hook); input-space
whitening with an eigendecomposition and a full SVD for every linear; four separate ``F.linear`` calls for
``V``, ``U``, ``A`` and ``B`` under autograd; ``F.cross_entropy`` on the full fp32 logits under autograd.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baseline_build import whitened_factors
from conftest import DEVICE, DTYPE, scaled
from emloc_kernels import (
    covariance_update,
    emulator_linear,
    lm_head_cross_entropy,
    projected_lowrank,
    whitened_lowrank,
    whitening,
)
from shapes import (
    CALIBRATION_TOKENS,
    COVARIANCE_WIDTHS,
    LINEARS,
    LM_HEAD_CHUNK,
    LM_HEADS,
    LORA_ALPHA,
    LORA_RANK,
    TRAINING_TOKENS,
    emulator_rank,
)

FACTOR_LAYERS = ("7B q", "7B up", "7B down", "32B k", "32B down")
PADDING = 0.1  # fraction of calibration tokens that are padding


def layer(name: str) -> tuple[int, int]:
    out_features, in_features = LINEARS[name]
    return scaled(out_features), scaled(in_features)


# --- covariance_update ---------------------------------------------------------------------------------


def naive_covariance(cov: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> None:
    selected = x[mask].float()
    cov.addmm_(selected.T, selected)


@pytest.mark.parametrize("impl", ("naive", "emloc"))
@pytest.mark.parametrize("width", COVARIANCE_WIDTHS)
def test_covariance_update(timed, width, impl):
    n, T = scaled(COVARIANCE_WIDTHS[width]), scaled(CALIBRATION_TOKENS)
    x = torch.randn(T, n, device=DEVICE, dtype=DTYPE)
    mask = torch.rand(T, device=DEVICE) >= PADDING
    cov = torch.zeros(n, n, device=DEVICE)
    fn = naive_covariance if impl == "naive" else covariance_update
    timed(f"covariance_update {width} n={n} T={T}", impl, fn, cov, x, mask)


# --- low-rank factors (scaled_matmul inside) -----------------------------------------------------------


def calibrated_layer(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight in the benchmark dtype and the fp32 input covariance of correlated activations (a decaying
    spectrum, as in LLMs)."""
    mixing = torch.randn(n, n, device=DEVICE) * torch.logspace(0, -3, n, device=DEVICE)
    x = torch.randn(2 * n, n, device=DEVICE) @ mixing
    return (torch.randn(m, n, device=DEVICE) / n**0.5).to(DTYPE), x.T @ x


@pytest.mark.parametrize("impl", ("naive", "emloc exact", "emloc randomized"))
@pytest.mark.parametrize("name", FACTOR_LAYERS)
def test_lowrank_factors(timed, name, impl):
    m, n = layer(name)
    rank = emulator_rank(m, n)
    weight, cov = calibrated_layer(m, n)
    group = f"lowrank factors {name} {m}x{n} r={rank}"
    if impl == "naive":
        timed(group, impl, whitened_factors, weight, cov, rank, rounds=3)
        return
    method = impl.split()[1]
    # emloc's route: the whitened form where m >= n, the output-space form where m < n (docs/design.md §1.4).
    if m >= n:
        timed(group, impl, lambda: whitened_lowrank(weight, whitening(cov), rank, method=method), rounds=3)
    else:
        out_cov = weight.float() @ cov @ weight.float().T  # accumulated by covariance_update from the outputs
        timed(group, impl, lambda: projected_lowrank(weight, out_cov, rank, method=method), rounds=3)


# --- emulator_linear -----------------------------------------------------------------------------------


def naive_emulator(x, v, u, bias, lora_a, lora_b, scaling):
    return F.linear(F.linear(x, v), u, bias) + scaling * F.linear(F.linear(x, lora_a), lora_b)


def forward_backward(fn, grad, *args):
    fn(*args).backward(grad)


@pytest.mark.parametrize("impl", ("naive", "emloc"))
@pytest.mark.parametrize("passes", ("forward", "forward+backward"))
@pytest.mark.parametrize("name", LINEARS)
def test_emulator_linear(timed, name, passes, impl):
    m, n = layer(name)
    T, r = scaled(TRAINING_TOKENS), emulator_rank(m, n)

    def param(*shape, grad=False):
        return (torch.randn(*shape, device=DEVICE, dtype=DTYPE) / shape[-1] ** 0.5).requires_grad_(grad)

    training = passes == "forward+backward"
    x = param(T, n, grad=training)
    args = (x, param(r, n), param(m, r), param(m), param(LORA_RANK, n, grad=training),
            param(m, LORA_RANK, grad=training), LORA_ALPHA / LORA_RANK)
    fn = naive_emulator if impl == "naive" else emulator_linear
    group = f"emulator_linear {passes} {name} {m}x{n} r={r} T={T}"
    if training:
        timed(group, impl, forward_backward, fn, torch.randn(T, m, device=DEVICE, dtype=DTYPE), *args)
    else:
        with torch.no_grad():
            timed(group, impl, fn, *args)


# --- lm_head_cross_entropy -----------------------------------------------------------------------------


def naive_lm_head_loss(hidden, weight, labels, normalizer):
    """The full ``(T, vocab)`` fp32 logits, then cross entropy, as a plain training loop computes it."""
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum") / normalizer


def loss_backward(fn, *args):
    fn(*args).backward()


@pytest.mark.parametrize("impl", ("naive", "emloc"))
@pytest.mark.parametrize("model", LM_HEADS)
def test_lm_head_cross_entropy(timed, model, impl):
    vocab, hidden_size = (scaled(size) for size in LM_HEADS[model])
    T, chunk = scaled(TRAINING_TOKENS), scaled(LM_HEAD_CHUNK)
    hidden = torch.randn(T, hidden_size, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE) / hidden_size**0.5).to(DTYPE)
    labels = torch.randint(0, vocab, (T,), device=DEVICE)
    if impl == "naive":
        fn = naive_lm_head_loss
    else:
        def fn(*args):
            return lm_head_cross_entropy(*args, chunk=chunk)[0]
    group = f"lm_head_cross_entropy forward+backward {model} vocab={vocab} h={hidden_size} T={T} chunk={chunk}"
    timed(group, impl, loss_backward, fn, hidden, weight, labels, float(T))
