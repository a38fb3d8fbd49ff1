"""The Textual app: the chat screen, model loading in the background, global bindings, the command
palette and themes.

The window is interactive before the engine (and torch) is imported: the model loads in a thread
worker that posts progress, and a model that fails to load leaves the previous one in place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.theme import Theme
from textual.worker import get_current_worker

from chattui.backend import Backend, BackendError, ModelInfo
from chattui.catalog import Stores, display_name, human_count
from chattui.config import Config
from chattui.context import ScreenContext
from chattui.paths import bundled_model_dir
from chattui.screens.chat import ChatScreen
from chattui.screens.models import ModelPickerScreen
from chattui.store import Store, StoreError
from chattui.terminal_text import displayable
from chattui.trained import adapter_base, trained_models

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.05
MAX_NOTICES = 2  # notifications shown at once; more would stack over the conversation (the oldest go first)


class LoadCancelled(Exception):
    """Raised from the progress callback to abandon a load nobody waits for any more."""


class _ThreadWarnings(logging.Handler):
    """Collects warnings logged by one thread (the engine's, while it loads a model)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


class ChattuiApp(App):
    CSS_PATH = "chattui.tcss"
    TITLE = "chattui"
    BINDINGS = [
        Binding("f1", "toggle_keys", "Keys"),  # the chat screen lists it first
        Binding("ctrl+o", "pick_model", "Model"),
        Binding("ctrl+t", "change_theme", "Theme", show=False),
        Binding("f4", "finetune", "Fine-tune"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    @dataclass
    class ModelLoadProgress(Message):
        path: str
        done: int  # bytes of weights read
        total: int
        note: str | None = None  # a slow step that is not reading weights ("compiling CPU kernels, once")

    @dataclass
    class ModelLoaded(Message):
        info: ModelInfo
        warnings: list[str] = field(default_factory=list)  # what the engine warned about while loading

    @dataclass
    class ModelLoadFailed(Message):
        path: str
        error: str

    def __init__(
        self,
        backend: Backend,
        store: Store,
        config: Config,
        *,
        model_dir: str | Path | None = None,
        adapter: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        notices: Iterable[str] = (),
        export_dir: str | Path | None = None,
        bundled_dir: Path | None = None,
        stores: Stores | None = None,
        jobs_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.store = store
        self.config = config
        self.device = device or config.device
        self.dtype = dtype or config.dtype
        self.initial_model = str(model_dir) if model_dir else None
        self.initial_adapter = str(adapter) if adapter else None  # --adapter: applied to the start-up model
        self.notices = list(notices)
        self.bundled_dir = bundled_dir or bundled_model_dir()
        self.stores = stores or Stores.default()  # where the model picker looks
        self.last_load_error: str | None = None
        self.context = ScreenContext(  # what the screens are given; the app keeps its model state current
            store=store, backend=backend,
            export_dir=Path(export_dir or config.export_dir or Path.cwd()).expanduser(), jobs_dir=jobs_dir,
            load_model=self.load_model, open_new_chat=self.open_new_chat, choose_model=self.choose_model,
        )
        self.chat = ChatScreen(self.context)

    # The app's model state lives in the screens' context.
    model = property(lambda self: self.context.model)
    loading = property(lambda self: self.context.loading)
    last_export = property(lambda self: self.context.last_export)
    export_dir = property(lambda self: self.context.export_dir)
    jobs_dir = property(lambda self: self.context.jobs_dir)

    def notify(self, message: str, **kwargs) -> None:
        """Every notice is shown through displayable: errors can quote what a model or its template wrote."""
        super().notify(displayable(message) if isinstance(message, str) else message, **kwargs)

    # -- start-up --------------------------------------------------------------------------------

    async def on_mount(self) -> None:
        if self.config.theme in self.available_themes:
            self.theme = self.config.theme
        else:
            self.config.error(
                "theme", f"unknown theme {self.config.theme!r} (available: {', '.join(sorted(self.available_themes))})"
            )
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        await self.push_screen(self.chat)
        for notice in self.notices:
            self.notify(notice, title="Conversations", severity="warning", timeout=20, markup=False)
        for error in self.config.errors:
            self.notify(error, title="Config file", severity="warning", timeout=20, markup=False)
        self.chat.status.show_model(None)
        model = self.startup_model()
        if model is not None:
            self.load_model(model, self.initial_adapter or self.conversation_adapter(model))
        else:
            self.notify(
                f"No model loaded: the bundled model is not installed yet ({self.bundled_dir / 'config.json'} is "
                "missing). Press ctrl+o to choose a model folder.",
                title="Choose a model", severity="warning", timeout=30, markup=False,
            )

    def startup_model(self) -> str | None:
        """--model, else the config's default_model, else the most recently used model that is still
        there, else (on a first run) the bundled model if it is installed."""
        if self.initial_model:
            return self.initial_model
        if self.config.default_model:
            return str(Path(self.config.default_model).expanduser())
        recent = next((p for p in self.store.recent_models() if Path(p).exists()), None)
        if recent is not None:
            return recent
        if (self.bundled_dir / "config.json").exists():
            return str(self.bundled_dir)
        return None

    def conversation_adapter(self, model: str) -> str | None:
        """The LoRA adapter the open conversation last used on `model`, if its folder is still there."""
        conversation = self.chat.conversation
        if conversation is None or not conversation.adapter or not conversation.model:
            return None
        same_model = Path(conversation.model).expanduser().resolve() == Path(model).expanduser().resolve()
        return conversation.adapter if same_model and Path(conversation.adapter).is_dir() else None

    def _theme_changed(self, theme: Theme) -> None:
        if theme.name != self.config.theme:
            self.config.save_theme(theme.name)

    # -- models ----------------------------------------------------------------------------------

    def load_model(self, path: str, adapter: str | None = None) -> None:
        """Load a model in the background; replies keep using the current one until it is ready."""
        self.context.loading = path
        self.chat.status.show_loading(display_name(path))
        self._load(path, self.device, self.dtype, adapter)

    @work(thread=True, exclusive=True, group="load")
    def _load(self, path: str, device: str, dtype: str, adapter: str | None = None) -> None:
        worker = get_current_worker()
        last = 0.0

        def progress(done: int, total: int, note: str | None = None) -> None:
            nonlocal last
            if worker.is_cancelled:
                raise LoadCancelled
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL_S or done >= total or note:
                last = now
                self.post_message(self.ModelLoadProgress(path, done, total, note))

        warnings = _ThreadWarnings()
        logging.getLogger().addHandler(warnings)
        try:
            info = self.backend.load(path, device, dtype, progress, adapter=adapter)
        except LoadCancelled:
            return
        except BackendError as e:
            self.post_message(self.ModelLoadFailed(path, str(e)))
        except Exception as e:  # an engine bug must not take the UI down
            log.exception("loading %s failed", path)
            self.post_message(self.ModelLoadFailed(path, f"{type(e).__name__}: {e}"))
        else:
            self.post_message(self.ModelLoaded(info, warnings.messages))
        finally:
            logging.getLogger().removeHandler(warnings)

    def on_chattui_app_model_load_progress(self, message: ModelLoadProgress) -> None:
        if message.path == self.loading:
            self.chat.status.show_loading(display_name(message.path), message.done, message.total, message.note)

    async def on_chattui_app_model_loaded(self, message: ModelLoaded) -> None:
        info = message.info
        self.context.model = info
        if self.loading is not None and Path(self.loading).expanduser().resolve() == Path(info.path).resolve():
            self.context.loading = None
            self.chat.status.show_loading(None)
        try:
            self.store.touch_model(info.path)
        except StoreError as e:  # only the recent-models list: the model is loaded all the same
            log.warning("%s", e)
        self.notify(
            f"{info.name}: {human_count(info.parameters)} parameters, {info.device}/{info.dtype}, "
            f"context {info.context_length}",
            title="Model loaded", markup=False,
        )
        for warning in message.warnings:
            self.notify(warning, title="Model", severity="warning", timeout=15, markup=False)
        await self.chat.model_changed(info)

    def on_chattui_app_model_load_failed(self, message: ModelLoadFailed) -> None:
        if message.path == self.loading:
            self.context.loading = None
            self.chat.status.show_loading(None)
        self.last_load_error = message.error
        still = (
            f"Still using {self.model.name}." if self.model
            else "No model is loaded: press ctrl+o to choose one."
        )
        self.notify(f"{message.error}\n{still}", title=f"Could not load {message.path}", severity="error",
                    timeout=30, markup=False)

    def action_pick_model(self) -> None:
        if isinstance(self.screen, ModelPickerScreen):
            return

        def chosen(path: str | None) -> None:
            if path:
                base = adapter_base(path)  # a LoRA adapter folder: its base model with it, unmerged
                if base:
                    self.load_model(base, adapter=path)
                else:
                    self.load_model(path)

        current = (self.model.adapter or self.model.path) if self.model else None
        self.choose_model(current, chosen, trained=True)

    def choose_model(self, current: str | None, chosen: Callable[[str | None], None], *, trained: bool = False
                     ) -> None:
        """The model picker (bundled, recent, config folders, the stores; with `trained`, the fine-tuned models
        too), calling `chosen` with the path picked or None."""
        self.push_screen(
            ModelPickerScreen(
                recent=self.store.recent_models(),
                folders=self.config.model_folders,
                stores=self.stores,
                current=current,
                bundled=self.bundled_dir,
                trained=partial(trained_models, self.jobs_dir) if trained else None,
            ),
            chosen,
        )

    async def open_new_chat(self) -> None:
        """Back to the chat screen (closing the screens above it), in a new conversation."""
        while self.screen is not self.chat and len(self.screen_stack) > 1:
            self.pop_screen()
        await self.chat.action_new_chat()

    def action_finetune(self) -> None:
        from chattui.screens.finetune import FinetuneScreen

        if not isinstance(self.screen, FinetuneScreen):
            self.push_screen(FinetuneScreen(self.context))

    def action_toggle_keys(self) -> None:
        """f1: every key of the screen and what it does, in a side panel (the footer shows what fits)."""
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def _on_notify(self, event) -> None:
        super()._on_notify(event)
        for old in list(self._notifications)[:-MAX_NOTICES]:
            self._unnotify(old, refresh=False)
        self._refresh_notifications()

    # -- quitting, the command palette -----------------------------------------------------------

    async def action_quit(self) -> None:
        """Quit; a reply in progress is stopped and saved first."""
        await self.chat.stop_reply()
        self.exit()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if screen is not self.chat:
            return
        yield SystemCommand("Fine-tune", "Fine-tune a model on a JSONL file; watch, cancel and resume jobs (f4)",
                            self.action_finetune)
        chat = self.chat
        commands = [
            ("New chat", "Start a new conversation (ctrl+n)", chat.action_new_chat),
            ("Stop reply", "Stop the reply being written; its text is kept, marked stopped (Esc)", chat.action_stop),
            ("Regenerate reply", "Write the last reply again (ctrl+r)", chat.action_regenerate),
            ("Edit last message", "Edit your last message and resend it; later messages are removed",
             chat.action_edit_last),
            ("Copy last reply", "Copy the last reply to the clipboard (focus a message and press c for others)",
             chat.action_copy_last),
            ("Export as Markdown", "Write this conversation to a .md file", partial(chat.action_export, "markdown")),
            ("Export as JSON", "Write this conversation, with stats and settings, to a .json file",
             partial(chat.action_export, "json")),
            ("Conversation settings", "System prompt, temperature, top-p, top-k, min-p, repetition penalty, "
             "max new tokens, seed, mode (ctrl+s)", chat.action_settings),
            ("Switch chat / raw generate mode", "Raw mode continues your text without the chat template (ctrl+g)",
             chat.action_toggle_mode),
            ("Choose model", "Load another model: bundled, recent, pulled, config folders, HF cache, Ollama, "
             "LM Studio, llama.cpp cache, or a path; or pull smollm2-135m-instruct (ctrl+o)",
             self.action_pick_model),
            ("Toggle sidebar", "Show or hide the conversation list (ctrl+b)", chat.action_toggle_sidebar),
            ("Attention", "What every layer and head attends to, up to the focused message or the last one: "
             "heatmap, text, head overview, live (f2)", chat.action_attention),
            ("Live attention on/off", "Record what each new token of the next replies attends to, for the "
             "attention screen's live view (f3)", chat.action_toggle_live_attention),
            ("Rename conversation", "Give this conversation a title", chat.action_rename),
            ("Delete conversation", "Delete this conversation and its messages", chat.action_delete),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)


def run_app(model: str | None = None, device: str | None = None, dtype: str | None = None,
            adapter: str | None = None) -> int:
    """`chattui [--model DIR] [--adapter DIR] [--device D] [--dtype D]`: open the app (a LoRA adapter on the model,
    unmerged). Logging goes to a file, not the screen."""
    from chattui.backend import EngineBackend
    from chattui.config import default_path, load_config
    from chattui.paths import config_dir, data_dir
    from chattui.store import open_store

    config = load_config(default_path(config_dir()))
    store, notice = open_store(data_dir())
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    try:
        log_path = data_dir() / "chattui.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_path, encoding="utf-8")
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root.handlers = [handler]
    try:
        app = ChattuiApp(
            EngineBackend(), store, config, model_dir=model, adapter=adapter, device=device, dtype=dtype,
            notices=[notice] if notice else [],
        )
        app.run()
    finally:
        root.handlers = saved_handlers
        handler.close()
        store.close()
    return app.return_code or 0
