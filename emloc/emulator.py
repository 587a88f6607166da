"""Build the emulator layer by layer from a safetensors checkpoint, save it, resume it, load it.

The build (docs/design.md §1.1-1.6, §2.1, §5.1) never materialises the whole model:

1. the model skeleton lives on the meta device; the embedding is loaded to catch each block's inputs and
   keyword arguments for every calibration batch (:func:`emloc.models.capture_block_inputs`);
2. block by block: its weights are read from the shards, the calibration batches run through it while
   forward hooks accumulate one covariance per input group (the output covariance for linears with
   ``out < in``), the targeted linears are replaced by :class:`~emloc.EmulatorLinear` factors, the block is
   written to its own shard (atomically, recorded in a manifest) and released back to meta;
3. the index, the config with its ``emloc`` section, the tokenizer and a JSON report close the directory.

:func:`calibrate_block` and :func:`compress_block` are the per-block steps; they take one block, its
inputs and its covariances, avoid host syncs on the per-token path, and run on meta tensors as a dry run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from emloc_kernels import Whitening, covariance_update, projected_lowrank, whitened_lowrank, whitening

from . import healing, hostmem, models
from .calibration import CalibrationBatch, load_texts, make_batches, tokenize_samples
from .data import pad_token_id
from .errors import EmlocWarning, UserError, check_int, check_ratio
from .files import atomic_write, file_sha256
from .healing import HealConfig, heal_rank
from .layers import EmulatorLinear
from .locking import holds_output_lock
from .ranks import compressed_rank
from .rows import DataError as CalibrationError
from .streaming import CheckpointIndex, key_mapping, materialize, release

__all__ = [
    "BuildError",
    "LinearPlan",
    "blockwise_logits",
    "build_emulator",
    "calibrate_block",
    "compress_block",
    "load_emulator",
    "plan_compression",
    "run_block",
]

FORMAT_VERSION = 1
MANIFEST = "emloc-manifest.json"
REPORT = "emloc-report.json"
INDEX = "model.safetensors.index.json"
HEAL_ADAPTER = "emloc-heal-adapter.safetensors"
HEAL_ADAPTER_UNIT, HEAL_UNIT = "heal-adapter", "heal"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

Compression = float | dict[str, float]
Sink = Callable[[int, Tensor], None]


class BuildError(UserError):
    """The build cannot go on; the message names the option, file, block or module at fault."""


# --- planning ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearPlan:
    """How one linear of a block is compressed: ``rank`` of its activation-aware factors, the exact route taken
    (docs/design.md §1.3 / §1.4): ``"output"`` (output covariance, ``out < in``) or ``"input"`` (whitened
    SVD), and ``heal_rank``, how many of those directions healing retrains (:mod:`emloc.healing`)."""

    name: str
    out_features: int
    in_features: int
    rank: int
    heal_rank: int = 0

    @property
    def form(self) -> str:
        return "output" if self.out_features < self.in_features else "input"


def _check_ratio(ratio, what: str) -> float:
    return check_ratio(ratio, what, BuildError)


def _compile(pattern) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise BuildError(f"compression: pattern {pattern!r} is not a valid regular expression ({exc})") from exc


def plan_compression(model: nn.Module, compression: Compression,
                     heal: HealConfig | None = None) -> list[list[list[LinearPlan]]]:
    """Per block, the input groups of its compressed linears (names local to the block).

    ``compression`` is one ratio for every linear of the decoder blocks, or ``{regex: ratio}`` matched
    (``re.fullmatch``) against full module names, first match wins. Linears whose rank would not save
    parameters stay dense. With ``heal``, each rank budget is split into factors and a heal adapter
    (:func:`emloc.healing.heal_rank`). Raises :class:`BuildError` for a ratio outside (0, 1] or a pattern
    that matches no linear of the blocks.
    """
    if isinstance(compression, dict):
        if not compression:
            raise BuildError("compression: the pattern dict is empty")
        rules = [(_compile(pattern), _check_ratio(ratio, f"compression pattern {pattern!r}"))
                 for pattern, ratio in compression.items()]
    else:
        rules = [(re.compile(".*"), _check_ratio(compression, "compression"))]
    prefix, stack = models.block_stack(model)
    used, plans = set(), []
    for index, block in enumerate(stack):
        groups = []
        for group in models.input_groups(block):
            members = []
            for local in group:
                full = f"{prefix}.{index}.{local}"
                pattern, ratio = next(((p, r) for p, r in rules if p.fullmatch(full)), (None, None))
                if pattern is not None:
                    used.add(pattern.pattern)
                linear = block.get_submodule(local)
                rank = None if ratio is None else compressed_rank(ratio, linear.out_features, linear.in_features)
                if rank is not None:
                    members.append(LinearPlan(local, linear.out_features, linear.in_features, rank,
                                              heal_rank(heal, rank)))
            if members:
                groups.append(members)
        plans.append(groups)
    unused = [pattern for pattern, _ in rules if pattern.pattern not in used]
    if unused:
        raise BuildError(f"compression: pattern {unused[0].pattern!r} matches no linear of the decoder blocks "
                         f"(names look like {prefix}.0.{models.input_groups(stack[0])[0][0]})")
    return plans


# --- the per-block steps ----------------------------------------------------------------------------------


@dataclass
class BlockInput:
    """One micro-batch entering a block: hidden states, the block's keyword arguments, the padding mask."""

    hidden: Tensor
    kwargs: dict
    mask: Tensor


