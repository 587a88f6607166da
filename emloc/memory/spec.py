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
from .meta_models import DECODER_ALIASES, vision_language_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_DECODERS = ("llama", "mistral", "qwen2", "qwen3")


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
    # (T, width) tensors alive at once in a no-grad block forward: the input, the residual and the MLP output
    # (a ViT's layer scale adds its product); the MLP's gate, up and their product (fc1 and its GELU: 2)
    hidden_tensors: int = 3
    mlp_tensors: int = 3

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
    tokens_per_tile: int       # ViT sequence per tile (patches + class token)
    llm_tokens_per_tile: int   # tokens a tile becomes in the language model (after InternVL's pixel shuffle)
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


def _vit_linears(prefix: str, out_name: str, hv: int, inter: int, qkv_bias: bool) -> tuple[Linear, ...]:
    return (
        Linear(f"{prefix}.q_proj", hv, hv, qkv_bias, "attn_in"),
        Linear(f"{prefix}.k_proj", hv, hv, qkv_bias, "attn_in"),
        Linear(f"{prefix}.v_proj", hv, hv, qkv_bias, "attn_in"),
        Linear(f"{prefix}.{out_name}", hv, hv, True, "attn_out_in"),
        Linear("mlp.fc1", hv, inter, True, "mlp_in"),
        Linear("mlp.fc2", inter, hv, True, "fc2_in"),
    )


def _side(value) -> int:
    return value if isinstance(value, int) else value[0]  # square images and patches


