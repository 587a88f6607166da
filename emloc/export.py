"""Export a corrected adapter for the original model (docs/design.md §1.10, §5.4): a PEFT adapter directory, or
merged weights.

The adapter directory loads with ``peft.PeftModel.from_pretrained(original_model, directory)``; the merged
checkpoint (``W + s B A`` in every adapted layer) is written shard by shard with the original's shard names and
index, plus its config and tokenizer files, and loads with ``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .correction import check_adapter_shapes, weight_keys
from .lora import LoraAdapter
from .streaming import CheckpointIndex, atomic_write


def _checked(adapter: LoraAdapter | str | os.PathLike, original: CheckpointIndex) -> tuple[LoraAdapter, dict]:
    """The adapter and its modules' weight keys, after checking each module against the original's weight
    names and shapes (read from the shard headers only)."""
    if not isinstance(adapter, LoraAdapter):
        adapter = LoraAdapter.load(adapter)
    keys = weight_keys(adapter, original)
    for name, (a, b) in adapter.weights.items():
        with safe_open(str(original.directory / original.weight_map[keys[name]]), "pt") as shard:
            shape = shard.get_slice(keys[name]).get_shape()
        check_adapter_shapes(name, a, b, shape, original.directory)
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

    One shard is in memory at a time; each is written under a temporary name and renamed. The index, config,
    generation config and tokenizer files are copied. Returns ``output_dir``.
    """
    original_path, output_dir = Path(original_path), Path(output_dir)
    original = CheckpointIndex(original_path)
    adapter, keys = _checked(adapter, original)
    module_of = {key: name for name, key in keys.items()}
    if output_dir.resolve() == original_path.resolve():
        raise ValueError(f"merge: the output directory {output_dir} is the original model's; choose another")
    output_dir.mkdir(parents=True, exist_ok=True)
    for file in tqdm(original.files, desc="merging LoRA", unit="shard", disable=not progress):
        tensors = load_file(str(original_path / file))
        for key, weight in tensors.items():
            if key in module_of:
                tensors[key] = merge_lora(weight, *adapter.weights[module_of[key]], adapter.scaling)
        atomic_write(output_dir / file, lambda tmp, t=tensors: save_file(t, str(tmp), metadata={"format": "pt"}))
        del tensors
    for path in original_path.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            atomic_write(output_dir / path.name, lambda tmp, src=path: shutil.copyfile(src, tmp))
    return output_dir


def export(adapter: LoraAdapter | str | os.PathLike, original_path: str | os.PathLike,
           output_dir: str | os.PathLike, merge: bool = False, progress: bool = True) -> Path:
    """The ``emloc export`` stage: the PEFT adapter in ``output_dir/adapter`` and, with ``merge``, the merged
    checkpoint in ``output_dir/merged``. Returns ``output_dir``."""
    output_dir = Path(output_dir)
    if not isinstance(adapter, LoraAdapter):
        adapter = LoraAdapter.load(adapter)
    export_adapter(adapter, original_path, output_dir / "adapter")
    if merge:
        merge_adapter(adapter, original_path, output_dir / "merged", progress)
    return output_dir
