"""The one module of chattui that talks to the engine: plain Python values in and out.

`Backend` is what the app needs; `EngineBackend` implements it on `engine.Engine`, and tests pass
a fake that yields scripted chunks. The engine (and torch) is imported on first use, inside the
loading thread, so the app's window opens before torch has finished importing.

`stream()` returns a `Reply`: iterating it yields the text deltas (str); once it is exhausted,
`reply.result` holds a `ReplyResult` (the engine's GenerationResult and the chat messages left out to fit).
A request's settings are an `engine.params.GenerationSettings` (sampling plus max_new_tokens); whether a
loaded LoRA adapter answers is chosen per request (`use_adapter`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from chattui.catalog import model_label
from engine.params import Generation, GenerationResult, GenerationSettings

if TYPE_CHECKING:
    import numpy as np

ProgressCallback = Callable[..., None]  # (bytes done, bytes total[, note]): engine.session.LoadProgress
Prompt = list[dict] | str  # chat messages [{"role", "content"}], or raw text to continue
AttentionCallback = Callable[[Any, list[str]], None]  # (numpy (layers, heads, positions), prompt tokens)


class BackendError(Exception):
    """A model that cannot be loaded or a request that cannot run; str() is one line for the user."""


@dataclass
class ModelInfo:
    path: str  # the folder it was loaded from
    name: str  # what the status bar shows
    architecture: str  # the HF class name
    parameters: int
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "float32", "bfloat16", ...
    context_length: int
    defaults: GenerationSettings = field(default_factory=GenerationSettings)  # from generation_config.json
    adapter: str | None = None  # the LoRA adapter folder applied on top (unmerged), if any


@dataclass
class ReplyResult(GenerationResult):
    dropped_messages: int = 0  # oldest chat messages left out so that the prompt fits the context window


@dataclass
class RenderedPrompt:
    text: str  # exactly what the model is given: the chat template's output, or the raw text
    tokens: int  # its length in tokens


class Reply(Generation[ReplyResult]):
    """A reply being generated: iterate it for text deltas; afterwards `.result` holds its ReplyResult
    (None if the iteration was abandoned). close() (or `with`) frees the model at once when abandoning it."""


class AttentionView:
    """Attention weights of one token sequence (engine.attention.AttentionMaps), as numpy arrays and plain values.

    A layer's (heads, T, T) weights are computed when first asked for (the engine keeps the two most recent),
    under the backend's request lock: never while a reply is being generated on the same model, so a call may
    wait for one to end. Call the methods from a worker thread, not the UI's.
    """

    def __init__(self, maps, lock: threading.Lock):
        self._maps = maps  # the engine's; it holds the model's queries and keys
        self._lock = lock
        self.tokens: list[str] = list(maps.tokens)
        self.token_ids: list[int] = list(maps.token_ids)
        self.truncated: int = maps.truncated  # leading tokens left out beyond the capture limit
        self.num_layers: int = maps.num_layers
        self.num_heads: int = maps.num_heads

    def __len__(self) -> int:
        return len(self.tokens)

    def _locked(self, compute: Callable[..., Any], *args) -> Any:
        with self._lock:
            return compute(*args)

    def layer(self, layer: int) -> np.ndarray:
        """(heads, T, T) float32: row q holds query token q's weights over key tokens 0..T-1."""
        return self._locked(self._maps.layer, layer)

    def head(self, layer: int, head: int) -> np.ndarray:
        """(T, T) weights of one head."""
        return self._locked(self._maps.head, layer, head)

    def mean_over_heads(self, layer: int) -> np.ndarray:
        return self._locked(self._maps.mean_over_heads, layer)

    def max_over_heads(self, layer: int) -> np.ndarray:
        return self._locked(self._maps.max_over_heads, layer)

    def rollout(self, up_to_layer: int | None = None) -> np.ndarray:
        """(T, T) attention rollout through layers 0..up_to_layer (engine.attention.AttentionMaps.rollout)."""
        return self._locked(self._maps.rollout, up_to_layer)

    def head_summaries(self, layer: int) -> list:
        """Per head: entropy, mean distance and most attended key (engine.attention.HeadSummary, plain values)."""
        return self._locked(self._maps.head_summaries, layer)


