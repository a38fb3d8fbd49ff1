"""Checkpoint loading: every way a model folder can be broken gives a one-line CheckpointError naming the
problem; unusual but valid layouts (sharded, bfloat16, GPT-2 without prefix) load and give the same logits;
generation_config.json and tokenizer_config.json are honoured; device and dtype names are checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import hf_model
from engine import CheckpointError, Engine, EngineError, SamplingParams
from engine.checkpoint import load_model, read_model_config
from engine.device import resolve_device, resolve_dtype

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel",
             "Gemma3ForCausalLM")
CPU = torch.device("cpu")



@pytest.fixture
def llama_copy(checkpoint_factory, tmp_path) -> Path:
    """A private copy of the tiny llama checkpoint that a test may break."""
    return Path(shutil.copytree(checkpoint_factory("llama"), tmp_path / "llama"))


def load(path: Path, **kw) -> Engine:
    return Engine.load(path, device=kw.pop("device", "cpu"), dtype=kw.pop("dtype", "float32"), **kw)


def load_error(path: Path) -> str:
    """The one-line message of the CheckpointError that loading path raises."""
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def logits(model: torch.nn.Module, vocab: int = 400) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model(ids)


def ours(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return load_model(path, read_model_config(path), CPU, dtype)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def rewrite_weights(path: Path, edit) -> None:
    """Load model.safetensors, let edit(dict) change it, save it back."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


# -- config.json --------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    message = load_error(tmp_path / "nowhere")
    assert "nowhere" in message and "not a directory" in message


def test_missing_config_json(llama_copy):
    (llama_copy / "config.json").unlink()
    message = load_error(llama_copy)
    assert "config.json" in message and "not found" in message


def test_invalid_json_in_config_names_file_line_and_column(llama_copy):
    text = '{\n  "architectures": ["LlamaForCausalLM"],\n  "hidden_size": 64,,\n  "vocab_size": 400\n}\n'
    (llama_copy / "config.json").write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    line, col = expected.value.lineno, expected.value.colno
    assert line == 3
    message = load_error(llama_copy)
    assert f"config.json:{line}:{col}" in message
    assert "invalid JSON" in message


def test_unsupported_architecture_lists_the_supported_ones(llama_copy):
    edit_json(llama_copy / "config.json", architectures=["BertForMaskedLM"], model_type="bert")
    message = load_error(llama_copy)
    assert "BertForMaskedLM" in message and "unsupported architecture" in message
    for name in SUPPORTED:
        assert name in message


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"},
         "unsupported architecture 'Gemma3ForConditionalGeneration'"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
        ({"layer_types": ["sliding_attention"]}, "'layer_types' must list num_hidden_layers=4 entries"),
        ({"hidden_activation": "silu"}, "hidden_activation 'silu' is not supported"),
    ],
    ids=["multimodal", "bidirectional", "layer_types", "activation"],
)
def test_gemma3_configs_we_cannot_run_are_refused(checkpoint_factory, tmp_path, changes, expected):
    folder = Path(shutil.copytree(checkpoint_factory("gemma3"), tmp_path / "gemma3"))
    edit_json(folder / "config.json", **changes)
    message = load_error(folder)
    assert "config.json" in message and expected in message


def test_missing_required_config_key_is_named(llama_copy):
    edit_json(llama_copy / "config.json", hidden_size=None)
    message = load_error(llama_copy)
    assert "hidden_size" in message and "config.json" in message


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                             "original_max_position_embeddings": 64}},
        {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0}},  # pre-5 spelling
    ],
    ids=["rope_parameters", "rope_scaling"],
)
def test_unsupported_rope_scaling_type_yarn(llama_copy, rope):
    edit_json(llama_copy / "config.json", **rope)
    message = load_error(llama_copy)
    assert "'yarn'" in message and "not supported" in message and "rope_scaling" in message


@pytest.mark.parametrize(
    "rope",
    [{"rope_type": "linear", "rope_theta": 10000.0}, {"rope_type": "llama3", "rope_theta": 10000.0}],
    ids=["linear", "llama3"],
)
def test_rope_scaling_without_its_factor_is_a_checkpoint_error(llama_copy, rope):
    edit_json(llama_copy / "config.json", rope_parameters=rope)
    message = load_error(llama_copy)  # not a bare KeyError('factor') with a traceback
    assert "factor" in message and "config.json" in message


def test_non_numeric_config_value_is_a_checkpoint_error(llama_copy):
    edit_json(llama_copy / "config.json", hidden_size="abc")
    message = load_error(llama_copy)  # not a bare ValueError from int()
    assert "hidden_size" in message and "config.json" in message


# -- weights ------------------------------------------------------------------------------------


def test_missing_weight_key_is_named(llama_copy):
    rewrite_weights(llama_copy, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    message = load_error(llama_copy)
    assert "missing weights" in message and "model.layers.1.mlp.down_proj.weight" in message


def test_unexpected_extra_key_is_named(llama_copy):
    rewrite_weights(llama_copy, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)}))
    message = load_error(llama_copy)
    assert "unexpected weights" in message and "model.layers.0.mlp.extra_proj.weight" in message


