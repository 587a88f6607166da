"""Visual quality benchmark in miniature: EMLoC on a tiny LLaVA, a synthetic image question, held-out exact match.

    python benchmarks/quality/visual.py [--seeds 3] [--steps 1000] [--bases ...] [--out DIR] [--work DIR]

Images of one coloured shape on a plain light background (PIL, 28x28, position, size and background jittered),
split by a fixed seed into a train and a disjoint held-out set; the task is *What colour is the shape?*,
answered by one of six colour words and learnt by LoRA. The model is a tiny LLaVA made by the test suite's
checkpoint factory (:mod:`vlm_checkpoints`: CLIP tower, Llama decoder, a real ``LlavaProcessor``), in two bases
(:data:`BASES`): as made (random init), and pretrained in full on the train images' *shape* question, so that
it reads images and answers in the chat format but was never taught the colour question.

Rows per base (mean ± std over seeds, held-out exact match by :func:`emloc.training.evaluate`): zero-shot; LoRA
on the original (the ceiling); and per emulator (:data:`EMULATORS`: the decoder at ratio 0.5, the vision tower dense
or at 0.5) LoRA trained on the emulator, scored on the emulator, on the original as trained (emloc's default,
``correction="none"``) and after the paper's correction. Every finished run is appended to ``runs.jsonl`` in
``--work`` at once, so an interrupted benchmark resumes where it stopped. Writes ``RESULTS.md`` and
``runs.json`` to ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parents[1] / "tests"))

from run import machine  # noqa: E402
from runlog import RunLog  # noqa: E402

import emloc  # noqa: E402
from emloc.correction import correct_lora  # noqa: E402
from emloc.data import collate, load_examples  # noqa: E402
from emloc.demo.smollm2 import cache_root  # noqa: E402
from emloc.lora import LoraAdapter  # noqa: E402
from emloc.training import TrainConfig, evaluate, train  # noqa: E402
from emloc.training.config import REFRESHES  # noqa: E402
from emloc.training.schedule import cosine_schedule  # noqa: E402
from vlm_checkpoints import make_vlm_checkpoint  # noqa: E402

# First letters differ, so the first answer token (the tokenizer is character-level here) names the class.
COLOURS = {"red": (210, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (225, 205, 20),
           "purple": (140, 40, 170), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZE = 28  # the tiny CLIP tower's image size: 2 x 2 patches of 14 pixels
PRETRAIN_QUESTION = "What shape is it?"
TASK_QUESTION = "What colour is the shape?"
# The base models: the random-init checkpoint as made, and the same pretrained here on the shape question.
BASES = ("shape-pretrained", "random-init")
# The emulators measured: the language model at ratio 0.5, the vision tower dense or compressed at 0.5.
EMULATORS = {"tower dense": None, "tower 0.5": 0.5}
RATIO = 0.5
# How the emulator's adapter goes onto the original: as trained (emloc's default), or the paper's correction.
CORRECTIONS = {"uncorrected": None, "corrected": 3.0}
BATCH = 16
LORA_R = 8  # the decoder is 48 wide, narrower than emloc's default rank (emloc.ranks.LORA_RANK)
MAX_LENGTH = 64


@dataclass(frozen=True)
class Picture:
    shape: str
    colour: str
    radius: int
    centre: tuple[int, int]
    background: int  # grey level

    @property
    def name(self) -> str:
        return "-".join(map(str, (self.shape, self.colour, self.radius, *self.centre, self.background)))

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), (self.background,) * 3)
        (x, y), r, fill = self.centre, self.radius, COLOURS[self.colour]
        pen = ImageDraw.Draw(image)
        if self.shape == "circle":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif self.shape == "square":
            pen.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        elif self.shape == "triangle":
            pen.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        else:
            pen.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        return image


def _random_picture(rng: random.Random) -> Picture:
    return Picture(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randint(6, 10),
                   (rng.randint(11, 17), rng.randint(11, 17)), rng.randint(190, 255))


def make_splits(train_size: int, test_size: int, seed: int = 1234) -> tuple[list[Picture], list[Picture]]:
    """Disjoint train and held-out pictures (no picture in both), the same for a seed everywhere."""
    rng, pictures = random.Random(f"visual-{seed}"), {}
    while len(pictures) < train_size + test_size:
        pictures.setdefault(_random_picture(rng))
    pictures = list(pictures)
    return pictures[:train_size], pictures[train_size:]


def write_chat(pictures: list[Picture], question: str, answer, path: Path) -> Path:
    """Chat JSONL of one question per picture, the images saved beside it and named relative to it."""
    images = path.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for picture in pictures:
        name = f"images/{picture.name}.png"
        if not (path.parent / name).is_file():
            picture.draw().save(path.parent / name)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": name}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer(picture)}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pretrain(random_dir: Path, data: Path, out_dir: Path, args) -> None:
    """Full fine-tuning of the random-init model on ``data`` (AdamW, cosine schedule), saved with its
    processor to ``out_dir``."""
    processor = transformers.AutoProcessor.from_pretrained(random_dir)
    model = transformers.AutoModelForImageTextToText.from_pretrained(random_dir, dtype=torch.float32).train()
    examples, pad_id = load_examples(data, processor, MAX_LENGTH), processor.tokenizer.pad_token_id
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
    schedule = cosine_schedule(optimizer, args.pretrain_steps, 0.1)
    order = random.Random(0)
    for _ in range(args.pretrain_steps):
        loss = model(**collate(order.sample(examples, BATCH), pad_id)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


class Bench:
    """The shared state of one benchmark run: the data, the base models, the run log."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.work = args, args.work
        self.work.mkdir(parents=True, exist_ok=True)
        self.runs = RunLog(self.work / "runs.jsonl")
        self.pictures = make_splits(args.train_size, args.test_size)
        self.data = self.chat("colour", "train")
        self.random_dir = self.work / "random-init"
        if not (self.random_dir / "config.json").is_file():  # made once: the emulators record its content hash
            make_vlm_checkpoint(self.random_dir, "llava", seed=0)
        self.processor = transformers.AutoProcessor.from_pretrained(self.random_dir)
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.train_examples = load_examples(self.data, self.processor, MAX_LENGTH)
        self.test = self.examples("colour", "test")

    def chat(self, question: str, split: str) -> Path:
        """The data file of ``question`` ("colour" or "shape") on the ``split`` pictures."""
        pictures = self.pictures[split == "test"]
        path = self.work / "data" / f"{question}-{split}.jsonl"
        if question == "colour":
            return write_chat(pictures, TASK_QUESTION, lambda p: p.colour, path)
        return write_chat(pictures, PRETRAIN_QUESTION, lambda p: p.shape, path)

    def examples(self, question: str, split: str) -> list[dict]:
        return load_examples(self.chat(question, split), self.processor, MAX_LENGTH)

    def base(self, name: str) -> Path:
        """The directory of base model ``name`` (:data:`BASES`), pretrained here on first use."""
        if name == "random-init":
            return self.random_dir
        directory = self.work / name
        if f"{name}/pretrain" not in self.runs.done:
            started = time.perf_counter()
            pretrain(self.random_dir, self.chat("shape", "train"), directory, self.args)
            model = transformers.AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
            self.runs.record(f"{name}/pretrain", base=name, row="pretraining", seed=0,
                             eval_exact_match=self.score(model, self.examples("shape", "test")),
                             seconds=time.perf_counter() - started)
        return directory


    def train_config(self, seed: int, output_dir: Path) -> TrainConfig:
        return TrainConfig(output_dir=str(output_dir), max_steps=self.args.steps, micro_batch_size=BATCH,
                           grad_accum=1, learning_rate=self.args.lr, warmup_ratio=0.1, lora_r=LORA_R,
                           lora_alpha=2 * LORA_R, max_length=MAX_LENGTH, gradient_checkpointing=False,
                           eval_fraction=0.0, save_steps=10**9, seed=seed, progress=False,
                           refreshes=self.args.refreshes)  # an emulator's; the original has none to refresh

    def lora(self, model, seed: int, output_dir: Path) -> LoraAdapter:
        """LoRA trained on ``model`` (an original or an emulator) with one seed."""
        result = train(model, self.train_examples, self.train_config(seed, output_dir), tokenizer=self.processor,
                       eval_data=self.test)
        return LoraAdapter.load(result.adapter_dir)

    def score(self, model, examples: list[dict] | None = None) -> float:
        return evaluate(model, self.test if examples is None else examples, BATCH, 1024,
                        self.pad_id)["eval_exact_match"]


