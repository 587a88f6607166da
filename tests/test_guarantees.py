"""What the README's "Guarantees" promise, on tiny models: nothing emloc reads executes code, weights are
identified by content, adapters by the emulator they were trained on, outputs replace older ones whole, one
writer per output directory, bad input of every kind is one line and exit status 2 before anything is
written, and suspicious input is named where it is."""
from __future__ import annotations

import contextlib
import errno
import importlib
import json
import math
import os
import re
import threading
import warnings

import pytest
import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import emloc
from checkpoints import make_chat_data, make_checkpoint, make_text_data, make_tokenizer
from emloc import cli, files, pipeline, training
from emloc.build import BuildError
from emloc.calibration import load_texts
from emloc.data import load_examples
from emloc.errors import EmlocWarning, UserError
from emloc.locking import output_lock
from emloc.lora import LoraAdapter, lora_modules
from emloc.models import UnsupportedModelError
from emloc.rows import DataError
from emloc.streaming import CheckpointError, CheckpointIndex
from emloc.training import TrainConfig
from emloc.training.checkpoints import read_checkpoint
from utils import cli_error

pytestmark = pytest.mark.usefixtures("torch_backend")

FAST = dict(device="cpu", max_samples=6, max_length=48, batch_size=3, progress=False)
TRAIN = ["--steps", "1", "--batch", "2", "--accum", "1", "--max-length", "64", "--lm-head-chunk", "32", "--lora-r", "2",
         "--save-steps", "1", "--eval-fraction", "0", "--device", "cpu"]
