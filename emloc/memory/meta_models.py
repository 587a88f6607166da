"""The transformers configs and meta-device models the planner and the dry run read a ``config.json`` as.

A vision-language config comes in transformers' own layout (LLaVA, InternVL ``-hf`` checkpoints) or, for
InternVL, in the layout of its original remote code (``internvl_chat``: ``llm_config``, an ``intern_vit_6b``
tower); the latter is converted as transformers' InternVL conversion script does, since the build streams
transformers' classes. That script loads InternLM2 decoders as Llama (it splits ``wqkv`` into q, k, v).
"""
from __future__ import annotations

import torch
import transformers
from torch import nn

from ..errors import UserError

__all__ = ["ATTENTION", "DECODER_ALIASES", "language_config", "meta_model", "vision_language_config"]

ATTENTION = "emloc_meta_fused_attention"

# decoders transformers' InternVL conversion loads as another family
DECODER_ALIASES = {"internlm2": "llama"}
_DROPPED = ("architectures", "auto_map", "_name_or_path", "attn_implementation", "use_flash_attn", "bias",
            "drop_path_rate", "transformers_version")


def _flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     **kwargs):
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout, causal, scale=scaling)[0]
    return out.transpose(1, 2), None


# What a GPU run uses: q, k, v, the output and the log-sum-exp, never a seq x seq score matrix.
transformers.AttentionInterface.register(ATTENTION, _flash_attention)


def _kept(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in _DROPPED}


def _from_internvl_chat(config: dict) -> dict:
    """An ``internvl_chat`` config in transformers' InternVL layout (its conversion script's renames)."""
    text = _kept(config["llm_config"])
    text["model_type"] = DECODER_ALIASES.get(text["model_type"], text["model_type"])
    vision = _kept(config["vision_config"])
    vision.pop("model_type", None)
    vision["use_qk_norm"] = vision.pop("qk_normalization", False)
    vision["attention_bias"] = vision.pop("qkv_bias", False)
    vision["use_absolute_position_embeddings"] = True
    return {"model_type": "internvl", "text_config": text, "vision_config": vision,
            "downsample_ratio": config.get("downsample_ratio", 0.5),
            "vision_feature_layer": config.get("select_layer", -1),
            # transformers' InternVL ties by its own flag (default True); the original ties as its decoder does
            "tie_word_embeddings": bool(text.get("tie_word_embeddings", False))}


def vision_language_config(config: dict, text_layers: int | None = None,
                           vision_layers: int | None = None) -> transformers.PretrainedConfig:
    """The transformers config of a vision-language ``config.json`` (as a dict), optionally with fewer decoder
    or vision blocks; attention through the flash-attention op, no KV cache."""
    top = _from_internvl_chat(config) if config.get("model_type") == "internvl_chat" else _kept(config)
    top["text_config"] = dict(top["text_config"])
    top["vision_config"] = dict(top["vision_config"])
    if text_layers is not None:
        top["text_config"]["num_hidden_layers"] = text_layers
    if vision_layers is not None:
        top["vision_config"]["depth" if "depth" in top["vision_config"] else "num_hidden_layers"] = vision_layers
    try:
        cfg = transformers.AutoConfig.for_model(top.pop("model_type"), **top)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"transformers {transformers.__version__} cannot read this vision-language config "
                        f"({exc})") from exc
    cfg._attn_implementation = ATTENTION
    cfg.get_text_config().use_cache = False
    return cfg


def language_config(config: dict, layers: int | None = None) -> transformers.PretrainedConfig:
    """The transformers config of a config's language model (a vision-language config's decoder), to run
    on meta tensors: a dynamic rotary scaling runs as the default rotary, whose tensors have the same shapes
    (dynamic scaling reads the largest position, a value meta tensors do not have)."""
    if "vision_config" in config:
        cfg = vision_language_config(config, text_layers=layers).get_text_config()
    else:
        llm = _kept(config)
        if layers is not None:
            llm["num_hidden_layers"] = layers
        cfg = transformers.AutoConfig.for_model(llm.pop("model_type"), **llm)
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_type") == "dynamic":
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    cfg._attn_implementation = ATTENTION
    cfg.use_cache = False
    return cfg


def meta_model(cfg: transformers.PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The model of ``cfg`` on the meta device, frozen: a causal LM, or image-text-to-text for a
    vision-language config."""
    cls = (transformers.AutoModelForImageTextToText if hasattr(cfg, "vision_config")
           else transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        model = cls.from_config(cfg, dtype=dtype)
    return model.requires_grad_(False)
