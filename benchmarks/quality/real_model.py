"""Real-model quality benchmark: EMLoC on SmolLM2-135M-Instruct, two downstream chat tasks, held-out exact match.

    python benchmarks/quality/real_model.py [--seeds 3] [--ratios 0.75 0.5 0.25] [--steps 40] [--out DIR]

Per task (:mod:`tasks`): zero-shot; LoRA on the original (the ceiling); and per ratio and emulator variant
(:data:`VARIANTS`) one build, the emulator's fidelity on held-out task text before any task training (loss,
KL from the original's next-token distribution), then per seed LoRA trained on the emulator, scored on the
emulator, on the original uncorrected and with each correction. Every finished run is appended to
``runs.jsonl`` in ``--work`` at once, so an interrupted benchmark resumes where it stopped. Writes ``RESULTS.md`` (mean
± std over seeds, % of the ceiling's gain over zero-shot kept, peak memory of one training step, wall
time), ``RESULTS.png`` and ``runs.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import machine  # noqa: E402
from runlog import RunLog  # noqa: E402
from tasks import TASKS, make_splits, write_jsonl  # noqa: E402

import emloc  # noqa: E402
from emloc.correction import correct_lora  # noqa: E402
from emloc.data import collate, load_examples  # noqa: E402
from emloc.demo import smollm2  # noqa: E402
from emloc.demo.measure import training_peak_bytes  # noqa: E402
from emloc.healing import HealConfig  # noqa: E402
from emloc.lora import LoraAdapter  # noqa: E402
from emloc.training import TrainConfig, evaluate, train  # noqa: E402

# Emulator variants at equal parameter count: the heal adapter's rank comes out of each linear's budget.
# "paper" is the emulator and LoRA recipe as published (uniform ranks, no healing, rank 8); "lora-r64" is the
# same emulator with emloc's default LoRA rank (emloc.ranks.LORA_RANK); "refresh" is emloc's default, rank 64
# with the emulator refreshed three times during training (emloc.training.refresh); the others are the
# explorations docs/quality.md reports (run them with --variants).
VARIANTS = {
    "paper": {"heal": None},
    "healed": {"heal": HealConfig(gradient_checkpointing=False)},
    "healed-60": {"heal": HealConfig(steps=60, gradient_checkpointing=False)},
    "damped-0.01": {"damping": 0.01},
    "damped-0.1": {"damping": 0.1},
    "damped-1": {"damping": 1.0},
    "samples-256": {"max_samples": 256},
    # The LoRA recipe (same steps; alpha = 2 r as in the benchmark's own r 8 / alpha 16), judged against the
    # same recipe on the original.
    "lora-r32": {"train": {"lora_r": 32, "lora_alpha": 64}},
    "lora-r64": {"train": {"lora_r": 64, "lora_alpha": 128}},
    "lora-r128": {"train": {"lora_r": 128, "lora_alpha": 256}},
    "lora-lr3e-3": {"train": {"learning_rate": 3e-3}},
    "healed-r64": {"heal": HealConfig(gradient_checkpointing=False), "train": {"lora_r": 64, "lora_alpha": 128}},
    "refresh": {"train": {"lora_r": 64, "lora_alpha": 128, "refreshes": 3}},
    "refresh-7": {"train": {"lora_r": 64, "lora_alpha": 128, "refreshes": 7}},
    "refresh-r8": {"train": {"refreshes": 3}},  # the paper's rank 8, refreshed
}
DEFAULT_VARIANTS = ("paper", "lora-r64", "refresh")
# Training settings that act on an emulator only: a recipe's ceiling on the original ignores them.
EMULATOR_ONLY = ("refreshes",)
# How the emulator's adapter goes onto the original: as trained, or through the paper's correction.
CORRECTIONS = {"uncorrected": None, "corrected": 3.0}
MAX_LENGTH = 64


class Bench:
    """The shared state of one benchmark run: the original model, the data files, the run log."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out, self.work = args, args.out, args.work
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.model_dir = smollm2.checkpoint()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        self.original = transformers.AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.runs = RunLog(self.work / "runs.jsonl")


    def files(self, task: str) -> tuple[Path, list[dict]]:
        train_rows, test_rows = make_splits(task, self.args.train_size, self.args.test_size)
        data = write_jsonl(train_rows, self.work / "data" / f"{task}-train.jsonl")
        test = write_jsonl(test_rows, self.work / "data" / f"{task}-test.jsonl")
        return data, load_examples(test, self.tokenizer, MAX_LENGTH)

    def train_config(self, seed: int, output_dir: Path) -> TrainConfig:
        return TrainConfig(output_dir=str(output_dir), max_steps=self.args.steps, micro_batch_size=8, grad_accum=1,
                           learning_rate=self.args.lr, warmup_ratio=0.1, lora_r=8, lora_alpha=16,
                           max_length=MAX_LENGTH, gradient_checkpointing=False, eval_fraction=0.0,
                           save_steps=10**9, seed=seed, progress=False, refreshes=0)

    def score(self, model, test) -> dict:
        return evaluate(model, test, 16, 1024, self.tokenizer.pad_token_id)

    def on_original(self, adapter: LoraAdapter | None, test) -> dict:
        model = copy.deepcopy(self.original)
        if adapter is not None:
            adapter.apply_to(model)
        return self.score(model, test)