def _covariance_keys(group: list[LinearPlan]) -> list[tuple[str, int]]:
    keys = [(f"in:{group[0].name}", group[0].in_features)] if any(p.form == "input" for p in group) else []
    return keys + [(f"out:{p.name}", p.out_features) for p in group if p.form == "output"]


def calibrate_block(block: nn.Module, plan: list[list[LinearPlan]], inputs: Iterable[BlockInput],
                    covariances: dict[str, Tensor] | None = None, sink: Sink | None = None) -> dict[str, Tensor]:
    """Run ``inputs`` through ``block`` and accumulate, without host syncs, one fp32 covariance per input
    group that has a linear taking the whitened route (key ``"in:<first linear>"``), and the output
    covariance (without bias) of every linear taking the output route (key ``"out:<linear>"``).

    Padding tokens (``mask`` False) never enter a covariance. ``sink(i, output)``, when given, receives the
    block output of the i-th input as soon as it exists (so outputs need not pile up on the device).
    Returns the covariances. Runs on meta tensors too.
    """
    device = next(block.parameters()).device
    if covariances is None:
        covariances = {key: torch.zeros(size, size, dtype=torch.float32, device=device)
                       for group in plan for key, size in _covariance_keys(group)}
    current: dict[str, Tensor] = {}
    hooks = []

    def input_hook(key):
        def hook(module, args):  # returns None: the linear's input is left untouched
            covariance_update(covariances[key], args[0], current["mask"])
        return hook

    def output_hook(key):
        def hook(module, args, out):
            y = out if module.bias is None else out - module.bias
            covariance_update(covariances[key], y, current["mask"])
        return hook

    for group in plan:
        for key, _ in _covariance_keys(group):
            kind, name = key.split(":", 1)
            module = block.get_submodule(name)
            hooks.append(module.register_forward_pre_hook(input_hook(key)) if kind == "in"
                         else module.register_forward_hook(output_hook(key)))
    try:
        with torch.no_grad():
            for slot, item in enumerate(inputs):
                current["mask"] = item.mask
                out = block(item.hidden, **item.kwargs)
                if sink is not None:
                    sink(slot, out)
    finally:
        for handle in hooks:
            handle.remove()
    return covariances


def run_block(block: nn.Module, inputs: Iterable[BlockInput], sink: Sink) -> None:
    """Pass ``sink(i, output)`` the block's output for each of ``inputs`` (no covariances)."""
    with torch.no_grad():
        for slot, item in enumerate(inputs):
            sink(slot, block(item.hidden, **item.kwargs))


