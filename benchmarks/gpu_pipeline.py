"""The ``pipeline`` and ``reference`` parts of ``make gpu-check``: emloc end to end at real layer shapes.

``pipeline``: for a few blocks of Llama-3-8B and of Qwen2.5-32B (their shipped configs, the real layer
shapes, random init, a smaller vocabulary so the checkpoints stay small), the memory plan of
:func:`emloc.pipeline.plan_for_budget` for the whole device, then each stage on the GPU as that plan sets
it: build the emulator, train LoRA for tens of steps, correct it, export it (merged). Every stage records
its seconds and ``torch.cuda.max_memory_allocated`` beside the plan's device peak for it. Every calibration
and training sample is exactly ``SEQ_LEN`` tokens, as the plan assumes (no padding).

``reference``: the reference construction algorithm (``baseline_build.py``: every linear's own covariance,
eigendecomposition and full SVD, in fp32) on the same checkpoints, calibration tokens and micro-batches, on
the GPU, for the build's speed-up. It runs last, in its own process: at the flagship's width it takes
minutes, and running out of time there only bounds the speed-up from below.
"""
from __future__ import annotations

import gc
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.append(str(BENCHMARKS.parent / "tests"))

from build_workload import RATIO, Workload, run_baseline  # noqa: E402
from checkpoints import make_tokenizer, random_sentence, save_sharded  # noqa: E402

DEVICE, DTYPE = "cuda", torch.bfloat16
VOCAB = 32768  # instead of 128256 / 152064: the layer shapes are the real ones, the embeddings a quarter
SEQ_LEN, BATCH, SAMPLES, ROWS = 1024, 2, 16, 48  # training micro-batch, calibration samples, data rows
STEPS, QUICK_STEPS = 20, 10
BLOCKS, QUICK_BLOCKS = 2, 1
LORA_R = 8


@dataclass(frozen=True)
class Model:
    """A model of the check: its name in the report and the shipped config (``emloc/configs``) it copies."""

    name: str
    config: str


# Llama-3.1-8B has Llama-3-8B's layers (hidden 4096, MLP 14336, 32 heads, 8 KV heads); Qwen2.5-32B is the
# language model of the flagship InternVL2.5-38B.
MODELS = {"llama3-8b": Model("Llama-3-8B", "Llama-3.1-8B"), "qwen2.5-32b": Model("Qwen2.5-32B", "Qwen2.5-32B")}


def model_config(model: Model, blocks: int) -> dict:
    """The shipped config with ``blocks`` decoder blocks, the check's vocabulary and its tokenizer's ids."""
    from emloc.memory.spec import load_model_config

    config, _ = load_model_config(model.config)
    return {**config, "num_hidden_layers": blocks, "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1,
            "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def make_checkpoint(directory: Path, config: dict) -> Path:
    """A random-init bf16 checkpoint of ``config`` in ``directory``: initialised on the GPU, saved as sharded
    safetensors, with the test suite's small BPE tokenizer (a word-level one would not do: transformers
    loads a Qwen2 checkpoint's tokenizer as the BPE ``Qwen2Tokenizer``)."""
    import transformers

    settings = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **settings)
    with torch.device(DEVICE):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=DTYPE)
    directory.mkdir(parents=True, exist_ok=True)
    save_sharded({k: v.cpu() for k, v in model.state_dict().items()}, directory, config["num_hidden_layers"] + 1)
    hf_config.save_pretrained(directory)
    del model
    make_tokenizer(directory)
    return directory


