"""Calibration data: read a data file, draw samples with a seed, tokenize, and pad into batches.

Accepted files: JSONL whose rows hold ``text``, chat ``messages`` (role/content, rendered with the
tokenizer's chat template) or ``conversations`` (ShareGPT from/value, text only); or plain ``.txt``
(one sample per non-empty line). Batches are right-padded; their ``attention_mask`` is what keeps padding
out of every covariance.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

__all__ = ["CalibrationBatch", "CalibrationError", "chat_messages", "load_texts", "make_batches", "row_text",
           "tokenize_samples"]

# ShareGPT speaker names -> chat roles.
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "model": "assistant", "bot": "assistant"}


class CalibrationError(UserError):
    """The calibration data cannot be used; the message names the file (and line)."""


def chat_messages(row: dict, where: str, error: type[Exception] = CalibrationError) -> list[dict] | None:
    """The role/content messages of a chat row (``messages``, or ShareGPT ``conversations`` with from/value),
    or None when the row is not a chat row. A conversation that is not a list of messages with string role
    and content raises ``error`` naming ``where`` (file and line) and the message."""
    for key, role_key, content_key in (("messages", "role", "content"), ("conversations", "from", "value")):
        if key not in row:
            continue
        messages = row[key]
        if not isinstance(messages, list):
            raise error(f"{where}: {key!r} must be a list of messages, got {type(messages).__name__}")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not all(isinstance(m.get(k), str) for k in (role_key, content_key)):
                raise error(f"{where}: {key}[{i}] needs string {role_key!r} and {content_key!r}, got {m!r}"[:300])
            out.append({"role": _ROLES.get(m[role_key], m[role_key]) if key == "conversations" else m[role_key],
                        "content": m[content_key]})
        return out
    return None


def row_text(row: dict, where: str, error: type[Exception] = CalibrationError) -> str | None:
    """The ``text`` of a row, None when it has none; a ``text`` that is not a string (null, a number) raises
    ``error`` naming ``where`` rather than being trained on as ``"None"`` or ``"123"``."""
    if "text" not in row:
        return None
    if not isinstance(row["text"], str):
        raise error(f"{where}: 'text' must be a string, got {json.dumps(row['text'])[:80]}")
    return row["text"]


@dataclass
class CalibrationBatch:
    """Right-padded token ids ``(B, T)`` and the matching bool ``attention_mask`` (True on real tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def _render(row: dict, tokenizer, where: str) -> str:
    text = row_text(row, where)
    if text is not None:
        return text
    messages = chat_messages(row, where)
    if messages is None:
        raise CalibrationError(f"{where}: a row needs 'text', 'messages' or 'conversations', got keys {sorted(row)}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise CalibrationError(f"{where}: chat data needs a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def load_texts(path, tokenizer, max_samples: int = 64, seed: int = 0) -> list[str]:
    """Up to ``max_samples`` texts drawn from ``path`` without replacement with ``seed`` (file order kept)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration data file not found")
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise CalibrationError(f"{path}: calibration data is empty")
    chosen = sorted(random.Random(seed).sample(range(len(lines)), min(max_samples, len(lines))))
    if path.suffix == ".txt":
        return [lines[i][1] for i in chosen]
    texts = []
    for i in chosen:
        number, line = lines[i]
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CalibrationError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise CalibrationError(f"{where}: expected a JSON object per line")
        texts.append(_render(row, tokenizer, where))
    return texts


def tokenize_samples(texts: list[str], tokenizer, max_length: int = 2048) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length``; empty texts are dropped."""
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return [ids for ids in encoded if ids]


def make_batches(samples: list[list[int]], batch_size: int, pad_id: int) -> list[CalibrationBatch]:
    """Right-padded batches of ``batch_size`` samples (the last may be smaller), in sample order."""
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, ids in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = True
        batches.append(CalibrationBatch(input_ids, mask))
    return batches
