"""Llama family: Llama 2/3, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm).

Submodules are named exactly as the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj`),
so loading is a key-for-key copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import AttentionSpec, LayerCache, causal_attention
from models.config import LlamaConfig, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, as HF does (matters in bfloat16).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inverse_frequencies(
    dim: int, theta: float, scaling: RopeScaling, device: torch.device | None = None
) -> torch.Tensor:
    """(dim // 2,) float32 inverse frequencies for RoPE base theta, after `linear`, `llama3` or per-frequency
    `factors` scaling, on device (default: the default device). Computed on the CPU, as HF does: on `meta`
    (a model built before its weights load) the same few ops would import PyTorch's symbolic-shape
    machinery, ~80 MB of resident memory for the rest of the process."""
    return _cpu_inverse_frequencies(dim, theta, scaling).to(device or torch.get_default_device())


def _cpu_inverse_frequencies(dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    cpu = torch.device("cpu")
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=cpu).float() / dim
    inv_freq = 1.0 / (theta**exponents)  # (hd/2,)
    s = scaling
    if s.kind == "linear":
        return inv_freq / s.factor
    if s.kind == "factors":  # llama.cpp's form of llama3 scaling: one divisor per frequency
        return inv_freq / torch.tensor(s.frequency_factors, dtype=torch.float32, device=cpu)
    if s.kind == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(
    inv_freq: torch.Tensor, start: int, T: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (1, 1, T, hd) for positions start..start+T-1, computed in float32 like HF."""
    positions = torch.arange(start, start + T, device=inv_freq.device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos().to(dtype)[None, None], emb.sin().to(dtype)[None, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hd) rotated by cos, sin (1, 1, T, hd)."""
    return x * cos + rotate_half(x) * sin


# The gate activations of the gated MLPs: SwiGLU (Llama) and GeGLU with tanh-approximated GELU (Gemma).
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class LlamaAttention(nn.Module):
    # Inference only (engine.inference): one matmul for q, k and v whose weight the three share.
    fused_qkv: nn.Module | None = None
    # Set by the engine to watch attention live: called with (layer, q, k, start) after the cache update.
    observer: Callable | None = None

    def __init__(self, config: LlamaConfig, layer_idx: int, spec: AttentionSpec, norm: type[nn.Module] = RMSNorm):
        """spec: how scores become weights; norm: the class of q_norm/k_norm (when config.qk_norm)."""
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = hd = config.head_dim
        self.spec = spec
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = norm(hd, config.rms_norm_eps)
            self.k_norm = norm(hd, config.rms_norm_eps)

    def project_qkv(self, x, cos, sin):
        """Rotated queries (B, nh, T, hd) and keys, values (B, kvh, T, hd) for hidden states x (B, T, D)."""
        B, T, _ = x.shape
        nh, kvh, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.fused_qkv is not None:
            qkv = self.fused_qkv(x).view(B, T, nh + 2 * kvh, hd).transpose(1, 2)  # (B, nh + 2 kvh, T, hd)
            if not hasattr(self, "q_norm"):
                # q and k heads are adjacent: rotate them in one go (fewer ops per decode step).
                q, k = apply_rope(qkv[:, : nh + kvh], cos, sin).split([nh, kvh], dim=1)
                return q, k, qkv[:, nh + kvh :]
            q, k, v = qkv.split([nh, kvh, kvh], dim=1)
        else:
            q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
            k = self.k_proj(x).view(B, T, kvh, hd).transpose(1, 2)  # (B, kvh, T, hd)
            v = self.v_proj(x).view(B, T, kvh, hd).transpose(1, 2)  # (B, kvh, T, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)  # per head, over hd
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, start: int, cache: LayerCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start, k, v)  # (B, kvh, start+T, hd)
        if self.observer is not None:
            self.observer(self.layer_idx, q, k, start)
        y = causal_attention(q, k, v, start, self.spec)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    # Inference only (engine.inference): one matmul for gate and up whose weight the two share.
    fused_gate_up: nn.Module | None = None

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.activation(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, AttentionSpec(window=config.sliding_window))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, start: int, cache: LayerCache | None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, start, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", self._inverse_frequencies(None), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers on the weights' device (after building on `meta`)."""
        self.inv_freq = self._inverse_frequencies(self.model.norm.weight.device)  # lm_head may hold GGUF blocks

    def _inverse_frequencies(self, device: torch.device | None) -> torch.Tensor:
        c = self.config
        return rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling, device)

    def attention_inputs(self, input_ids: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, AttentionSpec]]:
        """Per layer, lazily: the rotated queries (B, nh, T, hd) and keys (B, kvh, T, hd) its attention
        sees for input_ids (B, T) from position 0, and its AttentionSpec (for attention capture)."""
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(self.inv_freq, 0, input_ids.shape[1], x.dtype)
        for layer in self.model.layers:
            q, k, _ = layer.self_attn.project_qkv(layer.input_layernorm(x), cos, sin)
            yield q, k, layer.self_attn.spec
            x = layer(x, cos, sin, 0, None)

    def forward(
        self,
        input_ids: torch.Tensor,
        start: int = 0,
        cache: LayerCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for input_ids (B, T) at positions start..start+T-1 (only the last if last_only)."""
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(self.inv_freq, start, input_ids.shape[1], x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, start, cache)
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        return self.lm_head(self.model.norm(x))  # (B, T, V)
