"""Shapes of a model as the planner sees them: block stacks of linears, read from a config alone.

A language model is one stack of decoder blocks; a vision-language model (InternVL) adds the vision tower
as a second stack and its projector. Linears that read the same input name the same ``group``: they share
one calibration covariance (docs/design.md §1.1).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_DECODERS = ("llama", "mistral", "qwen2", "qwen3")
_VISION = ("intern_vit_6b",)


@dataclass(frozen=True)
class Linear:
    """One linear of a block: ``out x in`` weight, optional bias, and the input group it belongs to."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    group: str

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class BlockStack:
    """``blocks`` identical blocks of ``linears`` plus ``other_params`` (norms, layer scales) each."""

    name: str
    blocks: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    linears: tuple[Linear, ...]
    other_params: int
    qk_norm: bool

    @property
    def block_params(self) -> int:
        return sum(linear.params for linear in self.linears) + self.other_params

    @property
    def groups(self) -> dict[str, tuple[Linear, ...]]:
        """Linears by input group, in block order."""
        out: dict[str, tuple[Linear, ...]] = {}
        for linear in self.linears:
            out[linear.group] = out.get(linear.group, ()) + (linear,)
        return out


@dataclass(frozen=True)
class VisionTower:
    """A ViT stack, its embeddings and the projector into the language model, with its image geometry."""

    stack: BlockStack
    embedding_params: int
    projector: tuple[Linear, ...]
    projector_other_params: int
    tokens_per_tile: int       # ViT sequence per 448 px tile (patches + class token)
    llm_tokens_per_tile: int   # tokens a tile becomes in the language model after pixel shuffle
    max_tiles: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything the planner needs from a ``config.json``."""

    name: str
    dtype_bytes: int
    language: BlockStack
    vocab: int
    tied_embeddings: bool
    final_norm_params: int
    vision: VisionTower | None

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.language.hidden

    @property
    def params(self) -> int:
        """Parameters of the original model (a tied LM head counted once)."""
        total = self.language.blocks * self.language.block_params + self.final_norm_params
        total += self.embedding_params * (1 if self.tied_embeddings else 2)
        if self.vision is not None:
            v = self.vision
            total += v.stack.blocks * v.stack.block_params + v.embedding_params + v.projector_other_params
            total += sum(linear.params for linear in v.projector)
        return total


def _decoder_stack(cfg: dict, where: str) -> BlockStack:
    model_type = cfg.get("model_type")
    if model_type not in _DECODERS:
        raise UserError(f"{where}: unsupported language model type {model_type!r}; supported: {', '.join(_DECODERS)}")
    try:
        h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
        heads = cfg["num_attention_heads"]
    except KeyError as exc:
        raise UserError(f"{where}: config lacks {exc.args[0]!r}") from None
    kv = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or h // heads
    qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
    o_bias = bool(cfg.get("attention_bias", False)) and model_type != "qwen2"
    mlp_bias = bool(cfg.get("mlp_bias", False))
    qk_norm = model_type == "qwen3"
    linears = (
        Linear("self_attn.q_proj", h, heads * d, qkv_bias, "attn_in"),
        Linear("self_attn.k_proj", h, kv * d, qkv_bias, "attn_in"),
        Linear("self_attn.v_proj", h, kv * d, qkv_bias, "attn_in"),
        Linear("self_attn.o_proj", heads * d, h, o_bias, "o_in"),
        Linear("mlp.gate_proj", h, inter, mlp_bias, "mlp_in"),
        Linear("mlp.up_proj", h, inter, mlp_bias, "mlp_in"),
        Linear("mlp.down_proj", inter, h, mlp_bias, "down_in"),
    )
    return BlockStack("language_model", layers, h, inter, heads, kv, d, linears,
                      other_params=2 * h + (2 * d if qk_norm else 0), qk_norm=qk_norm)


def _vision_tower(cfg: dict, llm_hidden: int, top: dict, where: str) -> VisionTower:
    if cfg.get("model_type") not in _VISION:
        raise UserError(f"{where}: unsupported vision tower {cfg.get('model_type')!r}; supported: {', '.join(_VISION)}")
    hv, inter, layers, heads = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                                cfg["num_attention_heads"])
    qkv_bias, qk_norm = bool(cfg.get("qkv_bias", False)), bool(cfg.get("qk_normalization", False))
    linears = (
        Linear("attn.qkv", hv, 3 * hv, qkv_bias, "attn_in"),
        Linear("attn.proj", hv, hv, True, "proj_in"),
        Linear("mlp.fc1", hv, inter, True, "mlp_in"),
        Linear("mlp.fc2", inter, hv, True, "fc2_in"),
    )
    norm = hv if cfg.get("norm_type") == "rms_norm" else 2 * hv
    other = 2 * norm + 2 * hv + (2 * hv if qk_norm else 0)  # norm1/2, layer scales ls1/ls2, q/k norms
    stack = BlockStack("vision_tower", layers, hv, inter, heads, heads, hv // heads, linears, other, qk_norm)
    image, patch = cfg["image_size"], cfg["patch_size"]
    patches = (image // patch) ** 2
    shuffle = int(round(1 / top.get("downsample_ratio", 0.5) ** 2))
    embedding = cfg.get("num_channels", 3) * patch * patch * hv + hv + hv + (patches + 1) * hv
    projector = (Linear("mlp1.1", hv * shuffle, llm_hidden, True, "projector_in"),
                 Linear("mlp1.3", llm_hidden, llm_hidden, True, "projector_out"))
    tiles = top.get("max_dynamic_patch", 12) + (1 if top.get("use_thumbnail", False) else 0)
    return VisionTower(stack, embedding, projector, 2 * hv * shuffle, patches + 1, patches // shuffle, tiles)


def model_spec(config: dict, name: str = "model") -> ModelSpec:
    """The :class:`ModelSpec` of a transformers ``config.json`` (as a dict); ValueError names what is missing."""
    top = config
    llm = config.get("llm_config") or config.get("text_config") or config
    language = _decoder_stack(llm, f"{name}: language model")
    vision = None
    if "vision_config" in config:
        vision = _vision_tower(config["vision_config"], language.hidden, top, f"{name}: vision tower")
    # transformers 5 writes "dtype", older releases "torch_dtype"
    dtype = next((c[key] for c in (llm, top) for key in ("torch_dtype", "dtype") if c.get(key)), "bfloat16")
    return ModelSpec(
        name=name,
        dtype_bytes=_DTYPE_BYTES.get(str(dtype), 2),
        language=language,
        vocab=llm["vocab_size"],
        tied_embeddings=bool(llm.get("tie_word_embeddings", top.get("tie_word_embeddings", False))),
        final_norm_params=language.hidden,
        vision=vision,
    )


def reference_configs() -> list[str]:
    """Names of the configs shipped with emloc (``emloc/configs/<name>.json``)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_model_config(config_or_dir) -> tuple[dict, str]:
    """``(config dict, display name)`` from a dict, a config.json path, a model directory or a shipped name."""
    if isinstance(config_or_dir, dict):
        return config_or_dir, str(config_or_dir.get("_name_or_path") or "model")
    path = Path(config_or_dir)
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and (CONFIG_DIR / f"{config_or_dir}.json").is_file():
        path = CONFIG_DIR / f"{config_or_dir}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{config_or_dir}: not a config.json, a model directory or a shipped config "
            f"(shipped: {', '.join(reference_configs())})"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    name = path.parent.name if path.name == "config.json" else path.stem
    return config, name
