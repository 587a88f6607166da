"""LoRA correction (docs/design.md §1.10): the corrected LoRA on the original layer reproduces the emulator +
trained LoRA on the LoRA input space and the original layer off it, for every alpha, rank and rsLoRA; the clamp
caps each direction's correction. Property tests run in float64 on random layers; the file-level path reads real
shards."""
from __future__ import annotations

import math

import pytest
import torch

from emloc.correction import correct_layer, orthonormalize_lora
from emloc.layers import lora_scaling
from emloc_kernels import whitened_lowrank, whitening
from utils import assert_close, rel_error

# (r, alpha, rslora): alpha == r is the only case a correction without the division by s gets right.
SCALINGS = [(4, 4.0, False), (4, 16.0, False), (8, 2.0, False), (3, 7.0, True), (8, 32.0, True)]


def random_layer(m: int, n: int, k: int, emulator_rank: int, dtype=torch.float64):
    """An original weight, its activation-aware rank-``emulator_rank`` emulator factors and a 'trained' LoRA."""
    weight = torch.randn(m, n, dtype=dtype) / math.sqrt(n)
    x = torch.randn(4 * n, n, dtype=dtype) * torch.linspace(0.2, 2.0, n, dtype=dtype)
    u, v = whitened_lowrank(weight, whitening(x.T @ x), emulator_rank)
    a = torch.randn(k, n, dtype=dtype) / math.sqrt(n)
    b = torch.randn(m, k, dtype=dtype) / math.sqrt(k)
    return weight, u.to(dtype), v.to(dtype), a, b


@pytest.mark.parametrize("r, alpha, rslora", SCALINGS)
def test_corrected_lora_reproduces_emulator_on_lora_space(seed, r, alpha, rslora):
    m, n = 37, 29
    weight, u, v, a, b = random_layer(m, n, r, emulator_rank=7)
    s = lora_scaling(r, alpha, rslora)
    a_t, b_hat = correct_layer(a, b, s, weight, (u, v), clamp=None)

    x_par = torch.randn(11, r, dtype=torch.float64) @ a  # rows of A span the LoRA input space
    emulator_out = x_par @ (u @ v).T + s * (x_par @ a.T) @ b.T
    corrected_out = x_par @ weight.T + s * (x_par @ a_t.T) @ b_hat.T
    err_par = assert_close(corrected_out, emulator_out, rtol=1e-10, what="x in the LoRA space")

    q, _ = torch.linalg.qr(a.T)
    x_perp = torch.randn(11, n, dtype=torch.float64)
    x_perp = x_perp - (x_perp @ q) @ q.T
    corrected_perp = x_perp @ weight.T + s * (x_perp @ a_t.T) @ b_hat.T
    err_perp = assert_close(corrected_perp, x_perp @ weight.T, rtol=1e-10, what="x orthogonal to the LoRA space")

    # Without the division by s (the reference's form) the x_par identity fails unless s == 1.
    a_ref, b_ref = correct_layer(a, b, 1.0, weight, (u, v), clamp=None)  # B~ - D: no division by s
    wrong = x_par @ weight.T + s * (x_par @ a_ref.T) @ b_ref.T
    if not math.isclose(s, 1.0):
        assert rel_error(wrong, emulator_out) > 1e3 * max(err_par, 1e-14)
    print(f"r={r} alpha={alpha} rslora={rslora}: rel err on LoRA space {err_par:.2e}, orthogonal {err_perp:.2e}")


def test_orthonormalized_lora_keeps_the_product(seed):
    a, b = torch.randn(5, 23, dtype=torch.float64), torch.randn(19, 5, dtype=torch.float64)
    a_t, b_t = orthonormalize_lora(a, b)
    assert_close(a_t @ a_t.T, torch.eye(5, dtype=torch.float64), rtol=1e-12, what="A~ A~^T")
    assert_close(b_t @ a_t, b @ a, rtol=1e-12, what="B~ A~")


@pytest.mark.parametrize("r, alpha, rslora", SCALINGS[1:4])
def test_clamp_caps_each_direction(seed, r, alpha, rslora):
    m, n = 31, 26
    weight, u, v, a, b = random_layer(m, n, r, emulator_rank=3)
    s = lora_scaling(r, alpha, rslora)
    a_t, b_free = correct_layer(a, b, s, weight, (u, v), clamp=None)
    _, b_t = orthonormalize_lora(a, b)
    # Put the cap between the directions' own ratios, so some directions are clamped and others not.
    ratios = ((b_t - b_free).abs().mean(0) / b_t.abs().mean(0)).sort().values
    clamp = float(ratios[r // 2 - 1] + ratios[r // 2]) / 2
    _, b_clamped = correct_layer(a, b, s, weight, (u, v), clamp=clamp)

    free = (b_t - b_free).abs().mean(0)  # |correction| per direction without the clamp
    capped = (b_t - b_clamped).abs().mean(0)
    limit = clamp * b_t.abs().mean(0)
    over = free > limit
    assert over.any() and (~over).any(), f"test layer should have clamped and free directions: {free / limit}"
    assert_close(capped[over], limit[over], rtol=1e-12, what="clamped directions at the cap")
    assert_close(b_clamped[:, ~over], b_free[:, ~over], rtol=1e-12, what="directions under the cap unchanged")
    # A clamped direction keeps the correction's direction, only its size shrinks.
    cos = torch.nn.functional.cosine_similarity(b_t - b_clamped, b_t - b_free, dim=0)
    assert torch.all(cos > 1 - 1e-12)


def test_dense_emulated_layer_gets_no_correction(seed):
    weight, _, _, a, b = random_layer(17, 13, 4, emulator_rank=3)
    a_t, b_hat = correct_layer(a, b, 2.0, weight, weight.clone(), clamp=None)
    assert_close(b_hat @ a_t, b @ a, rtol=1e-12, what="LoRA product of an uncompressed layer")
