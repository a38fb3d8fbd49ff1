"""Gemma 3 GGUF files as llama.cpp's converter writes them (tests/gguf_files.py): a tiny random
Gemma3ForCausalLM with local and global layers (every 6th global, as llama.cpp assumes), linear RoPE
scaling on the global layers and a final soft-cap, against transformers on the original checkpoint; the
quantized types the published Q4_K_M file mixes; the config llama.cpp derives from the metadata; bad files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import pytest
import torch
import torch.nn as nn

from checkpoints import hf_model, make_checkpoint
from engine import Engine
from engine.checkpoint import load_model, read_model_config
from engine.quant import QuantizedEmbedding, QuantizedLinear, quant_kernels_available
from gguf_files import Q, assert_same_model, finish, load_error, sample_ids, write_gguf

CPU = torch.device("cpu")
LAYERS = ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]  # llama.cpp's pattern over 7 layers
# What llama.cpp can represent: every 6th layer global and queries scaled by head_dim ** -0.5 (the converter
# writes neither, llama.cpp assumes both), no attention-score soft-cap (the converter refuses one). Local
# RoPE base 100 (rope.freq_base_swa), not llama.cpp's default 10000. Rows of 96: whole 32-value blocks.
GEMMA3_AS_LLAMA_CPP_RUNS_IT = dict(
    hidden_size=96, num_hidden_layers=7, layer_types=LAYERS, query_pre_attn_scalar=24, attn_logit_softcapping=None,
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
)


# The published Gemma 3 270M Q4_K_M file's mix of types (rows of 256 for the K-quants), and its one key/value head.
Q4_K_M_MIX = {"token_embd": Q.Q8_0, "attn_q": Q.Q5_0, "attn_k": Q.Q5_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_K,
              "ffn_gate": Q.Q5_0, "ffn_up": Q.Q5_0, "ffn_down": Q.Q6_K}
WIDE = dict(hidden_size=256, intermediate_size=256, head_dim=64, num_key_value_heads=1, query_pre_attn_scalar=64)


@pytest.fixture(scope="module")
def gemma3_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gemma3"), "gemma3", tokenizer, **GEMMA3_AS_LLAMA_CPP_RUNS_IT)


@pytest.fixture(scope="module")
def wide_gemma3_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gemma3-wide"), "gemma3", tokenizer,
                           **{**GEMMA3_AS_LLAMA_CPP_RUNS_IT, **WIDE})


def test_the_checkpoint_has_what_the_tests_are_about(gemma3_checkpoint):
    config = read_model_config(gemma3_checkpoint)
    assert config.sliding == (True,) * 5 + (False, True) and config.sliding_window < sample_ids().shape[1]
    assert config.rope_scaling.kind == "linear" and config.final_logit_softcapping is not None
    assert config.rope_local_theta == 100.0


def test_float32_gguf_matches_transformers_on_the_original(gemma3_checkpoint, tmp_path):
    path, _ = write_gguf(gemma3_checkpoint, tmp_path / "gemma3.gguf", "gemma3")
    assert_same_model(path, gemma3_checkpoint, atol=1e-5, new_tokens=16)


def test_config_from_the_gguf_equals_the_one_from_config_json(gemma3_checkpoint, tmp_path):
    path, _ = write_gguf(gemma3_checkpoint, tmp_path / "gemma3.gguf", "gemma3")
    ours, theirs = read_model_config(path), read_model_config(gemma3_checkpoint)
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)  # GGUF stores it as float32
    assert replace(ours, rms_norm_eps=theirs.rms_norm_eps) == theirs


def test_norms_stored_as_one_plus_w_are_loaded_as_w(gemma3_checkpoint, tmp_path):
    """The file holds 1 + w for every norm (the converter's norm_shift); our modules hold w, as HF does."""
    path, _ = write_gguf(gemma3_checkpoint, tmp_path / "gemma3.gguf", "gemma3")
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(path).tensors}
    model = load_model(path, read_model_config(path), CPU, torch.bfloat16)
    layer = model.model.layers[0]
    norms = {"blk.0.attn_norm": layer.input_layernorm, "blk.0.post_attention_norm": layer.post_attention_layernorm,
             "blk.0.ffn_norm": layer.pre_feedforward_layernorm, "blk.0.post_ffw_norm": layer.post_feedforward_layernorm,
             "blk.0.attn_q_norm": layer.self_attn.q_norm, "blk.0.attn_k_norm": layer.self_attn.k_norm,
             "output_norm": model.model.norm}
    for name, module in norms.items():
        # subtracted in float32, then rounded once to bfloat16
        assert torch.equal(module.weight, (stored[f"{name}.weight"] - 1).to(torch.bfloat16)), name


