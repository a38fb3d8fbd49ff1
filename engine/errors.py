"""Errors the engine raises for bad input; each message is one line that names the problem."""


class EngineError(Exception):
    """Base class: the CLI and UI show str(error) as is, without a traceback."""


class CheckpointError(EngineError):
    """A model folder that cannot be loaded: missing file, bad JSON, wrong keys or shapes, corrupt data."""


class TemplateError(EngineError):
    """A chat template that fails to render, raises on purpose, or tries to leave the sandbox."""


class RenderCancelled(EngineError):
    """The request was cancelled while its chat template was still rendering."""


class PromptTooLongError(EngineError):
    """A prompt that cannot fit in the model's context window."""


class NonFiniteLogitsError(EngineError):
    """The model's next-token scores hold NaN or infinity: broken weights or adapter, or a numeric overflow."""


class TrainingDiverged(EngineError):
    """The training loss or gradients became NaN or infinite."""


class ExportError(EngineError):
    """A model that cannot be written in the format asked for: its architecture, weights or tokenizer."""