class Backend(Protocol):
    def load(self, model_dir: str, device: str, dtype: str, progress: ProgressCallback | None = None,
             adapter: str | None = None) -> ModelInfo:
        """Load a model (plus a LoRA adapter, unmerged) and make it the current one; on failure raise
        BackendError and keep the previous one."""
        ...

    def stream(self, prompt: Prompt, settings: GenerationSettings, cancel: threading.Event, *,
               use_adapter: bool = True, stop: Sequence[str] = (),
               on_attention: AttentionCallback | None = None) -> Reply:
        """The reply to `prompt`, generated as it is iterated. Stops soon after `cancel` is set (finish_reason
        "cancelled") or at a `stop` string (not included). use_adapter=False answers as the base model when an
        adapter is loaded. Errors (no model, bad settings, a prompt that fills the context) raise BackendError
        while iterating. on_attention, if given, is called from the streaming thread after every forward with
        the weights of the position that chose the next token, (layers, heads, positions so far) float32 numpy,
        and the prompt's token strings."""
        ...

    def attention(self, prompt: Prompt) -> AttentionView:
        """Attention weights of the prompt's tokens (chat messages rendered with the template, the last
        one included; or raw text). Slow (runs the model): call it from a worker thread. Raises BackendError."""
        ...


class EngineBackend:
    """Backend on chattui's own engine; one request at a time (a new one waits for the last to end)."""

    def __init__(self) -> None:
        self._engine = None
        self._busy = threading.Lock()  # held while a request runs
        self._loading = threading.Lock()  # loads run one after another, so the last one asked for wins

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def load(self, model_dir: str, device: str = "auto", dtype: str = "auto",
             progress: ProgressCallback | None = None, adapter: str | None = None) -> ModelInfo:
        from engine import Engine, EngineError

        with self._loading:
            try:
                engine = Engine.load(model_dir, device=device, dtype=dtype, progress=progress, adapter=adapter)
            except EngineError as e:
                raise BackendError(str(e)) from None
            except (OSError, ValueError, RuntimeError, MemoryError) as e:  # e.g. out of memory on the device
                raise BackendError(f"{model_dir}: {type(e).__name__}: {e}") from None
            self._engine = engine  # the previous model is freed once no request holds it
            return self.info()

    def info(self) -> ModelInfo:
        engine = self._engine
        return ModelInfo(
            path=str(engine.model_dir),
            name=model_label(engine.model_dir, engine.adapter_dir),
            architecture=engine.config.architecture,
            parameters=engine.num_parameters,
            device=str(engine.device),
            dtype=engine.dtype_name,
            context_length=engine.context_length,
            defaults=engine.default_settings(),
            adapter=str(engine.adapter_dir) if engine.adapter_dir else None,
        )

    def attention(self, prompt: Prompt) -> AttentionView:
        from engine import EngineError

        engine = self._engine
        if engine is None:
            raise BackendError("no model is loaded")
        with self._busy:  # the capture pass runs the model: not while a reply is being generated
            try:
                if isinstance(prompt, str):
                    ids = engine.tokenizer.encode(prompt, add_special_tokens=True)
                else:
                    text = engine.tokenizer.render_chat(
                        prompt, add_generation_prompt=bool(prompt) and prompt[-1]["role"] == "user"
                    )
                    ids = engine.tokenizer.encode(text, add_special_tokens=False)
                maps = engine.attention(ids)
                maps.layer(maps.num_layers - 1)  # every layer's forward runs now; other layers are plain math
            except (EngineError, ValueError, IndexError) as e:
                raise BackendError(str(e)) from None
        return AttentionView(maps, self._busy)

    def render_prompt(self, prompt: Prompt, max_new_tokens: int) -> RenderedPrompt:
        """What stream() would give the model for `prompt` (chat messages: the oldest turns left out so that
        max_new_tokens fit, as stream() does). Raises BackendError."""
        from engine import EngineError

        engine = self._engine
        if engine is None:
            raise BackendError("no model is loaded")
        with self._busy:
            try:
                if isinstance(prompt, str):
                    return RenderedPrompt(prompt, len(engine.raw_prompt(prompt)))
                chat = engine.chat_prompt(prompt, max_new_tokens)
                return RenderedPrompt(chat.text, len(chat.token_ids))
            except (EngineError, ValueError) as e:
                raise BackendError(str(e)) from None

    def stream(self, prompt: Prompt, settings: GenerationSettings, cancel: threading.Event, *,
               use_adapter: bool = True, stop: Sequence[str] = (),
               on_attention: AttentionCallback | None = None) -> Reply:
        return Reply(lambda reply: self._generate(reply, prompt, settings, cancel, use_adapter, stop, on_attention))

    def _generate(self, reply: Reply, prompt: Prompt, settings: GenerationSettings, cancel: threading.Event,
                  use_adapter: bool, stop: Sequence[str], on_attention: AttentionCallback | None) -> Iterator[str]:
        from engine import EngineError, RenderCancelled

        engine = self._engine
        if engine is None:
            raise BackendError("no model is loaded")
        max_new = settings.max_new_tokens
        with self._busy:
            try:
                settings.sampling.validate()
                dropped = 0
                if isinstance(prompt, str):
                    ids = engine.raw_prompt(prompt)
                else:
                    try:
                        chat = engine.chat_prompt(prompt, max_new, cancel)
                    except RenderCancelled:  # stopped before there was a prompt: nothing was generated
                        reply.result = ReplyResult(
                            text="", token_ids=[], finish_reason="cancelled", prompt_tokens=0, generated_tokens=0,
                            reused_prompt_tokens=0, ttft_s=0.0, prefill_tokens_per_s=0.0, decode_tokens_per_s=0.0,
                            seed=settings.sampling.seed or 0,
                        )
                        return
                    ids, max_new, dropped = chat.token_ids, chat.max_new_tokens, chat.dropped_messages
                if max_new < 1:
                    raise BackendError(f"the prompt fills the model's context window ({engine.context_length} tokens)")
                watch = None
                if on_attention is not None:
                    tokens = engine.tokenizer.token_strings(ids)

                    def watch(rows, sequence, tokens=tokens):
                        tokens += engine.tokenizer.token_strings(sequence[len(tokens):])  # only the new ones
                        on_attention(rows, tokens[: len(sequence)])
                with engine.generate(
                    ids, settings.sampling, max_new, stop=list(stop), cancel=cancel, on_attention=watch,
                    use_adapter=use_adapter or engine.adapter_dir is None,  # without an adapter, it is the base
                ) as generation:
                    yield from generation  # closing early (the app quit) frees the engine at once
            except (EngineError, ValueError) as e:
                raise BackendError(str(e)) from None
            reply.result = ReplyResult(**vars(generation.result), dropped_messages=dropped)


