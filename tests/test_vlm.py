"""Vision-language models end to end: each family's stacks streamed block by block reproduce its logits on
images and text, chat rows with images become processor inputs with labels on the answers, an emulator builds,
loads as the same transformers class, trains, and exports an adapter PEFT loads and merged weights.

Every checkpoint is a tiny random-init model saved by transformers itself; the LLaVA one has a real processor.
The Qwen-VL and InternVL processors need torchvision (their video processors), so those families are checked
through the streamed pass on inputs their image processors make.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file

from emloc import models
from emloc.build import blockwise_logits, build_emulator, load_emulator, plan_compression
from emloc.build.plan import stack_compression
from emloc.calibration import CalibrationBatch
from emloc.data import IGNORE, collate, load_examples
from emloc.errors import BuildError
from emloc.layers import EmulatorLinear
from emloc.lora import LoraAdapter
from emloc.pipeline import run
from emloc.rows import DataError
from emloc.training import TrainConfig
from vlm_checkpoints import VLM_ARCHITECTURES, image_batch, make_image_chat_data, make_vlm_checkpoint

pytestmark = pytest.mark.usefixtures("torch_backend")
transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return make_vlm_checkpoint(root / "model", "llava"), make_image_chat_data(root / "data" / "vqa.jsonl", n=6)


def _logits(model, batch: CalibrationBatch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.images).logits


def _relative(got, want, mask) -> float:
    return float((got[mask] - want[mask]).norm() / want[mask].norm())


def _batches(model_dir, data, size=2):
    from emloc.build.settings import calibration_batches, load_tokenizer
    return calibration_batches(data, load_tokenizer(model_dir, vision_language=True), 8, 512, size, 0)


@pytest.mark.parametrize("arch", [a for a in VLM_ARCHITECTURES if a != "llava"])
def test_streamed_pass_reproduces_logits(tmp_path, arch, seed):
    """The vision blocks then the decoder blocks, one block's weights at a time, give the full model's logits
    on rows with images of different sizes (the model's own merge code joins the streams)."""
    directory = make_vlm_checkpoint(tmp_path / "model", arch, processor=False, seed=seed % 1000)
    inputs = image_batch(arch, directory, [(33, 47), (56, 28), (28, 41)], seed=seed)
    batch = CalibrationBatch(inputs["input_ids"], inputs["attention_mask"], inputs["images"])
    reference = transformers.AutoModelForImageTextToText.from_pretrained(directory).eval()
    streamed = blockwise_logits(directory, [batch], device="cpu")[0]
    assert _relative(streamed, _logits(reference, batch), batch.attention_mask) < 1e-5


def test_streamed_pass_llava_with_processor_data(llava):
    """LLaVA on processor-made batches whose rows carry 0, 1 or 2 images."""
    directory, data = llava
    batches = _batches(directory, data)
    assert len({len(b.images.get("pixel_values", ())) for b in batches}) > 1  # image counts differ
    reference = transformers.AutoModelForImageTextToText.from_pretrained(directory).eval()
    for batch, streamed in zip(batches, blockwise_logits(directory, batches, device="cpu"), strict=True):
        assert _relative(streamed, _logits(reference, batch), batch.attention_mask) < 1e-5


def test_image_rows_labels_and_padding(llava):
    """Labels fall on the answers only; a batch of rows with different image counts holds each row's images."""
    directory, data = llava
    processor = transformers.AutoProcessor.from_pretrained(directory)
    examples = load_examples(data, processor, max_length=512)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for example, row in zip(examples, rows, strict=True):
        answer = [t for t in example["labels"] if t != IGNORE]
        assert processor.tokenizer.decode(answer).strip().startswith(row["messages"][1]["content"])
        images = sum(part["type"] == "image" for part in row["messages"][0]["content"])
        assert len(example["images"].get("pixel_values", ())) == images
        assert example["input_ids"].count(processor.image_token_id) == 4 * images  # 2 x 2 patches per image
    batch = collate(examples, 0)
    assert batch["pixel_values"].shape[0] == sum(len(e["images"].get("pixel_values", ())) for e in examples)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 4 * batch["pixel_values"].shape[0]


@pytest.mark.parametrize("problem", ["missing", "not an image"])
def test_bad_image_is_one_line_error(tmp_path, llava, problem):
    directory, _ = llava
    (tmp_path / "text.png").write_text("not a png")
    name = "absent.png" if problem == "missing" else "text.png"
    row = {"messages": [{"role": "user", "content": [{"type": "image", "path": name}, {"type": "text", "text": "?"}]},
                        {"role": "assistant", "content": "red"}]}
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "ok"}]}) + "\n" + json.dumps(row) + "\n")
    processor = transformers.AutoProcessor.from_pretrained(directory)
    with pytest.raises(DataError) as error:
        load_examples(data, processor)
    message = str(error.value)
    assert "\n" not in message and f"{data}:2" in message and str(tmp_path / name) in message


