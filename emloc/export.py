"""Export a corrected adapter for the original model (docs/design.md §1.11, §5.4): a PEFT adapter directory, or
merged weights.

The adapter directory loads with ``peft.PeftModel.from_pretrained(original_model, directory)``; the merged
checkpoint (``W + s B A`` in every adapted layer) is written shard by shard with the original's shard names and
index, plus its config and tokenizer files, and loads with ``AutoModelForCausalLM.from_pretrained``. Each is
written into a fresh directory that then replaces the old one, so no file of an earlier export survives.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .correction import check_adapter_shapes, weight_keys
from .errors import UserError
from .files import atomic_directory
from .locking import output_lock
from .lora import LoraAdapter
from .progress import track
from .streaming import INDEX_FILE, CheckpointError, CheckpointIndex, read_header, read_tensors


def _checked(adapter: LoraAdapter | str | os.PathLike, original: CheckpointIndex) -> tuple[LoraAdapter, dict]:
    """The adapter and its modules' weight keys, after checking each module against the original's weight
    names and shapes (read from the shard headers only)."""
    if not isinstance(adapter, LoraAdapter):
        adapter = LoraAdapter.load(adapter)
    keys = weight_keys(adapter, original)
    for name, (a, b) in adapter.weights.items():
        shard = original.directory / original.weight_map[keys[name]]
        entry = read_header(shard)[0].get(keys[name])
        if not isinstance(entry, dict):
            raise CheckpointError(f"{shard}: holds no tensor {keys[name]!r}, which {INDEX_FILE} places there")
        check_adapter_shapes(name, a, b, entry.get("shape", ()), original.directory)
    return adapter, keys


def export_adapter(adapter: LoraAdapter | str | os.PathLike, original_path: str | os.PathLike,
                   output_dir: str | os.PathLike) -> Path:
    """Write ``adapter`` as a PEFT adapter directory for the model at ``original_path``; returns the directory.

    Raises ValueError naming the module if an adapter layer is missing from the model or does not fit its shape.
    """
    original = CheckpointIndex(original_path)
    adapter = replace(_checked(adapter, original)[0], base_model=str(Path(original_path).resolve()))
    return adapter.save(output_dir)


def merge_lora(weight: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``W + s B A`` summed in fp32 (one fp32 copy of ``W``, updated in place) and cast back to ``W``'s dtype."""
    merged = weight.to(torch.float32, copy=True)  # never update the caller's fp32 weight in place
    merged.addmm_(b.float(), a.float(), alpha=scaling)
    return merged.to(weight.dtype)


def merge_adapter(adapter: LoraAdapter | str | os.PathLike, original_path: str | os.PathLike,
                  output_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Write the original checkpoint with ``adapter`` merged in (``W + s B A``, fp32 sum, original dtype).

    One shard is in memory at a time. The shards, index, config, generation config and tokenizer files go
    into a fresh directory that then takes ``output_dir``'s place (:func:`emloc.files.atomic_directory`):
    no shard of an older merged model stays beside the new ones, where ``from_pretrained`` could load it.
    Returns ``output_dir``.
    """
    original_path, output_dir = Path(original_path), Path(output_dir)
    original = CheckpointIndex(original_path)
    adapter, keys = _checked(adapter, original)
    module_of = {key: name for name, key in keys.items()}
    source, target = original_path.resolve(), output_dir.resolve()
    if target == source or target in source.parents:
        raise UserError(f"merge: the output directory {output_dir} is or holds the original model; choose another")

    def write(temp: Path) -> None:
        for file in track(original.files, "merging LoRA", "shard", enabled=progress):
            path = original_path / file
            tensors = dict(read_tensors(path, [key for key in read_header(path)[0] if key != "__metadata__"]))
            for key, weight in tensors.items():
                if key in module_of:
                    tensors[key] = merge_lora(weight, *adapter.weights[module_of[key]], adapter.scaling)
            save_file(tensors, str(temp / file), metadata={"format": "pt"})
            del tensors
        for path in original_path.iterdir():
            if path.is_file() and path.suffix != ".safetensors":
                shutil.copyfile(path, temp / path.name)

    return atomic_directory(output_dir, write, holds="config.json")


def export(adapter: LoraAdapter | str | os.PathLike, original_path: str | os.PathLike,
           output_dir: str | os.PathLike, merge: bool = False, progress: bool = True) -> Path:
    """The ``emloc export`` stage: the PEFT adapter in ``output_dir/adapter`` and, with ``merge``, the merged
    checkpoint in ``output_dir/merged``, under the lock of ``output_dir``. Returns ``output_dir``."""
    output_dir = Path(output_dir)
    with output_lock(output_dir):
        if not isinstance(adapter, LoraAdapter):
            adapter = LoraAdapter.load(adapter)
        export_adapter(adapter, original_path, output_dir / "adapter")
        if merge:
            merge_adapter(adapter, original_path, output_dir / "merged", progress)
    return output_dir
