"""Data-parallel training under torchrun: 2 CPU processes (gloo), each with half of every global batch, end with
the same LoRA weights as one process trained on the whole global batch (fp32, 1e-5 relative).

The test launches this file as the torchrun worker script."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 3


def train_once(model_dir: Path, data: Path, micro_batch_size: int):
    """Train the in-memory emulator of ``model_dir`` for STEPS steps; returns the model."""
    import transformers

    from emloc.training import TrainConfig, train
    from emulators import emulate_in_memory, load_tiny

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = emulate_in_memory(load_tiny(model_dir))
    config = TrainConfig(max_steps=STEPS, micro_batch_size=micro_batch_size, grad_accum=2, learning_rate=1e-2,
                         warmup_ratio=0.0, max_length=256, lm_head_chunk=50, eval_fraction=0.0, seed=11,
                         progress=False)
    train(model, data, config, tokenizer=tokenizer)
    return model


def lora_vector(model) -> torch.Tensor:
    from emloc.lora import lora_parameters

    return torch.cat([p.detach().reshape(-1) for p in lora_parameters(model)])


def worker(model_dir: str, data: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    model = train_once(Path(model_dir), Path(data), micro_batch_size=1)
    weights = lora_vector(model)
    gathered = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    if dist.get_rank() == 0:
        torch.save(torch.stack(gathered), out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, monkeypatch):
    from checkpoints import make_chat_data, make_checkpoint

    monkeypatch.setenv("EMLOC_BACKEND", "torch")
    model_dir = make_checkpoint(tmp_path / "model", "llama")
    data = make_chat_data(tmp_path / "chat.jsonl", n=20, seed=2)
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "EMLOC_BACKEND": "torch", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", __file__, str(model_dir), str(data), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_rank = torch.load(out)
    assert torch.equal(per_rank[0], per_rank[1]), "ranks diverged"

    single = lora_vector(train_once(model_dir, data, micro_batch_size=2))
    from utils import assert_close

    err = assert_close(per_rank[0], single.double(), rtol=1e-5, what="DDP LoRA weights vs one process")
    print(f"DDP (2 x gloo) vs one process after {STEPS} steps: relative error {err:.2e}")


if __name__ == "__main__":
    worker(*sys.argv[1:])