RUN = ["--ratio", "0.5", "--samples", "4", "--no-eval", *TRAIN]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A model, chat data, its emulator, and an adapter trained on that emulator by `emloc train`."""
    root = tmp_path_factory.mktemp("guarantees")
    model = make_checkpoint(root / "model", "llama")
    data = make_chat_data(root / "chat.jsonl", n=8, seed=2)
    emulator = emloc.build_emulator(model, data, root / "emulator", 0.5, **FAST)
    assert cli.main(["train", str(emulator), "--data", str(data), "--out", str(root / "train"), *TRAIN]) == 0
    return {"root": root, "model": model, "data": data, "emulator": emulator, "adapter": root / "train" / "adapter"}


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


def _truncate(path, keep: int = 200):
    path.write_bytes(path.read_bytes()[:keep])


# --- 1. nothing emloc reads executes code -------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a directory: the proof that loading a file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _train_steps(tiny, out, steps, **kw):
    model = emloc.load_emulator(tiny["emulator"])
    config = TrainConfig(output_dir=str(out), max_steps=steps, micro_batch_size=2, grad_accum=1, lora_r=2,
                         max_length=64, lm_head_chunk=32, eval_fraction=0.0, progress=False, lora_dropout=0.1, **kw)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["emulator"])
    return model, training.train(model, tiny["data"], config, tokenizer=tokenizer)


def test_checkpoints_hold_no_pickle_and_a_crafted_one_never_runs(tiny, tmp_path, capsys):
    out = tmp_path / "train"
    _train_steps(tiny, out, 2, save_steps=1)
    checkpoint = out / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["adapter", "state.json", "state.safetensors"]
    marker = tmp_path / "code-ran"
    crafted = out / "checkpoint-9"
    crafted.mkdir()
    torch.save({"step": 9, "history": [_Payload(marker)]}, crafted / "state.pt")
    with pytest.raises(UserError, match=r"checkpoint-9/state\.pt: not a checkpoint emloc reads"):
        _train_steps(tiny, out, 12, save_steps=1)
    assert not marker.exists(), "resuming executed code from the run directory"
    line = cli_error(capsys, ["train", str(tiny["emulator"]), "--data", str(tiny["data"]), "--out", str(out),
                              *TRAIN[:1], "12", *TRAIN[2:]])
    assert "checkpoint-9/state.pt" in line and not marker.exists()


def test_a_checkpoint_of_an_earlier_emloc_resumes_exactly(tiny, tmp_path, monkeypatch):
    straight, straight_result = _train_steps(tiny, tmp_path / "straight", 4, save_steps=2)
    calls, step = [], training.training_step

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(training.loop, "training_step", interrupted)
    out = tmp_path / "legacy"
    with pytest.raises(KeyboardInterrupt):
        _train_steps(tiny, out, 4, save_steps=2)
    monkeypatch.setattr(training.loop, "training_step", step)
    checkpoint = out / "checkpoint-2"
    torch.save(read_checkpoint(checkpoint), checkpoint / "state.pt")  # the format emloc used to write
    (checkpoint / "state.json").unlink()
    (checkpoint / "state.safetensors").unlink()
    resumed, resumed_result = _train_steps(tiny, out, 4, save_steps=2)
    assert resumed_result.losses == straight_result.losses
    for name, module in lora_modules(straight).items():
        assert torch.equal(module.lora_b, lora_modules(resumed)[name].lora_b), name


# --- 2. the source model is identified by its content -------------------------------------------------------


def _rewrite_values(shard):
    """Same names, shapes and dtypes, other values: a model of the same layout."""
    state = load_file(str(shard))
    save_file({k: (v * 1.5 if v.is_floating_point() else v) for k, v in state.items()}, str(shard),
              metadata={"format": "pt"})


def test_content_hash_sees_values_and_is_cached(tmp_path, monkeypatch):
    a = make_checkpoint(tmp_path / "a", "llama", seed=1, tokenizer=False)
    b = make_checkpoint(tmp_path / "b", "llama", seed=2, tokenizer=False)
    assert CheckpointIndex(a).content_hash() != CheckpointIndex(b).content_hash(), "same layout, other values"
    before = CheckpointIndex(a).content_hash()
    real = files.file_sha256
    monkeypatch.setattr(files, "file_sha256", lambda path: pytest.fail(f"{path} read again"))
    assert CheckpointIndex(a).content_hash() == before, "an untouched shard is not read again"
    monkeypatch.setattr(files, "file_sha256", real)
    _rewrite_values(a / "model-00002-of-00002.safetensors")
    assert CheckpointIndex(a).content_hash() != before, "a rewritten shard is hashed again"


def test_correction_refuses_the_emulator_of_a_same_layout_model(tiny, tmp_path, capsys):
    twin = make_checkpoint(tmp_path / "twin", "llama", seed=7)
    line = cli_error(capsys, ["correct", str(twin), str(tiny["emulator"]), str(tiny["adapter"]), "--out",
                              str(tmp_path / "corrected")])
    assert "built from a different model" in line
    assert not (tmp_path / "corrected").exists()
    earlier = tmp_path / "earlier"  # an emulator of an emloc whose source hash saw the layout only
    earlier.mkdir()
    for path in tiny["emulator"].iterdir():
        (earlier / path.name).write_bytes(path.read_bytes())
    config = json.loads((earlier / "config.json").read_text())
    del config["emloc"]["content_hash"]
    (earlier / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"earlier: built by an earlier emloc.*rebuild it"):
        emloc.correct_lora(tiny["model"], earlier, tiny["adapter"], progress=False)


def test_a_build_resumed_on_changed_weights_is_refused(tmp_path, monkeypatch):
    source = make_checkpoint(tmp_path / "src", "llama")
    data = make_text_data(tmp_path / "d.jsonl", 6)
    real, calls = emloc.build.builder.compress_block, []

    def crash_on_second_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(emloc.build.builder, "compress_block", crash_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        emloc.build_emulator(source, data, tmp_path / "emu", 0.5, **FAST)
    monkeypatch.setattr(emloc.build.builder, "compress_block", real)
    _rewrite_values(source / "model-00002-of-00002.safetensors")
    with pytest.raises(BuildError, match=r"other settings \(source\)"):
        emloc.build_emulator(source, data, tmp_path / "emu", 0.5, **FAST)


# --- 3. an adapter is corrected only with the emulator it was trained on ------------------------------------


def test_correction_refuses_an_adapter_trained_on_another_emulator(tiny, tmp_path, capsys):
    recorded = LoraAdapter.load(tiny["adapter"]).extra["emulator"]
    config = json.loads((tiny["emulator"] / "config.json").read_text())["emloc"]
    assert recorded["content_hash"] == config["content_hash"]
    other = emloc.build_emulator(tiny["model"], tiny["data"], tmp_path / "other", 0.3, **FAST)
    line = cli_error(capsys, ["correct", str(tiny["model"]), str(other), str(tiny["adapter"]), "--out",
                              str(tmp_path / "corrected")])
    assert f"the adapter was trained on {tiny['emulator']}" in line and str(other) in line
    with pytest.raises(UserError, match="the adapter was trained on"):
        emloc.correct_lora(tiny["model"], other, tiny["adapter"], progress=False)
    assert cli.main(["correct", str(tiny["model"]), str(tiny["emulator"]), str(tiny["adapter"]), "--out",
                     str(tmp_path / "corrected")]) == 0


# --- 4. outputs replace older ones whole -------------------------------------------------------------------


def test_export_replaces_an_older_merged_model_and_adapter(tiny, tmp_path):
    out = tmp_path / "export"
    stale = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    stale.save_pretrained(out / "merged")  # one model.safetensors, which from_pretrained prefers to shards
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "adapter" / "adapter_model.bin").write_bytes(b"stale")
    assert cli.main(["export", str(tiny["adapter"]), "--model", str(tiny["model"]), "--out", str(out), "--merge"]) == 0
    fresh = emloc.export(tiny["adapter"], tiny["model"], tmp_path / "fresh", merge=True, progress=False)
    assert _tree(out) == _tree(fresh), "nothing of the older export may stay"
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).state_dict()
    expected = transformers.AutoModelForCausalLM.from_pretrained(fresh / "merged", dtype=torch.float32).state_dict()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert any(not torch.equal(merged[k], v) for k, v in stale.state_dict().items()), "the stale weights loaded"


def test_a_directory_of_other_files_is_never_replaced(tiny, tmp_path, capsys):
    out = tmp_path / "export"
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "notes.txt").write_text("keep me")
    line = cli_error(capsys, ["export", str(tiny["adapter"]), "--model", str(tiny["model"]), "--out", str(out),
                              "--merge"])
    assert "merged: exists, is not empty and holds no config.json" in line
    assert (out / "merged" / "notes.txt").read_text() == "keep me"


# --- 5. one writer per output directory --------------------------------------------------------------------


@contextlib.contextmanager
def _held(directory):
    """Hold ``directory``'s lock from another thread, as a second emloc process would."""
    ready, release = threading.Event(), threading.Event()

    def hold():
        with output_lock(directory):
            ready.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    assert ready.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join()


