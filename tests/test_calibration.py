"""Calibration data: formats, seeded draws, padding masks, clear errors."""
import json

import pytest
import torch
import transformers

from checkpoints import make_chat_data, make_text_data, make_tokenizer
from emloc.calibration import load_texts, make_batches, tokenize_samples
from emloc.rows import DataError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


def test_text_rows(tmp_path, tokenizer):
    path = make_text_data(tmp_path / "d.jsonl", n=5)
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert load_texts(path, tokenizer, max_samples=10) == rows


def test_chat_messages_use_the_chat_template(tmp_path, tokenizer):
    path = make_chat_data(tmp_path / "d.jsonl", n=3)
    first = json.loads(path.read_text().splitlines()[0])["messages"]
    texts = load_texts(path, tokenizer)
    assert texts[0] == f"<|user|>{first[0]['content']}</s><|assistant|>{first[1]['content']}</s>"


def test_conversations_map_from_value_to_roles(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi there"},
                                                  {"from": "gpt", "value": "hello"}]}) + "\n")
    assert load_texts(path, tokenizer) == ["<|user|>hi there</s><|assistant|>hello</s>"]


def test_plain_text_file(tmp_path, tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("first line\n\nsecond line\n")
    assert load_texts(path, tokenizer) == ["first line", "second line"]


def test_samples_drawn_with_a_seed(tmp_path, tokenizer):
    path = make_text_data(tmp_path / "d.jsonl", n=40)
    a = load_texts(path, tokenizer, max_samples=8, seed=1)
    assert a == load_texts(path, tokenizer, max_samples=8, seed=1)
    assert a != load_texts(path, tokenizer, max_samples=8, seed=2)
    assert len(a) == 8 and len(set(a)) == 8


def test_batches_are_right_padded_with_a_matching_mask(tmp_path, tokenizer):
    texts = load_texts(make_text_data(tmp_path / "d.jsonl", n=7), tokenizer)
    samples = tokenize_samples(texts, tokenizer, max_length=120)
    batches = make_batches(samples, batch_size=3, pad_id=tokenizer.pad_token_id)
    assert [len(b.input_ids) for b in batches] == [3, 3, 1]
    assert max(len(s) for s in samples) <= 120
    rows = [(ids, mask) for b in batches for ids, mask in zip(b.input_ids, b.attention_mask, strict=True)]
    assert len({int(m.sum()) for _, m in rows}) > 1, "samples must vary in length"
    for sample, (ids, mask) in zip(samples, rows, strict=True):
        assert mask.dtype == torch.bool and int(mask.sum()) == len(sample)
        assert ids[mask].tolist() == sample
        assert bool((ids[~mask] == tokenizer.pad_token_id).all()) and bool(mask[:len(sample)].all())


@pytest.mark.parametrize("content, match", [
    ("", "calibration data is empty"),
    ("\n  \n", "calibration data is empty"),
    ('{"text": "ok"}\n{broken\n', r"d.jsonl:2: not valid JSON"),
    ('{"prompt": "x"}\n', r"d.jsonl:1: a row needs 'text', 'messages' or 'conversations'"),
])
def test_bad_data_is_named(tmp_path, tokenizer, content, match):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_texts(path, tokenizer)


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found"):
        load_texts(tmp_path / "nope.jsonl", tokenizer)


def test_chat_data_needs_a_chat_template(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(DataError, match=r"d.jsonl:1: chat data needs a tokenizer with a chat template"):
        load_texts(make_chat_data(tmp_path / "d.jsonl", n=2), tokenizer)
