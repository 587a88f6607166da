"""The learning-rate schedule of training and healing: linear warm-up, then cosine decay to zero."""
from __future__ import annotations

import math

import torch


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to zero.

    The first step runs at ``1 / warmup`` of the rate, where ``warmup = ceil(warmup_ratio * total_steps)``.
    Not ``transformers.get_cosine_schedule_with_warmup``: its warm-up runs the first step at lr 0, wasting it.
    """
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