def on_original(bench: Bench, model_dir: Path, adapter: LoraAdapter | None) -> float:
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        adapter.apply_to(model)
    return bench.score(model)


def run_base(bench: Bench, base: str) -> None:
    """Every run on one base model: zero-shot, the ceiling's seeds, each emulator's build and seeds."""
    args, work, model_dir = bench.args, bench.work / base, bench.base(base)
    if f"{base}/zero-shot" not in bench.runs.done:
        bench.runs.record(f"{base}/zero-shot", base=base, row="zero-shot", seed=0,
                          eval_exact_match=on_original(bench, model_dir, None), seconds=0.0)
    for seed in range(args.seeds):
        if f"{base}/original/{seed}" not in bench.runs.done:
            started = time.perf_counter()
            model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
            bench.lora(model, seed, work / f"original-{seed}")
            bench.runs.record(f"{base}/original/{seed}", base=base, row="LoRA on original", seed=seed,
                              eval_exact_match=bench.score(model), seconds=time.perf_counter() - started)
    for name, vision_ratio in EMULATORS.items():
        emulator_dir = work / f"emulator-{name.replace(' ', '-')}"
        key = f"{base}/{name}/build"
        if key not in bench.runs.done:
            started = time.perf_counter()
            emloc.build_emulator(model_dir, bench.data, emulator_dir, RATIO, vision_compression=vision_ratio,
                                 max_samples=args.samples, max_length=MAX_LENGTH, batch_size=BATCH, progress=False)
            report = json.loads((emulator_dir / "emloc-report.json").read_text())
            bench.runs.record(key, base=base, row="build", emulator=name, seed=0, seconds=time.perf_counter() - started,
                              share=report["parameters_after"] / report["parameters_before"])
        for seed in range(args.seeds):
            if f"{base}/{name}/{seed}" not in bench.runs.done:
                run_emulator(bench, base, name, emulator_dir, seed)


