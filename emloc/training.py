"""Training LoRA on an emulator (docs/design.md §1.8): the loss, one optimizer step, and the loop around them.

* :class:`CausalLMLoss` is a model's whole loss as a module (wrappable by DDP; callable on meta tensors for a
  memory dry run), its LM head and cross entropy chunked by :func:`emloc_kernels.lm_head_cross_entropy` so
  full fp32 logits never exist, and only positions with a target reach the LM head; :func:`training_step` is
  one optimizer step over micro-batches.
* :func:`place_input_embedding` keeps an untied input embedding on the host: it is only looked up, so only the
  looked-up rows travel to the device (the memory plan's default, ``TrainConfig.embeddings_on_device``).
* :func:`train` is the loop: AdamW over the LoRA weights only (fp32 state), cosine schedule with warm-up,
  gradient accumulation and clipping, gradient checkpointing, eval loss and exact-match accuracy, checkpoints
  and resume, a progress bar, and data parallelism when ``torch.distributed`` is initialised (torchrun).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from emloc_kernels import lm_head_cross_entropy

from .data import IGNORE, collate, load_examples, pad_token_id, split_examples, target_tokens
from .errors import UserError, check_float, check_int
from .files import atomic_directory, atomic_write_text, read_json
from .locking import output_lock
from .lora import LoraAdapter, add_lora, lora_modules, lora_parameters
from .streaming import read_header, read_tensors

ADAPTER_DIR = "adapter"
REPORT_FILE = "train_report.json"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_JSON, STATE_TENSORS, LEGACY_STATE = "state.json", "state.safetensors", "state.pt"


@dataclass
class TrainConfig:
    """Training settings; the defaults follow the reference recipe (docs/design.md §1.8).

    The global batch per optimizer step is ``micro_batch_size * grad_accum * world_size`` examples. Less obvious
    fields: ``lora_target`` (regex or names, see :func:`emloc.add_lora`; None: every linear but the LM head),
    ``lm_head_chunk`` (tokens per LM-head block: bounds the logits memory), ``eval_fraction`` (held-out share
    of the data), ``eval_steps`` (evaluate every N steps, 0: only at the end), ``save_steps`` (checkpoint every
    N steps), ``max_grad_norm`` (None: no clipping), ``embeddings_on_device`` (False: the input embedding stays
    on the host unless it is tied to the LM head; see :func:`place_input_embedding`).
    """

    output_dir: str | None = None
    max_steps: int = 500
    micro_batch_size: int = 2
    grad_accum: int = 4
    learning_rate: float = 4e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    lora_r: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    rslora: bool = False
    lora_target: str | list[str] | None = None
    max_length: int = 2048
    gradient_checkpointing: bool = True
    lm_head_chunk: int = 1024
    embeddings_on_device: bool = True
    eval_fraction: float = 0.05
    eval_steps: int = 0
    save_steps: int = 100
    resume: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "lora_r", "lm_head_chunk", "max_length",
                     "save_steps"):
            check_int(getattr(self, name), f"TrainConfig.{name}")
        check_int(self.eval_steps, "TrainConfig.eval_steps", minimum=0)
        check_float(self.learning_rate, "TrainConfig.learning_rate", 0, math.inf, low_open=True, high_open=True)
        check_float(self.warmup_ratio, "TrainConfig.warmup_ratio", 0, 1)
        check_float(self.weight_decay, "TrainConfig.weight_decay", 0, math.inf, high_open=True)
        check_float(self.lora_dropout, "TrainConfig.lora_dropout", 0, 1, high_open=True)
        check_float(self.eval_fraction, "TrainConfig.eval_fraction", 0, 1, high_open=True)
        if self.max_grad_norm is not None:
            check_float(self.max_grad_norm, "TrainConfig.max_grad_norm", 0, math.inf, low_open=True, high_open=True)
        if self.lora_alpha is not None:
            check_float(self.lora_alpha, "TrainConfig.lora_alpha", 0, math.inf, low_open=True, high_open=True)


# --- loss ------------------------------------------------------------------------------------------------


def compute_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: the LM head's device (the input embedding may be on the host)."""
    return model.get_output_embeddings().weight.device


def host_embedding(model: nn.Module, on_device: bool) -> nn.Module | None:
    """The input embedding that stays on the host in training: None with ``on_device`` or when it is tied to
    the LM head (the head needs it on the device). The memory plan and its dry run count it by this rule."""
    embedding = model.get_input_embeddings()
    tied = embedding.weight is model.get_output_embeddings().weight
    return None if on_device or tied else embedding


def place_input_embedding(model: nn.Module, on_device: bool) -> bool:
    """Move the input embedding to the host (:func:`host_embedding`) or to the compute device.

    It is only looked up, so on the host it costs the device nothing but the looked-up rows, which
    :class:`CausalLMLoss` moves over. Returns whether the embedding is on the host afterwards.
    """
    host = host_embedding(model, on_device)
    if host is not None:
        host.to("cpu")
    else:
        model.get_input_embeddings().to(compute_device(model))
    return host is not None


