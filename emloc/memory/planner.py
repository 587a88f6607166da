"""``emloc.plan``: the memory of every pipeline stage for a model and settings, and the largest compression
ratio whose every stage fits a device budget (or why nothing fits)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from emloc_kernels.lowrank import METHODS

from ..errors import UserError
from ..ranks import LORA_RANK
from ..training.config import REFRESHES
from . import estimate
from .spec import ModelSpec, load_model_config, model_spec
from .stage import TERMS, Settings, StageMemory

GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": GiB, "t": 1e12, "tb": 1e12, "tib": 1 << 40}
_MIN_RATIO = 0.005
DEFAULT_HEAL_RANK = 0  # the default build does not heal (emloc.pipeline.DEFAULT_HEAL)
_RATIO_STEP = 0.001


def parse_bytes(value: str | int | float, what: str = "budget") -> int:
    """``"24GiB"``, ``"20GB"``, ``"16g"`` or a number of bytes -> bytes (GB = 1e9, GiB = 2^30)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise UserError(f"{what}: cannot read {value!r} as a size (examples: 24GiB, 20GB, 16G, 17179869184)")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise UserError(f"{what}: must be positive, got {value!r}")
    return size


def parse_count(value: str | int, what: str = "emulator_params") -> int:
    """``"5B"``, ``"500M"``, ``"1.5e9"`` or an integer -> a parameter count."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbB]?)\s*", str(value))
        if not match:
            raise UserError(f"{what}: cannot read {value!r} as a parameter count (examples: 5B, 500M, 5000000000)")
        number, unit = float(match.group(1)), match.group(2).upper()
    count = int(number * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[unit])
    if count <= 0:
        raise UserError(f"{what}: must be positive, got {value!r}")
    return count


def _gib(n: int) -> float:
    return round(n / GiB, 2)


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps a leading digit (``23.99 GiB``, ``5.12 MiB``)."""
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass
class Plan:
    """A memory plan: per-stage peaks by term, the chosen ratio and the settings the pipeline should follow.

    ``settings`` is what construction and training read: ``calibration_micro_batch``, ``lm_head_chunk``,
    ``embeddings_on_device``, ``compress_vision``, ``method`` and the rest of :class:`Settings`;
    :meth:`build_kwargs` and :meth:`train_kwargs` give them in the pipeline's own argument names.
    """

    model: str
    budget: int
    settings: Settings
    stages: list[StageMemory]
    original_params: int
    emulator_params: int
    lora_params: int
    fits: bool
    reason: str = ""
    ranks: dict[str, dict[str, int | None]] = field(default_factory=dict)
    config: dict = field(default_factory=dict, repr=False)

    @property
    def ratio(self) -> float:
        return self.settings.ratio

    @property
    def peak(self) -> int:
        """The largest device peak over the stages: the smallest budget at which this plan fits."""
        return max(stage.device_peak for stage in self.stages)

    def build_kwargs(self) -> dict:
        """Keyword arguments of :func:`emloc.build_emulator` that make a build follow this plan."""
        s = self.settings
        return {"compression": s.ratio, "vision_compression": estimate.tower_ratio(s) if self.vision_note else None,
                "max_samples": s.samples, "max_length": s.seq_len, "batch_size": s.calibration_micro_batch,
                "svd": s.method}

    def train_kwargs(self) -> dict:
        """Fields of :class:`emloc.training.TrainConfig` that make training follow this plan."""
        s = self.settings
        return {"micro_batch_size": s.batch, "max_length": s.seq_len, "lora_r": s.lora_r,
                "lm_head_chunk": s.lm_head_chunk, "embeddings_on_device": s.embeddings_on_device,
                "gradient_checkpointing": True}

    def stage(self, name: str) -> StageMemory:
        return next(stage for stage in self.stages if stage.name == name)

    def to_dict(self) -> dict:
        """JSON-ready form (bytes as integers)."""
        return {
            "model": self.model, "budget_bytes": self.budget, "fits": self.fits, "reason": self.reason,
            "ratio": self.ratio, "min_budget_bytes": self.peak, "original_params": self.original_params,
            "emulator_params": self.emulator_params, "lora_params": self.lora_params,
            "settings": asdict(self.settings), "build_kwargs": self.build_kwargs(),
            "train_kwargs": self.train_kwargs(), "ranks": self.ranks,
            "stages": {s.name: {"device_peak_bytes": s.device_peak, "host_peak_bytes": s.host_peak,
                                "device": s.device, "not_concurrent_bytes": s.not_concurrent, "host": s.host}
                       for s in self.stages},
        }

    def table(self) -> str:
        """The plan as a text table, GiB per term and stage."""
        s = self.settings
        head = (f"{self.model}: budget {_gib(self.budget)} GiB, seq_len {s.seq_len}, batch {s.batch}, "
                f"LoRA r {s.lora_r}, ratio {self.ratio:.3f} -> emulator {self.emulator_params / 1e9:.2f}B of "
                f"{self.original_params / 1e9:.2f}B parameters, LoRA {self.lora_params / 1e6:.1f}M")
        width = max(len(t) for t in TERMS) + 2
        lines = [head, "", "device GiB".ljust(width) + "".join(stage.name.rjust(14) for stage in self.stages)]
        for term in TERMS:
            lines.append(term.ljust(width) + "".join(f"{_gib(st.device.get(term, 0)):14.2f}" for st in self.stages))
        lines.append("not concurrent".ljust(width) + "".join(f"{-_gib(st.not_concurrent):14.2f}" for st in self.stages))
        lines.append("peak".ljust(width) + "".join(f"{_gib(st.device_peak):14.2f}" for st in self.stages))
        lines.append("host peak".ljust(width) + "".join(f"{_gib(st.host_peak):14.2f}" for st in self.stages))
        lines.append("")
        lines.append(f"settings: calibration micro-batch {s.calibration_micro_batch}, LM-head chunk {s.lm_head_chunk}, "
                     f"embeddings on {'device' if s.embeddings_on_device else 'host'}, factors {s.method}"
                     + ("" if self.vision_note is None else f", vision tower {self.vision_note}"))
        lines.append(f"smallest budget for this emulator: {_gib(self.peak)} GiB")
        lines.append(("FITS" if self.fits else "DOES NOT FIT") + (f": {self.reason}" if self.reason else ""))
        return "\n".join(lines)

    @property
    def vision_note(self) -> str | None:
        if "vision_tower" not in self.ranks:
            return None
        ratio = estimate.tower_ratio(self.settings)
        return "dense, frozen" if ratio is None else f"compressed at {ratio:.3f}, frozen"