def write_data(path: Path) -> Path:
    """``ROWS`` texts of more than ``SEQ_LEN`` words: every sample is truncated to exactly ``SEQ_LEN`` tokens."""
    rng = random.Random(0)
    texts = (" ".join(random_sentence(rng) for _ in range(SEQ_LEN // 4)) for _ in range(ROWS))
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def staged(name: str, fn, planned: int) -> tuple[object, dict]:
    """Run one stage from an empty device; returns its result and its seconds and peak allocated bytes."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, {"name": name, "seconds": round(time.perf_counter() - started, 2),
                    "measured_bytes": torch.cuda.max_memory_allocated(), "planned_bytes": planned}


def describe(config: dict, followed, steps: int) -> str:
    s = followed.settings
    return (f"{config['num_hidden_layers']} blocks: hidden {config['hidden_size']}, MLP {config['intermediate_size']}, "
            f"{config['num_attention_heads']} / {config['num_key_value_heads']} KV heads, vocab {VOCAB}; "
            f"ratio {s.ratio}, {s.samples} calibration samples of {s.seq_len} tokens (micro-batch "
            f"{s.calibration_micro_batch}), {steps} steps of {s.batch} x {s.seq_len} tokens, LoRA r {s.lora_r}, "
            f"LM-head chunk {s.lm_head_chunk}, "
            f"input embedding on the {'device' if s.embeddings_on_device else 'host'}; export merged on the host")


def run_model(key: str, work: Path, quick: bool) -> dict:
    """Checkpoint, plan, and the four stages of one model; the emulator and outputs are removed afterwards."""
    from transformers import AutoTokenizer

    from emloc import build_emulator, correct_lora, export, load_emulator, train
    from emloc.pipeline import plan_for_budget, plan_record
    from emloc.training import TrainConfig

    model, blocks, steps = MODELS[key], QUICK_BLOCKS if quick else BLOCKS, QUICK_STEPS if quick else STEPS
    directory = work / key
    config = model_config(model, blocks)
    source = make_checkpoint(directory / "source", config)
    data = write_data(directory / "data.jsonl")
    train_config = TrainConfig(output_dir=str(directory / "train"), max_steps=steps, micro_batch_size=BATCH,
                               grad_accum=1, max_length=SEQ_LEN, lora_r=LORA_R, eval_fraction=0.1,
                               save_steps=steps, resume=False, progress=False)
    followed = plan_for_budget(source, torch.cuda.get_device_properties(0).total_memory, train_config, RATIO,
                               SAMPLES, "exact", DTYPE)
    train_config = replace(train_config, **followed.train_kwargs())
    emulator = directory / "emulator"
    peak = {stage.name: stage.device_peak for stage in followed.stages}
    stages = []
    _, stage = staged("construction", lambda: build_emulator(
        source, data, emulator, device=DEVICE, dtype=DTYPE, resume=False, overwrite=True, progress=False,
        **followed.build_kwargs()), peak["construction"])
    stages.append(stage)

    def training():
        emulated = load_emulator(emulator, device=DEVICE, dtype=DTYPE)
        return train(emulated, data, train_config, tokenizer=AutoTokenizer.from_pretrained(emulator))

    trained, stage = staged("training", training, peak["training"])
    stages.append(stage)
    _, stage = staged("correction", lambda: correct_lora(source, emulator, trained.adapter_dir, device=DEVICE,
                                                         progress=False).save(directory / "corrected"),
                      peak["correction"])
    stages.append(stage)
    _, stage = staged("export", lambda: export(directory / "corrected", source, directory / "export", merge=True,
                                               progress=False), peak["export"])
    stages.append(stage)
    for output in ("emulator", "train", "corrected", "export"):
        shutil.rmtree(directory / output, ignore_errors=True)
    return {"key": key, "name": model.name, "describe": describe(config, followed, steps), "stages": stages,
            "construction_seconds": stages[0]["seconds"], "losses": [trained.losses[0], trained.losses[-1]],
            "plan": plan_record(followed), "source": str(source), "data": str(data),
            "calibration_micro_batch": followed.settings.calibration_micro_batch}


def run_pipeline(record, args) -> None:
    for key in MODELS:
        record.append("models", run_model(key, args.work, args.quick))


def reference_models(chosen: str) -> list[str]:
    """The model keys of ``--reference`` ('none', 'all' or a comma-separated list), checked."""
    if chosen == "none":
        return []
    keys = list(MODELS) if chosen == "all" else [key.strip() for key in chosen.split(",") if key.strip()]
    unknown = [key for key in keys if key not in MODELS]
    if unknown:
        raise ValueError(f"--reference: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}, "
                         "all or none")
    return keys


def run_reference(record, args) -> None:
    """Time the reference build of each chosen model the pipeline part built, on the same tokens."""
    built = {m["key"]: m for m in json.loads((args.out / "pipeline.json").read_text()).get("models", [])}
    for key in [key for key in reference_models(args.reference) if key in built]:
        model = built[key]
        record.update(current={"name": model["name"], "started_s": round(record.elapsed(), 1)})
        workload = Workload(samples=SAMPLES, max_length=SEQ_LEN, batch_size=model["calibration_micro_batch"])
        _, stage = staged("reference",
                          lambda model=model, key=key, workload=workload: run_baseline(
                              Path(model["source"]), Path(model["data"]), args.work / key / "reference", workload,
                              DEVICE),
                          0)
        record.append("models", {"name": model["name"], "seconds": stage["seconds"],
                                 "measured_bytes": stage["measured_bytes"]})
