"""The one module of chattui that talks to the engine: plain Python values in and out.

`Backend` is what the app needs; `EngineBackend` implements it on `engine.Engine`, and tests pass
a fake that yields scripted chunks. The engine (and torch) is imported on first use, inside the
loading thread, so the app's window opens before torch has finished importing.

`stream()` yields text deltas (str) and then exactly one result dict:
    text, finish_reason ("eos", "stop", "length", "cancelled"), prompt_tokens, generated_tokens,
    reused_prompt_tokens, ttft_s, prefill_tokens_per_s, decode_tokens_per_s, seed, dropped_messages
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from chattui.catalog import display_name

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)
Prompt = list[dict] | str  # chat messages [{"role", "content"}], or raw text to continue


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
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling defaults from generation_config.json

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backend(Protocol):
    def load(self, model_dir: str, device: str, dtype: str, progress: ProgressCallback | None = None) -> ModelInfo:
        """Load a model and make it the current one; on failure raise BackendError and keep the previous one."""
        ...

    def stream(self, prompt: Prompt, settings: dict[str, Any], cancel: threading.Event) -> Iterator[str | dict]:
        """Text deltas, then one result dict. Stops soon after `cancel` is set (finish_reason "cancelled")."""
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
             progress: ProgressCallback | None = None) -> ModelInfo:
        from engine import Engine, EngineError

        with self._loading:
            try:
                engine = Engine.load(model_dir, device=device, dtype=dtype, progress=progress)
            except EngineError as e:
                raise BackendError(str(e)) from None
            except (OSError, ValueError, RuntimeError, MemoryError) as e:  # e.g. out of memory on the device
                raise BackendError(f"{model_dir}: {type(e).__name__}: {e}") from None
            self._engine = engine  # the previous model is freed once no request holds it
            return self.info()

    def info(self) -> ModelInfo:
        engine = self._engine
        d = engine.defaults
        return ModelInfo(
            path=str(engine.model_dir),
            name=display_name(engine.model_dir),
            architecture=engine.config.architecture,
            parameters=engine.num_parameters,
            device=str(engine.device),
            dtype=engine.dtype_name,
            context_length=engine.context_length,
            defaults={
                "temperature": d.temperature,
                "top_k": d.top_k,
                "top_p": d.top_p,
                "min_p": d.min_p,
                "repetition_penalty": d.repetition_penalty,
                "max_new_tokens": d.max_new_tokens,
            },
        )

    def stream(self, prompt: Prompt, settings: dict[str, Any], cancel: threading.Event) -> Iterator[str | dict]:
        from engine import EngineError, SamplingParams

        engine = self._engine
        if engine is None:
            raise BackendError("no model is loaded")
        params = SamplingParams(
            temperature=float(settings["temperature"]),
            top_k=int(settings["top_k"]),
            top_p=float(settings["top_p"]),
            min_p=float(settings["min_p"]),
            repetition_penalty=float(settings["repetition_penalty"]),
            seed=settings.get("seed"),
        )
        max_new = int(settings["max_new_tokens"])
        with self._busy:
            try:
                params.validate()
                dropped = 0
                if isinstance(prompt, str):
                    ids = engine.raw_prompt(prompt)
                else:
                    chat = engine.chat_prompt(prompt, max_new)
                    ids, max_new, dropped = chat.token_ids, chat.max_new_tokens, chat.dropped_messages
                if max_new < 1:
                    raise BackendError(f"the prompt fills the model's context window ({engine.context_length} tokens)")
                with engine.generate(ids, params, max_new, cancel=cancel) as generation:
                    yield from generation  # closing early (the app quit) frees the engine at once
            except (EngineError, ValueError) as e:
                raise BackendError(str(e)) from None
            result = generation.result.to_dict()
        result.pop("token_ids", None)
        result["dropped_messages"] = dropped
        yield result
