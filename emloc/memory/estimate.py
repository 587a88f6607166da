"""Analytic memory of each pipeline stage: bytes per term, on the compute device and on the host.

Every term follows what the pipeline code allocates (checked against the dry run of
:mod:`emloc.memory.dry_run`); ``B`` is the weight dtype's size, ``T`` the tokens of a micro-batch.
"""
from __future__ import annotations

from ..ranks import compressed_rank
from .spec import BlockStack, Linear, ModelSpec
from .stage import Settings, StageMemory, not_concurrent
from .tracker import eigh_workspace_bytes

FP32 = 4
ADAMW_MOMENTS = 2 * FP32  # AdamW's exp_avg and exp_avg_sq of an fp32 parameter
LORA_BYTES_PER_PARAM = FP32 + FP32 + ADAMW_MOMENTS  # fp32 weight and gradient, and the AdamW moments
HEAL_MICRO_BATCH = 1  # HealConfig.micro_batch_size
KL_LOGITS = 6  # (chunk, vocab) fp32 blocks alive at once in the chunked KL: both logits, both log-softmaxes, p_t, grad


def rank(ratio: float, linear: Linear) -> int | None:
    """Rank kept for ``linear`` at ``ratio`` (docs/design.md §1.5), None when the layer stays dense."""
    return compressed_rank(ratio, linear.out_features, linear.in_features)


def _emulated_params(linear: Linear, ratio: float | None) -> int:
    r = None if ratio is None else rank(ratio, linear)
    weight = linear.in_features * linear.out_features if r is None else r * (linear.in_features + linear.out_features)
    return weight + (linear.out_features if linear.bias else 0)


def stack_params(stack: BlockStack, ratio: float | None) -> int:
    """Parameters of ``stack`` with its linears compressed at ``ratio`` (None: dense)."""
    return stack.blocks * (sum(_emulated_params(linear, ratio) for linear in stack.linears) + stack.other_params)


def emulator_params(spec: ModelSpec, s: Settings) -> int:
    """Parameters of the emulator: compressed decoder, LM head, embeddings, vision tower as chosen."""
    total = stack_params(spec.language, s.ratio) + spec.final_norm_params
    total += spec.embedding_params * (1 if spec.tied_embeddings else 2)
    return total + vision_params(spec, s)


def tower_ratio(s: Settings) -> float | None:
    """The vision tower's compression ratio, None when it stays dense."""
    if not s.compress_vision:
        return None
    return s.ratio if s.vision_ratio is None else s.vision_ratio


def vision_params(spec: ModelSpec, s: Settings) -> int:
    """Parameters of the vision tower (compressed or dense), its embeddings and projector; 0 without one."""
    v = spec.vision
    if v is None:
        return 0
    projector = sum(linear.params for linear in v.projector) + v.projector_other_params
    return stack_params(v.stack, tower_ratio(s)) + v.embedding_params + projector


def block_lora_params(stack: BlockStack, r: int) -> int:
    """LoRA parameters of one block of ``stack``: rank ``r`` on each of its linears."""
    return sum(r * (linear.in_features + linear.out_features) for linear in stack.linears)


def lora_params(spec: ModelSpec, r: int) -> int:
    """Trainable LoRA parameters: rank ``r`` on every decoder linear (the vision tower stays frozen)."""
    return spec.language.blocks * block_lora_params(spec.language, r)


