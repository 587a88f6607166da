"""What a memory plan is made of: the settings it plans for, and one stage's peak bytes by term."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ranks import LORA_RANK
from ..training.config import REFRESHES

TERMS = ("weights", "activations", "covariances", "decomposition", "lora_optimizer", "logits_loss")
STAGES = ("construction", "healing", "training", "refresh", "correction", "export")


@dataclass(frozen=True)
class Settings:
    """What the pipeline is asked to do, and how (the knobs the plan chooses)."""

    ratio: float
    seq_len: int = 2048
    batch: int = 1
    lora_r: int = LORA_RANK
    samples: int = 64
    calibration_micro_batch: int = 1
    lm_head_chunk: int = 1024
    method: str = "exact"
    compress_vision: bool = True
    vision_ratio: float | None = None  # the compressed tower's own ratio (None: ``ratio``)
    embeddings_on_device: bool = False
    image_tiles: int | None = None
    shard_bytes: int = 2 << 30
    heal_rank: int = 0  # 0: the build does not heal the emulator
    refreshes: int = REFRESHES  # times training rebuilds the emulator with its LoRA (0: the refresh stage is not run)


@dataclass
class StageMemory:
    """Peak bytes of one stage, by term, on the compute device and on the host."""

    name: str
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    not_concurrent: int = 0  # deducted: the smaller of two phases that never coexist on the device

    @property
    def device_peak(self) -> int:
        return sum(self.device.values()) - self.not_concurrent

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())

    @property
    def dominant(self) -> str:
        return max(self.device, key=self.device.get)


def not_concurrent(first: int, second: int) -> int:
    """Bytes to deduct for two phases of a stage that never coexist: the smaller of the two."""
    return min(first, second)
