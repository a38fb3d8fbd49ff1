"""UI test helpers: a fake engine backend (scripted chunks with delays, scripted load failures),
`wait_until` for polling the app, and the notifications it showed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from chattui.backend import AttentionView, BackendError, ModelInfo, Reply, ReplyResult
from chattui.catalog import model_label
from engine.attention import AttentionMaps
from engine.params import GenerationSettings, SamplingParams

DEFAULTS = GenerationSettings(SamplingParams(temperature=0.7, top_k=50, top_p=0.9), max_new_tokens=64)


class FakeBackend:
    """Replies with `script(n, prompt)` (n = 1, 2, ... per request), one chunk every `delay` seconds.

    A folder whose name starts with "broken" fails to load; loading takes `load_delay` seconds. With `stepped`,
    each chunk waits until the test calls `steps.release()` (once per chunk), so a test can look in between.
    """

    def __init__(
        self,
        script: Callable[[int, object], list[str]] | list[str] = ("Hello", ", ", "**world**", "!"),
        delay: float = 0.005,
        load_delay: float = 0.0,
        context_length: int = 256,
        finish_reason: str = "eos",
        drop_to_fit: bool = False,
        stepped: bool = False,
    ) -> None:
        self.script = script if callable(script) else (lambda n, prompt, chunks=list(script): chunks)
        self.delay = delay
        self.load_delay = load_delay
        self.context_length = context_length
        self.finish_reason = finish_reason
        self.drop_to_fit = drop_to_fit  # leave out the oldest turns as engine.chat_prompt does (1 char = 1 token)
        self.requests: list[tuple[object, GenerationSettings]] = []  # (prompt, settings) of every stream() call
        self.used_adapter: list[bool] = []  # use_adapter of every stream() call
        self.loads: list[str] = []
        self.adapters: list[str | None] = []  # the adapter of every load() call
        self.loaded: str | None = None
        self.release_load = threading.Event()  # set it to finish a load that waits (load_delay < 0)
        self.streaming = threading.Event()  # set while a reply is being streamed
        self.steps = threading.Semaphore(0) if stepped else None  # a chunk per release(), with `stepped`
        self.busy = threading.Lock()  # held while a reply streams, as EngineBackend's request lock

    def load(self, model_dir, device="auto", dtype="auto", progress=None, adapter=None) -> ModelInfo:
        self.loads.append(str(model_dir))
        self.adapters.append(str(adapter) if adapter else None)
        steps = 4
        for i in range(steps):
            if self.load_delay < 0:
                self.release_load.wait(10)
            else:
                time.sleep(self.load_delay / steps)
            if progress:
                progress((i + 1) * 1000, steps * 1000)
        path = Path(model_dir)
        if path.name.startswith("broken"):
            raise BackendError(f"{path}/model.safetensors: corrupt or truncated safetensors file")
        self.loaded = str(path)
        return ModelInfo(
            path=str(path), name=model_label(path, adapter), architecture="FakeForCausalLM", parameters=1_234_567, device="cpu",
            dtype="float32", context_length=self.context_length, defaults=DEFAULTS,
            adapter=str(adapter) if adapter else None,
        )

    def stream(self, prompt, settings: GenerationSettings, cancel: threading.Event, *, use_adapter=True, stop=(),
               on_attention=None) -> Reply:
        return Reply(lambda reply: self._reply(reply, prompt, settings, cancel, use_adapter, on_attention))

    def _reply(self, reply: Reply, prompt, settings: GenerationSettings, cancel: threading.Event, use_adapter: bool,
               on_attention):
        if self.loaded is None:
            raise BackendError("no model is loaded")
        dropped = 0
        if self.drop_to_fit and isinstance(prompt, list):
            prompt = list(prompt)
            while (sum(len(m["content"]) for m in prompt) + settings.max_new_tokens > self.context_length
                   and sum(m["role"] != "system" for m in prompt) > 1):
                first = next(i for i, m in enumerate(prompt) if m["role"] != "system")
                end = first + 1  # a whole turn: the message and the replies to it
                while end < len(prompt) - 1 and prompt[end]["role"] == "assistant":
                    end += 1
                del prompt[first:end]
                dropped += end - first
        self.requests.append((prompt, settings))
        self.used_adapter.append(use_adapter)
        chunks = self.script(len(self.requests), prompt)
        out: list[str] = []
        finish = self.finish_reason
        started = time.perf_counter()
        self.busy.acquire()
        self.streaming.set()
        try:
            for chunk in chunks:
                if self.steps is not None:
                    self._wait_for_step(cancel)
                if cancel.is_set():
                    finish = "cancelled"
                    break
                time.sleep(self.delay)
                out.append(chunk)
                if on_attention is not None:  # one row per chunk, as if every chunk were a token
                    tokens = fake_tokens(prompt)
                    on_attention(FakeAttentionMaps(tokens + out).last_rows(), tokens)
                yield chunk
            else:
                if cancel.is_set():
                    finish = "cancelled"
                elif on_attention is not None and finish == "eos":  # as the engine: the forward that chose eos
                    tokens = fake_tokens(prompt)
                    on_attention(FakeAttentionMaps(tokens + out + ["<eos>"]).last_rows(), tokens)
        finally:
            self.streaming.clear()
            self.busy.release()
        elapsed = max(time.perf_counter() - started, 1e-6)
        prompt_tokens = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
        seed = settings.sampling.seed
        reply.result = ReplyResult(
            text="".join(out), token_ids=list(range(len(out))), finish_reason=finish, prompt_tokens=prompt_tokens,
            generated_tokens=len(out), reused_prompt_tokens=0, ttft_s=self.delay, prefill_tokens_per_s=1000.0,
            decode_tokens_per_s=len(out) / elapsed, seed=seed if seed is not None else 42, dropped_messages=dropped,
        )

    def _wait_for_step(self, cancel: threading.Event, timeout: float = 20.0) -> None:
        """Until the test releases the next chunk, the reply is cancelled, or `timeout` seconds (a test that
        forgot to release fails on what it waits for, without hanging)."""
        deadline = time.monotonic() + timeout
        while not self.steps.acquire(timeout=0.05):
            if cancel.is_set() or time.monotonic() > deadline:
                return


def fake_tokens(prompt) -> list[str]:
    """The fake's tokenizer: whitespace-separated words (chat messages prefixed by their role)."""
    if isinstance(prompt, str):
        return prompt.split() or ["<empty>"]
    return [word for m in prompt for word in [f"<{m['role']}>"] + m["content"].split()]


