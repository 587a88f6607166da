"""The built-in demo: task generation and scoring, the shipped checkpoints, and a miniature comparison."""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from emloc.demo.configs import BASELINES, DEFAULT, MODELS
from emloc.demo.task import TaskConfig, encode, exact_match, make_example, make_splits

SMALL_TASK = TaskConfig(train_size=60, test_size=40)


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT.path)


def test_examples_are_valid_python_whose_assertion_holds():
    rng = random.Random(7)
    for _ in range(200):
        example = make_example(rng, TaskConfig())
        exec(example.prompt + example.answer, {})  # the assertion holds with the generated answer
        wrong = f" {int(example.answer) + 1}\n"
        with pytest.raises(AssertionError):
            exec(example.prompt + wrong, {})


def test_splits_are_deterministic_and_disjoint():
    train, test = make_splits(SMALL_TASK)
    assert (train, test) == make_splits(SMALL_TASK)
    assert len(train) == SMALL_TASK.train_size and len(test) == SMALL_TASK.test_size
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    other_train, _ = make_splits(TaskConfig(train_size=60, test_size=40, seed=SMALL_TASK.seed + 1))
    assert other_train != train


class _Oracle(nn.Module):
    """Predicts the next token of its own input (it peeks), except on the answers of chosen rows."""

    def __init__(self, vocab: int, wrong_rows: set[int]):
        super().__init__()
        self.vocab, self.wrong_rows = vocab, wrong_rows

    def forward(self, input_ids, attention_mask):
        target = torch.roll(input_ids, -1, dims=1)
        for row in self.wrong_rows:
            last = int(attention_mask[row].sum()) - 2  # predicts the answer's final token (the newline)
            target[row, last] = (target[row, last] + 1) % self.vocab
        logits = torch.randn(*input_ids.shape, self.vocab)
        logits.scatter_(2, target.unsqueeze(-1), 1e4)
        return type("Output", (), {"logits": logits})


def test_exact_match_counts_whole_answers(demo_tokenizer):
    _, test = make_splits(SMALL_TASK)
    wrong = set(random.Random(3).sample(range(len(test)), 13))
    vocab = len(demo_tokenizer)
    assert exact_match(_Oracle(vocab, set()), demo_tokenizer, test, batch_size=16) == 1.0
    assert exact_match(_Oracle(vocab, wrong), demo_tokenizer, test, batch_size=len(test)) == pytest.approx(
        (len(test) - len(wrong)) / len(test))


def test_encoding_marks_only_answer_tokens(demo_tokenizer):
    train, _ = make_splits(SMALL_TASK)
    batch = encode(demo_tokenizer, train[:9])
    for row, example in enumerate(train[:9]):
        answer = batch["labels"][row][batch["labels"][row] != -100]
        assert demo_tokenizer.decode(answer) == example.answer
        assert int(batch["attention_mask"][row].sum()) == len(
            demo_tokenizer(example.prompt + example.answer, add_special_tokens=False)["input_ids"])


# Documented in docs/demo.md: parameter counts of the shipped checkpoints.
DOCUMENTED_PARAMETERS = {"demo-base": 984_192, "demo-half": 541_536, "demo-quarter": 279_104}


def _linear_parameters(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)


def test_shipped_checkpoints_load_are_pretrained_and_as_documented(demo_tokenizer):
    from transformers import AutoModelForCausalLM

    from emloc.demo.corpus import stdlib_files

    total_bytes = sum(f.stat().st_size for spec in MODELS for f in spec.path.iterdir())
    assert total_bytes <= 20 * 2**20, f"shipped demo checkpoints take {total_bytes / 2**20:.1f} MB > 20 MB"
    text = stdlib_files()[0].read_text()[:2000]  # a standard-library module, as in pretraining
    ids = demo_tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
    linear = {}
    for spec in MODELS:
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32)
        info = json.loads((spec.path / "pretraining.json").read_text())
        count = sum(p.numel() for p in model.parameters())
        assert count == DOCUMENTED_PARAMETERS[spec.name] == info["parameters"], spec.name
        assert model.config.hidden_size == spec.hidden_size and model.config.vocab_size == len(demo_tokenizer)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        # ln(vocab) = 6.93 for a model that learned nothing; pretraining brings it near the held-out loss.
        assert loss < 5.0, f"{spec.name}: loss {loss:.2f} on standard-library text; is it pretrained?"
        linear[spec.name] = _linear_parameters(model)
    for ratio, spec in BASELINES.items():  # each baseline is sized like the emulator it stands beside
        assert abs(linear[spec.name] / linear[DEFAULT.name] - ratio) < 0.05 * ratio + 0.02


def test_miniature_comparison_runs_end_to_end(torch_backend, tmp_path, demo_tokenizer):
    from emloc.demo.compare import EMLOC, ROWS, SMALLER, UNCORRECTED, Settings, compare
    from emloc.demo.diagnose import adapter_agreement, corrected_layer_error
    from emloc.demo.report import format_table, plot, summarize

    settings = Settings(ratios=(0.25,), seeds=(0, 1), steps=2, batch_size=4, calibration_samples=8,
                        task=TaskConfig(train_size=24, test_size=12))
    runs = compare(settings, tmp_path / "work")
    _, test = make_splits(settings.task)
    assert [r.row for r in runs] == [row for row in ROWS for _ in settings.seeds]
    assert all(0.0 <= r.accuracy <= 1.0 and r.seconds > 0 for r in runs)
    peak = {r.row: r.peak_bytes for r in runs if r.seed == 0}
    # The emulator and the smaller model fine-tune in less memory than the original.
    assert peak[UNCORRECTED] == peak[EMLOC] < peak["LoRA on original"]
    assert peak[SMALLER] < peak["LoRA on original"]
    for seed in settings.seeds:
        out = tmp_path / "work" / f"emloc-0.25-seed{seed}"
        assert (out / "corrected" / "adapter_model.safetensors").is_file()
        assert (out / "export").is_dir()
    diagnosis = adapter_agreement(DEFAULT.path, tmp_path / "work" / "emloc-0.25-seed0", demo_tokenizer, test)
    assert all(diagnosis[f"kl {v}"] >= 0 and 0 <= diagnosis[f"agree {v}"] <= 1
               for v in ("no adapter", "uncorrected", "corrected"))
    assert diagnosis["correction_size"] > 0
    assert corrected_layer_error(DEFAULT.path, tmp_path / "work" / "emloc-0.25-seed0", demo_tokenizer, test) > 0
    summaries = summarize(runs)
    assert [s.seeds for s in summaries] == [2] * len(ROWS)
    table = format_table(summaries)
    assert all(row in table for row in ROWS)
    png = plot(summaries, tmp_path / "accuracy.png", "miniature")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
