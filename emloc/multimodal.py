"""Chat rows with images, for vision-language models: image parts read from local files, the conversation
processed by the model's own processor (image tokens, pixel values, grid sizes as it makes them), labels on
the assistant answers, and batches whose image tensors are those of their rows, concatenated in order.

An image part is ``{"type": "image", "path": FILE}`` (or ``"url"``/``"image"`` naming a local file, a
``file://`` URL included); a relative name is relative to the data file. A missing, unreadable or non-image
file is a :class:`~emloc.rows.DataError` naming the file and the line.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .rows import IGNORE, DataError

__all__ = ["image_example", "image_inputs", "is_processor", "text_tokenizer"]

_TEXT_KEYS = ("input_ids", "attention_mask")


def is_processor(tokenizer_or_processor) -> bool:
    """Whether the object is a multimodal processor (it carries an image processor) rather than a tokenizer."""
    return hasattr(tokenizer_or_processor, "image_processor")


def text_tokenizer(tokenizer_or_processor):
    """The tokenizer itself, or the one inside a processor."""
    return tokenizer_or_processor.tokenizer if is_processor(tokenizer_or_processor) else tokenizer_or_processor


def _image_file(part: dict, base: Path, where: str) -> Path:
    name = next((part[key] for key in ("path", "url", "image") if isinstance(part.get(key), str)), None)
    if name is None:
        raise DataError(f"{where}: an image part needs 'path' (or 'url', 'image') naming a local file, "
                        f"got {part}"[:300])
    if "://" in name and not name.startswith("file://"):
        raise DataError(f"{where}: image {name}: only local files are read, not URLs")
    path = Path(name.removeprefix("file://"))
    return path if path.is_absolute() else base / path


def _load_image(path: Path, where: str) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot read image {path} ({type(exc).__name__}: {exc})"[:300]) from exc


def _parts(messages: list[dict], base: Path, where: str) -> tuple[list[dict], list[list[Image.Image]]]:
    """The messages as the chat template takes them (image parts without their file) and each message's images."""
    rendered, images = [], []
    for message in messages:
        content, mine = message["content"], []
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                    raise DataError(f"{where}: a content part must be {{'type': 'text' | 'image', ...}}, "
                                    f"got {part!r}"[:300])
                if part["type"] == "image":
                    mine.append(_load_image(_image_file(part, base, where), where))
                    parts.append({"type": "image"})
                elif not isinstance(part.get("text"), str):
                    raise DataError(f"{where}: a text part needs a string 'text', got {part!r}"[:300])
                else:
                    parts.append({"type": "text", "text": part["text"]})
            content = parts
        rendered.append({"role": message["role"], "content": content})
        images.append(mine)
    return rendered, images


def _process(processor, text: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    return dict(processor(text=[text], images=images or None, return_tensors="pt"))


def image_example(messages: list[dict], processor, max_length: int, where: str, base: Path) -> dict:
    """``{"input_ids", "labels", "chat", "images"}`` of one conversation: ``images`` holds the processor's
    image tensors (pixel values, grid sizes), ``labels`` the answer tokens. Answers are found by processing
    the conversation up to each answer; a template that does not render prefix by prefix is an error, and
    so is a ``max_length`` that would cut image tokens."""
    if getattr(processor, "chat_template", None) is None:
        raise DataError(f"{where}: chat data needs a processor with a chat template; this one has none")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so it has no answer tokens to train on")
    rendered, images = _parts(messages, base, where)
    everything = [image for mine in images for image in mine]
    full = _process(processor, processor.apply_chat_template(rendered, tokenize=False), everything)
    ids = full["input_ids"][0]
    labels = torch.full_like(ids, IGNORE)
    for i, message in enumerate(rendered):
        if message["role"] != "assistant":
            continue
        seen = [image for mine in images[:i] for image in mine]
        prompt = processor.apply_chat_template(rendered[:i], tokenize=False, add_generation_prompt=True) if i else ""
        start = len(_process(processor, prompt, seen)["input_ids"][0]) if prompt else 0
        answered = processor.apply_chat_template(rendered[:i + 1], tokenize=False)
        upto = _process(processor, answered, seen)["input_ids"][0]
        if not torch.equal(ids[:len(upto)], upto) or not torch.equal(ids[:start], upto[:start]):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix; "
                            "cannot tell answer tokens apart")
        labels[start:len(upto)] = ids[start:len(upto)]
    image_token = getattr(processor, "image_token_id", None)
    if len(ids) > max_length and image_token is not None and bool((ids[max_length:] == image_token).any()):
        raise DataError(f"{where}: max_length={max_length} would cut the image tokens; raise max_length")
    per_token = {k: v[0, :max_length] for k, v in full.items()
                 if k not in _TEXT_KEYS and v.shape[:2] == full["input_ids"].shape}  # Qwen-VL: mm_token_type_ids
    return {"input_ids": ids[:max_length].tolist(), "labels": labels[:max_length].tolist(), "chat": True,
            "images": {k: v for k, v in full.items() if k not in _TEXT_KEYS and k not in per_token},
            "token_inputs": per_token}


def image_inputs(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The image tensors of ``examples`` for one batch: each kind concatenated over the examples in order
    (the model matches them to the image tokens in that order), and the processor's per-token inputs right-
    padded with 0 like the tokens; empty for a batch without images."""
    keys = dict.fromkeys(k for e in examples for k in e.get("images", {}))
    out = {key: torch.cat([e["images"][key] for e in examples if key in e.get("images", {})]) for key in keys}
    width = max(len(e["input_ids"]) for e in examples)
    for key in dict.fromkeys(k for e in examples for k in e.get("token_inputs", {})):
        padded = torch.zeros(len(examples), width, dtype=torch.long)
        for row, e in enumerate(examples):
            values = e.get("token_inputs", {}).get(key)
            if values is not None:
                padded[row, :len(values)] = values
        out[key] = padded
    return out