def _intern_vit(cfg: dict, llm_hidden: int, top: dict) -> VisionTower:
    """transformers' InternViT: q, k, v, projection_layer, fc1, fc2; RMS or layer norms, layer scales, optional
    q/k norms over the whole width; pixel shuffle by ``downsample_ratio`` into a LayerNorm + 2-layer projector."""
    hv, inter, layers, heads = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                                cfg["num_attention_heads"])
    qk_norm = bool(cfg.get("use_qk_norm", False))
    norm = hv if cfg.get("norm_type") == "rms_norm" else 2 * hv
    other = 2 * norm + 2 * hv + (2 * hv if qk_norm else 0)  # layernorm_before/after, lambda_1/2, q/k norms
    stack = BlockStack("vision_tower", layers, hv, inter, heads, heads, hv // heads,
                       _vit_linears("attention", "projection_layer", hv, inter, bool(cfg.get("attention_bias"))),
                       other, qk_norm, hidden_tensors=4, mlp_tensors=2)
    image, patch = _side(cfg["image_size"]), _side(cfg["patch_size"])
    patches = (image // patch) ** 2
    shuffle = int(round(1 / top.get("downsample_ratio", 0.5) ** 2))
    embedding = cfg.get("num_channels", 3) * patch * patch * hv + hv + hv + (patches + 1) * hv
    projector = (Linear("linear_1", hv * shuffle, llm_hidden, True, "projector_in"),
                 Linear("linear_2", llm_hidden, llm_hidden, True, "projector_out"))
    # dynamic tiling: up to max_dynamic_patch tiles and a thumbnail (the processor's defaults: 12, with one)
    tiles = top.get("max_dynamic_patch", 12) + (1 if top.get("use_thumbnail", True) else 0)
    return VisionTower(stack, embedding, projector, 2 * hv * shuffle, patches + 1, patches // shuffle, tiles)


def _clip(cfg: dict, llm_hidden: int, top: dict) -> VisionTower:
    """LLaVA's CLIP tower: q, k, v, out_proj, fc1, fc2 with biases and layer norms; one image of ``image_size``,
    its patches (and with ``vision_feature_select_strategy="full"`` the class token) into a 2-layer projector."""
    hv, inter, layers, heads = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                                cfg["num_attention_heads"])
    # quick_gelu, x * sigmoid(1.702 x), holds one more (T, I) tensor than fc1 and a fused GELU
    mlp_tensors = 3 if cfg.get("hidden_act") == "quick_gelu" else 2
    stack = BlockStack("vision_tower", layers, hv, inter, heads, heads, hv // heads,
                       _vit_linears("self_attn", "out_proj", hv, inter, True), 2 * 2 * hv, False,
                       mlp_tensors=mlp_tensors)
    image, patch = _side(cfg["image_size"]), _side(cfg["patch_size"])
    patches = (image // patch) ** 2
    # patch embedding (no bias), class embedding, positions, pre- and post-layernorm
    embedding = cfg.get("num_channels", 3) * patch * patch * hv + hv + (patches + 1) * hv + 4 * hv
    feature_layers = top.get("vision_feature_layer", -2)
    width = hv * (1 if isinstance(feature_layers, int) else len(feature_layers))
    bias = bool(top.get("multimodal_projector_bias", True))
    projector = (Linear("linear_1", width, llm_hidden, bias, "projector_in"),
                 Linear("linear_2", llm_hidden, llm_hidden, bias, "projector_out"))
    llm_tokens = patches + (1 if top.get("vision_feature_select_strategy") == "full" else 0)
    return VisionTower(stack, embedding, projector, 0, patches + 1, llm_tokens, 1)


_VISION = {"internvl_vision": _intern_vit, "clip_vision_model": _clip}


def _vision_language(config: dict, name: str) -> tuple[dict, dict, dict]:
    """``(top, text, vision)`` config dicts of a vision-language config, as transformers reads them (its
    defaults filled in; an ``internvl_chat`` config converted to transformers' InternVL)."""
    where = f"{name}: vision tower"
    vision_type = config["vision_config"].get("model_type")
    if config.get("model_type") == "internvl_chat" and vision_type != "intern_vit_6b":
        raise UserError(f"{where}: unsupported InternVL tower {vision_type!r}; supported: intern_vit_6b")
    text_type = (config.get("llm_config") or config.get("text_config") or {}).get("model_type")
    if DECODER_ALIASES.get(text_type, text_type) not in _DECODERS:  # before transformers reads it
        raise UserError(f"{name}: language model: unsupported language model type {text_type!r}; "
                        f"supported: {', '.join(_DECODERS)}")
    cfg = vision_language_config(config)
    top = {**config, **cfg.to_dict()}  # the original's processor settings (max_dynamic_patch) stay
    vision = cfg.vision_config.to_dict()
    if vision.get("model_type") not in _VISION:
        raise UserError(f"{where}: unsupported vision tower {vision.get('model_type')!r}; supported: "
                        f"{', '.join(_VISION)} (InternVL, LLaVA with CLIP)")
    return top, cfg.get_text_config().to_dict(), vision


def model_spec(config: dict, name: str = "model") -> ModelSpec:
    """The :class:`ModelSpec` of a transformers ``config.json`` (as a dict); ValueError names what is missing."""
    top = config
    llm = config.get("llm_config") or config.get("text_config") or config
    vision_cfg = None
    if "vision_config" in config:
        top, llm, vision_cfg = _vision_language(config, name)
    language = _decoder_stack(llm, f"{name}: language model")
    vision = None if vision_cfg is None else _VISION[vision_cfg["model_type"]](vision_cfg, language.hidden, top)
    # transformers 5 writes "dtype", older releases "torch_dtype"
    raw = config.get("llm_config") or config.get("text_config") or config
    dtype = next((c[key] for c in (raw, config) for key in ("torch_dtype", "dtype") if c.get(key)), "bfloat16")
    # a vision-language model ties by its own flag (emloc.models.tie_embeddings)
    tied = top.get("tie_word_embeddings") if vision is not None else llm.get("tie_word_embeddings", False)
    return ModelSpec(
        name=name,
        dtype_bytes=_DTYPE_BYTES.get(str(dtype), 2),
        language=language,
        vocab=llm["vocab_size"],
        tied_embeddings=bool(tied),
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
