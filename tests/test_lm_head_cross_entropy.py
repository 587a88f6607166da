"""lm_head_cross_entropy: the chunked loss and its hidden-state gradient against the float64 full-logits reference.

Inputs are drawn in the tested dtype and the reference is computed in float64 from those very values, so the
measured error is the chunked path's own (logits rounded to the input dtype, fp32 softmax, gradient cast),
bounded per dtype by ``tests.utils.REL_TOL``. Fresh allocations are NaN (``conftest.poison_empty``): a chunk
whose gradient rows are never written fails the comparison.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from emloc_kernels import lm_head_cross_entropy, reference
from tests.utils import FLOAT_DTYPES, assert_close, non_contiguous

IGNORE = -100
# (tokens N, hidden h, vocab V, chunk): size one, a ragged last chunk, a chunk wider than N, chunk one.
SHAPES = [(1, 1, 1, 1), (53, 24, 97, 16), (37, 33, 250, 64), (9, 7, 11, 1)]


def make_inputs(n, h, vocab, dtype, ignore=IGNORE, ignored=0.3):
    hidden = torch.randn(n, h).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, h) / h**0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < ignored] = ignore
    return hidden, weight, labels


def check_against_reference(hidden, weight, labels, normalizer, chunk, softcap=None, ignore_index=IGNORE,
                            grad_scale=1.0, dtype=None):
    """Run the chunked loss and its backward; compare loss, hidden gradient and ``correct`` with float64."""
    dtype = dtype or hidden.dtype
    loss, correct = lm_head_cross_entropy(hidden, weight, labels, normalizer, chunk, softcap, ignore_index)
    (loss * grad_scale).backward()
    h64 = hidden.detach().double().requires_grad_()
    expected, expected_correct = reference.lm_head_cross_entropy(h64, weight.double(), labels, normalizer,
                                                                 softcap, ignore_index)
    (expected * grad_scale).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss.detach(), expected.detach(), dtype, what="loss")
    assert hidden.grad.dtype == hidden.dtype and hidden.grad.shape == hidden.shape
    assert_close(hidden.grad, h64.grad, dtype, what="hidden gradient")
    assert correct.dtype == torch.bool and correct.shape == labels.shape
    assert not correct[labels == ignore_index].any()
    if dtype == torch.float32:  # half-precision logits may flip an argmax the float64 ones barely decide
        assert torch.equal(correct, expected_correct)


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(seed, shape, dtype, softcap):
    n, h, vocab, chunk = shape
    hidden, weight, labels = make_inputs(n, h, vocab, dtype, ignored=0.3 if n > 1 else 0.0)
    check_against_reference(hidden, weight, labels, 41.0, chunk, softcap)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_non_contiguous_inputs(seed, dtype):
    """Strided hidden states and labels, a transposed-storage weight, and a non-unit upstream gradient."""
    n, h, vocab = 29, 19, 43
    hidden, weight, labels = make_inputs(n, h, vocab, dtype)
    hidden = non_contiguous(hidden.detach()).requires_grad_()
    weight = weight.T.contiguous().T
    labels = torch.stack([labels, labels], dim=1)[:, 0]
    assert not (hidden.is_contiguous() or weight.is_contiguous() or labels.is_contiguous())
    check_against_reference(hidden, weight, labels, torch.tensor(float(n)), chunk=8, softcap=15.0, grad_scale=-2.5)


def test_other_ignore_index(seed):
    """A non-negative ignore index is honoured as such, not taken for a token id."""
    n, h, vocab = 31, 12, 20
    hidden, weight, labels = make_inputs(n, h, vocab, torch.float32, ignore=3)
    assert (labels == 3).any()
    check_against_reference(hidden, weight, labels, 17.0, chunk=7, ignore_index=3)


def test_every_label_ignored_gives_zero(seed):
    hidden, weight, labels = make_inputs(10, 6, 9, torch.float32, ignored=1.0)
    loss, correct = lm_head_cross_entropy(hidden, weight, labels, 1.0, chunk=4)
    loss.backward()
    assert loss.item() == 0 and not correct.any()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_gradcheck(seed):
    """float64 through the chunks: the gradient formed in forward agrees with finite differences."""
    hidden, weight, labels = make_inputs(7, 5, 9, torch.float64)
    assert torch.autograd.gradcheck(
        lambda h: lm_head_cross_entropy(h, weight, labels, 3.0, chunk=3, softcap=2.0)[0], (hidden,))


def test_without_grad_the_loss_is_the_same(seed):
    hidden, weight, labels = make_inputs(21, 8, 30, torch.float32)
    with torch.no_grad():
        loss, _ = lm_head_cross_entropy(hidden, weight, labels, 5.0, chunk=6)
    expected, _ = reference.lm_head_cross_entropy(hidden.detach().double(), weight.double(), labels, 5.0)
    assert not loss.requires_grad
    assert_close(loss, expected, torch.float32, what="no-grad loss")


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_full_logits():
    n, h, vocab, chunk = 96, 8, 1000, 16
    hidden = torch.randn(n, h, requires_grad=True)
    weight, labels = torch.randn(vocab, h), torch.randint(0, vocab, (n,))
    with _LargestOutput() as spy:
        loss, _ = lm_head_cross_entropy(hidden, weight, labels, float(n), chunk=chunk)
        loss.backward()
    assert spy.largest == chunk * vocab  # one (chunk, vocab) block at a time, never (n, vocab)


def test_meta_tensors_flow_through():
    """The memory dry run drives the loss at full size on meta tensors: no data, no host sync."""
    with torch.device("meta"):
        hidden = torch.empty(4096, 5120, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.empty(152064, 5120, dtype=torch.bfloat16)
        labels = torch.empty(4096, dtype=torch.long)
    loss, correct = lm_head_cross_entropy(hidden, weight, labels, 100.0, chunk=1024)
    loss.backward()
    assert (loss.device.type, loss.shape, loss.dtype) == ("meta", (), torch.float32)
    assert correct.shape == (4096,) and hidden.grad.shape == hidden.shape and hidden.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("args,match", [
    (((5, 4), (9, 3), (5,)), "do not fit"),
    (((5, 4), (9, 4), (4,)), "labels must be integer token ids"),
    (((5, 4), (9, 4), (5,), 0), "chunk must be an int >= 1"),
])
def test_bad_arguments_are_named(args, match):
    hidden, weight, labels, *chunk = args
    with pytest.raises(ValueError, match=f"lm_head_cross_entropy: .*{match}"):
        lm_head_cross_entropy(torch.randn(hidden), torch.randn(weight), torch.zeros(labels, dtype=torch.long), 1.0,
                              *chunk)


def test_float_labels_are_refused():
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        lm_head_cross_entropy(torch.randn(3, 2), torch.randn(4, 2), torch.zeros(3), 1.0)
