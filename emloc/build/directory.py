"""The emulator directory as it is built (docs/design.md §5.1): its file names, atomic writes of tensors
and JSON, and the manifest that records the settings and every finished shard, so a build resumes where it
stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from ..errors import BuildError
from ..files import atomic_write, file_sha256

__all__ = ["CONFIG", "FORMAT_VERSION", "HEAL_ADAPTER", "HEAL_ADAPTER_UNIT", "HEAL_UNIT", "INDEX", "MANIFEST",
           "OUTER_UNIT", "REPORT", "Manifest", "save_tensors", "shard_name", "write_json"]

FORMAT_VERSION = 1
MANIFEST = "emloc-manifest.json"
REPORT = "emloc-report.json"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
HEAL_ADAPTER = "emloc-heal-adapter.safetensors"
# The manifest's units besides the blocks (which go by their module names).
OUTER_UNIT, HEAL_ADAPTER_UNIT, HEAL_UNIT = "outer", "heal-adapter", "heal"


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda temp: temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    state = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda temp: save_file(state, str(temp), metadata={"format": "pt"}))


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


class Manifest:
    """``emloc-manifest.json``: the build settings and, per finished shard, its file and SHA-256.

    A directory whose manifest holds other settings is refused unless ``overwrite``; on resume, shards
    whose bytes no longer match the manifest are rebuilt."""

    def __init__(self, directory: Path, settings: dict, resume: bool, overwrite: bool) -> None:
        self.directory, self.path = directory, directory / MANIFEST
        existing = json.loads(self.path.read_text()) if self.path.is_file() else None
        if existing is not None and existing.get("settings") != settings and not overwrite:
            changed = sorted(k for k in set(settings) | set(existing.get("settings", {}))
                             if settings.get(k) != existing.get("settings", {}).get(k))
            raise BuildError(f"{directory}: holds an emulator built with other settings ({', '.join(changed)}); "
                             "pass overwrite=True (--overwrite) to replace it")
        if existing is None and directory.is_dir() and any(directory.iterdir()) and not overwrite:
            raise BuildError(f"{directory}: exists, is not empty and holds no emloc build; "
                             "pass overwrite=True (--overwrite) to build there anyway")
        keep = existing is not None and existing.get("settings") == settings and resume
        if existing is not None and not keep:
            self._remove_build(existing)
        self.settings = settings
        self.done: dict[str, dict] = existing.get("done", {}) if keep else {}
        directory.mkdir(parents=True, exist_ok=True)
        self._save()

    def _remove_build(self, existing: dict) -> None:
        """Delete the files of a previous build (only those its manifest and layout name)."""
        names = {entry["file"] for entry in existing.get("done", {}).values()} | {INDEX, REPORT, CONFIG}
        for name in names:
            (self.directory / name).unlink(missing_ok=True)

    def finished(self, unit: str) -> dict | None:
        """The record of ``unit`` if its shard is on disk with the recorded bytes, else None."""
        entry = self.done.get(unit)
        if entry is None:
            return None
        path = self.directory / entry["file"]
        return entry if path.is_file() and file_sha256(path) == entry["sha256"] else None

    def shards(self) -> list[dict]:
        """The entries of the emulator's weight shards (not of the heal adapter)."""
        return [entry for unit, entry in self.done.items() if unit not in (HEAL_UNIT, HEAL_ADAPTER_UNIT)]

    def record(self, unit: str, file: str, extra: dict) -> None:
        self.done[unit] = {"file": file, "sha256": file_sha256(self.directory / file), **extra}
        self._save()

    def _save(self) -> None:
        write_json(self.path, {"format_version": FORMAT_VERSION, "settings": self.settings, "done": self.done})
