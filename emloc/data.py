"""Training data: a JSONL or text file -> token ids with labels, and right-padded batches.

The file's rows (:mod:`emloc.rows`) hold ``text`` (every token is a target), chat ``messages`` (role/content,
rendered with the tokenizer's chat template; only the assistant answers are targets) or ``conversations``
(ShareGPT from/value, the same). Answer tokens are found by rendering the conversation up to each answer: the
characters the answer adds are the targets, mapped to tokens through the tokenizer's offsets. Labels use -100
for tokens without loss.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from .multimodal import image_example, image_inputs, is_processor, text_tokenizer
from .rows import IGNORE, DataError, Row, check_chat_template, read_rows

__all__ = ["IGNORE", "collate", "load_examples", "pad_token_id", "split_examples", "target_tokens"]


def _chat_example(messages: list[dict], tokenizer, max_length: int, where: str) -> dict:
    check_chat_template(tokenizer, where)
    if any(not isinstance(m["content"], str) for m in messages):
        raise DataError(f"{where}: content parts (images) need a vision-language model and its processor")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so it has no answer tokens to train on")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix; "
                            "cannot tell answer tokens apart")
        spans.append((len(prompt), len(upto)))
    encoded = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length,
                        return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [tok if any(lo <= start < hi for lo, hi in spans) and end > start else IGNORE
              for tok, (start, end) in zip(ids, encoded["offset_mapping"], strict=True)]
    return {"input_ids": ids, "labels": labels, "chat": True}


def _text_example(text: str, tokenizer, max_length: int) -> dict:
    ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "labels": list(ids), "chat": False}


def _example(row: Row, tokenizer, max_length: int, base: Path) -> dict:
    messages = row.messages()
    if messages is not None and is_processor(tokenizer):
        return image_example(messages, tokenizer, max_length, row.where, base)
    if messages is not None:
        return _chat_example(messages, tokenizer, max_length, row.where)
    text = row.text()
    if text is None:
        raise row.unrecognised()
    return _text_example(text, text_tokenizer(tokenizer), max_length)


def load_examples(path: str | os.PathLike, tokenizer, max_length: int = 2048) -> list[dict]:
    """Tokenize every row of ``path`` into ``{"input_ids", "labels", "chat"}`` examples (file order). With a
    vision-language processor for ``tokenizer``, chat rows may carry images (:mod:`emloc.multimodal`) and their
    examples hold the processor's image tensors under ``"images"``.

    Raises :class:`~emloc.rows.DataError` naming the file and line for unreadable rows, chat rows without an answer, and
    data in which no example keeps any answer token (e.g. all answers truncated away by ``max_length``).
    """
    path = Path(path)
    examples = [_example(row, tokenizer, max_length, path.parent) for row in read_rows(path, "training")]
    examples = [e for e in examples if any(label != IGNORE for label in e["labels"][1:])]
    if not examples:
        raise DataError(f"{path}: no example has answer tokens to train on (empty file, or every answer "
                        f"truncated away at max_length={max_length})")
    return examples


def split_examples(examples: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, eval)``: a seeded random ``eval_fraction`` of the examples held out (at least one if > 0)."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = min(max(1, round(eval_fraction * len(examples))), len(examples) - 1) if eval_fraction > 0 else 0
    held = set(random.Random(seed).sample(range(len(examples)), n_eval))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its end-of-sequence token, else 0 (padding
    positions carry no loss and are masked from attention, so any id in the vocabulary serves)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(text_tokenizer(tokenizer), name, None)
        if value is not None:
            return int(value)
    return 0


def collate(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` into ``input_ids``, ``attention_mask`` and ``labels`` tensors (also for HF Trainer),
    with the image tensors of examples that have images (:func:`emloc.multimodal.image_inputs`)."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, **image_inputs(examples)}


def target_tokens(examples: list[dict]) -> int:
    """Number of tokens with a loss (labels after the causal shift) in ``examples``."""
    return sum(sum(label != IGNORE for label in e["labels"][1:]) for e in examples)
