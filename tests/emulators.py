"""In-memory emulators for tests: a tiny checkpoint loaded whole, its block linears replaced by EmulatorLinear
factors from the activation-aware SVD of a random covariance. The math is the emulator's; only the calibration
is synthetic, which is all the LoRA, training and correction tests need."""
from __future__ import annotations

import torch
import transformers
from torch import nn

from emloc import EmulatorLinear
from emloc_kernels import whitened_lowrank, whitening


def emulate_in_memory(model: nn.Module, rank: int = 6, pattern: str = "layers.") -> nn.Module:
    """Replace every ``nn.Linear`` whose name contains ``pattern`` by a rank-``rank`` EmulatorLinear, in place."""
    generator = torch.Generator().manual_seed(1234)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or pattern not in name:
            continue
        n = module.in_features
        x = torch.randn(3 * n, n, generator=generator, dtype=torch.float64)
        u, v = whitened_lowrank(module.weight.detach().double(), whitening(x.T @ x), min(rank, n, module.out_features))
        bias = None if module.bias is None else module.bias.detach().clone()
        dtype = module.weight.dtype
        model.set_submodule(name, EmulatorLinear.from_factors(u.to(dtype), v.to(dtype), bias))
    return model


def load_tiny(model_dir, dtype=torch.float32) -> nn.Module:
    """The tiny checkpoint as an ordinary transformers model (eager attention: deterministic on the CPU)."""
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
