"""Evaluation on held-out examples: mean target-token loss and exact-match accuracy of chat answers."""
from __future__ import annotations

import torch
from torch import nn

from ..data import IGNORE, collate, target_tokens
from .loss import CausalLMLoss, image_inputs
from .placement import compute_device


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], batch_size: int = 4, chunk: int = 1024,
             pad_id: int = 0) -> dict[str, float]:
    """Mean target-token loss and exact-match accuracy of chat answers on ``examples``.

    An answer counts as exact when the argmax after every prefix of it is its next token, which is exactly
    when greedy decoding from the prompt reproduces the answer token for token, so no generation is needed.
    """
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    device = compute_device(model)
    loss_module = CausalLMLoss(model, chunk)
    total_loss, exact, answers = 0.0, 0, 0
    normalizer = target_tokens(examples)
    for start in range(0, len(examples), batch_size):
        part = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        loss, correct = loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"], normalizer,
                                    **image_inputs(batch))
        total_loss += float(loss)
        target = torch.cat([batch["labels"][:, 1:] != IGNORE, correct.new_zeros(len(part), 1)], dim=1)
        hit = (correct | ~target).all(1)
        chat = torch.tensor([e.get("chat", False) for e in part], device=device)
        exact += int((hit & chat).sum())
        answers += int(chat.sum())
    model.train(was_training)
    result = {"eval_loss": total_loss}
    if answers:
        result["eval_exact_match"] = exact / answers
    return result
