"""Compare base and tuned: the same prompt and seed on the base model and on base + adapter, side by side.

One engine is in memory: base + adapter (unmerged), with the adapter switched off for the base reply. The
screen waits on the UI thread for that model to load (a timer asks the context), then hands a thread worker
everything it needs (backend, prompt, settings, cancel event); the worker reads no app state. Each reply
streams into its pane's Markdown (Markdown.get_stream: each chunk re-parses only the last block) and is
rendered once in full when both have ended.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import Button, Footer, Input, Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from chattui.backend import Backend, BackendError
from chattui.catalog import display_name, model_label
from chattui.context import ScreenContext
from engine.params import GenerationSettings

LOAD_CHECK_S = 0.05  # how often the screen looks whether the model it asked for has loaded
PANES = (("base", False), ("tuned", True))  # (pane, with the adapter)


class CompareScreen(ModalScreen[None]):
    """A prompt and a seed, and the base and tuned replies to them in two panes."""

    BINDINGS = [Binding("escape", "close", "Close")]

    @dataclass
    class Chunk(Message):
        pane: str  # "base" or "tuned"
        text: str

    @dataclass
    class Done(Message):
        error: str | None = None

    def __init__(self, context: ScreenContext, model: str, adapter: str) -> None:
        super().__init__()
        self.context = context
        self.model = model
        self.adapter = adapter
        self.texts = {pane: "" for pane, _ in PANES}
        self.streams: dict[str, MarkdownStream] = {}  # pane -> the stream its reply is written into
        self.running = False
        self.cancel = threading.Event()
        self._load_check: Timer | None = None  # while waiting for the model to load

    def compose(self):
        with Vertical(id="dialog", classes="compare-dialog"):
            yield Label(f"Compare: {display_name(self.model)} vs {model_label(self.model, self.adapter)}",
                        classes="dialog-title")
            with Horizontal(classes="ft-row"):
                yield Input(placeholder="A prompt for both models, Enter runs", id="cmp-prompt")
                yield Input("0", id="cmp-seed", classes="ft-number")
                yield Button("Run", id="cmp-run", variant="primary")
            yield Static("", id="cmp-status", markup=False)
            with Horizontal(id="cmp-panes"):
                with VerticalScroll(classes="cmp-pane"):
                    yield Label("Base", classes="ft-label")
                    yield Markdown(id="cmp-base")  # rendered as the chat renders replies
                with VerticalScroll(classes="cmp-pane"):
                    yield Label("Tuned (base + adapter)", classes="ft-label")
                    yield Markdown(id="cmp-tuned")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#cmp-prompt", Input).focus()

    def _loaded(self) -> bool:
        return self.context.is_loaded(self.model, self.adapter)

    @on(Button.Pressed, "#cmp-run")
    @on(Input.Submitted)
    def action_run(self) -> None:
        prompt = self.query_one("#cmp-prompt", Input).value.strip()
        status = self.query_one("#cmp-status", Static)
        try:
            seed = int(self.query_one("#cmp-seed", Input).value)
        except ValueError:
            status.update("The seed must be a whole number")
            return
        if not prompt or self.running:
            return
        self.texts = {pane: "" for pane, _ in PANES}
        for pane in self.texts:
            self.query_one(f"#cmp-{pane}", Markdown).update("")
        self.streams = {}
        self.running = True
        if self._loaded():
            self._start(prompt, seed)
            return
        status.update("Loading the base model with the adapter…")
        self.context.load_model(self.model, adapter=self.adapter)
        self._load_check = self.set_interval(LOAD_CHECK_S, lambda: self._start_once_loaded(prompt, seed))

    def _start_once_loaded(self, prompt: str, seed: int) -> None:
        """On the timer while the model loads: start when it is there; give up when its load has ended without it."""
        if self._loaded():
            self._load_check.stop()
            self._start(prompt, seed)
        elif self.context.loading is None:  # the app clears it when a load fails too
            self._load_check.stop()
            self.post_message(self.Done("the model with the adapter did not load (see the notifications)"))

    def _start(self, prompt: str, seed: int) -> None:
        self.query_one("#cmp-status", Static).update(f"Generating with seed {seed}…")
        settings = self.context.model.defaults.updated({"seed": seed})
        self._generate(self.context.backend, prompt, settings, self.cancel)

    @work(thread=True, exclusive=True, group="compare")
    def _generate(self, backend: Backend, prompt: str, settings: GenerationSettings, cancel: threading.Event) -> None:
        """Runs in a thread: the base reply, then the tuned one, posted chunk by chunk."""
        messages = [{"role": "user", "content": prompt}]
        try:
            for pane, use_adapter in PANES:
                for text in backend.stream(messages, settings, cancel, use_adapter=use_adapter):
                    self.post_message(self.Chunk(pane, text))
        except BackendError as e:
            self.post_message(self.Done(str(e)))
            return
        self.post_message(self.Done())

    async def on_compare_screen_chunk(self, message: Chunk) -> None:
        self.texts[message.pane] += message.text
        if message.pane not in self.streams:
            self.streams[message.pane] = Markdown.get_stream(self.query_one(f"#cmp-{message.pane}", Markdown))
        await self.streams[message.pane].write(message.text)

    async def on_compare_screen_done(self, message: Done) -> None:
        for pane, stream in self.streams.items():  # then each reply rendered once in full
            await stream.stop()
            await self.query_one(f"#cmp-{pane}", Markdown).update(self.texts[pane])
        self.streams = {}
        self.running = False
        self.query_one("#cmp-status", Static).update(
            f"Error: {message.error}" if message.error else "Same prompt and seed; only the adapter differs."
        )

    def action_close(self) -> None:
        self.cancel.set()
        self.dismiss(None)