@pytest.mark.parametrize("command", ["build", "train", "correct", "export", "run"])
def test_a_second_writer_fails_at_once_naming_the_holder(tiny, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = {
        "build": ["build", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out), "--overwrite"],
        "train": ["train", str(tiny["emulator"]), "--data", str(tiny["data"]), "--out", str(out), *TRAIN],
        "correct": ["correct", str(tiny["model"]), str(tiny["emulator"]), str(tiny["adapter"]), "--out", str(out)],
        "export": ["export", str(tiny["adapter"]), "--model", str(tiny["model"]), "--out", str(out), "--merge"],
        "run": ["run", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out), *RUN],
    }[command]
    with _held(out):
        line = cli_error(capsys, argv)
    assert re.search(rf"{re.escape(str(out))}: another emloc process is writing it \(pid {os.getpid()} on ", line)
    assert not out.exists(), "the refused command wrote into the directory"


def test_two_builds_into_one_directory_do_not_interleave(tiny, tmp_path, monkeypatch, capsys):
    out, inside, go_on = tmp_path / "emu", threading.Event(), threading.Event()
    real = emloc.build.builder.compress_block

    def slow(*args, **kwargs):  # the first build pauses in its first block, the directory half written
        inside.set()
        go_on.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(emloc.build.builder, "compress_block", slow)
    first = threading.Thread(target=emloc.build_emulator, args=(tiny["model"], tiny["data"], out, 0.5), kwargs=FAST)
    first.start()
    assert inside.wait(60)
    line = cli_error(capsys, ["build", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out),
                              "--ratio", "0.3", "--overwrite", "--device", "cpu"])
    go_on.set()
    first.join()
    assert "another emloc process is writing it" in line
    assert json.loads((out / "config.json").read_text())["emloc"]["compression"] == {".*": 0.5}
    emloc.load_emulator(out)


