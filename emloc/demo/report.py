"""The comparison's results as a table (Markdown) and a bar chart (PNG)."""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Run:
    """One fine-tuning (or zero-shot) run of one row, at one compression ratio, with one seed."""

    row: str
    ratio: float
    seed: int
    accuracy: float
    peak_bytes: int | None
    seconds: float


@dataclass(frozen=True)
class Summary:
    """A row of the table: the runs of one method at one ratio, over seeds."""

    row: str
    ratio: float
    accuracy_mean: float
    accuracy_std: float
    seeds: int
    peak_bytes: int | None
    seconds: float


def summarize(runs: list[Run]) -> list[Summary]:
    """Group ``runs`` by (ratio, row), keeping first-seen order: mean and standard deviation of accuracy
    over seeds, the largest peak memory, the median wall time."""
    groups: dict[tuple[float, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.ratio, run.row].append(run)
    summaries = []
    for (ratio, row), group in groups.items():
        accuracies = [run.accuracy for run in group]
        peaks = [run.peak_bytes for run in group if run.peak_bytes is not None]
        summaries.append(Summary(
            row=row, ratio=ratio, accuracy_mean=statistics.fmean(accuracies),
            accuracy_std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0, seeds=len(group),
            peak_bytes=max(peaks) if peaks else None, seconds=statistics.median(run.seconds for run in group)))
    return summaries


def format_table(summaries: list[Summary]) -> str:
    """A Markdown table: one block of rows per compression ratio."""
    lines = ["| ratio | method | exact match (%) | seeds | fine-tuning peak memory (MB) | wall time (s) |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for s in summaries:
        memory = "-" if s.peak_bytes is None else f"{s.peak_bytes / 2**20:.2f}"
        lines.append(f"| {s.ratio:g} | {s.row} | {100 * s.accuracy_mean:.1f} ± {100 * s.accuracy_std:.1f} | "
                     f"{s.seeds} | {memory} | {s.seconds:.1f} |")
    return "\n".join(lines)


def plot(summaries: list[Summary], path: Path, title: str) -> Path:
    """Grouped bars of mean accuracy per method, one group per ratio, error bars one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    ratios = list(dict.fromkeys(s.ratio for s in summaries))
    rows = list(dict.fromkeys(s.row for s in summaries))
    by_key = {(s.ratio, s.row): s for s in summaries}
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j, ratio in enumerate(ratios) if (ratio, row) in by_key]
        found = [by_key[ratio, row] for ratio in ratios if (ratio, row) in by_key]
        ax.bar(xs, [100 * s.accuracy_mean for s in found], width, yerr=[100 * s.accuracy_std for s in found],
               capsize=3, label=row)
    ax.set_xticks(range(len(ratios)), [f"compression ratio {r:g}" for r in ratios])
    ax.set_ylabel("exact match on the test split (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
