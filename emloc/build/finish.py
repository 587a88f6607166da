"""The files that close an emulator directory once its shards are written: the safetensors index, the
config with its ``emloc`` section, the tokenizer and the JSON build report.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..streaming import read_header
from .directory import CONFIG, FORMAT_VERSION, HEAL_ADAPTER_UNIT, INDEX, REPORT, Manifest, write_json
from .source import SourceCheckpoint

__all__ = ["finish_directory"]


def finish_directory(output_dir: Path, source: SourceCheckpoint, manifest: Manifest, tokenizer) -> None:
    """Index, config with its ``emloc`` section, tokenizer files and the JSON report."""
    _write_index(output_dir, manifest)
    modules = {name: info for entry in manifest.shards() for name, info in entry.get("modules", {}).items()}
    _write_config(output_dir, source, manifest, modules)
    tokenizer.save_pretrained(output_dir)
    _write_report(output_dir, source, manifest, modules)


def _write_index(output_dir: Path, manifest: Manifest) -> None:
    weight_map = {}
    for entry in manifest.shards():
        header, _ = read_header(output_dir / entry["file"])
        weight_map.update({key: entry["file"] for key in header if key != "__metadata__"})
    size = sum((output_dir / e["file"]).stat().st_size for e in manifest.shards())
    write_json(output_dir / INDEX, {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))})


def _write_config(output_dir: Path, source: SourceCheckpoint, manifest: Manifest, modules: dict) -> None:
    config = source.config.to_dict()
    config["dtype"] = manifest.settings["dtype"]
    config["emloc"] = {
        "format_version": FORMAT_VERSION,
        "content_hash": hashlib.sha256(json.dumps(sorted(e["sha256"] for e in manifest.done.values())).encode())
        .hexdigest(),  # of every shard's bytes: what a trained adapter records of its emulator
        "source": manifest.settings["source"],
        "compression": manifest.settings["compression"],
        "calibration": manifest.settings["calibration"],
        "svd": manifest.settings["svd"],
        "propagate": manifest.settings["propagate"],
        "modules": {name: {"rank": info["rank"]} for name, info in sorted(modules.items())},
        **({"heal": manifest.settings["heal"]} if "heal" in manifest.settings else {}),
        # a refresh's (docs/design.md §1.9): the content hash of the LoRA its calibration ran with
        **({"adapter": manifest.settings["adapter"]} if "adapter" in manifest.settings else {}),
    }
    write_json(output_dir / CONFIG, config)


def _write_report(output_dir: Path, source: SourceCheckpoint, manifest: Manifest, modules: dict) -> None:
    before = source.parameters
    saved = 0
    for name, info in modules.items():
        linear = source.model.get_submodule(name)
        saved += linear.out_features * linear.in_features - info["rank"] * (linear.out_features + linear.in_features)
    heal_entry = manifest.done.get(HEAL_ADAPTER_UNIT)
    write_json(output_dir / REPORT, {"parameters_before": before, "parameters_after": before - saved,
                                     "modules": dict(sorted(modules.items())),
                                     **({"heal": heal_entry["report"]} if heal_entry else {})})
