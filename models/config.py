"""Typed model configs built from a Hugging Face `config.json` dict, and their parameter estimates.

Each supported family has one dataclass and one `*_config_from_hf(hf, architecture)`; which family a
config.json belongs to is models.registry's job. Pure Python (no torch): the UI reads configs too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """config.json describes a model we cannot build (unsupported or inconsistent)."""


@dataclass
class RopeScaling:
    kind: str  # "default", "linear", "llama3" or "factors"
    factor: float = 1.0  # context extension factor (linear, llama3)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original/low are scaled fully
    high_freq_factor: float = 4.0  # llama3: wavelengths below original/high are kept
    original_max_position_embeddings: int = 8192  # llama3: context length before scaling
    frequency_factors: tuple[float, ...] = ()  # factors: (head_dim // 2,) divisors, GGUF's rope_freqs tensor


@dataclass
class LlamaConfig:
    """Llama, Mistral, Qwen2 and Qwen3: pre-norm decoder, RMSNorm, RoPE, SwiGLU, GQA."""

    architecture: str  # the HF class name, e.g. "Qwen2ForCausalLM"
    vocab_size: int  # rows of embed_tokens / lm_head
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the SwiGLU MLP
    num_hidden_layers: int  # decoder blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (< query heads means GQA)
    head_dim: int  # per-head width; explicit in Qwen3/Mistral-Nemo configs
    max_position_embeddings: int  # the context length the model was trained for
    rms_norm_eps: float = 1e-6  # epsilon inside RMSNorm
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: RopeScaling = field(default_factory=lambda: RopeScaling("default"))
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, Llama attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama attention_bias only)
    mlp_bias: bool = False  # bias on gate/up/down projections
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral: each token sees at most this many keys
    hidden_act: str = "silu"  # activation of the gate projection


def estimate_llama_parameters(config: LlamaConfig) -> int:
    d, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    attn = d * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    per_layer = attn + 3 * d * i + 2 * d
    embeddings = v * d * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * per_layer + embeddings + d


@dataclass
class GPT2Config:
    """GPT-2: pre-norm decoder, LayerNorm, learned positions, GELU MLP, Conv1D weights."""

    architecture: str  # "GPT2LMHeadModel"
    vocab_size: int  # rows of wte
    n_positions: int  # rows of wpe, the context length
    n_embd: int  # width of the residual stream
    n_layer: int  # decoder blocks
    n_head: int  # attention heads
    n_inner: int  # width of the MLP (4 * n_embd when null in config.json)
    layer_norm_epsilon: float = 1e-5  # epsilon inside LayerNorm
    activation_function: str = "gelu_new"  # "gelu_new" (tanh approximation) or "gelu"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def tie_word_embeddings(self) -> bool:
        return True  # GPT-2 always ties lm_head to wte


def estimate_gpt2_parameters(config: GPT2Config) -> int:
    # Embeddings + per block (2 LayerNorms, c_attn, c_proj, c_fc, mlp c_proj) + final LayerNorm.
    d, inner = config.n_embd, config.n_inner
    block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
    return config.vocab_size * d + config.n_positions * d + config.n_layer * block + 2 * d


@dataclass
class Gemma3Config:
    """Gemma 3 (text): sliding-window layers between global ones, q/k norms, (1 + w) RMSNorm, GeGLU,
    sqrt(hidden)-scaled embeddings, pre/post norms around attention and MLP, optional final soft-capping.
    (attn_logit_softcapping is not read: transformers' Gemma 3 ignores it, see models/gemma3.py.)"""

    architecture: str  # "Gemma3ForCausalLM"
    vocab_size: int  # rows of embed_tokens / lm_head
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the GeGLU MLP
    num_hidden_layers: int  # decoder blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads
    head_dim: int  # per-head width (256 in the published models, not hidden // heads)
    max_position_embeddings: int  # the context length the model was trained for
    sliding: tuple[bool, ...]  # per layer: True for a sliding-window ("local") layer
    sliding_window: int  # keys a local layer sees (the query's own included)
    query_pre_attn_scalar: float  # scores are scaled by query_pre_attn_scalar ** -0.5
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # RoPE base of the global layers
    rope_scaling: RopeScaling = field(default_factory=lambda: RopeScaling("default"))  # global layers only
    rope_local_theta: float = 10_000.0  # RoPE base of the local layers (unscaled)
    final_logit_softcapping: float | None = None  # logits become c * tanh(logits / c)
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q/k/v/o projections
    hidden_act: str = "gelu_pytorch_tanh"  # activation of the gate projection
    qk_norm: bool = True  # RMSNorm over head_dim on queries and keys before RoPE
    mlp_bias: bool = False

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias


def estimate_gemma3_parameters(config: Gemma3Config) -> int:
    d, i, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    attn = d * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) + 2 * hd  # + q/k norms
    per_layer = attn + 3 * d * i + 4 * d  # 4 RMSNorms around attention and MLP
    embeddings = v * d * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * per_layer + embeddings + d


