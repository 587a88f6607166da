"""Healing the emulator (docs/design.md, "Healing the emulator"): distil the original model into the emulator
on the calibration texts before any task training, and fold the result into the factors.

A compressed model differs from the original in ways a task LoRA trained on it would otherwise learn to
repair, and such a repair does not transfer back to the original. Healing takes that work away first:

1. the build streams the original blocks over the calibration samples anyway; the last block's outputs
   (the *teacher* states, ``tokens x hidden`` per sample, kept on the host) are the original's final hidden
   states, and the emulator's own final norm and LM head, which are never compressed, turn them into the
   original's next-token distribution, so the teacher costs no extra pass and no stored logits;
2. a heal adapter of rank ``k`` on every compressed linear is trained to minimise the KL divergence from the
   teacher's distribution to the emulator's at every real token (:func:`heal`);
3. it is merged into the factors, ``U' = [U, s B]`` and ``V' = [V; A]`` (:func:`merge_heal`), so the healed
   emulator is an ordinary emulator of rank ``r + k``. The build lowers each base rank by ``k`` beforehand,
   so a healed emulator has exactly the parameters of an unhealed one at the same ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from . import models
from .calibration import CalibrationBatch
from .layers import EmulatorLinear
from .progress import track
from .training import compute_device, cosine_schedule, enable_checkpointing, place_input_embedding

__all__ = ["HealConfig", "heal", "heal_loss", "heal_rank", "lm_head_kl_divergence", "merge_heal", "teacher_states"]


@dataclass(frozen=True)
class HealConfig:
    """Settings of the healing step of a build.

    ``rank`` is the heal adapter's rank per compressed linear (at most half of the linear's rank budget, see
    :func:`heal_rank`); ``steps`` optimizer steps of ``batch_size`` calibration samples each, AdamW at
    ``learning_rate`` with a cosine schedule and ``warmup_ratio`` warm-up, ``micro_batch_size`` samples per
    forward and backward (bounds the activations); ``lm_head_chunk`` tokens per LM-head block (bounds the
    logits memory, as in training). The untied input embedding stays on the host, as in training.
    """

    rank: int = 32
    steps: int = 30
    batch_size: int = 8
    micro_batch_size: int = 1
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    max_grad_norm: float | None = 1.0
    lm_head_chunk: int = 1024
    gradient_checkpointing: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size", "micro_batch_size", "lm_head_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"heal {name}: must be a positive integer, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"heal learning_rate: must be a positive number, got {self.learning_rate!r}")


def heal_rank(config: HealConfig | None, total_rank: int) -> int:
    """The heal rank of a linear whose rank budget is ``total_rank``: ``config.rank``, but never more than half
    the budget, so the activation-aware factors keep at least as many directions as the heal adapter."""
    return 0 if config is None else min(config.rank, total_rank // 2)


class _ChunkedLMHeadKL(torch.autograd.Function):
    """``sum KL(p_teacher || p_student) / normalizer`` over rows, with the student-hidden gradient computed
    chunk by chunk in the forward pass (``(p_s - p_t) W`` per row), so no ``(N, V)`` block outlives its chunk."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, weight: Tensor, chunk: int, softcap: float | None,
                normalizer: Tensor) -> Tensor:
        total = student.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        for start in range(0, student.shape[0], chunk):
            s = (student[start:start + chunk] @ weight.T).float()
            t = (teacher[start:start + chunk] @ weight.T).float()
            if softcap:
                capped = torch.tanh(s / softcap)
                s, t = capped * softcap, torch.tanh(t / softcap) * softcap
            log_s, log_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
            p_t = log_t.exp()
            total = total + (p_t * (log_t - log_s)).sum()
            if grad is not None:
                g = (log_s.exp() - p_t) / normalizer
                if softcap:
                    g *= 1 - capped * capped
                grad[start:start + chunk] = g.to(student.dtype) @ weight
        ctx.save_for_backward(grad)
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def lm_head_kl_divergence(student: Tensor, teacher: Tensor, weight: Tensor, normalizer: Tensor | float,
                          chunk: int = 1024, softcap: float | None = None) -> Tensor:
    """KL divergence from the teacher's next-token distribution to the student's, summed over rows and divided
    by ``normalizer``; both distributions come from final hidden states ``(N, h)`` through the same frozen LM
    head ``weight (V, h)`` (and soft-capping). Differentiable in ``student`` only."""
    normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=student.device)
    return _ChunkedLMHeadKL.apply(student, teacher.detach(), weight.detach(), chunk, softcap, normalizer)


def teacher_states(model: nn.Module, batch: CalibrationBatch, last_block_output: Tensor) -> Tensor:
    """The original model's final hidden states (after the final norm) from its last block's output, through
    the emulator's own uncompressed final layers (:func:`emloc.models.final_hidden_from_block_output`)."""
    device = compute_device(model)
    return models.final_hidden_from_block_output(model, batch.input_ids.to(device),
                                                 batch.attention_mask.to(device), last_block_output.to(device))


def heal_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, teacher: Tensor,
              normalizer: Tensor | float, chunk: int = 1024) -> Tensor:
    """The healing loss of one micro-batch: KL from the teacher states ``teacher (batch, tokens, hidden)`` to
    the model's, summed over real tokens (padding left out; every token on a meta dry run) over ``normalizer``."""
    device = compute_device(model)
    weight = model.get_output_embeddings().weight
    embedding = model.get_input_embeddings()  # looked up where it lives (the host, unless tied to the head)
    embeds = embedding(input_ids.to(embedding.weight.device)).to(device)
    student = model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask.to(device),
                                  use_cache=False).last_hidden_state.reshape(-1, weight.shape[1])
    teacher = teacher.reshape(-1, weight.shape[1])
    if device.type != "meta":
        rows = attention_mask.reshape(-1).bool()
        student, teacher = student[rows.to(device)], teacher[rows.to(teacher.device)]
    return lm_head_kl_divergence(student, teacher.to(device), weight, normalizer, chunk,
                                 getattr(model.config, "final_logit_softcapping", None))


