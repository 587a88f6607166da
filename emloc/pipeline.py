"""The whole EMLoC path in one call: build (and heal) the emulator, train LoRA on it (refreshing the emulator as
it goes, ``TrainConfig.refreshes``), correct it, export it.

Each stage writes into its own directory under ``output_dir`` (``emulator/``, ``train/``, ``corrected/``,
``export/``) and is recorded in ``run_state.json`` when finished, so an interrupted run resumes at the first
unfinished stage (building and training also resume inside the stage). The summary (sizes, losses, eval
accuracy of the original model before and after) goes to ``summary.json`` and is returned.

With a device ``budget`` the run follows the memory plan (:func:`emloc.plan`) of its own model and settings:
the largest compression ratio that fits (unless one is given, which must fit), the calibration micro-batch of
the build, the LM-head chunk and the input embedding's place in training.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import models
from .build import REPORT as BUILD_REPORT
from .build import build_emulator, load_emulator, plan_compression
from .build.plan import stack_compression
from .build.settings import load_tokenizer
from .correction import correct_lora
from .data import load_examples, pad_token_id, split_examples
from .errors import UserError, check_float, check_int, check_ratio
from .export import export
from .files import atomic_write_text, read_json
from .healing import HealConfig
from .locking import output_lock
from .lora import LoraAdapter, target_modules
from .memory import Plan, plan
from .memory.spec import load_model_config
from .training import ADAPTER_DIR, REPORT_FILE, TrainConfig, evaluate, train

STATE_FILE = "run_state.json"
SUMMARY_FILE = "summary.json"
DEFAULT_RATIO = 0.4
# Healing is opt-in: on the real-model benchmark it made the transfer erratic (docs/quality.md).
DEFAULT_HEAL: HealConfig | None = None
CORRECTIONS = ("none", "paper")


def _recorded(config: TrainConfig) -> dict:
    """A training config as a run directory records it (the progress switch does not change the run)."""
    return {k: v for k, v in asdict(config).items() if k != "progress"}


def plan_for_budget(model_dir: str | os.PathLike, budget: str | int, config: TrainConfig,
                    ratio: float | dict | None = None, max_samples: int = 64, svd: str = "exact",
                    dtype: torch.dtype | None = None, heal_rank: int = 0, vision_ratio: float | None = None) -> Plan:
    """The memory plan of building and training on the model in ``model_dir`` (its ``config.json``) within
    ``budget``: the training shape of ``config``, ``max_samples`` calibration samples, ``dtype`` weights,
    healing at ``heal_rank`` (0: none), a vision-language model's tower compressed at ``vision_ratio`` (None:
    dense, as the build keeps it by default); the build streams the tower block by block either way.

    ``ratio`` None takes the largest ratio that fits. Raises ValueError with the planner's reason when the
    given ratio, or any ratio, does not fit.
    """
    if isinstance(ratio, dict):
        raise UserError("budget: the plan is for one compression ratio; per-module ratios cannot be planned")
    model_config, name = load_model_config(model_dir)
    if dtype is not None:
        model_config = {**model_config, "torch_dtype": str(dtype).removeprefix("torch.")}
    result = replace(plan(model_config, budget, seq_len=config.max_length, batch=config.micro_batch_size,
                          lora_r=config.lora_r, samples=max_samples, ratio=ratio, svd=svd, heal_rank=heal_rank,
                          vision="dense" if vision_ratio is None else "compress", vision_ratio=vision_ratio,
                          refreshes=config.refreshes),
                     model=name)
    if not result.fits:
        given = "" if ratio is None else f"ratio {ratio} does not fit: "
        raise UserError(f"budget {budget}: {given}{result.reason}")
    return result


def plan_record(result: Plan) -> dict:
    """What a run records of the plan it followed: budget, ratio, device peak per stage, chosen settings."""
    s = result.settings
    return {"budget_bytes": result.budget, "ratio": result.ratio,
            "vision_ratio": result.build_kwargs()["vision_compression"],
            "device_peak_bytes": {stage.name: stage.device_peak for stage in result.stages},
            "settings": {"calibration_micro_batch": s.calibration_micro_batch, "lm_head_chunk": s.lm_head_chunk,
                         "embeddings_on_device": s.embeddings_on_device, "micro_batch": s.batch,
                         "seq_len": s.seq_len, "method": s.method}}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def _original_eval(model_path: Path, adapters: dict[str, LoraAdapter | None], examples: list[dict], config,
                   pad_id: int, device, dtype) -> dict[str, dict]:
    """Eval metrics of the original model as is and with each adapter attached (one model load per adapter)."""
    results = {}
    for label, adapter in adapters.items():
        model = models.model_class(models.load_config(model_path)).from_pretrained(model_path, dtype=dtype).to(device)
        if adapter is not None:
            adapter.apply_to(model)
        results[label] = evaluate(model, examples, config.micro_batch_size, config.lm_head_chunk, pad_id)
        del model
    return results


def run(model_path: str | os.PathLike, data: str | os.PathLike, output_dir: str | os.PathLike,
        ratio: float | dict[str, float] | None = None, *, vision_ratio: float | None = None,
        train_config: TrainConfig | None = None,
        heal: HealConfig | None = DEFAULT_HEAL, damping: float = 0.0, correction: str = "none",
        clamp: float | None = 3.0, merge: bool = False, device: str | None = None, dtype: torch.dtype | None = None,
        max_samples: int = 64, svd: str = "exact", evaluate_original: bool = True, budget: str | int | None = None,
        overwrite: bool = False, progress: bool = True) -> dict:
    """Build, train, correct and export; returns the summary (also written to ``output_dir/summary.json``).

    Args:
        model_path: the original model (safetensors checkpoint with tokenizer).
        data: training data (JSONL text/messages/conversations or .txt); calibration samples come from it too.
        output_dir: where every stage writes; rerunning with the same arguments resumes.
        ratio: compression ratio (or ``{regex: ratio}``) of the emulator; default 0.4, or with ``budget`` the
            largest that fits. For a vision-language model one ratio is its decoder's.
        vision_ratio: a vision-language model's ratio for its vision tower (default: kept dense).
        train_config: training settings (``output_dir`` is set to ``output_dir/train``); its ``refreshes``
            (default 3) recompute the emulator's factors during training (docs/design.md §1.9), into
            ``output_dir/train/refresh-<step>``, and the correction uses the last of them.
        heal: heal the emulator before training (docs/design.md §1.7); None (the default) builds it unhealed.
        damping: covariance damping of the factorisation (:func:`emloc.build_emulator`).
        correction: ``"none"`` exports the adapter as trained on the emulator, ``"paper"`` after the paper's
            correction (:func:`emloc.correct_lora`). The default follows the real-model benchmark, where the
            correction lowered the held-out accuracy of the original model (docs/quality.md).
        clamp: the paper correction's clamp (None: off).
        merge: also write the merged checkpoint.
        device, dtype: where and in which dtype the emulator is built and trained.
        max_samples, svd: calibration sample count and factorisation of the build.
        evaluate_original: evaluate the original model on the eval split before and after (loads it whole).
        budget: device memory (``"24GiB"``, bytes) the build and training must fit: the run follows
            :func:`plan_for_budget` (ratio, calibration micro-batch, LM-head chunk, embedding on the host)
            and records the plan in the summary. The plan covers the emulator path, not ``evaluate_original``.
        overwrite: start over in an ``output_dir`` that holds a run with other settings (or stage outputs
            without a run record), instead of refusing it.

    Every setting, the model's architecture, the compression patterns and the LoRA target are checked
    against the model's config before anything is written; the run then holds the lock of ``output_dir``.
    """
    model_path, output_dir = Path(model_path), Path(output_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = replace(train_config or TrainConfig(), output_dir=str(output_dir / "train"), progress=progress)
    _check_options(ratio, max_samples, clamp, correction)
    skeleton = models.skeleton(models.load_config(model_path))
    target_modules(skeleton, config.lora_target)
    build_args = {"compression": DEFAULT_RATIO if ratio is None else ratio, "vision_compression": vision_ratio,
                  "max_samples": max_samples, "svd": svd}
    followed = None
    if budget is not None:
        followed = plan_for_budget(model_path, budget, config, ratio, max_samples, svd, dtype,
                                   heal.rank if heal is not None else 0, vision_ratio)
        build_args = followed.build_kwargs()
        config = replace(config, **followed.train_kwargs())
        if progress:
            print(followed.table(), flush=True)
    build_args["compression"] = stack_compression(skeleton, build_args["compression"],
                                                  build_args.pop("vision_compression"))
    plan_compression(skeleton, build_args["compression"], heal)
    vision_language = len(models.block_stacks(skeleton)) > 1
    del skeleton
    settings = {"model": str(model_path.resolve()), "data": str(Path(data).resolve()),
                "ratio": build_args["compression"] if budget is None else ratio, "budget": budget,
                "clamp": clamp, "merge": merge, "dtype": str(dtype), "max_samples": max_samples, "svd": svd,
                "train": _recorded(config), **_method_settings(heal, damping, correction)}
    with output_lock(output_dir):
        return _run_stages(model_path, data, output_dir, settings, {**build_args, "heal": heal, "damping": damping},
                           config, followed, overwrite, device=device, dtype=dtype,
                           clamp=clamp if correction == "paper" else None, correct=correction == "paper",
                           merge=merge, progress=progress, evaluate_original=evaluate_original,
                           vision_language=vision_language)


def _check_options(ratio, max_samples: int, clamp: float | None, correction: str) -> None:
    """Refuse a bad value of :func:`run`'s own options, naming the option."""
    check_int(max_samples, "max_samples")
    if ratio is not None and not isinstance(ratio, dict):
        check_ratio(ratio, "ratio")
    if clamp is not None:
        check_float(clamp, "clamp", 0, float("inf"), low_open=True, high_open=True)
    if correction not in CORRECTIONS:
        raise UserError(f"correction: must be one of {', '.join(CORRECTIONS)}, got {correction!r}")


