"""Memory planner and dry run: the plan's counts against the modules transformers builds, the live-bytes
tracker against torch's CPU allocator, the analytic plan against the dry run of the pipeline's code, and the
planner's choices and errors."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from emloc import build, lora, training
from emloc.cli import main
from emloc.layers import EmulatorLinear
from emloc.memory import LiveBytesTracker, Settings, dry_run, estimate, parse_bytes, plan, reference_configs
from emloc.memory.meta_models import language_config, meta_model
from emloc.memory.spec import CONFIG_DIR, model_spec

GiB = 1 << 30


def tiny_config(model_type: str, seed: int = 0) -> dict:
    """A small decoder config with odd sizes (GQA, an MLP wider than the hidden size)."""
    gen = torch.Generator().manual_seed(seed)
    heads = 4
    head_dim = 8 * int(torch.randint(2, 5, (1,), generator=gen))
    return {"model_type": model_type, "hidden_size": heads * head_dim, "intermediate_size": 3 * heads * head_dim + 5,
            "num_hidden_layers": 3, "num_attention_heads": heads, "num_key_value_heads": 2, "head_dim": head_dim,
            "vocab_size": 307, "tie_word_embeddings": False, "torch_dtype": "float32", "max_position_embeddings": 512}


# --- counts: the planner's model of a config against the module transformers builds ---------------------


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_parameter_counts_match_transformers(model_type, seed):
    config = tiny_config(model_type, seed)
    spec = model_spec(config)
    model = meta_model(language_config(config), torch.float32)
    assert spec.params == sum(p.numel() for p in model.parameters())
    ratio = 0.3
    dry_run._emulate(model, ratio)
    settings = Settings(ratio=ratio)
    assert estimate.emulator_params(spec, settings) == sum(p.numel() for p in model.parameters())
    ranks = {name: m.rank for name, m in model.model.layers[0].named_modules() if isinstance(m, EmulatorLinear)}
    assert ranks == {linear.name: estimate.rank(ratio, linear) for linear in spec.language.linears
                     if estimate.rank(ratio, linear)}
    lora.add_lora(model, r=3)
    assert estimate.lora_params(spec, 3) == sum(p.numel() for p in lora.lora_parameters(model))


@pytest.mark.parametrize("name", ["Llama-3.1-8B", "Qwen3-32B", "Mistral-7B-v0.3"])
def test_shipped_config_counts_match_transformers(name):
    config = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    model = meta_model(language_config(config), torch.bfloat16)
    assert model_spec(config, name).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_plan_of_a_model_directory_counts_its_checkpoint(tmp_path, arch):
    from safetensors import safe_open

    from checkpoints import make_checkpoint

    directory = make_checkpoint(tmp_path / arch, arch, num_layers=3, hidden_size=48, intermediate_size=131,
                                vocab_size=211, tokenizer=False)
    stored = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            stored += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    p = plan(directory, "1GiB")
    assert p.original_params == stored
    assert model_spec(p.config).dtype_bytes == 4  # the checkpoint's fp32, from transformers 5's "dtype" key
    assert p.model == arch and p.fits


def test_internvl_38b_spec_matches_published_shapes():
    p = plan("InternVL2.5-38B", ratio=1.0)
    spec = model_spec(p.config, p.model)
    assert abs(spec.params - 38.39e9) < 0.01e9  # 38.4B published
    vision = spec.vision.stack
    assert (vision.hidden, vision.intermediate, vision.blocks, vision.heads) == (3200, 12800, 45, 25)
    projector = [(linear.in_features, linear.out_features) for linear in spec.vision.projector]
    assert projector == [(12800, 5120), (5120, 5120)]
    assert abs(vision.blocks * vision.block_params - 5.53e9) < 0.05e9  # InternViT-6B: 5.5B parameters


# --- the tracker against torch's own CPU allocator ----------------------------------------------------------


def _allocator_peak(prof) -> int:
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _tiny_emulator(config: dict, ratio: float, r: int):
    """A real (CPU) emulator of a tiny model: random factors of the planned ranks, LoRA, checkpointing."""
    cfg = language_config(config)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).requires_grad_(False)
    dry_run._emulate(model, ratio)
    for module in model.modules():
        if isinstance(module, EmulatorLinear):
            module.to_empty(device="cpu")
            for p in module.parameters():
                torch.nn.init.normal_(p, std=0.05)
    lora.add_lora(model, r=r)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def test_tracker_matches_cpu_allocator_on_a_real_training_step(torch_backend, seed):
    # The tracker does not see temporaries a kernel allocates internally (about 8% of this tiny step's peak;
    # less at full size, where the outputs it does see are large).
    config = {**tiny_config("qwen2", seed), "hidden_size": 160, "head_dim": 40, "intermediate_size": 263,
              "vocab_size": 1531}
    model = _tiny_emulator(config, 0.4, 4)
    loss_module = training.CausalLMLoss(model, chunk=64)
    ids = torch.randint(0, config["vocab_size"], (2, 157))
    mask = torch.ones_like(ids)

    def step():
        loss, _ = loss_module(ids, mask, ids, float(ids.numel()))
        loss.backward()

    step()  # warm-up: lazy initialisations stay out of the comparison
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with LiveBytesTracker("cpu") as tracker:
            step()
    model.zero_grad(set_to_none=True)
    allocator = _allocator_peak(prof)
    assert allocator > 1 << 20, "the step should allocate megabytes"
    assert abs(tracker.peak - allocator) / allocator < 0.10, (tracker.peak, allocator)


@pytest.mark.parametrize("svd,lora_r", [("exact", 0), ("randomized", 0), ("exact", 4)])
def test_tracker_matches_cpu_allocator_on_a_real_block_construction(torch_backend, seed, svd, lora_r):
    """A block's calibration and factorisation; with ``lora_r``, as a refresh runs them: the LoRA attached by
    an adapter for the pass and removed before the factorisation."""
    config = {**tiny_config("qwen2", seed), "hidden_size": 96, "head_dim": 24, "intermediate_size": 263}
    cfg = language_config(config, layers=1)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).requires_grad_(False)
    plan_ = build.plan_compression(model, 0.3)[0]
    hidden = torch.randn(2, 157, 96)
    item = build.BlockInput(hidden, {"position_embeddings": model.model.rotary_emb(hidden, torch.arange(157)[None])},
                               torch.rand(2, 157) > 0.2)
    block = model.model.layers[0]
    weights = {name: (torch.randn(lora_r, m.in_features), torch.randn(m.out_features, lora_r))
               for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with LiveBytesTracker("cpu") as tracker:
            if lora_r:  # the block's LoRA weights are made (and freed) in view of both
                lora.LoraAdapter(weights, r=lora_r, alpha=float(lora_r)).apply_to(block)
            covariances = build.calibrate_block(block, plan_, [item], sink=lambda index, output: None)
            for module in lora.lora_modules(block).values():
                module.remove_lora()
            build.compress_block(block, plan_, covariances, svd=svd)
    allocator = _allocator_peak(prof)
    assert abs(tracker.peak - allocator) / allocator < 0.10, (tracker.peak, allocator)


def test_tracker_ignores_views_of_storage_it_did_not_allocate():
    outside = torch.empty(1000, 1000, device="meta")
    with LiveBytesTracker("meta") as tracker:
        view = outside.t()[::2]
        outside.add_(1.0)
        assert tracker.live == 0
        fresh = view * 2
        assert tracker.live == fresh.numel() * 4


def test_tracker_counts_saved_tensors_until_backward_frees_them():
    with LiveBytesTracker("meta") as tracker:
        x = torch.empty(1000, 1000, device="meta", requires_grad=True)
        tracker.adopt([x])
        y = x.exp()  # exp saves its output for backward
        loss = y.sum()
        del y
        assert tracker.live == 2 * 4 * 10**6 + 4  # x, the saved exp, the loss
        loss.backward()
        del loss
        assert tracker.live == 2 * 4 * 10**6  # x and its gradient; the saved output is gone
    assert tracker.peak >= 3 * 4 * 10**6  # x, exp output and the incoming gradient coexist in backward


# --- the analytic plan against the dry run of the pipeline's code --------------------------------------------


@pytest.mark.parametrize("model_type,svd", [("qwen2", "exact"), ("llama", "randomized")])
def test_analytic_plan_agrees_with_dry_run_within_10_percent(model_type, svd):
    # scaled down: the stages' proportions of a 32B model (MLP 5.4x the hidden size, GQA 5:1, large vocab)
    config = {"model_type": model_type, "hidden_size": 640, "intermediate_size": 3456, "num_hidden_layers": 8,
              "num_attention_heads": 5, "num_key_value_heads": 1, "vocab_size": 19008, "head_dim": 128,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "max_position_embeddings": 4096}
    p = plan(config, "2GiB", seq_len=1024, lora_r=8, samples=8, ratio=0.15, svd=svd)
    for stage, (planned, measured) in dry_run.verify(p).items():
        assert abs(planned - measured) / measured < 0.10, f"{stage}: planned {planned}, dry run {measured}"


SCALED_32B = {"model_type": "qwen2", "hidden_size": 640, "intermediate_size": 3456, "num_hidden_layers": 8,
              "num_attention_heads": 5, "num_key_value_heads": 1, "vocab_size": 19008, "head_dim": 128,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "max_position_embeddings": 4096}


@pytest.mark.parametrize("micro_batch", [1, 8])
def test_refresh_plan_agrees_with_its_dry_run(micro_batch):
    """The refresh: the build's block steps with the training's LoRA on the decoder block (attached by an
    adapter, removed before the factorisation), at the build's micro-batch; the training state is on the host."""
    p = plan(SCALED_32B, "2GiB", seq_len=1024, lora_r=8, samples=8, ratio=0.15, calibration_micro_batch=micro_batch)
    checked = dry_run.verify(p)
    (planned, measured), construction = checked["refresh"], checked["construction"][1]
    assert abs(planned - measured) / measured < 0.011, (planned, measured)
    lora_weights = estimate.block_lora_params(model_spec(p.config).language, 8) * 4
    assert measured >= construction + (lora_weights if micro_batch > 1 else 0)  # the pass binds at 8 samples
    assert "refresh" not in dry_run.verify(plan(SCALED_32B, "2GiB", seq_len=1024, lora_r=8, samples=8, ratio=0.15,
                                                refreshes=0))


