"""Layer shapes and workload sizes shared by the kernel benchmarks and the cost model."""
from __future__ import annotations

from emloc.ranks import compressed_rank

# Decoder-layer linears of three model classes, name -> (out, in, input group). Linears of one group read
# the same input and share its covariance. 7B: Llama-2-7B (hidden 4096, MLP 11008); 8B: Llama-3-8B (MLP
# 14336, grouped-query k/v of 1024 outputs); 32B: Qwen2.5-32B (hidden 5120, MLP 27648, k/v of 1024 outputs).
MODELS = {
    "7B": {"q": (4096, 4096, "attn"), "k": (4096, 4096, "attn"), "v": (4096, 4096, "attn"), "o": (4096, 4096, "o"),
           "gate": (11008, 4096, "mlp"), "up": (11008, 4096, "mlp"), "down": (4096, 11008, "down")},
    "8B": {"q": (4096, 4096, "attn"), "k": (1024, 4096, "attn"), "v": (1024, 4096, "attn"), "o": (4096, 4096, "o"),
           "gate": (14336, 4096, "mlp"), "up": (14336, 4096, "mlp"), "down": (4096, 14336, "down")},
    "32B": {"q": (5120, 5120, "attn"), "k": (1024, 5120, "attn"), "v": (1024, 5120, "attn"), "o": (5120, 5120, "o"),
            "gate": (27648, 5120, "mlp"), "up": (27648, 5120, "mlp"), "down": (5120, 27648, "down")},
}

# One linear of each distinct shape, "<model> <linear>" -> (out, in).
LINEARS = {
    f"{model} {name}": (m, n)
    for model, name in (("7B", "q"), ("7B", "up"), ("7B", "down"), ("8B", "up"), ("8B", "down"),
                        ("32B", "q"), ("32B", "k"), ("32B", "up"), ("32B", "down"))
    for m, n, _ in [MODELS[model][name]]
}

# LM heads, "<model>" -> (vocab, hidden): Llama-2-7B, Llama-3-8B, Qwen2.5-32B.
LM_HEADS = {"7B": (32000, 4096), "8B": (128256, 4096), "32B": (152064, 5120)}

# The distinct input widths a covariance is accumulated over: hidden sizes and MLP widths (the down
# projections' inputs).
COVARIANCE_WIDTHS = {"7B hidden": 4096, "7B mlp": 11008, "8B mlp": 14336, "32B hidden": 5120, "32B mlp": 27648}

RATIO = 0.4  # fraction of a layer's parameters the emulator keeps
LORA_RANK = 8
LORA_ALPHA = 16
CALIBRATION_SAMPLES, SEQUENCE = 64, 2048
CALIBRATION_TOKENS = 4 * SEQUENCE  # tokens of one calibration micro-batch (4 samples)
TRAINING_TOKENS = 4096  # tokens of one training micro-batch
LM_HEAD_CHUNK = 1024  # rows per LM-head block of the chunked loss (TrainConfig.lm_head_chunk)


def emulator_rank(out_features: int, in_features: int) -> int:
    """The build's rank at :data:`RATIO` (every benchmarked layer is compressed at it)."""
    return compressed_rank(RATIO, out_features, in_features)
