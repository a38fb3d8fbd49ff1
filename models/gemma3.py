"""Gemma 3 (text): Llama's attention and gated MLP with Gemma's differences.

- Local and global layers alternate (`Gemma3Config.sliding`): local layers attend to a sliding window
  and use their own RoPE base (`rope_local_theta`), global layers see everything.
- RMSNorm scales by (1 + weight), in float32; queries and keys are RMSNormed per head before RoPE.
- Attention and MLP each sit between a pre- and a post-norm; the MLP is GeGLU (tanh GELU).
- Embeddings are scaled by sqrt(hidden_size), rounded to the embedding dtype as HF does.
- Scores are scaled by query_pre_attn_scalar ** -0.5; final logits are soft-capped (c * tanh(x / c))
  where the config sets final_logit_softcapping. attn_logit_softcapping is read by nobody: Gemma 3
  replaced Gemma 2's score capping with the q/k norms, and transformers' Gemma 3 ignores it too.

Submodules are named exactly as the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_norm`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from models.attention import AttentionSpec, LayerCache
from models.config import Gemma3Config, RopeScaling
from models.llama import LlamaAttention, LlamaMLP, rope_cos_sin, rope_inverse_frequencies


class Gemma3RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))  # stored as the offset from 1
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise and scale in float32, round once at the end (unlike Llama's RMSNorm).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Gemma3Config, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.sliding = config.sliding[layer_idx]
        spec = AttentionSpec(config.query_pre_attn_scalar**-0.5, config.sliding_window if self.sliding else None)
        self.input_layernorm = Gemma3RMSNorm(d, eps)
        self.self_attn = LlamaAttention(config, layer_idx, spec, norm=Gemma3RMSNorm)
        self.post_attention_layernorm = Gemma3RMSNorm(d, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(d, eps)
        self.mlp = LlamaMLP(config)
        self.post_feedforward_layernorm = Gemma3RMSNorm(d, eps)

    def forward(self, x, cos, sin, start: int, cache: LayerCache | None) -> torch.Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, start, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3TextModel(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.model = Gemma3TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq_global", None, persistent=False)
        self.register_buffer("inv_freq_local", None, persistent=False)
        self.init_buffers()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self) -> None:
        """(Re)compute the RoPE inverse frequencies on the weights' device (after building on `meta`)."""
        c, device = self.config, self.model.norm.weight.device  # lm_head may hold GGUF blocks
        self.inv_freq_global = rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling, device)
        self.inv_freq_local = rope_inverse_frequencies(c.head_dim, c.rope_local_theta, RopeScaling("default"), device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scaled token embeddings (B, T, D) for input_ids (B, T)."""
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype).item()  # sqrt(D) in x's dtype

    def ropes(self, start: int, T: int, dtype: torch.dtype) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin (1, 1, T, hd) for positions start..start+T-1, by layer kind (True: sliding/local)."""
        return {
            False: rope_cos_sin(self.inv_freq_global, start, T, dtype),
            True: rope_cos_sin(self.inv_freq_local, start, T, dtype),
        }

    def attention_inputs(self, input_ids: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, AttentionSpec]]:
        """Per layer, lazily: the normed, rotated queries (B, nh, T, hd) and keys (B, kvh, T, hd) its attention
        sees for input_ids (B, T) from position 0, and its AttentionSpec (for attention capture)."""
        x = self.embed(input_ids)  # (B, T, D)
        ropes = self.ropes(0, input_ids.shape[1], x.dtype)
        for layer in self.model.layers:
            cos, sin = ropes[layer.sliding]
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
        x = self.embed(input_ids)  # (B, T, D)
        ropes = self.ropes(start, input_ids.shape[1], x.dtype)
        for layer in self.model.layers:
            x = layer(x, *ropes[layer.sliding], start, cache)
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        logits = self.lm_head(self.model.norm(x))  # (B, T, V)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