@pytest.mark.parametrize("name", ["Llama-3.1-70B", "InternVL2.5-38B"])
def test_refresh_of_a_full_size_decoder_block_agrees_with_the_plan(name):
    p = plan(name, "24GiB")
    spec, s = model_spec(p.config, name), p.settings
    planned = estimate.stack_construction(spec, s, spec.language, s.lora_r).device_peak
    measured = dry_run.measure_construction(p.config, s.ratio, s.seq_len, s.calibration_micro_batch, s.method,
                                            lora_r=s.lora_r)
    assert abs(planned - measured) / measured < 0.011, (planned, measured)
    assert p.stage("refresh").device_peak >= planned


def test_planner_refuses_a_ratio_whose_refresh_does_not_fit():
    """At 8 samples per pass the refresh's pass (LoRA weights, the up projection's fp32 delta) outgrows the
    build's; a budget between the two refuses the ratio and names the refresh, and without refreshes it fits."""
    shape = {"seq_len": 1024, "lora_r": 8, "samples": 8, "calibration_micro_batch": 8}
    at = plan(SCALED_32B, "2GiB", ratio=0.15, **shape)
    refresh = at.stage("refresh").device_peak
    others = max(stage.device_peak for stage in at.stages if stage.name != "refresh")
    assert refresh > others
    budget = (refresh + others) // 2
    refused = plan(SCALED_32B, budget, ratio=0.15, **shape)
    assert not refused.fits and refused.reason.startswith("refresh needs")
    assert plan(SCALED_32B, budget, ratio=0.15, **shape, refreshes=0).fits
    searched = plan(SCALED_32B, budget, **shape)  # the pass does not shrink with the ratio: nothing fits
    assert not searched.fits and "refresh needs" in searched.reason
    # left to choose, the planner takes fewer samples per pass for the refresh's sake
    free = {key: value for key, value in shape.items() if key != "calibration_micro_batch"}
    chosen = plan(SCALED_32B, "1GiB", ratio=0.15, **free)
    assert chosen.settings.calibration_micro_batch < plan(SCALED_32B, "1GiB", ratio=0.15, **free,
                                                          refreshes=0).settings.calibration_micro_batch
    assert chosen.stage("refresh").device["activations"] <= (1 << 30) // 4


