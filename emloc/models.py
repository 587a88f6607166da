"""Architecture adapters: where a causal LM keeps its decoder blocks, which linears share an input, and how
to catch what each block receives (hidden states and keyword arguments) without running the blocks.

The registry lists the architecture families emloc builds and where each keeps its block stack; a model
directory of any other family is refused by :func:`load_config`, before any stage writes a file (GPT-2's
blocks hold ``Conv1D`` rather than linears, BERT is an encoder). :func:`block_stack` also finds the stack of
a model object outside the registry by a generic rule (the ``nn.ModuleList`` of ``num_hidden_layers`` blocks).
Block inputs are caught by swapping each block for a :class:`_BlockProxy` and running the model's own
forward, so masks, position embeddings and per-layer-type arguments (sliding window, local/global rotary)
are exactly those the model computes for that block.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

from .errors import UserError
from .files import read_json

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedModelError",
    "block_stack",
    "capture_block_inputs",
    "input_groups",
    "load_config",
    "logits_from_hidden",
    "skeleton",
    "tie_embeddings",
]

# model_type -> dotted path of the decoder block stack inside the causal LM.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
}

# Sibling linears that read the same input tensor: they share one covariance and one eigendecomposition.
INPUT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class UnsupportedModelError(UserError):
    """The model directory does not hold a decoder-only causal LM we can stream."""


def _supported() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


def load_config(model_dir) -> transformers.PretrainedConfig:
    """The transformers config of ``model_dir``; :class:`UnsupportedModelError` naming the supported
    families for any architecture outside :data:`SUPPORTED_ARCHITECTURES`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UnsupportedModelError(f"{model_dir}: no config.json; not a transformers model directory")
    raw = read_json(path)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: unsupported architecture {model_type!r}; supported: "
                                    f"{_supported()} (the decoder-only causal LM families emloc builds)")
    try:
        return transformers.AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"{path}: transformers {transformers.__version__} cannot read this "
                                    f"{model_type!r} config ({exc}); supported: {_supported()}") from exc


def skeleton(config: transformers.PretrainedConfig) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (no memory, no init cost) and
    its non-persistent buffers (rotary frequencies, embedding scales) computed for real on the CPU."""
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval().requires_grad_(False)


def block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the decoder blocks: from the registry, else the module list
    holding exactly ``num_hidden_layers`` modules of one class."""
    config = model.config.get_text_config()
    path = SUPPORTED_ARCHITECTURES.get(config.model_type)
    if path is not None:
        return path, model.get_submodule(path)
    count = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and len({type(m) for m in module}) == 1:
            return name, module
    raise UnsupportedModelError(
        f"architecture {config.model_type!r}: cannot find its decoder block stack; supported: {_supported()}"
    )


def input_groups(block: nn.Module) -> list[tuple[str, ...]]:
    """The ``nn.Linear`` modules of ``block`` (names local to it) grouped by shared input: siblings listed in
    :data:`INPUT_GROUPS` form one group, every other linear (fused qkv, o, down) is its own group."""
    linears = [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    groups, grouped = [], set()
    for name in linears:
        if name in grouped:
            continue
        parent, _, leaf = name.rpartition(".")
        siblings = next((g for g in INPUT_GROUPS if leaf in g), (leaf,))
        prefix = f"{parent}." if parent else ""
        group = tuple(prefix + s for s in siblings if prefix + s in linears)
        groups.append(group)
        grouped.update(group)
    return groups


def tie_embeddings(model: nn.Module) -> None:
    """Share the input embedding with the LM head when the config ties them (the checkpoint stores one)."""
    if model.config.get_text_config().tie_word_embeddings:
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and embed is not None:
            head.weight = embed.weight


class _StopForward(Exception):
    """Raised by the last block proxy: nothing after the blocks is needed."""


class _BlockProxy(nn.Module):
    """Stands in for block ``index`` during a forward: calls ``fn(index, hidden, kwargs)`` and returns its
    result. Attribute lookups it cannot answer go to the real block (some models read block attributes)."""

    def __init__(self, index: int, block: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.index, self.fn = index, fn
        self.__dict__["_block"] = block  # not registered: the proxy owns no parameters

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError(f"block {self.index} received positional arguments beyond hidden_states; "
                            "only keyword arguments can be captured")
        return self.fn(self.index, hidden_states, kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


@contextlib.contextmanager
def _proxied(stack: nn.ModuleList, fn: Callable):
    blocks = list(stack)
    for i, block in enumerate(blocks):
        stack[i] = _BlockProxy(i, block, fn)
    try:
        yield
    finally:
        for i, block in enumerate(blocks):
            stack[i] = block


def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run the model's forward up to its first block and return ``(hidden, kwargs_per_block)``: the hidden
    states entering block 0 and, for every block, the keyword arguments the model passes it.

    Only the modules before the blocks (embedding, rotary) need real weights. Tensors shared between blocks
    (one mask per layer type) stay shared objects.
    """
    _, stack = block_stack(model)
    captured: list[dict] = [None] * len(stack)
    first: list[torch.Tensor] = []

    def catch(index, hidden, kwargs):
        if index == 0:
            first.append(hidden)
        captured[index] = kwargs
        if index == len(stack) - 1:
            raise _StopForward
        return hidden

    with _proxied(stack, catch), torch.no_grad(), contextlib.suppress(_StopForward):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return first[0], captured


def logits_from_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model computes when its last block outputs ``hidden``: the model's own forward runs
    with every block replaced by a pass-through that yields ``hidden``, so the final norm, the LM head and
    any soft-capping are applied exactly as in the full model. Needs the embedding, norm and head loaded."""
    _, stack = block_stack(model)
    with _proxied(stack, lambda index, h, kwargs: hidden), torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def final_hidden_from_block_output(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                   hidden: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states (after its final norm) when its last block outputs ``hidden``, by
    the same pass-through as :func:`logits_from_hidden` but stopping before the LM head."""
    _, stack = block_stack(model)
    with _proxied(stack, lambda index, h, kwargs: hidden), torch.no_grad():
        return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).last_hidden_state
