"""The command line end to end on a tiny model: `emloc run` (build, train, correct, export, summary), its resume
after an interruption, and the same path stage by stage through `emloc train`, `emloc correct`, `emloc export`."""
from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers

from checkpoints import make_chat_data, make_checkpoint
from emloc import cli, pipeline
from emloc.lora import LoraAdapter
from utils import assert_close

TRAIN = ["--steps", "6", "--batch", "2", "--accum", "1", "--lr", "0.02", "--max-length", "256", "--lm-head-chunk",
         "64", "--lora-r", "4", "--lora-alpha", "16", "--save-steps", "3", "--device", "cpu"]


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("EMLOC_BACKEND", "torch")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return make_checkpoint(root / "model", "llama"), make_chat_data(root / "chat.jsonl", n=16, seed=5)


def test_run_resumes_after_an_interruption_and_summarises(inputs, tmp_path, monkeypatch, capsys):
    model, data = inputs
    out = tmp_path / "run"
    argv = ["run", str(model), "--data", str(data), "--out", str(out), "--ratio", "0.5", "--merge",
            "--eval-fraction", "0.25", *TRAIN]
    correct = pipeline.correct_lora

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "correct_lora", broken)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    assert json.loads((out / "run_state.json").read_text())["done"] == ["build", "train"]
    # The rerun must not build or train again.
    monkeypatch.setattr(pipeline, "correct_lora", correct)
    monkeypatch.setattr(pipeline, "build_emulator", broken)
    monkeypatch.setattr(pipeline, "train", broken)
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"]["emulator"] < summary["parameters"]["original"]
    assert summary["train"]["steps"] == 6 and summary["train"]["last_loss"] < summary["train"]["first_loss"]
    before, after = summary["original_eval"]["before"], summary["original_eval"]["after"]
    assert after["eval_loss"] < before["eval_loss"], summary["original_eval"]
    assert "exact match" in printed and "original after" in printed
    print(printed)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "export" / "merged")
    assert merged.config.num_hidden_layers == 2
    other = list(argv)
    other[other.index("--ratio") + 1], other[other.index("--steps") + 1] = "0.6", "7"
    with pytest.raises(SystemExit, match=r"holds a run with other settings \(ratio, train differ\)"):
        cli.main(other)


def test_stage_commands_chain(inputs, tmp_path):
    model, data = inputs
    emulator, train_dir = tmp_path / "emulator", tmp_path / "train"
    assert cli.main(["build", str(model), "--data", str(data), "--out", str(emulator), "--ratio", "0.5",
                     "--device", "cpu"]) == 0
    assert cli.main(["train", str(emulator), "--data", str(data), "--out", str(train_dir), "--rslora", *TRAIN]) == 0
    trained = LoraAdapter.load(train_dir / "adapter")
    assert trained.rslora and trained.scaling == pytest.approx(16 / 2)
    assert cli.main(["correct", str(model), str(emulator), str(train_dir / "adapter"), "--out",
                     str(tmp_path / "corrected")]) == 0
    assert cli.main(["export", str(tmp_path / "corrected"), "--model", str(model), "--out", str(tmp_path / "export"),
                     "--merge"]) == 0
    original = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(original, tmp_path / "export" / "adapter")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged", dtype=torch.float32)
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        assert_close(merged(ids).logits, with_adapter(ids).logits.double(), rtol=1e-5, what="merged vs adapter")


def test_commands_name_bad_input(inputs, tmp_path):
    model, data = inputs
    with pytest.raises(SystemExit, match=r"emloc export: .*adapter_config.json does not exist"):
        cli.main(["export", str(tmp_path / "nothing"), "--model", str(model), "--out", str(tmp_path / "x")])
    emulator = tmp_path / "emulator"
    cli.main(["build", str(model), "--data", str(data), "--out", str(emulator), "--ratio", "0.5", "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"emloc train: add_lora: target 'nothing_proj' matches no linear layer"):
        cli.main(["train", str(emulator), "--data", str(data), "--out", str(tmp_path / "t"),
                  "--target", "nothing_proj", *TRAIN])
