"""The static key/value cache: allocated once, written by position, reused across turns."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values for every layer of one sequence batch.

    k, v: (n_layers, B, n_kv_heads, capacity, head_dim). Positions [0, start + T) are valid after
    `update(layer, start, k, v)` writes T new positions; nothing is ever concatenated or reallocated.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        batch_size: int = 1,
    ):
        shape = (n_layers, batch_size, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views: fewer ops per update

    @classmethod
    def for_model(cls, config, capacity: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, capacity, dtype, device)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kvh, T, hd) at positions start..start+T-1; return keys, values (B, kvh, start+T, hd)."""
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: position {end} > capacity {self.capacity}")
        keys, values = self._layers[layer]  # (B, kvh, capacity, hd)
        keys.narrow(2, start, end - start).copy_(k)
        values.narrow(2, start, end - start).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def grown(self, capacity: int, keep: int) -> KVCache:
        """A larger cache holding this one's first `keep` positions."""
        n_layers, batch, kvh, _, hd = self.k.shape
        bigger = KVCache(n_layers, kvh, hd, capacity, self.k.dtype, self.k.device, batch)
        bigger.k[:, :, :, :keep] = self.k[:, :, :, :keep]
        bigger.v[:, :, :, :keep] = self.v[:, :, :, :keep]
        return bigger
