"""The training loop (:func:`train`): AdamW over the LoRA weights only (fp32 state), the cosine schedule,
gradient accumulation and clipping, gradient checkpointing, evaluation, checkpoints and resume, a progress
bar, and data parallelism when ``torch.distributed`` is initialised (torchrun).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch import Tensor, nn

from ..data import collate, load_examples, pad_token_id, split_examples, target_tokens
from ..errors import UserError
from ..files import atomic_write_text
from ..locking import output_lock
from ..lora import LoraAdapter, add_lora, lora_modules, lora_parameters
from ..progress import progress
from ..vision import is_vision_language
from .checkpoints import ADAPTER_DIR, resume, save_checkpoint
from .config import TrainConfig
from .evaluation import evaluate
from .loss import CausalLMLoss, training_step
from .placement import enable_checkpointing, place_input_embedding
from .refresh import emulator_directory, refresh_steps, switch_to_refresh
from .schedule import cosine_schedule

REPORT_FILE = "train_report.json"


@dataclass
class TrainResult:
    """What :func:`train` did: per-step losses, the final eval metrics, and where the adapter was written."""

    losses: list[float] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)
    adapter_dir: Path | None = None
    steps: int = 0


@dataclass
class _Run:
    """Everything a training run works with once it is set up; ``rank`` of ``world`` processes."""

    config: TrainConfig
    model: nn.Module
    loss_module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    parameters: list[nn.Parameter]
    lora_form: tuple[float | None, bool]
    examples: list[dict]
    eval_examples: list[dict]
    pad_id: int
    output_dir: Path | None
    rank: int
    world: int
    refresh_at: list[int] = field(default_factory=list)
    refresh_root: Path | None = None  # where refreshed emulators go: output_dir, or a directory of the call

    @property
    def device(self) -> torch.device:
        return self.parameters[0].device


def train(model: nn.Module, data, config: TrainConfig, tokenizer=None, eval_data=None) -> TrainResult:
    """Train LoRA weights on ``model`` (an emulator from :func:`emloc.load_emulator`, or any causal LM).

    Args:
        model: the model; LoRA is added per ``config`` unless it already carries LoRA (:func:`emloc.add_lora`).
            Everything but the LoRA weights is frozen. With ``config.embeddings_on_device`` False its untied
            input embedding is moved to the host and stays there.
        data: a data file (JSONL text/messages/conversations, or .txt) or a list of examples from
            :func:`emloc.data.load_examples`.
        config: the :class:`TrainConfig`.
        tokenizer: tokenizes ``data`` when it is a file (default: the tokenizer saved with the model, e.g. in
            the emulator directory); its pad token pads the batches.
        eval_data: held-out examples or file; by default ``config.eval_fraction`` of ``data`` is held out.

    With ``config.output_dir`` set, checkpoints go to ``output_dir/checkpoint-<step>`` every ``save_steps``
    (a later call with ``resume=True`` continues from the latest, giving the same weights as an uninterrupted
    run), and the trained adapter (PEFT format) and a JSON report are written at the end. Under torchrun each
    rank takes its share of every global batch and gradients are averaged by DDP; rank 0 writes the files,
    holding the lock of ``output_dir`` (:func:`emloc.locking.output_lock`) from the start.

    On an emulator loaded from its build directory, ``config.refreshes`` times during the run the emulator's
    factors are recomputed from the original model with the LoRA trained so far (:mod:`emloc.training.refresh`,
    docs/design.md §1.9); each refreshed emulator goes to ``output_dir/refresh-<step>`` (the latest is kept:
    it is the emulator the adapter was trained on, and the adapter records it), or without ``output_dir`` to
    a temporary directory removed at the end.
    """
    rank, world = _world()
    writes = config.output_dir is not None and rank == 0
    with contextlib.ExitStack() as stack:
        if writes:
            stack.enter_context(output_lock(config.output_dir))
        run = _setup(model, data, config, tokenizer, eval_data, rank, world)
        if run.refresh_at:
            run.refresh_root = run.output_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        step, history = resume(run.output_dir, model, run.optimizer, run.scheduler) \
            if run.output_dir and config.resume else (0, [])
        _restore_refresh(run, step)
        step = _run_steps(run, step, history)
        return _finish(run, step, history)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _setup(model: nn.Module, data, config: TrainConfig, tokenizer, eval_data, rank: int, world: int) -> _Run:
    """Load the data, add LoRA (seeded), place the model, and make the loss module, optimizer and schedule."""
    if tokenizer is None and not isinstance(data, list):
        tokenizer = _saved_tokenizer(model)
    examples, eval_examples = _examples(data, eval_data, tokenizer, config)
    torch.manual_seed(config.seed)
    lora_form = _add_lora(model, config)
    parameters = lora_parameters(model)
    if world > 1 and not config.embeddings_on_device:
        raise UserError("TrainConfig.embeddings_on_device: data parallelism needs the input embedding on the "
                         "device; set embeddings_on_device=True")
    place_input_embedding(model, config.embeddings_on_device)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    loss_module: nn.Module = CausalLMLoss(model, config.lm_head_chunk)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(loss_module)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, config.max_steps, config.warmup_ratio)
    refresh_at = refresh_steps(config.max_steps, config.refreshes) if emulator_directory(model) else []
    return _Run(config, model, loss_module, optimizer, scheduler, parameters, lora_form, examples, eval_examples,
                pad_token_id(tokenizer), Path(config.output_dir) if config.output_dir else None, rank, world,
                refresh_at)


def _saved_tokenizer(model: nn.Module):
    """The tokenizer stored beside the model's weights (``config._name_or_path``), with a clear error if none."""
    directory = Path(getattr(model.config, "_name_or_path", "") or ".")
    if not (directory / "tokenizer_config.json").is_file():
        raise UserError(f"train: the data is a file and the model's directory ({directory}) holds no tokenizer; "
                         "pass tokenizer=")
    if is_vision_language(model.config):  # its images are read by its processor
        return transformers.AutoProcessor.from_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


