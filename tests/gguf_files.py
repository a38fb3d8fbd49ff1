"""Write GGUF files from the tiny Hugging Face checkpoints of tests/checkpoints.py, in llama.cpp's layout.

Like llama.cpp's convert_hf_to_gguf.py: tensor names from the gguf package's own name map, Q/K rows of
`llama` models permuted with the converter's `permute`, GPT-2's Conv1D weights transposed (and the
embedding written again as `output.weight`), Gemma 3's norm weights stored as 1 + w (the converter's
`norm_shift`) with its hyperparameters as Gemma3Model writes them, Llama 3 RoPE scaling as a `rope_freqs` tensor, the
tokenizer's special ids, merges and chat template through gguf.SpecialVocab. Quantized 2-D weights
come from gguf.quants.quantize, or for K-quants (and IQ4_NL) from random blocks with sane scales; beside the GGUF
file, `effective_checkpoint` holds the same HF checkpoint with the weights the GGUF really stores
(dequantized by gguf.quants), the oracle for quantized files. `assert_same_model` checks a GGUF file
against transformers on a checkpoint: logits and greedy ids.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import hf_model
from engine import CheckpointError, Engine, SamplingParams

Q = gguf.GGMLQuantizationType
GGUF_ARCH = {"llama": "llama", "llama_tied_llama3_rope": "llama", "llama_linear_rope": "llama", "mistral": "llama",
             "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2", "gemma3": "gemma3"}
_MODEL_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
               "gpt2": gguf.MODEL_ARCH.GPT2, "gemma3": gguf.MODEL_ARCH.GEMMA3}
_GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
RANDOM_BLOCK_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL)  # gguf.quants cannot quantize these
# Byte offsets of the float16 block scales (d, and dmin where present) inside each block.
_K_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,)}


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as written there (rows: heads x head_dim)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_block_bytes(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """(rows, bytes) uint8: random blocks whose float16 scales are small finite numbers."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    for offset in _K_SCALE_OFFSETS[qtype]:
        scale = rng.uniform(0.001, 0.01, size=(rows, cols // block)).astype(np.float16)
        blocks[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return blocks.reshape(rows, -1)


def _rope_freqs(hf: dict) -> np.ndarray:
    """Llama 3 RoPE scaling as convert_hf_to_gguf.py writes it: one divisor per frequency."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling")
    dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_sizes(writer: gguf.GGUFWriter, hf: dict) -> None:
    """The widths and counts every Llama-like converter writes from config.json."""
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])


def _add_gemma3_hparams(writer: gguf.GGUFWriter, hf: dict) -> None:
    """What convert_hf_to_gguf.py's Gemma3Model writes: the global layers' RoPE base and scaling, the local
    layers' base (its TextModel base class, from rope_parameters), the final soft-cap if set; no
    sliding-window pattern and no query scale (llama.cpp assumes those)."""
    rope = hf.get("rope_parameters", {}).get("full_attention") or {}
    local_theta = hf.get("rope_parameters", {}).get("sliding_attention", {}).get("rope_theta")
    _add_sizes(writer, hf)
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_key_length(hf["head_dim"])
    writer.add_value_length(hf["head_dim"])
    writer.add_rope_freq_base(rope.get("rope_theta", 1_000_000.0))
    if local_theta is not None:
        writer.add_rope_freq_base_swa(local_theta)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    assert hf.get("attn_logit_softcapping") is None  # the converter refuses it too
    if hf.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(hf["final_logit_softcapping"])
    if hf.get("sliding_window_pattern") != 1:
        writer.add_sliding_window(hf["sliding_window"])


def _add_hparams(writer: gguf.GGUFWriter, arch: str, hf: dict) -> None:
    if arch == "gemma3":
        return _add_gemma3_hparams(writer, hf)
    if arch == "gpt2":
        writer.add_context_length(hf["n_positions"])
        writer.add_embedding_length(hf["n_embd"])
        writer.add_feed_forward_length(hf.get("n_inner") or 4 * hf["n_embd"])
        writer.add_block_count(hf["n_layer"])
        writer.add_head_count(hf["n_head"])
        writer.add_layer_norm_eps(hf["layer_norm_epsilon"])
        return
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    _add_sizes(writer, hf)
    writer.add_rope_freq_base(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if hf.get("sliding_window") and hf.get("model_type") == "mistral":
        writer.add_sliding_window(hf["sliding_window"])


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, pre: str = "gpt-2") -> None:
    """The byte-level BPE tokenizer of a checkpoint folder, as the converter's get_vocab_base writes it."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    added = {t["content"]: t for t in tokenizer["added_tokens"]}
    vocab.update({text: t["id"] for text, t in added.items()})
    tokens = [None] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    types = [gguf.TokenType.CONTROL if t in added and added[t]["special"] else
             gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL for t in tokens]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer)


def finish(writer: gguf.GGUFWriter) -> None:
    """Write the header, metadata and tensors a writer was given, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(
    checkpoint: Path,
    out: Path,
    family: str,
    weight_type: Q = Q.F32,
    permute: bool = True,
    pre: str = "gpt-2",
    skip_tensors: tuple[str, ...] = (),
    metadata: dict | None = None,
    types_by_name: dict[str, Q] | None = None,
) -> tuple[Path, Path]:
    """Write checkpoint as a GGUF file; returns (the file, a checkpoint folder with the weights it stores).

    permute=False leaves llama Q/K rows in HF order (a converter bug the tests must catch); skip_tensors
    drops tensors by GGUF name; metadata adds or overrides string/int/float keys; types_by_name gives the
    matrices of some GGUF base names (e.g. "ffn_down") another type, as llama-quantize's mixes (Q4_K_M) do.
    """
    arch = GGUF_ARCH[family]
    hf = json.loads((checkpoint / "config.json").read_text())
    state = load_file(checkpoint / "model.safetensors")
    names = gguf.get_tensor_name_map(_MODEL_ARCH[arch], hf.get("num_hidden_layers") or hf["n_layer"])
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(f"tiny {family}")
    writer.add_file_type({Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16}.get(
        weight_type, gguf.LlamaFileType.GUESSED))
    _add_hparams(writer, arch, hf)
    add_tokenizer(writer, checkpoint, pre)
    for key, value in (metadata or {}).items():
        {str: writer.add_string, int: writer.add_uint32, float: writer.add_float32}[type(value)](key, value)

    rng = np.random.default_rng(0)
    effective: dict[str, torch.Tensor] = {}
    tensors: list[tuple[str, np.ndarray, Q]] = []
    if arch == "llama" and (hf.get("rope_parameters") or {}).get("rope_type") == "llama3":
        tensors.append(("rope_freqs.weight", _rope_freqs(hf), Q.F32))
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    for key, tensor in state.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        w = tensor.float().numpy()
        shift = 1.0 if arch == "gemma3" and name.endswith("norm.weight") else 0.0  # the converter's norm_shift
        w = w + shift
        conv1d = arch == "gpt2" and name.endswith(".weight") and name.split(".")[-2] in _GPT2_CONV1D
        if conv1d:
            w = np.ascontiguousarray(w.T)  # Conv1D (in, out) -> (out, in), as the converter stores it
        qtype = (types_by_name or {}).get(name.split(".")[-2], weight_type) if w.ndim == 2 else Q.F32
        data, stored = _encode(w, qtype, rng)  # quantized by rows, so permuting rows below commutes with it
        effective[key] = torch.from_numpy(np.ascontiguousarray(stored.T if conv1d else stored - shift))
        if arch == "llama" and permute and name.endswith(("attn_q.weight", "attn_q.bias")):
            data = llama_cpp_permute(data, heads, heads)
        elif arch == "llama" and permute and name.endswith(("attn_k.weight", "attn_k.bias")):
            data = llama_cpp_permute(data, heads, kv_heads)
        tensors.append((name, data, qtype))
        if arch == "gpt2" and name == "token_embd.weight":
            tensors.append(("output.weight", data, qtype))  # the converter writes GPT-2's tied output again
    for name, data, qtype in tensors:
        if name in skip_tensors:
            continue
        writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    finish(writer)

    effective_dir = out.with_suffix(".effective")
    shutil.copytree(checkpoint, effective_dir, dirs_exist_ok=True)
    save_file({k: v.contiguous() for k, v in effective.items()}, effective_dir / "model.safetensors", metadata={"format": "pt"})
    return out, effective_dir


def _encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(the data to write, the float32 values it stores) for a weight in the layout it is written in."""
    if qtype == Q.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == Q.F16:
        data = w.astype(np.float16)
        return data, data.astype(np.float32)
    if qtype in RANDOM_BLOCK_TYPES:
        data = random_block_bytes(w.shape[0], w.shape[1], qtype, rng)
    else:
        data = gguf.quants.quantize(w, qtype)  # BF16 too
    return data, gguf.quants.dequantize(data, qtype).reshape(w.shape)


def sample_ids(vocab: int = 400) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 40), generator=torch.Generator().manual_seed(0))  # (B, T)


