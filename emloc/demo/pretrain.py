"""Rebuild the shipped demo checkpoints from a seed: ``python -m emloc.demo.pretrain [--seed 0]``.

Trains the tokenizer on the standard-library corpus, then pretrains every model of :mod:`.configs` on the
same token stream with the same recipe, and writes each as a transformers checkpoint (safetensors, config,
tokenizer, and ``pretraining.json`` with the recipe and the held-out loss) under ``emloc/assets``. Runs on
one CPU thread: a few minutes per model.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from ..progress import progress
from .configs import ASSETS, MODELS, VOCAB_SIZE, ModelSpec
from .corpus import corpus_description, stdlib_corpus
from .tokenizer import train_tokenizer


@dataclass(frozen=True)
class Recipe:
    """Pretraining hyperparameters, shared by every demo model."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    heldout_fraction: float = 0.05


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All texts tokenized and joined into one stream, each followed by the end-of-text token."""
    ids: list[int] = []
    for encoded in tokenizer(texts)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """A batch of ``seq_len``-token windows starting at random offsets of ``stream``."""
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def cosine_lr(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    fraction = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * fraction)))


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int) -> float:
    """Mean next-token loss over consecutive windows of the held-out stream."""
    model.eval()
    windows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in windows.split(32)]
    return sum(losses) / len(losses)


def pretrain(spec: ModelSpec, train: torch.Tensor, heldout: torch.Tensor,
             recipe: Recipe) -> tuple[LlamaForCausalLM, float]:
    """Pretrain ``spec`` from scratch on ``train``; returns the model and its held-out loss."""
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(spec.config())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    with progress(recipe.steps, f"pretrain {spec.name}", "step") as bar:
        for step in range(recipe.steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, recipe)
            batch = random_windows(train, recipe.batch_size, recipe.seq_len, generator)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    return model, heldout_loss(model, heldout, recipe.seq_len)


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, target: Path, info: dict) -> None:
    """Write model, tokenizer and ``pretraining.json`` to a temporary directory, then move it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "pretraining.json").write_text(json.dumps(info, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emloc.demo.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--models", nargs="+", choices=[m.name for m in MODELS], default=[m.name for m in MODELS])
    parser.add_argument("--output", type=Path, default=ASSETS, help="directory receiving one folder per model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # reproducible and polite on a shared CPU
    recipe = Recipe(seed=args.seed, steps=args.steps)

    texts = stdlib_corpus()
    tokenizer = train_tokenizer(texts, VOCAB_SIZE)
    stream = token_stream(tokenizer, texts)
    split = int(len(stream) * (1 - recipe.heldout_fraction))
    train, heldout = stream[:split], stream[split:]
    print(f"corpus: {corpus_description()}, {len(texts)} files, {len(stream):,} tokens")

    for spec in MODELS:
        if spec.name not in args.models:
            continue
        model, loss = pretrain(spec, train, heldout, recipe)
        info = {"recipe": asdict(recipe), "corpus": corpus_description(), "train_tokens": len(train),
                "heldout_tokens": len(heldout), "heldout_loss": round(loss, 4),
                "parameters": sum(p.numel() for p in model.parameters())}
        save_checkpoint(model, tokenizer, args.output / spec.name, info)
        print(f"{spec.name}: {info['parameters']:,} parameters, held-out loss {loss:.3f} -> {args.output / spec.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
