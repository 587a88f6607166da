"""Training checkpoints: ``checkpoint-<step>`` directories written during a run, and resuming from the latest.

A checkpoint holds the adapter, every tensor of the training state in ``state.safetensors`` (LoRA weights,
AdamW moments and steps, the RNG state) and the rest in ``state.json`` (step, losses, scheduler, optimizer
settings). Nothing in it is a pickle, so resuming never executes code from the run directory; a ``state.pt``
of an earlier emloc is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import UserError
from ..files import atomic_directory, read_json
from ..lora import LoraAdapter
from ..streaming import read_header, read_tensors

ADAPTER_DIR = "adapter"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_JSON, STATE_TENSORS, LEGACY_STATE = "state.json", "state.safetensors", "state.pt"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint of the highest step in ``output_dir`` that holds a training state, None if none does."""
    found = sorted((p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
                    if p.name[len(CHECKPOINT_PREFIX):].isdigit()
                    and ((p / STATE_JSON).is_file() or (p / LEGACY_STATE).is_file())),
                   key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
    return found[-1] if found else None


def save_checkpoint(output_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    history: list, lora_form: tuple) -> None:
    """Write ``checkpoint-<step>`` (the adapter, recorded with ``lora_form = (alpha, rslora)``, and the training
    state) to a temporary directory and rename it; older checkpoints are removed after."""
    optimizer_state = optimizer.state_dict()
    tensors = {f"lora/{k}": v.detach() for k, v in model.state_dict().items() if ".lora_" in k}
    tensors["rng"] = torch.get_rng_state()
    for index, values in optimizer_state["state"].items():
        tensors.update({f"optimizer/{index}/{name}": value for name, value in values.items()})
    meta = {"format_version": 1, "step": step, "history": history, "scheduler": scheduler.state_dict(),
            "param_groups": optimizer_state["param_groups"]}

    def write(temp: Path) -> None:
        LoraAdapter.from_model(model, *lora_form).save(temp / ADAPTER_DIR)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temp / STATE_TENSORS))
        (temp / STATE_JSON).write_text(json.dumps(meta))

    final = atomic_directory(output_dir / f"{CHECKPOINT_PREFIX}{step}", write, holds=STATE_JSON)
    for old in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(directory: Path) -> dict:
    """The training state saved by :func:`save_checkpoint`, as ``{"step", "history", "lora", "rng",
    "optimizer", "scheduler"}``. A checkpoint of an earlier emloc (``state.pt``) is read with
    ``torch.load(weights_only=True)``, which builds tensors and plain containers only and refuses anything
    else; a file it refuses is reported, never executed."""
    if not (directory / STATE_JSON).is_file():
        path = directory / LEGACY_STATE
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 -- the unpickler's refusals come as several exception types
            raise UserError(
                f"{path}: not a checkpoint emloc reads (it holds more than tensors and plain data: "
                f"{type(exc).__name__}); delete it to resume from an earlier one or from the start") from None
    meta = read_json(directory / STATE_JSON)
    path = directory / STATE_TENSORS
    keys = [key for key in read_header(path)[0] if key != "__metadata__"]
    tensors = dict(read_tensors(path, keys))
    try:
        optimizer_state: dict[int, dict] = {}
        for key, tensor in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/")
                optimizer_state.setdefault(int(index), {})[name] = tensor
        return {"step": int(meta["step"]), "history": list(meta["history"]), "rng": tensors["rng"],
                "lora": {k.removeprefix("lora/"): t for k, t in tensors.items() if k.startswith("lora/")},
                "optimizer": {"state": optimizer_state, "param_groups": meta["param_groups"]},
                "scheduler": meta["scheduler"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{directory}: incomplete checkpoint ({type(exc).__name__}: {exc})") from None


def resume(output_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> tuple[int, list]:
    """Load the latest checkpoint in ``output_dir`` into the LoRA weights, the optimizer, the scheduler and the
    RNG; returns its step and losses, or ``(0, [])`` when there is none to resume."""
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return 0, []
    state = read_checkpoint(latest)
    model.load_state_dict(state["lora"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["history"]
