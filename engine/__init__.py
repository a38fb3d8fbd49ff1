"""The runtime: checkpoint loading, KV cache, prefill and decode, sampling, streaming.

Never imports Textual; the UI talks to `Engine` with text and plain numbers.
"""

from engine.errors import CheckpointError, EngineError, PromptTooLongError, TemplateError
from engine.sampling import SamplingParams
from engine.session import ChatPrompt, Engine, Generation, GenerationResult

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