def test_refresh_host_holds_the_training_state():
    p = plan("Llama-3.1-70B", "24GiB")
    spec, refresh = model_spec(p.config, p.model), p.stage("refresh")
    state = estimate.emulator_params(spec, p.settings) * 2 + estimate.lora_params(spec, 64) * (4 + 8 + 4)
    assert refresh.host_peak == p.stage("construction").host_peak + state


# --- planner choices ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Llama-3.1-70B", "Qwen2.5-72B"])
@pytest.mark.parametrize(("lora_r", "dominant"), [(8, "weights"), (64, "lora_optimizer")])
def test_largest_fitting_ratio_is_the_boundary(name, lora_r, dominant):
    """At 24 GiB a 70B-class model's training stage binds; what fills it most is the emulator's weights
    with a rank-8 LoRA and the LoRA's optimizer state at rank 64."""
    p = plan(name, "24GiB", lora_r=lora_r)
    assert p.fits and p.peak <= 24 * GiB
    above = estimate.stages(model_spec(p.config, name), replace(p.settings, ratio=p.ratio + 0.001))
    assert max(s.device_peak for s in above) > 24 * GiB
    assert p.stage("training").dominant == dominant


@pytest.mark.parametrize(("lora_r", "bound"), [(8, 16), (64, 20)])
def test_internvl_38b_with_a_5b_emulator_fits_20_gib(lora_r, bound):
    """The paper's setting (a 5B emulator, LoRA r 8) fits 20 GiB with room to spare (16 GiB); the default
    rank-64 LoRA still fits 20 GiB."""
    p = plan("InternVL2.5-38B", "20GiB", emulator_params="5B", lora_r=lora_r)
    assert p.emulator_params >= 5e9 and p.fits
    assert all(stage.device_peak <= 20 * GiB for stage in p.stages)
    assert p.peak <= bound * GiB
    assert plan("InternVL2.5-38B", p.peak, emulator_params="5B", lora_r=lora_r).fits
    assert not plan("InternVL2.5-38B", p.peak - (64 << 20), emulator_params="5B", lora_r=lora_r).fits


