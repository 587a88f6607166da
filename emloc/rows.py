"""Rows of a data file, shared by calibration and training: the file's lines, each parsed and recognised.

A data file is JSONL whose rows hold ``text``, chat ``messages`` (role/content) or ``conversations``
(ShareGPT from/value), or plain ``.txt`` (one text per non-empty line). Everything wrong with a file or a row
is a :class:`DataError` naming the file and line.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

__all__ = ["IGNORE", "DataError", "Row", "check_chat_template", "data_lines", "parse_row", "read_rows"]

IGNORE = -100  # the label of a token without loss

# ShareGPT speaker names -> chat roles.
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "model": "assistant", "bot": "assistant"}


class DataError(UserError):
    """A data file (calibration or training) cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class Row:
    """One row of a data file: its fields and ``where`` it is (``file:line``, for errors)."""

    fields: dict
    where: str

    def text(self) -> str | None:
        """The ``text`` of the row, None when it has none; a ``text`` that is not a string (null, a number)
        is a :class:`DataError` rather than being trained on as ``"None"`` or ``"123"``."""
        if "text" not in self.fields:
            return None
        if not isinstance(self.fields["text"], str):
            raise DataError(f"{self.where}: 'text' must be a string, got {json.dumps(self.fields['text'])[:80]}")
        return self.fields["text"]

    def messages(self) -> list[dict] | None:
        """The role/content messages of a chat row (``messages``, or ShareGPT ``conversations`` with
        from/value), None when the row is not a chat row. A conversation that is not a list of messages with
        string role and content is a :class:`DataError` naming the message."""
        for key, role_key, content_key in (("messages", "role", "content"), ("conversations", "from", "value")):
            if key not in self.fields:
                continue
            messages = self.fields[key]
            if not isinstance(messages, list):
                raise DataError(f"{self.where}: {key!r} must be a list of messages, got {type(messages).__name__}")
            out = []
            for i, m in enumerate(messages):
                # A content list holds parts (text, images) for a vision-language model (emloc.multimodal).
                if not isinstance(m, dict) or not isinstance(m.get(role_key), str) \
                        or not isinstance(m.get(content_key), (str, list)):
                    raise DataError(f"{self.where}: {key}[{i}] needs string {role_key!r} and {content_key!r} (or a "
                                    f"list of content parts), got {m!r}"[:300])
                out.append({"role": _ROLES.get(m[role_key], m[role_key]) if key == "conversations" else m[role_key],
                            "content": m[content_key]})
            return out
        return None

    def unrecognised(self) -> DataError:
        """The error for a row with neither text nor messages."""
        return DataError(f"{self.where}: a row needs 'text', 'messages' or 'conversations', got keys "
                         f"{sorted(self.fields)}")


def data_lines(path: Path, kind: str) -> list[tuple[int, str]]:
    """The non-empty lines of the ``kind`` (calibration, training) data file ``path``, with their numbers."""
    if not path.is_file():
        raise DataError(f"{path}: {kind} data file not found")
    return [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]


def parse_row(path: Path, number: int, line: str) -> Row:
    """Line ``number`` of ``path`` as a :class:`Row`: a ``.txt`` line is a text, a JSONL line a JSON object."""
    where = f"{path}:{number}"
    if path.suffix == ".txt":
        return Row({"text": line}, where)
    try:
        fields = json.loads(line)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(fields, dict):
        raise DataError(f"{where}: expected a JSON object per line")
    return Row(fields, where)


def read_rows(path: Path, kind: str) -> Iterator[Row]:
    """Every row of the ``kind`` data file ``path``, in file order, each parsed when it is reached (so the
    first bad line in the file is the one reported, whether its JSON or its content is at fault)."""
    for number, line in data_lines(path, kind):
        yield parse_row(path, number, line)


def check_chat_template(tokenizer, where: str) -> None:
    """Chat rows are rendered with the tokenizer's chat template: a :class:`DataError` if it has none."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: chat data needs a tokenizer with a chat template; this one has none")
