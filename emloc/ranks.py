"""The rank a compression ratio gives a linear layer (docs/design.md §1.5), and the default LoRA rank: the
one definition of each that the build, training, the memory planner, the dry run and the benchmarks share."""
from __future__ import annotations

import math

# The LoRA rank when none is given. An adapter trained on the emulator keeps more of its gain on the
# original the higher its rank (docs/quality.md); 64 is also QLoRA's rank on every linear.
LORA_RANK = 64


def compressed_rank(ratio: float, out_features: int, in_features: int) -> int | None:
    """``max(1, floor(ratio m n / (m + n)))``: the rank whose factors hold ``ratio`` of the layer's ``m n``
    parameters, or None where a pair of that rank would not save any (the layer stays dense)."""
    m, n = out_features, in_features
    rank = max(1, math.floor(ratio * m * n / (m + n)))
    return rank if rank * (m + n) < m * n else None
