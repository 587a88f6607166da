"""Tensor-by-tensor access to a safetensors checkpoint directory, for the stages that work one layer at a time.

A checkpoint is ``model.safetensors`` or shards listed in ``model.safetensors.index.json``. Reading a tensor
opens only its shard and maps only that tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointReader:
    """Where each tensor of a checkpoint lives, and lazy reads of single tensors."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(str(single), "pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise FileNotFoundError(f"{self.path} is not a safetensors checkpoint: it has neither {INDEX_FILE} "
                                    f"nor {SINGLE_FILE}")

    @property
    def shards(self) -> list[str]:
        """Shard file names in the order they first appear in the index."""
        return list(dict.fromkeys(self.weight_map.values()))

    def keys_in(self, shard: str) -> list[str]:
        return [key for key, file in self.weight_map.items() if file == shard]

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def _open(self, key: str):
        if key not in self.weight_map:
            raise KeyError(f"{self.path}: no tensor {key!r} in the checkpoint")
        file = self.path / self.weight_map[key]
        if not file.is_file():
            raise FileNotFoundError(f"{self.path}: shard {file.name} (holding {key!r}) is missing")
        return safe_open(str(file), "pt")

    def shape(self, key: str) -> list[int]:
        with self._open(key) as f:
            return f.get_slice(key).get_shape()

    def get(self, key: str, device: str | torch.device = "cpu") -> Tensor:
        """One tensor, read from its shard onto ``device``."""
        with self._open(key) as f:
            return f.get_tensor(key).to(device)


def check_emulator_source(emulator_path: str | os.PathLike, original_path: str | os.PathLike) -> None:
    """Raise ValueError if the emulator at ``emulator_path`` was not built from the model at ``original_path``.

    Compares the content hash recorded in the emulator config's ``"emloc"`` section with the original's.
    """
    from .emulator import source_hash  # the emulator module owns how a source model is fingerprinted

    config_path = Path(emulator_path) / "config.json"
    section = json.loads(config_path.read_text()).get("emloc") if config_path.is_file() else None
    if not section:
        raise ValueError(f"{emulator_path} is not an emloc emulator: {config_path} has no 'emloc' section")
    recorded, actual = section.get("source_hash"), source_hash(original_path)
    if recorded != actual:
        raise ValueError(f"the emulator at {emulator_path} was built from a different model than {original_path} "
                         f"(source content hash {recorded!r} in its config, {actual!r} for the model given)")
