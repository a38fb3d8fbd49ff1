"""Attention capture: how much every layer and head attends from each token to each earlier one.

The weights come from an explicit softmax(QKᵀ/√d) on the very queries and keys the fast path uses
(same RoPE, each layer's AttentionSpec: scaling and causal/sliding-window mask, GQA head mapping), so
they are what the model computes, not an approximation. Normal decoding is untouched: capture is a separate forward pass.

Memory stays bounded for long contexts: the pass keeps only each layer's queries and keys
(O(layers x T x width)); a layer's (heads, T, T) weights are computed when asked for, and only the
two most recent layers are kept. A 1,024-token capture of a model with 8 heads needs 32 MB per layer
of weights; sequences are capped at MAX_CAPTURE_TOKENS (the most recent tokens are kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models.attention import AttentionSpec, attention_probabilities

MAX_CAPTURE_TOKENS = 4096
_KEPT_LAYERS = 2


@dataclass
class HeadSummary:
    layer: int
    head: int
    entropy: float  # mean over query tokens of the entropy (nats) of their attention row
    mean_distance: float  # mean over query tokens of the expected distance (tokens) back to what they attend
    top_key: int  # index of the key token that receives the most attention on average


class AttentionMaps:
    """Attention weights of one token sequence, as numpy arrays: layer(l) is (heads, T, T) float32,
    row q holds the weights of query token q over key tokens 0..T-1 (zero for keys after q)."""

    def __init__(self, model: torch.nn.Module, token_ids: list[int], tokens: list[str], device: torch.device):
        if not token_ids:
            raise ValueError("nothing to capture: the token sequence is empty")
        self.truncated = max(0, len(token_ids) - MAX_CAPTURE_TOKENS)  # leading tokens left out
        self.token_ids = token_ids[self.truncated :]
        self.tokens = tokens[self.truncated :]
        config = model.config
        self.num_layers: int = config.num_hidden_layers
        self.num_heads: int = config.num_attention_heads
        ids = torch.tensor([self.token_ids], dtype=torch.long, device=device)
        self._inputs = model.attention_inputs(ids)  # lazily yields each layer's (q, k, AttentionSpec)
        self._qk: list[tuple[torch.Tensor, torch.Tensor, AttentionSpec]] = []
        self._weights: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.token_ids)

    def layer(self, layer: int) -> np.ndarray:
        """(heads, T, T) float32 weights of one layer."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        if layer in self._weights:
            self._weights.move_to_end(layer)
            return self._weights[layer]
        with torch.inference_mode():
            while len(self._qk) <= layer:
                self._qk.append(next(self._inputs))
            q, k, spec = self._qk[layer]
            weights = attention_probabilities(q, k, 0, spec)[0].cpu().numpy()  # (nh, T, T)
        self._weights[layer] = weights
        if len(self._weights) > _KEPT_LAYERS:
            self._weights.popitem(last=False)
        return weights

    def head(self, layer: int, head: int) -> np.ndarray:
        """(T, T) weights of one head."""
        if not 0 <= head < self.num_heads:
            raise IndexError(f"head {head} out of range 0..{self.num_heads - 1}")
        return self.layer(layer)[head]

    def mean_over_heads(self, layer: int) -> np.ndarray:
        return self.layer(layer).mean(axis=0)

    def max_over_heads(self, layer: int) -> np.ndarray:
        return self.layer(layer).max(axis=0)

    def rollout(self, up_to_layer: int | None = None) -> np.ndarray:
        """Attention rollout (Abnar & Zuidema, 2020): head-averaged weights with the residual path
        added (0.5 A + 0.5 I, rows renormalised), multiplied through layers 0..up_to_layer."""
        last = self.num_layers - 1 if up_to_layer is None else up_to_layer
        T = len(self)
        flow = np.eye(T, dtype=np.float32)
        for layer in range(last + 1):
            mixed = 0.5 * self.mean_over_heads(layer) + 0.5 * np.eye(T, dtype=np.float32)
            mixed /= mixed.sum(axis=-1, keepdims=True)
            flow = mixed @ flow
        return flow

    def head_summaries(self, layer: int) -> list[HeadSummary]:
        weights = self.layer(layer)  # (nh, T, T)
        T = weights.shape[-1]
        entropy = -(weights * np.log(np.clip(weights, 1e-12, None))).sum(-1).mean(-1)  # (nh,)
        offsets = np.arange(T)[:, None] - np.arange(T)[None, :]  # (T, T): query index - key index
        distance = (weights * offsets).sum(-1).mean(-1)  # (nh,)
        top = weights.mean(axis=1).argmax(-1)  # (nh,)
        return [
            HeadSummary(layer, h, float(entropy[h]), float(distance[h]), int(top[h])) for h in range(self.num_heads)
        ]


class AttentionWatcher:
    """Live attention during generation: after every forward, calls `callback` with the weights of the
    last query position, (layers, heads, S) float32 over the S positions so far: what the next token
    was chosen from. Installed on the attention modules only while a generation runs."""

    def __init__(self, model: torch.nn.Module, callback: Callable[[np.ndarray], None]):
        self._modules = [m for m in model.modules() if hasattr(type(m), "observer")]
        self._callback = callback
        self._rows: list[np.ndarray] = []

    def __enter__(self) -> AttentionWatcher:
        for module in self._modules:
            module.observer = self._observe
        return self

    def __exit__(self, *exc) -> None:
        for module in self._modules:
            del module.observer  # back to the class attribute None

    def _observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, start: int) -> None:
        last = q.shape[2] - 1
        spec = self._modules[layer].spec
        weights = attention_probabilities(q[:, :, last:], k, start + last, spec)  # (B, nh, 1, S)
        self._rows.append(weights[0, :, 0].cpu().numpy())
        if len(self._rows) == len(self._modules):
            rows, self._rows = self._rows, []
            self._callback(np.stack(rows))
