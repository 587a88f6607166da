"""Training LoRA on an emulator: answer-only labels, the optimizer step (only LoRA moves; accumulation,
checkpointing and resume give the same weights), the schedule, the exact-match metric against greedy
generation, the HF Trainer path and bad data. Tiny models; the kernels run the torch backend
(their Triton forms are tested on their own; interpreted, they would only slow these loops down)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from checkpoints import make_chat_data, make_checkpoint, make_text_data
from emloc import EmulatorLinear, training
from emloc.data import IGNORE, collate, load_examples, target_tokens
from emloc.lora import LoraAdapter, add_lora, lora_parameters
from emloc.ranks import LORA_RANK
from emloc.rows import DataError
from emloc.training import CausalLMLoss, TrainConfig, cosine_schedule, evaluate, train, training_step
from emloc_kernels import lm_head_cross_entropy
from emulators import emulate_in_memory, load_tiny
from utils import assert_close

TINY = {"max_length": 256, "progress": False, "lm_head_chunk": 37, "eval_fraction": 0.0}


pytestmark = pytest.mark.usefixtures("torch_backend")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = make_checkpoint(root / "model", "llama")
    chat = make_chat_data(root / "chat.jsonl", n=12, seed=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model_dir, chat, tokenizer


def emulator(model_dir, dtype=torch.float32):
    return emulate_in_memory(load_tiny(model_dir, dtype))


def test_chat_labels_cover_exactly_the_answers(tiny):
    model_dir, chat, tokenizer = tiny
    rows = [json.loads(line) for line in chat.read_text().splitlines()]
    for row, example in zip(rows, load_examples(chat, tokenizer, 256), strict=False):
        answer = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE]
        assert tokenizer.decode(answer) == row["messages"][1]["content"] + "</s>"
        assert all(label in (IGNORE, t) for t, label in zip(example["input_ids"], example["labels"], strict=True))


def test_multi_turn_sharegpt_labels_cover_every_answer(tiny, tmp_path):
    _, _, tokenizer = tiny
    turns = [("human", "the data is big."), ("gpt", "a small model."), ("human", "and the rank?"),
             ("gpt", "rank of the matrix.")]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": f, "value": v} for f, v in turns]}) + "\n")
    (example,) = load_examples(path, tokenizer, 256)
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    assert spans + ([tokenizer.decode(current)] if current else []) == ["a small model.</s>", "rank of the matrix.</s>"]


def test_training_moves_only_lora_and_lowers_the_loss(tiny, tmp_path):
    model_dir, chat, tokenizer = tiny
    model = emulator(model_dir)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(output_dir=str(tmp_path), max_steps=8, micro_batch_size=2, grad_accum=2,
                         learning_rate=2e-2, warmup_ratio=0.25, **TINY)
    result = train(model, chat, config, tokenizer=tokenizer)
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    for name, value in model.state_dict().items():
        if ".lora_" in name:
            assert name not in frozen
        else:
            assert torch.equal(value, frozen[name]), f"{name} changed: only LoRA weights may train"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a" in n or ".lora_b" in n for n in trainable)
    adapter = LoraAdapter.load(tmp_path / "adapter")
    assert len(adapter.weights) == 14 and adapter.r == LORA_RANK and adapter.scaling == 1.0
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["losses"] == result.losses


def lora_state(model):
    return torch.cat([p.detach().reshape(-1) for p in lora_parameters(model)])


def run_steps(model_dir, chat, tokenizer, out=None, **overrides):
    model = emulator(model_dir)
    settings = dict(max_steps=3, micro_batch_size=2, grad_accum=2, learning_rate=1e-2, seed=7, **TINY)
    settings.update(overrides)
    result = train(model, chat, TrainConfig(output_dir=out and str(out), **settings), tokenizer=tokenizer)
    return model, result


def test_accumulation_and_checkpointing_give_the_same_weights(tiny):
    model_dir, chat, tokenizer = tiny
    reference, _ = run_steps(model_dir, chat, tokenizer, micro_batch_size=4, grad_accum=1,
                             gradient_checkpointing=False)
    accumulated, _ = run_steps(model_dir, chat, tokenizer, micro_batch_size=1, grad_accum=4)
    assert_close(lora_state(accumulated), lora_state(reference), rtol=1e-5, what="LoRA after accumulation")


def test_resume_continues_exactly(tiny, tmp_path, monkeypatch):
    model_dir, chat, tokenizer = tiny
    settings = dict(max_steps=4, save_steps=2, lora_dropout=0.1)
    straight, straight_result = run_steps(model_dir, chat, tokenizer, **settings)

    calls = []
    step = training.training_step

    def interrupted(*args, **kwargs):  # the run dies during its third step
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(training.loop, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_steps(model_dir, chat, tokenizer, out=tmp_path, **settings)
    monkeypatch.setattr(training.loop, "training_step", step)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]
    resumed, resumed_result = run_steps(model_dir, chat, tokenizer, out=tmp_path, **settings)
    assert_close(lora_state(resumed), lora_state(straight), rtol=1e-6, what="resumed LoRA weights")
    assert resumed_result.losses == pytest.approx(straight_result.losses, rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoint-4", "train_report.json"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_lora(tiny, dtype):
    model_dir, chat, tokenizer = tiny
    model = emulator(model_dir, dtype)
    result = train(model, chat, TrainConfig(max_steps=2, micro_batch_size=2, grad_accum=1, learning_rate=1e-2,
                                            **TINY), tokenizer=tokenizer)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))  # so AdamW's state is fp32 too
    assert next(m for m in model.modules() if hasattr(m, "u")).u.dtype == dtype
    assert all(math.isfinite(x) for x in result.losses) and abs(lora_state(model)).sum() > 0


def test_step_clips_the_accumulated_gradient(tiny):
    model_dir, chat, tokenizer = tiny
    model = emulator(model_dir)
    add_lora(model, r=4)
    with torch.no_grad():
        for p in lora_parameters(model)[1::2]:
            p.normal_()  # non-zero B: every LoRA weight gets a gradient
    examples = load_examples(chat, tokenizer, 256)[:4]
    micro = [collate(examples[:2]), collate(examples[2:])]
    before = lora_state(model).clone()
    with torch.no_grad():
        expected = model(**collate(examples)).loss  # HF: mean over the target tokens of the whole batch
    optimizer = torch.optim.SGD(lora_parameters(model), lr=1.0)  # the update is minus the clipped gradient
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss = training_step(CausalLMLoss(model, 64), micro, target_tokens(examples), optimizer, scheduler,
                         lora_parameters(model), max_grad_norm=1e-3)
    assert torch.linalg.vector_norm(lora_state(model) - before).item() == pytest.approx(1e-3, rel=1e-4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "phi3", "qwen3"])
def test_loss_module_matches_hf_loss_across_architectures(tmp_path, arch):
    """Soft-capped (Gemma 2), fused-projection (Phi-3) and plain heads: the chunked loss is the model's own."""
    model_dir = make_checkpoint(tmp_path / arch, arch)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(make_chat_data(tmp_path / "chat.jsonl", n=3), tokenizer, 256)
    model = emulator(model_dir)
    batch = collate(examples)
    with torch.no_grad():
        expected = model(**batch).loss
        loss, _ = CausalLMLoss(model, chunk=23)(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 target_tokens(examples))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("arch, tied", [("llama", False), ("gemma2", True)])
