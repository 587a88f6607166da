"""Calibration data: draw samples from a data file with a seed, tokenize, and pad into batches.

The file's rows (:mod:`emloc.rows`) hold ``text``, chat ``messages`` or ShareGPT ``conversations``, rendered
with the tokenizer's chat template; a ``.txt`` file holds one sample per non-empty line. Batches are
right-padded; their ``attention_mask`` is what keeps padding out of every covariance.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .multimodal import image_example, image_inputs
from .rows import DataError, Row, check_chat_template, data_lines, parse_row

__all__ = ["CalibrationBatch", "load_image_samples", "load_texts", "make_batches", "tokenize_samples"]


@dataclass
class CalibrationBatch:
    """Right-padded token ids ``(B, T)``, the matching bool ``attention_mask`` (True on real tokens), and for a
    vision-language model the processor's image tensors of its rows (empty when none has an image)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def _render(row: Row, tokenizer) -> str:
    text = row.text()
    if text is not None:
        return text
    messages = row.messages()
    if messages is None:
        raise row.unrecognised()
    check_chat_template(tokenizer, row.where)
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _drawn_rows(path: Path, max_samples: int, seed: int) -> list[Row]:
    """Up to ``max_samples`` rows drawn from ``path`` without replacement with ``seed`` (file order kept)."""
    lines = data_lines(path, "calibration")
    if not lines:
        raise DataError(f"{path}: calibration data is empty")
    chosen = sorted(random.Random(seed).sample(range(len(lines)), min(max_samples, len(lines))))
    return [parse_row(path, *lines[i]) for i in chosen]


def load_texts(path, tokenizer, max_samples: int = 64, seed: int = 0) -> list[str]:
    """Up to ``max_samples`` texts drawn from ``path`` without replacement with ``seed`` (file order kept).

    Only the drawn rows are parsed; a bad one is a :class:`~emloc.rows.DataError` naming the file and line."""
    return [_render(row, tokenizer) for row in _drawn_rows(Path(path), max_samples, seed)]


def load_image_samples(path, processor, max_samples: int = 64, max_length: int = 2048,
                       seed: int = 0) -> list[dict]:
    """The rows :func:`load_texts` draws, processed by a vision-language ``processor``: chat rows with their
    images (:func:`emloc.multimodal.image_example`), text rows as tokens alone."""
    path = Path(path)
    samples = []
    for row in _drawn_rows(path, max_samples, seed):
        messages = row.messages()
        if messages is not None:
            samples.append(image_example(messages, processor, max_length, row.where, path.parent))
        else:
            text = _render(row, processor.tokenizer)
            samples.append({"input_ids": tokenize_samples([text], processor.tokenizer, max_length)[0]})
    return samples


def tokenize_samples(texts: list[str], tokenizer, max_length: int = 2048) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length``; empty texts are dropped."""
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return [ids for ids in encoded if ids]


def make_batches(samples: list[list[int]], batch_size: int, pad_id: int,
                 images: list[dict] | None = None) -> list[CalibrationBatch]:
    """Right-padded batches of ``batch_size`` samples (the last may be smaller), in sample order; ``images``,
    one ``{"images": ...}`` example per sample, gives each batch the image tensors of its samples."""
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pictures = image_inputs(images[start:start + batch_size]) if images is not None else {}
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, ids in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = True
        batches.append(CalibrationBatch(input_ids, mask, pictures))
    return batches
