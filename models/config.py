"""Typed model configs built from a Hugging Face `config.json` dict.

Each supported family has one dataclass; `config_from_hf` picks it from the `architectures`
field (or `model_type`) and rejects anything else with the list of what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """config.json describes a model we cannot build (unsupported or inconsistent)."""


@dataclass
class RopeScaling:
    kind: str  # "default", "linear" or "llama3"
    factor: float = 1.0  # context extension factor (linear, llama3)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original/low are scaled fully
    high_freq_factor: float = 4.0  # llama3: wavelengths below original/high are kept
    original_max_position_embeddings: int = 8192  # llama3: context length before scaling


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

    @property
    def num_parameters_estimate(self) -> int:
        d, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        per_layer = attn + 3 * d * i + 2 * d
        embeddings = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + d


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


ModelConfig = LlamaConfig | GPT2Config

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ARCHITECTURES = (*LLAMA_FAMILY, "GPT2LMHeadModel")
_MODEL_TYPE_TO_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def architecture_of(hf: dict[str, Any]) -> str:
    """The HF architecture name in config.json, or one inferred from model_type."""
    architectures = hf.get("architectures") or []
    if architectures:
        return architectures[0]
    model_type = hf.get("model_type")
    if model_type in _MODEL_TYPE_TO_ARCHITECTURE:
        return _MODEL_TYPE_TO_ARCHITECTURE[model_type]
    raise ConfigError(
        f"config.json names no architecture (no 'architectures', model_type={model_type!r}); "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Build the typed config for a config.json dict; ConfigError says what is wrong."""
    architecture = architecture_of(hf)
    if architecture in LLAMA_FAMILY:
        return _llama_config(architecture, hf)
    if architecture == "GPT2LMHeadModel":
        return _gpt2_config(hf)
    raise ConfigError(
        f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _require(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"config.json: missing required key {key!r}")
    return hf[key]


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return theta, RopeScaling("default")
    if kind == "linear":
        return theta, RopeScaling("linear", factor=float(merged["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=float(merged["factor"]),
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported (supported: linear, llama3)")


def _llama_config(architecture: str, hf: dict[str, Any]) -> LlamaConfig:
    hidden = int(_require(hf, "hidden_size"))
    heads = int(_require(hf, "num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = hf.get("head_dim") or hidden // heads
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (expected 'silu')")
    if hf.get("pretraining_tp", 1) != 1:
        raise ConfigError("config.json: pretraining_tp other than 1 is not supported")
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and hf.get("use_sliding_window"):
        raise ConfigError("config.json: use_sliding_window=true is not supported for Qwen models")
    theta, scaling = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    sliding = hf.get("sliding_window") if architecture == "MistralForCausalLM" else None
    return LlamaConfig(
        architecture=architecture,
        vocab_size=int(_require(hf, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(hf, "intermediate_size")),
        num_hidden_layers=int(_require(hf, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(head_dim),
        max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=architecture == "Qwen2ForCausalLM" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_window=int(sliding) if sliding else None,
    )


def _gpt2_config(hf: dict[str, Any]) -> GPT2Config:
    n_embd = int(_require(hf, "n_embd"))
    n_head = int(_require(hf, "n_head"))
    if n_embd % n_head:
        raise ConfigError(f"config.json: n_embd={n_embd} is not a multiple of n_head={n_head}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
        raise ConfigError(f"config.json: activation_function {act!r} is not supported (expected gelu_new or gelu)")
    for unsupported in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(unsupported):
            raise ConfigError(f"config.json: {unsupported}=true is not supported")
    if hf.get("scale_attn_weights") is False:
        raise ConfigError("config.json: scale_attn_weights=false is not supported")
    return GPT2Config(
        architecture="GPT2LMHeadModel",
        vocab_size=int(_require(hf, "vocab_size")),
        n_positions=int(_require(hf, "n_positions")),
        n_embd=n_embd,
        n_layer=int(_require(hf, "n_layer")),
        n_head=n_head,
        n_inner=int(hf.get("n_inner") or 4 * n_embd),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation_function=act,
    )
