"""The runtime: checkpoint loading, KV cache, prefill and decode, sampling, streaming.

Never imports Textual; the UI talks to `Engine` with text and plain numbers. Names are imported on
first use, so the UI can import the plain definitions (`engine.params`, `engine.job_files`,
`engine.presets`) without paying for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "ChatPrompt": "engine.session",
    "CheckpointError": "engine.errors",
    "Engine": "engine.session",
    "EngineError": "engine.errors",
    "Generation": "engine.params",
    "GenerationResult": "engine.params",
    "GenerationSettings": "engine.params",
    "PromptTooLongError": "engine.errors",
    "RenderCancelled": "engine.errors",
    "SamplingParams": "engine.params",
    "TemplateError": "engine.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from engine.errors import CheckpointError, EngineError, PromptTooLongError, RenderCancelled, TemplateError
    from engine.params import Generation, GenerationResult, GenerationSettings, SamplingParams
    from engine.session import ChatPrompt, Engine


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
