"""A factory of tiny random-init checkpoints and calibration files, written exactly like real ones.

``make_checkpoint`` builds a small decoder-only model from a transformers config, saves its weights as
sharded safetensors with ``model.safetensors.index.json`` (shard boundaries fall inside a block, so a block
spans two shards), its config, and an offline BPE tokenizer with a pad token and a chat template.
Nothing is downloaded. ``make_chat_data`` / ``make_text_data`` write JSONL calibration sets.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")

_CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
}

# Settings that make each architecture exercise its own code paths at tiny size: a sliding window shorter
# than the test sequences, alternating local/global layers, attention biases, soft-capping.
_ARCH_EXTRAS = {
    "llama": {},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    "qwen3": {},
    "mistral": {"sliding_window": 8},
    "gemma2": {"sliding_window": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
               "query_pre_attn_scalar": 16},
    "gemma3": {"sliding_window": 8, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16,
               "rope_local_base_freq": 10000.0},
    "phi3": {},
}

_WORDS = ("the", "a", "model", "layer", "token", "weight", "data", "learn", "fast", "slow", "big", "small",
          "emulator", "memory", "rank", "matrix", "value", "train", "test", "good", "of", "in", "and", "to")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def random_sentence(rng: random.Random, words: int | None = None) -> str:
    """A sentence of random words from a small fixed vocabulary."""
    return " ".join(rng.choice(_WORDS) for _ in range(words or rng.randint(4, 16))) + "."


def make_tokenizer(directory: Path, vocab_size: int = 200, seed: int = 0) -> transformers.PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer on generated text and save it to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((random_sentence(rng) for _ in range(200)), trainer=trainer)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )
    wrapped.save_pretrained(directory)
    return wrapped


def _block_of(name: str) -> str | None:
    """The block number in a tensor name (``model.layers.3.mlp...`` -> ``"3"``), None outside the blocks."""
    return name.split(".layers.")[1].split(".")[0] if ".layers." in name else None


def _shard_cuts(names: list[str], shards: int) -> list[int]:
    """Indices where each new shard starts: evenly spaced, moved off block boundaries so that the block
    around each cut spans two shards."""
    cuts = []
    for i in range(1, shards):
        cut = round(i * len(names) / shards)
        if _block_of(names[cut]) is not None and _block_of(names[cut]) != _block_of(names[cut - 1]):
            cut += 1
        cuts.append(cut)
    return cuts


def save_sharded(state: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    """Write ``state`` as ``shards`` safetensors files plus ``model.safetensors.index.json``."""
    names = list(state)
    bounds = [0, *_shard_cuts(names, shards), len(names)]
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name].contiguous() for name in names[bounds[i]:bounds[i + 1]]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_config(arch: str = "llama", *, num_layers: int = 2, hidden_size: int = 64,
                intermediate_size: int | None = None, num_heads: int = 4, num_kv_heads: int = 2,
                vocab_size: int = 256, dtype: torch.dtype = torch.float32) -> transformers.PretrainedConfig:
    """The transformers config of a tiny ``arch`` model."""
    if arch not in _CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    config_cls, _ = _CONFIGS[arch]
    config = config_cls(
        num_hidden_layers=num_layers, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size - 8,  # odd multiple: not a power of two
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        vocab_size=vocab_size, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attention_bias=arch == "qwen2", **_ARCH_EXTRAS[arch],
    )
    config.dtype = dtype
    return config


def make_checkpoint(directory, arch: str = "llama", *, num_layers: int = 2, hidden_size: int = 64,
                    intermediate_size: int | None = None, num_heads: int = 4, num_kv_heads: int = 2,
                    vocab_size: int = 256, shards: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32,
                    tokenizer: bool = True) -> Path:
    """Save a tiny random-init ``arch`` causal LM under ``directory`` as a real sharded checkpoint.

    Weights are drawn with ``seed`` at a scale (std 0.1) that keeps activations lively through the blocks.
    Tied weights (Gemma's LM head) are stored once, as transformers does. Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = make_config(arch, num_layers=num_layers, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         vocab_size=vocab_size, dtype=dtype)
    config.initializer_range = 0.1
    torch.manual_seed(seed)
    model = _CONFIGS[arch][1](config).to(dtype)
    with torch.no_grad():  # random norms and biases too, so a wrongly loaded one cannot go unnoticed
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied to a weight already stored
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor
    save_sharded(state, directory, shards)
    config.save_pretrained(directory)
    if tokenizer:
        make_tokenizer(directory, vocab_size=min(vocab_size, 200), seed=seed)
    return directory


def make_chat_data(path, n: int = 8, seed: int = 0) -> Path:
    """JSONL of ``n`` chat samples (``messages`` with role/content), lengths varying so padding is needed."""
    rng = random.Random(seed)
    rows = [{"messages": [{"role": "user", "content": random_sentence(rng)},
                          {"role": "assistant", "content": random_sentence(rng)}]} for _ in range(n)]
    return _write_jsonl(path, rows)


def make_text_data(path, n: int = 8, seed: int = 0) -> Path:
    """JSONL of ``n`` plain-text samples (``text``) of varying lengths."""
    rng = random.Random(seed)
    return _write_jsonl(path, [{"text": " ".join(random_sentence(rng) for _ in range(rng.randint(1, 3)))}
                               for _ in range(n)])


def _write_jsonl(path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
