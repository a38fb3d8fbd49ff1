"""The per-conversation settings dialog: mode, system prompt and sampling settings.

Empty sampling fields mean "the model's default" (shown as the placeholder); a bad value keeps the
dialog open with a message saying what is allowed.
"""

from __future__ import annotations

from typing import Any

from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Select, Static, TextArea

from chattui.settings import FIELDS, format_value, parse_overrides


class SettingsScreen(ModalScreen[dict | None]):
    """Dismissed with {"mode": str, "settings": {...}} on save, None on cancel."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, settings: dict[str, Any], mode: str, defaults: dict[str, Any], context_length: int | None,
                 context_used: int = 0):
        super().__init__()
        self.context_used = context_used  # tokens the conversation takes now: bounds max new tokens
        self.settings = settings
        self.mode = mode
        self.defaults = defaults
        self.context_length = context_length
        self.errors: dict[str, str] = {}  # field key -> message, from the last save attempt

    def compose(self):
        with VerticalScroll(id="dialog", classes="settings-dialog"):
            yield Label("Conversation settings · empty fields use the model's generation_config.json",
                        classes="dialog-title")
            yield Static("", id="settings-error", markup=False)
            with Grid(id="settings-grid"):
                yield Label("Mode")
                yield Select(
                    [("Chat (the model's chat template)", "chat"), ("Generate (raw completion, no template)", "generate")],
                    value=self.mode, allow_blank=False, id="mode", compact=True,
                )
                for field in FIELDS:
                    yield Label(field.label)
                    default = self.defaults.get(field.key)
                    placeholder = "random" if field.key == "seed" else f"model default: {format_value(default)}"
                    yield Input(
                        value=format_value(self.settings.get(field.key)), placeholder=placeholder, id=field.key,
                        tooltip=field.allowed, compact=True,
                    )
            yield Label("System prompt (chat mode)")
            yield TextArea(self.settings.get("system_prompt", ""), id="system_prompt", soft_wrap=True, compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="save", compact=True)
                yield Button("Use model defaults", id="reset", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#settings-error").display = False
        self.query_one("#mode", Select).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        elif event.button.id == "reset":
            for field in FIELDS:
                self.query_one(f"#{field.key}", Input).value = ""
        else:
            self.action_cancel()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_save()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_save(self) -> None:
        texts = {field.key: self.query_one(f"#{field.key}", Input).value for field in FIELDS}
        overrides, self.errors = parse_overrides(texts, self.context_length, self.context_used)
        for field in FIELDS:
            self.query_one(f"#{field.key}", Input).set_class(field.key in self.errors, "-invalid")
        error = self.query_one("#settings-error", Static)
        if self.errors:
            error.update("\n".join(self.errors.values()))
            error.display = True
            self.query_one("#dialog").scroll_home(animate=False)
            return
        system = self.query_one("#system_prompt", TextArea).text
        settings = dict(overrides)
        if system.strip():
            settings["system_prompt"] = system
        self.dismiss({"mode": self.query_one("#mode", Select).value, "settings": settings})