def test_shape_mismatch_names_key_and_both_shapes(llama_copy):
    key = "model.layers.0.self_attn.q_proj.weight"
    rewrite_weights(llama_copy, lambda t: t.update({key: torch.zeros(32, 64)}))
    message = load_error(llama_copy)
    assert "shape mismatch" in message and key in message
    assert "[32, 64]" in message and "[64, 64]" in message
    assert "model.safetensors" in message


def test_truncated_safetensors_names_the_file(llama_copy):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = load_error(llama_copy)
    assert str(path) in message and "truncated" in message


def test_garbage_header_names_the_file(llama_copy):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    message = load_error(llama_copy)
    assert str(path) in message and "corrupt" in message


def test_header_length_beyond_the_file_names_the_file(llama_copy):
    path = llama_copy / "model.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b'{"a": 1}')
    message = load_error(llama_copy)
    assert str(path) in message and ("corrupt" in message or "truncated" in message)


def test_file_shorter_than_the_header_length_field(llama_copy):
    path = llama_copy / "model.safetensors"
    path.write_bytes(b"\x01\x02")
    message = load_error(llama_copy)
    assert str(path) in message and "corrupt" in message


def test_header_entry_whose_byte_range_disagrees_with_its_shape(llama_copy):
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 128]}}).encode()
    path = llama_copy / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(128))
    message = load_error(llama_copy)
    assert str(path) in message and "model.norm.weight" in message and "corrupt" in message


def test_progress_reports_bytes_up_to_the_total(checkpoint_factory):
    calls: list[tuple[int, int]] = []
    notes: list[str | None] = []
    load(checkpoint_factory("llama"), progress=lambda done, total, note: (calls.append((done, total)), notes.append(note)))
    assert calls and set(notes) == {None}, "no slow step besides the weights (float32: no kernels to build)"
    totals = {total for _, total in calls}
    assert len(totals) == 1 and totals.pop() > 0
    dones = [done for done, _ in calls]
    assert dones == sorted(dones) and dones[-1] == calls[-1][1]


