"""The comparison behind ``emloc demo`` and ``benchmarks/quality``: EMLoC against its baselines.

For every compression ratio and seed, on the task of :mod:`.task` (train split for fine-tuning and
calibration, held-out test split for the score):

* zero-shot original: the pretrained default model as it is;
* LoRA on original: LoRA trained on the full model (the memory-hungry reference);
* emloc default (refreshed, as trained): ``emloc.run`` as it runs by default: it builds the emulator, trains
  LoRA on it while refreshing it (docs/design.md §1.9) and exports the adapter as trained, here put on the
  original model;
* EMLoC as published (corrected): ``emloc.run`` without refreshes and with the paper's correction
  (``--refreshes 0 --correction paper``), its adapter on the original model;
* smaller model + LoRA: the baseline pretrained by the same recipe with about the emulator's parameter
  count, fine-tuned with LoRA.

Fine-tuning settings are the same for every row. Each run records exact match on the test split, the peak
memory of one fine-tuning step (:mod:`.measure`) and its wall time.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..build import load_emulator
from ..data import collate, load_examples, pad_token_id
from ..lora import LoraAdapter
from ..pipeline import run as emloc_run
from ..progress import progress
from ..ranks import LORA_RANK
from ..training import ADAPTER_DIR, TrainConfig, train
from .configs import BASELINES, DEFAULT, ModelSpec
from .measure import training_peak_bytes
from .report import Run
from .task import TaskConfig, exact_match, make_splits, write_chat_jsonl

ZERO_SHOT = "zero-shot original"
FULL_LORA = "LoRA on original"
UNCORRECTED = "emloc default (refreshed, as trained)"
EMLOC = "EMLoC as published (corrected)"
SMALLER = "smaller model + LoRA"
ROWS = (ZERO_SHOT, FULL_LORA, UNCORRECTED, EMLOC, SMALLER)


@dataclass(frozen=True)
class Settings:
    """What the comparison runs: ratios, seeds, the task and one fine-tuning recipe for every row."""

    ratios: tuple[float, ...] = (0.5, 0.25)
    seeds: tuple[int, ...] = (0, 1, 2)
    task: TaskConfig = TaskConfig()
    model: ModelSpec = DEFAULT
    baselines: dict[float, ModelSpec] = field(default_factory=lambda: dict(BASELINES))
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    lora_r: int = LORA_RANK
    lora_alpha: float = 2.0 * LORA_RANK  # scaling alpha / r = 2, as in every recipe of the benchmarks
    calibration_samples: int = 64

    def train_config(self, seed: int) -> TrainConfig:
        """The LoRA recipe shared by every fine-tuned row (no checkpoints in between, no eval split)."""
        return TrainConfig(max_steps=self.steps, micro_batch_size=self.batch_size, grad_accum=1,
                           learning_rate=self.learning_rate, warmup_ratio=0.05, lora_r=self.lora_r,
                           lora_alpha=self.lora_alpha, max_length=64, gradient_checkpointing=False,
                           eval_fraction=0.0, save_steps=self.steps, seed=seed, progress=False)


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


class Comparison:
    """Runs the rows of :data:`ROWS` for the given :class:`Settings` and collects :class:`Run` records."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        missing = [str(s.path) for s in (settings.model, *settings.baselines.values()) if not s.path.is_dir()]
        if missing:
            raise FileNotFoundError(f"demo checkpoints not found: {', '.join(missing)}; rebuild them with "
                                    "`python -m emloc.demo.pretrain`")
        absent = sorted(set(settings.ratios) - set(settings.baselines))
        if absent:
            raise ValueError(f"no smaller baseline model for compression ratio(s) {absent}; "
                             f"the demo has baselines for {sorted(settings.baselines)}")
        self.settings, self.workdir = settings, workdir
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model.path)
        train_split, self.test = make_splits(settings.task)
        self.data = write_chat_jsonl(train_split, workdir / "train.jsonl")
        self.examples = load_examples(self.data, self.tokenizer, max_length=64)
        self.memory_batch = collate(self.examples[: settings.batch_size], pad_token_id(self.tokenizer))

    def score(self, model: torch.nn.Module) -> float:
        return exact_match(model, self.tokenizer, self.test)

    def zero_shot(self) -> list[Run]:
        start = time.perf_counter()
        accuracy = self.score(_load(self.settings.model.path))
        seconds = time.perf_counter() - start
        return [Run(ZERO_SHOT, ratio, seed, accuracy, None, seconds)
                for ratio in self.settings.ratios for seed in self.settings.seeds]

    def lora(self, spec: ModelSpec, seed: int) -> tuple[float, int, float]:
        """Fine-tune ``spec`` with LoRA; returns accuracy, peak bytes of a step, wall seconds."""
        start = time.perf_counter()
        model = _load(spec.path)
        train(model, self.examples, self.settings.train_config(seed), tokenizer=self.tokenizer)
        seconds = time.perf_counter() - start
        return self.score(model), training_peak_bytes(model, self.memory_batch), seconds

    def emloc(self, ratio: float, seed: int) -> list[Run]:
        """``emloc.run`` at ``ratio`` as by default and as published; each exported adapter on the original."""
        default = self.settings.train_config(seed)
        published = replace(default, refreshes=0)
        return [self._emloc_run(UNCORRECTED, f"default-{ratio:g}-seed{seed}", ratio, default, "none"),
                self._emloc_run(EMLOC, f"emloc-{ratio:g}-seed{seed}", ratio, published, "paper")]

    def _emloc_run(self, row: str, name: str, ratio: float, config: TrainConfig, correction: str) -> Run:
        out = self.workdir / name
        start = time.perf_counter()
        emloc_run(self.settings.model.path, self.data, out, ratio, train_config=config, device="cpu",
                  max_samples=self.settings.calibration_samples, evaluate_original=False, correction=correction,
                  progress=False, overwrite=True)  # the demo's own scratch: an older demo's run starts over
        seconds = time.perf_counter() - start
        emulator = load_emulator(out / "emulator", device="cpu")
        LoraAdapter.load(out / "train" / ADAPTER_DIR).apply_to(emulator)
        peak = training_peak_bytes(emulator, self.memory_batch)
        model = _load(self.settings.model.path)
        LoraAdapter.load(out / "corrected").apply_to(model)
        return Run(row, ratio, seed=config.seed, accuracy=self.score(model), peak_bytes=peak, seconds=seconds)

    def run_all(self) -> list[Run]:
        """Every row, ratio and seed, in table order."""
        settings = self.settings
        jobs = len(settings.seeds) * (1 + 2 * len(settings.ratios))
        runs = self.zero_shot()
        with progress(jobs, "fine-tuning runs", "run") as bar:
            for seed in settings.seeds:
                accuracy, peak, seconds = self.lora(settings.model, seed)
                runs += [Run(FULL_LORA, ratio, seed, accuracy, peak, seconds) for ratio in settings.ratios]
                bar.update()
                for ratio in settings.ratios:
                    runs += self.emloc(ratio, seed)
                    bar.update()
                    accuracy, peak, seconds = self.lora(settings.baselines[ratio], seed)
                    runs.append(Run(SMALLER, ratio, seed, accuracy, peak, seconds))
                    bar.update()
        order = {row: i for i, row in enumerate(ROWS)}
        return sorted(runs, key=lambda r: (-r.ratio, order[r.row], r.seed))


def compare(settings: Settings = Settings(), workdir: Path | None = None) -> list[Run]:
    """Run the whole comparison; intermediate checkpoints go to ``workdir`` (a temporary one by default)."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return Comparison(settings, workdir).run_all()
    with tempfile.TemporaryDirectory(prefix="emloc-demo-") as tmp:
        return Comparison(settings, Path(tmp)).run_all()