@pytest.mark.parametrize("weight_type", [Q.Q8_0, Q.Q5_0], ids=lambda q: q.name)
def test_quantized_gguf_matches_transformers_on_its_dequantized_weights(gemma3_checkpoint, tmp_path, weight_type):
    path, effective = write_gguf(gemma3_checkpoint, tmp_path / "gemma3.gguf", "gemma3", weight_type)
    assert_same_model(path, effective, new_tokens=16)


@pytest.mark.skipif(not quant_kernels_available(), reason="the quantized kernels need AVX2 and a C++ compiler")
def test_auto_keeps_the_blocks_and_prefill_equals_the_dequantized_model(gemma3_checkpoint, tmp_path, float32_prefill):
    path, _ = write_gguf(gemma3_checkpoint, tmp_path / "gemma3.gguf", "gemma3", Q.Q8_0)
    model = Engine.load(path, device="cpu", dtype="auto").model
    assert type(model.model.embed_tokens) is QuantizedEmbedding
    assert model.lm_head.blocks.data_ptr() == model.model.embed_tokens.blocks.data_ptr()  # tied
    assert all(type(m) is QuantizedLinear for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear)))
    dense = load_model(path, read_model_config(path), CPU, torch.float32)
    with torch.inference_mode():  # prefill dequantizes the blocks and runs the dense model's GEMM
        torch.testing.assert_close(model(sample_ids()), dense(sample_ids()), rtol=1e-5, atol=1e-5)


def test_q4_k_m_mix_matches_transformers_on_its_dequantized_weights(wide_gemma3_checkpoint, tmp_path):
    path, effective = write_gguf(wide_gemma3_checkpoint, tmp_path / "mix.gguf", "gemma3", types_by_name=Q4_K_M_MIX)
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {Q.F32, *Q4_K_M_MIX.values()}
    assert_same_model(path, effective, new_tokens=16)


@pytest.mark.skipif(not quant_kernels_available(), reason="the quantized kernels need AVX2 and a C++ compiler")
def test_q4_k_m_mix_on_the_blocks_prefills_as_the_dequantized_model(wide_gemma3_checkpoint, tmp_path, float32_prefill):
    path, _ = write_gguf(wide_gemma3_checkpoint, tmp_path / "mix.gguf", "gemma3", types_by_name=Q4_K_M_MIX)
    model = Engine.load(path, device="cpu", dtype="auto").model
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.qtype == Q.Q4_K and layer.mlp.down_proj.qtype == Q.Q6_K
    dense = load_model(path, read_model_config(path), CPU, torch.float32)
    with torch.inference_mode():  # float32 summation order apart (the random K-quant blocks make larger sums)
        torch.testing.assert_close(model(sample_ids()), dense(sample_ids()), rtol=1e-4, atol=1e-4)


def test_a_file_without_the_norm_shift_gives_other_logits(gemma3_checkpoint, tmp_path):
    """The shift matters: a file whose norms were written as w (no norm_shift) no longer matches."""
    path, _ = write_gguf(gemma3_checkpoint, tmp_path / "gemma3.gguf", "gemma3")
    unshifted = _rewrite_norms(path, tmp_path / "unshifted.gguf", lambda w: w - 1)
    engine = Engine.load(unshifted, device="cpu", dtype="float32")
    with torch.inference_mode():
        assert (engine.model(sample_ids()) - hf_model(gemma3_checkpoint)(sample_ids()).logits).abs().max() > 1e-2


# -- the config llama.cpp derives from the metadata ----------------------------------------------


def _metadata_only(path: Path, drop: tuple[str, ...] = (), **values) -> Path:
    """A gemma3 GGUF with the published 270M model's metadata (values override, drop removes) and no weights."""
    metadata = {"context_length": 32768, "embedding_length": 640, "block_count": 18, "feed_forward_length": 2048,
                "attention.head_count": 4, "attention.head_count_kv": 1, "attention.key_length": 256,
                "attention.value_length": 256, "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 1e6,
                "attention.sliding_window": 512, **values}
    writer = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in metadata.items():
        if key not in drop:
            add = {float: writer.add_float32, int: writer.add_uint32, str: writer.add_string,
                   list: writer.add_array}[type(value)]
            add(f"gemma3.{key}", value)
    writer.add_token_list(["<pad>", "<eos>", "<bos>"])
    finish(writer)
    return path


