""":func:`build_emulator`: the build's loop over the source checkpoint, one block at a time.

The outer weights catch every block's inputs on the calibration batches and go to the first shard; then
each block is loaded, calibrated, compressed, written to its own shard (recorded in the manifest) and
released; the directory's closing files follow, and healing when asked for. A block the manifest records
as finished is only run, to pass its outputs on to the next.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import nn

from emloc_kernels.lowrank import Method

from .. import hostmem
from ..calibration import CalibrationBatch
from ..errors import BuildError
from ..healing import HealConfig
from ..locking import holds_output_lock
from ..lora import LoraAdapter
from ..progress import progress as progress_bar
from ..streaming import release
from ..vision import feature_blocks
from .activations import ActivationStore, FiniteSink, StackInputs, block_inputs, default_host_budget
from .block import BlockInput, calibrate_block, check_finite, compress_block, emulate_block, run_block
from .directory import HEAL_UNIT, OUTER_UNIT, REPORT, Manifest, save_tensors, shard_name
from .finish import finish_directory
from .heal import heal_build
from .plan import Compression, LinearPlan, plan_compression, stack_compression
from .settings import (
    build_settings,
    calibration_batches,
    check_adapter_modules,
    check_arguments,
    load_tokenizer,
    warn_few_tokens,
)
from .source import SourceCheckpoint, default_device

__all__ = ["build_emulator"]


@holds_output_lock("output_dir")  # two builds into one directory would interleave their blocks
@hostmem.large_buffers_unmapped()  # from the start: a heap grown before would serve large buffers
def build_emulator(
    model_path,
    data,
    output_dir,
    compression: Compression = 0.4,
    *,
    vision_compression: float | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    max_samples: int = 64,
    max_length: int = 2048,
    svd: Method = "exact",
    propagate: Literal["original", "emulator"] = "original",
    resume: bool = True,
    overwrite: bool = False,
    batch_size: int = 4,
    seed: int = 0,
    host_budget: int | None = None,
    heal: HealConfig | None = None,
    damping: float = 0.0,
    adapter: LoraAdapter | None = None,
    progress: bool = True,
) -> Path:
    """Build the emulator of the checkpoint in ``model_path`` into ``output_dir``, one block at a time.

    Args:
        model_path: a transformers causal-LM directory with safetensors shards and a tokenizer.
        data: calibration file (JSONL with ``text`` / ``messages`` / ``conversations``, or ``.txt``).
        output_dir: the emulator directory (docs/design.md §5.1); loaded with :func:`~emloc.load_emulator`.
        compression: one ratio in (0, 1] for every linear of the decoder blocks, or ``{regex: ratio}`` over
            full module names (first match wins). Rank ``floor(ratio m n / (m + n))``; layers where that
            saves no parameters stay dense.
        vision_compression: a vision-language model's ratio for its vision tower's blocks (default: dense);
            the projector stays dense.
        device: where each block runs (default CUDA when available); activations wait on the host.
        dtype: compute and storage dtype (default: the checkpoint's).
        max_samples, max_length, batch_size, seed: calibration samples drawn with ``seed``, truncated to
            ``max_length`` tokens, run ``batch_size`` at a time.
        svd: ``"exact"`` or ``"randomized"`` factorisations.
        propagate: feed each block the original model's activations (``"original"``, the reference
            behaviour) or the compressed blocks' outputs (``"emulator"``).
        resume: continue an interrupted build with the same settings at its first unfinished block.
        overwrite: replace a directory built with other settings.
        host_budget: bytes of host memory for activations before they spill to disk (default: half the
            available memory).
        damping: factor against ``C + damping (tr C / n) I`` (:func:`~emloc.build.compress_block`); 0 is the
            plain activation-aware optimum.
        heal: distil the original into the emulator on the calibration samples after the blocks are built
            (:mod:`emloc.healing`; needs ``propagate="original"``). Each linear's rank budget is shared between
            the factors and the heal adapter, which is merged into them: same parameter count as without.
        adapter: calibrate on the original model with these LoRA weights attached (a refresh, docs/design.md
            §1.9): the covariances are those of the LoRA-shifted activations, the factors still those of the
            original weights. Its modules must be linears of the blocks.
        progress: show a progress bar per block.

    Returns the output directory. The build report is in ``emloc-report.json`` there. On glibc the call
    fixes malloc's mmap threshold (:func:`emloc.hostmem.large_buffers_unmapped`), and leaves it at 32 MiB.
    """
    model_path, output_dir = Path(model_path), Path(output_dir)
    check_arguments(model_path, output_dir, svd=svd, propagate=propagate, max_samples=max_samples,
                    max_length=max_length, batch_size=batch_size, host_budget=host_budget, damping=damping, heal=heal,
                    adapter=adapter)
    source = SourceCheckpoint(model_path, device or default_device(), dtype)
    if heal is not None and len(source.stacks) > 1:
        raise BuildError("heal: healing is for text models; a vision-language model is built unhealed")
    compression = stack_compression(source.model, compression, vision_compression)
    plan = plan_compression(source.model, compression, heal)
    check_adapter_modules(adapter, source)
    tokenizer = load_tokenizer(model_path, vision_language=len(source.stacks) > 1)
    batches = calibration_batches(data, tokenizer, max_samples, max_length, batch_size, seed)
    warn_few_tokens(plan, sum(b.tokens for b in batches))
    settings = build_settings(source, batches, compression=compression, data=data, max_samples=max_samples,
                              max_length=max_length, batch_size=batch_size, seed=seed, svd=svd, propagate=propagate,
                              heal=heal, damping=damping, adapter=adapter)
    manifest = Manifest(output_dir, settings, resume, overwrite)
    if _complete(output_dir, manifest, source, heal):
        return output_dir  # already complete with these settings
    units = source.units()
    spill = output_dir / ".emloc-activations"
    with contextlib.closing(ActivationStore(spill, host_budget or default_host_budget())) as store:
        replay: dict[int, dict] = {}  # the vision blocks' outputs the model reads after its tower, by batch
        position = 0
        for prefix, stack in source.stacks:
            inputs = _outer_pass(source, batches, store, manifest, output_dir, shard_name(1, len(units) + 1),
                                 prefix, replay)
            if prefix != source.prefix and not inputs.slots and any(plan[position:position + len(stack)]):
                raise BuildError(f"{data}: no calibration sample has an image, so the vision tower "
                                 f"({prefix}) cannot be calibrated; add images or keep it dense")
            features = feature_blocks(source.config, len(stack)) if prefix != source.prefix else set()
            for index in range(len(stack)):
                name, file = f"{prefix}.{index}", shard_name(position + 2, len(units) + 1)
                _stream_block(source, prefix, index, plan[position], inputs, store, manifest, output_dir / file,
                              name, progress, svd=svd, seed=seed + position, damping=damping, propagate=propagate,
                              adapter=adapter)
                if index in features:
                    replay[index] = inputs.recorded(store)
                position += 1
        finish_directory(output_dir, source, manifest, tokenizer)
        if heal is not None and manifest.finished(HEAL_UNIT) is None:
            # The store now holds the original's last-block outputs: the teacher of the healing step.
            heal_build(output_dir, source, manifest, plan, batches, store, heal, dtype, progress)
            finish_directory(output_dir, source, manifest, tokenizer)
    return output_dir


def _stream_block(source: SourceCheckpoint, prefix: str, index: int, plan: list[list[LinearPlan]],
                  inputs: StackInputs, store: ActivationStore, manifest: Manifest, path: Path, name: str,
                  progress: bool, **settings) -> None:
    """Build block ``index`` of stack ``prefix`` into ``path`` (only run it when the manifest records it as
    finished), its outputs replacing its inputs in ``store``; then release it."""
    block_input = functools.partial(block_inputs, store, inputs, index, source.device)
    bar = progress_bar(len(inputs.slots), f"block {name}", "batch", enabled=progress)
    sink = FiniteSink(store)
    if manifest.finished(name) is not None:
        block = _finished_block(source, prefix, index, plan, path, settings["propagate"])
        with _lora_on(block, settings["adapter"], name):
            run_block(block, _counted(block_input(), bar), sink)
    else:
        block, reports = _build_block(source, prefix, index, plan, block_input, bar, sink, **settings)
        _save_block(path.parent, manifest, name, path.name, block, reports)
    bar.close()
    release(block)
    hostmem.return_freed_memory()


def _complete(output_dir: Path, manifest: Manifest, source: SourceCheckpoint, heal: HealConfig | None) -> bool:
    """Whether the directory already holds this build, every unit finished and the report written."""
    units = [OUTER_UNIT, *(f"{prefix}.{i}" for prefix, i in source.units())]
    if heal is not None:
        units.append(HEAL_UNIT)
    return (output_dir / REPORT).is_file() and all(manifest.finished(unit) for unit in units)


def _outer_pass(source: SourceCheckpoint, batches: list[CalibrationBatch], store: ActivationStore,
                manifest: Manifest, output_dir: Path, file: str, prefix: str, replay: dict) -> StackInputs:
    """Load the outer weights, catch the first block's inputs of stack ``prefix`` (into ``store``) and every
    block's keyword arguments (returned), save the outer shard unless it is finished, and release the outer
    weights. Before the decoder of a vision-language model, ``replay`` holds the vision blocks' outputs."""
    source.load_outer()
    inputs = source.capture(batches, store, prefix, replay)
    if manifest.finished(OUTER_UNIT) is None:
        save_tensors(output_dir / file, {n: source.model.get_parameter(n) for n in source.outer_names()})
        manifest.record(OUTER_UNIT, file, {})
    source.release_outer()
    return inputs


