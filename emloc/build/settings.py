"""What a build is asked to do: its arguments checked, the calibration batches they select, and the
settings the manifest records (a build resumes only into a directory built with the same ones).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from pathlib import Path

import transformers

from emloc_kernels.lowrank import METHODS

from ..calibration import CalibrationBatch, load_image_samples, load_texts, make_batches, tokenize_samples
from ..data import pad_token_id
from ..errors import BuildError, EmlocWarning, check_int
from ..files import file_sha256
from ..healing import HealConfig
from ..multimodal import is_processor
from ..rows import DataError
from .plan import Compression, LinearPlan, covariance_keys
from .source import SourceCheckpoint

__all__ = ["PROPAGATIONS", "build_settings", "calibration_batches", "check_adapter_modules", "check_arguments",
           "load_tokenizer", "warn_few_tokens"]

PROPAGATIONS = ("original", "emulator")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _one_of(names) -> str:
    return " or ".join(repr(name) for name in names)


def check_arguments(model_path: Path, output_dir: Path, *, svd, propagate, max_samples, max_length, batch_size,
                    host_budget, damping, heal: HealConfig | None, adapter=None) -> None:
    """Raise :class:`BuildError` naming the first argument of :func:`~emloc.build_emulator` that is out of
    range or conflicts with another."""
    if svd not in METHODS:
        raise BuildError(f"svd: must be {_one_of(METHODS)}, got {svd!r}")
    if propagate not in PROPAGATIONS:
        raise BuildError(f"propagate: must be {_one_of(PROPAGATIONS)}, got {propagate!r}")
    for name, value in (("max_samples", max_samples), ("max_length", max_length), ("batch_size", batch_size)):
        check_int(value, name, error=BuildError)
    if host_budget is not None:
        check_int(host_budget, "host_budget", error=BuildError)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < math.inf:
        raise BuildError(f"damping: must be a finite number >= 0, got {damping!r}")
    if heal is not None and propagate != "original":
        raise BuildError("heal: healing distils the original model's outputs, which the build has only with "
                         "propagate='original'")
    if adapter is not None and heal is not None:
        raise BuildError("adapter: a build calibrated with a LoRA adapter (a refresh) does not heal; drop heal")
    if adapter is not None and propagate != "original":
        raise BuildError("adapter: a build calibrated with a LoRA adapter runs the original model's blocks with it; "
                         "it needs propagate='original'")
    if output_dir.resolve() == model_path.resolve():
        raise BuildError(f"{output_dir}: the output directory is the model directory; the source would be overwritten")


def load_tokenizer(model_path: Path, vision_language: bool = False):
    """The model's tokenizer, or for a vision-language model its processor (which holds the tokenizer)."""
    if not any((model_path / name).is_file() for name in _TOKENIZER_FILES):
        raise BuildError(f"{model_path}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                         "the calibration data cannot be tokenized")
    try:
        if vision_language:
            return transformers.AutoProcessor.from_pretrained(model_path)
        return transformers.AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, ImportError, AttributeError, TypeError) as exc:  # a processor's missing backend too
        raise BuildError(f"{model_path}: cannot load its tokenizer ({exc})") from exc


def calibration_batches(data, tokenizer, max_samples, max_length, batch_size, seed) -> list[CalibrationBatch]:
    """The calibration batches; with a vision-language processor for ``tokenizer``, with their images."""
    if is_processor(tokenizer):
        examples = [e for e in load_image_samples(data, tokenizer, max_samples, max_length, seed) if e["input_ids"]]
        samples = [e["input_ids"] for e in examples]
    else:
        texts = load_texts(data, tokenizer, max_samples, seed)
        examples, samples = None, tokenize_samples(texts, tokenizer, max_length)
    if not samples:
        raise DataError(f"{data}: no calibration sample has any token")
    return make_batches(samples, batch_size, pad_token_id(tokenizer), examples)


def warn_few_tokens(plan: list[list[list[LinearPlan]]], tokens: int) -> None:
    """Warn when the calibration has fewer tokens than a covariance has rows: that covariance is singular
    (rank at most ``tokens``), so the factors fit these few tokens rather than the layer's inputs."""
    short = {}
    for groups in plan:
        for group in groups:
            for key, size in covariance_keys(group):
                if tokens < size:
                    kind, name = key.split(":", 1)
                    short.setdefault(f"{name} ({size} {'input' if kind == 'in' else 'output'} features)", None)
    if short:
        warnings.warn(f"calibration: {tokens} tokens, fewer than the features of {', '.join(short)}: each such "
                      "covariance is singular and the factors fit these tokens only; use more or longer samples "
                      "(--samples, --max-length)", EmlocWarning, stacklevel=3)


def build_settings(source: SourceCheckpoint, batches: list[CalibrationBatch], *, compression: Compression, data,
                   max_samples, max_length, batch_size, seed, svd, propagate, heal: HealConfig | None,
                   damping, adapter=None) -> dict:
    """The settings the manifest records and a resumed build must match: the source and its content hash,
    the compression, the calibration data (with its hash) and sampling, and the factorisation options."""
    return {
        "source": {"path": str(source.path.resolve()), "hash": source.index.content_hash()},
        "compression": compression if isinstance(compression, dict) else {".*": float(compression)},
        "calibration": {"data": str(Path(data).resolve()), "data_hash": file_sha256(Path(data)), "samples": sum(
            len(b.input_ids) for b in batches), "max_samples": max_samples, "max_length": max_length,
            "batch_size": batch_size, "seed": seed, "tokens": sum(b.tokens for b in batches)},
        "svd": svd,
        "propagate": propagate,
        "dtype": str(source.dtype).removeprefix("torch."),
        **({"heal": asdict(heal)} if heal is not None else {}),
        **({"damping": float(damping)} if damping else {}),
        **({"adapter": adapter.content_hash()} if adapter is not None else {}),
    }


def check_adapter_modules(adapter, source: SourceCheckpoint) -> None:
    """Raise :class:`BuildError` naming the first module of ``adapter`` that is not a linear of a block (the
    build runs only the blocks with LoRA)."""
    if adapter is None:
        return
    blocks = {f"{prefix}.{index}" for prefix, index in source.units()}
    for name in sorted(adapter.weights):
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is None:
            raise BuildError(f"adapter: {name} is not a linear of the model's blocks; a build calibrated with "
                             "a LoRA adapter attaches LoRA only inside the blocks")
