"""Architecture adapters: block stacks, input groups, and the block-by-block pass reproducing the full model."""
import json

import pytest
import torch
import transformers

from checkpoints import ARCHITECTURES, make_checkpoint
from emloc import models
from emloc.build import blockwise_logits
from emloc.calibration import make_batches
from utils import assert_close


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    """The pipeline runs on the torch reference ops: the Triton kernels have their own tests against it,
    and in the CPU interpreter they would make these model-level tests minutes long."""
    monkeypatch.setenv("EMLOC_BACKEND", "torch")


def _padded_batches(seed: int, vocab: int = 200):
    """Two right-padded batches of varied lengths, longer than the tiny models' sliding window (8)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [23, 9, 17, 30, 5]
    samples = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    return make_batches(samples, batch_size=3, pad_id=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_blockwise_pass_reproduces_full_model_logits(tmp_path, arch, seed):
    path = make_checkpoint(tmp_path / arch, arch, seed=seed % 1000, tokenizer=False)
    batches = _padded_batches(seed)
    assert any(not bool(b.attention_mask.all()) for b in batches), "the batches must hold padding"
    got = blockwise_logits(path, batches, device="cpu")
    full = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for batch, logits in zip(batches, got, strict=True):
        with torch.no_grad():
            expected = full(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
        mask = batch.attention_mask
        assert_close(logits[mask], expected[mask], torch.float32, what=f"{arch} logits on real tokens")


def test_input_groups_share_q_k_v_and_gate_up(tmp_path):
    model = models.skeleton(models.load_config(make_checkpoint(tmp_path, "llama", tokenizer=False)))
    groups = models.input_groups(models.block_stack(model)[1][0])
    assert ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") in groups
    assert ("mlp.gate_proj", "mlp.up_proj") in groups
    assert ("self_attn.o_proj",) in groups and ("mlp.down_proj",) in groups
    assert len(groups) == 4


def test_fused_linears_are_their_own_groups(tmp_path):
    model = models.skeleton(models.load_config(make_checkpoint(tmp_path, "phi3", tokenizer=False)))
    groups = models.input_groups(models.block_stack(model)[1][0])
    assert sorted(groups) == [("mlp.down_proj",), ("mlp.gate_up_proj",), ("self_attn.o_proj",), ("self_attn.qkv_proj",)]


def test_skeleton_is_on_meta_with_real_rotary_buffers(tmp_path):
    model = models.skeleton(models.load_config(make_checkpoint(tmp_path, "gemma3", tokenizer=False)))
    assert all(p.device.type == "meta" for p in model.parameters())
    buffers = dict(model.named_buffers())
    assert buffers and all(b.device.type == "cpu" and torch.isfinite(b).all() for b in buffers.values())


def test_generic_fallback_finds_the_block_stack(tmp_path, monkeypatch):
    model = models.skeleton(models.load_config(make_checkpoint(tmp_path, "mistral", tokenizer=False)))
    monkeypatch.delitem(models.SUPPORTED_ARCHITECTURES, "mistral")
    name, stack = models.block_stack(model)
    assert name == "model.layers" and stack is model.model.layers


def test_unknown_architecture_lists_supported_ones(tmp_path):
    path = make_checkpoint(tmp_path, "llama", tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "no_such_model"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.UnsupportedModelError, match="no_such_model.*supported: llama, .*phi3"):
        models.load_config(path)


def test_missing_config_names_the_directory(tmp_path):
    with pytest.raises(models.UnsupportedModelError, match=str(tmp_path)):
        models.load_config(tmp_path)
