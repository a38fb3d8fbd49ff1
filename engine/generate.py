"""Autoregressive generation: prefill the prompt (in chunks of PREFILL_CHUNK_TOKENS), then one token per decode step.

Small functions (`prefill`, `decode_one_token`) plus one generator (`generate_tokens`) that yields
each sampled token with its timing; text, stop strings and stats live in engine.session.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from engine.kv_cache import KVCache
from engine.params import SamplingParams
from engine.sampling import apply_repetition_penalty, sample


# Longer prompts are prefilled in chunks of this many tokens (llama.cpp's default micro-batch), so that the
# activations of one forward stay bounded: a 1,024-token prompt on SmolLM2-135M Q4_1 took 37-39 MB above the
# loaded model instead of 73-78 MB, for a 5-9% slower prefill (its dequantized tiles are made once per chunk).
PREFILL_CHUNK_TOKENS = 512


def prefill(model: nn.Module, ids: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
    """Run ids (T,) at positions start.. through the model, filling the cache; next-token logits (V,)."""
    for offset in range(0, max(ids.shape[0], 1), PREFILL_CHUNK_TOKENS):
        chunk = ids[offset : offset + PREFILL_CHUNK_TOKENS]
        logits = model(chunk[None], start=start + offset, cache=cache, last_only=True)[0, -1]
    return logits


def decode_one_token(model: nn.Module, token: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
    """Feed one token (1,) at position; next-token logits (V,). In one kernel call where the model's
    `fused_decode` (engine.inference) applies, else through its modules."""
    fused = getattr(model, "fused_decode", None)
    if fused is not None and fused.applies(cache):
        return fused(token, position, cache)
    return model(token[None], start=position, cache=cache, last_only=True)[0, -1]


@dataclass
class TokenStep:
    token: int  # the sampled id
    time: float  # perf_counter() when it was sampled


def generate_tokens(
    model: nn.Module,
    prompt: Sequence[int],
    *,
    cache: KVCache,
    reuse: int,
    params: SamplingParams,
    max_new_tokens: int,
    generator: torch.Generator,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[TokenStep]:
    """Yield up to max_new_tokens sampled tokens after prompt.

    The cache already holds the first `reuse` prompt positions; only prompt[reuse:] is prefilled.
    The consumer stops early by closing the generator (eos, stop string); `is_cancelled` is checked
    before every forward, so cancellation returns within one step.
    """
    device = cache.k.device
    vocab = model.config.vocab_size
    seen = torch.zeros(vocab, dtype=torch.bool, device=device)  # tokens in the sequence, for the penalty
    prompt_ids = torch.tensor(prompt, dtype=torch.long, device=device)
    seen[prompt_ids] = True
    with torch.inference_mode():
        if is_cancelled():
            return
        logits = prefill(model, prompt_ids[reuse:], reuse, cache)
        position = len(prompt)
        for i in range(max_new_tokens):
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
            token = sample(
                logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                min_p=params.min_p, generator=generator,
            )
            yield TokenStep(token, time.perf_counter())
            if i == max_new_tokens - 1 or is_cancelled():
                return
            seen[token] = True
            logits = decode_one_token(model, torch.tensor([token], device=device), position, cache)
            position += 1