def run_emulator(bench: Bench, base: str, name: str, emulator_dir: Path, seed: int) -> None:
    """LoRA trained on one emulator with one seed, scored on it and on the original, as trained and corrected."""
    model_dir, started = bench.base(base), time.perf_counter()
    emulator = emloc.load_emulator(emulator_dir)
    trained = bench.lora(emulator, seed, bench.work / base / f"train-{name.replace(' ', '-')}-{seed}")
    scores = {"on emulator": bench.score(emulator)}
    for label, clamp in CORRECTIONS.items():
        adapter = trained if clamp is None else correct_lora(model_dir, trained.trained_on or emulator_dir, trained,
                                                             clamp, progress=False)
        scores[label] = on_original(bench, model_dir, adapter)
    build = bench.runs.done[f"{base}/{name}/build"]["seconds"]
    bench.runs.record(f"{base}/{name}/{seed}", base=base, emulator=name, seed=seed, scores=scores,
                      seconds=time.perf_counter() - started + build)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


LABELS = {"on emulator": "on emulator", "uncorrected": "on original, as trained (emloc's default)",
          "corrected": "on original, paper's correction"}


def table(runs: list[dict], base: str) -> str:
    """The Markdown table of one base: mean ± std over seeds, the share of the ceiling's gain over zero-shot
    kept, the median wall time of a seed's run (for emulator rows: build and training)."""
    mine = [r for r in runs if r.get("base") == base]
    zero = next(r["eval_exact_match"] for r in mine if r.get("row") == "zero-shot")
    originals = [r for r in mine if r.get("row") == "LoRA on original"]
    gain = statistics.fmean(r["eval_exact_match"] for r in originals) - zero
    rows = [("zero-shot", [zero], None),
            ("LoRA on original (ceiling)", [r["eval_exact_match"] for r in originals], originals)]
    for name in EMULATORS:
        trained = [r for r in mine if r.get("emulator") == name and "scores" in r]
        share = next(r["share"] for r in mine if r.get("row") == "build" and r["emulator"] == name)
        for label, text in LABELS.items():
            rows.append((f"decoder {RATIO:g}, {name} ({share:.2f} of the parameters): {text}",
                         [r["scores"][label] for r in trained], trained))
    lines = ["| method | exact match (%) | % of gain kept | seeds | wall (s) |", "| --- | ---: | ---: | ---: | ---: |"]
    for method, values, timed in rows:
        mean, std = _mean_std(values)
        kept = 100 * (mean - zero) / gain if gain > 0 else float("nan")
        wall = "-" if timed is None else f"{statistics.median(r['seconds'] for r in timed):.0f}"
        lines.append(f"| {method} | {100 * mean:.1f} ± {100 * std:.1f} | {kept:.0f} | {len(values)} | {wall} |")
    return "\n".join(lines)


