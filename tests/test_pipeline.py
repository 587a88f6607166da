"""The command line end to end on a tiny model: `emloc run` (build, train, correct, export, summary), its resume
after an interruption, and the same path stage by stage through `emloc train`, `emloc correct`, `emloc export`;
runs driven by a device budget follow the memory plan (what the code ran with, and the training step's peak)."""
from __future__ import annotations

import json
import random
import re

import peft
import pytest
import torch
import transformers

from checkpoints import make_chat_data, make_checkpoint, random_sentence
from emloc import cli, pipeline, training
from emloc.build import builder
from emloc.lora import LoraAdapter
from emloc.memory import LiveBytesTracker, parse_bytes, plan
from emloc.training.refresh import refresh_steps
from utils import assert_close, cli_error

TRAIN = ["--steps", "6", "--batch", "2", "--accum", "1", "--lr", "0.02", "--max-length", "256", "--lm-head-chunk",
         "64", "--lora-r", "4", "--lora-alpha", "16", "--save-steps", "3", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("torch_backend")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return make_checkpoint(root / "model", "llama"), make_chat_data(root / "chat.jsonl", n=16, seed=5)


def test_run_resumes_after_an_interruption_and_summarises(inputs, tmp_path, monkeypatch, capsys):
    model, data = inputs
    out = tmp_path / "run"
    argv = ["run", str(model), "--data", str(data), "--out", str(out), "--ratio", "0.5", "--merge",
            "--correction", "paper", "--eval-fraction", "0.25", *TRAIN]
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
    # A run saved before a training option existed resumes: the option then had its default.
    state = json.loads((out / "run_state.json").read_text())
    assert state["settings"]["train"].pop("embeddings_on_device") == training.TrainConfig().embeddings_on_device
    (out / "run_state.json").write_text(json.dumps(state))
    assert cli.main(argv) == 0
    other = list(argv)
    other[other.index("--ratio") + 1], other[other.index("--steps") + 1] = "0.6", "7"
    assert re.search(r"^emloc run: .*holds a run with other settings \(ratio, train differ\)", cli_error(capsys, other))


def test_stage_commands_chain(inputs, tmp_path, capsys):
    model, data = inputs
    emulator, train_dir = tmp_path / "emulator", tmp_path / "train"
    assert cli.main(["build", str(model), "--data", str(data), "--out", str(emulator), "--ratio", "0.5",
                     "--device", "cpu"]) == 0
    assert cli.main(["train", str(emulator), "--data", str(data), "--out", str(train_dir), "--rslora", *TRAIN]) == 0
    trained = LoraAdapter.load(train_dir / "adapter")
    assert trained.rslora and trained.scaling == pytest.approx(16 / 2)
    # training refreshed the emulator: the adapter records the last refresh, and correction needs that one
    trained_on = trained.trained_on
    assert trained_on.parent == train_dir and trained_on.name.startswith("refresh-")
    assert [p.name for p in train_dir.glob("refresh-*")] == [trained_on.name]
    correct = ["correct", str(model), str(emulator), str(train_dir / "adapter"), "--out", str(tmp_path / "corrected")]
    assert re.search(r"^emloc correct: .*trained on .*refresh-", cli_error(capsys, correct))
    correct[2] = str(trained_on)
    assert cli.main(correct) == 0
    assert cli.main(["export", str(tmp_path / "corrected"), "--model", str(model), "--out", str(tmp_path / "export"),
                     "--merge"]) == 0
    original = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(original, tmp_path / "export" / "adapter")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged", dtype=torch.float32)
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        assert_close(merged(ids).logits, with_adapter(ids).logits.double(), rtol=1e-5, what="merged vs adapter")


def test_commands_name_bad_input(inputs, tmp_path, capsys):
    model, data = inputs
    assert re.search(r"^emloc export: .*adapter_config.json does not exist", cli_error(
        capsys, ["export", str(tmp_path / "nothing"), "--model", str(model), "--out", str(tmp_path / "x")]))
    emulator = tmp_path / "emulator"
    cli.main(["build", str(model), "--data", str(data), "--out", str(emulator), "--ratio", "0.5", "--device", "cpu"])
    assert re.search(r"^emloc train: add_lora: target 'nothing_proj' matches no linear layer", cli_error(
        capsys, ["train", str(emulator), "--data", str(data), "--out", str(tmp_path / "t"), "--target", "nothing_proj",
                 *TRAIN]))


# --- runs driven by a device budget ----------------------------------------------------------------------

BUDGET = "5.5MiB"  # small enough that the tiny model needs compressing, a 16-token LM-head chunk and 1 sample per pass


@pytest.fixture(scope="module")
def budget_inputs(tmp_path_factory):
    """A model whose memory the plan models closely (odd MLP width, GQA) and text that fills every example to
    ``max_length``, so the step's tensors have the planned shapes."""
    root = tmp_path_factory.mktemp("budget")
    model = make_checkpoint(root / "model", "qwen2", num_layers=3, hidden_size=128, intermediate_size=353)
    rng = random.Random(3)
    data = root / "long.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(random_sentence(rng) for _ in range(60))}) + "\n"
                            for _ in range(10)))
    return model, data


