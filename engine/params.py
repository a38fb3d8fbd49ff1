"""Definitions the UI shares with the engine, in plain Python so that importing them costs no torch:
sampling settings and their defaults, the names of the dtypes a model can be loaded in, and the weight types
a model can be exported to GGUF in."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_NEW_TOKENS = 512  # when generation_config.json does not say
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
DTYPE_CHOICES = ("auto", *DTYPE_NAMES, *DTYPE_ALIASES)  # what `--dtype` and config.toml accept
GGUF_EXPORT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")  # engine.gguf.writer; ggml's type names
MAX_SEED = 2**64  # torch.Generator seeds are 64-bit
PENALTY_RANGE = (0.01, 100.0)  # beyond these a penalty overflows float32 logits (1e-40 makes them inf)


@dataclass
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy (argmax)
    top_k: int = 50  # keep the k most likely tokens; 0 = off
    top_p: float = 0.9  # keep the smallest set with this much probability; 1.0 = off
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 = off
    repetition_penalty: float = 1.0  # divide (or multiply, if negative) logits of seen tokens; 1.0 = off
    seed: int | None = None  # None: a fresh random seed, reported in the result

    def validate(self) -> None:
        """Raise ValueError naming the first setting outside its allowed range."""
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min-p must be in [0, 1), got {self.min_p}")
        low, high = PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition penalty must be in [{low:g}, {high:g}] (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