def test_input_embedding_stays_on_the_host_unless_tied(tmp_path, arch, tied):
    """The memory plan keeps an untied input embedding on the host in training; a tied one is the LM head."""
    model_dir = make_checkpoint(tmp_path / arch, arch)
    model = emulator(model_dir)
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    assert training.host_embedding(model, on_device=True) is None
    assert training.place_input_embedding(model, on_device=False) == (not tied)
    assert (training.host_embedding(model, on_device=False) is model.get_input_embeddings()) == (not tied)
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied  # tie survives
    examples = load_examples(make_chat_data(tmp_path / "chat.jsonl", n=3), transformers.AutoTokenizer.from_pretrained(
        model_dir), 256)
    batch = collate(examples)
    with torch.no_grad():  # looked up where it lives, then the model's own loss
        expected = model(**batch).loss
        loss, _ = CausalLMLoss(model, chunk=23)(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 target_tokens(examples))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cosine_schedule_with_warmup():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=2.0)
    scheduler = cosine_schedule(optimizer, total_steps=100, warmup_ratio=0.03)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([2 / 3, 4 / 3, 2.0])
    assert lrs[3 + 97 // 2] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * (97 // 2) / 97)))
    assert lrs[-1] < 2.0 * 1e-3 and all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))


@pytest.mark.parametrize("total,ratio", [(500, 0.03), (100, 0.03), (10, 0.1), (3, 0.03), (1, 0.03), (40, 0.0)])
def test_cosine_schedule_follows_its_formula(total, ratio):
    """At the end of the warm-up, half-way through the decay and at the last step, the rate is the formula's;
    the first step already has a nonzero rate, so even a one-step run trains."""
    warmup, base = math.ceil(ratio * total), 3.0

    def formula(step):
        if step < warmup:
            return base * (step + 1) / warmup
        return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=base)
    scheduler = cosine_schedule(optimizer, total_steps=total, warmup_ratio=ratio)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    checked = {max(warmup - 1, 0), warmup + (total - warmup) // 2, total - 1} & set(range(total))
    for step in sorted(checked):
        assert lrs[step] == pytest.approx(formula(step)), f"step {step}"
    if warmup:
        assert lrs[warmup - 1] == pytest.approx(base)
    assert lrs[0] > 0


def test_exact_match_equals_greedy_generation(tiny):
    model_dir, chat, tokenizer = tiny
    model = load_tiny(model_dir)
    examples = load_examples(chat, tokenizer, 256)[:4]
    # Make half the answers exact by replacing them with the model's own greedy continuation.
    for example in examples[:2]:
        start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE)
        prompt = torch.tensor([example["input_ids"][:start]])
        greedy = model.generate(prompt, max_new_tokens=len(example["input_ids"]) - start, do_sample=False,
                                pad_token_id=0)[0, start:].tolist()
        example["input_ids"] = example["input_ids"][:start] + greedy
        example["labels"] = example["labels"][:start] + greedy
    metrics = evaluate(model, examples, batch_size=4, chunk=29)
    expected = 0
    for example in examples:
        start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE)
        answer = example["input_ids"][start:]
        out = model.generate(torch.tensor([example["input_ids"][:start]]), max_new_tokens=len(answer),
                             do_sample=False, pad_token_id=0)[0, start:].tolist()
        expected += out == answer
    assert expected >= 2
    assert metrics["eval_exact_match"] == expected / len(examples)
    batch = collate(examples)
    with torch.no_grad():
        reference = model(**batch).loss  # HF: mean over target tokens
    assert metrics["eval_loss"] == pytest.approx(reference.item(), rel=1e-5)


