"""Causal self-attention over a (possibly cached) key/value sequence, shared by all families."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class LayerCache(Protocol):
    """What a model needs from a KV cache (engine.kv_cache.KVCache implements it)."""

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, kvh, T, hd) at positions start.. and return all keys/values so far."""
        ...


def causal_mask(start: int, T: int, S: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean (T, S) mask: query i (position start+i) may see key j iff j <= start+i (and within window)."""
    query_pos = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = key_pos <= query_pos  # (T, S)
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer turns query-key scores into weights (the defaults: plain softmax(q kᵀ / √hd))."""

    scale: float | None = None  # scores are q kᵀ * scale; None means 1 / √hd
    window: int | None = None  # each query sees at most this many most recent keys, itself included


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, spec: AttentionSpec = AttentionSpec()
) -> torch.Tensor:
    """softmax(q kᵀ * scale) v for queries at positions start.. over keys 0..S-1.

    q: (B, nh, T, hd); k, v: (B, kvh, S, hd) with S = start + T and nh a multiple of kvh
    (query head h reads key/value head h // (nh // kvh), as in HF's repeat_kv).
    Returns (B, nh, T, hd).
    """
    B, nh, T, hd = q.shape
    kvh, S = k.shape[1], k.shape[2]
    groups = nh // kvh
    window = spec.window
    if T == 1:
        if window is not None and S > window:
            k, v = k[:, :, S - window :], v[:, :, S - window :]
        # One query per head: fold the query heads that share a kv head into rows, no copy of k/v.
        folded = q.reshape(B, kvh, groups, hd)
        y = F.scaled_dot_product_attention(folded, k, v, scale=spec.scale)  # (B, kvh, groups, hd)
        return y.reshape(B, nh, 1, hd)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
        v = v.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
    if start == 0 and (window is None or S <= window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.scale)
    mask = causal_mask(start, T, S, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale)


def attention_probabilities(
    q: torch.Tensor, k: torch.Tensor, start: int = 0, spec: AttentionSpec = AttentionSpec()
) -> torch.Tensor:
    """The weights causal_attention applies, computed explicitly: softmax(q kᵀ * scale) under the same
    causal (and sliding-window) mask and GQA head mapping. q: (B, nh, T, hd), k: (B, kvh, S, hd);
    returns (B, nh, T, S) float32, rows summing to 1, zero above the diagonal."""
    B, nh, T, hd = q.shape
    kvh, S = k.shape[1], k.shape[2]
    k = k.repeat_interleave(nh // kvh, dim=1)  # (B, nh, S, hd): query head h reads kv head h // groups
    scale = hd**-0.5 if spec.scale is None else spec.scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, nh, T, S)
    scores = scores.masked_fill(~causal_mask(start, T, S, spec.window, q.device), float("-inf"))
    return scores.softmax(dim=-1)