def _ranks(spec: ModelSpec, s: Settings) -> dict[str, dict[str, int | None]]:
    stacks = [spec.language] + ([spec.vision.stack] if spec.vision is not None else [])
    out = {}
    for stack in stacks:
        ratio = s.ratio if stack is spec.language else estimate.tower_ratio(s)
        out[stack.name] = {linear.name: (None if ratio is None else estimate.rank(ratio, linear))
                           for linear in stack.linears}
    return out


def _evaluate(spec: ModelSpec, s: Settings, budget: int, name: str, config: dict) -> Plan:
    stages = estimate.stages(spec, s)
    over = [st for st in stages if st.device_peak > budget]
    reason = ""
    if over:
        worst = max(over, key=lambda st: st.device_peak)
        reason = (f"{worst.name} needs {format_bytes(worst.device_peak)} > {format_bytes(budget)}; its largest "
                  f"term is {worst.dominant} ({format_bytes(worst.device[worst.dominant])})")
    return Plan(name, budget, s, stages, spec.params, estimate.emulator_params(spec, s),
                estimate.lora_params(spec, s.lora_r), not over, reason, _ranks(spec, s), config)


def _lm_head_chunk(spec: ModelSpec, tokens: int, budget: int) -> int:
    # one (chunk, vocab) block of fp32 logits, softmax and its shifted copy: keep it to 1/64 of the budget
    chunk = 1
    while chunk * 2 <= tokens and 3 * estimate.FP32 * chunk * 2 * spec.vocab <= budget // 64:
        chunk *= 2
    return max(chunk, 16)


def _calibrating(spec: ModelSpec, s: Settings) -> list[StageMemory]:
    """The stages that calibrate at the build's micro-batch: the construction, and the refreshes re-running it."""
    return [estimate.construction(spec, s)] + ([estimate.refresh(spec, s)] if s.refreshes else [])


def _calibration_micro_batch(spec: ModelSpec, s: Settings, budget: int) -> int:
    # as many samples per block pass as fit in a quarter of the budget, at most 8 (and at most all of them)
    mb = 1
    while mb * 2 <= min(8, s.samples):
        if any(st.device["activations"] > budget // 4 or st.device_peak > budget
               for st in _calibrating(spec, replace(s, calibration_micro_batch=mb * 2))):
            break
        mb *= 2
    return mb


def _largest_fitting_ratio(spec: ModelSpec, s: Settings, budget: int) -> float | None:
    """Largest ratio on a 0.001 grid whose every stage fits (memory grows with the ratio: bisection)."""
    def fits(ratio: float) -> bool:
        return all(st.device_peak <= budget for st in estimate.stages(spec, replace(s, ratio=ratio)))

    lo, hi = round(_MIN_RATIO / _RATIO_STEP), round(1 / _RATIO_STEP)
    if not fits(lo * _RATIO_STEP):
        return None
    if fits(1.0):
        return 1.0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * _RATIO_STEP) else (lo, mid)
    return round(lo * _RATIO_STEP, 3)


def _ratio_for_params(spec: ModelSpec, s: Settings, target: int) -> float:
    """Smallest ratio on a 0.001 grid whose emulator has at least ``target`` parameters."""
    lo, hi = 0, round(1 / _RATIO_STEP)
    if estimate.emulator_params(spec, replace(s, ratio=1.0)) < target:
        raise UserError(f"emulator_params: {target / 1e9:.2f}B is more than the emulator can have "
                         f"({estimate.emulator_params(spec, replace(s, ratio=1.0)) / 1e9:.2f}B at ratio 1)")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        enough = estimate.emulator_params(spec, replace(s, ratio=mid * _RATIO_STEP)) >= target
        lo, hi = (lo, mid) if enough else (mid, hi)
    return hi * _RATIO_STEP