# --- 6. data rows that are not what they seem --------------------------------------------------------------


@pytest.mark.parametrize("row, match", [
    ({"text": None}, r"'text' must be a string, got null"),
    ({"text": 123}, r"'text' must be a string, got 123"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] needs string 'role' and 'content'"),
    ({"messages": "hello"}, r"'messages' must be a list of messages"),
    ({"conversations": [{"from": "human"}]}, r"conversations\[0\] needs string 'from' and 'value'"),
])
def test_malformed_rows_are_named_by_file_and_line(tiny, tmp_path, row, match):
    path = tmp_path / "rows.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the model"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["model"])
    with pytest.raises(DataError, match=rf"rows\.jsonl:2: {match}"):
        load_examples(path, tokenizer)
    with pytest.raises(DataError, match=rf"rows\.jsonl:2: {match}"):
        load_texts(path, tokenizer)


# --- 7. every command reports bad files and output paths in one line ---------------------------------------


def _commands(tiny, out, model=None, emulator=None, adapter=None):
    model, emulator, adapter = model or tiny["model"], emulator or tiny["emulator"], adapter or tiny["adapter"]
    return {
        "build": ["build", str(model), "--data", str(tiny["data"]), "--out", str(out), "--device", "cpu"],
        "train": ["train", str(emulator), "--data", str(tiny["data"]), "--out", str(out), *TRAIN],
        "correct": ["correct", str(model), str(emulator), str(adapter), "--out", str(out)],
        "export": ["export", str(adapter), "--model", str(model), "--out", str(out), "--merge"],
        "run": ["run", str(model), "--data", str(tiny["data"]), "--out", str(out), *RUN],
    }


@pytest.mark.parametrize("damage", ["header cut", "data cut", "missing"])
def test_a_damaged_shard_is_named(tiny, tmp_path, capsys, damage):
    model = tmp_path / "model"
    model.mkdir()
    for path in tiny["model"].iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    shard = model / "model-00002-of-00002.safetensors"
    if damage == "missing":
        shard.unlink()
    else:
        _truncate(shard, 200 if damage == "header cut" else shard.stat().st_size - 100)
    commands = _commands(tiny, tmp_path / "out", model=model)
    for name in ("correct", "export", "run", "build"):
        line = cli_error(capsys, commands[name])
        assert line.startswith(f"emloc {name}: ") and "model-00002-of-00002.safetensors" in line, line


def test_a_truncated_emulator_shard_and_adapter_are_named(tiny, tmp_path, capsys):
    emulator, adapter = tmp_path / "emulator", tmp_path / "adapter"
    for source, copy in ((tiny["emulator"], emulator), (tiny["adapter"], adapter)):
        copy.mkdir()
        for path in source.iterdir():
            if path.is_file():
                (copy / path.name).write_bytes(path.read_bytes())
    _truncate(emulator / "model-00003-of-00003.safetensors")
    _truncate(adapter / "adapter_model.safetensors", 40)
    commands = _commands(tiny, tmp_path / "out", emulator=emulator, adapter=adapter)
    assert "model-00003-of-00003.safetensors" in cli_error(capsys, commands["train"])
    for name in ("correct", "export"):
        assert "adapter_model.safetensors" in cli_error(capsys, commands[name])