def test_the_published_270m_metadata_gets_llama_cpps_defaults(tmp_path):
    config = read_model_config(_metadata_only(tmp_path / "270m.gguf"))
    assert [i for i, sliding in enumerate(config.sliding) if not sliding] == [5, 11, 17]
    assert config.sliding_window == 512 and config.rope_local_theta == 10000.0 and config.rope_theta == 1e6  # no freq_base_swa
    assert config.query_pre_attn_scalar == 256 and config.final_logit_softcapping is None
    assert config.tie_word_embeddings and config.head_dim == 256 and config.num_key_value_heads == 1


@pytest.mark.parametrize(("pattern", "global_layers"), [
    (3, [2, 5, 8, 11, 14, 17]),  # every 3rd layer global
    ([i % 4 != 0 for i in range(18)], [0, 4, 8, 12, 16]),  # one bool per layer: True is local
    (0, []),  # every layer local
])
def test_a_sliding_window_pattern_key_overrides_every_sixth(tmp_path, pattern, global_layers):
    path = _metadata_only(tmp_path / "pattern.gguf", **{"attention.sliding_window_pattern": pattern})
    assert [i for i, sliding in enumerate(read_model_config(path).sliding) if not sliding] == global_layers


def test_a_pattern_of_the_wrong_length_is_named(tmp_path):
    path = _metadata_only(tmp_path / "bad.gguf", **{"attention.sliding_window_pattern": [True] * 17})
    assert "'gemma3.attention.sliding_window_pattern' has 17 entries for 18 layers" in load_error(path)


def test_the_27b_model_scales_queries_by_its_width_per_head(tmp_path):
    """llama.cpp (and HF's config: query_pre_attn_scalar 168) scale the 62-layer model by (5376 / 32) ** -0.5."""
    path = _metadata_only(tmp_path / "27b.gguf", block_count=62, embedding_length=5376, **{"attention.head_count": 32,
                          "attention.head_count_kv": 16, "attention.key_length": 128, "attention.value_length": 128})
    assert read_model_config(path).query_pre_attn_scalar == 168


def test_without_a_sliding_window_every_layer_is_global(tmp_path):
    config = read_model_config(_metadata_only(tmp_path / "global.gguf", drop=("attention.sliding_window",)))
    assert not any(config.sliding)


def test_final_logit_softcapping_and_linear_rope_scaling_are_read(tmp_path):
    path = _metadata_only(tmp_path / "4b.gguf", final_logit_softcapping=30.0,
                          **{"rope.scaling.type": "linear", "rope.scaling.factor": 8.0})
    config = read_model_config(path)
    assert config.final_logit_softcapping == 30.0
    assert config.rope_scaling.kind == "linear" and config.rope_scaling.factor == 8.0


# -- bad files ----------------------------------------------------------------------------------


def test_a_missing_required_key_is_named_in_one_line(tmp_path):
    path = _metadata_only(tmp_path / "bad.gguf", drop=("attention.layer_norm_rms_epsilon",))
    assert "missing required metadata key 'gemma3.attention.layer_norm_rms_epsilon'" in load_error(path)


def test_a_vision_projector_file_is_refused_as_such(tmp_path):
    path = tmp_path / "mmproj-gemma-3.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    finish(writer)
    assert "a vision projector (llama.cpp's mmproj file" in load_error(path)


def test_a_missing_norm_is_named(gemma3_checkpoint, tmp_path):
    path, _ = write_gguf(gemma3_checkpoint, tmp_path / "m.gguf", "gemma3", skip_tensors=("blk.5.post_ffw_norm.weight",))
    assert "missing weights: model.layers.5.post_feedforward_layernorm.weight" in load_error(path)


def _rewrite_norms(path: Path, out: Path, change) -> Path:
    """A copy of a GGUF file (F32 tensors) with change() applied to every norm weight."""
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(out), "gemma3")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        types = field.types
        writer.add_key_value(name, field.contents(), types[0],
                             sub_type=types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = t.data.copy()
        writer.add_tensor(t.name, change(data) if t.name.endswith("norm.weight") else data)
    finish(writer)
    return out
