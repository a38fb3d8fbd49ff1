"""Definitions the UI shares with the engine, in plain Python so that importing them costs no torch:
sampling settings and their defaults, what one request is generated with (GenerationSettings), the stream
of text a request yields and its result (Generation, GenerationResult), the names of the dtypes a model can
be loaded in, and the weight types a model can be exported to GGUF in."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Generic, TypeVar

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


@dataclass
class GenerationSettings:
    """What one reply is generated with: how tokens are sampled and how many may be generated."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def to_dict(self) -> dict[str, Any]:
        """Flat, as conversations keep them: SamplingParams' fields and max_new_tokens."""
        return {**asdict(self.sampling), "max_new_tokens": self.max_new_tokens}

    def updated(self, values: dict[str, Any]) -> GenerationSettings:
        """A copy with the values of to_dict()'s keys replaced; other keys (a system prompt) are ignored."""
        sampling = {f.name: values[f.name] for f in fields(SamplingParams) if f.name in values}
        return GenerationSettings(
            replace(self.sampling, **sampling), values.get("max_new_tokens", self.max_new_tokens)
        )


@dataclass
class GenerationResult:
    text: str  # the reply as streamed (a stop string and what follows it are not included)
    token_ids: list[int]  # generated ids, without the final eos
    finish_reason: str  # "eos", "stop", "length" or "cancelled"
    prompt_tokens: int
    generated_tokens: int  # len(token_ids)
    reused_prompt_tokens: int  # prompt positions served from the KV cache instead of prefilled
    ttft_s: float  # time to first token: request start to first sampled token
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # tokens after the first, over the time after the first
    seed: int  # the sampling seed used (reuse it to reproduce the reply)


R = TypeVar("R")


class Generation(Generic[R]):
    """Iterate for text deltas; afterwards `.result` holds the result (the engine's: a GenerationResult).

    Abandoning the iteration early? Call close() (or use `with`) so the engine is free at once.
    """

    def __init__(self, run: Callable[[Generation[R]], Iterator[str]]):
        self.result: R | None = None  # set by run when the stream ends
        self._deltas = run(self)

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def close(self) -> None:
        self._deltas.close()

    def __enter__(self) -> Generation[R]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
