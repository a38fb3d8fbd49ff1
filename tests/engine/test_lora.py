"""LoRA: a tiny model memorises a few answers through an adapter; the adapter loads in Hugging Face `peft`
with the same logits as ours; merged checkpoints load in transformers with the same logits; the engine
applies an adapter at load time (unmerged) with the merged model's logits; broken adapters give one-line
errors naming the file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import hf_model
from engine import CheckpointError, Engine, SamplingParams
from engine.checkpoint import load_model, read_model_config
from engine.finetune import config_from_dict, load_trainable_model, run_job
from engine.inference import OneDNNLinear
from engine.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRAConv1D,
    LoRALinear,
    apply_lora,
    default_targets,
    lora_layers,
    merge_lora,
    save_adapter,
    save_hf_checkpoint,
)

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 17, 33, 99, 120, 7, 250, 3]])
PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("Say hello", "Hello there!"),
    ("Name a color", "Blue."),
    ("Count to three", "1 2 3"),
]



def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def random_adapter(base: Path, out: Path, targets: list[str] | None = None) -> tuple[torch.nn.Module, Path]:
    """Our model with a LoRA adapter whose B is random (a fresh adapter is a no-op), saved to out."""
    model = load_trainable_model(base, CPU)
    config = apply_lora(model, targets or default_targets(model), r=4, alpha=8.0)
    gen = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1
    save_adapter(model, config, out, base)
    return model.eval(), out


@pytest.fixture(scope="module", params=["llama", "qwen3", "gpt2", "gemma3"])
def adapted(request, checkpoint_factory, tmp_path_factory):
    """(family, base folder, our adapted model, adapter folder) with every projection adapted."""
    base = checkpoint_factory(request.param)
    model, adapter = random_adapter(base, tmp_path_factory.mktemp("adapter") / "adapter")
    return request.param, base, model, adapter


# -- training ------------------------------------------------------------------------------------------------


# Gemma 3 without a final soft-cap, as the published models: the tests' cap of 4 keeps every probability far from 1.
@pytest.mark.parametrize("family, overrides", [("llama", {}), ("gemma3", {"final_logit_softcapping": None})])
def test_lora_memorises_four_answers_and_greedy_replies_become_the_targets(
    checkpoint_factory, tmp_path, family, overrides
):
    base = checkpoint_factory(family, **overrides)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in PAIRS
    ))
    config = config_from_dict({
        "model": str(base), "data": [str(data)], "out": str(tmp_path / "job"), "max_steps": 30, "lr": 1e-2,
        "batch_size": 4, "lora_rank": 8, "lora_dropout": 0.0, "val_fraction": 0.0, "warmup_ratio": 0.0,
        "checkpoint_interval": 1000,
    })
    result = run_job(config)
    assert result.status == "done", result.reason
    losses = [r.loss for r in result.history]
    assert losses[0] > 3.0 and result.train_loss < 0.15, losses

    engine = Engine.load(base, device="cpu", dtype="float32", adapter=result.adapter_dir)
    for question, answer in PAIRS:
        prompt = engine.chat_prompt([{"role": "user", "content": question}], 16)
        generation = engine.generate(prompt.token_ids, SamplingParams(temperature=0.0), 16)
        assert "".join(generation) == answer
        assert generation.result.finish_reason == "eos"

    prompt = engine.chat_prompt([{"role": "user", "content": PAIRS[0][0]}], 16)
    greedy = SamplingParams(temperature=0.0)
    assert "".join(engine.generate(prompt.token_ids, greedy, 16, use_adapter=False)) != PAIRS[0][1]  # the base
    assert "".join(engine.generate(prompt.token_ids, greedy, 16)) == PAIRS[0][1]  # per request: tuned again


def test_a_fresh_adapter_leaves_the_logits_unchanged_and_only_adapters_train(checkpoint_factory):
    base = checkpoint_factory("qwen2")
    model = load_trainable_model(base, CPU).eval()
    before = logits(model)
    config = apply_lora(model, ["q_proj", "v_proj"], r=2, alpha=4)
    assert config == LoRAConfig(r=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert type(model.model.layers[0].self_attn.q_proj) is LoRALinear
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # base keys keep HF's names


def test_targets_matching_nothing_or_a_non_linear_layer_are_refused(checkpoint_factory):
    model = load_trainable_model(checkpoint_factory("llama"), CPU)
    with pytest.raises(ValueError, match=r"match no layer of this model \(its linear layers: .*q_proj"):
        apply_lora(model, ["query_key_value"])
    with pytest.raises(ValueError, match="model.embed_tokens is a Embedding; LoRA applies to linear layers only"):
        apply_lora(model, ["embed_tokens"])


# -- peft and transformers -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations that peft triggers
def test_adapter_loads_in_peft_with_the_same_logits(adapted):
    from peft import PeftModel

    family, base, model, adapter = adapted
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["fan_in_fan_out"] is (family == "gpt2")
    keys = load_file(str(adapter / ADAPTER_WEIGHTS))
    first = "base_model.model.transformer.h.0.attn.c_attn" if family == "gpt2" else "base_model.model.model.layers.0.self_attn.q_proj"
    assert f"{first}.lora_A.weight" in keys and f"{first}.lora_B.weight" in keys

    peft_model = PeftModel.from_pretrained(hf_model(base), adapter).eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    torch.testing.assert_close(logits(model), theirs, rtol=1e-4, atol=1e-4)
    assert (logits(model) - hf_model(base)(IDS).logits.detach()).abs().max() > 1e-2  # the adapter matters


def test_merged_checkpoint_loads_in_transformers_with_the_same_logits(adapted, tmp_path):
    family, base, model, adapter = adapted
    merged_model = load_trainable_model(base, CPU)
    from engine.lora import load_adapter

    load_adapter(merged_model, adapter)
    expected = logits(merged_model.eval())
    merge_lora(merged_model)
    assert not lora_layers(merged_model)
    out = save_hf_checkpoint(merged_model, base, tmp_path / "merged")
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    with torch.no_grad():
        theirs = hf_model(out)(IDS).logits
    torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-4)


def test_engine_with_adapter_equals_the_merged_model_and_keeps_lora_layers_unfused(adapted, tmp_path):
    family, base, model, adapter = adapted
    engine = Engine.load(base, device="cpu", dtype="float32", adapter=adapter)
    merged = load_trainable_model(base, CPU)
    from engine.lora import load_adapter

    load_adapter(merged, adapter)
    save_hf_checkpoint(merge_lora(merged), base, tmp_path / "merged")
    merged_engine = Engine.load(tmp_path / "merged", device="cpu", dtype="float32")
    torch.testing.assert_close(logits(engine.model), logits(merged_engine.model), rtol=1e-4, atol=1e-4)
    assert engine.adapter_dir == adapter

    layers = lora_layers(engine.model)
    assert layers and all(type(layer) in (LoRALinear, LoRAConv1D) for layer in layers.values())
    if family != "gpt2":
        attention = engine.model.model.layers[0].self_attn
        assert attention.fused_qkv is None  # q/k/v carry LoRA: not fused
        assert type(engine.model.lm_head) is not LoRALinear

    plain = Engine.load(base, device="cpu", dtype="float32")
    ids = plain.raw_prompt("Hello there")
    greedy = SamplingParams(temperature=0.0)
    as_base = engine.generate(ids, greedy, 12, use_adapter=False)
    as_base_text = "".join(as_base)
    expected = plain.generate(ids, greedy, 12)
    assert as_base_text == "".join(expected) and as_base.result.token_ids == expected.result.token_ids
    # the adapter stays off until a request asks for it: the weights are the base model's
    torch.testing.assert_close(logits(engine.model), logits(plain.model), rtol=1e-5, atol=1e-5)


def test_fine_tuning_loads_the_hf_layout_that_inference_prepares(checkpoint_factory):
    """Loading goes one way: load_weights gives the trainable HF layout, prepare_for_inference only follows it."""
    base = checkpoint_factory("llama")
    config = read_model_config(base)
    model = load_trainable_model(base, CPU)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())
    assert all(p.is_contiguous() for p in model.parameters())
    assert model.model.layers[0].self_attn.fused_qkv is None and model.model.layers[0].mlp.fused_gate_up is None
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf_model(base)(IDS).logits, rtol=1e-4, atol=1e-4)
    prepared = load_model(base, config, CPU, torch.float32)
    assert prepared.model.layers[0].self_attn.fused_qkv is not None
    torch.testing.assert_close(logits(prepared), logits(model.eval()), rtol=1e-5, atol=1e-5)


# -- broken adapters -----------------------------------------------------------------------------------------


@pytest.fixture
def adapter_copy(checkpoint_factory, tmp_path) -> tuple[Path, Path]:
    base = checkpoint_factory("llama")
    _, adapter = random_adapter(base, tmp_path / "adapter", ["q_proj", "v_proj"])
    return base, adapter


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda a: (a / ADAPTER_CONFIG).unlink(), r"adapter_config.json: file not found"),
        (lambda a: (a / ADAPTER_CONFIG).write_text('{"r": 4,\n  "peft_type": LORA}'), r"adapter_config.json:2:\d+: invalid JSON"),
        (lambda a: _edit_config(a, peft_type="IA3"), r"adapter_config.json: peft_type is 'IA3'; only LORA"),
        (lambda a: _edit_config(a, r=0), r"adapter_config.json: 'r' must be a positive integer"),
        (lambda a: _edit_config(a, use_dora=True), r"adapter_config.json: DoRA adapters are not supported"),
        (lambda a: _edit_config(a, bias="all"), r"adapter_config.json: only bias \"none\" is supported"),
        (lambda a: _edit_config(a, target_modules=["nope"]), r"adapter_config.json: target modules \['nope'\] match no layer"),
        (lambda a: (a / ADAPTER_WEIGHTS).unlink(), r"adapter_model.safetensors: file not found"),
        (lambda a: (a / ADAPTER_WEIGHTS).write_bytes(b"garbage"), r"adapter_model.safetensors: not a readable safetensors"),
    ],
)
def test_broken_adapter_config_gives_one_line_naming_the_file(adapter_copy, breakage, message):
    base, adapter = adapter_copy
    breakage(adapter)
    with pytest.raises(CheckpointError, match=message) as info:
        Engine.load(base, device="cpu", dtype="float32", adapter=adapter)
    assert "\n" not in str(info.value)


def _edit_weights(adapter: Path, edit) -> None:
    path = adapter / ADAPTER_WEIGHTS
    weights = load_file(str(path))
    edit(weights)
    save_file(weights, str(path))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.pop(f"{Q0}.lora_B.weight"), rf"missing key {Q0}.lora_B.weight"),
        (lambda w: w.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)}),
         r"unexpected key base_model.model.lm_head.weight"),
        (lambda w: w.update({f"{Q0}.lora_A.weight": torch.zeros(4, 7)}),
         rf"shape mismatch for {Q0}.lora_A.weight: the adapter has \[4, 7\], this model needs \[4, 64\]"),
        (lambda w: w.update({f"{Q0}.lora_A.weight": torch.zeros(3, 64)}), r"which is not rank r=4"),
        (lambda w: w.update({
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(128, 4)}),
         r"mlp.up_proj.lora_A.weight names a module this model does not have or that target_modules does not select"),
    ],
)
def test_broken_adapter_weights_name_the_key(adapter_copy, edit, message):
    base, adapter = adapter_copy
    _edit_weights(adapter, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        Engine.load(base, device="cpu", dtype="float32", adapter=adapter)
    assert "\n" not in str(info.value) and ADAPTER_WEIGHTS in str(info.value)


def test_adapter_of_another_base_model_is_refused(checkpoint_factory, tmp_path):
    _, adapter = random_adapter(checkpoint_factory("qwen3"), tmp_path / "adapter", ["q_proj"])  # head_dim 24
    with pytest.raises(CheckpointError, match=r"shape mismatch .* trained on another base model"):
        Engine.load(checkpoint_factory("llama"), device="cpu", dtype="float32", adapter=adapter)


def test_adapter_folder_that_is_not_a_folder(checkpoint_factory, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        Engine.load(checkpoint_factory("llama"), device="cpu", dtype="float32", adapter=tmp_path / "missing")


def test_adapter_whose_targets_are_a_regex_loads_like_the_list(adapter_copy):
    base, adapter = adapter_copy
    listed = Engine.load(base, device="cpu", dtype="float32", adapter=adapter)
    _edit_config(adapter, target_modules=r".*\.(q_proj|v_proj)")  # PEFT's other form
    regex = Engine.load(base, device="cpu", dtype="float32", adapter=adapter)
    assert sorted(lora_layers(regex.model)) == sorted(lora_layers(listed.model))
    torch.testing.assert_close(logits(regex.model), logits(listed.model), rtol=0, atol=0)