class CausalLMLoss(nn.Module):
    """A causal LM's training loss as a module: embedding lookup, decoder, then the chunked LM head and cross
    entropy.

    ``forward(input_ids, attention_mask, labels, normalizer) -> (loss, correct)`` with ``correct (B, T)``
    marking tokens whose next-token argmax is the label. The embedding is looked up where it lives (the host,
    after :func:`place_input_embedding`) and its rows moved to the LM head's device, where everything else
    runs. Wrap this module (not the model) in DDP.
    """

    def __init__(self, model: nn.Module, chunk: int = 1024) -> None:
        super().__init__()
        self.model, self.chunk = model, chunk
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise UserError("CausalLMLoss: an LM head with a bias is not supported")
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                normalizer: Tensor | float) -> tuple[Tensor, Tensor]:
        embedding = self.model.get_input_embeddings()
        device = compute_device(self.model)
        embeds = embedding(input_ids.to(embedding.weight.device)).to(device)
        hidden = self.model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                          use_cache=False).last_hidden_state
        # Position t predicts token t + 1: shift the labels, not the (large) hidden states.
        shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1).reshape(-1)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        # Only positions with a target reach the LM head: on chat data (short answers after long prompts) the
        # head over every position would be most of the step. Selecting costs one host sync per micro-batch;
        # a dry run (meta) plans for every position having a target.
        meta = hidden.device.type == "meta"
        targets = slice(None) if meta else (shifted != IGNORE).nonzero()[:, 0]
        loss, hit = lm_head_cross_entropy(hidden[targets], self.model.get_output_embeddings().weight,
                                          shifted[targets], normalizer, self.chunk, self.softcap, ignore_index=IGNORE)
        correct = hit if meta else torch.zeros_like(shifted, dtype=torch.bool).index_copy_(0, targets, hit)
        return loss, correct.view_as(labels)