def plan(config_or_dir, budget: str | int = "24GiB", seq_len: int = 2048, batch: int = 1, lora_r: int = LORA_RANK,
         samples: int = 64, *, ratio: float | None = None, emulator_params: str | int | None = None,
         vision: str = "compress", vision_ratio: float | None = None, svd: str = "exact",
         embeddings_on_device: bool = False, refreshes: int = REFRESHES,
         image_tiles: int | None = None, lm_head_chunk: int | None = None,
         calibration_micro_batch: int | None = None, heal_rank: int = DEFAULT_HEAL_RANK) -> Plan:
    """Plan the memory of building an emulator, training LoRA on it (refreshing it), correcting and exporting it.

    Args:
        config_or_dir: a config dict, a ``config.json``, a model directory, or a shipped config name
            (``emloc.memory.reference_configs()``: Llama-3.1-70B, Qwen2.5-72B, InternVL2.5-38B, ...).
        budget: device memory per stage (``"24GiB"``, ``"20GB"``, bytes).
        seq_len, batch: training micro-batch shape; ``samples``: calibration samples of ``seq_len`` tokens.
        lora_r: LoRA rank on every decoder linear.
        ratio: compression ratio to plan for; by default the largest that fits ``budget``.
        emulator_params: instead of ``ratio``, the emulator size to plan for (``"5B"`` or a count): the
            smallest ratio giving at least that many parameters.
        vision: ``"compress"`` the vision tower or keep it ``"dense"`` (frozen either way); the build streams
            it block by block either way.
        vision_ratio: the compressed tower's own ratio (default: the language model's).
        svd: the factorisation, one of ``emloc_kernels.lowrank.METHODS`` (``"exact"``, ``"randomized"``).
        embeddings_on_device: keep the input embedding on the device in training (default: on the host; a
            vision-language model's always is).
        image_tiles: image tiles per sample for a vision model (default: as many as ``seq_len`` holds).
        lm_head_chunk, calibration_micro_batch: override the planned values.
        heal_rank: rank of the build's heal adapter when it heals (docs/design.md §1.7, ``--heal-steps``);
            0, the default, when it does not.
        refreshes: ``TrainConfig.refreshes``; above 0 a refresh stage (the build re-run with the LoRA).

    Returns a :class:`Plan`; ``plan.fits`` is False with ``plan.reason`` naming the stage and its largest
    term when no ratio (or not the requested one) fits.
    """
    for name, value in (("seq_len", seq_len), ("batch", batch), ("lora_r", lora_r), ("samples", samples)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"plan: {name} must be a positive integer, got {value!r}")
    for name, value in (("heal_rank", heal_rank), ("refreshes", refreshes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"plan: {name} must be an integer >= 0, got {value!r}")
    if vision not in ("compress", "dense"):
        raise UserError(f"plan: vision must be 'compress' or 'dense', got {vision!r}")
    if svd not in METHODS:
        raise UserError(f"plan: svd must be one of {', '.join(METHODS)}, got {svd!r}")
    for what, value in (("ratio", ratio), ("vision_ratio", vision_ratio)):
        if value is not None and not 0 < value <= 1:
            raise UserError(f"plan: {what} must be in (0, 1], got {value!r}")
    if vision_ratio is not None and vision == "dense":
        raise UserError("plan: vision_ratio is the ratio of a compressed tower; not with vision='dense'")
    if ratio is not None and emulator_params is not None:
        raise UserError("plan: give ratio or emulator_params, not both")
    config, name = load_model_config(config_or_dir)
    spec = model_spec(config, name)
    budget_bytes = parse_bytes(budget)
    chunk = lm_head_chunk or _lm_head_chunk(spec, batch * seq_len, budget_bytes)
    s = Settings(ratio=ratio or 1.0, seq_len=seq_len, batch=batch, lora_r=lora_r, samples=samples,
                 lm_head_chunk=chunk, method=svd, compress_vision=vision == "compress", vision_ratio=vision_ratio,
                 # a vision-language model looks its embedding up inside its own forward: on the device
                 embeddings_on_device=embeddings_on_device or spec.vision is not None, image_tiles=image_tiles,
                 heal_rank=heal_rank, refreshes=refreshes, calibration_micro_batch=calibration_micro_batch or 1)
    if emulator_params is not None:
        s = replace(s, ratio=_ratio_for_params(spec, s, parse_count(emulator_params)))
    elif ratio is None:
        found = _largest_fitting_ratio(spec, s, budget_bytes)
        if found is None:
            smallest = _evaluate(spec, replace(s, ratio=_MIN_RATIO), budget_bytes, name, config)
            smallest.reason = f"nothing fits, not even ratio {_MIN_RATIO}: " + smallest.reason
            return smallest
        s = replace(s, ratio=found)
    s = replace(s, calibration_micro_batch=calibration_micro_batch or _calibration_micro_batch(spec, s, budget_bytes))
    return _evaluate(spec, s, budget_bytes, name, config)
