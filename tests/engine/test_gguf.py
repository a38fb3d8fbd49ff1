"""GGUF files: header summary, loading each family and tensor type against transformers on the same random
checkpoint, llama.cpp's Q/K permutation, tokenizers against transformers' own GGUF loading and the original
tokenizer.json, and every kind of bad file (one line naming the file and the problem)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from checkpoints import CHATML_TEMPLATE, hf_model
from engine import CheckpointError, Engine
from engine.checkpoint import load_model, read_model_config
from engine.gguf import summarize_gguf
from engine.gguf.config import config_from_gguf
from engine.gguf.header import open_gguf
from engine.gguf.tensors import model_tensors, read_raw, unpermute_rows
from engine.tokenizer import ChatTokenizer
from gguf_files import (
    RANDOM_BLOCK_TYPES, Q, add_tokenizer, assert_same_model, finish, llama_cpp_permute, load_error, sample_ids,
    tiny_lora_job, write_gguf,
)

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[2]
TEXTS = {
    "english": "Hello there! How are you doing today? The quick brown fox jumps over the lazy dog.",
    "chinese": "你好，世界！今天天气很好。我们一起学习注意力机制。",
    "code": "def main():\n    print('hello world')\n    return 0\n",
    "emoji": "Emoji test 😀🎉🚀 and accents: café naïve résumé.",
    "whitespace": "  leading  and   trailing   \n\n\t tabs\t\tand\r\n  newlines  \n   ",
}


def _write_small_gguf(path: Path, **metadata) -> Path:
    """A header-only-interesting GGUF: two tensors (one Q8_0), a name and a context length."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(metadata.get("name", "Tiny Test"))
    writer.add_context_length(128)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    weight = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)  # numpy (rows, cols)
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    finish(writer)
    return path


def test_summary_reads_the_header(tmp_path):
    path = _write_small_gguf(tmp_path / "tiny.gguf")
    summary = summarize_gguf(path)
    assert summary.architecture == "llama"
    assert summary.name == "Tiny Test"
    assert summary.parameters == 8 * 64 + 64
    assert summary.weight_type == "Q8_0"
    assert summary.size_bytes == path.stat().st_size
    assert summary.context_length == 128
    assert summary.supported


def test_summary_does_not_import_torch(tmp_path):
    path = _write_small_gguf(tmp_path / "tiny.gguf")
    code = (f"import sys; from engine.gguf import summarize_gguf; summarize_gguf({str(path)!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={"PYTHONPATH": str(root)})


def test_summary_name_falls_back_to_the_file_stem(tmp_path):
    path = _write_small_gguf(tmp_path / "my-model.Q8_0.gguf", name="")
    assert summarize_gguf(path).name == "my-model.Q8_0"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b"GGML" + b[4:], "not a GGUF file (starts with b'GGML'"),
        (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "unsupported GGUF version 7"),
        (lambda b: b[:6], "truncated GGUF file"),
        (lambda b: b[:200], "truncated GGUF file"),
        (lambda b: b[:-10], "truncated GGUF file"),
        (lambda b: b"", "not a GGUF file"),
    ],
    ids=["magic", "version", "short-header", "short-metadata", "short-data", "empty"],
)
def test_bad_files_get_one_line_naming_the_file(tmp_path, corrupt, message):
    good = _write_small_gguf(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(corrupt(good))
    with pytest.raises(CheckpointError) as e:
        summarize_gguf(bad)
    assert str(e.value).startswith(f"{bad}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        summarize_gguf(tmp_path / "absent.gguf")


def test_metadata_of_the_wrong_type(tmp_path):
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("llama.context_length", "long")
    finish(writer)
    with pytest.raises(CheckpointError, match=r"'llama.context_length' must be an integer, found string"):
        summarize_gguf(path)


# -- loading against transformers ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "llama_tied_llama3_rope", "llama_linear_rope", "mistral", "qwen2",
                                    "qwen3", "gpt2"])
def test_float32_gguf_of_every_family_matches_transformers_on_the_original(checkpoint_factory, tmp_path, family):
    checkpoint = checkpoint_factory(family)
    path, _ = write_gguf(checkpoint, tmp_path / f"{family}.gguf", family)
    assert_same_model(path, checkpoint)


