"""A causal LM's training loss as a module (:class:`CausalLMLoss`), and one optimizer step over micro-batches
(:func:`training_step`).

The LM head and cross entropy are chunked by :func:`emloc_kernels.lm_head_cross_entropy`, so full fp32 logits
never exist, and only positions with a target reach the LM head. As a module the loss can be wrapped by DDP
and called on meta tensors for a memory dry run.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from emloc_kernels import lm_head_cross_entropy

from ..data import IGNORE
from ..errors import UserError
from ..vision import is_vision_language
from .placement import compute_device

TEXT_INPUTS = ("input_ids", "attention_mask", "labels")


def image_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a collated batch beyond its tokens: a vision-language model's image tensors."""
    return {k: v for k, v in batch.items() if k not in TEXT_INPUTS}


class CausalLMLoss(nn.Module):
    """A causal LM's training loss as a module: embedding lookup, decoder, then the chunked LM head and cross
    entropy.

    ``forward(input_ids, attention_mask, labels, normalizer, **images) -> (loss, correct)`` with ``correct
    (B, T)`` marking tokens whose next-token argmax is the label; ``images`` are a vision-language model's
    image tensors, passed to its forward. The embedding is looked up where it lives (the host,
    after :func:`emloc.training.place_input_embedding`) and its rows moved to the LM head's device, where
    everything else runs. Wrap this module (not the model) in DDP.
    """

    def __init__(self, model: nn.Module, chunk: int = 1024) -> None:
        super().__init__()
        self.model, self.chunk = model, chunk
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise UserError("CausalLMLoss: an LM head with a bias is not supported")
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                normalizer: Tensor | float, **images: Tensor) -> tuple[Tensor, Tensor]:
        if is_vision_language(self.model.config):
            # The model's own forward below the LM head merges the image features into the embeddings.
            hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                      **images).last_hidden_state
        else:
            embedding = self.model.get_input_embeddings()
            embeds = embedding(input_ids.to(embedding.weight.device)).to(compute_device(self.model))
            hidden = self.model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                              use_cache=False).last_hidden_state
        # Position t predicts token t + 1: shift the labels, not the (large) hidden states.
        shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1).reshape(-1)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        # Only positions with a target reach the LM head: on chat data (short answers after long prompts) the
        # head over every position would be most of the step. Selecting costs one host sync per micro-batch;
        # a dry run (meta) plans for every position having a target.
        meta = hidden.device.type == "meta"
        targets = slice(None) if meta else (shifted != IGNORE).nonzero()[:, 0]
        loss, hit = lm_head_cross_entropy(hidden[targets], self.model.get_output_embeddings().weight,
                                          shifted[targets], normalizer, self.chunk, self.softcap, ignore_index=IGNORE)
        correct = hit if meta else torch.zeros_like(shifted, dtype=torch.bool).index_copy_(0, targets, hit)
        return loss, correct.view_as(labels)


def training_step(loss_module: nn.Module, micro_batches: list[dict[str, Tensor]], normalizer: Tensor | float,
                  optimizer: torch.optim.Optimizer, scheduler, parameters: list[Tensor],
                  max_grad_norm: float | None) -> Tensor:
    """One optimizer step: forward and backward over ``micro_batches`` (gradients accumulate), clip, step.

    Each micro-batch's loss is its summed token loss over ``normalizer`` (the global target-token count), so
    accumulation and data parallelism reproduce one big batch. Under DDP, gradients are reduced on the last
    micro-batch only. Returns the summed loss as a tensor (its only host syncs select the target positions).
    """
    total = None
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = loss_module.no_sync() if isinstance(loss_module, nn.parallel.DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with sync:
            loss, _ = loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"], normalizer,
                                  **image_inputs(batch))
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total