def _budget_train(steps: int) -> list[str]:
    return ["--steps", str(steps), "--batch", "2", "--accum", "1", "--max-length", "128", "--lora-r", "4",
            "--save-steps", "100", "--eval-fraction", "0.2", "--device", "cpu"]


def test_budget_run_follows_the_plan_and_its_training_peak(budget_inputs, tmp_path, monkeypatch, capsys):
    model, data = budget_inputs
    used = {"calibration_batches": [], "chunks": [], "embedding_on_device": [], "step_peaks": []}
    batches, cross_entropy = builder.calibration_batches, training.loss.lm_head_cross_entropy
    place, step = training.place_input_embedding, training.training_step

    def spy_batches(*args):
        made = batches(*args)
        used["calibration_batches"] += [len(b.input_ids) for b in made]
        return made

    def spy_cross_entropy(hidden, weight, labels, normalizer, chunk=1024, softcap=None, **kwargs):
        used["chunks"].append((hidden.shape[0], chunk))
        return cross_entropy(hidden, weight, labels, normalizer, chunk, softcap, **kwargs)

    def spy_place(model_, on_device):
        used["embedding_on_device"].append(on_device)
        return place(model_, on_device)

    def tracked_step(loss_module, micro, normalizer, optimizer, scheduler, parameters, max_grad_norm):
        # what the device holds when the step starts: the emulator without the input embedding the plan keeps
        # on the host, the optimizer state, the micro-batches
        host = training.host_embedding(loss_module.model, on_device=False).weight
        resident = [t for t in [*loss_module.model.parameters(), *loss_module.model.buffers()] if t is not host]
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        with LiveBytesTracker("cpu") as tracker:
            tracker.adopt([*resident, *state, *(t for batch in micro for t in batch.values())])
            loss = step(loss_module, micro, normalizer, optimizer, scheduler, parameters, max_grad_norm)
        used["step_peaks"].append(tracker.peak)
        return loss

    monkeypatch.setattr(builder, "calibration_batches", spy_batches)
    monkeypatch.setattr(training.loss, "lm_head_cross_entropy", spy_cross_entropy)
    monkeypatch.setattr(training.loop, "place_input_embedding", spy_place)
    monkeypatch.setattr(training.loop, "training_step", tracked_step)
    out = tmp_path / "run"
    assert cli.main(["run", str(model), "--data", str(data), "--out", str(out), "--budget", BUDGET, "--samples", "4",
                     "--no-eval", *_budget_train(2)]) == 0
    printed = capsys.readouterr().out
    planned = json.loads((out / "summary.json").read_text())["memory_plan"]
    settings = planned["settings"]
    assert planned["budget_bytes"] == parse_bytes(BUDGET)
    assert all(peak <= planned["budget_bytes"] for peak in planned["device_peak_bytes"].values())
    # the largest ratio that fits, and the build used it
    assert 0 < planned["ratio"] < 1
    built = json.loads((out / "emulator" / "config.json").read_text())["emloc"]["compression"]
    assert built == {".*": planned["ratio"]}
    assert not plan(model, BUDGET, seq_len=128, batch=2, lora_r=4, samples=4, ratio=planned["ratio"] + 0.001).fits
    # the settings the code actually ran with are the plan's (and not the defaults: 4 samples, 1024 tokens)
    assert settings["calibration_micro_batch"] != 4 and settings["lm_head_chunk"] < 2 * 128
    micro = settings["calibration_micro_batch"]
    # the build and every refresh of the emulator during training calibrate at the plan's micro-batch
    refreshes = len(refresh_steps(2, training.TrainConfig().refreshes))
    assert used["calibration_batches"] == [micro] * (4 // micro) * (1 + refreshes)
    # only target positions reach the LM head (text data: all but the last of each row); the plan counts all
    assert used["chunks"] and all(chunk == (2 * 127, settings["lm_head_chunk"]) for chunk in used["chunks"])
    assert used["embedding_on_device"] == [False] == [settings["embeddings_on_device"]]
    # the second step (optimizer state exists, as in every later one) peaks where the plan says, within 10%
    training_peak = planned["device_peak_bytes"]["training"]
    assert abs(used["step_peaks"][1] - training_peak) / training_peak < 0.10, (used["step_peaks"], training_peak)
    assert "memory plan" in printed and "LM-head chunk" in printed
    print(f"training step peak {used['step_peaks'][1]:,} B, planned {training_peak:,} B")


def test_budget_refusals_name_the_reason_and_write_nothing(budget_inputs, tmp_path, capsys):
    model, data = budget_inputs
    config = training.TrainConfig(max_steps=1, micro_batch_size=2, max_length=128, lora_r=4)
    with pytest.raises(ValueError, match=r"budget 1MiB: nothing fits, not even ratio .*training needs .* MiB"):
        pipeline.run(model, data, tmp_path / "a", train_config=config, budget="1MiB", progress=False)
    with pytest.raises(ValueError, match=r"budget 5.5MiB: ratio 0.9 does not fit: training needs"):
        pipeline.run(model, data, tmp_path / "b", 0.9, train_config=config, budget=BUDGET, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert cli_error(capsys, ["run", str(model), "--data", str(data), "--out", str(tmp_path / "c"), "--budget",
                              "24XB"]).startswith("emloc run: budget: cannot read '24XB'")


def test_build_and_train_commands_follow_the_plan(budget_inputs, tmp_path, capsys):
    model, data = budget_inputs
    emulator_dir, train_dir = tmp_path / "emulator", tmp_path / "train"
    assert cli.main(["build", str(model), "--data", str(data), "--out", str(emulator_dir), "--budget", BUDGET,
                     "--samples", "4", "--max-length", "128", "--lora-r", "8", "--device", "cpu"]) == 0
    built = json.loads((emulator_dir / "config.json").read_text())["emloc"]
    expected = plan(model, BUDGET, seq_len=128, batch=2, lora_r=8, samples=4)
    assert built["compression"] == {".*": expected.ratio}
    assert built["calibration"]["batch_size"] == expected.settings.calibration_micro_batch
    assert "FITS" in capsys.readouterr().out
    assert cli.main(["train", str(emulator_dir), "--data", str(data), "--out", str(train_dir), "--budget", BUDGET,
                     *_budget_train(1)]) == 0
    used = json.loads((train_dir / "train_report.json").read_text())["config"]
    trained = plan(emulator_dir, BUDGET, seq_len=128, batch=2, lora_r=4, ratio=expected.ratio)
    assert used["lm_head_chunk"] == trained.settings.lm_head_chunk and used["embeddings_on_device"] is False
    assert re.search(r"^emloc train: budget 1MiB: ratio .* does not fit: training needs", cli_error(
        capsys, ["train", str(emulator_dir), "--data", str(data), "--out", str(tmp_path / "t"), "--budget", "1MiB",
                 *_budget_train(1)]))