def test_emulator_at_ratio_one_is_the_original(tmp_path, llava, seed):
    """Nothing compressed: the emulator loads as the same transformers class and gives the original's logits.
    (Ratio 1 on the square attention linears of both stacks keeps them dense; on the MLPs its floored rank
    would still truncate.)"""
    directory, data = llava
    out = build_emulator(directory, data, tmp_path / "emulator", {r".*\.self_attn\..*": 1.0}, device="cpu",
                         progress=False, batch_size=2)
    assert json.loads((out / "emloc-report.json").read_text())["modules"] == {}
    emulator = load_emulator(out)
    assert type(emulator).__name__ == "LlavaForConditionalGeneration"
    reference = transformers.AutoModelForImageTextToText.from_pretrained(directory).eval()
    for batch in _batches(directory, data, size=3):
        assert _relative(_logits(emulator, batch), _logits(reference, batch), batch.attention_mask) < 1e-5


def test_vision_ratio_compresses_the_tower(tmp_path, llava):
    """``vision_compression`` compresses the tower's blocks, ``compression`` the decoder's; the projector
    stays dense; a resumed build of the same settings gives byte-identical shards."""
    directory, data = llava
    out = build_emulator(directory, data, tmp_path / "emulator", 0.5, vision_compression=0.6, device="cpu",
                         progress=False, batch_size=2)
    report = json.loads((out / "emloc-report.json").read_text())["modules"]
    assert any(n.startswith("model.vision_tower.") for n in report)
    assert any(n.startswith("model.language_model.") for n in report)
    assert not any("multi_modal_projector" in n for n in report)
    emulator = load_emulator(out)
    assert isinstance(emulator.get_submodule("model.vision_tower.encoder.layers.0.mlp.fc1"), EmulatorLinear)
    shards = {p.name: load_file(str(p)) for p in out.glob("model-*.safetensors")}
    again = build_emulator(directory, data, out, 0.5, vision_compression=0.6, device="cpu", progress=False,
                           batch_size=2)
    assert all(torch.equal(t, load_file(str(again / name))[k]) for name, s in shards.items() for k, t in s.items())


def test_stacks_and_ratios_per_family(tmp_path):
    """Each family's skeleton has its vision stack then its decoder's; one ratio plans the decoder only, the
    vision ratio the tower; a vision ratio for a text model is an error."""
    for arch in VLM_ARCHITECTURES:
        directory = make_vlm_checkpoint(tmp_path / arch, arch, processor=False)
        skeleton = models.skeleton(models.load_config(directory))
        (vision, tower), (decoder, blocks) = models.block_stacks(skeleton)
        plans = plan_compression(skeleton, stack_compression(skeleton, 0.5))
        assert len(plans) == len(tower) + len(blocks)
        assert not any(plans[:len(tower)]) and all(plans[len(tower):])
        plans = plan_compression(skeleton, stack_compression(skeleton, 0.5, 0.5))
        assert all(plans)
    from checkpoints import make_checkpoint
    text = models.skeleton(models.load_config(make_checkpoint(tmp_path / "text")))
    with pytest.raises(BuildError, match="no vision tower"):
        stack_compression(text, 0.5, 0.5)


