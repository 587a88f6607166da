"""Quality benchmark: the demo's comparison at a larger scale, written to benchmarks/quality/RESULTS.md.

    python benchmarks/quality/run.py [--seeds 5] [--steps 300] [--test-size 1000] [--train-size 4000]

More seeds, more training programs and a larger test split than ``emloc demo``, and, for the first seed, the
diagnosis of :mod:`emloc.demo.diagnose` (how closely each adapter on the original model reproduces the
fine-tuned emulator). The results file records the machine it ran on.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def machine() -> str:
    """One line naming the hardware and software the numbers come from."""
    cpu = f"CPU ({platform.processor() or platform.machine()})"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    return (f"{device}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}, {platform.system()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as emloc demo)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        os.environ.setdefault("EMLOC_BACKEND", "torch")  # the interpreter is for tests, not for timing
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from emloc.demo.compare import Comparison, Settings
    from emloc.demo.diagnose import adapter_agreement
    from emloc.demo.report import format_table, plot, summarize
    from emloc.demo.task import TaskConfig

    settings = Settings(seeds=tuple(range(args.seeds)), steps=args.steps,
                        task=TaskConfig(train_size=args.train_size, test_size=args.test_size))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="emloc-quality-") as tmp:
        comparison = Comparison(settings, Path(tmp))
        runs = comparison.run_all()
        diagnoses = {ratio: adapter_agreement(settings.model.path, Path(tmp) / f"emloc-{ratio:g}-seed0",
                                              comparison.tokenizer, comparison.test) for ratio in settings.ratios}
    minutes = (time.perf_counter() - start) / 60
    summaries = summarize(runs)
    plot(summaries, args.output.with_suffix(".png"), f"{settings.model.name}: {args.seeds} seeds, {args.steps} steps")
    lines = [
        "# Quality benchmark results", "",
        f"Machine: {machine()}. Total time {minutes:.1f} min.", "",
        f"Task: {args.train_size} training programs, {args.test_size} held-out test programs; LoRA rank "
        f"{settings.lora_r}, alpha {settings.lora_alpha:g}, {args.steps} steps of {settings.batch_size}, "
        f"lr {settings.learning_rate:g}; {args.seeds} seeds (mean ± standard deviation).", "",
        format_table(summaries), "",
        "Diagnosis (seed 0): divergence of the original model, with each adapter, from the fine-tuned emulator on "
        "the test answers (mean KL in nats per answer token; agreement of the most likely token), and the "
        "correction's size relative to the trained update ||s B A||.", "",
        "| ratio | correction size | KL no adapter | KL uncorrected | KL corrected | agree uncorrected | "
        "agree corrected |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ratio, d in diagnoses.items():
        lines.append(f"| {ratio:g} | {d['correction_size']:.3f} | {d['kl no adapter']:.3f} | "
                     f"{d['kl uncorrected']:.3f} | {d['kl corrected']:.3f} | {100 * d['agree uncorrected']:.1f}% | "
                     f"{100 * d['agree corrected']:.1f}% |")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