def fidelity(original, emulator, test, pad_id: int) -> dict:
    """Mean per-token loss of the emulator and KL(original || emulator) over every token of the held-out
    texts (prompts and answers), before any task training."""
    loss = kl = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(test), 16):
            batch = collate([{**e, "labels": e["input_ids"]} for e in test[start:start + 16]], pad_id)
            mask = batch["attention_mask"][:, 1:].bool()
            target = batch["input_ids"][:, 1:][mask]
            p = torch.log_softmax(original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                  .logits[:, :-1][mask].float(), -1)
            q = torch.log_softmax(emulator(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                  .logits[:, :-1][mask].float(), -1)
            loss += float(-q.gather(1, target[:, None]).sum())
            kl += float((p.exp() * (p - q)).sum())
            tokens += int(mask.sum())
    return {"loss": loss / tokens, "kl": kl / tokens}


def step_peak(model, test, pad_id: int) -> int:
    batch = collate(test[:8], pad_id)
    return training_peak_bytes(model, batch)


def run_task(bench: Bench, task: str) -> None:
    args, pad_id = bench.args, bench.tokenizer.pad_token_id
    data, test = bench.files(task)
    work = bench.work / task
    if f"{task}/zero-shot" not in bench.runs.done:
        bench.runs.record(f"{task}/zero-shot", task=task, row="zero-shot", ratio=1.0, seed=0,
                          **bench.on_original(None, test), seconds=0.0)
    # The ceiling of every LoRA recipe a variant trains with: a recipe is judged against itself on the original.
    for recipe in dict.fromkeys(_recipe(v) for v in args.variants):
        for seed in range(args.seeds):
            key = f"{task}/lora-original{'' if recipe is None else '-' + recipe}/{seed}"
            if key in bench.runs.done:
                continue
            model = copy.deepcopy(bench.original)
            started = time.perf_counter()
            config = replace(bench.train_config(seed, work / f"original-{recipe or 'base'}-{seed}"),
                             **(VARIANTS[recipe]["train"] if recipe else {}))
            result = train(model, data, config, tokenizer=bench.tokenizer, eval_data=test)
            seconds = time.perf_counter() - started
            bench.runs.record(key, task=task, row="LoRA on original", recipe=recipe, ratio=1.0, seed=seed,
                              **result.eval, peak_bytes=step_peak(model, test, pad_id), seconds=seconds)
    for ratio in args.ratios:
        for variant in args.variants:
            emulator_dir = work / f"emulator-{variant}-{ratio}"
            key = f"{task}/{variant}/{ratio}/fidelity"
            build_seconds = bench.runs.done.get(key, {}).get("seconds")
            if key not in bench.runs.done:
                started = time.perf_counter()
                settings = {"max_samples": args.samples,
                            **{k: v for k, v in VARIANTS[variant].items() if k != "train"}}
                emloc.build_emulator(bench.model_dir, data, emulator_dir, ratio, max_length=MAX_LENGTH, batch_size=8,
                                     progress=False, **settings)
                build_seconds = time.perf_counter() - started
                emulator = emloc.load_emulator(emulator_dir)
                report = json.loads((emulator_dir / "emloc-report.json").read_text())
                bench.runs.record(key, task=task, row=f"{variant}: emulator fidelity", ratio=ratio, seed=0,
                                  **fidelity(bench.original, emulator, test, pad_id), seconds=build_seconds,
                                  parameters=report["parameters_after"], linear_share=_linear_share(report),
                                  heal=report.get("heal", {}).get("kl_after"))
            for seed in range(args.seeds):
                key = f"{task}/{variant}/{ratio}/{seed}"
                if key in bench.runs.done:
                    continue
                emulator = emloc.load_emulator(emulator_dir)
                train_dir = work / f"train-{variant}-{ratio}-{seed}"
                started = time.perf_counter()
                config = replace(bench.train_config(seed, train_dir), **VARIANTS[variant].get("train", {}))
                result = train(emulator, data, config, tokenizer=bench.tokenizer, eval_data=test)
                seconds = time.perf_counter() - started + build_seconds
                scores = {"on emulator": result.eval["eval_exact_match"]}
                trained = LoraAdapter.load(result.adapter_dir)
                for label, clamp in CORRECTIONS.items():
                    adapter = trained if label == "uncorrected" else correct_lora(
                        bench.model_dir, trained.trained_on or emulator_dir, trained, clamp, progress=False)
                    scores[label] = bench.on_original(adapter, test)["eval_exact_match"]
                for refreshed in train_dir.glob("refresh-*"):  # an emulator's size each; scored, not needed
                    shutil.rmtree(refreshed)
                bench.runs.record(key, task=task, variant=variant, ratio=ratio, seed=seed, scores=scores,
                                  emulator_eval_loss=result.eval["eval_loss"],
                                  peak_bytes=step_peak(emulator, test, pad_id), seconds=seconds)


def _recipe(variant: str) -> str | None:
    """The first variant with the LoRA recipe ``variant`` trains with (None: the benchmark's own), which
    names that recipe's ceiling; settings that act on an emulator only are not part of the recipe."""
    def recipe(name: str) -> dict | None:
        recipe = {k: v for k, v in (VARIANTS[name].get("train") or {}).items() if k not in EMULATOR_ONLY}
        return recipe or None  # no recipe of its own: the benchmark's

    mine = recipe(variant)
    return None if mine is None else next(name for name in VARIANTS if recipe(name) == mine)


def _linear_share(report: dict) -> float:
    """Parameters of the emulator's linears as a share of the original's (the ratio, after rounding)."""
    return report["parameters_after"] / report["parameters_before"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


LABELS = {("paper", "corrected"): "paper: corrected (the paper's method)",
          ("refresh", "uncorrected"): "refresh: uncorrected (emloc's default)"}


def _row(task: str, ratio: float, method: str, values: list[float], zero: float, gain: float, peak=None,
         seconds=None) -> dict:
    mean, std = _mean_std(values)
    return {"task": task, "ratio": ratio, "method": method, "mean": mean, "std": std, "seeds": len(values),
            "kept": 100 * (mean - zero) / gain if gain > 0 else float("nan"), "peak_bytes": peak, "seconds": seconds}


def task_rows(runs: list[dict], task: str, args) -> list[dict]:
    """The table rows of one task: mean and spread over seeds, and the share of the ceiling's gain kept."""
    mine = [r for r in runs if r["task"] == task]
    zero = next(r["eval_exact_match"] for r in mine if r.get("row") == "zero-shot")
    gains, rows = {}, []
    for recipe in dict.fromkeys([None, *(_recipe(v) for v in args.variants)]):
        originals = [r for r in mine if r.get("row") == "LoRA on original" and r.get("recipe") == recipe]
        if not originals:
            continue
        ceiling = [r["eval_exact_match"] for r in originals]
        gains[recipe] = statistics.fmean(ceiling) - zero
        name = "LoRA on original (ceiling)" if recipe is None else f"LoRA on original, {recipe} recipe (its ceiling)"
        rows.append(_row(task, 1.0, name, ceiling, zero, gains[recipe], max(r["peak_bytes"] for r in originals),
                         statistics.median(r["seconds"] for r in originals)))
    rows.insert(0, _row(task, 1.0, "zero-shot", [zero], zero, gains[None]))
    for ratio in args.ratios:
        for variant in args.variants:
            trained = [r for r in mine if r.get("variant") == variant and r["ratio"] == ratio]
            if not trained:
                continue
            gain = gains.get(_recipe(variant), gains[None])
            peak = max(r["peak_bytes"] for r in trained)
            seconds = statistics.median(r["seconds"] for r in trained)
            for label in ("on emulator", *CORRECTIONS):
                rows.append(_row(task, ratio, LABELS.get((variant, label), f"{variant}: {label}"),
                                 [r["scores"][label] for r in trained], zero, gain, peak, seconds))
    return rows


def summarize(runs: list[dict], args) -> tuple[str, list[dict]]:
    """The Markdown tables (one per task) and the flat rows behind them."""
    rows, lines = [], []
    for task in args.tasks:
        mine = [r for r in runs if r["task"] == task]
        found = task_rows(runs, task, args)
        rows += found
        lines += [f"### {task}", "", "| ratio | method | exact match (%) | % of gain kept | seeds | "
                  "peak step memory (MiB) | wall (s) |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in found:
            peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f}"
            wall = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
            lines.append(f"| {row['ratio']:g} | {row['method']} | {100 * row['mean']:.1f} ± {100 * row['std']:.1f} | "
                         f"{row['kept']:.0f} | {row['seeds']} | {peak} | {wall} |")
        lines += ["", "Emulator fidelity on the held-out task text, before task training:", "",
                  "| ratio | emulator | parameters (share of original) | loss | KL to original | build (s) |",
                  "| ---: | --- | ---: | ---: | ---: | ---: |"]
        built = [v for v in args.variants if set(VARIANTS[v]) != {"train"}]  # a recipe alone builds nothing new
        for r in (r for r in mine if r.get("row") in {f"{v}: emulator fidelity" for v in built}):
            lines.append(f"| {r['ratio']:g} | {r['row'].split(':')[0]} | {r['parameters']:,} "
                         f"({r['linear_share']:.2f}) | {r['loss']:.3f} | {r['kl']:.3f} | {r['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines), rows


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.tasks), figsize=(7 * len(args.tasks), 5.2), squeeze=False)
    for ax, task in zip(axes[0], args.tasks, strict=True):
        mine = [r for r in rows if r["task"] == task]
        zero = next(r["mean"] for r in mine if r["method"] == "zero-shot")
        # the adapters as they reach the original (the emulator scores are in the table)
        shown = [m for m in dict.fromkeys(r["method"] for r in mine if r["ratio"] < 1) if "on emulator" not in m]
        for method in shown:
            found = [r for r in mine if r["method"] == method]
            ax.errorbar([r["ratio"] for r in found], [100 * r["mean"] for r in found],
                        yerr=[100 * r["std"] for r in found], marker="o", capsize=3, label=method)
        ceilings = [r for r in mine if r["method"].startswith("LoRA on original")]  # one per LoRA recipe
        for style, ceiling in zip(("--", "-.", ":"), ceilings, strict=False):
            ax.axhline(100 * ceiling["mean"], color="k", linestyle=style, label=ceiling["method"])
        ax.axhline(100 * zero, color="grey", linestyle=(0, (1, 4)), label="zero-shot")
        ax.set_xlabel("compression ratio (share of linear-layer parameters kept)")
        ax.set_ylabel("held-out exact match (%)")
        ax.set_title(f"SmolLM2-135M-Instruct, {task}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=40, help="LoRA steps of 8 examples")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=64, help="calibration (and healing) samples")
    parser.add_argument("--train-size", type=int, default=400)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only write the results of the runs logged so far")
    parser.add_argument("--out", type=Path, default=HERE / "smollm2", help="results (RESULTS.md, .png, runs.json)")
    parser.add_argument("--work", type=Path, default=smollm2.cache_root() / "quality-work",
                        help="emulators, adapters and the run log (large; resumable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("EMLOC_BACKEND", "torch")  # on the CPU the reference is the fast path
    started = time.perf_counter()
    bench = Bench(args)
    for task in args.tasks if not args.report else ():
        run_task(bench, task)
    runs = [r for r in bench.runs.done.values() if r["task"] in args.tasks]
    table, rows = summarize(runs, args)
    header = (f"# Real-model quality benchmark\n\nSmolLM2-135M-Instruct, {args.steps} LoRA steps of 8 examples "
              f"(r 8, alpha 16, lr {args.lr:g}), {args.samples} calibration samples, {args.train_size} train / "
              f"{args.test_size} held-out examples per task, seeds 0..{args.seeds - 1}.\nMachine: {machine()}. "
              f"Wall time of every run (build and fine-tuning, added up): "
              f"{sum(r.get('seconds', 0) for r in runs) / 60:.1f} min; this invocation "
              f"{(time.perf_counter() - started) / 60:.1f} min.\n\n")
    (args.out / "RESULTS.md").write_text(header + table + "\n")
    (args.out / "runs.json").write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                                 for k, v in vars(args).items()},
                                                    "machine": machine(), "runs": runs, "rows": rows}, indent=1))
    plot(rows, args.out / "RESULTS.png", args)
    print(header + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