def _mean_kl(model, batches, teachers, chunk) -> float:
    """Mean per-token KL over every real token of ``batches`` (no gradients)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch, teacher in zip(batches, teachers, strict=True):
            total += float(heal_loss(model, batch.input_ids, batch.attention_mask, teacher, 1.0, chunk))
            tokens += int(batch.attention_mask.sum())
    return total / max(tokens, 1)


def _split(batches: list[CalibrationBatch], teachers: list[Tensor], size: int):
    """The calibration batches and their teacher states cut into micro-batches of at most ``size`` samples."""
    out_batches, out_teachers = [], []
    for batch, teacher in zip(batches, teachers, strict=True):
        for start in range(0, len(batch.input_ids), size):
            part = slice(start, start + size)
            out_batches.append(replace(batch, input_ids=batch.input_ids[part],
                                       attention_mask=batch.attention_mask[part]))
            out_teachers.append(teacher[part])
    return out_batches, out_teachers


def heal(model: nn.Module, batches: list[CalibrationBatch], teachers: list[Tensor], ranks: dict[str, int],
         config: HealConfig, progress: bool = True) -> tuple[dict[str, tuple[Tensor, Tensor]], dict]:
    """Train a heal adapter of ``ranks[name]`` on each named :class:`EmulatorLinear` of ``model`` to match the
    teacher states ``teachers`` (one ``(batch, tokens, hidden)`` tensor per calibration batch, host memory).

    Returns the adapter as ``{name: (A (k, n), s B (m, k))}`` in fp32 on the host, ready for
    :func:`merge_heal`, and a report (mean per-token KL on the calibration samples before and after, the
    step losses). The model is left at the reduced ranks, without the adapter: only the returned adapter,
    merged into the saved factors, is meant to be used."""
    torch.manual_seed(config.seed)
    layers = {name: model.get_submodule(name) for name in ranks}
    parameters = add_heal_adapter(model, ranks)
    place_input_embedding(model, on_device=False)
    batches, teachers = _split(batches, teachers, config.micro_batch_size)
    kl_before = _mean_kl(model, batches, teachers, config.lm_head_chunk)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    scheduler = cosine_schedule(optimizer, config.steps, config.warmup_ratio)
    per_step = max(1, math.ceil(config.batch_size / max(len(b.input_ids) for b in batches)))
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses = []
    for _ in track(range(config.steps), "healing the emulator", "step", enabled=progress):
        while len(order) < per_step:
            order += torch.randperm(len(batches), generator=generator).tolist()
        chosen, order = order[:per_step], order[per_step:]
        tokens = sum(int(batches[i].attention_mask.sum()) for i in chosen)
        total = torch.zeros(())
        for i in chosen:
            loss = heal_loss(model, batches[i].input_ids, batches[i].attention_mask, teachers[i], tokens,
                             config.lm_head_chunk)
            loss.backward()
            total = total + loss.detach().cpu()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))
    model.eval()
    kl_after = _mean_kl(model, batches, teachers, config.lm_head_chunk)
    adapter = {}
    for name, layer in layers.items():
        scaled_b = layer.lora_scaling * layer.lora_b.detach()
        adapter[name] = (layer.lora_a.detach().float().cpu(), scaled_b.float().cpu())
        layer.remove_lora()
    return adapter, {"kl_before": kl_before, "kl_after": kl_after, "losses": losses}


def add_heal_adapter(model: nn.Module, ranks: dict[str, int]) -> list[nn.Parameter]:
    """Freeze ``model`` and turn the last ``ranks[name]`` directions of each named :class:`EmulatorLinear`'s
    factors into a trainable adapter (fp32, scaling 1): ``A = V[r-k:]``, ``B = U[:, r-k:]``, the layer keeping
    rank ``r - k``. The model computes exactly what it did until the adapter trains, and healing only moves
    directions the activation-aware factorisation chose: an adapter started from random directions gives
    the emulator responses in them that the original does not have. Returns the adapter's parameters."""
    model.requires_grad_(False)
    parameters = []
    for name, k in ranks.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, EmulatorLinear):
            raise TypeError(f"heal: {name} is a {type(layer).__name__}, not an EmulatorLinear")
        keep = layer.rank - k
        layer.lora_a = nn.Parameter(layer.v[keep:].detach().float().clone())
        layer.lora_b = nn.Parameter(layer.u[:, keep:].detach().float().clone())
        layer.u = nn.Parameter(layer.u[:, :keep].detach(), requires_grad=False)
        layer.v = nn.Parameter(layer.v[:keep].detach(), requires_grad=False)
        layer.rank, layer.lora_scaling, layer.lora_dropout = keep, 1.0, 0.0
        parameters += [layer.lora_a, layer.lora_b]
    return parameters


def merge_heal(u: Tensor, v: Tensor, a: Tensor, sb: Tensor) -> tuple[Tensor, Tensor]:
    """The factors with their last ``k = len(a)`` directions replaced by the trained heal adapter:
    ``U' = [U[:, :r-k], s B]``, ``V' = [V[:r-k]; A]`` in the factors' dtype (rank unchanged)."""
    keep = u.shape[1] - a.shape[0]
    return torch.cat([u[:, :keep], sb.to(u.dtype)], dim=1), torch.cat([v[:keep], a.to(v.dtype)], dim=0)