def test_trains_under_hf_trainer(tiny, tmp_path):
    model_dir, chat, tokenizer = tiny
    model = emulator(model_dir)
    add_lora(model, r=4, alpha=8)
    before = lora_state(model).clone()
    examples = load_examples(chat, tokenizer, 256)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    output = trainer.train()
    assert math.isfinite(output.training_loss)
    assert not torch.equal(lora_state(model), before)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == before.numel()


def test_lora_and_chunked_head_run_on_meta_tensors():
    """The memory planner drives a step on meta tensors: LoRA on an emulator layer and the chunked head allow it
    (no host sync, no data-dependent shapes)."""
    layer = EmulatorLinear(48, 40, rank=5, bias=True, device="meta")
    layer.add_lora(4, alpha=8)
    x = torch.empty(2 * 9, 48, device="meta", requires_grad=True)
    labels = torch.empty(2 * 9, dtype=torch.long, device="meta")
    head = torch.empty(97, 40, device="meta")
    loss, correct = lm_head_cross_entropy(layer(x), head, labels, 10.0, chunk=5)
    loss.backward()
    assert loss.device.type == "meta" and correct.shape == (18,)
    assert layer.lora_a.grad.device.type == "meta" and x.grad.shape == x.shape


def test_bad_training_data_is_named(tiny, tmp_path):
    model_dir, _, tokenizer = tiny
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there"}]}) + "\n")
    with pytest.raises(DataError, match=r"no_answer.jsonl:1: .*no assistant message"):
        load_examples(no_answer, tokenizer)
    truncated = make_chat_data(tmp_path / "long.jsonl", n=3)
    with pytest.raises(DataError, match=r"long.jsonl: no example has answer tokens .*max_length=4"):
        load_examples(truncated, tokenizer, max_length=4)
    text = make_text_data(tmp_path / "text.jsonl", n=3)
    assert all(e["labels"] == e["input_ids"] for e in load_examples(text, tokenizer))


def test_data_file_uses_the_tokenizer_saved_with_the_model(tiny, tmp_path):
    model_dir, chat, tokenizer = tiny
    config = TrainConfig(max_steps=1, micro_batch_size=2, grad_accum=1, lora_r=2, **TINY)
    model = emulator(model_dir)
    add_lora(model, r=2)
    train(model, chat, config)  # no tokenizer given: the one in model_dir is used
    lora_b = lora_parameters(model)[1::2]
    assert any(bool(b.abs().sum() > 0) for b in lora_b), "no lora_b moved: the data was not trained on"

    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    model.config._name_or_path = str(bare)
    with pytest.raises(ValueError, match="holds no tokenizer; pass tokenizer="):
        train(model, chat, config)


def test_pad_token_id_falls_back_to_eos_then_zero():
    from types import SimpleNamespace

    from emloc.data import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0  # 0 is a real id, not "missing"
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
