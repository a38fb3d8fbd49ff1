"""The model picker: the bundled model, recently used ones, config folders, the Hugging Face cache,
or a typed path. Folders are scanned in a thread (config.json only, no weights read)."""

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

from chattui.catalog import ModelEntry, human_bytes, human_count, scan

SOURCE_LABELS = {"bundled": "bundled", "recent": "recent", "config": "config folder", "hf-cache": "HF cache",
                 "adapter": "LoRA adapter", "merged": "merged fine-tune", "tuned": "fine-tuned"}


def entry_prompt(entry: ModelEntry, current: str | None) -> Text:
    text = Text()
    marker = "● " if current and Path(current) == entry.path else "  "
    text.append(marker + entry.name, style="bold")
    text.append(f"  [{SOURCE_LABELS.get(entry.source, entry.source)}]", style="dim")
    if entry.problem:
        text.append(f"  ✗ {entry.problem}", style="red")
    else:
        details = [entry.architecture or "?", f"{human_count(entry.parameters)} params"]
        if entry.dtype:
            details.append(str(entry.dtype))
        details.append(human_bytes(entry.size_bytes))
        text.append("  " + " · ".join(details))
    text.append(f"\n    {entry.path}", style="dim")
    return text


class ModelPickerScreen(ModalScreen[str | None]):
    """Dismissed with the chosen folder (a str), or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    @dataclass
    class Scanned(Message):
        entries: list[ModelEntry]

    def __init__(self, recent: list[str], folders: list[str], hf_cache: Path, current: str | None,
                 bundled: Path | None = None, trained: Callable[[], list[ModelEntry]] | None = None) -> None:
        super().__init__()
        self.recent = recent
        self.folders = folders
        self.hf_cache = hf_cache
        self.current = current
        self.bundled = bundled
        self.trained = trained  # more entries, listed last: chattui.trained.trained_models (adapters, merged)
        self.entries: list[ModelEntry] = []

    def compose(self):
        with Vertical(id="dialog", classes="picker-dialog"):
            yield Label("Choose a model", classes="dialog-title")
            yield Static("Looking for models…", id="picker-status", markup=False)
            yield OptionList(id="model-list")
            yield Input(placeholder="…or type a model folder and press Enter", id="model-path")
            yield Static("", id="picker-error", markup=False)
            yield Label(
                "Enter loads · Esc cancels · a model that fails to load leaves the current one in place",
                classes="hint",
            )
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#picker-error").display = False
        self._scan()

    @work(thread=True, exclusive=True)
    def _scan(self) -> None:
        entries = scan(self.recent, self.folders, self.hf_cache, self.bundled)
        self.post_message(self.Scanned(entries + (self.trained() if self.trained else [])))

    def on_model_picker_screen_scanned(self, message: Scanned) -> None:
        self.entries = message.entries
        options = [
            Option(entry_prompt(e, self.current), id=str(i), disabled=e.problem is not None)
            for i, e in enumerate(self.entries)
        ]
        picker = self.query_one("#model-list", OptionList)
        picker.clear_options()
        picker.add_options(options)
        usable = sum(e.problem is None for e in self.entries)
        self.query_one("#picker-status", Static).update(
            f"{usable} model(s) found (bundled, recent, config folders, Hugging Face cache at {self.hf_cache})"
        )
        if usable:
            current = [i for i, e in enumerate(self.entries) if self.current and Path(self.current) == e.path]
            first = next(i for i, e in enumerate(self.entries) if e.problem is None)
            picker.highlighted = current[0] if current else first
            picker.focus()
        else:
            self.query_one("#model-path", Input).focus()

    @on(OptionList.OptionSelected, "#model-list")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(str(self.entries[int(event.option.id)].path))

    @on(Input.Submitted, "#model-path")
    def _typed(self, event: Input.Submitted) -> None:
        raw = event.value.strip()
        if not raw:
            return
        path = Path(raw).expanduser()
        if not path.is_dir():
            error = self.query_one("#picker-error", Static)
            error.update(f"{path}: not a folder (a model folder holds config.json, *.safetensors, tokenizer.json)")
            error.display = True
            return
        self.dismiss(str(path.resolve()))

    def action_cancel(self) -> None:
        self.dismiss(None)
