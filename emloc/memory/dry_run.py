"""Dry run: the pipeline's own per-block and per-step functions at full size on the meta device, with a
:class:`~emloc.memory.tracker.LiveBytesTracker` counting the peak live bytes each stage would hold on the
compute device. Nothing is allocated; a 38B model runs in seconds.

* construction: one block of each stack, :func:`emloc.build.calibrate_block` over one calibration
  micro-batch and :func:`emloc.build.compress_block` with the planned ranks: a decoder block, and a vision
  tower's block on the micro-batch's image tiles as :func:`emloc.models.capture_block_inputs` catches them
  from the model's own forward on meta pixel values;
* refresh: the decoder block's construction with the training's LoRA attached for the calibration pass by
  :meth:`emloc.lora.LoraAdapter.attached`, as a refresh attaches it; the training state waits on the host,
  so only the block's pass is on the device;
* training: the whole emulator (planned ranks, LoRA from :func:`emloc.lora.add_lora`, gradient
  checkpointing), one step of :class:`emloc.training.CausalLMLoss` (chunked LM head) with AdamW;
* healing: the whole emulator with the heal adapter of :func:`emloc.healing.add_heal_adapter`, one step of
  :func:`emloc.healing.heal_loss` (chunked KL) on one sample with AdamW;
* correction: :func:`emloc.correction.correct_layer` on the largest linear;
* export: merging the corrected LoRA into the largest linear, as a merged-weights export does shard by shard.

Attention runs through the flash-attention op (its meta kernel, :mod:`emloc.memory.meta_models`), which is
what a GPU run uses. In training a vision tower is frozen and outside the gradient: its weights are counted,
its transient forward is planned analytically.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import healing, lora, models, training
from ..build import BlockInput, calibrate_block, compress_block, emulate_block, plan_compression
from ..build.plan import stack_compression
from ..correction import correct_layer
from ..export import merge_lora
from ..layers import EmulatorLinear
from ..ranks import compressed_rank
from . import estimate
from .meta_models import language_config, meta_model, vision_language_config
from .spec import model_spec
from .tracker import LiveBytesTracker


def _emulate(model: nn.Module, ratio: float) -> None:
    plans = plan_compression(model, ratio) if ratio < 1 else None
    if plans is None:
        return
    _, stack = models.block_stack(model)
    for block, plan in zip(stack, plans, strict=True):
        emulate_block(block, plan)


def _tokens(batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    ids = torch.empty(batch, seq_len, dtype=torch.long, device="meta")
    return {"input_ids": ids, "attention_mask": torch.empty_like(ids), "labels": torch.empty_like(ids)}


def _construct(block: nn.Module, plan, item: BlockInput, svd: str, adapter: lora.LoraAdapter | None = None) -> int:
    """Peak device bytes of the build's steps on one block: calibrate on ``item`` (with ``adapter``'s LoRA
    attached for the pass, as a refresh attaches it), then compress."""
    with LiveBytesTracker("meta") as tracker:
        tracker.adopt([*block.parameters(), item.hidden, item.mask])
        with adapter.attached(block) if adapter is not None else contextlib.nullcontext():
            # the sink is where a build sends each output to the host; here it is simply dropped
            covariances = calibrate_block(block, plan, [item], sink=lambda index, output: None)
        del item
        compress_block(block, plan, covariances, svd=svd)
    return tracker.peak


def _task_lora(model: nn.Module, prefix: str, r: int) -> lora.LoraAdapter:
    """The adapter of the LoRA training puts on block ``prefix`` of ``model`` (rank ``r`` on the default
    target, fp32 on meta), named within the block as a refresh attaches it."""
    weights = {name: (torch.empty(r, linear.in_features, device="meta"),
                      torch.empty(linear.out_features, r, device="meta"))
               for name, linear in ((n, model.get_submodule(n)) for n in lora.target_modules(model, None))}
    return lora.LoraAdapter(weights, r=r, alpha=float(r)).within(prefix)


def measure_construction(config: dict, ratio: float, seq_len: int, micro_batch: int, svd: str,
                         dtype: torch.dtype = torch.bfloat16, lora_r: int = 0) -> int:
    """Peak device bytes to calibrate and compress one decoder block on one micro-batch; with ``lora_r`` (a
    refresh), calibrated with the training's LoRA of that rank attached."""
    model = meta_model(language_config(config, layers=1), dtype)
    plan = plan_compression(model, ratio)[0]
    prefix, stack = models.block_stack(model)
    adapter = _task_lora(model, f"{prefix}.0", lora_r) if lora_r else None
    hidden = torch.empty(micro_batch, seq_len, model.config.hidden_size, dtype=dtype, device="meta")
    positions = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta")
    item = BlockInput(hidden, {"position_embeddings": model.model.rotary_emb(hidden, positions)},
                      torch.empty(micro_batch, seq_len, dtype=torch.bool, device="meta"))
    del hidden
    return _construct(stack[0], plan, item, svd, adapter)


