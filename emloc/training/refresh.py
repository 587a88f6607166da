"""Refreshing the emulator during training (docs/design.md §1.9): its factors recomputed from the original
model's activations with the LoRA trained so far, and swapped into the emulator in place.

Each activation-aware factorisation keeps the output directions the calibration activations excite
(``W' = P P^T W``). A task LoRA shifts the hidden states into directions those samples barely excite, where
the emulator's response is cut and the original's is not; an adapter trained on the emulator alone comes to
rely on that cut. A refresh re-runs the build with the adapter attached to the original's blocks
(:func:`emloc.build_emulator` with ``adapter=``), so the next factors keep what the shifted activations need.
The optimizer state carries on: only the frozen factors change.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from ..files import file_sha256, read_json
from ..layers import EmulatorLinear
from ..lora import LoraAdapter
from ..streaming import CheckpointIndex

__all__ = ["REFRESH_PREFIX", "emulator_directory", "load_factors", "on_host", "refresh_emulator", "refresh_steps",
           "switch_to_refresh"]

REFRESH_PREFIX = "refresh-"


def refresh_steps(max_steps: int, refreshes: int) -> list[int]:
    """The steps after which the emulator is refreshed: ``refreshes`` evenly spaced inside ``max_steps``."""
    spaced = {round(max_steps * i / (refreshes + 1)) for i in range(1, refreshes + 1)}
    return sorted(step for step in spaced if 0 < step < max_steps)


def emulator_directory(model: nn.Module) -> Path | None:
    """The build directory ``model`` was loaded from (it holds the build's manifest), or None for a model that
    is not an emulator loaded by :func:`emloc.load_emulator`."""
    from ..build.directory import MANIFEST  # emloc.build imports this package (healing trains), so not at the top

    config = getattr(model, "config", None)
    path = getattr(config, "_name_or_path", "") or ""
    if not isinstance(getattr(config, "emloc", None), dict) or not path or not (Path(path) / MANIFEST).is_file():
        return None
    return Path(path)


@contextlib.contextmanager
def on_host(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Move ``model``'s tensors and ``optimizer``'s state off the compute device for the block, and back after
    it (with whatever values they then hold): a refresh streams the original's blocks through the device
    within the build's memory, not on top of the training state."""
    moved = []
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type not in ("cpu", "meta"):
            moved.append((tensor, tensor.device))
            tensor.data = tensor.data.to("cpu")
    try:
        yield
    finally:
        for tensor, device in moved:
            tensor.data = tensor.data.to(device)


def refresh_emulator(model: nn.Module, output_dir, *, device=None, progress: bool = True) -> Path:
    """Build into ``output_dir`` the emulator of ``model``'s source checkpoint, calibrated with ``model``'s
    current LoRA on the original blocks and otherwise as ``model`` was built (healing aside: the factors take
    the whole rank), on ``device`` (default: ``model``'s), then load its factors into ``model``
    (:func:`load_factors`). Resumes an interrupted refresh with the same LoRA, and leaves the global random
    state as it found it. Raises :class:`~emloc.errors.UserError` when ``model`` is not a loaded emulator,
    or when its source checkpoint or calibration data changed since it was built."""
    from ..build import build_emulator
    from ..build.directory import MANIFEST

    directory = emulator_directory(model)
    if directory is None:
        raise UserError("refresh: the model is not an emulator loaded from its build directory "
                        "(emloc.load_emulator), so there is no build to refresh")
    settings = read_json(directory / MANIFEST)["settings"]
    source, calibration = Path(settings["source"]["path"]), settings["calibration"]
    data = Path(calibration["data"])
    for path, recorded, now in ((source, settings["source"]["hash"], lambda: CheckpointIndex(source).content_hash()),
                                (data, calibration["data_hash"], lambda: file_sha256(data))):
        if not path.exists():
            raise UserError(f"refresh: {path}, which {directory} was built from, does not exist")
        if now() != recorded:
            raise UserError(f"refresh: {path} changed since {directory} was built from it")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # The training run's random state is its own: attaching LoRA to the original's blocks draws from it.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        build_emulator(source, data, output_dir, settings["compression"], device=device,
                       dtype=getattr(torch, settings["dtype"]), max_samples=calibration["max_samples"],
                       max_length=calibration["max_length"], batch_size=calibration["batch_size"],
                       seed=calibration["seed"], svd=settings["svd"], damping=settings.get("damping", 0.0),
                       adapter=LoraAdapter.from_model(model), overwrite=True, progress=progress)
    load_factors(model, output_dir)
    return Path(output_dir)


def load_factors(model: nn.Module, emulator_dir) -> None:
    """Copy the factors of the emulator in ``emulator_dir`` into ``model``'s :class:`EmulatorLinear` layers in
    place (the same plan: same names and ranks), one tensor at a time; ``model`` then names that directory
    as its emulator (its ``emloc`` section and ``_name_or_path``), so an adapter trained on records it."""
    from ..build import read_emloc_section

    emulator_dir = Path(emulator_dir)
    section = read_emloc_section(emulator_dir)
    index = CheckpointIndex(emulator_dir)
    for name, module in model.named_modules():
        if not isinstance(module, EmulatorLinear):
            continue
        if section["modules"].get(name, {}).get("rank") != module.rank:
            raise UserError(f"refresh: {emulator_dir} has no factors of rank {module.rank} for {name}")
        for factor in ("u", "v"):
            tensor = index.load([f"{name}.{factor}"])[f"{name}.{factor}"]
            with torch.no_grad():
                getattr(module, factor).copy_(tensor)
    model.config.emloc = section
    model.config._name_or_path = str(emulator_dir)


def switch_to_refresh(model: nn.Module, optimizer: torch.optim.Optimizer, root: Path, step: int, *, build: bool,
                      device: torch.device, rank: int = 0, world: int = 1, progress: bool = True) -> None:
    """Give a training run's ``model`` the factors of its refresh at ``step``, ``root/refresh-<step>``: built
    by rank 0 on the training's ``device`` when ``build`` (the training state waiting on the host meanwhile,
    :func:`on_host`), else read back; older
    refreshes in ``root`` are removed once it is complete. Under torchrun the other ranks wait at a barrier
    and then read it, so the process group's timeout must outlast a refresh."""
    target = root / f"{REFRESH_PREFIX}{step}"
    if rank == 0:
        if build:
            with on_host(model, optimizer):
                refresh_emulator(model, target, device=device, progress=progress)
        else:
            load_factors(model, target)
        for old in root.glob(f"{REFRESH_PREFIX}*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
        if rank != 0:
            load_factors(model, target)
