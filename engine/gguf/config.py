"""A GGUF file's `{arch}.*` metadata as our typed model configs (models/config.py).

Biases are read from which tensors the file has (llama.cpp writes `blk.0.attn_q.bias` only where the
model has one), so the config always agrees with the weights it describes. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from engine.errors import CheckpointError
from engine.gguf.header import SUPPORTED_GGUF_ARCHITECTURES, GGUFFile
from models.config import Gemma3Config, GPT2Config, LlamaConfig, ModelConfig, RopeScaling

# GGUF architecture -> the HF class name our config carries.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # also Mistral, SmolLM, TinyLlama: llama.cpp converts them as llama
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gemma3": "Gemma3ForCausalLM",  # the text model; a Gemma 3 vision file's language part is converted as this too
}
ROPE_FREQS_TENSOR = "rope_freqs.weight"  # llama.cpp's form of Llama 3 RoPE scaling: one divisor per frequency


def config_from_gguf(gguf_file: GGUFFile) -> ModelConfig:
    """The config for a GGUF file; CheckpointError names the file and the key that is missing or wrong."""
    arch = gguf_file.architecture
    if gguf_file.value("general.type", str, "model") == "adapter":
        raise CheckpointError(f"{gguf_file.path}: a LoRA adapter in GGUF form, not a model (use a PEFT adapter folder)")
    parts = gguf_file.value("split.count", int, 1)
    if parts > 1:
        raise CheckpointError(
            f"{gguf_file.path}: one part of a GGUF split into {parts} files; join them first "
            "(llama-gguf-split --merge FIRST-PART OUT.gguf)"
        )
    if arch == "clip":
        raise CheckpointError(
            f"{gguf_file.path}: a vision projector (llama.cpp's mmproj file, 'general.architecture' = 'clip'), "
            "not a language model; open the model's text GGUF instead"
        )
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{gguf_file.path}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    if arch == "gpt2":
        return _gpt2_config(gguf_file)
    if arch == "gemma3":
        return _gemma3_config(gguf_file)
    return _llama_config(gguf_file)


def _positive(gguf_file: GGUFFile, suffix: str, kind: type, default=None):
    """{arch}.{suffix} as a positive int or float (required when default is None)."""
    value = gguf_file.arch_value(suffix, kind) if default is None else gguf_file.arch_value(suffix, kind, default)
    if value <= 0:
        raise CheckpointError(f"{gguf_file.path}: metadata key '{gguf_file.architecture}.{suffix}' must be positive, got {value}")
    return value


def vocab_size(gguf_file: GGUFFile) -> int:
    """The token list's length, which is what llama.cpp sizes the embedding by."""
    field = gguf_file.fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise CheckpointError(f"{gguf_file.path}: missing required metadata key 'tokenizer.ggml.tokens'")
    return len(field.raw)


def _has_tensor(gguf_file: GGUFFile, name: str) -> bool:
    return any(t.name == name for t in gguf_file.tensors)


def _rope_scaling(gguf_file: GGUFFile, head_dim: int) -> RopeScaling:
    kind = gguf_file.arch_value("rope.scaling.type", str, "none")
    factors = next((t for t in gguf_file.tensors if t.name == ROPE_FREQS_TENSOR), None)
    if factors is not None:
        if kind not in ("none", "linear") or (kind == "linear" and gguf_file.arch_value("rope.scaling.factor", float, 1.0) != 1.0):
            raise CheckpointError(f"{gguf_file.path}: {ROPE_FREQS_TENSOR} together with rope scaling {kind!r} is not supported")
        values = gguf.quants.dequantize(factors.data, factors.tensor_type).reshape(-1)
        if values.shape != (head_dim // 2,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise CheckpointError(
                f"{gguf_file.path}: {ROPE_FREQS_TENSOR} must hold {head_dim // 2} positive factors, "
                f"has shape {list(factors.data.shape)}"
            )
        return RopeScaling("factors", frequency_factors=tuple(float(v) for v in values))
    if kind == "none":
        return RopeScaling("default")
    if kind == "linear":
        return RopeScaling("linear", factor=_positive(gguf_file, "rope.scaling.factor", float))
    raise CheckpointError(f"{gguf_file.path}: rope scaling type {kind!r} is not supported (supported: none, linear)")


@dataclass(frozen=True)
class _AttentionShape:
    hidden: int  # {arch}.embedding_length
    heads: int  # query heads
    kv_heads: int  # key/value heads
    head_dim: int  # {arch}.attention.key_length, else hidden // heads