def compress_block(block: nn.Module, plan: list[list[LinearPlan]], covariances: dict[str, Tensor],
                   svd: Literal["exact", "randomized"] = "exact", seed: int = 0,
                   damping: float = 0.0) -> dict[str, dict]:
    """Replace each planned linear of ``block`` by an :class:`EmulatorLinear` in the block's dtype, taking the
    smaller eigenproblem to the same optimum: output space (docs/design.md §1.4) for ``out <= in``, from the
    accumulated output covariance or from ``W C W^T``; otherwise the whitened form, with one whitening
    (eigendecomposition) per input group shared by its linears. Returns ``{name: {"rank", "form", "error"}}``
    where ``error`` is the relative reconstruction error ``||(W - u v) X^T|| / ||W X^T||`` on the calibration
    data from the factorisation's spectrum, a 0-d tensor (no host sync; meta on a dry run).

    ``damping`` > 0 factors against ``C + damping * (tr C / n) I`` instead of ``C`` (docs/design.md §1.2): the
    emulator then also keeps some of ``W`` in directions the calibration samples barely excite, where a task
    LoRA's changes to the hidden states will go. On an accumulated output covariance the same term is
    ``damping * (tr Y^T Y / tr W W^T) W W^T``. Changes the covariances in place.

    Consumes ``covariances``: each is removed from the dict as soon as no remaining linear reads it, so that
    its memory goes back before the next eigenproblem."""
    reports = {}
    for group in plan:
        key, shared = f"in:{group[0].name}", None
        if damping and key in covariances:
            _damp(covariances[key], damping)
        for position, linear in enumerate(group):
            module = block.get_submodule(linear.name)
            weight = module.weight.float()
            generator = _generator(seed, weight.device)
            if linear.form == "output":
                out_cov = covariances.pop(f"out:{linear.name}")
                if damping:
                    _damp_output(out_cov, weight, damping)
            elif linear.out_features <= linear.in_features:
                out_cov = weight @ covariances[key] @ weight.T  # Y^T Y without whitening
            else:
                out_cov = None
                if shared is None:
                    shared = whitening(covariances[key])
            if not any(_reads_input_covariance(later, shared) for later in group[position + 1:]):
                covariances.pop(key, None)  # before this linear's eigenproblem: one n x n less at its peak
            if out_cov is not None:
                u, v, error = projected_lowrank(weight, out_cov, linear.rank, svd, generator=generator,
                                                with_error=True)
            else:
                u, v, error = whitened_lowrank(weight, shared, linear.rank, svd, generator=generator, with_error=True)
            dtype = module.weight.dtype
            parent, _, leaf = linear.name.rpartition(".")
            block.get_submodule(parent).register_module(
                leaf, EmulatorLinear.from_factors(u.to(dtype), v.to(dtype), module.bias))
            reports[linear.name] = {"rank": linear.rank, "form": linear.form, "error": error}
    return reports


def _trace(matrix: Tensor) -> float:
    return float(torch.diagonal(matrix).sum())


def _damp(cov: Tensor, damping: float) -> None:
    """``cov += damping * (tr cov / n) I`` in place (one host sync for the trace, none on meta)."""
    if cov.device.type != "meta":
        torch.diagonal(cov).add_(damping * _trace(cov) / cov.shape[0])


def _damp_output(out_cov: Tensor, weight: Tensor, damping: float) -> None:
    """``out_cov += damping * (tr out_cov / tr W W^T) W W^T`` in place: the output-space form of :func:`_damp`."""
    gram = weight @ weight.T
    out_cov.add_(gram, alpha=damping * _trace(out_cov) / _trace(gram) if out_cov.device.type != "meta" else damping)


def _reads_input_covariance(linear: LinearPlan, shared: Whitening | None) -> bool:
    """Whether factoring ``linear`` still needs its group's input covariance: for ``W C W^T`` (a square
    linear), or for the group's whitening if it is not computed yet."""
    return linear.form == "input" and (linear.out_features <= linear.in_features or shared is None)


