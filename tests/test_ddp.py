"""Data-parallel training: `torchrun --nproc_per_node 2 -m emloc.cli train ...` on the CPU (gloo), each process
with half of every global batch, ends with the same LoRA weights as one process trained on the whole global
batch (fp32, 1e-5 relative)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from checkpoints import make_chat_data, make_checkpoint
from emloc import cli
from emloc.build import build_emulator
from emloc.lora import LoraAdapter
from utils import assert_close

TRAIN = ["--steps", "3", "--accum", "2", "--lr", "0.01", "--warmup", "0", "--max-length", "256",
         "--lm-head-chunk", "50", "--eval-fraction", "0", "--seed", "11", "--device", "cpu"]


def stacked(adapter: LoraAdapter) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for name in sorted(adapter.weights) for t in adapter.weights[name]])


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(torch_backend, tmp_path):
    model_dir = make_checkpoint(tmp_path / "model", "llama")
    data = make_chat_data(tmp_path / "chat.jsonl", n=20, seed=2)
    emulator = build_emulator(model_dir, data, tmp_path / "emulator", 0.4, device="cpu", progress=False)
    env = {**os.environ, "EMLOC_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "emloc.cli", "train", str(emulator), "--data", str(data), "--out",
                           str(tmp_path / "ddp"), "--batch", "1", *TRAIN],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert cli.main(["train", str(emulator), "--data", str(data), "--out", str(tmp_path / "single"),
                     "--batch", "2", *TRAIN]) == 0

    ddp, single = LoraAdapter.load(tmp_path / "ddp" / "adapter"), LoraAdapter.load(tmp_path / "single" / "adapter")
    assert all(b.abs().sum() > 0 for _, b in single.weights.values()), "B starts at zero and must have trained"
    err = assert_close(stacked(ddp), stacked(single).double(), rtol=1e-5, what="DDP LoRA weights vs one process")
    print(f"DDP (2 x gloo) vs one process after 3 steps: relative error {err:.2e}")