def training_step(loss_module: nn.Module, micro_batches: list[dict[str, Tensor]], normalizer: Tensor | float,
                  optimizer: torch.optim.Optimizer, scheduler, parameters: list[Tensor],
                  max_grad_norm: float | None) -> Tensor:
    """One optimizer step: forward and backward over ``micro_batches`` (gradients accumulate), clip, step.

    Each micro-batch's loss is its summed token loss over ``normalizer`` (the global target-token count), so
    accumulation and data parallelism reproduce one big batch. Under DDP, gradients are reduced on the last
    micro-batch only. Returns the summed loss as a tensor (its only host syncs select the target positions).
    """
    total = None
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = loss_module.no_sync() if isinstance(loss_module, nn.parallel.DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with sync:
            loss, _ = loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"], normalizer)
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to zero.

    The first step runs at ``1 / warmup`` of the rate. ``transformers.get_cosine_schedule_with_warmup`` has the
    same decay but a warm-up one step behind, starting at zero: a one-step run would not train.
    """
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in backward (non-reentrant: works with frozen inputs and DDP)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"gradient checkpointing: {type(model).__name__} does not support it; "
                         "set gradient_checkpointing=False")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# --- evaluation ------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], batch_size: int = 4, chunk: int = 1024,
             pad_id: int = 0) -> dict[str, float]:
    """Mean target-token loss and exact-match accuracy of chat answers on ``examples``.

    An answer counts as exact when the argmax after every prefix of it is its next token, which is exactly
    when greedy decoding from the prompt reproduces the answer token for token, so no generation is needed.
    """
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    device = compute_device(model)
    loss_module = CausalLMLoss(model, chunk)
    total_loss, exact, answers = 0.0, 0, 0
    normalizer = target_tokens(examples)
    for start in range(0, len(examples), batch_size):
        part = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        loss, correct = loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"], normalizer)
        total_loss += float(loss)
        target = torch.cat([batch["labels"][:, 1:] != IGNORE, correct.new_zeros(len(part), 1)], dim=1)
        hit = (correct | ~target).all(1)
        chat = torch.tensor([e.get("chat", False) for e in part], device=device)
        exact += int((hit & chat).sum())
        answers += int(chat.sum())
    model.train(was_training)
    result = {"eval_loss": total_loss}
    if answers:
        result["eval_exact_match"] = exact / answers
    return result


# --- the loop --------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def _latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted((p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
                    if p.name[len(CHECKPOINT_PREFIX):].isdigit()
                    and ((p / STATE_JSON).is_file() or (p / LEGACY_STATE).is_file())),
                   key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
    return found[-1] if found else None


def _save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, history: list, lora_form) -> None:
    """``checkpoint-<step>``: the adapter, every tensor of the training state in ``state.safetensors`` (LoRA
    weights, AdamW moments and steps, the RNG state) and the rest in ``state.json`` (step, losses, scheduler,
    optimizer settings). Nothing in it is a pickle, so resuming never executes code from the run directory.
    Written to a temporary directory and renamed; older checkpoints are removed after."""
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


def _read_checkpoint(directory: Path) -> dict:
    """The training state saved by :func:`_save_checkpoint`, as ``{"step", "history", "lora", "rng",
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


@dataclass
class TrainResult:
    """What :func:`train` did: per-step losses, the final eval metrics, and where the adapter was written."""

    losses: list[float] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)
    adapter_dir: Path | None = None
    steps: int = 0


def _saved_tokenizer(model: nn.Module):
    """The tokenizer stored beside the model's weights (``config._name_or_path``), with a clear error if none."""
    directory = Path(getattr(model.config, "_name_or_path", "") or ".")
    if not (directory / "tokenizer_config.json").is_file():
        raise UserError(f"train: the data is a file and the model's directory ({directory}) holds no tokenizer; "
                         "pass tokenizer=")
    return transformers.AutoTokenizer.from_pretrained(directory)


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
    """
    rank, world = _world()
    writes = config.output_dir is not None and rank == 0
    with output_lock(config.output_dir) if writes else contextlib.nullcontext():
        return _train(model, data, config, tokenizer, eval_data, rank, world)


def _train(model: nn.Module, data, config: TrainConfig, tokenizer, eval_data, rank: int, world: int) -> TrainResult:
    if tokenizer is None and not isinstance(data, list):
        tokenizer = _saved_tokenizer(model)
    pad_id = pad_token_id(tokenizer)
    examples = data if isinstance(data, list) else load_examples(data, tokenizer, config.max_length)
    if eval_data is None:
        examples, eval_examples = split_examples(examples, config.eval_fraction, config.seed)
    else:
        eval_examples = eval_data if isinstance(eval_data, list) else load_examples(eval_data, tokenizer,
                                                                                     config.max_length)
    torch.manual_seed(config.seed)
    # How the scaling was formed is known only when LoRA is added here; otherwise it is recorded as alpha = s r.
    lora_form = (None, False)
    if not lora_modules(model):
        add_lora(model, config.lora_target, config.lora_r, config.lora_alpha, config.lora_dropout, config.rslora)
        lora_form = (config.lora_r if config.lora_alpha is None else config.lora_alpha, config.rslora)
    parameters = lora_parameters(model)
    if world > 1 and not config.embeddings_on_device:
        raise UserError("TrainConfig.embeddings_on_device: data parallelism needs the input embedding on the "
                         "device; set embeddings_on_device=True")
    place_input_embedding(model, config.embeddings_on_device)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    device = parameters[0].device
    loss_module: nn.Module = CausalLMLoss(model, config.lm_head_chunk)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(loss_module)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, config.max_steps, config.warmup_ratio)

    output_dir = Path(config.output_dir) if config.output_dir else None
    step, history = 0, []
    latest = _latest_checkpoint(output_dir) if output_dir and config.resume else None
    if latest is not None:
        state = _read_checkpoint(latest)
        model.load_state_dict(state["lora"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, history = state["step"], state["history"]

    per_rank = config.micro_batch_size * config.grad_accum
    batches = _global_batches(len(examples), per_rank * world, config.seed)
    for _ in range(step):  # the data order depends only on the step: skip what was already trained on
        next(batches)
    bar = tqdm(total=config.max_steps, initial=step, desc="training LoRA", unit="step",
               disable=not config.progress or rank != 0)
    result = TrainResult(losses=history)
    while step < config.max_steps:
        chosen = [examples[i] for i in next(batches)]
        mine = chosen[rank * per_rank:(rank + 1) * per_rank]
        micro = [{k: v.to(device) for k, v in collate(mine[i:i + config.micro_batch_size], pad_id).items()}
                 for i in range(0, per_rank, config.micro_batch_size)]
        started = time.perf_counter()
        # DDP averages gradients over ranks; dividing the normalizer by the world size turns that into the sum.
        loss = training_step(loss_module, micro, target_tokens(chosen) / world, optimizer, scheduler, parameters,
                             config.max_grad_norm)
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        step += 1
        history.append(float(loss))
        tokens = sum(len(e["input_ids"]) for e in chosen)
        bar.set_postfix(loss=f"{history[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
        bar.update()
        if config.eval_steps and step % config.eval_steps == 0 and step < config.max_steps and rank == 0:
            bar.write(f"step {step}: " + json.dumps(evaluate(model, eval_examples, config.micro_batch_size,
                                                             config.lm_head_chunk, pad_id)))
        if output_dir and rank == 0 and (step % config.save_steps == 0 or step == config.max_steps):
            output_dir.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(output_dir, step, model, optimizer, scheduler, history, lora_form)
    bar.close()

    result.steps = step
    if rank == 0:
        result.eval = evaluate(model, eval_examples, config.micro_batch_size, config.lm_head_chunk, pad_id)
    if output_dir and rank == 0:
        adapter = LoraAdapter.from_model(model, *lora_form, base_model=getattr(model.config, "_name_or_path", None))
        result.adapter_dir = adapter.save(output_dir / ADAPTER_DIR)
        report = {"steps": step, "losses": history, **result.eval,
                  "train_examples": len(examples), "eval_examples": len(eval_examples), "config": asdict(config)}
        atomic_write_text(output_dir / REPORT_FILE, json.dumps(report, indent=2))
    return result