def _generator(seed: int, device: torch.device) -> torch.Generator | None:
    if device.type == "meta":
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def check_finite(covariances: dict[str, Tensor], outputs_ok: Tensor | None, block_name: str) -> None:
    """Raise naming the block and module whose calibration activations hold NaN or Inf (one sync per
    covariance, after the block's pass)."""
    for key, cov in covariances.items():
        if cov.device.type != "meta" and not bool(torch.isfinite(cov).all()):
            kind, name = key.split(":", 1)
            where = "input" if kind == "in" else "output"
            raise BuildError(f"{block_name}.{name}: calibration {where} activations contain NaN or Inf")
    if outputs_ok is not None and outputs_ok.device.type != "meta" and not bool(outputs_ok):
        raise BuildError(f"{block_name}: block output contains NaN or Inf")


def emulate_block(block: nn.Module, plan: list[list[LinearPlan]]) -> nn.Module:
    """Swap the planned linears of ``block`` for empty :class:`EmulatorLinear` (meta) of the planned rank,
    ready to receive saved factors."""
    for group in plan:
        for linear in group:
            module = block.get_submodule(linear.name)
            parent, _, leaf = linear.name.rpartition(".")
            block.get_submodule(parent).register_module(leaf, EmulatorLinear(
                linear.in_features, linear.out_features, linear.rank, bias=module.bias is not None,
                device="meta", dtype=module.weight.dtype))
    return block


# --- host-side activation store ---------------------------------------------------------------------------


