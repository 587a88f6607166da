"""The downstream task: trace a two-line Python program and state the value it asserts, by exact match.

Each example assigns a number to a variable, increments it, and asks for the result::

    q = 417
    q += 1
    assert q ==

and the answer is `` 418`` followed by a newline. The pretrained model has read plenty of assignments and
augmented assignments but never the value that follows, so it scores zero zero-shot; it learns to copy the
digits and add one (carry included) in a few hundred LoRA steps. Examples come from a seeded generator; the
test split holds programs that never occur in the train split. The task is different text from the
pretraining corpus: the standard library has no such programs.
"""
from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..data import pad_token_id


@dataclass(frozen=True)
class Example:
    """One task instance: the model reads ``prompt`` and must continue with exactly ``answer``."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskConfig:
    """Range of the numbers and size of the splits."""

    max_value: int = 998
    train_size: int = 2000
    test_size: int = 300
    seed: int = 1234


def make_example(rng: random.Random, config: TaskConfig) -> Example:
    """A random variable name and starting value, and the program that increments and queries it."""
    name = rng.choice(string.ascii_lowercase)
    value = rng.randint(0, config.max_value)
    return Example(prompt=f"{name} = {value}\n{name} += 1\nassert {name} ==", answer=f" {value + 1}\n")


def make_splits(config: TaskConfig = TaskConfig()) -> tuple[list[Example], list[Example]]:
    """Disjoint train and test splits, the same for a given ``config`` on every machine."""
    rng = random.Random(config.seed)
    seen: set[str] = set()
    examples: list[Example] = []
    while len(examples) < config.train_size + config.test_size:
        example = make_example(rng, config)
        if example.prompt not in seen:
            seen.add(example.prompt)
            examples.append(example)
    return examples[config.test_size:], examples[: config.test_size]


def write_chat_jsonl(examples: list[Example], path: Path) -> Path:
    """Write ``examples`` as chat rows (prompt as the user turn, answer as the assistant turn), the format
    ``emloc run`` trains on with the loss on the answers only."""
    rows = (json.dumps({"messages": [{"role": "user", "content": e.prompt},
                                     {"role": "assistant", "content": e.answer}]}) for e in examples)
    path.write_text("\n".join(rows) + "\n")
    return path


def encode(tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on answer tokens)."""
    rows = []
    for example in examples:
        prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    pad = pad_token_id(tokenizer)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                batch_size: int = 100) -> float:
    """Fraction of ``examples`` whose answer greedy decoding reproduces exactly, newline included.

    Greedy decoding emits the answer iff at every answer position the most likely next token is the
    answer's token given the answer so far, so one teacher-forced forward pass per batch decides it.
    """
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = encode(tokenizer, examples[start:start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted = logits[:, :-1].argmax(-1)
        targets = batch["labels"][:, 1:]
        scored = targets != -100
        correct += int(((predicted == targets) | ~scored).all(dim=1).sum())
    return correct / len(examples)