def measure_vision_construction(config: dict, ratio: float | None, images: int, svd: str,
                                dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak device bytes to calibrate and compress (``ratio`` None: only run) one vision-tower block on
    ``images`` image tiles, the tower's inputs caught from the model's own forward as the build catches them."""
    model = meta_model(vision_language_config(config, text_layers=1, vision_layers=1), dtype)
    plan = plan_compression(model, stack_compression(model, 1.0, ratio))[0] if ratio is not None else []
    _, stack = models.vision_stack(model)
    vision = model.config.vision_config
    side = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    pixels = torch.empty(images, vision.num_channels, side, side, dtype=dtype, device="meta")
    ids = torch.empty(1, 1, dtype=torch.long, device="meta")
    hidden, kwargs = models.capture_block_inputs(model, ids, torch.empty_like(ids), stack=stack, pixel_values=pixels)
    # every image token counts (emloc.build.SourceCheckpoint.capture)
    item = BlockInput(hidden, kwargs[0], torch.empty(hidden.shape[:-1], dtype=torch.bool, device="meta"))
    del hidden
    return _construct(stack[0], plan, item, svd)


def _optimizer_after_one_step(parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over ``parameters`` after one (zero-gradient) step, so its state exists as in every later step."""
    optimizer = torch.optim.AdamW(parameters)
    for p in parameters:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _step_peak(model: nn.Module, parameters: list[nn.Parameter], embeddings_on_device: bool,
               extra_weight_bytes: int, loss_of_one_micro_batch) -> int:
    """Peak device bytes of one optimizer step: forward and backward of ``loss_of_one_micro_batch()``,
    clipping and AdamW, with the model (less an input embedding kept on the host) and the optimizer state
    resident. ``extra_weight_bytes`` adds frozen weights outside the language model (a vision tower)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = _optimizer_after_one_step(parameters)
    # the input embedding is only looked up: unless it doubles as the LM head, it stays on the host
    host = training.host_embedding(model, embeddings_on_device)
    resident = [t for t in [*model.parameters(), *model.buffers()] if host is None or t is not host.weight]
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    with LiveBytesTracker("meta") as tracker:
        tracker.adopt([*resident, *state])
        tracker.live += extra_weight_bytes
        loss = loss_of_one_micro_batch()
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tracker.peak


def measure_training(config: dict, ratio: float, seq_len: int, batch: int, lora_r: int, lm_head_chunk: int,
                     embeddings_on_device: bool, extra_weight_bytes: int = 0,
                     dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak device bytes of one training step on the whole emulator (second step: optimizer state exists).

    ``extra_weight_bytes`` adds frozen weights outside the language model (a vision tower, its projector).
    """
    model = meta_model(language_config(config), dtype)
    _emulate(model, ratio)
    lora.add_lora(model, r=lora_r)
    loss_module = training.CausalLMLoss(model, lm_head_chunk)

    def loss():
        tokens = _tokens(batch, seq_len)
        return loss_module(tokens["input_ids"], tokens["attention_mask"], tokens["labels"], float(batch * seq_len))[0]

    return _step_peak(model, lora.lora_parameters(model), embeddings_on_device, extra_weight_bytes, loss)


def measure_healing(config: dict, ratio: float, seq_len: int, heal_rank: int, lm_head_chunk: int,
                    extra_weight_bytes: int = 0, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak device bytes of one healing step (second step: optimizer state exists) on one sample, through
    :func:`emloc.healing.heal_loss` with the heal adapter of :func:`emloc.healing.add_heal_adapter`;
    ``extra_weight_bytes`` as in :func:`measure_training`."""
    model = meta_model(language_config(config), dtype)
    _emulate(model, ratio)
    ranks = {name: healing.heal_rank(healing.HealConfig(rank=heal_rank), module.rank)
             for name, module in model.named_modules() if isinstance(module, EmulatorLinear)}
    parameters = healing.add_heal_adapter(model, {name: rank for name, rank in ranks.items() if rank})
    samples, hidden = estimate.HEAL_MICRO_BATCH, model.config.hidden_size

    def loss():
        tokens = _tokens(samples, seq_len)
        teacher = torch.empty(samples, seq_len, hidden, dtype=dtype, device="meta")
        return healing.heal_loss(model, tokens["input_ids"], tokens["attention_mask"], teacher, float(seq_len),
                                 lm_head_chunk)

    return _step_peak(model, parameters, False, extra_weight_bytes, loss)


def _largest_linear(config: dict) -> tuple[int, int]:
    model = meta_model(language_config(config, layers=1), torch.bfloat16)
    _, stack = models.block_stack(model)
    linears = [m for m in stack[0].modules() if isinstance(m, nn.Linear)]
    big = max(linears, key=lambda m: m.weight.numel())
    return big.out_features, big.in_features


def measure_correction(config: dict, ratio: float, lora_r: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak device bytes of :func:`emloc.correction.correct_layer` on the largest linear."""
    m, n = _largest_linear(config)
    rank = compressed_rank(ratio, m, n)
    with LiveBytesTracker("meta") as tracker:
        meta = {"device": "meta"}
        weight = torch.empty(m, n, dtype=dtype, **meta)
        a, b = torch.empty(lora_r, n, **meta), torch.empty(m, lora_r, **meta)
        emulated = weight if rank is None else (torch.empty(m, rank, dtype=dtype, **meta),
                                                torch.empty(rank, n, dtype=dtype, **meta))
        correct_layer(a, b, 1.0, weight, emulated)
    return tracker.peak


def measure_export(config: dict, lora_r: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak device bytes of merging the corrected LoRA into the largest linear."""
    m, n = _largest_linear(config)
    with LiveBytesTracker("meta") as tracker:
        weight = torch.empty(m, n, dtype=dtype, device="meta")
        merge_lora(weight, torch.empty(lora_r, n, device="meta"), torch.empty(m, lora_r, device="meta"), 1.0)
    return tracker.peak


def verify(plan) -> dict[str, tuple[int, int]]:
    """Dry-run every stage of ``plan`` (an :class:`emloc.memory.Plan`) at full size on the meta device.

    Returns ``{stage: (planned device bytes, measured device bytes)}``; for a vision-language model also the
    construction of each stack, ``"construction: language model"`` and ``"construction: vision tower"``
    (the stage's peak is the larger of the two), and the refresh of its decoder, ``"refresh: language
    model"`` (the tower is refreshed as it was built: no LoRA).
    """
    s, config = plan.settings, plan.config
    spec = model_spec(config, plan.model)
    dtype = {2: torch.bfloat16, 4: torch.float32}[spec.dtype_bytes]
    vision_bytes = estimate.vision_params(spec, s) * spec.dtype_bytes
    construction = {"language model": (
        estimate.stack_construction(spec, s, spec.language).device_peak,
        measure_construction(config, s.ratio, s.seq_len, s.calibration_micro_batch, s.method, dtype))}
    if spec.vision is not None:
        images = s.calibration_micro_batch * estimate.image_tiles(spec, s)
        construction["vision tower"] = (
            estimate.stack_construction(spec, s, spec.vision.stack).device_peak,
            measure_vision_construction(config, estimate.tower_ratio(s), images, s.method, dtype))
    # a refresh re-runs the build with the LoRA on the decoder's blocks; the tower's are run as they were built
    refresh = {**construction, "language model": (
        estimate.stack_construction(spec, s, spec.language, s.lora_r).device_peak,
        measure_construction(config, s.ratio, s.seq_len, s.calibration_micro_batch, s.method, dtype, s.lora_r))
    } if s.refreshes else {}
    measured = {
        "construction": max(m for _, m in construction.values()),
        "training": measure_training(config, s.ratio, s.seq_len, s.batch, s.lora_r, s.lm_head_chunk,
                                     s.embeddings_on_device, vision_bytes, dtype),
        **({"healing": measure_healing(config, s.ratio, s.seq_len, s.heal_rank, s.lm_head_chunk, vision_bytes, dtype)}
           if s.heal_rank else {}),
        **({"refresh": max(m for _, m in refresh.values())} if s.refreshes else {}),
        "correction": measure_correction(config, s.ratio, s.lora_r, dtype),
        "export": measure_export(config, s.lora_r, dtype),
    }
    planned = {stage.name: stage.device_peak for stage in plan.stages}
    checked = {name: (planned[name], measured[name]) for name in measured}
    if spec.vision is not None:
        checked.update({f"construction: {name}": pair for name, pair in construction.items()})
        if s.refreshes:
            checked["refresh: language model"] = refresh["language model"]
    return checked
