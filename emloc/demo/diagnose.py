"""Why the correction helps or not, in numbers: how closely the original model with each adapter
reproduces the fine-tuned emulator on the test answers, and how large the correction is.

The correction's promise is local (docs/design.md §1.10): on each layer's LoRA input subspace, the original layer with
the corrected LoRA computes what the emulator layer with the trained LoRA did. These measures say how much
of the fine-tuned emulator's behaviour that recovers on the whole model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from ..build import load_emulator
from ..lora import LoraAdapter
from .task import Example, encode


@torch.no_grad()
def answer_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities ``(answer tokens, vocab)`` the model predicts at every answer position of ``batch``."""
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return torch.log_softmax(logits[batch["labels"][:, 1:] != -100].double(), dim=-1)


def correction_size(original_path: Path, trained: LoraAdapter, corrected: LoraAdapter) -> float:
    """``||s B^ A~ - s B A|| / ||s B A||`` over all layers: the correction relative to the trained update."""
    weights = {}
    for file in sorted(original_path.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    change = update = 0.0
    for name, (a, b) in trained.weights.items():
        a_hat, b_hat = corrected.weights[name]
        delta = trained.scaling * (b.double() @ a.double())
        change += float(torch.linalg.matrix_norm(corrected.scaling * b_hat.double() @ a_hat.double() - delta) ** 2)
        update += float(torch.linalg.matrix_norm(delta) ** 2)
    return (change / update) ** 0.5


@torch.no_grad()
def corrected_layer_error(original_path: Path, run_dir: Path, tokenizer: PreTrainedTokenizerBase,
                     examples: list[Example]) -> float:
    """How far the corrected original layers are from the emulator's, relative to the uncorrected ones.

    With ``E = W - W'`` and ``P`` an orthonormal basis of the LoRA's input space, a layer with the uncorrected
    adapter differs from the emulator's by ``E x``, with the corrected one by ``E (x - P P^T x)``. Returns
    ``sum ||E (x - P P^T x)||^2 / sum ||E x||^2`` over the tokens of ``examples`` (padding excluded) and the LoRA
    layers, each fed the original model's own inputs: below 1 the correction brings the layers closer to what
    the LoRA was trained on, above 1 it moves them away.
    """
    model = AutoModelForCausalLM.from_pretrained(original_path, dtype=torch.float64)
    emulator = load_emulator(run_dir / "emulator", device="cpu", dtype=torch.float64)
    trained = LoraAdapter.load(run_dir / "train" / "adapter")
    batch = encode(tokenizer, examples)
    mask = batch["attention_mask"].bool()
    corrected = total = 0.0
    hooks = []

    def measure(name: str, layer: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        nonlocal corrected, total
        emulated = emulator.get_submodule(name)
        if not hasattr(emulated, "u"):  # kept dense: no error to correct
            return
        x = inputs[0][mask]
        error = layer.weight - emulated.u @ emulated.v
        basis = torch.linalg.qr(trained.weights[name][0].double().T).Q  # (n, r): the LoRA input space
        total += float((x @ error.T).square().sum())
        outside = x - (x @ basis) @ basis.T
        corrected += float((outside @ error.T).square().sum())

    for name in trained.weights:
        layer = model.get_submodule(name)
        hooks.append(layer.register_forward_hook(lambda layer, inputs, _, name=name: measure(name, layer, inputs)))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    return corrected / total


def adapter_agreement(original_path: Path, run_dir: Path, tokenizer: PreTrainedTokenizerBase,
                      examples: list[Example]) -> dict[str, float]:
    """Compare, on the answers of ``examples``, the emulator fine-tuned by the ``emloc run`` in ``run_dir``
    with the original model carrying no adapter, the trained adapter, and the corrected one.

    Returns the mean KL divergence (nats per answer token) from the fine-tuned emulator's predictions and the
    fraction of answer tokens whose most likely token agrees with it, per variant, and ``correction_size``.
    """
    batch = encode(tokenizer, examples)
    trained = LoraAdapter.load(run_dir / "train" / "adapter")
    corrected = LoraAdapter.load(run_dir / "corrected")
    emulator = load_emulator(run_dir / "emulator", device="cpu")
    trained.apply_to(emulator)
    reference = answer_log_probs(emulator, batch)
    result = {"correction_size": correction_size(original_path, trained, corrected)}
    for variant, adapter in (("no adapter", None), ("uncorrected", trained), ("corrected", corrected)):
        model = AutoModelForCausalLM.from_pretrained(original_path, dtype=torch.float32)
        if adapter is not None:
            adapter.apply_to(model)
        log_probs = answer_log_probs(model, batch)
        kl = (reference.exp() * (reference - log_probs)).sum(-1).mean()
        result[f"kl {variant}"] = float(kl)
        result[f"agree {variant}"] = float((reference.argmax(-1) == log_probs.argmax(-1)).double().mean())
    return result
