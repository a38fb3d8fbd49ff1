"""The Engine: one loaded model with its tokenizer and KV cache, serving one request at a time.

This is the API the UI and CLI use: text and plain numbers in and out, never tensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.attention import AttentionMaps, AttentionWatcher
from engine import kernels
from engine.checkpoint import (
    BLOCKS_COMPUTE_DTYPE,
    GenerationDefaults,
    ProgressCallback,
    check_model_path,
    keeps_gguf_blocks,
    load_weights,
    read_defaults,
    read_model_config,
)
from engine.device import dtype_name, resolve_device, resolve_dtype
from engine.errors import EngineError, PromptTooLongError
from engine.generate import generate_tokens
from engine.gguf.header import is_gguf_path
from engine.inference import prepare_for_inference
from engine.kv_cache import KVCache
from engine.lora import apply_adapter, read_adapter, set_lora_enabled
from engine.params import Generation, GenerationResult, GenerationSettings, SamplingParams
from engine.quant import count_weights
from engine.text_stream import TextStream
from engine.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

CACHE_GRANULE = 256  # KV cache capacity grows in multiples of this many positions

# Engine.load's progress: (bytes of weights read, bytes in all, note). The note names a slow step that is not
# reading weights (kernels.BUILD_NOTE while the bfloat16 kernels compile, with 0, 0), else it is None.
LoadProgress = Callable[[int, int, str | None], None]


@dataclass
class ChatPrompt:
    token_ids: list[int]
    text: str  # the rendered template
    dropped_messages: int  # oldest non-system messages left out to fit the context window
    max_new_tokens: int  # possibly reduced so prompt + reply fit


def _oldest_turn(messages: list[dict]) -> slice | None:
    """The oldest droppable turn: the first non-system message and the non-user replies after it,
    never reaching the last message (the one being answered)."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is None or first >= len(messages) - 1:
        return None
    end = first + 1
    while end < len(messages) - 1 and messages[end]["role"] not in ("user", "system"):
        end += 1
    return slice(first, end)


