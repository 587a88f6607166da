"""The reference emulator construction of docs/design.md §1.1-1.3, written plainly: the yardstick for ``emloc build``.

It follows the reference implementation's route on purpose, without any of emloc's savings:

* the whole original model is loaded and run over the calibration batches, a hook on every linear of the
  decoder blocks accumulating that linear's own input covariance ``C = X^T X`` in fp32, padding excluded
  (q, k, v and gate, up each keep a separate copy of the same matrix);
* every linear then gets its own eigendecomposition of ``C`` (whitening, §1.2) and a full SVD of
  ``W S`` (§1.3), in the input-space form everywhere, even where the output space is smaller.

Plain torch only (no emloc code), so it also checks the production build rather than repeating it.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from emloc.ranks import compressed_rank  # the ranks the build picks (the reference is the algorithm)

EIGEN_CLAMP = 1e-7  # relative to trace(C) / n, as in the reference implementation


@dataclass
class LowRank:
    """The emulated linear ``y = u (v x) + bias``, with the weight and input covariance it was built from."""

    u: Tensor  # (m, r)
    v: Tensor  # (r, n)
    bias: Tensor | None
    weight: Tensor  # (m, n), the original
    covariance: Tensor  # (n, n), X^T X over the calibration tokens


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder block stack (the first ModuleList of the base model)."""
    stack_name, _ = next((name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList))
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(stack_name + ".")
    }


def input_covariances(model: nn.Module, linears: dict[str, nn.Linear],
                      batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """``X^T X`` of every linear's input over the non-padding tokens of ``batches`` (input_ids, attention_mask).

    One full forward of the original model per batch, on the model's device; each linear's hook keeps its
    own fp32 accumulator there.
    """
    device = next(model.parameters()).device
    covariances = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in linears.items()}
    current_mask: list[Tensor] = []

    def accumulate(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0][current_mask[0]].float()
            covariances[name].addmm_(x.T, x)
        return hook

    handles = [module.register_forward_hook(accumulate(name)) for name, module in linears.items()]
    try:
        with torch.no_grad():
            for input_ids, attention_mask in batches:
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                current_mask[:] = [attention_mask.bool()]
                # The base model only: the LM head's logits are not needed for any covariance.
                model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return covariances


def whitened_factors(weight: Tensor, covariance: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """docs/design.md §1.2 + §1.3: ``C = S S^T`` by eigh (normalised, clamped), full SVD ``W S = P diag(sigma) R^T``,
    ``u = P_r diag(sqrt sigma_r)``, ``v = diag(sqrt sigma_r) R_r^T S^-1``."""
    n = covariance.shape[0]
    norm = covariance.diagonal().sum() / n
    eigvals, basis = torch.linalg.eigh(covariance / norm)
    scale = (eigvals.clamp_min(EIGEN_CLAMP) * norm).sqrt()
    s = basis * scale  # S = Q diag(sqrt L)
    s_inv = basis.T / scale[:, None]  # S^-1 = diag(1 / sqrt L) Q^T
    left, sigma, right_t = torch.linalg.svd(weight.float() @ s, full_matrices=False)
    root = sigma[:rank].sqrt()
    return left[:, :rank] * root, (root[:, None] * right_t[:rank]) @ s_inv


def baseline_build(model_path: str | os.PathLike, batches: Iterable[tuple[Tensor, Tensor]], ratio: float,
                   output_dir: str | os.PathLike | None = None, device: str = "cpu") -> dict[str, LowRank]:
    """Build the emulator of the checkpoint at ``model_path`` the reference way, in fp32 (on the CPU unless
    ``device`` says otherwise: ``make gpu-check`` times it on the GPU).

    Args:
        model_path: a transformers causal-LM directory (loaded whole).
        batches: calibration ``(input_ids, attention_mask)`` pairs; padding (mask 0) never enters a covariance.
        ratio: the fraction of parameters kept by every linear of the decoder blocks.
        output_dir: if given, the emulator's weights are written there as ``model.safetensors``.
        device: where the whole model, its covariances and the factorisations live.

    Returns:
        The factors of every compressed linear, by module name, on ``device``.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    linears = block_linears(model)
    covariances = input_covariances(model, linears, batches)
    factors = {}
    for name, linear in linears.items():
        rank = compressed_rank(ratio, linear.out_features, linear.in_features)
        if rank is None:
            continue
        weight = linear.weight.detach()
        u, v = whitened_factors(weight, covariances[name], rank)
        bias = None if linear.bias is None else linear.bias.detach()
        factors[name] = LowRank(u=u, v=v, bias=bias, weight=weight, covariance=covariances[name])
    if output_dir is not None:
        save_emulator(model, factors, Path(output_dir))
    return factors


def save_emulator(model: nn.Module, factors: dict[str, LowRank], output_dir: Path) -> Path:
    """Write the model's weights with every compressed linear's weight replaced by its ``u``, ``v`` factors."""
    state, stored = {}, set()
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if tensor.data_ptr() in stored:  # a tied weight is written once
            continue
        stored.add(tensor.data_ptr())
        if module in factors and leaf == "weight":
            state[f"{module}.u"] = factors[module].u.contiguous()
            state[f"{module}.v"] = factors[module].v.contiguous()
        else:
            state[name] = tensor.contiguous()
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "model.safetensors"
    partial = path.with_suffix(".partial")
    save_file(state, str(partial))
    partial.replace(path)
    return path