def test_dense_vision_tower_costs_its_weights_in_training():
    compressed = plan("InternVL2.5-38B", ratio=0.1)
    dense = plan("InternVL2.5-38B", ratio=0.1, vision="dense")
    spec = model_spec(dense.config)
    extra = (stack := spec.vision.stack).blocks * stack.block_params - estimate.stack_params(stack, 0.1)
    gap = dense.stage("training").device["weights"] - compressed.stage("training").device["weights"]
    assert gap == extra * 2


def test_nothing_fits_names_the_stage_and_its_largest_term():
    # healing binds when it runs beside a rank-8 LoRA; a rank-64 LoRA's optimizer state outweighs it
    for lora_r, heal_rank, binding in ((8, 0, "training"), (8, 32, "healing"), (64, 32, "training")):
        p = plan("Qwen2.5-72B", "3GiB", lora_r=lora_r, heal_rank=heal_rank)
        worst = max(p.stages, key=lambda stage: stage.device_peak)
        assert not p.fits and worst.name == binding
        assert "nothing fits" in p.reason and f"{binding} needs" in p.reason and worst.dominant in p.reason


def test_planned_settings_follow_the_budget():
    small, large = plan("Qwen2.5-32B", "12GiB"), plan("Qwen2.5-32B", "80GiB")
    assert small.settings.lm_head_chunk < large.settings.lm_head_chunk
    assert small.ratio < large.ratio
    chunk = small.settings.lm_head_chunk
    assert 3 * 4 * chunk * 152064 <= 12 * GiB // 64


def test_plan_settings_are_the_pipelines_arguments():
    import inspect

    p = plan("Qwen2.5-32B", "20GiB")
    assert set(p.build_kwargs()) <= set(inspect.signature(build.build_emulator).parameters)
    assert p.build_kwargs()["compression"] == p.ratio
    config = training.TrainConfig(**p.train_kwargs())
    assert config.lm_head_chunk == p.settings.lm_head_chunk and config.gradient_checkpointing
    assert config.embeddings_on_device is p.settings.embeddings_on_device is False  # the plan's default: host


@pytest.mark.parametrize("bad, match", [("24XB", "cannot read"), ("-3GiB", "cannot read"), ("0GB", "positive")])
def test_bad_budget_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_bytes(bad)
    with pytest.raises(ValueError, match="budget"):
        plan("Qwen2.5-7B", bad)


def test_bad_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped"):
        plan(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="unsupported language model type 'bert'"):
        plan(tmp_path)
    with pytest.raises(ValueError, match="ratio"):
        plan("Qwen2.5-7B", ratio=1.5)


