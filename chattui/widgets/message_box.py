"""One message of a conversation: a header, the text (Markdown for replies) and a line of stats.

A reply is streamed with `start_stream()` / `write()` (Markdown's stream API, which batches
appends the widget cannot keep up with) and finished with `finish()`, which stops the stream and
renders the full text once. Message text is untrusted (a model wrote it): it is shown through
`displayable`, so escape sequences appear as marks (␛) and never reach the terminal; `text` keeps it exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from chattui.store import Message as StoredMessage
from chattui.terminal_text import displayable

FINISH_NOTES = {
    "eos": "",
    "stop": "stop string",
    "length": "max new tokens reached",
    "cancelled": "■ stopped",
    "error": "⚠ error",
    "streaming": "writing…",
    "interrupted": "⚠ interrupted: chattui ended while writing it",
}
WARNING_FINISHES = ("cancelled", "error", "interrupted")


def reply_meta(msg: StoredMessage) -> str:
    """The stats line under a reply: tokens, speed, time to first token, why it ended."""
    parts = []
    if msg.generated_tokens is not None:
        parts.append(f"{msg.generated_tokens} tokens")
    speed = msg.stats.get("decode_tokens_per_s")
    if speed:
        parts.append(f"{speed:.1f} tok/s")
    ttft = msg.stats.get("ttft_s")
    if ttft:
        parts.append(f"TTFT {ttft:.2f} s")
    if msg.stats.get("seed") is not None:
        parts.append(f"seed {msg.stats['seed']}")
    if msg.stats.get("dropped_messages"):
        parts.append(f"{msg.stats['dropped_messages']} oldest message(s) left out of the prompt")
    note = FINISH_NOTES.get(msg.finish_reason or "", msg.finish_reason or "")
    if msg.stats.get("error"):
        note = f"⚠ {msg.stats['error']}"
    if note:
        parts.append(note)
    return " · ".join(parts)


class MessageBox(Vertical, can_focus=True):
    """Focus a message (Tab or click) to copy it (c) or, for your own messages, edit and resend it (e)."""

    BINDINGS = [
        Binding("c", "copy", "Copy"),
        Binding("e", "edit", "Edit & resend"),
    ]

    @dataclass
    class EditRequested(Message):
        box: MessageBox

    def __init__(self, role: str, text: str = "", *, header: str = "", meta: str = "",
                 record: StoredMessage | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = text
        self.record = record  # the stored message (None while a reply is streaming)
        self._header = header
        self._meta = meta
        self._stream: MarkdownStream | None = None

    def compose(self):
        yield Label(displayable(self._header), classes="message-header", markup=False)
        if self.role == "assistant":
            yield Markdown(displayable(self.text), classes="message-body")
        else:
            yield Static(displayable(self.text), markup=False, classes="message-body")
        yield Label(displayable(self._meta), classes="message-meta", markup=False)

    @property
    def meta(self) -> str:
        return self._meta

    def set_meta(self, text: str, *, warning: bool = False) -> None:
        self._meta = text
        label = self.query_one(".message-meta", Label)
        label.update(displayable(text))
        label.set_class(warning, "warning")
        label.display = bool(text)

    def on_mount(self) -> None:
        self.query_one(".message-meta", Label).display = bool(self._meta)
        if self.record and self.record.finish_reason in WARNING_FINISHES:
            self.query_one(".message-meta", Label).add_class("warning")

    # -- streaming -------------------------------------------------------------------------------

    def start_stream(self) -> None:
        self._stream = Markdown.get_stream(self.query_one(Markdown))

    async def write(self, fragment: str) -> None:
        self.text += fragment
        if self._stream is not None:
            await self._stream.write(displayable(fragment))

    async def finish(self, text: str, record: StoredMessage | None, meta: str, *, warning: bool = False) -> None:
        """End the stream and render the whole text once."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.text = text
        await self.query_one(Markdown).update(displayable(text))
        self.set_meta(meta, warning=warning)
        self.record = record

    # -- actions ---------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "edit":
            return self.role == "user" and self.record is not None
        return True

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.text)
        self.notify(f"Copied {len(self.text)} characters to the clipboard")

    def action_edit(self) -> None:
        self.post_message(self.EditRequested(self))
