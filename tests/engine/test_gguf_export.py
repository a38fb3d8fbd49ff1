"""GGUF export (engine.gguf.writer): our quantizer against gguf.quants byte for byte; exported files against
transformers (F32: the original; quantized: the weights as gguf.quants rounds them), against the layout of
tests/gguf_files.py's converter (gguf's own tensor name map), the metadata llama.cpp reads, the tokenizer
and chat template round trip, atomic writes, and a fine-tune merged into a GGUF file, then generating."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import CHATML_TEMPLATE
from engine import Engine, SamplingParams
from engine.errors import ExportError
from engine.gguf.quantize import quantize_rows
from engine.gguf.vocab import add_tokenizer_metadata
from engine.gguf.writer import export_model
from engine.tokenizer import ChatTokenizer
from gguf_files import (
    _GPT2_CONV1D, _MODEL_ARCH, GGUF_ARCH, Q, assert_same_model, finish, sample_ids, llama_cpp_permute, tiny_lora_job,
    write_gguf,
)

FAMILIES = ("llama", "llama_tied_llama3_rope", "llama_linear_rope", "mistral", "qwen2", "qwen3", "gpt2")
TEXTS = [
    "Hello there! How are you doing today? The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好。",
    "def main():\n    print('hello world')\n    return 0\n",
    "Emoji test 😀🎉🚀 and accents: café naïve résumé. 2024-12-02, 3.14159",
    "  leading  and   trailing   \n\n\t tabs\t\tand\r\n  newlines  \n   ",
    "<|im_start|>user\nhi<|im_end|>",
]


# -- our quantizer --------------------------------------------------------------------------------------


def _awkward_rows() -> torch.Tensor:
    """(8, 256): normal values, and blocks that are all zero, constant, hold +x and -x as the largest
    magnitude, or values at exact halves of the scale."""
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    w[0, :32] = 0
    w[1, :32] = 0.75
    w[2, 3], w[2, 9] = 4.0, -4.0
    w[3, :32] = torch.arange(32) / 2 - 8
    w[4] *= 1e-6
    return w


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_our_quantizer_writes_the_bytes_gguf_quants_writes(qtype):
    w = _awkward_rows()
    ours = quantize_rows(w, qtype).numpy()
    np.testing.assert_array_equal(ours, gguf.quants.quantize(w.numpy(), qtype))


def test_the_quantizer_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="not a whole number of Q8_0 blocks"):
        quantize_rows(torch.zeros(2, 48), Q.Q8_0)


# -- the weights --------------------------------------------------------------------------------------


def _export(checkpoint: Path, tmp_path: Path, file_type: str, name: str = "m.gguf") -> Path:
    return export_model(checkpoint, tmp_path / name, file_type).path


def _hf_layout(family: str, checkpoint: Path):
    """(gguf's name map, HF state) for the checkpoint."""
    hf = json.loads((checkpoint / "config.json").read_text())
    names = gguf.get_tensor_name_map(_MODEL_ARCH[GGUF_ARCH[family]], hf.get("num_hidden_layers") or hf["n_layer"])
    return hf, names, load_file(checkpoint / "model.safetensors")


def _stored_as_converter_lays_it_out(family: str, hf: dict, name: str, w: np.ndarray) -> np.ndarray:
    """An HF tensor in llama.cpp's layout: Conv1D transposed, llama Q/K rows permuted (tests/gguf_files.py)."""
    if GGUF_ARCH[family] == "gpt2" and name.endswith(".weight") and name.split(".")[-2] in _GPT2_CONV1D:
        w = np.ascontiguousarray(w.T)
    if GGUF_ARCH[family] == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
        w = llama_cpp_permute(w, hf["num_attention_heads"], hf["num_attention_heads"])
    elif GGUF_ARCH[family] == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
        w = llama_cpp_permute(w, hf["num_attention_heads"], hf["num_key_value_heads"])
    return w


def _effective_checkpoint(family: str, checkpoint: Path, path: Path, out: Path) -> Path:
    """The checkpoint with every weight as the file stores it, by gguf.quants: quantized to the type the file
    gives that tensor and dequantized (rows are quantized independently, so Q/K row order does not matter)."""
    hf, names, state = _hf_layout(family, checkpoint)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    effective = {}
    for key, tensor in state.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        w = tensor.float().numpy()
        conv1d = GGUF_ARCH[family] == "gpt2" and name.endswith(".weight") and name.split(".")[-2] in _GPT2_CONV1D
        laid = np.ascontiguousarray(w.T) if conv1d else w
        stored = gguf.quants.dequantize(gguf.quants.quantize(laid, types[name]), types[name]).reshape(laid.shape)
        effective[key] = torch.from_numpy(np.ascontiguousarray(stored.T if conv1d else stored))
    shutil.copytree(checkpoint, out)
    save_file(effective, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_export_matches_transformers_on_the_original(checkpoint_factory, tmp_path, family):
    checkpoint = checkpoint_factory(family)
    assert_same_model(_export(checkpoint, tmp_path, "F32"), checkpoint)


@pytest.mark.parametrize("family", ["llama", "llama_tied_llama3_rope", "qwen3", "gpt2"])
def test_float32_export_has_the_converters_tensors_and_hyperparameters(checkpoint_factory, tmp_path, family):
    """Same tensor names, shapes and values as tests/gguf_files.py's converter (gguf's own name map and
    llama.cpp's permute), and the same {arch}.* values."""
    checkpoint = checkpoint_factory(family)
    ours = gguf.GGUFReader(_export(checkpoint, tmp_path, "F32"))
    theirs = gguf.GGUFReader(write_gguf(checkpoint, tmp_path / "converter.gguf", family)[0])
    ours_tensors, their_tensors = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    assert sorted(ours_tensors) == sorted(their_tensors)
    for name, t in their_tensors.items():
        assert ours_tensors[name].tensor_type == Q.F32, name
        np.testing.assert_allclose(ours_tensors[name].data, t.data, rtol=1e-6, atol=0, err_msg=name)
    arch = GGUF_ARCH[family]
    for key, field in theirs.fields.items():
        if key.startswith(f"{arch}."):
            assert ours.fields[key].contents() == pytest.approx(field.contents()), key


@pytest.mark.parametrize("file_type", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_quantized_export_matches_transformers_on_the_weights_as_gguf_quants_rounds_them(
        checkpoint_factory, tmp_path, family, file_type):
    """Every tensor holds the bytes gguf.quants writes for its type; loaded, the file computes what transformers
    computes on those weights dequantized by gguf.quants (float32 logits within 1e-4 of the largest)."""
    checkpoint = checkpoint_factory(family)
    path = _export(checkpoint, tmp_path, file_type)
    hf, names, state = _hf_layout(family, checkpoint)
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for key, tensor in state.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        t = stored[name]
        expected = gguf.quants.quantize(_stored_as_converter_lays_it_out(family, hf, name, tensor.float().numpy()),
                                        t.tensor_type)
        assert np.asarray(t.data).tobytes() == expected.tobytes(), name
    assert_same_model(path, _effective_checkpoint(family, checkpoint, path, tmp_path / "effective"))


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_norms_biases_and_positions_stay_f32_and_a_4_bit_file_keeps_the_output_in_q8_0(checkpoint_factory, tmp_path):
    llama = _types(_export(checkpoint_factory("llama"), tmp_path, "Q4_0", "llama.gguf"))
    assert llama["output.weight"] == "Q8_0" and llama["token_embd.weight"] == "Q4_0"
    assert llama["blk.0.attn_norm.weight"] == llama["output_norm.weight"] == "F32"
    assert llama["blk.1.ffn_down.weight"] == llama["blk.0.attn_q.weight"] == "Q4_0"
    tied = _types(_export(checkpoint_factory("qwen2"), tmp_path, "Q4_1", "qwen2.gguf"))
    assert "output.weight" not in tied and tied["token_embd.weight"] == "Q8_0"  # the embedding is the output
    assert tied["blk.0.attn_q.bias"] == "F32" and tied["blk.0.attn_v.weight"] == "Q4_1"
    gpt2 = _types(_export(checkpoint_factory("gpt2"), tmp_path, "Q8_0", "gpt2.gguf"))
    assert gpt2["position_embd.weight"] == gpt2["blk.0.attn_qkv.bias"] == gpt2["blk.0.attn_norm.bias"] == "F32"
    assert gpt2["token_embd.weight"] == gpt2["output.weight"] == gpt2["blk.0.ffn_up.weight"] == "Q8_0"


def test_matrices_whose_rows_are_not_whole_blocks_fall_back_to_f16(checkpoint_factory, tmp_path):
    checkpoint = checkpoint_factory("llama", hidden_size=48, head_dim=12)  # rows of 48 values: 1.5 blocks
    result = export_model(checkpoint, tmp_path / "m.gguf", "Q8_0")
    types = _types(result.path)
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_gate.weight"] == "F16"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of intermediate_size = 128 values
    assert "blk.0.attn_q.weight" in result.fallbacks and "blk.0.ffn_down.weight" not in result.fallbacks
    assert_same_model(result.path, _effective_checkpoint("llama", checkpoint, result.path, tmp_path / "effective"))


# -- metadata ----------------------------------------------------------------------------------------


def test_the_file_has_the_metadata_llama_cpp_requires(checkpoint_factory, tmp_path):
    checkpoint = checkpoint_factory("qwen3")
    hf = json.loads((checkpoint / "config.json").read_text())
    reader = gguf.GGUFReader(_export(checkpoint, tmp_path, "Q8_0", "tuned.gguf"))
    value = {key: field.contents() for key, field in reader.fields.items()}
    assert value["general.architecture"] == "qwen3" and value["general.name"] == "tuned"
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert value["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    expected = {
        "context_length": hf["max_position_embeddings"], "embedding_length": hf["hidden_size"],
        "block_count": hf["num_hidden_layers"], "feed_forward_length": hf["intermediate_size"],
        "attention.head_count": hf["num_attention_heads"], "attention.head_count_kv": hf["num_key_value_heads"],
        "attention.key_length": hf["head_dim"], "attention.value_length": hf["head_dim"],
        "rope.dimension_count": hf["head_dim"], "vocab_size": hf["vocab_size"],
    }
    for suffix, number in expected.items():
        assert value[f"qwen3.{suffix}"] == number, suffix
    assert value["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(hf["rms_norm_eps"])
    assert value["qwen3.rope.freq_base"] == pytest.approx(hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"])
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert len(value["tokenizer.ggml.tokens"]) == len(value["tokenizer.ggml.token_type"]) == hf["vocab_size"]
    assert value["tokenizer.ggml.merges"][0].count(" ") >= 1
    assert value["tokenizer.ggml.eos_token_id"] == 2 and value["tokenizer.ggml.padding_token_id"] == 0
    assert value["tokenizer.ggml.add_bos_token"] is False
    assert value["tokenizer.chat_template"] == CHATML_TEMPLATE


def test_gemma3_and_unknown_types_are_refused_before_anything_is_written(checkpoint_factory, tmp_path):
    with pytest.raises(ExportError, match="Gemma3ForCausalLM cannot be exported to GGUF yet"):
        export_model(checkpoint_factory("gemma3"), tmp_path / "g.gguf", "Q8_0")
    with pytest.raises(ExportError, match=r"GGUF type 'Q5_K' is not supported for export \(supported: F32"):
        export_model(checkpoint_factory("llama"), tmp_path / "l.gguf", "Q5_K")
    assert list(tmp_path.iterdir()) == []


# -- the tokenizer -------------------------------------------------------------------------------------


def test_the_tokenizer_and_chat_template_round_trip(checkpoint_factory, tmp_path):
    checkpoint = checkpoint_factory("qwen2")
    original, exported = ChatTokenizer.from_dir(checkpoint), ChatTokenizer.from_gguf(_export(checkpoint, tmp_path, "Q8_0"))
    for text in TEXTS:
        ids = original.encode(text)
        assert exported.encode(text) == ids, text
        assert exported.decode(ids) == original.decode(ids) and exported.decode(ids, False) == original.decode(ids, False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[1]},
                {"role": "assistant", "content": TEXTS[2]}, {"role": "user", "content": TEXTS[3]}]
    assert exported.render_chat(messages) == original.render_chat(messages)
    assert exported.encode_chat(messages) == original.encode_chat(messages)
    assert (exported.eos_token, exported.pad_token, exported.bos_token) == ("<|im_end|>", "<|endoftext|>", None)


def _tokenizer_only_gguf(source: Path, path: Path, vocab_size: int) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer_metadata(writer, source, vocab_size)
    finish(writer)
    return path


@pytest.mark.parametrize("folder", ["gpt2", "tinyllama-1.1b-chat-v1.0", "mistral-7b-instruct-v0.2"])
def test_real_tokenizers_round_trip_through_gguf(realworld, tmp_path, folder):
    """GPT-2's byte-level BPE ("gpt2" vocabulary) and SentencePiece-style ones ("llama": scores from the
    merge order, byte tokens, a space prefix) tokenize as their tokenizer.json does."""
    from tokenizers import Tokenizer

    source = realworld / folder
    original = Tokenizer.from_file(str(source / "tokenizer.json"))
    path = _tokenizer_only_gguf(source, tmp_path / "t.gguf", original.get_vocab_size(with_added_tokens=True))
    exported = ChatTokenizer.from_gguf(path)
    for text in TEXTS[:5]:
        if folder != "gpt2" and text.startswith(" "):
            continue  # llama.cpp puts "▁" before text that starts with a space too; tokenizer.json does not
        assert exported.encode(text) == original.encode(text).ids, text
    kind = gguf.GGUFReader(path).fields["tokenizer.ggml.model"].contents()
    assert kind == ("gpt2" if folder == "gpt2" else "llama")


_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")  # as Llama 3's tokenizer.json writes it
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_SPLIT = {"type": "Split", "behavior": "Isolated", "invert": False}
PRE_TOKENIZERS = {
    "gpt-2": ({**_BYTE_LEVEL, "use_regex": True}, False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [{**_SPLIT, "pattern": {"Regex": _LLAMA3_REGEX}}, _BYTE_LEVEL]}, True),
    "qwen2": ({"type": "Sequence", "pretokenizers": [
        {**_SPLIT, "pattern": {"Regex": _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")}}, _BYTE_LEVEL]}, False),
    "smollm": ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {**_BYTE_LEVEL, "use_regex": True}]}, False),
}


@pytest.mark.parametrize("pre", PRE_TOKENIZERS)
def test_a_byte_level_pre_tokenizer_is_named_by_its_llama_cpp_family_and_splits_the_same(checkpoint_factory, tmp_path, pre):
    """tokenizer.json's pre_tokenizer (as GPT-2, Llama 3, Qwen2 and SmolLM write theirs) becomes the
    `tokenizer.ggml.pre` whose llama.cpp rules split text the same way: same ids as the tokenizers library."""
    from tokenizers import Tokenizer

    folder = shutil.copytree(checkpoint_factory("qwen2"), tmp_path / "model")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"], spec["model"]["ignore_merges"] = PRE_TOKENIZERS[pre]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    path = _tokenizer_only_gguf(folder, tmp_path / "t.gguf", 400)
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    original, exported = Tokenizer.from_file(str(folder / "tokenizer.json")), ChatTokenizer.from_gguf(path)
    for text in TEXTS:
        assert exported.encode(text) == original.encode(text).ids, text


def test_a_pre_tokenizer_without_a_llama_cpp_equivalent_is_refused_by_name(checkpoint_factory, tmp_path):
    folder = shutil.copytree(checkpoint_factory("qwen2"), tmp_path / "model")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, _BYTE_LEVEL]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match=r'tokenizer.json: pre-tokenizer step \{"type": "Whitespace"\} has no llama.cpp'):
        export_model(folder, tmp_path / "m.gguf", "Q8_0")
    assert not (tmp_path / "m.gguf").exists()


def test_a_gguf_base_keeps_its_tokenizer_metadata(checkpoint_factory, tmp_path):
    base, _ = write_gguf(checkpoint_factory("qwen2"), tmp_path / "base.gguf", "qwen2", Q.Q8_0, pre="qwen2")
    exported = gguf.GGUFReader(export_model(base, tmp_path / "out.gguf", "Q4_1").path)
    original = gguf.GGUFReader(base)
    tokenizer_keys = [k for k in original.fields if k.startswith("tokenizer.")]
    assert tokenizer_keys and all(exported.fields[k].contents() == original.fields[k].contents() for k in tokenizer_keys)


# -- atomic writes ---------------------------------------------------------------------------------------


def test_a_failed_write_leaves_no_file_and_keeps_an_old_one(checkpoint_factory, tmp_path, monkeypatch):
    import engine.gguf.writer

    calls = []

    def fail_on_third(w, qtype):
        calls.append(qtype)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return quantize_rows(w, qtype)

    monkeypatch.setattr(engine.gguf.writer, "quantize_rows", fail_on_third)
    with pytest.raises(OSError, match="No space left"):
        export_model(checkpoint_factory("llama"), tmp_path / "new.gguf", "Q8_0")
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old.gguf"
    old.write_bytes(b"old contents")
    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        export_model(checkpoint_factory("llama"), old, "Q8_0")
    assert old.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["old.gguf"]


# -- fine-tune, merge, run ---------------------------------------------------------------------------------


def _logits(engine: Engine) -> torch.Tensor:
    with torch.inference_mode():
        return engine.model(sample_ids())


def test_a_lora_fine_tune_merged_into_gguf_runs_as_the_base_plus_adapter(checkpoint_factory, tmp_path):
    base = checkpoint_factory("llama")
    result = tiny_lora_job(base, tmp_path, merge=True, merge_gguf="F32")
    assert Path(result.merged_gguf) == tmp_path / "job" / "merged.gguf"
    merged = Engine.load(result.merged_gguf, device="cpu", dtype="float32")
    unmerged = Engine.load(base, device="cpu", dtype="float32", adapter=result.adapter_dir)
    torch.testing.assert_close(_logits(merged), _logits(unmerged), atol=1e-4, rtol=1e-4)
    assert (_logits(merged) - _logits(Engine.load(base, device="cpu", dtype="float32"))).abs().max() > 1e-3
    assert_same_model(Path(result.merged_gguf), Path(result.merged_dir))  # the Hugging Face merge, in transformers
    generation = merged.generate(merged.tokenizer.encode_chat([{"role": "user", "content": "hi"}]),
                                 SamplingParams(temperature=0.0), max_new_tokens=8)
    assert list(generation) and generation.result.token_ids


def test_a_gguf_base_fine_tunes_and_merges_into_a_quantized_gguf(checkpoint_factory, tmp_path):
    """The job's merged.gguf holds, tensor for tensor, what gguf.quants makes of the float32 merge (base + adapter,
    exported F32: checked against transformers above), and runs."""
    base, _ = write_gguf(checkpoint_factory("qwen2"), tmp_path / "base.gguf", "qwen2", Q.Q8_0)
    result = tiny_lora_job(base, tmp_path, merge_gguf="Q8_0")
    assert result.merged_dir is None
    exact = export_model(base, tmp_path / "f32.gguf", "F32", adapter=Path(result.adapter_dir)).path
    merged = {t.name: t for t in gguf.GGUFReader(result.merged_gguf).tensors}
    for t in gguf.GGUFReader(exact).tensors:
        expected = gguf.quants.quantize(np.asarray(t.data), merged[t.name].tensor_type)
        assert np.asarray(merged[t.name].data).tobytes() == expected.tobytes(), t.name
    assert {t.tensor_type for t in merged.values()} == {Q.F32, Q.Q8_0}
    engine = Engine.load(result.merged_gguf, device="cpu", dtype="float32")
    generation = engine.generate(engine.tokenizer.encode_chat([{"role": "user", "content": "hi"}]),
                                 SamplingParams(temperature=0.0), max_new_tokens=8)
    assert list(generation) and generation.result.token_ids


def test_merging_a_gguf_base_into_a_hugging_face_folder_is_refused(tmp_path):
    from engine.finetune import JobError, config_from_dict

    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    with pytest.raises(JobError, match=r"merged into a GGUF file \('merge_gguf'\), not a Hugging Face folder"):
        config_from_dict({"model": str(tmp_path / "m.gguf"), "data": [str(data)], "merge": True})
    with pytest.raises(JobError, match="'merge_gguf' must be one of F32, F16, BF16, Q8_0, Q4_0, Q4_1, got 'Q2_K'"):
        config_from_dict({"model": str(tmp_path / "m.gguf"), "data": [str(data)], "merge_gguf": "Q2_K"})