PREVIEW_RECORDS = 3  # records the data preview shows


def inspect_data(model_dir: str, files: list[str], max_seq_len: int = 0, job: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The fine-tune form's data preview: engine.finetune_data's DataReport as a dict (records per file and
    detected format, token-length histogram, truncated examples), with the model's tokenizer, plus
    "first_records": the first PREVIEW_RECORDS records of the first file as {"line", "messages"} or {"line",
    "text"}, and "plan": what a job with the settings `job` (JobConfig fields besides model and data) would choose
    (engine.finetune.preview_plan: learning rate, steps, epochs, batch, held-out records). Slow (imports the engine):
    call it from a thread. max_seq_len 0 = what a job would use,
    min(1024, the model's context). Raises BackendError with a one-line message (file:line for bad records)."""
    from pathlib import Path

    from engine import EngineError
    from engine.checkpoint import read_model_config
    from engine.finetune import config_from_dict, preview_plan
    from engine.finetune_data import inspect_data as engine_inspect
    from engine.finetune_data import read_jsonl

    try:
        if not max_seq_len:  # a folder's config.json or a GGUF's header
            max_seq_len = min(1024, read_model_config(Path(model_dir).expanduser()).max_position_embeddings)
        report = engine_inspect(model_dir, files, max_seq_len).to_dict()
        _, records = read_jsonl(files[0])
        config = config_from_dict({**(job or {}), "model": model_dir, "data": list(files)}, "the form")
        report["plan"] = preview_plan(config, report["train_examples"])
    except EngineError as e:
        raise BackendError(str(e)) from None
    except (OSError, ValueError) as e:
        raise BackendError(f"{type(e).__name__}: {e}") from None
    report["first_records"] = [
        {"line": r.line, "messages": r.messages} if r.messages is not None else {"line": r.line, "text": r.text}
        for r in records[:PREVIEW_RECORDS]
    ]
    return report