def test_run_exports_adapter_and_merged(tmp_path, llava, seed):
    """``emloc run`` on image data: the exported adapter loads on the original VLM with PEFT, every tensor
    in place, and the merged checkpoint gives the PEFT model's logits."""
    import peft

    directory, data = llava
    config = TrainConfig(max_steps=2, micro_batch_size=2, grad_accum=1, learning_rate=5e-3, eval_fraction=0.2,
                         lora_r=8, seed=seed % 1000)  # the tiny decoder is narrower than the default rank
    summary = run(directory, data, tmp_path / "run", 0.5, vision_ratio=0.5, train_config=config, device="cpu",
                  merge=True, progress=False, correction="paper", evaluate_original=False)
    # training refreshed the VLM's emulator (after step 1 of 2), and the correction used that refresh
    trained_on = LoraAdapter.load(tmp_path / "run" / "train" / "adapter").trained_on
    assert trained_on == tmp_path / "run" / "train" / "refresh-1"
    assert re.fullmatch(r"[0-9a-f]{64}", load_emulator(trained_on).config.emloc["adapter"])  # the LoRA's hash
    adapter = tmp_path / "run" / "export" / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved and all(".language_model." in key for key in saved)  # LoRA on the decoder by default
    original = transformers.AutoModelForImageTextToText.from_pretrained(directory).eval()
    batches = _batches(directory, data, size=3)
    before = [_logits(original, batch) for batch in batches]
    peft_model = peft.PeftModel.from_pretrained(original, adapter).eval()
    state = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    merged = transformers.AutoModelForImageTextToText.from_pretrained(summary["outputs"]["merged"]).eval()
    for batch, base in zip(batches, before, strict=True):
        want = _logits(peft_model, batch)
        assert _relative(_logits(merged, batch), want, batch.attention_mask) < 1e-5
        assert _relative(base, want, batch.attention_mask) > 1e-6  # the adapter does change the model


def test_budget_run_plans_and_builds_the_vision_tower(tmp_path, llava, monkeypatch):
    """``run --budget`` on a VLM: the plan covers the tower (its own ratio, its construction), and the build
    follows it: the tower's and the decoder's ranks and the calibration micro-batch are the plan's."""
    from emloc.build import builder
    from emloc.cli import main

    directory, data = llava
    passes = []
    batches = builder.calibration_batches

    def spy_batches(*args):
        made = batches(*args)
        passes.extend(len(b.input_ids) for b in made)
        return made

    monkeypatch.setattr(builder, "calibration_batches", spy_batches)
    out = tmp_path / "run"
    assert main(["run", str(directory), "--data", str(data), "--out", str(out), "--budget", "1000000",
                 "--vision-ratio", "0.5", "--samples", "6", "--no-eval", "--steps", "1", "--batch", "2",
                 "--accum", "1", "--max-length", "64", "--lora-r", "4", "--save-steps", "100",
                 "--eval-fraction", "0.2", "--device", "cpu"]) == 0
    planned = json.loads((out / "summary.json").read_text())["memory_plan"]
    assert 0 < planned["ratio"] < 1 and planned["vision_ratio"] == 0.5
    from emloc.memory import plan

    expected = plan(directory, 1000000, seq_len=64, batch=2, lora_r=4, samples=6, ratio=planned["ratio"],
                    vision_ratio=0.5)
    report = json.loads((out / "emulator" / "emloc-report.json").read_text())["modules"]
    tower, decoder = "model.vision_tower.encoder.layers.", "model.language_model.layers."
    for prefix, stack in ((tower, "vision_tower"), (decoder, "language_model")):
        ranks = {name.split(".", len(prefix.split(".")))[-1]: info["rank"] for name, info in report.items()
                 if name.startswith(prefix)}
        assert ranks == {k: r for k, r in expected.ranks[stack].items() if r is not None}, stack
    assert set(passes) == {planned["settings"]["calibration_micro_batch"]}
    assert planned["settings"]["embeddings_on_device"]  # a VLM's forward looks its embedding up itself
    assert expected.stage("construction").device_peak == planned["device_peak_bytes"]["construction"]
