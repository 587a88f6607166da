"""Tiny random-init vision-language checkpoints with real processors, and chat data with generated images.

``make_vlm_checkpoint`` builds a small LLaVA, Qwen2-VL, Qwen2.5-VL or InternVL model from its transformers
config, saves it with ``save_pretrained`` in several shards (so the keys are the ones transformers writes
for that family), and saves a processor made from its classes: the offline tokenizer of
:mod:`tests.checkpoints` with the family's image tokens added, an image processor at a small size, and a chat
template that renders image parts as the family's placeholder. Nothing is downloaded.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers
from PIL import Image

from checkpoints import make_tokenizer, random_sentence

VLM_ARCHITECTURES = ("llava", "qwen2_vl", "qwen2_5_vl", "internvl")

# The placeholder each family's chat template puts where an image part is.
_PLACEHOLDERS = {
    "llava": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<IMG_CONTEXT>",
}
_TOKENS = {
    "llava": ["<image>"],
    "qwen2_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
    "internvl": ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
}


def chat_template(arch: str) -> str:
    return (
        "{% for message in messages %}<|{{ message['role'] }}|>"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + _PLACEHOLDERS[arch] +
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


def _tokenizer(directory: Path, arch: str, seed: int):
    tokenizer = make_tokenizer(directory, vocab_size=200, seed=seed)
    tokenizer.add_special_tokens({"additional_special_tokens": _TOKENS[arch]})
    if arch == "internvl":
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
            unk_token="<unk>", extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                     "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    elif arch == "llava":
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
            unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    return tokenizer


def _text(vocab: int, layers: int, **extra) -> dict:
    return dict(hidden_size=48, intermediate_size=88, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, **extra)


def make_processor(directory: Path, arch: str, seed: int = 0):
    """The processor of a tiny ``arch`` model, saved in ``directory``."""
    tokenizer = _tokenizer(directory, arch, seed)
    if arch == "llava":
        images = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        processor = transformers.LlavaProcessor(images, tokenizer, patch_size=14, chat_template=chat_template(arch),
                                                vision_feature_select_strategy="default", num_additional_image_tokens=1)
    elif arch in ("qwen2_vl", "qwen2_5_vl"):
        images = transformers.Qwen2VLImageProcessor(min_pixels=28 * 28 * 2, max_pixels=56 * 56 * 2, patch_size=14,
                                                    merge_size=2, temporal_patch_size=2)
        cls = transformers.Qwen2VLProcessor if arch == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
        processor = cls(images, tokenizer,
                        chat_template=chat_template(arch))
    else:
        images = transformers.GotOcr2ImageProcessor(size={"height": 28, "width": 28}, crop_to_patches=False)
        processor = transformers.InternVLProcessor(images, tokenizer,
                                                   image_seq_length=1, chat_template=chat_template(arch))
    processor.save_pretrained(directory)
    return processor


def make_vlm_config(arch: str, tokenizer, *, layers: int = 2, vision_layers: int = 3):
    vocab = len(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(_TOKENS[arch][1 if arch.startswith("qwen") else 0
                                                            if arch == "llava" else 2])
    if arch == "llava":
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=56, num_hidden_layers=vision_layers,
                                               num_attention_heads=4, image_size=28, patch_size=14, projection_dim=32)
        config = transformers.LlavaConfig(vision_config=vision, text_config=_text(vocab, layers, model_type="llama"),
                                          image_token_id=image_id, vision_feature_layer=-2)
    elif arch in ("qwen2_vl", "qwen2_5_vl"):
        ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
            ("video_token_id", "<|video_pad|>"))}
        rope = {"rope_type": "default", "mrope_section": [2, 2, 2]}
        text = _text(vocab, layers, rope_parameters=rope)
        if arch == "qwen2_vl":
            vision = dict(depth=vision_layers, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)
            config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=image_id, **ids)
        else:
            vision = dict(depth=vision_layers, hidden_size=32, intermediate_size=56, out_hidden_size=48, num_heads=4,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[vision_layers - 1])
            config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=image_id,
                                                   **ids)
    else:
        vision = dict(hidden_size=32, intermediate_size=56, num_hidden_layers=vision_layers, num_attention_heads=4,
                      image_size=[28, 28], patch_size=[14, 14], use_qk_norm=False)
        config = transformers.InternVLConfig(text_config=_text(vocab, layers, model_type="qwen2"), vision_config=vision,
                                             image_token_id=image_id, downsample_ratio=0.5, vision_feature_layer=-1)
    config.dtype = torch.float32
    return config


def make_vlm_checkpoint(directory, arch: str = "llava", *, seed: int = 0, layers: int = 2,
                        vision_layers: int = 3, processor: bool = True) -> Path:
    """Save a tiny random-init ``arch`` model with its processor (or with ``processor=False`` its tokenizer
    alone: the Qwen-VL and InternVL processors need torchvision) under ``directory``; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_processor(directory, arch, seed).tokenizer if processor else _tokenizer(directory, arch, seed)
    tokenizer.save_pretrained(directory)
    config = make_vlm_config(arch, tokenizer, layers=layers, vision_layers=vision_layers)
    config.initializer_range = 0.1
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config).float()
    with torch.no_grad():  # random norms and biases too, so a wrongly loaded one cannot go unnoticed
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory, max_shard_size="60KB")
    return directory