@pytest.mark.parametrize("weight_type", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantized_gguf_matches_transformers_on_its_dequantized_weights(checkpoint_factory, tmp_path, family,
                                                                        weight_type):
    path, effective = write_gguf(checkpoint_factory(family), tmp_path / "m.gguf", family, weight_type)
    assert_same_model(path, effective)


@pytest.mark.parametrize("weight_type", RANDOM_BLOCK_TYPES, ids=lambda q: q.name)
def test_k_quant_and_iq4_nl_gguf_match_transformers_on_their_dequantized_weights(checkpoint_factory, tmp_path, weight_type):
    # K-quant blocks cover 256 values: every matrix here has rows of 256 (IQ4_NL blocks: 32).
    checkpoint = checkpoint_factory("llama", hidden_size=256, intermediate_size=256, head_dim=64)
    path, effective = write_gguf(checkpoint, tmp_path / "k.gguf", "llama", weight_type)
    assert_same_model(path, effective)


def test_large_matrices_are_dequantized_a_few_rows_at_a_time(checkpoint_factory, tmp_path, monkeypatch):
    import engine.gguf.tensors

    monkeypatch.setattr(engine.gguf.tensors, "_STAGING_ELEMENTS", 3 * 64 + 5)  # 3 rows of 64 per step
    path, effective = write_gguf(checkpoint_factory("qwen2"), tmp_path / "m.gguf", "qwen2", Q.Q4_1)
    assert_same_model(path, effective)


def test_weights_are_read_through_the_file_not_its_memory_map(checkpoint_factory, tmp_path):
    path, _ = write_gguf(checkpoint_factory("llama"), tmp_path / "m.gguf", "llama", Q.Q4_1)
    gguf_file = open_gguf(path)
    tensors = model_tensors(gguf_file, config_from_gguf(gguf_file))
    with open(path, "rb") as file:
        for tensor in tensors.values():
            rows = tensor.raw.shape[0]
            for start, stop in ((0, None), (1, 3), (rows - 2, rows + 5)):
                np.testing.assert_array_equal(read_raw(tensor, file, start, stop), tensor.raw[start:stop])
    # Shortened under the open map: reading through the map would now die of SIGBUS, reading the file says why.
    last = max(tensors.values(), key=lambda t: t.data_offset)
    os.truncate(path, last.data_offset + 10)
    with open(path, "rb") as file, pytest.raises(CheckpointError, match=f"truncated GGUF file while reading {last.gguf_name}"):
        read_raw(last, file)


def test_dtype_option_dequantizes_to_that_dtype(checkpoint_factory, tmp_path):
    path, effective = write_gguf(checkpoint_factory("llama"), tmp_path / "m.gguf", "llama", Q.Q8_0)
    reference = hf_model(effective)
    for dtype in (torch.bfloat16, torch.float16):
        engine = Engine.load(path, device="cpu", dtype=str(dtype).removeprefix("torch."))
        assert engine.dtype == dtype
        assert {p.dtype for p in engine.model.parameters()} == {dtype}
        with torch.inference_mode():
            ours, theirs = engine.model(sample_ids()).float(), reference(sample_ids()).logits
        assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


def test_progress_reports_the_file_bytes_up_to_the_total(checkpoint_factory, tmp_path):
    path, _ = write_gguf(checkpoint_factory("qwen2"), tmp_path / "m.gguf", "qwen2", Q.Q8_0)
    calls = []
    Engine.load(path, device="cpu", dtype="float32", progress=lambda done, total, note: calls.append((done, total)))
    assert calls and all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    total = calls[-1][1]
    assert calls[-1][0] == total and total == sum(t.n_bytes for t in gguf.GGUFReader(path).tensors)


# -- llama.cpp's Q/K permutation ----------------------------------------------------------------


@pytest.mark.parametrize("rows, heads", [(64, 4), (32, 2), (24, 3)])
def test_unpermute_rows_inverts_the_converters_permute(rows, heads):
    w = np.random.default_rng(0).standard_normal((rows, 5)).astype(np.float32)
    b = w[:, 0].copy()
    assert torch.equal(unpermute_rows(torch.from_numpy(llama_cpp_permute(w, heads)), heads), torch.from_numpy(w))
    assert torch.equal(unpermute_rows(torch.from_numpy(llama_cpp_permute(b, heads)), heads), torch.from_numpy(b))


def test_unpermute_rows_works_on_raw_quantized_rows():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(w, Q.Q4_0)  # (rows, bytes)
    restored = unpermute_rows(llama_cpp_permute(blocks, 4), 4)
    assert np.array_equal(restored, blocks)


def test_a_llama_gguf_without_the_permutation_gives_other_logits(checkpoint_factory, tmp_path):
    """The loader really undoes the permutation: the same file written unpermuted no longer matches."""
    checkpoint = checkpoint_factory("llama")
    path, _ = write_gguf(checkpoint, tmp_path / "unpermuted.gguf", "llama", permute=False)
    engine = Engine.load(path, device="cpu", dtype="float32")
    with torch.inference_mode():
        assert (engine.model(sample_ids()) - hf_model(checkpoint)(sample_ids()).logits).abs().max() > 1e-2


def test_k_rows_are_unpermuted_with_the_key_value_head_count(checkpoint_factory, tmp_path):
    """Our llama checkpoints have 4 query heads and 2 key/value heads: undoing K with 4 heads is wrong."""
    checkpoint = checkpoint_factory("llama")
    path, _ = write_gguf(checkpoint, tmp_path / "m.gguf", "llama")
    model = load_model(path, read_model_config(path), CPU, torch.float32)
    state = load_file(checkpoint / "model.safetensors")
    q_hf, k_hf = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    layer = model.model.layers[0].self_attn
    if layer.fused_qkv is not None:  # inference fuses q, k, v into one weight: (q rows + k rows + v rows, D)
        q, k, _ = layer.fused_qkv.weight.split([q_hf.shape[0], k_hf.shape[0], k_hf.shape[0]])
    else:
        q, k = layer.q_proj.weight, layer.k_proj.weight
    assert torch.equal(q, q_hf) and torch.equal(k, k_hf)


# -- tokenizers ---------------------------------------------------------------------------------


def _tokenizer_gguf(path: Path, write_vocab, arch: str = "llama", chat_template: str | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    write_vocab(writer)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    finish(writer)
    return path


def _transformers_gguf_tokenizer(path: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "tekken"])
def test_byte_level_tokenizer_matches_transformers_gguf_loading(checkpoint_factory, tmp_path, pre):
    folder = checkpoint_factory("qwen2")
    path = _tokenizer_gguf(tmp_path / "t.gguf", lambda w: add_tokenizer(w, folder, pre))
    ours = ChatTokenizer.from_gguf(path)
    theirs = _transformers_gguf_tokenizer(path)
    for name, text in TEXTS.items():
        assert ours.encode(text) == theirs(text)["input_ids"], name
        assert ours.decode(ours.encode(text)) == text, name


def test_gpt2_gguf_tokenizer_matches_the_original_tokenizer_json(tmp_path, checkpoint_factory):
    """With pre "gpt-2" the file describes exactly the checkpoint's own tokenizer.json."""
    folder = checkpoint_factory("gpt2")
    path = _tokenizer_gguf(tmp_path / "t.gguf", lambda w: add_tokenizer(w, folder, "gpt-2"), chat_template=CHATML_TEMPLATE)
    ours, original = ChatTokenizer.from_gguf(path), ChatTokenizer.from_dir(folder)
    for name, text in TEXTS.items():
        assert ours.encode(text) == original.encode(text), name
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == 2


def test_smollm_pre_tokenizer_splits_digits_one_by_one(tmp_path, checkpoint_factory):
    """SmolLM's tokenizer.json: Digits(individual) then byte-level; llama.cpp's "smollm" does the same."""
    from tokenizers import Tokenizer, pre_tokenizers

    folder = checkpoint_factory("qwen2")
    path = _tokenizer_gguf(tmp_path / "t.gguf", lambda w: add_tokenizer(w, folder, "smollm"))
    original = Tokenizer.from_file(str(folder / "tokenizer.json"))
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ours = ChatTokenizer.from_gguf(path)
    for text in [*TEXTS.values(), "0123456789 and 2024-12-02, 3.14159"]:
        assert ours.encode(text) == original.encode(text).ids, text


def test_chat_prompt_renders_as_transformers_renders_the_gguf_template(checkpoint_factory, tmp_path):
    folder = checkpoint_factory("qwen2")
    path, _ = write_gguf(folder, tmp_path / "m.gguf", "qwen2")
    ours = ChatTokenizer.from_gguf(path)
    theirs = _transformers_gguf_tokenizer(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS["chinese"]},
                {"role": "assistant", "content": TEXTS["code"]}, {"role": "user", "content": TEXTS["emoji"]}]
    text = ours.render_chat(messages, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode_chat(messages) == theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ours.has_chat_template


def test_no_chat_template_falls_back_to_chatml_with_a_warning(checkpoint_factory, tmp_path, caplog):
    folder = checkpoint_factory("qwen2")
    path = _tokenizer_gguf(tmp_path / "plain.gguf", lambda w: _vocab_without_template(w, folder))
    with caplog.at_level("WARNING"):
        tokenizer = ChatTokenizer.from_gguf(path)
    assert not tokenizer.has_chat_template
    assert "ChatML fallback" in caplog.text
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user\nhi<|im_end|>")


def _vocab_without_template(writer: gguf.GGUFWriter, folder: Path) -> None:
    add_tokenizer(writer, folder, "gpt-2")
    writer.kv_data[0].pop("tokenizer.chat_template", None)


def _write_sentencepiece_vocab(writer: gguf.GGUFWriter, tokenizer_json: Path) -> None:
    """A Llama 2-style vocabulary as llama.cpp's converter writes it from tokenizer.model: <unk> unknown,
    <s> </s> control, <0xXX> bytes, and scores as SentencePiece keeps them, which is where tokenizer.json's
    merge order comes from: a piece made by an earlier merge scores higher."""
    model = json.loads(tokenizer_json.read_text())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    scores = [-1e9] * len(tokens)  # pieces no merge makes: never the result of joining two others
    for rank, merge in enumerate(model["merges"]):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        index = vocab[left + right]
        scores[index] = max(scores[index], -float(rank))
    types = [gguf.TokenType.UNKNOWN if t == "<unk>" else gguf.TokenType.CONTROL if t in ("<s>", "</s>")
             else gguf.TokenType.BYTE if t.startswith("<0x") and len(t) == 6 else gguf.TokenType.NORMAL for t in tokens]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def test_sentencepiece_tokenizer_matches_transformers_and_the_original(realworld, tmp_path):
    from tokenizers import Tokenizer

    source = realworld / "tinyllama-1.1b-chat-v1.0" / "tokenizer.json"
    path = _tokenizer_gguf(tmp_path / "spm.gguf", lambda w: _write_sentencepiece_vocab(w, source))
    ours = ChatTokenizer.from_gguf(path)
    theirs = _transformers_gguf_tokenizer(path)
    original = Tokenizer.from_file(str(source))
    for name, text in TEXTS.items():
        ids = ours.encode(text)
        assert ids[0] == 1, name  # BOS, as add_bos_token says
        assert ids == original.encode(text).ids, name
        if not text.startswith(" "):  # transformers adds no "▁" before text that starts with a space; llama.cpp does
            assert ids == theirs(text)["input_ids"], name
        assert ours.decode(ids) == text, name


def test_sentencepiece_puts_a_space_after_special_tokens_as_llama_cpp_does(realworld, tmp_path):
    source = realworld / "tinyllama-1.1b-chat-v1.0" / "tokenizer.json"
    path = _tokenizer_gguf(tmp_path / "spm.gguf", lambda w: _write_sentencepiece_vocab(w, source))
    ours = ChatTokenizer.from_gguf(path)
    hello = ours.encode("Hello", add_special_tokens=False)
    assert ours.encode("</s>Hello", add_special_tokens=False) == [2, *hello]


def test_real_gpt2_vocabulary_matches_its_tokenizer_json(realworld, tmp_path):
    from tokenizers import Tokenizer

    folder = realworld / "gpt2"
    path = _tokenizer_gguf(tmp_path / "gpt2.gguf", lambda w: add_tokenizer(w, folder, "gpt-2"), arch="gpt2")
    ours = ChatTokenizer.from_gguf(path)
    original = Tokenizer.from_file(str(folder / "tokenizer.json"))
    theirs = _transformers_gguf_tokenizer(path)
    for name, text in TEXTS.items():
        assert ours.encode(text) == original.encode(text).ids == theirs(text)["input_ids"], name


# -- bad files ----------------------------------------------------------------------------------


def _rewrite(path: Path, out: Path, arch: str | None = None, drop: tuple[str, ...] = (), set_values: dict | None = None,
             tensor_types: dict[str, Q] | None = None, tensor_shapes: dict[str, tuple] | None = None,
             extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A copy of a GGUF file with metadata keys dropped or set, tensors stored as another type or shape, or
    tensors added."""
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(out), arch or reader.get_field("general.architecture").contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        if name in (set_values or {}):
            continue
        value = field.contents()
        types = field.types
        writer.add_key_value(name, value, types[0], sub_type=types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None)
    for name, value in (set_values or {}).items():
        kind = {str: gguf.GGUFValueType.STRING, int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32}[type(value)]
        writer.add_key_value(name, value, kind)
    for t in reader.tensors:
        qtype = (tensor_types or {}).get(t.name)
        shape = (tensor_shapes or {}).get(t.name)
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if shape is not None:
            data = np.zeros(shape, dtype=np.float32)
        if qtype is not None:
            writer.add_tensor(t.name, np.zeros(data.shape, dtype=np.float64) if qtype == Q.F64 else gguf.quants.quantize(data, qtype),
                              raw_dtype=None if qtype == Q.F64 else qtype)
        else:
            writer.add_tensor(t.name, data.astype(np.float32))
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    finish(writer)
    return out


@pytest.fixture
def good_gguf(checkpoint_factory, tmp_path) -> Path:
    path, _ = write_gguf(checkpoint_factory("llama"), tmp_path / "good.gguf", "llama")
    return path


def test_unsupported_architecture_is_refused_with_the_supported_list(good_gguf, tmp_path):
    bad = _rewrite(good_gguf, tmp_path / "bad.gguf", arch="mamba")
    assert "unsupported architecture 'mamba'; supported: llama, qwen2, qwen3, gpt2, gemma3" in load_error(bad)


def test_split_parts_and_adapters_are_refused(good_gguf, tmp_path):
    part = _rewrite(good_gguf, tmp_path / "part.gguf", set_values={"split.count": 3})
    assert "one part of a GGUF split into 3 files" in load_error(part)
    adapter = _rewrite(good_gguf, tmp_path / "adapter.gguf", set_values={"general.type": "adapter"})
    assert "a LoRA adapter in GGUF form, not a model" in load_error(adapter)


def test_byte_chunks_of_a_file_say_how_to_join_them(good_gguf, tmp_path):
    """Packages that ship a model in parts cut the file into plain byte chunks: only the joined file is GGUF."""
    data = good_gguf.read_bytes()
    first, second = tmp_path / "m.gguf.part00", tmp_path / "m.gguf.part01"
    first.write_bytes(data[: len(data) // 2])
    second.write_bytes(data[len(data) // 2 :])
    hint = "it looks like one chunk of a file cut into parts: join them in order first, e.g. cat m.gguf.part* > m.gguf"
    assert "truncated GGUF file" in load_error(first) and hint in load_error(first)
    assert "not a directory or a .gguf file" in load_error(second) and hint in load_error(second)


def test_missing_required_key(good_gguf, tmp_path):
    bad = _rewrite(good_gguf, tmp_path / "bad.gguf", drop=("llama.block_count",))
    assert "missing required metadata key 'llama.block_count'" in load_error(bad)


def test_metadata_of_the_wrong_type_when_loading(good_gguf, tmp_path):
    bad = _rewrite(good_gguf, tmp_path / "bad.gguf", set_values={"llama.embedding_length": "wide"})
    assert "'llama.embedding_length' must be an integer, found string" in load_error(bad)


def test_unsupported_tokenizer_type(good_gguf, tmp_path):
    bad = _rewrite(good_gguf, tmp_path / "bad.gguf", set_values={"tokenizer.ggml.model": "bert"})
    assert "unsupported tokenizer type 'bert'" in load_error(bad)


def test_unsupported_pre_tokenizer(good_gguf, tmp_path):
    bad = _rewrite(good_gguf, tmp_path / "bad.gguf", set_values={"tokenizer.ggml.pre": "mystery-bpe"})
    assert "unsupported pre-tokenizer 'mystery-bpe'" in load_error(bad)


def test_unsupported_tensor_type_is_named(good_gguf, tmp_path):
    bad = _rewrite(good_gguf, tmp_path / "bad.gguf", tensor_types={"blk.0.ffn_up.weight": Q.F64})
    assert "tensor blk.0.ffn_up.weight has type F64, which chattui cannot load" in load_error(bad)


def test_shape_mismatch_names_the_tensor(good_gguf, tmp_path):
    bad = _rewrite(good_gguf, tmp_path / "bad.gguf", tensor_shapes={"blk.1.ffn_down.weight": (64, 96)})
    message = load_error(bad)
    assert "blk.1.ffn_down.weight" in message and "shape mismatch for model.layers.1.mlp.down_proj.weight" in message
    assert "[64, 96]" in message and "[64, 128]" in message


def test_missing_tensor(checkpoint_factory, tmp_path):
    path, _ = write_gguf(checkpoint_factory("llama"), tmp_path / "m.gguf", "llama", skip_tensors=("blk.1.ffn_up.weight",))
    assert "missing weights: model.layers.1.mlp.up_proj.weight" in load_error(path)


def test_unknown_tensor(good_gguf, tmp_path):
    bad = _rewrite(good_gguf, tmp_path / "bad.gguf", extra_tensors={"blk.0.mystery.weight": np.ones(4, np.float32)})
    assert "unexpected weights: blk.0.mystery.weight" in load_error(bad)


@pytest.mark.parametrize("cut", [0.3, 0.99])
def test_truncated_file_when_loading(good_gguf, tmp_path, cut):
    data = good_gguf.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * cut)])
    assert "truncated GGUF file" in load_error(bad)


def test_cli_error_is_one_line_with_exit_code_1(good_gguf, tmp_path):
    bad = _rewrite(good_gguf, tmp_path / "bad.gguf", arch="mamba")
    proc = subprocess.run([sys.executable, "-m", "chattui", "generate", "--model", str(bad), "hi"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "unsupported architecture 'mamba'" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- other commands on a GGUF -------------------------------------------------------------------


def test_lora_finetune_on_a_gguf_base_writes_an_adapter_the_engine_applies(checkpoint_factory, tmp_path):
    path, _ = write_gguf(checkpoint_factory("qwen2"), tmp_path / "base.gguf", "qwen2", Q.Q8_0)
    result = tiny_lora_job(path, tmp_path, max_steps=2, lr=1e-2)
    engine = Engine.load(path, device="cpu", dtype="float32", adapter=result.adapter_dir)
    assert engine.adapter_dir is not None


def test_merge_or_full_finetune_of_a_gguf_base_is_refused(tmp_path):
    from engine.finetune import JobError, config_from_dict

    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    for extra in ({"merge": True}, {"method": "full"}):
        with pytest.raises(JobError, match="a GGUF base model supports LoRA adapters only"):
            config_from_dict({"model": str(tmp_path / "m.gguf"), "data": [str(data)], **extra})


def test_generate_and_bench_commands_take_a_gguf(checkpoint_factory, tmp_path, capsys):
    from chattui.cli import main

    path, _ = write_gguf(checkpoint_factory("qwen2"), tmp_path / "m.gguf", "qwen2", Q.Q4_0)
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--dtype", "float32", "--temperature", "0",
                 "--max-new-tokens", "3", "--json", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(path)
    assert main(["bench", "--model", str(path), "--new-tokens", "2", "--prompt-tokens", "4", "--repeat", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chattui"]["decode_tokens_per_s"] > 0
    assert main(["attention", "--model", str(path), "--format", "json", "hello"]) == 0


def test_end_of_turn_tokens_stop_a_reply_as_in_llama_cpp(checkpoint_factory, tmp_path):
    """<|endoftext|> and <|im_end|> are on llama.cpp's end-of-generation list; the file's eos is <|im_end|>."""
    path, _ = write_gguf(checkpoint_factory("qwen2"), tmp_path / "m.gguf", "qwen2")
    engine = Engine.load(path, device="cpu", dtype="float32")
    assert engine.eos_token_ids == {0, 2}
