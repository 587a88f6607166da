"""What emloc knows of each vision-language family beyond its decoder: where its vision tower keeps its
blocks, which of their outputs the model reads after the tower, and how its checkpoints name the weights.

The build streams the vision tower's blocks as a stack of their own before the decoder's
(:func:`emloc.models.block_stacks`); the projector and the tower's embeddings and norms are outer weights,
kept dense.
"""
from __future__ import annotations

__all__ = ["CHECKPOINT_PREFIXES", "VISION_STACKS", "checkpoint_prefixes", "feature_blocks", "is_vision_language"]

# model_type -> dotted path of the vision tower's block stack; where it lies inside the tower depends on the
# tower's own family (CLIP and SigLIP: encoder.layers, behind vision_model when the tower is wrapped).
VISION_STACKS: dict[str, tuple[str, ...]] = {
    "llava": ("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers"),
    "qwen2_vl": ("model.visual.blocks",),
    "qwen2_5_vl": ("model.visual.blocks",),
    "internvl": ("model.vision_tower.encoder.layer",),
}

# model_type -> (module-name prefix, checkpoint-key prefix) pairs: transformers saves these families under
# their earlier layout and renames the keys as it loads them; streaming reads the keys directly.
_LLAVA_LAYOUT = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))
_QWEN_VL_LAYOUT = (("model.language_model.", "model."), ("model.visual.", "visual."))
CHECKPOINT_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "llava": _LLAVA_LAYOUT, "internvl": _LLAVA_LAYOUT, "qwen2_vl": _QWEN_VL_LAYOUT, "qwen2_5_vl": _QWEN_VL_LAYOUT,
}


def is_vision_language(config) -> bool:
    """Whether ``config`` is of a vision-language family (a vision tower before the language model)."""
    return getattr(config, "model_type", None) in VISION_STACKS


def checkpoint_prefixes(config) -> tuple[tuple[str, str], ...]:
    """The ``(module prefix, checkpoint prefix)`` renamings of ``config``'s family (none for text models)."""
    return CHECKPOINT_PREFIXES.get(getattr(config, "model_type", None), ())


def feature_blocks(config, count: int) -> set[int]:
    """The vision blocks (of ``count``) whose outputs the model reads after its tower: the last for Qwen-VL,
    the blocks behind ``vision_feature_layer`` (an index into the hidden states: 0 the embeddings, ``k`` the
    output of block ``k - 1``) for LLaVA and InternVL."""
    layers = getattr(config, "vision_feature_layer", -1)
    layers = [layers] if isinstance(layers, int) else list(layers)
    return {layer % (count + 1) - 1 for layer in layers if layer % (count + 1) > 0}
