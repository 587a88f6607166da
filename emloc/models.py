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
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

from .errors import UserError
from .files import read_json
from .vision import VISION_STACKS, is_vision_language

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedModelError",
    "block_stack",
    "block_stacks",
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
    # Vision-language models: the language model's blocks; their vision towers are in VISION_STACKS.
    "llava": "model.language_model.layers",
    "qwen2_vl": "model.language_model.layers",
    "qwen2_5_vl": "model.language_model.layers",
    "internvl": "model.language_model.layers",
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


def model_class(config: transformers.PretrainedConfig) -> type:
    """The transformers auto class whose models ``config`` describes: image-text-to-text for the
    vision-language families, causal LM otherwise."""
    return transformers.AutoModelForImageTextToText if is_vision_language(config) else transformers.AutoModelForCausalLM


def skeleton(config: transformers.PretrainedConfig) -> nn.Module:
    """The model of ``config`` (:func:`model_class`) with every parameter on the meta device (no memory, no
    init cost) and its non-persistent buffers (rotary frequencies, embedding scales) computed for real on the
    CPU."""
    with init_empty_weights(include_buffers=False):
        model = model_class(config).from_config(config)
    return model.eval().requires_grad_(False)


def block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the decoder blocks (a vision-language model's language blocks): from
    the registry, else the module list holding exactly ``num_hidden_layers`` modules of one class."""
    path = SUPPORTED_ARCHITECTURES.get(model.config.model_type)
    config = model.config.get_text_config()
    path = path or SUPPORTED_ARCHITECTURES.get(config.model_type)
    if path is not None:
        return path, model.get_submodule(path)
    count = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and len({type(m) for m in module}) == 1:
            return name, module
    raise UnsupportedModelError(
        f"architecture {config.model_type!r}: cannot find its decoder block stack; supported: {_supported()}"
    )


def vision_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(dotted path, ModuleList)`` of the vision tower's blocks, None for a text-only model."""
    for path in VISION_STACKS.get(model.config.model_type, ()):
        with contextlib.suppress(AttributeError):
            return path, model.get_submodule(path)
    if is_vision_language(model.config):
        raise UnsupportedModelError(f"architecture {model.config.model_type!r}: its vision tower keeps its blocks "
                                    f"elsewhere than {', '.join(VISION_STACKS[model.config.model_type])}")
    return None


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every block stack the build streams, in the order it runs them: the vision tower's (if any), then the
    decoder's."""
    vision = vision_stack(model)
    return ([vision] if vision is not None else []) + [block_stack(model)]


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
    # A vision-language model ties by its own config's flag, not its text config's (InternVL: True, False).
    config = model.config if is_vision_language(model.config) else model.config.get_text_config()
    if config.tie_word_embeddings:
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
        # The block's forward hooks run on the proxy's output: transformers records hidden states by them
        # (``output_hidden_states``, which a vision-language model reads its image features from).
        self._forward_hooks = block._forward_hooks
        self._signature = inspect.signature(type(block).forward)  # the class's: an instance's may be wrapped

    def forward(self, hidden_states, *args, **kwargs):
        if args:  # named by the block's signature, so that each call can be replayed with keywords
            params = self._signature.parameters
            named = dict(self._signature.bind_partial(None, hidden_states, *args, **kwargs).arguments)
            for first in list(params)[:2]:  # self, hidden_states
                named.pop(first)
            var = next((n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
            extra = named.pop(var, {}) if var else {}
            kwargs = {**named, **extra}
        return self.fn(self.index, hidden_states, kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


def install_output_hooks(model: nn.Module) -> None:
    """Have transformers install its output-recording hooks on the real blocks now: installed while proxies
    stand in, they would miss the blocks for good."""
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    if isinstance(model, transformers.PreTrainedModel):
        maybe_install_capturing_hooks(model)


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


def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         stack: nn.ModuleList | None = None, **inputs):
    """Run the model's forward up to the first block of ``stack`` (default: the decoder's) and return
    ``(hidden, kwargs_per_block)``: the hidden states entering block 0 and, for every block, the keyword
    arguments the model passes it. ``inputs`` go to the forward too (a vision-language model's images).

    Only the modules before the blocks (embedding, rotary) need real weights. Tensors shared between blocks
    (one mask per layer type) stay shared objects.
    """
    stack = block_stack(model)[1] if stack is None else stack
    install_output_hooks(model)
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
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
    return first[0], captured


def replaying(model: nn.Module, stack: nn.ModuleList, outputs: dict[int, torch.Tensor]):
    """A context in which block ``i`` of ``stack`` returns ``outputs[i]``, and every other block its input
    unchanged: the model's own code after the stack then sees the outputs the blocks gave."""
    install_output_hooks(model)
    return _proxied(stack, lambda index, hidden, kwargs: outputs.get(index, hidden))


def logits_from_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       hidden: torch.Tensor, **inputs) -> torch.Tensor:
    """The logits the model computes when its last block outputs ``hidden``: the model's own forward runs
    with every block replaced by a pass-through that yields ``hidden``, so the final norm, the LM head and
    any soft-capping are applied exactly as in the full model. Needs the embedding, norm and head loaded."""
    _, stack = block_stack(model)
    with _proxied(stack, lambda index, h, kwargs: hidden), torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs).logits


def final_hidden_from_block_output(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                   hidden: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states (after its final norm) when its last block outputs ``hidden``, by
    the same pass-through as :func:`logits_from_hidden` but stopping before the LM head."""
    _, stack = block_stack(model)
    with _proxied(stack, lambda index, h, kwargs: hidden), torch.no_grad():
        return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).last_hidden_state