def test_a_full_disk_is_named_and_leaves_the_old_output(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "export"
    assert cli.main(_commands(tiny, out)["export"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(importlib.import_module("emloc.export"), "save_file", full)
    line = cli_error(capsys, _commands(tiny, out)["export"])
    assert re.fullmatch(rf"emloc export: {re.escape(str(out / 'merged'))}: cannot write it \(.*No space left on "
                        r"device \(os error 28\)\)", line), line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "the old export must stay whole"


@pytest.mark.parametrize("command", ["build", "train", "correct", "export", "run"])
def test_an_output_path_that_cannot_be_written_is_named(tiny, tmp_path, capsys, monkeypatch, command):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, reason in ((a_file, "exists and is not a directory"), (a_file / "sub", "cannot write the output there"),
                        ("/proc/emloc-out", "cannot write the output there")):
        line = cli_error(capsys, _commands(tiny, out)[command])
        assert line.startswith(f"emloc {command}: {out}: {reason}"), line
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(emloc.locking.os, "open", read_only)
    line = cli_error(capsys, _commands(tiny, tmp_path / "ro")[command])
    assert line == f"emloc {command}: {tmp_path / 'ro'}: cannot write the output there (Read-only file system)"


def test_plan_and_demo_report_bad_input_in_one_line(capsys):
    assert cli_error(capsys, ["plan", "Llama-3.1-70B", "--budget", "24XB"]).startswith(
        "emloc plan: budget: cannot read '24XB'")
    assert cli_error(capsys, ["demo", "--seeds", "0"]).startswith("emloc demo: argument --seeds: must be an integer")


# --- 8. emloc run accepts the --overwrite it suggests ------------------------------------------------------


def test_run_accepts_the_overwrite_it_suggests(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "emulator").mkdir(parents=True)
    (out / "emulator" / "notes.txt").write_text("left here")
    argv = ["run", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out), *RUN]
    assert "--overwrite" in cli_error(capsys, argv)
    assert cli.main([*argv, "--overwrite"]) == 0
    other = [*argv[:argv.index("--ratio") + 1], "0.6", *argv[argv.index("--ratio") + 2:]]
    assert "--overwrite" in cli_error(capsys, other)
    assert cli.main([*other, "--overwrite"]) == 0
    state = json.loads((out / "run_state.json").read_text())
    assert state["settings"]["ratio"] == 0.6 and state["done"] == ["build", "correct", "export", "train"]
    assert json.loads((out / "emulator" / "config.json").read_text())["emloc"]["compression"] == {".*": 0.6}


# --- 9. an unsupported architecture is refused before anything is written ----------------------------------


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_unsupported_architectures_are_refused_before_writing(tmp_path, capsys, family):
    model = tmp_path / family
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64)
        transformers.GPT2LMHeadModel(config).save_pretrained(model)
    else:
        config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=256)
        transformers.BertForMaskedLM(config).save_pretrained(model)
    make_tokenizer(model)
    data = make_text_data(tmp_path / "d.jsonl", 4)
    with pytest.raises(UnsupportedModelError, match=rf"unsupported architecture '{family}'; supported: llama, "):
        emloc.build_emulator(model, data, tmp_path / "emu", **FAST)
    for command in ("build", "run"):
        argv = [command, str(model), "--data", str(data), "--out", str(tmp_path / "out")]
        assert f"'{family}'; supported: llama" in cli_error(capsys, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([family, "d.jsonl"]), "something was written"


# --- 10. numbers out of range -----------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [("--samples", "0"), ("--samples", "-1"), ("--batch", "-1"),
                                           ("--batch", "0"), ("--max-length", "0")])
def test_build_options_out_of_range_are_refused(tiny, tmp_path, capsys, option, value):
    line = cli_error(capsys, [*_commands(tiny, tmp_path / "out")["build"], option, value])
    assert line.startswith(f"emloc build: argument {option}: must be an integer of at least 1, got '{value}'")
    assert not (tmp_path / "out").exists()


