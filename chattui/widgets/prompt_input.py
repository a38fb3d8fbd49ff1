"""The multi-line message box: Enter sends, Ctrl+J (or Shift/Alt+Enter where the terminal reports
them) starts a new line."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")


class PromptInput(TextArea):
    BINDINGS = [
        # Not in the footer (the placeholder says them): it leaves the room to the screen's keys at 80 columns.
        Binding("enter", "submit", "Send", show=False),
        Binding("ctrl+j", "newline", "New line", show=False),
    ]

    @dataclass
    class Submitted(Message):
        input: PromptInput
        text: str

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        # TextArea inserts a newline for Enter itself, before any binding is looked at.
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.action_submit()
        elif event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.action_newline()
        else:
            await super()._on_key(event)

    def action_submit(self) -> None:
        self.post_message(self.Submitted(self, self.text))

    def action_newline(self) -> None:
        self.insert("\n")
