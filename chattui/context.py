"""What the app hands its screens: the store, the backend, where files go, the model state and the three
things a screen may ask of the app (load a model, open a new chat, pick a model's path). Screens take it in
their constructor instead of reaching into `self.app`, so a screen can be built and tested with any context.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from chattui.backend import Backend, ModelInfo
from chattui.store import Store


def _no_model_loading(path: str, adapter: str | None = None) -> None:
    raise RuntimeError("this context cannot load models")


async def _no_chat() -> None:
    raise RuntimeError("this context has no chat screen")


def _no_model_picker(current: str | None, chosen: Callable[[str | None], None]) -> None:
    raise RuntimeError("this context has no model picker")


@dataclass
class ScreenContext:
    store: Store
    backend: Backend
    export_dir: Path  # where exports (conversations, attention maps) are written
    jobs_dir: Path | None = None  # where fine-tune jobs are created; None = chattui.jobs.jobs_root()
    model: ModelInfo | None = None  # the model replies come from; kept current by the app
    loading: str | None = None  # the model being loaded, if any; kept current by the app
    last_export: Path | None = None  # the file the last export wrote
    # Load a model (with a LoRA adapter, unmerged) in the background; replies keep the current one meanwhile.
    load_model: Callable[..., None] = field(default=_no_model_loading)
    # Back to the chat screen, in a new conversation.
    open_new_chat: Callable[[], Awaitable[None]] = field(default=_no_chat)
    # Open the model picker at `current`; it calls `chosen` with the path picked (None: closed without one).
    choose_model: Callable[[str | None, Callable[[str | None], None]], None] = field(default=_no_model_picker)

    def is_loaded(self, model: str, adapter: str | None) -> bool:
        """Whether `model` with `adapter` (None: no adapter) is the model replies come from now."""
        info = self.model
        if info is None:
            return False
        same_model = Path(info.path).expanduser().resolve() == Path(model).expanduser().resolve()
        if adapter is None:
            return same_model and info.adapter is None
        return same_model and info.adapter is not None and (
            Path(info.adapter).expanduser().resolve() == Path(adapter).expanduser().resolve()
        )