def test_no_weights_at_all(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    message = load_error(llama_copy)
    assert "no model.safetensors" in message


def test_only_pytorch_model_bin_asks_for_safetensors(llama_copy):
    weights = load_file(llama_copy / "model.safetensors")
    (llama_copy / "model.safetensors").unlink()
    torch.save(weights, llama_copy / "pytorch_model.bin")
    message = load_error(llama_copy)
    assert "pytorch_model.bin" in message and "safetensors" in message


@pytest.fixture
def sharded(checkpoint_factory, tmp_path) -> tuple[Path, Path]:
    """(single-file checkpoint, the same weights saved by transformers in ~20 KB shards)."""
    single = checkpoint_factory("llama")
    folder = tmp_path / "sharded"
    hf_model(single).save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(single / name, folder / name)
    return single, folder


def test_sharded_checkpoint_loads_and_matches_the_single_file(sharded):
    single, folder = sharded
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").exists()
    assert not (folder / "model.safetensors").exists()
    torch.testing.assert_close(logits(ours(folder)), logits(ours(single)), rtol=0, atol=0)
    engine = load(folder)
    reference = load(single)
    prompt = engine.chat_prompt([{"role": "user", "content": "Hello there!"}], 8).token_ids
    a = engine.generate(prompt, SamplingParams(temperature=0), 8)
    b = reference.generate(prompt, SamplingParams(temperature=0), 8)
    list(a), list(b)
    assert a.result.token_ids == b.result.token_ids


def test_sharded_index_naming_a_missing_shard(sharded):
    _, folder = sharded
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    (folder / missing).unlink()
    message = load_error(folder)
    assert missing in message and "not found" in message


def test_sharded_index_without_weight_map(sharded):
    _, folder = sharded
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    message = load_error(folder)
    assert "weight_map" in message


@pytest.fixture
def bf16_copy(llama_copy) -> Path:
    rewrite_weights(llama_copy, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    assert all(v.dtype == torch.bfloat16 for v in load_file(llama_copy / "model.safetensors").values())
    return llama_copy


def test_bfloat16_checkpoint_loads_as_float32_and_matches_transformers(bf16_copy):
    model = ours(bf16_copy, torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    stored = load_file(bf16_copy / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[key], stored[key].float())
    torch.testing.assert_close(logits(model), logits(hf_model(bf16_copy)).logits, atol=1e-4, rtol=1e-4)


def test_bfloat16_checkpoint_loads_as_bfloat16(bf16_copy):
    engine = load(bf16_copy, dtype="bfloat16")
    assert engine.dtype == torch.bfloat16
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    out = logits(engine.model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # Same weights, computed in float32: the bfloat16 forward stays close.
    torch.testing.assert_close(out.float(), logits(ours(bf16_copy)), atol=0.15, rtol=0.05)


def test_float32_checkpoint_loads_as_bfloat16(checkpoint_factory):
    model = ours(checkpoint_factory("qwen2"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_gpt2_checkpoint_without_transformer_prefix_loads_and_matches(checkpoint_factory, tmp_path):
    """The original openai gpt2 upload: keys without 'transformer.', plus old attn.bias mask buffers."""
    original = checkpoint_factory("gpt2")
    folder = Path(shutil.copytree(original, tmp_path / "gpt2"))

    def strip(tensors: dict) -> None:
        renamed = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
        assert all(not k.startswith("transformer.") for k in renamed) and "wte.weight" in renamed
        renamed["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
        renamed["h.1.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
        tensors.clear()
        tensors.update(renamed)

    rewrite_weights(folder, strip)
    torch.testing.assert_close(logits(ours(folder)), logits(ours(original)), rtol=0, atol=0)
    torch.testing.assert_close(logits(ours(folder)), logits(hf_model(original)).logits, atol=1e-4, rtol=1e-4)


def test_tied_checkpoint_that_also_stores_lm_head_loads(checkpoint_factory, tmp_path):
    """Some tied checkpoints store lm_head.weight too (a copy of the embedding): it is not 'unexpected'."""
    folder = Path(shutil.copytree(checkpoint_factory("qwen2"), tmp_path / "qwen2"))
    rewrite_weights(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    torch.testing.assert_close(logits(ours(folder)), logits(ours(checkpoint_factory("qwen2"))), rtol=0, atol=0)


# -- generation_config.json and tokenizer_config.json -------------------------------------------


def test_generation_config_eos_list_gives_all_eos_ids(llama_copy):
    edit_json(llama_copy / "generation_config.json", eos_token_id=[2, 7, 9])
    engine = load(llama_copy)
    assert engine.defaults.eos_token_ids == [2, 7, 9]
    assert {2, 7, 9} <= engine.eos_token_ids


def test_generation_config_do_sample_false_means_greedy_by_default(llama_copy):
    edit_json(llama_copy / "generation_config.json", do_sample=False, temperature=0.6, top_k=20)
    engine = load(llama_copy)
    assert engine.defaults.temperature == 0.0
    assert engine.default_sampling().temperature == 0.0
    assert engine.default_sampling().top_k == 20


def test_generation_config_sampling_values_are_the_defaults(llama_copy):
    edit_json(llama_copy / "generation_config.json", do_sample=True, temperature=0.6, top_p=0.8, max_new_tokens=77)
    engine = load(llama_copy)
    assert engine.default_sampling().temperature == 0.6
    assert engine.default_sampling().top_p == 0.8
    assert engine.defaults.max_new_tokens == 77


def test_missing_generation_config_falls_back_to_config_eos(llama_copy):
    (llama_copy / "generation_config.json").unlink()
    engine = load(llama_copy)
    assert engine.defaults.eos_token_ids == [2]
    assert engine.defaults.temperature == 0.7


def test_tokenizer_config_without_chat_template_uses_chatml_and_still_generates(llama_copy):
    edit_json(llama_copy / "tokenizer_config.json", chat_template=None)
    engine = load(llama_copy)
    assert not engine.tokenizer.has_chat_template
    prompt = engine.chat_prompt([{"role": "user", "content": "Hello there!"}], 5)
    assert prompt.text == "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n"
    gen = engine.generate(prompt.token_ids, SamplingParams(temperature=0), 5)
    text = "".join(gen)
    assert gen.result.finish_reason in ("length", "eos")
    assert gen.result.generated_tokens == 5 or gen.result.finish_reason == "eos"
    assert text == gen.result.text


# -- device and dtype names ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["float8", "int8", "f32x"])
def test_resolve_dtype_rejects_unknown_names(name):
    with pytest.raises(EngineError, match=f"unknown dtype '{name}'") as info:
        resolve_dtype(name, CPU)
    assert "float32" in str(info.value) and "bfloat16" in str(info.value)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("float32", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16), ("half", torch.float16)],
)
def test_resolve_dtype_accepts_names_and_aliases(name, dtype):
    assert resolve_dtype(name, CPU) is dtype


def test_resolve_dtype_auto_on_cpu_is_a_float_type():
    assert resolve_dtype("auto", CPU) in (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("name", ["tpu", "gpu", "nonsense"])
def test_resolve_device_rejects_unknown_names(name):
    with pytest.raises(EngineError, match=f"unknown device '{name}'"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_resolve_device_cuda_without_a_gpu():
    with pytest.raises(EngineError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")


def test_engine_load_rejects_a_bad_dtype(checkpoint_factory):
    with pytest.raises(EngineError, match="unknown dtype"):
        Engine.load(checkpoint_factory("llama"), device="cpu", dtype="int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_cuda_float32_greedy_ids_equal_cpu(checkpoint_factory, family):
    path = checkpoint_factory(family)
    cpu = load(path)
    gpu = load(path, device="cuda")
    assert gpu.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    cpu.eos_token_ids = gpu.eos_token_ids = set()
    prompt = cpu.chat_prompt([{"role": "user", "content": "Hello there! How are you doing today?"}], 32).token_ids
    results = []
    for engine in (cpu, gpu):
        gen = engine.generate(prompt, SamplingParams(temperature=0), 32)
        list(gen)
        results.append(gen.result.token_ids)
    assert len(results[0]) == 32
    assert results[0] == results[1]
