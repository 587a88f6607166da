"""covariance_update: the Triton kernel (interpreted without a GPU), and the torch backend's panelled
upper-triangle product, against a float64 reference.

The result is fp32 and a product of two fp16/bf16 values is exact in fp32, so every input dtype is held
to the fp32 bound: the only error left is fp32 accumulation.
"""
import pytest
import torch
import triton
import triton.language as tl

from emloc_kernels import covariance_update, reference
from emloc_kernels.backend import use_triton
from emloc_kernels.triton.covariance import _tile_pair
from layer_shapes import covariance_cases
from utils import DEVICE, FLOAT_DTYPES, REL_TOL, assert_close, non_contiguous

TORCH_UPDATE = reference.covariance_update  # kept before the autouse fixture makes it unreachable

TOL = REL_TOL[torch.float32]
# 1, odd, and sizes that are not multiples of the fp32 (64) or 16-bit (128) tile; 130 spans several tiles.
FEATURES = (1, 37, 130)
# 1 token, and a token count that spans two blocks and ends mid-block (the kernel walks 32 at a time).
TOKENS = (1, 45)


@pytest.fixture(autouse=True)
def triton_only(monkeypatch):
    """Force the Triton backend and make the reference unreachable, so a silent fallback fails the test."""
    monkeypatch.setenv("EMLOC_BACKEND", "triton")

    def no_reference(*args, **kwargs):
        raise AssertionError("covariance_update fell back to the torch reference")

    monkeypatch.setattr(reference, "covariance_update", no_reference)


def random_covariance(n: int) -> torch.Tensor:
    """A symmetric PSD fp32 start value, as left by earlier updates: the in-place add must keep it."""
    a = torch.randn(n, 8, device=DEVICE)
    return a @ a.T