def assert_same_model(gguf_path: Path, reference_dir: Path, atol: float = 1e-4, new_tokens: int = 12) -> None:
    """float32 logits of the GGUF close to transformers on reference_dir, and greedy ids equal."""
    engine = Engine.load(gguf_path, device="cpu", dtype="float32")
    reference = hf_model(reference_dir)
    ids = sample_ids()
    with torch.inference_mode():
        ours, theirs = engine.model(ids), reference(ids).logits
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= atol * max(1.0, scale)
    prompt = ids[0, :12].tolist()
    generation = engine.generate(prompt, SamplingParams(temperature=0.0), max_new_tokens=new_tokens)
    list(generation)
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ids = generation.result.token_ids
    assert ids == expected[: len(ids)]
    if generation.result.finish_reason == "eos":  # ours stopped where transformers (told not to) went on
        assert expected[len(ids)] in engine.eos_token_ids


def load_error(path: Path) -> str:
    """The one-line CheckpointError (naming the file) that loading `path` raises."""
    with pytest.raises(CheckpointError) as info:
        Engine.load(path, device="cpu", dtype="float32")
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def tiny_lora_job(base: Path, tmp_path: Path, **settings):
    """A finished few-step LoRA job on `base` (four copies of one chat record), in tmp_path / "job"."""
    from engine.finetune import config_from_dict, run_job

    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    data = tmp_path / "data.jsonl"
    data.write_text((json.dumps(record) + "\n") * 4)
    result = run_job(config_from_dict({
        "model": str(base), "data": [str(data)], "out": str(tmp_path / "job"), "max_steps": 3, "lr": 3e-2,
        "batch_size": 2, "lora_rank": 4, "val_fraction": 0.0, "warmup_ratio": 0.0, "checkpoint_interval": 100,
        **settings,
    }))
    assert result.status == "done", result
    return result