def test_cli_json_and_exit_status(capsys):
    assert main(["plan", "Qwen2.5-72B", "--budget", "24GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and 0 < out["ratio"] < 1
    assert set(out["stages"]) == {"construction", "training", "refresh", "correction", "export"}
    assert main(["plan", "Qwen2.5-72B", "--budget", "24GiB", "--json", "--heal-rank", "32", "--refreshes", "0"]) == 0
    healed = set(json.loads(capsys.readouterr().out)["stages"])
    assert healed == {"construction", "healing", "training", "correction", "export"}
    assert out["settings"]["lm_head_chunk"] >= 16
    assert main(["plan", "Qwen2.5-72B", "--budget", "2GiB"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_every_shipped_config_plans():
    assert len(reference_configs()) == 10
    for name in reference_configs():
        assert plan(name, "24GiB").fits, name


@pytest.mark.slow
def test_internvl_38b_dry_run_at_full_size_confirms_the_plan():
    p = plan("InternVL2.5-38B", "20GiB", emulator_params="5B")
    for stage, (planned, measured) in dry_run.verify(p).items():
        assert measured <= 20 * GiB and abs(planned - measured) / measured < 0.10, stage


# --- vision-language models: the tower in the plan and in the dry run ---------------------------------------


def internvl_chat_config(vision_norm: str = "rms_norm") -> dict:
    """A scaled-down InternVL in its original layout (``llm_config``, an ``intern_vit_6b`` tower)."""
    return {"model_type": "internvl_chat", "downsample_ratio": 0.5, "select_layer": -1, "max_dynamic_patch": 6,
            "use_thumbnail": True, "torch_dtype": "bfloat16",
            "llm_config": {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 1376, "num_hidden_layers": 3,
                           "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 3001,
                           "tie_word_embeddings": False, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"},
            "vision_config": {"model_type": "intern_vit_6b", "hidden_size": 160, "intermediate_size": 640,
                              "num_hidden_layers": 4, "num_attention_heads": 5, "image_size": 224, "patch_size": 14,
                              "norm_type": vision_norm, "qk_normalization": vision_norm == "rms_norm",
                              "qkv_bias": vision_norm != "rms_norm", "hidden_act": "gelu", "num_channels": 3}}


def llava_config() -> dict:
    """A scaled-down LLaVA in transformers' layout: a CLIP tower (quick_gelu) before a Llama decoder."""
    return {"model_type": "llava", "torch_dtype": "bfloat16", "image_token_index": 2999, "vision_feature_layer": -2,
            "text_config": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376,
                            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128,
                            "vocab_size": 3000},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 96, "intermediate_size": 384,
                              "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 112, "patch_size": 14}}


VLM_CONFIGS = {"internvl-6b": internvl_chat_config, "internvl-300m": lambda: internvl_chat_config("layer_norm"),
               "llava": llava_config}


@pytest.mark.parametrize("name", list(VLM_CONFIGS))
def test_vision_language_counts_match_transformers(name):
    """Parameters of the model and of its emulator (decoder at 0.3, tower at 0.5), and the planned ranks, as
    the build's own plan on transformers' model gives them."""
    from emloc import models
    from emloc.build.plan import stack_compression
    from emloc.memory.meta_models import vision_language_config

    config = VLM_CONFIGS[name]()
    spec = model_spec(config)
    model = meta_model(vision_language_config(config), torch.float32)
    models.tie_embeddings(model)
    assert spec.params == sum(p.numel() for p in model.parameters())
    plans = iter(build.plan_compression(model, stack_compression(model, 0.3, 0.5)))
    for _, stack in models.block_stacks(model):
        for block in stack:
            build.emulate_block(block, next(plans))
    assert estimate.emulator_params(spec, Settings(ratio=0.3, vision_ratio=0.5)) == sum(
        p.numel() for p in model.parameters())
    tower = models.vision_stack(model)[1][0]
    ranks = {name: m.rank for name, m in tower.named_modules() if isinstance(m, EmulatorLinear)}
    assert ranks == plan(config, ratio=0.3, vision_ratio=0.5).ranks["vision_tower"]


@pytest.mark.parametrize("name,vision", [("internvl-6b", "compress"), ("internvl-300m", "dense"),
                                         ("llava", "compress")])
def test_vision_tower_dry_run_agrees_with_the_plan_within_5_percent(name, vision):
    """The tower's construction, run by the build's block functions on meta pixel values at full size, as
    the plan has it; so is the decoder's, and the stage is the larger of the two."""
    # LoRA r 8: the scaled-down layers are narrower than the default rank
    p = plan(VLM_CONFIGS[name](), "1GiB", seq_len=1024, lora_r=8, samples=8, ratio=0.2, vision=vision)
    checked = dry_run.verify(p)
    assert {"construction: vision tower", "construction: language model"} <= set(checked)
    for stage, (planned, measured) in checked.items():
        tolerance = 0.05 if stage.startswith(("construction", "refresh")) else 0.10  # as for text models here
        assert abs(planned - measured) / measured < tolerance, f"{stage}: planned {planned}, dry run {measured}"
    assert checked["construction"][1] == max(checked["construction: vision tower"][1],
                                             checked["construction: language model"][1])
    # a refresh streams the tower as it was built, the decoder with the LoRA
    assert checked["refresh"][1] == max(checked["construction: vision tower"][1],
                                        checked["refresh: language model"][1])