def expected(cov0: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``cov0 + x_sel^T x_sel`` from the same (already rounded) input values."""
    x = x.reshape(-1, x.shape[-1]).double()
    if mask is not None:
        x = x[mask.reshape(-1)]
    return cov0.double() + x.T @ x


def test_triton_backend_is_chosen():
    cov, x = torch.zeros(4, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    assert use_triton("covariance_update", cov, x)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("n", FEATURES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("masked", (False, True), ids=("all", "mask"))
def test_matches_float64(seed, dtype, n, T, masked):
    x = torch.randn(T, n, device=DEVICE).to(dtype)
    mask = torch.rand(T, device=DEVICE) < 0.6 if masked else None
    cov0 = random_covariance(n)
    cov = cov0.clone()
    assert covariance_update(cov, x, mask) is cov
    assert_close(cov, expected(cov0, x, mask), rtol=TOL, what=f"cov (seed {seed})")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", covariance_cases())
def test_layer_shapes_match_float64(seed, dtype, shape):
    """One padded calibration micro-batch at a real layer width: thousands of tile pairs, int64 offsets."""
    T, n = shape
    x = torch.randn(T, n, device=DEVICE).to(dtype)
    mask = torch.rand(T, device=DEVICE) >= 0.1
    cov0 = random_covariance(n)
    cov = cov0.clone()
    covariance_update(cov, x, mask)
    assert_close(cov, expected(cov0, x, mask), rtol=TOL, what=f"cov (seed {seed})")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_three_dim_non_contiguous_with_attention_mask(seed, dtype):
    batch, seq, n = 3, 23, 70
    x = non_contiguous(torch.randn(batch, seq, n, device=DEVICE).to(dtype))
    lengths = torch.randint(1, seq + 1, (batch,), device=DEVICE)
    mask = torch.arange(seq, device=DEVICE)[None, :] < lengths[:, None]  # right padding
    cov0 = random_covariance(n)
    cov = cov0.clone()
    covariance_update(cov, x, mask)
    assert_close(cov, expected(cov0, x, mask), rtol=TOL, what=f"cov (seed {seed})")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_column_major_x_and_strided_cov(seed, dtype):
    T, n = 50, 45
    x = torch.randn(n, T, device=DEVICE).to(dtype).T  # strides (1, T)
    cov0 = random_covariance(n)
    cov = torch.empty(n, 2 * n, device=DEVICE)[:, ::2]  # poisoned buffer; only the view is read
    cov.copy_(cov0)
    covariance_update(cov, x)
    assert_close(cov, expected(cov0, x), rtol=TOL, what=f"cov (seed {seed})")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_mask_selecting_nothing_leaves_cov_bit_for_bit(seed, dtype):
    x = torch.randn(40, 130, device=DEVICE).to(dtype)
    cov0 = random_covariance(130)
    cov = cov0.clone()
    covariance_update(cov, x, torch.zeros(40, dtype=torch.bool, device=DEVICE))
    assert torch.equal(cov, cov0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_in_masked_out_rows_never_reaches_cov(seed, dtype):
    T, n = 45, 70
    x = torch.randn(T, n, device=DEVICE).to(dtype)
    mask = torch.rand(T, device=DEVICE) < 0.5
    mask[0], mask[-1] = False, True
    x[~mask] = float("nan")
    cov0 = random_covariance(n)
    cov = cov0.clone()
    covariance_update(cov, x, mask)
    assert_close(cov, expected(cov0, x, mask), rtol=TOL, what=f"cov (seed {seed})")


def test_accumulates_over_calls(seed):
    n = 70
    chunks = [torch.randn(T, n, device=DEVICE).to(dtype) for T, dtype in ((1, torch.float32), (33, torch.float16),
                                                                         (64, torch.bfloat16), (17, torch.float32))]
    masks = [torch.rand(c.shape[0], device=DEVICE) < 0.7 for c in chunks]
    cov = torch.zeros(n, n, device=DEVICE)
    for chunk, mask in zip(chunks, masks, strict=True):
        covariance_update(cov, chunk, mask)
    want = torch.zeros(n, n, dtype=torch.float64, device=DEVICE)
    for chunk, mask in zip(chunks, masks, strict=True):
        want = expected(want, chunk, mask)
    assert_close(cov, want, rtol=TOL, what=f"cov after {len(chunks)} calls (seed {seed})")


def test_empty_token_batch_is_a_no_op(seed):
    cov0 = random_covariance(9)
    cov = cov0.clone()
    covariance_update(cov, torch.randn(0, 9, device=DEVICE))
    assert torch.equal(cov, cov0)


@triton.jit
def _tile_pairs_kernel(rows_ptr, cols_ptr, BLOCK: tl.constexpr):
    pids = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row, col = _tile_pair(pids)
    tl.store(rows_ptr + pids, row)
    tl.store(cols_ptr + pids, col)


def test_tile_pairs_enumerate_the_upper_triangle_exactly_once():
    # 1448 tiles of 64 cover 92,672 features, far beyond the widest MLP input (27,648).
    tiles = 1448
    count = tiles * (tiles + 1) // 2
    block = 1 << 14
    padded = triton.cdiv(count, block) * block
    rows = torch.empty(padded, dtype=torch.int32, device=DEVICE)
    cols = torch.empty(padded, dtype=torch.int32, device=DEVICE)
    _tile_pairs_kernel[(padded // block,)](rows, cols, BLOCK=block)
    rows, cols = rows[:count].long().cpu(), cols[:count].long().cpu()
    want_rows, want_cols = torch.triu_indices(tiles, tiles)
    order = torch.argsort(want_cols * tiles + want_rows)  # column by column, as the kernel enumerates
    assert torch.equal(rows, want_rows[order]) and torch.equal(cols, want_cols[order])


def test_meta_tensors_flow_through():
    cov = torch.empty(4096, 4096, device="meta")
    x = torch.empty(2, 512, 4096, dtype=torch.bfloat16, device="meta")
    mask = torch.empty(2, 512, dtype=torch.bool, device="meta")
    assert covariance_update(cov, x, mask) is cov


@pytest.mark.parametrize(
    "cov_shape, cov_dtype, x, mask, error, match",
    [
        ((4, 5), torch.float32, torch.randn(3, 4), None, ValueError, r"cov must be square"),
        ((4, 4), torch.float16, torch.randn(3, 4), None, TypeError, r"cov must be float32"),
        ((4, 4), torch.float32, torch.randn(3, 5), None, ValueError, r"x has 5 features, cov is \(4, 4\)"),
        ((4, 4), torch.float32, torch.ones(3, 4, dtype=torch.int32), None, TypeError, r"x must be fp32/fp16/bf16"),
        ((4, 4), torch.float32, torch.randn(2, 3, 4), torch.ones(6, dtype=torch.bool), ValueError,
         r"mask must be bool of shape \(2, 3\)"),
        ((4, 4), torch.float32, torch.randn(3, 4), torch.ones(3), ValueError, r"mask must be bool"),
        ((4, 4), torch.float32, torch.empty(3, 4, device="meta"), None, ValueError, r"x is on meta, cov on cpu"),
    ],
    ids=("non-square", "fp16-cov", "features", "int-x", "mask-shape", "mask-dtype", "device"),
)
def test_bad_input_is_a_clear_error(cov_shape, cov_dtype, x, mask, error, match):
    cov = torch.zeros(cov_shape, dtype=cov_dtype)
    with pytest.raises(error, match=r"covariance_update: " + match):
        covariance_update(cov, x, mask)
    assert not cov.any(), "a rejected call must leave cov untouched"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("n", (1, 37, 300))  # 300: two full 128-feature panels and a ragged one
@pytest.mark.parametrize("masked", (False, True), ids=("all", "mask"))
def test_torch_backend_panels_match_float64(monkeypatch, seed, dtype, n, masked):
    """The torch backend computes the upper triangle in panels and adds each below the diagonal: every entry
    of a non-symmetric start value must still receive exactly its own update."""
    monkeypatch.setenv("EMLOC_BACKEND", "torch")
    monkeypatch.setattr(reference, "covariance_update", TORCH_UPDATE)
    x = non_contiguous(torch.randn(45, n, device=DEVICE).to(dtype))
    mask = torch.rand(45, device=DEVICE) < 0.6 if masked else None
    cov0 = torch.randn(n, n, device=DEVICE)  # not symmetric: a mirror copy instead of a mirror add would show
    cov = cov0.clone()
    assert covariance_update(cov, x, mask) is cov
    assert_close(cov, expected(cov0, x, mask), rtol=TOL, what=f"cov (torch backend, seed {seed})")