def _method_settings(heal: HealConfig | None, damping: float, correction: str) -> dict:
    """What a run directory records of the method; the defaults of earlier runs (no healing, the paper's
    correction) are recorded by their absence, so those runs still resume."""
    return {**({"heal": asdict(heal)} if heal is not None else {}), **({"damping": damping} if damping else {}),
            **({"correction": correction} if correction != "paper" else {})}


def _run_stages(model_path: Path, data, output_dir: Path, settings: dict, build_args: dict, config: TrainConfig,
                followed: Plan | None, overwrite: bool, *, device, dtype, clamp, correct, merge, progress,
                evaluate_original, vision_language) -> dict:
    """The stages of :func:`run`, under the lock of ``output_dir``, skipping those ``run_state.json`` records."""
    train_dir = Path(config.output_dir)
    state = _RunState.open(output_dir, settings, overwrite, train_dir)
    emulator_dir, corrected_dir, export_dir = output_dir / "emulator", output_dir / "corrected", output_dir / "export"
    if "build" not in state.done:
        build_emulator(model_path, data, emulator_dir, device=device, dtype=dtype, progress=progress,
                       overwrite=overwrite, **build_args)
        state.finish("build")
    tokenizer = load_tokenizer(emulator_dir, vision_language)
    examples, eval_examples = split_examples(load_examples(data, tokenizer, config.max_length),
                                             config.eval_fraction, config.seed)
    if "train" not in state.done:
        emulator = load_emulator(emulator_dir, device=device, dtype=dtype)
        train(emulator, examples, config, tokenizer=tokenizer, eval_data=eval_examples)
        del emulator
        state.finish("train")
    if "correct" not in state.done:
        trained = LoraAdapter.load(train_dir / ADAPTER_DIR)
        adapter = correct_lora(model_path, trained.trained_on or emulator_dir, trained, clamp, device=device,
                               progress=progress) \
            if correct else replace(trained, extra={**trained.extra, "corrected": False})
        adapter.save(corrected_dir)
        state.finish("correct")
    if "export" not in state.done:
        export(corrected_dir, model_path, export_dir, merge=merge, progress=progress)
        state.finish("export")
    summary = _summary(model_path, emulator_dir, train_dir, export_dir, merge, followed)
    if evaluate_original and eval_examples:
        adapters = {"before": None, **({"uncorrected": LoraAdapter.load(train_dir / ADAPTER_DIR)} if correct else {}),
                    "after": LoraAdapter.load(corrected_dir)}
        summary["original_eval"] = _original_eval(model_path, adapters, eval_examples, config,
                                                  pad_token_id(tokenizer), device, dtype)
    atomic_write_text(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary


@dataclass
class _RunState:
    """``run_state.json``: the settings of the run in a directory and the stages it has finished."""

    path: Path
    settings: dict
    done: set[str]

    @classmethod
    def open(cls, output_dir: Path, settings: dict, overwrite: bool, train_dir: Path) -> _RunState:
        """The state of the run in ``output_dir`` with ``settings``: resumed when it holds a run with the same
        settings, refused when the settings differ (unless ``overwrite``), otherwise started and recorded
        before any stage writes."""
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / STATE_FILE
        state = read_json(path) if path.is_file() else None
        stored = (state or {}).get("settings", {})
        if isinstance(stored.get("train"), dict):  # a run saved before a TrainConfig field existed used its default
            stored = {**stored, "train": {**_recorded(TrainConfig()), **stored["train"]}}
        changed = sorted(k for k in settings.keys() | stored.keys() if settings.get(k) != stored.get(k))
        if state is not None and changed and not overwrite:
            raise UserError(f"{output_dir} holds a run with other settings ({', '.join(changed)} differ); resume "
                            "with the same arguments, pass overwrite=True (--overwrite) to start over, or choose "
                            "another output directory")
        run = cls(path, settings, set(state["done"]) if state is not None and not changed else set())
        if overwrite and not run.done:  # starting over: no checkpoint of another run may be resumed
            shutil.rmtree(train_dir, ignore_errors=True)
        if not run.done:  # a fresh run, or one started over: its settings are recorded before any stage writes
            run.finish(None)
        return run

    def finish(self, stage: str | None) -> None:
        """Record ``stage`` as finished (None: only the settings) in ``run_state.json``."""
        self.done.update([stage] if stage else [])
        atomic_write_text(self.path, json.dumps({"settings": self.settings, "done": sorted(self.done)}, indent=2))


def _summary(model_path: Path, emulator_dir: Path, train_dir: Path, export_dir: Path, merge: bool,
             followed: Plan | None) -> dict:
    """The run's summary from the build and training reports: sizes, losses, outputs, the plan followed."""
    build_report = read_json(emulator_dir / BUILD_REPORT)
    train_report = read_json(train_dir / REPORT_FILE)
    summary = {
        "parameters": {"original": build_report["parameters_before"], "emulator": build_report["parameters_after"]},
        "bytes": {"original": _dir_bytes(model_path), "emulator": _dir_bytes(emulator_dir)},
        "train": {"steps": train_report["steps"], "first_loss": train_report["losses"][0],
                  "last_loss": train_report["losses"][-1],
                  **{k: v for k, v in train_report.items() if k.startswith("eval_")}},
        "outputs": {"adapter": str(export_dir / "adapter"),
                    **({"merged": str(export_dir / "merged")} if merge else {})},
    }
    if followed is not None:
        summary["memory_plan"] = plan_record(followed)
    return summary
