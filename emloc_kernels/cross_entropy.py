"""Cross entropy through a frozen LM head without its logits: ``softcap(hidden @ weight^T)`` a chunk at a time.

A vocabulary of 152k makes the fp32 logits of one 2048-token sequence 1.2 GB, more than everything else a
LoRA step on a small emulator holds. Here each block of ``chunk`` rows gets its logits, log-sum-exp, loss
and hidden-state gradient before the next block starts, so at most one ``(chunk, vocab)`` block exists at a
time (about three fp32 copies of it at the peak: logits, softmax, and the soft-capped values). The gradient
is computed in the forward pass and kept for backward, which then only scales it: backward needs no logits.

This is a :class:`torch.autograd.Function`, not a ``torch.library`` custom op: the memory dry run measures
the chunk's logits because each chunk's ops dispatch one by one through its tracker, where a custom op's
fake implementation would hide them; and there is no Triton kernel for a backend to choose.
:func:`emloc_kernels.reference.lm_head_cross_entropy` (full logits) is the specification it is tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor


class _LMHeadCrossEntropy(torch.autograd.Function):
    """Summed token cross entropy over ``normalizer``; the hidden gradient is formed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, normalizer: Tensor, chunk: int,
                softcap: float | None, ignore_index: int) -> tuple[Tensor, Tensor]:
        n, acc = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        loss = hidden.new_zeros((), dtype=acc)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            logits = (h @ weight.T).to(acc)
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            valid = y != ignore_index
            target = y.masked_fill(~valid, 0)[:, None]
            lse = torch.logsumexp(logits, dim=-1)
            loss = loss + ((lse - logits.gather(1, target)[:, 0]) * valid).sum()
            correct[start:start + chunk] = (logits.argmax(-1) == y) & valid
            if grad is not None:
                g = torch.exp(logits - lse[:, None])  # softmax, reusing the logsumexp
                g.scatter_add_(1, target, torch.full_like(target, -1, dtype=g.dtype))
                g *= (valid / normalizer)[:, None]
                if softcap:
                    g *= 1 - capped * capped
                grad[start:start + chunk] = g.to(h.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return loss / normalizer, correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_correct: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, normalizer: Tensor | float,
                          chunk: int = 1024, softcap: float | None = None,
                          ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Cross entropy of ``softcap(hidden @ weight^T)`` against ``labels``, summed and divided by ``normalizer``.

    Args:
        hidden: ``(N, h)`` final hidden states, any strides, aligned with ``labels`` (row t predicts label t).
        weight: ``(V, h)`` LM-head weight in the dtype of ``hidden``; frozen (no gradient flows to it).
        labels: ``(N,)`` integer token ids, ``ignore_index`` where there is no loss.
        normalizer: what the summed loss is divided by (the global number of target tokens, so that
            accumulation and data parallelism reproduce one big batch).
        chunk: rows per block; peak extra memory is about ``3 * chunk * V`` fp32 values.
        softcap: final logit soft-capping ``c * tanh(logits / c)`` (Gemma 2), or None.
        ignore_index: the label of tokens without loss.

    Returns ``(loss, correct)``: the scalar loss, differentiable in ``hidden`` (gradient in its dtype), and a
    bool ``(N,)`` telling where the argmax of the logits is the label (False where it is ignored). The logits
    come out of the GEMM in the dtype of ``hidden``; the softmax and the loss are fp32 (fp64 for fp64 inputs).
    """
    if hidden.ndim != 2 or weight.ndim != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"lm_head_cross_entropy: hidden (N, h) and weight (V, h) do not fit: hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"lm_head_cross_entropy: labels must be integer token ids of shape ({hidden.shape[0]},), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"lm_head_cross_entropy: chunk must be an int >= 1, got {chunk!r}")
    normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=hidden.device)
    return _LMHeadCrossEntropy.apply(hidden, weight.detach(), labels, normalizer, chunk, softcap, ignore_index)