def test_numbers_out_of_range_are_refused_by_the_api_and_run(tiny, tmp_path, capsys):
    for name, kwargs in (("max_samples", {"max_samples": 0}), ("batch_size", {"batch_size": -1}),
                         ("max_length", {"max_length": 0})):
        with pytest.raises(BuildError, match=rf"{name}: must be an integer of at least 1"):
            emloc.build_emulator(tiny["model"], tiny["data"], tmp_path / "emu", **{**FAST, **kwargs})
    with pytest.raises(UserError, match=r"ratio: compression ratio must be in \(0, 1\], got nan"):
        pipeline.run(tiny["model"], tiny["data"], tmp_path / "run", math.nan, progress=False)
    line = cli_error(capsys, ["run", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(tmp_path / "run"),
                              "--ratio", "nan"])
    assert line == "emloc run: ratio: compression ratio must be in (0, 1], got nan"
    assert "argument --samples" in cli_error(capsys, [*_commands(tiny, tmp_path / "run")["run"], "--samples", "0"])
    for field, value in (("save_steps", 0), ("max_length", 0), ("learning_rate", math.nan), ("eval_fraction", 1.0)):
        with pytest.raises(UserError, match=rf"TrainConfig\.{field}: must be"):
            TrainConfig(**{field: value})
    assert not (tmp_path / "emu").exists() and not (tmp_path / "run").exists()


# --- 11. the LoRA target is checked against the model first -----------------------------------------------


def test_a_target_that_matches_nothing_is_refused_before_the_build(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "build_emulator", lambda *a, **k: pytest.fail("the build ran"))
    for target, message in (("nothing_proj", "matches no linear layer"), ("(", "not a valid regular expression")):
        line = cli_error(capsys, [*_commands(tiny, tmp_path / "run")["run"], "--target", target])
        assert line.startswith(f"emloc run: add_lora: target {target!r} ") and message in line
    assert not (tmp_path / "run").exists()


# --- 12. too few calibration tokens ------------------------------------------------------------------------


def test_fewer_calibration_tokens_than_features_warn_with_the_numbers(tiny, tmp_path, capsys):
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "the model learns fast"}) + "\n")
    tokens = len(transformers.AutoTokenizer.from_pretrained(tiny["model"])("the model learns fast")["input_ids"])
    assert tokens < 64
    with pytest.warns(EmlocWarning, match=rf"calibration: {tokens} tokens, fewer than the features of "
                                          r"self_attn\.q_proj \(64 input features\)"):
        emloc.build_emulator(tiny["model"], short, tmp_path / "emu", 0.5, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmlocWarning)  # enough tokens: no warning
        emloc.build_emulator(tiny["model"], tiny["data"], tmp_path / "enough", 0.5, **FAST)
    assert main_warning(capsys, tiny, short, tmp_path / "cli").startswith(f"emloc build: warning: calibration: "
                                                                          f"{tokens} tokens")


def main_warning(capsys, tiny, data, out) -> str:
    capsys.readouterr()
    assert cli.main(["build", str(tiny["model"]), "--data", str(data), "--out", str(out), "--device", "cpu"]) == 0
    return capsys.readouterr().err.strip()


# --- 13. a non-finite weight is named as itself ------------------------------------------------------------


def test_a_non_finite_weight_is_named_when_its_block_loads(tmp_path, capsys):
    source = make_checkpoint(tmp_path / "src", "llama", num_layers=3)
    shard = source / "model-00002-of-00002.safetensors"
    state = load_file(str(shard))
    state["model.layers.2.mlp.up_proj.weight"][5, 7] = float("nan")
    save_file(state, str(shard), metadata={"format": "pt"})
    out = tmp_path / "emu"
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: model\.layers\.2\.mlp\.up_proj\."
                                              r"weight holds NaN or Inf \(1 of \d+ values"):
        emloc.build_emulator(source, make_text_data(tmp_path / "d.jsonl", 4), out, **FAST)
    assert sorted(json.loads((out / "emloc-manifest.json").read_text())["done"]) == [
        "model.layers.0", "model.layers.1", "outer"], "the blocks before it are kept"
    line = cli_error(capsys, ["build", str(source), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "cli"),
                              "--device", "cpu", "--samples", "6", "--max-length", "48"])
    assert "model.layers.2.mlp.up_proj.weight holds NaN or Inf" in line
