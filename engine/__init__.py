"""The runtime: checkpoint loading, KV cache, prefill and decode, sampling, streaming.

Never imports Textual; the UI talks to `Engine` with text and plain numbers. The names below are
imported on first use, so torch-free modules such as `engine.gguf.header` stay cheap to import.
"""

import importlib

from engine.errors import CheckpointError, EngineError, PromptTooLongError, TemplateError

_LAZY = {
    "SamplingParams": "engine.sampling",
    "ChatPrompt": "engine.session",
    "Engine": "engine.session",
    "Generation": "engine.session",
    "GenerationResult": "engine.session",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = [
    "ChatPrompt",
    "CheckpointError",
    "Engine",
    "EngineError",
    "Generation",
    "GenerationResult",
    "PromptTooLongError",
    "SamplingParams",
    "TemplateError",
]