@dataclass
class Engine:
    model: torch.nn.Module
    tokenizer: ChatTokenizer
    defaults: GenerationDefaults
    device: torch.device
    dtype: torch.dtype
    model_dir: Path  # the checkpoint folder or the GGUF file
    context_length: int
    eos_token_ids: set[int] = field(default_factory=set)
    adapter_dir: Path | None = None  # the LoRA adapter applied at load time (unmerged), if any
    _cache: KVCache | None = None
    _cached_ids: list[int] = field(default_factory=list)  # tokens whose keys/values are in _cache
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _adapter_on: bool = True  # whether the loaded adapter's layers are active (per request: generate's use_adapter)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        progress: LoadProgress | None = None,
        adapter: str | Path | None = None,
    ) -> Engine:
        """Load a checkpoint folder or a GGUF file; raises CheckpointError / TemplateError / EngineError with
        one-line messages. A GGUF with `dtype="auto"` on CPU keeps its quantized matrices in their blocks
        (engine.quant; see checkpoint.keeps_gguf_blocks); an explicit dtype or another device dequantizes
        them to that dtype.

        adapter: a LoRA adapter folder in PEFT's format (engine.lora), applied on top of the base weights
        without merging them (its layers run unfused; `generate(..., use_adapter=False)` answers as the base model).
        """
        model_dir = check_model_path(model_dir)
        config = read_model_config(model_dir)
        lora = read_adapter(adapter) if adapter is not None else None  # checked before the slow part
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        tokenizer = ChatTokenizer.load(model_dir)
        defaults = read_defaults(model_dir)
        # LoRA layers wrap dense Linear layers: an adapter gets the dequantized base.
        wants_blocks = lora is None and dtype == "auto" and torch_device.type == "cpu" and is_gguf_path(model_dir)
        on_cpu = torch_device.type == "cpu"
        # The quantized-weight library also holds the fused decode step of float32 and bfloat16 models
        # (engine.fused_decode); bfloat16 decoding off that step runs the bfloat16 library's kernels.
        builds = ({kernels.QUANT: kernels.quant_ops} if wants_blocks or (on_cpu and torch_dtype == torch.float32)
                  else {kernels.QUANT: kernels.quant_ops, kernels.BF16: kernels.bf16_decode_ops}
                  if on_cpu and torch_dtype == torch.bfloat16 else {})
        if progress and any(kernels.needs_build(library) for library in builds):
            progress(0, 0, kernels.BUILD_NOTE)  # compile now, while the note shows, not after the weights at 100%
            for build in builds.values():
                build()
        keep_blocks = wants_blocks and keeps_gguf_blocks(model_dir, dtype, torch_device)
        if keep_blocks:
            torch_dtype = BLOCKS_COMPUTE_DTYPE
        model = load_weights(model_dir, config, torch_device, torch_dtype,
                             (lambda done, total: progress(done, total, None)) if progress else None, keep_blocks)
        if lora is not None:  # before preparing, so the adapted layers stay plain and unfused
            for layer in apply_adapter(model, lora).values():
                layer.lora_A.to(dtype=torch_dtype)
                layer.lora_B.to(dtype=torch_dtype)
        prepare_for_inference(model, torch_device, torch_dtype)
        eos = set(defaults.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        return cls(
            model=model,
            tokenizer=tokenizer,
            defaults=defaults,
            device=torch_device,
            dtype=torch_dtype,
            model_dir=model_dir,
            context_length=config.max_position_embeddings,
            eos_token_ids=eos,
            adapter_dir=lora.path if lora is not None else None,
        )

    @property
    def config(self):
        return self.model.config

    @property
    def num_parameters(self) -> int:
        """Every weight, those kept in GGUF blocks included (a tied embedding and lm_head count once)."""
        return count_weights(self.model)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def default_sampling(self) -> SamplingParams:
        d = self.defaults
        return SamplingParams(d.temperature, d.top_k, d.top_p, d.min_p, d.repetition_penalty)

    def default_settings(self) -> GenerationSettings:
        """What a request uses when nobody says otherwise: generation_config.json's values, else ours."""
        return GenerationSettings(self.default_sampling(), self.defaults.max_new_tokens)

    # -- prompts -----------------------------------------------------------------------------

    def raw_prompt(self, text: str) -> list[int]:
        """The text tokenized as-is, special tokens added like `tokenizer(text)` in transformers."""
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        if not ids:
            raise PromptTooLongError("the prompt is empty after tokenization") from None
        if len(ids) >= self.context_length:
            raise PromptTooLongError(
                f"prompt is {len(ids)} tokens; the model's context window is {self.context_length}"
            )
        return ids

    def chat_prompt(self, messages: list[dict], max_new_tokens: int,
                    cancel: threading.Event | None = None) -> ChatPrompt:
        """Render messages with the chat template, dropping the oldest non-system turns if needed
        so that the prompt plus max_new_tokens fits the context window. Setting cancel stops a slow render
        (RenderCancelled)."""
        messages = list(messages)
        dropped = 0
        while True:
            text = self.tokenizer.render_chat(messages, add_generation_prompt=True, cancel=cancel)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            turn = _oldest_turn(messages)
            if len(ids) + max_new_tokens <= self.context_length or turn is None:
                break
            del messages[turn]
            dropped += turn.stop - turn.start
        if len(ids) >= self.context_length:
            raise PromptTooLongError(
                f"the last message alone is {len(ids)} tokens; the model's context window is {self.context_length}"
            )
        if dropped:
            log.warning("dropped the %d oldest message(s) to fit the %d-token context", dropped, self.context_length)
        return ChatPrompt(ids, text, dropped, min(max_new_tokens, self.context_length - len(ids)))

    def attention(self, token_ids: list[int]) -> AttentionMaps:
        """Attention weights of every layer and head for a token sequence (see engine.attention)."""
        return AttentionMaps(self.model, token_ids, self.tokenizer.token_strings(token_ids), self.device)

    # -- generation --------------------------------------------------------------------------

    def _prepare_cache(self, prompt: list[int], total: int) -> int:
        """Make the cache hold `total` positions; return how many prompt positions it already has."""
        common = 0
        for cached, new in zip(self._cached_ids, prompt):
            if cached != new:
                break
            common += 1
        reuse = min(common, len(prompt) - 1)  # at least one token must be prefilled to get logits
        if self._cache is None or self._cache.capacity < total:
            capacity = min(self.context_length, -(-total // CACHE_GRANULE) * CACHE_GRANULE)
            if self._cache is None:
                self._cache = KVCache.for_model(self.config, capacity, self.dtype, self.device)
            else:
                self._cache = self._cache.grown(capacity, reuse)
        return reuse

    def reset_cache(self) -> None:
        """Forget cached keys/values (e.g. when switching conversation); the memory is kept."""
        self._cached_ids = []

    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop: list[str] | tuple[str, ...] = (),
        cancel: threading.Event | Callable[[], bool] | None = None,
        on_attention: Callable[[np.ndarray, list[int]], None] | None = None,
        use_adapter: bool = True,
    ) -> Generation[GenerationResult]:
        """Stream a continuation of prompt ids. One request at a time per engine.

        use_adapter=False answers as the base model when an adapter is loaded (e.g. to compare).

        on_attention, if given, is called after every forward with the attention weights of the
        position that chose the next token, (layers, heads, S) float32, and the S token ids they cover."""
        try:
            params.validate()
        except ValueError as e:
            raise EngineError(str(e)) from None
        if not prompt:
            raise EngineError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise EngineError(f"prompt token ids must be in [0, {vocab})")
        if max_new_tokens < 1:
            raise EngineError(f"max new tokens must be >= 1, got {max_new_tokens}")
        if len(prompt) >= self.context_length:
            raise PromptTooLongError(
                f"prompt is {len(prompt)} tokens; the model's context window is {self.context_length}"
            )
        max_new_tokens = min(max_new_tokens, self.context_length - len(prompt))
        if not use_adapter and self.adapter_dir is None:
            raise EngineError("no adapter is loaded")
        is_cancelled = cancel.is_set if isinstance(cancel, threading.Event) else (cancel or (lambda: False))
        return Generation(
            lambda generation: self._stream(
                generation, list(prompt), params, max_new_tokens, stop, is_cancelled, on_attention, use_adapter
            )
        )

    def _stream(
        self, generation, prompt, params, max_new_tokens, stop, is_cancelled, on_attention, use_adapter
    ) -> Iterator[str]:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("the engine is already generating; one request at a time")
        try:
            if self.adapter_dir is not None and use_adapter != self._adapter_on:
                set_lora_enabled(self.model, use_adapter)
                self._adapter_on = use_adapter
                self.reset_cache()  # keys and values were computed with the other weights
            sequence = list(prompt)  # prompt + tokens fed so far: what the live weights cover
            watcher = (
                AttentionWatcher(self.model, lambda weights: on_attention(weights, sequence[: weights.shape[-1]]))
                if on_attention
                else contextlib.nullcontext()
            )
            with watcher:
                yield from self._run(generation, prompt, params, max_new_tokens, stop, is_cancelled, sequence)
        finally:
            self._lock.release()

    def _run(self, generation, prompt, params, max_new_tokens, stop, is_cancelled, sequence) -> Iterator[str]:
        started = time.perf_counter()
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        rng = torch.Generator(device=self.device).manual_seed(seed)
        reuse = self._prepare_cache(prompt, len(prompt) + max_new_tokens)
        self._cached_ids = prompt[:reuse]  # until this request finishes, only the reused part is trusted
        stream = TextStream(lambda ids: self.tokenizer.decode(ids), stop)
        generated: list[int] = []
        finish = "length"
        first_at = last_at = None
        steps = generate_tokens(
            self.model, prompt, cache=self._cache, reuse=reuse, params=params,
            max_new_tokens=max_new_tokens, generator=rng, is_cancelled=is_cancelled,
        )
        try:
            for step in steps:
                first_at = first_at or step.time
                last_at = step.time
                if step.token in self.eos_token_ids:
                    finish = "eos"
                    break
                generated.append(step.token)
                sequence.append(step.token)
                delta = stream.push(step.token)
                if delta:
                    yield delta
                if stream.stopped:
                    finish = "stop"
                    break
            else:
                finish = "cancelled" if is_cancelled() and len(generated) < max_new_tokens else "length"
        finally:
            steps.close()
        if not stream.stopped:
            tail = stream.finish()
            if tail:
                yield tail
        # Every sampled token but the last was fed back, so its keys/values are in the cache.
        sampled = generated + ([step.token] if finish == "eos" else [])
        self._cached_ids = prompt + sampled[:-1] if sampled else prompt[:reuse]
        if first_at is None:
            finish = "cancelled"
        prefill_s = (first_at or time.perf_counter()) - started
        decode_n = max(len(sampled) - 1, 0)
        decode_s = (last_at - first_at) if first_at else 0.0
        generation.result = GenerationResult(
            text=stream.text,
            token_ids=generated,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            generated_tokens=len(generated),
            reused_prompt_tokens=reuse,
            ttft_s=prefill_s,
            prefill_tokens_per_s=(len(prompt) - reuse) / prefill_s if prefill_s > 0 else 0.0,
            decode_tokens_per_s=decode_n / decode_s if decode_s > 0 else 0.0,
            seed=seed,
        )