def _examples(data, eval_data, tokenizer, config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """The training and held-out examples: given as lists, read from files, or ``eval_fraction`` held out."""
    examples = data if isinstance(data, list) else load_examples(data, tokenizer, config.max_length)
    if eval_data is None:
        return split_examples(examples, config.eval_fraction, config.seed)
    return examples, eval_data if isinstance(eval_data, list) else load_examples(eval_data, tokenizer,
                                                                                 config.max_length)


def _add_lora(model: nn.Module, config: TrainConfig) -> tuple[float | None, bool]:
    """Add LoRA per ``config`` unless ``model`` carries some; returns how its scaling was formed, ``(alpha,
    rslora)``, for the adapter. That is known only when LoRA is added here; otherwise ``(None, False)``
    records it as ``alpha = s r``."""
    if lora_modules(model):
        return None, False
    add_lora(model, config.lora_target, config.lora_r, config.lora_alpha, config.lora_dropout, config.rslora)
    return config.lora_r if config.lora_alpha is None else config.lora_alpha, config.rslora


def _run_steps(run: _Run, step: int, history: list[float]) -> int:
    """The optimizer steps from ``step`` to ``max_steps``, with their evaluations and checkpoints; returns the
    step reached. Each loss is appended to ``history``."""
    config = run.config
    per_rank = config.micro_batch_size * config.grad_accum
    batches = _global_batches(len(run.examples), per_rank * run.world, config.seed)
    for _ in range(step):  # the data order depends only on the step: skip what was already trained on
        next(batches)
    bar = progress(config.max_steps, "training LoRA", "step", enabled=config.progress and run.rank == 0,
                   initial=step)
    while step < config.max_steps:
        chosen = [run.examples[i] for i in next(batches)]
        micro = _micro_batches(run, chosen[run.rank * per_rank:(run.rank + 1) * per_rank])
        started = time.perf_counter()
        history.append(_optimizer_step(run, micro, target_tokens(chosen)))
        step += 1
        tokens = sum(len(e["input_ids"]) for e in chosen)
        bar.set_postfix(loss=f"{history[-1]:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}",
                        tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
        bar.update()
        _evaluate_and_save(run, step, history, bar)
        if step in run.refresh_at:
            _refresh(run, step, history)
    bar.close()
    return step


def _global_batches(n_examples: int, global_batch: int, seed: int):
    """Example indices of each global batch: a fresh seeded shuffle per pass over the data."""
    epoch, order = 0, []
    while True:
        while len(order) < global_batch:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order += torch.randperm(n_examples, generator=generator).tolist()
            epoch += 1
        yield order[:global_batch]
        order = order[global_batch:]


def _micro_batches(run: _Run, mine: list[dict]) -> list[dict[str, Tensor]]:
    """This rank's share of a global batch as padded micro-batches on the device."""
    size = run.config.micro_batch_size
    return [{k: v.to(run.device) for k, v in collate(mine[i:i + size], run.pad_id).items()}
            for i in range(0, len(mine), size)]


def _optimizer_step(run: _Run, micro: list[dict[str, Tensor]], global_targets: int) -> float:
    """One :func:`training_step` over ``micro``; returns the loss of the whole global batch."""
    # DDP averages gradients over ranks; dividing the normalizer by the world size turns that into the sum.
    loss = training_step(run.loss_module, micro, global_targets / run.world, run.optimizer, run.scheduler,
                         run.parameters, run.config.max_grad_norm)
    if run.world > 1:
        dist.all_reduce(loss)
        loss /= run.world
    return float(loss)


def _evaluate_and_save(run: _Run, step: int, history: list[float], bar) -> None:
    """After ``step``: evaluate every ``eval_steps`` (the last step is evaluated by :func:`_finish`), and write
    a checkpoint every ``save_steps`` and at the last step (rank 0 only)."""
    config = run.config
    if config.eval_steps and step % config.eval_steps == 0 and step < config.max_steps and run.rank == 0:
        bar.write(f"step {step}: " + json.dumps(_evaluate(run)))
    if run.output_dir and run.rank == 0 and (step % config.save_steps == 0 or step == config.max_steps):
        run.output_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(run.output_dir, step, run.model, run.optimizer, run.scheduler, history, run.lora_form)


def _refresh(run: _Run, step: int, history: list[float]) -> None:
    """Refresh the emulator after ``step`` (rank 0 builds, every rank loads), first writing the checkpoint
    of that step, from which a resumed run repeats the same refresh."""
    config = run.config
    if run.output_dir and run.rank == 0 and step % config.save_steps:
        save_checkpoint(run.output_dir, step, run.model, run.optimizer, run.scheduler, history, run.lora_form)
    switch_to_refresh(run.model, run.optimizer, run.refresh_root, step, build=True, device=run.device,
                      rank=run.rank, world=run.world, progress=run.config.progress)


def _restore_refresh(run: _Run, step: int) -> None:
    """On resume at ``step``: the emulator as refreshed last before it (the refresh of ``step`` itself is
    built, or finished if it was interrupted)."""
    done = [s for s in run.refresh_at if s <= step]
    if done:
        switch_to_refresh(run.model, run.optimizer, run.refresh_root, done[-1], build=done[-1] == step,
                          device=run.device, rank=run.rank, world=run.world, progress=run.config.progress)


def _evaluate(run: _Run) -> dict[str, float]:
    return evaluate(run.model, run.eval_examples, run.config.micro_batch_size, run.config.lm_head_chunk,
                    run.pad_id)


def _finish(run: _Run, step: int, history: list[float]) -> TrainResult:
    """The result; on rank 0 the final evaluation, and with an output directory the adapter and the report."""
    result = TrainResult(losses=history, steps=step)
    if run.rank != 0:
        return result
    result.eval = _evaluate(run)
    if run.output_dir:
        adapter = LoraAdapter.from_model(run.model, *run.lora_form,
                                         base_model=getattr(run.model.config, "_name_or_path", None))
        result.adapter_dir = adapter.save(run.output_dir / ADAPTER_DIR)
        trained_on = emulator_directory(run.model)  # the last refresh, or the emulator as loaded
        report = {"steps": step, "losses": history, **result.eval, "train_examples": len(run.examples),
                  "eval_examples": len(run.eval_examples), "config": asdict(run.config),
                  **({"emulator": str(trained_on)} if trained_on is not None else {})}
        atomic_write_text(run.output_dir / REPORT_FILE, json.dumps(report, indent=2))
    return result
