"""The demo's models: one default decoder and two smaller baselines trained by the same recipe.

The baselines are sized like the default model's emulators: at a compression ratio rho the emulator keeps
about rho of the default model's linear-layer parameters, and the baseline for rho has about as many
(its width scaled by sqrt(rho), depth unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import LlamaConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
VOCAB_SIZE = 1024
MAX_POSITIONS = 256


@dataclass(frozen=True)
class ModelSpec:
    """A demo model: its checkpoint directory name and its width."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int = 4
    num_heads: int = 4

    @property
    def path(self) -> Path:
        """Where the shipped checkpoint lives."""
        return ASSETS / self.name

    def config(self) -> LlamaConfig:
        """The transformers config of this model (Llama architecture, tied embeddings)."""
        return LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads, max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        )


DEFAULT = ModelSpec("demo-base", hidden_size=128, intermediate_size=384)
# Keyed by the compression ratio each one stands beside: linear parameters 0.52 and 0.25 of DEFAULT's.
BASELINES = {
    0.5: ModelSpec("demo-half", hidden_size=96, intermediate_size=256),
    0.25: ModelSpec("demo-quarter", hidden_size=64, intermediate_size=192),
}
MODELS = (DEFAULT, *BASELINES.values())