def image_tiles(spec: ModelSpec, s: Settings) -> int:
    """Image tiles per sample: as many as the sequence holds, at most the model's dynamic-tiling limit."""
    if spec.vision is None:
        return 0
    if s.image_tiles is not None:
        return s.image_tiles
    return max(1, min(spec.vision.max_tiles, s.seq_len // spec.vision.llm_tokens_per_tile))


# --- construction -----------------------------------------------------------------------------------------


def _covariance_sizes(stack: BlockStack, ratio: float) -> list[int]:
    """Side of every fp32 covariance one block accumulates: an input covariance per group with a linear on
    the whitened route (``out >= in``), an output covariance per linear on the output route (``out < in``)."""
    sizes = []
    for members in stack.groups.values():
        compressed = [linear for linear in members if rank(ratio, linear) is not None]
        sizes += [linear.out_features for linear in compressed if linear.out_features < linear.in_features]
        if any(linear.out_features >= linear.in_features for linear in compressed):
            sizes.append(members[0].in_features)
    return sizes


def decomposition_bytes(linear: Linear, r: int, method: str) -> int:
    """Working set of factoring one linear (``compress_block``): the fp32 weight, the symmetric eigenproblem
    its route solves (with the library workspace, or the range finder's probes), and the fp32 factors.
    Reconstruction errors come from the spectrum, so they cost nothing here."""
    m, n = linear.out_features, linear.in_features
    dense = FP32 * m * n
    factors = FP32 * r * (m + n)

    def eigenproblem(size: int) -> int:  # top-r eigenpairs of a size x size PSD matrix
        if method == "exact":
            return FP32 * size * size + eigh_workspace_bytes(size)
        return 3 * FP32 * size * min(r + 16, size)

    if m < n:  # output route from the accumulated m x m output covariance
        return dense + eigenproblem(m) + factors
    if m == n:  # output route from W C W^T: W C (m x n), then the m x m product and its eigenproblem
        return dense + FP32 * m * m + max(dense, eigenproblem(m)) + factors
    # whitened route: the group's basis S (n x n); the Gram matrix S^T (W^T W) S takes three n x n at once
    # (W^T W, W^T W S, the result), then the Gram matrix and its eigenproblem; W S (m x n) never exists
    square = FP32 * n * n
    return dense + square + max(3 * square, square + eigenproblem(n)) + factors


def _calibration_activation_bytes(stack: BlockStack, tokens: int, B: int) -> int:
    # no-grad block forward: the micro-batch in and out, the residual, and the MLP's (T, I) tensors
    return tokens * B * (stack.hidden_tensors * stack.hidden + stack.mlp_tensors * stack.intermediate)


def stack_tokens(spec: ModelSpec, stack: BlockStack, s: Settings) -> int:
    """Tokens one calibration sample puts through a block of ``stack``: its sequence, or its image tiles'."""
    if stack is spec.language:
        return s.seq_len
    return image_tiles(spec, s) * spec.vision.tokens_per_tile


def stack_construction(spec: ModelSpec, s: Settings, stack: BlockStack, lora_r: int = 0) -> StageMemory:
    """Building one block of ``stack``: its weights, the calibration micro-batch through it, the covariances
    of its input groups, then the factorisation of its largest linear; on the host every sample's block
    input and output. With ``lora_r`` (a refresh, :mod:`emloc.training.refresh`) a decoder block is
    calibrated with the task LoRA on its linears: their fp32 weights, and at the pass's peak the up
    projection's LoRA delta (fp32, and cast to the block's dtype) beside the MLP's tensors, one ``(T, I)``
    fp32 more; the LoRA is removed before the factorisation. A vision tower carries no task LoRA."""
    ratio = s.ratio if stack is spec.language else tower_ratio(s)
    B = spec.dtype_bytes
    ranked = [] if ratio is None else [(linear, rank(ratio, linear)) for linear in stack.linears]
    ranked = [(linear, r) for linear, r in ranked if r is not None]
    tokens = stack_tokens(spec, stack, s)
    micro_batch = s.calibration_micro_batch * tokens
    lora_r = lora_r if stack is spec.language else 0
    device = {
        "weights": stack.block_params * B,
        "covariances": 0 if ratio is None else sum(FP32 * n * n for n in _covariance_sizes(stack, ratio)),
        "activations": _calibration_activation_bytes(stack, micro_batch, B)
                       + (micro_batch * FP32 * stack.intermediate if lora_r else 0),
        "decomposition": max((decomposition_bytes(linear, r, s.method) for linear, r in ranked), default=0),
    }
    if lora_r:
        device["lora_optimizer"] = block_lora_params(stack, lora_r) * FP32
    host = {"activations": 2 * s.samples * tokens * stack.hidden * B, "weights": stack.block_params * B}
    # calibration (with the LoRA, if any), then factorisation: never at the same time
    calibration = device["activations"] + device.get("lora_optimizer", 0)
    return StageMemory("construction", device, host, not_concurrent(calibration, device["decomposition"]))


def _streamed(spec: ModelSpec, s: Settings, name: str, lora_r: int = 0) -> StageMemory:
    """One block at a time, every stack streamed (a vision tower's, dense or compressed, then the decoder's):
    the worst stack's block sets the device peak, and the worst stack's samples the host peak."""
    stacks = [spec.language] + ([spec.vision.stack] if spec.vision is not None else [])
    built = [stack_construction(spec, s, stack, lora_r) for stack in stacks]
    worst = max(built, key=lambda stage: stage.device_peak)
    host = max(built, key=lambda stage: stage.host_peak).host
    return StageMemory(name, worst.device, host, worst.not_concurrent)


def construction(spec: ModelSpec, s: Settings) -> StageMemory:
    """The build: every stack's blocks streamed through the device (:func:`stack_construction`)."""
    return _streamed(spec, s, "construction")


# --- training ---------------------------------------------------------------------------------------------


def block_activation_bytes(stack: BlockStack, tokens: int, B: int, lora_r: int) -> int:
    """What backward needs from one decoder block, recomputed under gradient checkpointing: two RMSNorms
    (fp32 input and normalised output), q, k, v, attention output and log-sum-exp, the four (T, I) MLP
    tensors and two (T, I) gradients of its backward, and each linear's ``x a^T``."""
    h, inter = stack.hidden, stack.intermediate
    q, kv = stack.heads * stack.head_dim, stack.kv_heads * stack.head_dim
    norms = 2 * (FP32 + B) * h
    attention = B * (2 * q + 2 * kv) + FP32 * stack.heads
    mlp = (4 + 2) * B * inter  # saved by the forward, and two (T, I) gradients alive at once in its backward
    lora = B * lora_r * len(stack.linears)
    return tokens * (norms + attention + mlp + lora)


def training(spec: ModelSpec, s: Settings) -> StageMemory:
    """The whole emulator on the device (embeddings optionally on the host), LoRA with fp32 AdamW state,
    one checkpointed hidden state per block, and either one LM-head chunk or one block recomputed."""
    B = spec.dtype_bytes
    lm = spec.language
    tokens = s.batch * s.seq_len
    on_host = 0 if s.embeddings_on_device or spec.tied_embeddings else spec.embedding_params
    checkpoints = lm.blocks * tokens * lm.hidden * B
    block = block_activation_bytes(lm, tokens, B, s.lora_r)
    logits = 3 * FP32 * min(s.lm_head_chunk, tokens) * spec.vocab
    device = {
        "weights": (emulator_params(spec, s) - on_host) * B,
        "lora_optimizer": lora_params(spec, s.lora_r) * LORA_BYTES_PER_PARAM,
        # alive throughout: each block's checkpointed input, and the hidden-state gradient of the chunked loss
        "activations": checkpoints + tokens * lm.hidden * B + block,
        "logits_loss": logits,
    }
    host = {"weights": on_host * B}
    # The LM-head chunks run before the blocks' backward recomputes any block, and the backward frees each
    # block's checkpoint as it fills in that block's LoRA gradients: of each pair the smaller never coexists
    # with the larger.
    return StageMemory("training", device, host,
                       not_concurrent(block, logits) + min(lora_params(spec, s.lora_r) * FP32, checkpoints))


def refresh(spec: ModelSpec, s: Settings) -> StageMemory:
    """A refresh during training (:mod:`emloc.training.refresh`): the build re-run with the task LoRA on the
    decoder's blocks (:func:`stack_construction` with ``lora_r``), the training state waiting on the host:
    the emulator's weights, the LoRA's fp32 weights and AdamW moments (gradients are None between steps),
    and the adapter's fp32 copy the build calibrates with (``LoraAdapter.from_model``)."""
    built = _streamed(spec, s, "refresh", s.lora_r)
    host = dict(built.host)
    host["weights"] += emulator_params(spec, s) * spec.dtype_bytes
    host["lora_optimizer"] = lora_params(spec, s.lora_r) * (FP32 + ADAMW_MOMENTS + FP32)
    return StageMemory("refresh", built.device, host, built.not_concurrent)


def heal_params(spec: ModelSpec, s: Settings) -> int:
    """Parameters of the heal adapter: rank ``min(heal_rank, r / 2)`` on every compressed language linear
    (:func:`emloc.healing.heal_rank`)."""
    per_block = 0
    for linear in spec.language.linears:
        r = rank(s.ratio, linear)
        if r is not None:
            per_block += min(s.heal_rank, r // 2) * (linear.in_features + linear.out_features)
    return spec.language.blocks * per_block


def healing(spec: ModelSpec, s: Settings) -> StageMemory:
    """The healing step (docs/design.md §1.7): the emulator on the device (an untied embedding on the host), a heal
    adapter of rank ``heal_rank`` with fp32 AdamW state, the checkpointed pass of one sample (the heal
    micro-batch) with its teacher states and the student-state gradient, and one chunk of the KL's logits; on the host
    the teacher states of every calibration sample."""
    B = spec.dtype_bytes
    lm = spec.language
    tokens = HEAL_MICRO_BATCH * s.seq_len
    on_host = 0 if spec.tied_embeddings else spec.embedding_params
    checkpoints = lm.blocks * tokens * lm.hidden * B
    block = block_activation_bytes(lm, tokens, B, s.heal_rank)
    logits = KL_LOGITS * FP32 * min(s.lm_head_chunk, tokens) * spec.vocab
    device = {
        "weights": (emulator_params(spec, s) - on_host) * B,
        "lora_optimizer": heal_params(spec, s) * LORA_BYTES_PER_PARAM,
        # the block checkpoints, and the final student states, teacher states and student-state gradient
        "activations": checkpoints + 3 * tokens * lm.hidden * B + block,
        "logits_loss": logits,
    }
    host = {"activations": s.samples * s.seq_len * lm.hidden * B, "weights": on_host * B}
    # The backward frees each block's checkpoint as it fills in that block's adapter gradients (the adapter is
    # large at rank 32): the smaller of the two never coexists with the larger.
    gradients = heal_params(spec, s) * FP32
    return StageMemory("healing", device, host, not_concurrent(block, logits) + min(gradients, checkpoints))



def _largest(spec: ModelSpec) -> Linear:
    return max(spec.language.linears, key=lambda linear: linear.in_features * linear.out_features)


def correction(spec: ModelSpec, s: Settings) -> StageMemory:
    """One layer at a time in float64 (``correct_layer``): ``W`` as loaded and in fp64, the emulator
    factors likewise, the LoRA; on the host the adapter."""
    B = spec.dtype_bytes
    big = _largest(spec)
    m, n = big.out_features, big.in_features
    r = rank(s.ratio, big)
    factors = m * n if r is None else r * (m + n)
    device = {
        "weights": (B + 8) * (m * n + factors),
        "lora_optimizer": (FP32 + 8) * s.lora_r * (m + n),
    }
    host = {"lora_optimizer": lora_params(spec, s.lora_r) * FP32 * 2}
    return StageMemory("correction", device, host)


def export(spec: ModelSpec, s: Settings) -> StageMemory:
    """Merged weights, shard by shard: ``W + s B^ A~`` in fp32 for one layer on the device; one shard and
    the adapter on the host."""
    B = spec.dtype_bytes
    big = _largest(spec)
    m, n = big.out_features, big.in_features
    device = {"weights": (2 * B + FP32) * m * n, "lora_optimizer": FP32 * s.lora_r * (m + n)}
    host = {"weights": s.shard_bytes, "lora_optimizer": lora_params(spec, s.lora_r) * FP32}
    return StageMemory("export", device, host)


def stages(spec: ModelSpec, s: Settings) -> list[StageMemory]:
    """Peak memory of every stage, in pipeline order."""
    healed = [healing(spec, s)] if s.heal_rank else []
    refreshed = [refresh(spec, s)] if s.refreshes else []
    return [construction(spec, s), *healed, training(spec, s), *refreshed, correction(spec, s), export(spec, s)]
