"""``emloc train EMULATOR_DIR --data FILE --out DIR``: train LoRA on an emulator (checkpoints and resume in DIR)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os

import torch

from ..errors import UserError
from ..training import TrainConfig
from .options import (
    add_batch_argument,
    add_device_argument,
    add_dtype_argument,
    add_lora_rank_argument,
    add_refreshes_argument,
    natural_int,
    positive_int,
)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options shared by ``emloc train`` and ``emloc run`` (defaults from :class:`TrainConfig`)."""
    d = TrainConfig()
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=positive_int, default=d.max_steps, help="optimizer steps (default %(default)s)")
    add_batch_argument(group, "training micro-batch (default %(default)s)", default=d.micro_batch_size)
    group.add_argument("--accum", type=positive_int, default=d.grad_accum,
                       help="gradient accumulation (default %(default)s)")
    group.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate (default %(default)s)")
    group.add_argument("--warmup", type=float, default=d.warmup_ratio, help="warm-up fraction (default %(default)s)")
    group.add_argument("--weight-decay", type=float, default=d.weight_decay)
    group.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clipping (0: off)")
    add_lora_rank_argument(group)
    group.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    group.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    group.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r)")
    group.add_argument("--target", default=None,
                       help="regular expression over module names (default: every linear but the LM head)")
    group.add_argument("--max-length", type=positive_int, default=d.max_length,
                       help="tokens per example (default %(default)s)")
    group.add_argument("--lm-head-chunk", type=positive_int, default=d.lm_head_chunk, help="tokens per LM-head chunk")
    group.add_argument("--no-checkpointing", action="store_true", help="keep activations (no gradient checkpointing)")
    group.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="held-out share of the data")
    group.add_argument("--eval-steps", type=natural_int, default=d.eval_steps,
                       help="evaluate every N steps (0: at the end)")
    group.add_argument("--save-steps", type=positive_int, default=d.save_steps, help="checkpoint every N steps")
    group.add_argument("--seed", type=int, default=d.seed)
    add_refreshes_argument(group)
    add_dtype_argument(group)
    add_device_argument(group)


def train_config(args: argparse.Namespace, output_dir: str | None) -> TrainConfig:
    """The :class:`TrainConfig` the parsed training options describe."""
    return TrainConfig(
        output_dir=output_dir, max_steps=args.steps, micro_batch_size=args.batch, grad_accum=args.accum,
        learning_rate=args.lr, warmup_ratio=args.warmup, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, rslora=args.rslora, lora_target=args.target, max_length=args.max_length,
        gradient_checkpointing=not args.no_checkpointing, lm_head_chunk=args.lm_head_chunk,
        eval_fraction=args.eval_fraction, eval_steps=args.eval_steps, save_steps=args.save_steps, seed=args.seed,
        refreshes=args.refreshes)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train LoRA on an emulator",
        description="Train LoRA on an emulator built by `emloc build`. Checkpoints go to --out and a rerun resumes "
                    "from the latest; the trained adapter is written to OUT/adapter. Under torchrun each process "
                    "takes its share of every global batch.")
    parser.add_argument("emulator", help="emulator directory")
    parser.add_argument("--data", required=True, help="training data: JSONL (text / messages / conversations) or .txt")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--budget", default=None, metavar="SIZE",
                        help="device memory to fit (24GiB, 20GB, ...): the LM-head chunk and the input embedding's "
                             "place follow the memory plan of this emulator; refused when it does not fit")
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def _init_distributed() -> str | None:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs) and return this
    process's device, or None when not launched by torchrun."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def _leave_distributed() -> None:
    """Under torchrun: wait for every rank (rank 0 writes the adapter last), then leave the process group, so
    that no rank exits while another still talks to it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _built_with(emulator_dir: str) -> tuple[float, int]:
    """The single compression ratio an emulator directory was built with and its calibration sample count
    (its config's ``emloc`` section): what the plan's refreshes rebuild with."""
    from ..build import read_emloc_section

    section = read_emloc_section(emulator_dir)
    compression = section["compression"]
    if list(compression) != [".*"]:
        raise UserError(f"{emulator_dir}: built with per-module ratios {compression}; --budget plans one ratio")
    return compression[".*"], section["calibration"]["max_samples"]


def run(args: argparse.Namespace) -> int:
    import transformers

    from ..build import load_emulator
    from ..locking import output_lock
    from ..pipeline import plan_for_budget
    from ..training import train

    device = _init_distributed() or args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = train_config(args, args.out)
    if args.budget is not None:
        ratio, samples = _built_with(args.emulator)
        followed = plan_for_budget(args.emulator, args.budget, config, ratio, max_samples=samples,
                                   dtype=args.dtype, heal_rank=0)  # the emulator is built
        print(followed.table())
        config = dataclasses.replace(config, **followed.train_kwargs())
    # rank 0 writes --out: it takes the lock before the emulator loads, so a second run fails at once
    with output_lock(args.out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.emulator)
        model = load_emulator(args.emulator, device=device, dtype=args.dtype)
        result = train(model, args.data, config, tokenizer=tokenizer)
    _leave_distributed()
    if result.adapter_dir is not None:
        print(json.dumps({"steps": result.steps, "first_loss": result.losses[0], "last_loss": result.losses[-1],
                          **result.eval, "adapter": str(result.adapter_dir),
                          "trained_on": str(getattr(model.config, "_name_or_path", args.emulator))}, indent=2))
    return 0
