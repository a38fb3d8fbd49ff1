"""GPT-2 family: learned positions, LayerNorm, GELU MLP and Conv1D weights stored as (in, out).

Submodules are named exactly as the Hugging Face checkpoint keys (`transformer.h.0.attn.c_attn`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import AttentionSpec, LayerCache, causal_attention
from models.config import GPT2Config


class Conv1D(nn.Module):
    """HF GPT-2's linear layer: weight stored (in, out), so y = x @ weight + bias."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(nn.Module):
    # Set by the engine to watch attention live: called with (layer, q, k, start) after the cache update.
    observer: Callable | None = None

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.spec = AttentionSpec()

    def project_qkv(self, x: torch.Tensor):
        """Queries, keys, values (B, nh, T, hd) for hidden states x (B, T, D)."""
        B, T, D = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim)  # (B, T, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hd)
        return q, k, v

    def forward(self, x: torch.Tensor, start: int, cache: LayerCache | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.project_qkv(x)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start, k, v)  # (B, nh, start+T, hd)
        if self.observer is not None:
            self.observer(self.layer_idx, q, k, start)
        y = causal_attention(q, k, v, start, self.spec)  # (B, nh, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.n_inner)
        self.c_proj = Conv1D(config.n_inner, config.n_embd)
        self.approximate = "none" if config.activation_function == "gelu" else "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, start: int, cache: LayerCache | None) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), start, cache)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        # GPT-2 always ties the output projection to the token embedding.
        self.lm_head.weight = self.transformer.wte.weight

    def init_buffers(self) -> None:
        """GPT-2 has no non-persistent buffers; kept for a uniform loading interface."""

    def embed(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Token plus position embeddings (B, T, D) for input_ids (B, T) at positions start.."""
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        return self.transformer.wte(input_ids) + self.transformer.wpe(positions)

    def attention_inputs(self, input_ids: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, AttentionSpec]]:
        """Per layer, lazily: the queries (B, nh, T, hd) and keys (B, nh, T, hd) its attention sees for
        input_ids (B, T) from position 0, and its AttentionSpec (for attention capture)."""
        x = self.embed(input_ids, 0)  # (B, T, D)
        for block in self.transformer.h:
            q, k, _ = block.attn.project_qkv(block.ln_1(x))
            yield q, k, block.attn.spec
            x = block(x, 0, None)

    def forward(
        self,
        input_ids: torch.Tensor,
        start: int = 0,
        cache: LayerCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for input_ids (B, T) at positions start..start+T-1 (only the last if last_only)."""
        x = self.embed(input_ids, start)  # (B, T, D)
        for block in self.transformer.h:
            x = block(x, start, cache)
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