def _attention_shape(gguf_file: GGUFFile) -> _AttentionShape:
    """The width and heads of a RoPE model, checked as llama.cpp reads them (no partial rotary embeddings)."""
    arch = gguf_file.architecture
    hidden = _positive(gguf_file, "embedding_length", int)
    heads = _positive(gguf_file, "attention.head_count", int)
    kv_heads = _positive(gguf_file, "attention.head_count_kv", int, heads)
    if heads % kv_heads:
        raise CheckpointError(
            f"{gguf_file.path}: {arch}.attention.head_count={heads} is not a multiple of "
            f"{arch}.attention.head_count_kv={kv_heads}"
        )
    head_dim = _positive(gguf_file, "attention.key_length", int, hidden // heads)
    value_dim = _positive(gguf_file, "attention.value_length", int, head_dim)
    rotary_dim = _positive(gguf_file, "rope.dimension_count", int, head_dim)
    if value_dim != head_dim or rotary_dim != head_dim:
        raise CheckpointError(
            f"{gguf_file.path}: key length {head_dim}, value length {value_dim} and rope dimension {rotary_dim} "
            "must be equal (partial rotary embeddings are not supported)"
        )
    return _AttentionShape(hidden, heads, kv_heads, head_dim)


def _llama_config(gguf_file: GGUFFile) -> LlamaConfig:
    arch = gguf_file.architecture
    shape = _attention_shape(gguf_file)
    # llama.cpp's llama graph is the only one here with a sliding window (Qwen2 files may name one it ignores).
    sliding_window = gguf_file.arch_value("attention.sliding_window", int, 0) if arch == "llama" else 0
    return LlamaConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=vocab_size(gguf_file),
        hidden_size=shape.hidden,
        intermediate_size=_positive(gguf_file, "feed_forward_length", int),
        num_hidden_layers=_positive(gguf_file, "block_count", int),
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=_positive(gguf_file, "context_length", int),
        rms_norm_eps=_positive(gguf_file, "attention.layer_norm_rms_epsilon", float),
        rope_theta=_positive(gguf_file, "rope.freq_base", float, 10000.0),
        rope_scaling=_rope_scaling(gguf_file, shape.head_dim),
        tie_word_embeddings=not _has_tensor(gguf_file, "output.weight"),
        qkv_bias=_has_tensor(gguf_file, "blk.0.attn_q.bias"),
        o_bias=_has_tensor(gguf_file, "blk.0.attn_output.bias"),
        mlp_bias=_has_tensor(gguf_file, "blk.0.ffn_up.bias"),
        qk_norm=arch == "qwen3",
        sliding_window=sliding_window or None,
    )


def _gpt2_config(gguf_file: GGUFFile) -> GPT2Config:
    n_embd = _positive(gguf_file, "embedding_length", int)
    n_head = _positive(gguf_file, "attention.head_count", int)
    if n_embd % n_head:
        raise CheckpointError(f"{gguf_file.path}: gpt2.embedding_length={n_embd} is not a multiple of gpt2.attention.head_count={n_head}")
    return GPT2Config(
        architecture="GPT2LMHeadModel",
        vocab_size=vocab_size(gguf_file),
        n_positions=_positive(gguf_file, "context_length", int),
        n_embd=n_embd,
        n_layer=_positive(gguf_file, "block_count", int),
        n_head=n_head,
        n_inner=_positive(gguf_file, "feed_forward_length", int),
        layer_norm_epsilon=_positive(gguf_file, "attention.layer_norm_epsilon", float),
        activation_function="gelu_new",  # llama.cpp's gpt2 graph uses the tanh approximation
    )


# What llama.cpp's gemma3 model assumes where the file does not say (src/models/gemma3.cpp, llama-hparams.h):
# with a sliding window, every 6th layer is global and the others local; local layers use RoPE base 10000,
# unscaled. Queries are scaled by 1/sqrt(key_length), except in the 62-layer (27B) model, by
# 1/sqrt(embedding_length / head_count); no key says otherwise.
GEMMA3_GLOBAL_EVERY = 6
GEMMA3_LOCAL_ROPE_BASE = 10_000.0
GEMMA3_27B_LAYERS = 62


def _gemma3_sliding(gguf_file: GGUFFile, layers: int) -> tuple[bool, ...]:
    """Which layers are local: gemma3.attention.sliding_window_pattern as llama.cpp reads it (one bool per
    layer, or n: every n-th layer global, 0: none), else every 6th layer global."""
    key = "gemma3.attention.sliding_window_pattern"
    field = gguf_file.fields.get(key)
    if field is not None and field.types[0] == gguf.GGUFValueType.ARRAY:
        pattern = gguf_file.array(key, bool)
        if len(pattern) != layers:
            raise CheckpointError(f"{gguf_file.path}: {key!r} has {len(pattern)} entries for {layers} layers")
        return tuple(pattern)
    every = gguf_file.value(key, int, GEMMA3_GLOBAL_EVERY)
    if every < 0:
        raise CheckpointError(f"{gguf_file.path}: metadata key {key!r} must not be negative, got {every}")
    return tuple(every == 0 or i % every < every - 1 for i in range(layers))


def _gemma3_config(gguf_file: GGUFFile) -> Gemma3Config:
    shape = _attention_shape(gguf_file)
    layers = _positive(gguf_file, "block_count", int)
    window = gguf_file.arch_value("attention.sliding_window", int, 0)
    if window < 0:
        raise CheckpointError(
            f"{gguf_file.path}: metadata key 'gemma3.attention.sliding_window' must not be negative, got {window}"
        )
    # Without a window (converted from sliding_window_pattern = 1) llama.cpp makes every layer global.
    sliding = _gemma3_sliding(gguf_file, layers) if window > 0 else (False,) * layers
    context = _positive(gguf_file, "context_length", int)
    scalar = shape.hidden / shape.heads if layers == GEMMA3_27B_LAYERS else shape.head_dim
    cap = gguf_file.arch_value("final_logit_softcapping", float, 0.0)  # 0 or absent: none, as in llama.cpp
    return Gemma3Config(
        architecture=GGUF_ARCHITECTURES["gemma3"],
        vocab_size=vocab_size(gguf_file),
        hidden_size=shape.hidden,
        intermediate_size=_positive(gguf_file, "feed_forward_length", int),
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=context,
        sliding=sliding,
        sliding_window=window or context,  # no window: no local layer reads it
        query_pre_attn_scalar=float(scalar),
        rms_norm_eps=_positive(gguf_file, "attention.layer_norm_rms_epsilon", float),
        rope_theta=_positive(gguf_file, "rope.freq_base", float, 10000.0),
        rope_scaling=_rope_scaling(gguf_file, shape.head_dim),
        rope_local_theta=_positive(gguf_file, "rope.freq_base_swa", float, GEMMA3_LOCAL_ROPE_BASE),
        final_logit_softcapping=cap if cap > 0 else None,
        tie_word_embeddings=not _has_tensor(gguf_file, "output.weight"),
    )