def _build_block(source: SourceCheckpoint, prefix: str, index: int, plan: list[list[LinearPlan]],
                 inputs: Callable[[], Iterable[BlockInput]], bar, sink: FiniteSink, *, svd: Method, seed: int,
                 damping: float, propagate: str, adapter: LoraAdapter | None) -> tuple[nn.Module, dict[str, dict]]:
    """Block ``index`` loaded, calibrated and compressed, with the reports of :func:`compress_block`; its
    outputs go to ``sink``: the original block's (each replacing its input as it comes) or, with
    ``propagate="emulator"``, the compressed block's. With ``adapter``, the original block is calibrated with its
    LoRA; the factors and the saved block are of the original weights."""
    name = f"{prefix}.{index}"
    block = source.load_block(index, prefix)
    with _lora_on(block, adapter, name):
        covariances = calibrate_block(block, plan, _counted(inputs(), bar),
                                      sink=sink if propagate == "original" else None)
    check_finite(covariances, sink.all_finite(), name)
    hostmem.return_freed_memory()  # the pass's transients, before the factorisations allocate
    reports = compress_block(block, plan, covariances, svd, seed=seed, damping=damping)
    del covariances
    if propagate == "emulator":
        run_block(block, inputs(), sink)
        check_finite({}, sink.all_finite(), name)
    return block, reports