class FakeAttentionMaps(AttentionMaps):
    """engine.AttentionMaps (its aggregations are the real ones) on deterministic weights: 2 layers x
    3 heads, causal rows that sum to 1, different for every (layer, head)."""

    num_layers = 2
    num_heads = 3

    def __init__(self, tokens: list[str], truncated: int = 0):
        self.tokens = list(tokens)
        self.token_ids = list(range(len(tokens)))
        self.truncated = truncated

    def layer(self, layer: int) -> np.ndarray:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range")
        T = len(self)
        q, k = np.arange(T)[:, None], np.arange(T)[None, :]
        heads = []
        for h in range(self.num_heads):
            scores = np.cos(0.7 * (layer + 1) * (h + 1) * (q - k) + layer) * (2 + h)
            scores = np.where(k <= q, scores, -np.inf)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append(w / w.sum(-1, keepdims=True))
        return np.stack(heads).astype(np.float32)

    def head_summaries(self, layer: int) -> list:
        from types import SimpleNamespace

        w = self.layer(layer)
        return [SimpleNamespace(layer=layer, head=h, entropy=float(h + layer), mean_distance=float(2 * h),
                                top_key=int(w[h].mean(0).argmax())) for h in range(self.num_heads)]

    def last_rows(self) -> np.ndarray:
        """(layers, heads, T): the last query's weights, what generation's on_attention receives."""
        return np.stack([self.layer(l)[:, -1] for l in range(self.num_layers)])


class FakeAttentionBackend(FakeBackend):
    """FakeBackend with attention: FakeAttentionMaps over the prompt's words; `attention_error` makes it fail."""

    def __init__(self, *args, truncated: int = 0, attention_error: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.truncated = truncated
        self.attention_error = attention_error
        self.attention_requests: list[object] = []

    def attention(self, prompt) -> AttentionView:
        self.attention_requests.append(prompt)
        if self.loaded is None:
            raise BackendError("no model is loaded")
        if self.attention_error:
            raise BackendError(self.attention_error)
        return AttentionView(FakeAttentionMaps(fake_tokens(prompt), self.truncated), self.busy)


async def wait_until(pilot, predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition"):
    """Let the app run until predicate() is true; fail naming `what` after timeout seconds (generous: a loaded
    2-core machine can be slow, and a true predicate returns at once)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.01)


def record_notifications(app) -> list[str]:
    """A list that receives "title: message" of every notification the app shows from now on."""
    shown: list[str] = []
    notify = app.notify

    def recording(message, *, title="", **kwargs):
        shown.append(f"{title}: {message}")
        return notify(message, title=title, **kwargs)

    app.notify = recording
    return shown