_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def image_batch(arch: str, directory: Path, sizes: list[tuple[int, int]], seed: int = 0) -> dict:
    """Model inputs of one row per image size, without the processor: the family's image processor makes the
    pixel values (and grid sizes), the image tokens are written where the processor would put them."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    rng = random.Random(seed)
    images = [Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))) for size in sizes]
    if arch.startswith("qwen"):
        processed = transformers.Qwen2VLImageProcessor(min_pixels=28 * 28 * 2, max_pixels=56 * 56 * 2, patch_size=14,
                                                       merge_size=2, temporal_patch_size=2)(images, return_tensors="pt")
        counts = [int(grid.prod()) // 4 for grid in processed["image_grid_thw"]]
        marked = [["<|vision_start|>", *["<|image_pad|>"] * n, "<|vision_end|>"] for n in counts]
    else:
        processed = transformers.GotOcr2ImageProcessor(size={"height": 28, "width": 28}, crop_to_patches=False)(
            images, return_tensors="pt")
        marked = [["<img>", "<IMG_CONTEXT>", "</img>"] for _ in images]
    rows = [tokenizer.convert_tokens_to_ids(tokens) + tokenizer(random_sentence(rng))["input_ids"] for tokens in marked]
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
    images = dict(processed)
    if arch.startswith("qwen"):  # the processor's per-token modality: 1 on image tokens
        images["mm_token_type_ids"] = (ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).long()
    return {"input_ids": ids, "attention_mask": mask, "images": images}


def make_image(path: Path, colour: str, size: tuple[int, int] = (28, 28)) -> Path:
    Image.new("RGB", size, _COLOURS[colour]).save(path)
    return path


def make_image_chat_data(path, n: int = 8, seed: int = 0, max_images: int = 2) -> Path:
    """JSONL of ``n`` chat rows whose user turn carries 0 to ``max_images`` generated images (odd sizes),
    asking for their colours; images sit beside the file and are named relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colours = [rng.choice(list(_COLOURS)) for _ in range(rng.randint(0 if i else 1, max_images))]
        parts = []
        for k, colour in enumerate(colours):
            name = f"{path.stem}-{i}-{k}.png"
            make_image(path.parent / name, colour, (rng.randint(20, 60), rng.randint(20, 60)))
            parts.append({"type": "image", "path": name})
        parts.append({"type": "text", "text": "what colour? " + random_sentence(rng, 3)})
        rows.append({"messages": [{"role": "user", "content": parts},
                                  {"role": "assistant", "content": " ".join(colours) or "none"}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