def _save_block(output_dir: Path, manifest: Manifest, name: str, file: str, block: nn.Module,
                reports: dict[str, dict]) -> None:
    save_tensors(output_dir / file, {f"{name}.{k}": t for k, t in block.state_dict().items()})
    manifest.record(name, file, {"modules": {
        f"{name}.{local}": {"rank": r["rank"], "form": r["form"], "error": float(r["error"])}
        for local, r in reports.items()}})


def _lora_on(block: nn.Module, adapter: LoraAdapter | None, name: str):
    """The adapter's LoRA on the linears of block ``name`` while the block runs (a refresh), else nothing."""
    mine = adapter.within(name) if adapter is not None else None
    return mine.attached(block) if mine is not None and mine.weights else contextlib.nullcontext()


def _finished_block(source: SourceCheckpoint, prefix: str, index: int, plan: list[list[LinearPlan]], path: Path,
                    propagate: str) -> nn.Module:
    """Block ``index`` ready to propagate activations on resume: the original weights, or the saved
    emulator block when the build feeds compressed outputs forward."""
    if propagate == "original":
        return source.load_block(index, prefix)
    block = emulate_block(source.block(prefix, index), plan)
    state = {k.removeprefix(f"{prefix}.{index}."): t.to(source.device) for k, t in load_file(str(path)).items()}
    block.load_state_dict(state, assign=True)
    return block.requires_grad_(False)


def _counted(items, bar):
    for item in items:
        yield item
        bar.update(1)