ModelConfig = LlamaConfig | GPT2Config | Gemma3Config

_REQUIRED = object()


def _get(hf: dict[str, Any], key: str, cast: type, default: Any = _REQUIRED, where: str = "") -> Any:
    """hf[key] converted with cast (None counts as absent); ConfigError names the key otherwise."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"missing required key {where}{key!r}")
        return default
    if cast is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{key!r} must be true or false, got {value!r}")
        return value
    try:
        if isinstance(value, bool) or (cast is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        converted = cast(value)
        if not 0 < converted < math.inf:  # every count, size and scale in these configs is positive (NaN is not)
            raise ValueError
        return converted
    except (TypeError, ValueError):
        kind = "a positive integer" if cast is int else "a positive number"
        raise ConfigError(f"{where}{key!r} must be {kind}, got {value!r}") from None


def _json_object(hf: dict[str, Any], key: str) -> dict[str, Any]:
    value = hf.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key!r} must be a JSON object, got {value!r}")
    return value


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
    params, scaling = _json_object(hf, "rope_parameters"), _json_object(hf, "rope_scaling")
    default_theta = _get(hf, "rope_theta", float, 10000.0)  # checked first: a NaN is named as such
    _check_rope_agreement(params, {**scaling, "rope_theta": hf.get("rope_theta")})
    return _rope_from({**params, **scaling}, default_theta)


def _rope_from(merged: dict[str, Any], default_theta: float) -> tuple[float, RopeScaling]:
    """(theta, scaling) from one rope_parameters / rope_scaling object."""
    theta = _get(merged, "rope_theta", float, default_theta)
    kind = merged.get("rope_type", merged.get("type", "default"))
    where = "rope_scaling."
    if kind == "default":
        return theta, RopeScaling("default")
    if kind == "linear":
        return theta, RopeScaling("linear", factor=_get(merged, "factor", float, where=where))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=_get(merged, "factor", float, where=where),
            low_freq_factor=_get(merged, "low_freq_factor", float, where=where),
            high_freq_factor=_get(merged, "high_freq_factor", float, where=where),
            original_max_position_embeddings=_get(merged, "original_max_position_embeddings", int, where=where),
        )
    raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")


def _check_rope_agreement(params: dict[str, Any], legacy: dict[str, Any]) -> None:
    """`rope_parameters` and the older `rope_scaling` / `rope_theta` may both be there, but must agree."""
    def normalized(d: dict[str, Any]) -> dict[str, Any]:
        d = {k: v for k, v in d.items() if v is not None}
        if "type" in d:
            d.setdefault("rope_type", d.pop("type"))
        return d

    new, old = normalized(params), normalized(legacy)
    for key in sorted(new.keys() & old.keys()):
        if new[key] != old[key]:
            where = "rope_theta" if key == "rope_theta" else f"rope_scaling.{key}"
            raise ConfigError(f"{where!r} = {old[key]!r} contradicts rope_parameters.{key} = {new[key]!r}; "
                              "keep only one of them")


def llama_config_from_hf(hf: dict[str, Any], architecture: str) -> LlamaConfig:
    hidden = _get(hf, "hidden_size", int)
    heads = _get(hf, "num_attention_heads", int)
    kv_heads = _get(hf, "num_key_value_heads", int, heads)
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (expected 'silu')")
    if hf.get("pretraining_tp", 1) != 1:
        raise ConfigError("pretraining_tp other than 1 is not supported")
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and hf.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported for Qwen models")
    theta, scaling = _rope(hf)
    attention_bias = _get(hf, "attention_bias", bool, False)
    sliding = _get(hf, "sliding_window", int, None) if architecture == "MistralForCausalLM" else None
    return LlamaConfig(
        architecture=architecture,
        vocab_size=_get(hf, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_get(hf, "intermediate_size", int),
        num_hidden_layers=_get(hf, "num_hidden_layers", int),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_get(hf, "head_dim", int, hidden // heads),
        max_position_embeddings=_get(hf, "max_position_embeddings", int, 2048),
        rms_norm_eps=_get(hf, "rms_norm_eps", float, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_get(hf, "tie_word_embeddings", bool, False),
        qkv_bias=architecture == "Qwen2ForCausalLM" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=_get(hf, "mlp_bias", bool, False),
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_window=sliding or None,
    )


def gpt2_config_from_hf(hf: dict[str, Any], architecture: str) -> GPT2Config:
    n_embd = _get(hf, "n_embd", int)
    n_head = _get(hf, "n_head", int)
    if n_embd % n_head:
        raise ConfigError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
        raise ConfigError(f"activation_function {act!r} is not supported (expected gelu_new or gelu)")
    for unsupported in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(unsupported):
            raise ConfigError(f"{unsupported}=true is not supported")
    if hf.get("scale_attn_weights") is False:
        raise ConfigError("scale_attn_weights=false is not supported")
    return GPT2Config(
        architecture=architecture,
        vocab_size=_get(hf, "vocab_size", int),
        n_positions=_get(hf, "n_positions", int),
        n_embd=n_embd,
        n_layer=_get(hf, "n_layer", int),
        n_head=n_head,
        n_inner=_get(hf, "n_inner", int, 4 * n_embd),
        layer_norm_epsilon=_get(hf, "layer_norm_epsilon", float, 1e-5),
        activation_function=act,
    )


def gemma3_config_from_hf(hf: dict[str, Any], architecture: str) -> Gemma3Config:
    heads = _get(hf, "num_attention_heads", int)
    kv_heads = _get(hf, "num_key_value_heads", int, heads)
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"hidden_activation {act!r} is not supported (expected 'gelu_pytorch_tanh')")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=true is not supported (chattui runs causal language models)")
    layers = _get(hf, "num_hidden_layers", int)
    layer_types = hf.get("layer_types")
    if layer_types is None:  # older files: every `sliding_window_pattern`-th layer is global
        pattern = _get(hf, "sliding_window_pattern", int, 6)
        sliding = tuple((i + 1) % pattern != 0 for i in range(layers))
    elif isinstance(layer_types, list) and len(layer_types) == layers and set(layer_types) <= {
        "sliding_attention", "full_attention"
    }:
        sliding = tuple(t == "sliding_attention" for t in layer_types)
    else:
        raise ConfigError(
            f"'layer_types' must list num_hidden_layers={layers} entries of 'sliding_attention' or "
            f"'full_attention', got {layer_types!r}"
        )
    # transformers >= 5: rope_parameters per layer type; older files: rope_theta, rope_scaling (global
    # layers) and rope_local_base_freq.
    params = _json_object(hf, "rope_parameters")
    full = {**_json_object(params, "full_attention"), **_json_object(hf, "rope_scaling")}
    theta, scaling = _rope_from(full, _get(hf, "rope_theta", float, 1_000_000.0))
    local_theta, local_scaling = _rope_from(
        _json_object(params, "sliding_attention"), _get(hf, "rope_local_base_freq", float, 10_000.0)
    )
    if local_scaling.kind != "default":
        raise ConfigError(f"rope_parameters.sliding_attention type {local_scaling.kind!r} is not supported")
    return Gemma3Config(
        architecture=architecture,
        vocab_size=_get(hf, "vocab_size", int),
        hidden_size=_get(hf, "hidden_size", int),
        intermediate_size=_get(hf, "intermediate_size", int),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_get(hf, "head_dim", int, 256),
        max_position_embeddings=_get(hf, "max_position_embeddings", int, 131_072),
        sliding=sliding,
        sliding_window=_get(hf, "sliding_window", int, 4096),
        query_pre_attn_scalar=_get(hf, "query_pre_attn_scalar", float, 256.0),
        rms_norm_eps=_get(hf, "rms_norm_eps", float, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        final_logit_softcapping=_get(hf, "final_logit_softcapping", float, None),
        tie_word_embeddings=_get(hf, "tie_word_embeddings", bool, True),
        attention_bias=_get(hf, "attention_bias", bool, False),
    )
