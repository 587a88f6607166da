"""The healing step of the build (:mod:`emloc.healing`): train the heal adapter on the finished emulator
against the original's last-block outputs, save it, and merge it into each block's shard.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import healing
from ..calibration import CalibrationBatch
from ..healing import HealConfig
from .activations import ActivationStore
from .directory import HEAL_ADAPTER, HEAL_ADAPTER_UNIT, HEAL_UNIT, Manifest, save_tensors
from .load import load_emulator
from .plan import LinearPlan
from .source import SourceCheckpoint

__all__ = ["heal_build"]


def heal_build(output_dir: Path, source: SourceCheckpoint, manifest: Manifest, plan: list[list[list[LinearPlan]]],
               batches: list[CalibrationBatch], store: ActivationStore, config: HealConfig,
               dtype: torch.dtype | None, progress: bool) -> None:
    """Train the heal adapter (unless a saved one survives an interruption), then merge it into each block's
    shard; a block whose manifest entry says it is healed is not merged twice. ``store`` holds the
    original's last-block outputs: the teacher."""
    if manifest.finished(HEAL_ADAPTER_UNIT) is None:
        _train_adapter(output_dir, source, manifest, plan, batches, store, config, dtype, progress)
    saved = load_file(str(output_dir / HEAL_ADAPTER))
    for index in range(len(source.stack)):
        name = f"{source.prefix}.{index}"
        entry = manifest.done[name]
        if entry.get("healed"):
            continue
        path = output_dir / entry["file"]
        state = load_file(str(path))
        for module in entry["modules"]:
            if f"{module}.a" in saved:  # the merge keeps each rank: the manifest's modules stay as they are
                state[f"{module}.u"], state[f"{module}.v"] = healing.merge_heal(
                    state[f"{module}.u"], state[f"{module}.v"], saved[f"{module}.a"], saved[f"{module}.sb"])
        save_tensors(path, state)
        manifest.record(name, entry["file"], {"modules": entry["modules"], "healed": True})
    manifest.record(HEAL_UNIT, HEAL_ADAPTER, {})


def _train_adapter(output_dir: Path, source: SourceCheckpoint, manifest: Manifest,
                   plan: list[list[list[LinearPlan]]], batches: list[CalibrationBatch], store: ActivationStore,
                   config: HealConfig, dtype: torch.dtype | None, progress: bool) -> None:
    """Distil the teacher states into a heal adapter on the emulator as built, and save it."""
    model = load_emulator(output_dir, device=source.device, dtype=dtype)
    teachers = [healing.teacher_states(model, batch, store.get(slot, "cpu")).cpu()
                for slot, batch in enumerate(batches)]
    ranks = {f"{source.prefix}.{index}.{linear.name}": linear.heal_rank
             for index, groups in enumerate(plan) for group in groups for linear in group if linear.heal_rank}
    adapter, report = healing.heal(model, batches, teachers, ranks, config, progress)
    del model, teachers
    tensors = {f"{name}.{part}": t for name, (a, sb) in adapter.items() for part, t in (("a", a), ("sb", sb))}
    save_tensors(output_dir / HEAL_ADAPTER, tensors)
    manifest.record(HEAL_ADAPTER_UNIT, HEAL_ADAPTER, {"report": report})
