"""Shard streaming: per-module load across shards, release to meta, clear errors, atomic writes."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from emloc import models
from emloc.files import atomic_write
from emloc.streaming import CheckpointError, CheckpointIndex, key_mapping, materialize, read_tensors, release


def _full_state(path):
    state = {}
    for file in CheckpointIndex(path).files:
        state.update(load_file(str(path / file)))
    return state


def test_block_spanning_two_shards_loads_exactly(tmp_path, seed):
    path = make_checkpoint(tmp_path, "qwen2", num_layers=3, seed=seed % 1000, tokenizer=False)
    index = CheckpointIndex(path)
    shards_of_block = {file for key, file in index.weight_map.items() if key.startswith("model.layers.1.")}
    assert len(shards_of_block) == 2, "the factory must split block 1 across two shards"
    model = models.skeleton(models.load_config(path))
    block = models.block_stack(model)[1][1]
    materialize(block, "model.layers.1", index, device="cpu")
    expected = _full_state(path)
    for name, tensor in block.state_dict().items():
        assert torch.equal(tensor, expected[f"model.layers.1.{name}"]), name
    assert all(p.device.type == "meta" for p in models.block_stack(model)[1][0].parameters()), \
        "loading block 1 must not touch block 0"
    release(block)
    assert all(p.device.type == "meta" for p in block.parameters())


def test_materialize_casts_to_dtype(tmp_path):
    path = make_checkpoint(tmp_path, "llama", tokenizer=False)
    model = models.skeleton(models.load_config(path))
    block = materialize(models.block_stack(model)[1][0], "model.layers.0", CheckpointIndex(path), dtype=torch.bfloat16)
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in block.parameters())


def test_missing_shard_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "llama", tokenizer=False)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        CheckpointIndex(path)


def test_corrupt_shard_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "llama", tokenizer=False)
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    index = CheckpointIndex(path)
    keys = [k for k, f in index.weight_map.items() if f == shard.name]
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        index.load(keys)


def test_missing_tensor_and_bad_index_are_named(tmp_path):
    path = make_checkpoint(tmp_path, "llama", tokenizer=False)
    with pytest.raises(CheckpointError, match="no tensor 'model.layers.9.mlp.up_proj.weight'"):
        CheckpointIndex(path).load(["model.layers.9.mlp.up_proj.weight"])
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        CheckpointIndex(path)


def test_content_hash_tracks_the_layout(tmp_path):
    a = make_checkpoint(tmp_path / "a", "llama", seed=1, tokenizer=False)
    b = make_checkpoint(tmp_path / "b", "llama", seed=1, num_layers=3, tokenizer=False)
    assert CheckpointIndex(a).content_hash() == CheckpointIndex(a).content_hash()
    assert CheckpointIndex(a).content_hash() != CheckpointIndex(b).content_hash()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "data.json"
    target.write_text(json.dumps({"old": True}))

    def failing(temp):
        temp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]
    atomic_write(target, lambda temp: temp.write_text("new"))
    assert target.read_text() == "new"


@pytest.mark.parametrize("rename", [lambda key: f"language_model.{key}", lambda key: key.removeprefix("model.")])
def test_checkpoint_keys_with_another_prefix_map_to_module_names(tmp_path, rename):
    from checkpoints import save_sharded

    path = make_checkpoint(tmp_path / "plain", "llama", tokenizer=False)
    state = _full_state(path)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    save_sharded({rename(k): t for k, t in state.items()}, renamed, shards=2)
    index = CheckpointIndex(renamed)
    model = models.skeleton(models.load_config(path))
    key_of = key_mapping([n for n, _ in model.named_parameters()], index)
    assert key_of("model.layers.1.mlp.up_proj.weight") == rename("model.layers.1.mlp.up_proj.weight")
    block = materialize(models.block_stack(model)[1][1], "model.layers.1", index, key_of=key_of)
    for name, tensor in block.state_dict().items():
        assert torch.equal(tensor, state[f"model.layers.1.{name}"]), name


def test_read_tensors_round_trips_every_dtype_into_independent_buffers(tmp_path, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "bf16": torch.randn(7, 5, generator=generator).bfloat16(),
        "f16": torch.randn(3, generator=generator).half(),
        "f64": torch.randn(2, 3, 4, generator=generator, dtype=torch.float64),
        "i64": torch.randint(-1000, 1000, (9,), generator=generator),
        "bool": torch.rand(6, generator=generator) < 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    loaded = dict(read_tensors(path, list(tensors)))
    for key, expected in tensors.items():
        assert loaded[key].dtype == expected.dtype and torch.equal(loaded[key], expected), key
    pointers = {t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}
    assert len(pointers) == sum(1 for t in loaded.values() if t.numel()), (
        "tensors share one buffer: none could be freed alone")


def test_read_tensors_names_the_file_and_tensor_of_truncated_data(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])
    assert torch.equal(dict(read_tensors(path, ["a"]))["a"], torch.ones(4))
    with pytest.raises(CheckpointError, match=r"t\.safetensors: cannot read 'b' .*ends before"):
        dict(read_tensors(path, ["b"]))
    with pytest.raises(CheckpointError, match=r"t\.safetensors: cannot read 'c'"):
        dict(read_tensors(path, ["c"]))