def report(bench: Bench, seconds: float) -> str:
    args, runs = bench.args, list(bench.runs.done.values())
    lines = [f"# Visual quality benchmark: a tiny LLaVA, \"{TASK_QUESTION}\"", "",
             f"LoRA r {LORA_R}, alpha {2 * LORA_R}, {args.steps} steps of {BATCH}, lr {args.lr:g}; emulators "
             f"calibrated on {args.samples} train samples; {args.train_size} train / {args.test_size} held-out "
             f"images; seeds 0..{args.seeds - 1}.", f"Machine: {machine()}. Wall time of every run (pretraining, "
             f"builds, fine-tuning, added up): {sum(r.get('seconds', 0) for r in runs) / 60:.1f} min; this "
             f"invocation {seconds / 60:.1f} min.", ""]
    for base in args.bases:
        lines += [f"### {base}", ""]
        pretrained = bench.runs.done.get(f"{base}/pretrain")
        if pretrained:
            lines += [f"Pretrained in full on \"{PRETRAIN_QUESTION}\" ({args.pretrain_steps} steps of {BATCH}, "
                      f"lr {args.pretrain_lr:g}): held-out shape exact match "
                      f"{100 * pretrained['eval_exact_match']:.1f}%.", ""]
        lines += [table(runs, base), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--steps", type=int, default=1000, help=f"LoRA steps of {BATCH} examples")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--pretrain-steps", type=int, default=1200, help=f"full fine-tuning steps of {BATCH}")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--samples", type=int, default=64, help="calibration samples")
    parser.add_argument("--refreshes", type=int, default=REFRESHES,
                        help="refreshes of the emulator during training (default %(default)s, emloc's)")
    parser.add_argument("--train-size", type=int, default=320)
    parser.add_argument("--test-size", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "visual", help="results (RESULTS.md, runs.json)")
    parser.add_argument("--work", type=Path, default=cache_root() / "visual-work",
                        help="models, emulators, adapters, images and the run log (resumable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("EMLOC_BACKEND", "torch")  # on the CPU the reference is the fast path
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    bench = Bench(args)
    for base in args.bases:
        run_base(bench, base)
    text = report(bench, time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.md").write_text(text)
    (args.out / "runs.json").write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                                 for k, v in vars(args).items()},
                                                    "machine": machine(), "runs": list(bench.runs.done.values())},
                                                   indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
