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

from chattui.catalog import model_label

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
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling defaults from generation_config.json
    adapter: str | None = None  # the LoRA adapter folder applied on top (unmerged), if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backend(Protocol):
    def load(self, model_dir: str, device: str, dtype: str, progress: ProgressCallback | None = None,
             adapter: str | None = None) -> ModelInfo:
        """Load a model (plus a LoRA adapter, unmerged) and make it the current one; on failure raise
        BackendError and keep the previous one."""
        ...

    def stream(self, prompt: Prompt, settings: dict[str, Any], cancel: threading.Event,
               on_attention: AttentionCallback | None = None) -> Iterator[str | dict]:
        """Text deltas, then one result dict. Stops soon after `cancel` is set (finish_reason "cancelled").
        settings["adapter_enabled"] = False answers as the base model when an adapter is loaded.
        on_attention, if given, is called from the streaming thread after every forward with the weights
        of the position that chose the next token, (layers, heads, positions so far) float32 numpy, and
        the prompt's token strings."""
        ...

    def attention(self, prompt: Prompt) -> Any:
        """Attention weights of the prompt's tokens (chat messages rendered with the template, the last
        one included; or raw text) as an object with numpy methods, like engine.AttentionMaps: tokens,
        token_ids, truncated, num_layers, num_heads, layer(l), head(l, h), mean_over_heads(l),
        max_over_heads(l), rollout(l), head_summaries(l). Raises BackendError."""
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
        d = engine.defaults
        return ModelInfo(
            path=str(engine.model_dir),
            name=model_label(engine.model_dir, engine.adapter_dir),
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
            adapter=str(engine.adapter_dir) if engine.adapter_dir else None,
        )

    def attention(self, prompt: Prompt) -> Any:
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
        return maps

    def stream(self, prompt: Prompt, settings: dict[str, Any], cancel: threading.Event,
               on_attention: AttentionCallback | None = None) -> Iterator[str | dict]:
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
            use_adapter = engine.adapter_dir is None or settings.get("adapter_enabled") is not False
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
                watch = None
                if on_attention is not None:
                    tokens = engine.tokenizer.token_strings(ids)

                    def watch(rows, sequence, tokens=tokens):
                        tokens += engine.tokenizer.token_strings(sequence[len(tokens):])  # only the new ones
                        on_attention(rows, tokens[: len(sequence)])
                with engine.generate(
                    ids, params, max_new, cancel=cancel, on_attention=watch, use_adapter=use_adapter
                ) as generation:
                    yield from generation  # closing early (the app quit) frees the engine at once
            except (EngineError, ValueError) as e:
                raise BackendError(str(e)) from None
            result = generation.result.to_dict()
        result.pop("token_ids", None)
        result["dropped_messages"] = dropped
        yield result


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
