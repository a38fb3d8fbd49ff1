"""A small modal that edits one piece of text: a past message (then resent) or a conversation title."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, TextArea


class TextDialog(ModalScreen[str | None]):
    """Dismissed with the new text, or None on cancel. ctrl+s (or the button) confirms."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "confirm", "Confirm"),
    ]

    def __init__(self, title: str, text: str, confirm_label: str, *, multiline: bool = True) -> None:
        super().__init__()
        self.title_text = title
        self.text = text
        self.confirm_label = confirm_label
        self.multiline = multiline

    def compose(self):
        with Vertical(id="dialog", classes="text-dialog"):
            yield Label(self.title_text, classes="dialog-title", markup=False)
            if self.multiline:
                yield TextArea(self.text, id="dialog-text", soft_wrap=True)
            else:
                yield Input(self.text, id="dialog-text")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.confirm_label} (ctrl+s)", variant="primary", id="confirm", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#dialog-text").focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "confirm":
            self.action_confirm()
        else:
            self.action_cancel()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_confirm()

    def action_confirm(self) -> None:
        widget = self.query_one("#dialog-text")
        text = widget.text if isinstance(widget, TextArea) else widget.value
        self.dismiss(text)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmDialog(ModalScreen[bool]):
    """A yes/no question; dismissed with True to go ahead."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, confirm_label: str) -> None:
        super().__init__()
        self.question = question
        self.confirm_label = confirm_label

    def compose(self):
        with Vertical(id="dialog", classes="confirm-dialog"):
            yield Label(self.question, classes="dialog-title", markup=False)
            with Horizontal(classes="buttons"):
                yield Button(self.confirm_label, variant="error", id="confirm", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#cancel").focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm")

    def action_cancel(self) -> None:
        self.dismiss(False)
