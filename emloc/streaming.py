"""Stream a safetensors checkpoint one module at a time: shard index, lazy load to a device, release to meta.

A model skeleton lives on the meta device (see :func:`emloc.models.skeleton`); :func:`materialize` reads
just the tensors of one module (a decoder block, the embedding) from the shards that hold them, and
:func:`release` returns that module to meta so its memory is freed. The whole model never exists at once.

    index = CheckpointIndex(model_dir)
    materialize(block, "model.layers.7", index, device="cuda", dtype=torch.bfloat16)
    ...  # use the block
    release(block)

Every read names the file at fault (a missing, truncated or non-finite tensor), and
:meth:`CheckpointIndex.content_hash` identifies a checkpoint by its bytes. Writes and file hashes live in
:mod:`emloc.files`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .files import cached_file_sha256

__all__ = ["CheckpointError", "CheckpointIndex", "check_finite_weight", "key_mapping", "materialize", "read_tensors",
           "release"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable, lacks a tensor or holds a non-finite weight; the message
    names the file (and the tensor)."""


class CheckpointIndex:
    """Which shard holds which tensor, read from ``model.safetensors.index.json`` (or a single
    ``model.safetensors``). Opening validates that every shard named by the index exists.

    Attributes:
        directory: the checkpoint directory.
        weight_map: checkpoint key -> shard file name.
    """

    def __init__(self, directory) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if index_path.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from exc
        elif (self.directory / SINGLE_FILE).is_file():
            self.weight_map = {key: SINGLE_FILE for key in self._keys_of(SINGLE_FILE)}
        else:
            raise CheckpointError(f"{self.directory}: no {INDEX_FILE} or {SINGLE_FILE} found")
        for file in self.files:
            if not (self.directory / file).is_file():
                raise CheckpointError(f"{self.directory / file}: shard listed in {INDEX_FILE} is missing")

    @property
    def files(self) -> list[str]:
        """The shard file names, in index order, each once."""
        return list(dict.fromkeys(self.weight_map.values()))

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def _keys_of(self, file: str) -> list[str]:
        return [key for key in read_header(self.directory / file)[0] if key != "__metadata__"]

    def load(self, keys, device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read ``keys`` from their shards onto ``device``, floating-point tensors cast to ``dtype`` when given.
        Raises :class:`CheckpointError` naming the shard at fault.

        Each tensor is read into its own host buffer (no memory map): once a caller drops a tensor, its
        memory goes back, so a block whose linears are replaced one by one shrinks as it goes."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.weight_map:
                raise CheckpointError(f"{self.directory}: checkpoint has no tensor {key!r}")
            by_file.setdefault(self.weight_map[key], []).append(key)
        out = {}
        for file, file_keys in by_file.items():
            for key, tensor in read_tensors(self.directory / file, file_keys):
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                check_finite_weight(tensor, key, self.directory / file)
                out[key] = tensor.to(device)
        return out

    def content_hash(self) -> str:
        """SHA-256 over the index and the SHA-256 of every shard's full bytes: two checkpoints agree only
        if every stored tensor does, values included. Each shard's digest is cached by path, size, mtime
        and inode (:func:`emloc.files.cached_file_sha256`), so only the first stage to see a checkpoint reads
        it whole. A truncated shard is reported as such (:class:`CheckpointError`) rather than hashed into
        another model."""
        digest = hashlib.sha256(json.dumps(self.weight_map, sort_keys=True).encode())
        for file in sorted(self.files):
            _check_complete(self.directory / file)
            digest.update(f"{file}:{cached_file_sha256(self.directory / file)};".encode())
        return digest.hexdigest()


# Dtypes whose values are checked when loaded (float8 has no reduction to check with; integers are finite).
_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_finite_weight(tensor: torch.Tensor, key: str, path: Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and tensor ``key`` if it holds NaN or Inf, so a bad weight
    is reported as itself and not as the bad activations of some module after it. One float64 sum per tensor
    (NaN and Inf survive it; only float64 values can overflow it, and those are then checked one by one)."""
    if tensor.dtype not in _CHECKED_DTYPES or tensor.device.type == "meta":
        return
    if math.isfinite(float(tensor.sum(dtype=torch.float64))) or bool(torch.isfinite(tensor).all()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise CheckpointError(f"{path}: {key} holds NaN or Inf ({bad} of {tensor.numel()} values, as {tensor.dtype})")


def _check_complete(path: Path) -> None:
    """Raise :class:`CheckpointError` if the shard at ``path`` is shorter than its header says (a truncated
    copy or download), from the header alone."""
    header, data_start = read_header(path)
    ends = [entry["data_offsets"][1] for entry in header.values()
            if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]]
    size = path.stat().st_size
    if ends and data_start + max(ends) > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, its header describes {data_start + max(ends)})")


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of the safetensors file at ``path`` and the offset where its data begins."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < size <= os.fstat(handle.fileno()).st_size - 8:
                raise ValueError(f"header length {size} does not fit the file")
            header = json.loads(handle.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors file ({exc})") from exc
    return header, 8 + size


def read_tensors(path: Path, keys):
    """Yield ``(key, tensor)`` for ``keys`` of the safetensors file at ``path``, each read into a fresh host
    tensor. Raises :class:`CheckpointError` naming the file and the tensor for anything malformed."""
    header, data_start = read_header(path)
    with open(path, "rb") as handle:
        for key in keys:
            try:
                entry = header[key]
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                start, end = entry["data_offsets"]
                tensor = torch.empty(entry["shape"], dtype=dtype)
                if end - start != tensor.numel() * tensor.element_size():
                    raise ValueError(f"{end - start} bytes for shape {entry['shape']} {entry['dtype']}")
                handle.seek(data_start + start)
                if handle.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - start:
                    raise ValueError("the file ends before the tensor's data")
            except (KeyError, TypeError, ValueError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read {key!r} ({type(exc).__name__}: {exc})") from exc
            yield key, tensor


def key_mapping(names, index: CheckpointIndex, prefixes: tuple[tuple[str, str], ...] = ()):
    """``key_of(name) -> checkpoint key`` for the model's tensor ``names``: the identity when the checkpoint
    uses the model's own names; else the first of the family's ``prefixes`` renamings (``(module prefix,
    checkpoint prefix)``, a vision-language checkpoint in transformers' earlier layout) that gives a key of the
    checkpoint; else the prefix rewrite that the first unknown name reveals (a checkpoint saved from an outer
    model, ``language_model.model.layers...``, or from the bare decoder, ``layers...``). Names none of these
    place are returned unchanged, so :meth:`CheckpointIndex.load` names them."""
    if prefixes:
        def renamed(name: str) -> str:
            if name in index:
                return name
            return next((key for ours, theirs in prefixes if name.startswith(ours)
                         and (key := theirs + name[len(ours):]) in index), name)

        return renamed
    missing = next((name for name in names if name not in index), None)
    if missing is None:
        return lambda name: name
    for key in index.weight_map:
        if key.endswith("." + missing):
            drop, add = "", key[:-len(missing)]
            break
        if missing.endswith("." + key):
            drop, add = missing[:-len(key)], ""
            break
    else:
        return lambda name: name

    def key_of(name: str) -> str:
        if name in index or not name.startswith(drop):
            return name
        return add + name[len(drop):]

    return key_of


def _split(name: str) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


def materialize(module: nn.Module, prefix: str, index: CheckpointIndex, device="cpu",
                dtype: torch.dtype | None = None, key_of=None, skip: str | tuple[str, ...] | None = None) -> nn.Module:
    """Load every parameter and persistent buffer of ``module`` (named ``prefix`` in the full model) from
    the checkpoint onto ``device``; tensors already off the meta device are left as they are.

    ``key_of(name) -> checkpoint key`` maps a full module name to its key (identity by default); tensors
    whose local name starts with ``skip`` (e.g. ``"layers."``: the block stack; a tuple for several) are
    left alone.
    Parameters come back frozen (``requires_grad=False``).
    """
    key_of = key_of or (lambda name: name)
    full = lambda local: f"{prefix}.{local}" if prefix else local  # noqa: E731
    wanted = {local: key_of(full(local)) for local, t in _persistent_tensors(module, skip)
              if t.device.type == "meta"}
    loaded = index.load(wanted.values(), device=device, dtype=dtype)
    for local, key in wanted.items():
        parent, leaf = _split(local)
        owner = module.get_submodule(parent)
        tensor = loaded[key]
        if leaf in owner._parameters:
            expected = owner._parameters[leaf].shape
            if tensor.shape != expected:
                raise CheckpointError(f"{index.directory / index.weight_map[key]}: {key} has shape "
                                      f"{tuple(tensor.shape)}, the model expects {tuple(expected)}")
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
    return module


def _persistent_tensors(module: nn.Module, skip: str | tuple[str, ...] | None = None):
    """(local name, tensor) of every parameter and persistent buffer, each shared tensor once, except
    names starting with ``skip``."""
    found = list(module.named_parameters())
    for sub_name, sub in module.named_modules():
        for leaf, buf in sub._buffers.items():
            if buf is not None and leaf not in sub._non_persistent_buffers_set:
                found.append(((f"{sub_name}.{leaf}" if sub_name else leaf), buf))
    return [(name, t) for name, t in found if not (skip and name.startswith(skip))]


def release(module: nn.Module, skip: str | tuple[str, ...] | None = None) -> nn.Module:
    """Return every parameter and persistent buffer of ``module`` (except names starting with ``skip``) to
    the meta device, freeing its memory; non-persistent buffers such as rotary frequencies stay, they are
    not in the checkpoint."""
    for local, tensor in _persistent_tensors(module, skip):
        parent, leaf = _split(local)
        owner = module.get_submodule(parent)
        meta = torch.empty_like(tensor, device="meta")
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(meta, requires_grad=False)
        else:
            owner._buffers[leaf] = meta
    return module