class ActivationStore:
    """Calibration activations between blocks: kept in host memory up to ``budget`` bytes, spilled to
    files under ``spill_dir`` beyond it. Slots are replaced in place as a block's outputs arrive."""

    def __init__(self, spill_dir: Path, budget: int) -> None:
        self.spill_dir, self.budget = spill_dir, budget
        self.slots: dict[int, Tensor | Path] = {}

    def _in_memory(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slots.values() if isinstance(t, Tensor))

    def put(self, slot: int, tensor: Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        previous = self.slots.pop(slot, None)
        if isinstance(previous, Path):
            previous.unlink(missing_ok=True)
        if self._in_memory() + tensor.numel() * tensor.element_size() <= self.budget:
            self.slots[slot] = tensor
        else:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"activations-{slot}.safetensors"
            save_file({"hidden": tensor.contiguous()}, str(path))
            self.slots[slot] = path

    def get(self, slot: int, device) -> Tensor:
        value = self.slots[slot]
        tensor = load_file(str(value))["hidden"] if isinstance(value, Path) else value
        return tensor.to(device)

    def close(self) -> None:
        shutil.rmtree(self.spill_dir, ignore_errors=True)


def _host_budget() -> int:
    """Half of the host memory available now."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _to(tree, device, memo: dict):
    """Move the tensors of a kwargs tree to ``device``; a tensor shared between trees is moved once."""
    if isinstance(tree, Tensor):
        if id(tree) not in memo:
            memo[id(tree)] = (tree, tree.to(device))
        return memo[id(tree)][1]
    if isinstance(tree, dict):
        return {k: _to(v, device, memo) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_to(v, device, memo) for v in tree)
    return tree


# --- the source model, streamed ---------------------------------------------------------------------------


class _Source:
    """The source checkpoint as a meta skeleton plus shard index; loads and releases modules on demand."""

    def __init__(self, model_path, device, dtype) -> None:
        self.path = Path(model_path)
        self.config = models.load_config(self.path)
        self.index = CheckpointIndex(self.path)
        self.model = models.skeleton(self.config)
        self.prefix, self.stack = models.block_stack(self.model)
        self.device = torch.device(device)
        self.dtype = dtype or _config_dtype(self.config)
        models.tie_embeddings(self.model)
        self.key_of = key_mapping((name for name, _ in self.model.named_parameters()), self.index)
        self.parameters = sum(p.numel() for p in self.model.parameters())  # before any compression

    def outer_names(self) -> list[str]:
        """Full names of the parameters outside the block stack (embedding, final norm, LM head)."""
        return [name for name, _ in self.model.named_parameters() if not name.startswith(self.prefix + ".")]

    def _stack_within(self, child: str) -> str | None:
        """The block stack's name local to top-level ``child`` (to skip it), None if it is elsewhere."""
        return self.prefix[len(child) + 1:] + "." if self.prefix.startswith(child + ".") else None

    def load_outer(self) -> None:
        for name, module in self.model.named_children():
            materialize(module, name, self.index, self.device, self.dtype, self.key_of, skip=self._stack_within(name))
            models.tie_embeddings(self.model)  # a tied LM head then holds the loaded embedding

    def release_outer(self) -> None:
        for name, module in self.model.named_children():
            release(module, skip=self._stack_within(name))
        models.tie_embeddings(self.model)

    def load_block(self, index: int) -> nn.Module:
        return materialize(self.stack[index], f"{self.prefix}.{index}", self.index, self.device, self.dtype,
                           self.key_of)

    def capture(self, batches: list[CalibrationBatch], store: ActivationStore) -> list[list[dict]]:
        """Fill ``store`` with block 0's input per batch; return per batch the kwargs of every block (host)."""
        kwargs_per_batch = []
        for slot, batch in enumerate(batches):
            hidden, kwargs = models.capture_block_inputs(
                self.model, batch.input_ids.to(self.device), batch.attention_mask.to(self.device))
            store.put(slot, hidden)
            kwargs_per_batch.append(_to(kwargs, "cpu", {}))
        return kwargs_per_batch


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _inputs(store: ActivationStore, kwargs_per_batch, batches, block: int, device) -> Iterable[BlockInput]:
    for slot, batch in enumerate(batches):
        yield BlockInput(store.get(slot, device), _to(kwargs_per_batch[slot][block], device, {}),
                         batch.attention_mask.to(device))


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def blockwise_logits(model_path, batches: list[CalibrationBatch], *, device=None, dtype=None) -> list[Tensor]:
    """Logits of the source model computed block by block through the streaming path, with nothing
    compressed: one block's weights at a time. This is the pass the build runs, and what must reproduce
    the full model's logits exactly."""
    source = _Source(model_path, device or _default_device(), dtype)
    with tempfile.TemporaryDirectory() as spill:
        store = ActivationStore(Path(spill), _host_budget())
        source.load_outer()
        kwargs = source.capture(batches, store)
        for index in range(len(source.stack)):
            block = source.load_block(index)
            run_block(block, _inputs(store, kwargs, batches, index, source.device), store.put)
            release(block)
        return [models.logits_from_hidden(source.model, b.input_ids.to(source.device),
                                          b.attention_mask.to(source.device), store.get(slot, source.device))
                for slot, b in enumerate(batches)]


# --- the emulator directory -------------------------------------------------------------------------------


def _write_json(path: Path, data) -> None:
    atomic_write(path, lambda temp: temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    state = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda temp: save_file(state, str(temp), metadata={"format": "pt"}))


def _shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


class _Manifest:
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
        names = {entry["file"] for entry in existing.get("done", {}).values()} | {INDEX, REPORT, "config.json"}
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
        _write_json(self.path, {"format_version": FORMAT_VERSION, "settings": self.settings, "done": self.done})


def _tokenizer(model_path: Path):
    if not any((model_path / name).is_file() for name in _TOKENIZER_FILES):
        raise BuildError(f"{model_path}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                         "the calibration data cannot be tokenized")
    try:
        return transformers.AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise BuildError(f"{model_path}: cannot load its tokenizer ({exc})") from exc


def _calibration_batches(data, tokenizer, max_samples, max_length, batch_size, seed) -> list[CalibrationBatch]:
    texts = load_texts(data, tokenizer, max_samples, seed)
    samples = tokenize_samples(texts, tokenizer, max_length)
    if not samples:
        raise CalibrationError(f"{data}: no calibration sample has any token")
    pad = pad_token_id(tokenizer)
    return make_batches(samples, batch_size, pad)


def _warn_few_tokens(plan: list[list[list[LinearPlan]]], tokens: int) -> None:
    """Warn when the calibration has fewer tokens than a covariance has rows: that covariance is singular
    (rank at most ``tokens``), so the factors fit these few tokens rather than the layer's inputs."""
    short = {}
    for groups in plan:
        for group in groups:
            for key, size in _covariance_keys(group):
                if tokens < size:
                    kind, name = key.split(":", 1)
                    short.setdefault(f"{name} ({size} {'input' if kind == 'in' else 'output'} features)", None)
    if short:
        warnings.warn(f"calibration: {tokens} tokens, fewer than the features of {', '.join(short)}: each such "
                      "covariance is singular and the factors fit these tokens only; use more or longer samples "
                      "(--samples, --max-length)", EmlocWarning, stacklevel=3)


@holds_output_lock("output_dir")  # two builds into one directory would interleave their blocks
@hostmem.large_buffers_unmapped()  # from the start: a heap grown before would serve large buffers
def build_emulator(
    model_path,
    data,
    output_dir,
    compression: Compression = 0.4,
    *,
    device=None,
    dtype: torch.dtype | None = None,
    max_samples: int = 64,
    max_length: int = 2048,
    svd: Literal["exact", "randomized"] = "exact",
    propagate: Literal["original", "emulator"] = "original",
    resume: bool = True,
    overwrite: bool = False,
    batch_size: int = 4,
    seed: int = 0,
    host_budget: int | None = None,
    heal: HealConfig | None = None,
    damping: float = 0.0,
    progress: bool = True,
) -> Path:
    """Build the emulator of the checkpoint in ``model_path`` into ``output_dir``, one block at a time.

    Args:
        model_path: a transformers causal-LM directory with safetensors shards and a tokenizer.
        data: calibration file (JSONL with ``text`` / ``messages`` / ``conversations``, or ``.txt``).
        output_dir: the emulator directory (docs/design.md §5.1); loaded with :func:`load_emulator`.
        compression: one ratio in (0, 1] for every linear of the decoder blocks, or ``{regex: ratio}`` over
            full module names (first match wins). Rank ``floor(ratio m n / (m + n))``; layers where that
            saves no parameters stay dense.
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
        damping: factor against ``C + damping (tr C / n) I`` (:func:`compress_block`); 0 is the plain
            activation-aware optimum.
        heal: distil the original into the emulator on the calibration samples after the blocks are built
            (:mod:`emloc.healing`; needs ``propagate="original"``). Each linear's rank budget is shared between
            the factors and the heal adapter, which is merged into them: same parameter count as without.
        progress: show a progress bar per block.

    Returns the output directory. The build report is in ``emloc-report.json`` there. On glibc the call
    fixes malloc's mmap threshold (:func:`emloc.hostmem.large_buffers_unmapped`), and leaves it at 32 MiB.
    """
    model_path, output_dir = Path(model_path), Path(output_dir)
    if svd not in ("exact", "randomized"):
        raise BuildError(f"svd: must be 'exact' or 'randomized', got {svd!r}")
    if propagate not in ("original", "emulator"):
        raise BuildError(f"propagate: must be 'original' or 'emulator', got {propagate!r}")
    for name, value in (("max_samples", max_samples), ("max_length", max_length), ("batch_size", batch_size)):
        check_int(value, name, error=BuildError)
    if host_budget is not None:
        check_int(host_budget, "host_budget", error=BuildError)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < math.inf:
        raise BuildError(f"damping: must be a finite number >= 0, got {damping!r}")
    if heal is not None and propagate != "original":
        raise BuildError("heal: healing distils the original model's outputs, which the build has only with "
                         "propagate='original'")
    if output_dir.resolve() == model_path.resolve():
        raise BuildError(f"{output_dir}: the output directory is the model directory; the source would be overwritten")
    source = _Source(model_path, device or _default_device(), dtype)
    plan = plan_compression(source.model, compression, heal)
    tokenizer = _tokenizer(model_path)
    batches = _calibration_batches(data, tokenizer, max_samples, max_length, batch_size, seed)
    _warn_few_tokens(plan, sum(b.tokens for b in batches))
    settings = {
        "source": {"path": str(model_path.resolve()), "hash": source.index.content_hash()},
        "compression": compression if isinstance(compression, dict) else {".*": float(compression)},
        "calibration": {"data": str(Path(data).resolve()), "data_hash": file_sha256(Path(data)), "samples": sum(
            len(b.input_ids) for b in batches), "max_samples": max_samples, "max_length": max_length,
            "batch_size": batch_size, "seed": seed, "tokens": sum(b.tokens for b in batches)},
        "svd": svd,
        "propagate": propagate,
        "dtype": str(source.dtype).removeprefix("torch."),
        **({"heal": asdict(heal)} if heal is not None else {}),
        **({"damping": float(damping)} if damping else {}),
    }
    manifest = _Manifest(output_dir, settings, resume, overwrite)
    blocks = len(source.stack)
    total = blocks + 1
    units = ["outer", *(f"{source.prefix}.{i}" for i in range(blocks))]
    if heal is not None:
        units.append(HEAL_UNIT)
    if (output_dir / REPORT).is_file() and all(manifest.finished(unit) for unit in units):
        return output_dir  # already complete with these settings
    with contextlib.closing(ActivationStore(output_dir / ".emloc-activations", host_budget or _host_budget())) as store:
        source.load_outer()
        kwargs = source.capture(batches, store)
        outer_file = _shard_name(1, total)
        if manifest.finished("outer") is None:
            _save_tensors(output_dir / outer_file, {n: source.model.get_parameter(n) for n in source.outer_names()})
            manifest.record("outer", outer_file, {})
        source.release_outer()
        for index in range(blocks):
            name = f"{source.prefix}.{index}"
            file = _shard_name(index + 2, total)
            inputs = lambda index=index: _inputs(store, kwargs, batches, index, source.device)  # noqa: E731
            bar = tqdm(total=len(batches), desc=f"block {index + 1}/{blocks}", unit="batch", disable=not progress)
            sink = _FiniteSink(store)
            if manifest.finished(name) is not None:
                block = _finished_block(source, index, plan[index], output_dir / file, propagate)
                run_block(block, _counted(inputs(), bar), sink)
            else:
                block = source.load_block(index)
                # original propagation: each output replaces its input in the store as it comes
                covariances = calibrate_block(block, plan[index], _counted(inputs(), bar),
                                              sink=sink if propagate == "original" else None)
                check_finite(covariances, sink.all_finite(), name)
                hostmem.return_freed_memory()  # the pass's transients, before the factorisations allocate
                reports = compress_block(block, plan[index], covariances, svd, seed=seed + index, damping=damping)
                del covariances
                if propagate == "emulator":
                    run_block(block, inputs(), sink)
                    check_finite({}, sink.all_finite(), name)
                _save_tensors(output_dir / file, {f"{name}.{k}": t for k, t in block.state_dict().items()})
                manifest.record(name, file, {"modules": {
                    f"{name}.{local}": {"rank": r["rank"], "form": r["form"], "error": float(r["error"])}
                    for local, r in reports.items()}})
            bar.close()
            release(block)
            hostmem.return_freed_memory()
        _finish(output_dir, source, manifest, tokenizer, total)
        if heal is not None and manifest.finished(HEAL_UNIT) is None:
            # The store now holds the original's last-block outputs: the teacher of the healing step.
            _heal_build(output_dir, source, manifest, plan, batches, store, heal, dtype, progress)
            _finish(output_dir, source, manifest, tokenizer, total)
    return output_dir


def _heal_build(output_dir: Path, source: _Source, manifest: _Manifest, plan, batches, store: ActivationStore,
                config: HealConfig, dtype, progress: bool) -> None:
    """Train the heal adapter (unless a saved one survives an interruption), then merge it into each block's
    shard; a block whose manifest entry says it is healed is not merged twice."""
    adapter_path = output_dir / HEAL_ADAPTER
    if manifest.finished(HEAL_ADAPTER_UNIT) is None:
        model = load_emulator(output_dir, device=source.device, dtype=dtype)
        teachers = [healing.teacher_states(model, batch, store.get(slot, "cpu")).cpu()
                    for slot, batch in enumerate(batches)]
        ranks = {f"{source.prefix}.{index}.{linear.name}": linear.heal_rank
                 for index, groups in enumerate(plan) for group in groups for linear in group if linear.heal_rank}
        adapter, report = healing.heal(model, batches, teachers, ranks, config, progress)
        del model, teachers
        tensors = {f"{name}.{part}": t for name, (a, sb) in adapter.items() for part, t in (("a", a), ("sb", sb))}
        _save_tensors(adapter_path, tensors)
        manifest.record(HEAL_ADAPTER_UNIT, HEAL_ADAPTER, {"report": report})
    saved = load_file(str(adapter_path))
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
        _save_tensors(path, state)
        manifest.record(name, entry["file"], {"modules": entry["modules"], "healed": True})
    manifest.record(HEAL_UNIT, HEAL_ADAPTER, {})


class _FiniteSink:
    """Stores each block output in the activation store and records, without a host sync, whether it
    was finite."""

    def __init__(self, store: ActivationStore) -> None:
        self.store, self.flags = store, []

    def __call__(self, slot: int, out: Tensor) -> None:
        self.flags.append(torch.isfinite(out).all())
        self.store.put(slot, out)

    def all_finite(self) -> Tensor | None:
        return torch.stack(self.flags).all() if self.flags else None


def _counted(items, bar):
    for item in items:
        yield item
        bar.update(1)


def _finished_block(source: _Source, index: int, plan, path: Path, propagate: str) -> nn.Module:
    """Block ``index`` ready to propagate activations on resume: the original weights, or the saved
    emulator block when the build feeds compressed outputs forward."""
    if propagate == "original":
        return source.load_block(index)
    block = emulate_block(source.stack[index], plan)
    prefix = f"{source.prefix}.{index}."
    state = {k.removeprefix(prefix): t.to(source.device) for k, t in load_file(str(path)).items()}
    block.load_state_dict(state, assign=True)
    return block.requires_grad_(False)


def _finish(output_dir: Path, source: _Source, manifest: _Manifest, tokenizer, total: int) -> None:
    """Index, config with its ``emloc`` section, tokenizer files and the JSON report."""
    weight_map = {}
    for entry in manifest.shards():
        with open(output_dir / entry["file"], "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        weight_map.update({key: entry["file"] for key in header if key != "__metadata__"})
    size = sum((output_dir / e["file"]).stat().st_size for e in manifest.shards())
    _write_json(output_dir / INDEX, {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))})
    modules = {name: info for entry in manifest.shards() for name, info in entry.get("modules", {}).items()}
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
    }
    _write_json(output_dir / "config.json", config)
    tokenizer.save_pretrained(output_dir)
    before = source.parameters
    saved = 0
    for name, info in modules.items():
        linear = source.model.get_submodule(name)
        saved += linear.out_features * linear.in_features - info["rank"] * (linear.out_features + linear.in_features)
    heal_entry = manifest.done.get(HEAL_ADAPTER_UNIT)
    _write_json(output_dir / REPORT, {"parameters_before": before, "parameters_after": before - saved,
                                      "modules": dict(sorted(modules.items())),
                                      **({"heal": heal_entry["report"]} if heal_entry else {})})


def load_emulator(path, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Load an emulator directory as an ordinary transformers causal LM whose compressed linears are
    :class:`emloc.EmulatorLinear`. Needs nothing from the source model.

    Args:
        path: a directory written by :func:`build_emulator`.
        device: where to put the model (default CPU).
        dtype: cast floating-point weights to this dtype (default: the dtype it was built in).
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file() or "emloc" not in json.loads(config_path.read_text()):
        raise BuildError(f"{path}: not an emloc emulator directory (config.json without an 'emloc' section)")
    section = json.loads(config_path.read_text())["emloc"]
    config = models.load_config(path)
    model = models.skeleton(config)
    for name, info in section["modules"].items():
        linear = model.get_submodule(name)
        parent, _, leaf = name.rpartition(".")
        model.get_submodule(parent).register_module(leaf, EmulatorLinear(
            linear.in_features, linear.out_features, info["rank"], bias=linear.bias is not None,
            device="meta", dtype=linear.weight.dtype))
    models.tie_embeddings(model)
    index = CheckpointIndex(path)
    for name, module in model.named_children():
        materialize(module, name, index, device or "cpu", dtype)
        models.tie_embeddings(model)
    model.to(device or "cpu")
    return model
