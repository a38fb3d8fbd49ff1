"""The messages of the open conversation and the reply being written into it.

ChatView mounts the conversation's messages (the last MOUNT_LIMIT; earlier ones behind a "show earlier"
button) and owns a reply from start to end: a thread worker iterates the backend's Reply and posts the text
in paced chunks (never touching a widget); the view streams them into the reply's Markdown, saves the text so
far to the store every SAVE_INTERVAL_S and, when the reply ends, renders it once more in full, commits it and
posts `ReplyFinished` (or `ReplyFailed`) for the screen to react to.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from textual import on, work
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Button, Static
from textual.worker import get_current_worker

from chattui.backend import Backend, BackendError, ModelInfo, Prompt, ReplyResult
from chattui.catalog import model_label
from chattui.context import ScreenContext
from chattui.notices import store_errors_as_notices
from chattui.store import Message as StoredMessage
from chattui.widgets.message_box import MessageBox, reply_meta
from engine.params import GenerationSettings

if TYPE_CHECKING:
    from chattui.screens.attention import LiveAttention

log = logging.getLogger(__name__)

MOUNT_LIMIT = 12  # messages on screen; earlier ones wait behind a button (every widget adds to each re-layout)

# The worker posts text at most every `chunk_interval` seconds (tokens in between are joined). Each
# update re-lays out and repaints the screen, and while the UI thread works it holds the GIL the
# engine needs between tensor ops; so the interval adapts to keep the UI's share of a core near
# UI_BUSY_TARGET: 20 updates a second on a light screen, fewer on a long conversation or slow machine.
SAVE_INTERVAL_S = 1.0  # a streaming reply's text is written to the store at least this often (crash safety)
MIN_CHUNK_INTERVAL_S = 1 / 20
MAX_CHUNK_INTERVAL_S = 1 / 4
UI_BUSY_TARGET = 0.05
STAT_KEYS = ("ttft_s", "decode_tokens_per_s", "prefill_tokens_per_s", "seed", "reused_prompt_tokens",
             "dropped_messages")  # the ReplyResult fields a stored reply keeps in its stats
EMPTY_HINT = (
    "Type a message and press Enter to send it (ctrl+j adds a new line; ctrl+l comes back here).\n"
    "ctrl+o chooses a model · ctrl+s sets the system prompt and sampling · ctrl+g switches to raw "
    "generate mode · ctrl+p lists every command."
)


@dataclass
class ActiveReply:
    id: int
    record_id: int  # the stored message, saved as it streams (finish_reason "streaming")
    conversation_id: int
    box: MessageBox
    cancel: threading.Event  # set to stop the engine between two tokens
    settings: GenerationSettings  # what it is generated with
    model: str  # folder of the model writing it
    adapter: str | None  # the LoRA adapter on top of it, if any
    mode: str  # "chat" or "generate"
    started_at: float
    chunks: list[str] = field(default_factory=list)  # the text so far, as received
    stopping: bool = False
    last_chunk_at: tuple[float, float] | None = None  # (wall clock, UI thread CPU time) at the last chunk
    saved_at: float = 0.0  # time.monotonic() of the last save of the text so far


class ChatView(VerticalScroll):
    """The conversation's messages and its reply in progress (`reply`); `messages` are all the conversation's
    stored messages, shown or not."""

    @dataclass
    class ReplyFinished(Message):
        """A reply ended (finish_reason eos, stop, length or cancelled) and is committed to the store."""

        record: StoredMessage | None  # the stored reply; None when it was stopped before its first token
        result: ReplyResult | None  # the engine's account; None when the reply was ended before the engine was

    @dataclass
    class ReplyFailed(Message):
        """A reply failed; the text it had so far is committed (finish_reason "error")."""

        record: StoredMessage | None  # None when it failed before its first token
        error: str  # one line for the user

    @dataclass
    class Chunk(Message, bubble=False):  # from the worker to the view: text of the reply reply_id
        reply_id: int
        text: str

    @dataclass
    class StreamEnded(Message, bubble=False):  # from the worker to the view: the reply reply_id ended
        reply_id: int
        result: ReplyResult | None
        error: str | None = None

    def __init__(self, context: ScreenContext, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.context = context
        self.conversation_id: int | None = None  # the conversation shown; None: a new one, not stored yet
        self.messages: list[StoredMessage] = []
        self.mode = "chat"  # the conversation's mode: headers say which messages belong to the other one
        self.reply: ActiveReply | None = None
        self.chunk_interval = 1 / 15  # read by the reply worker; adapted by _pace()
        self.live_attention: LiveAttention | None = None  # set: replies record what each new token attended to
        self._reply_ids = itertools.count(1)

    # -- the messages ----------------------------------------------------------------------------

    def boxes(self) -> list[MessageBox]:
        return list(self.query(MessageBox))

    async def show(self, conversation_id: int | None, messages: list[StoredMessage], mode: str) -> None:
        """Show a conversation's messages (the last MOUNT_LIMIT), or the hint of an empty one."""
        self.conversation_id, self.messages, self.mode = conversation_id, list(messages), mode
        await self.remove_children()
        if self.messages:
            await self.mount_all([self._box_for(m) for m in self.messages[-MOUNT_LIMIT:]])
            await self._update_earlier_button()
        else:
            await self.mount(Static(EMPTY_HINT, id="empty-hint", markup=False))
        self.scroll_end(animate=False)
        self.anchor()

    async def add(self, msg: StoredMessage) -> None:
        """Show a message just stored (one of yours)."""
        self.messages.append(msg)
        await self._mount_box(self._box_for(msg))

    async def remove_last(self) -> None:
        """Take the last message off the view (its record is deleted: a reply to write again)."""
        last = self.messages.pop()
        boxes = self.boxes()
        if boxes and boxes[-1].record is not None and boxes[-1].record.id == last.id:
            await boxes[-1].remove()

    def header(self, role: str, mode: str, model: str | None = None, adapter: str | None = None) -> str:
        """"You" / the model (+ adapter) in chat mode, "Prompt" / "Completion" in raw mode; a message of the
        other mode than the conversation's says that it is not part of this mode's prompts."""
        if mode == "generate":
            header = "Prompt" if role == "user" else "Completion"
        else:
            header = "You" if role == "user" else (model_label(model, adapter) if model else "Assistant")
        if mode != self.mode:
            header += " · raw mode, not in chat prompts" if mode == "generate" else " · chat, not in raw prompts"
        return header

    def _box_for(self, msg: StoredMessage) -> MessageBox:
        meta = reply_meta(msg) if msg.role == "assistant" else ""
        return MessageBox(msg.role, msg.content, header=self.header(msg.role, msg.mode, msg.model, msg.adapter),
                          meta=meta, record=msg)

    async def _mount_box(self, box: MessageBox) -> None:
        for hint in self.query("#empty-hint"):
            await hint.remove()
        await self.mount(box)
        boxes = self.boxes()
        if len(boxes) > MOUNT_LIMIT + 4:
            await self.remove_children(boxes[: len(boxes) - MOUNT_LIMIT])
            await self._update_earlier_button()
        self.scroll_end(animate=False)
        self.anchor()

    def _hidden_count(self) -> int:
        """How many messages of the conversation are not mounted (the earliest ones)."""
        boxes = self.boxes()
        if not boxes or boxes[0].record is None:
            return 0
        first_id = boxes[0].record.id
        return next((i for i, m in enumerate(self.messages) if m.id == first_id), 0)

    async def _update_earlier_button(self) -> None:
        hidden = self._hidden_count()
        buttons = self.query("#earlier")
        if not hidden:
            await buttons.remove()
            return
        label = f"↑ show {min(hidden, MOUNT_LIMIT)} earlier message(s) ({hidden} not shown)"
        if buttons:
            buttons.first(Button).label = label
        else:
            await self.mount(Button(label, id="earlier", compact=True), before=0)

    @on(Button.Pressed, "#earlier")
    async def show_earlier(self) -> None:
        hidden = self._hidden_count()
        if not hidden:
            return
        earlier = self.messages[max(0, hidden - MOUNT_LIMIT): hidden]
        await self.mount_all([self._box_for(m) for m in earlier], before=self.boxes()[0])
        await self._update_earlier_button()

    # -- a reply ---------------------------------------------------------------------------------

    async def start_reply(self, conversation_id: int, prompt: Prompt, settings: GenerationSettings,
                          model: ModelInfo) -> None:
        """Write a reply to `prompt` with `model` (the one loaded now) into the conversation; stored from its
        start, so that a crash keeps the text so far. Raises StoreError."""
        box = MessageBox("assistant", header=self.header("assistant", self.mode, model.path, model.adapter), meta="…")
        await self._mount_box(box)
        box.start_stream()
        started = time.time()
        record = self.context.store.add_message(
            conversation_id, "assistant", "", created_at=started, finish_reason="streaming",
            settings=settings.to_dict(), model=model.path, adapter=model.adapter, mode=self.mode,
        )
        reply = ActiveReply(
            id=next(self._reply_ids), record_id=record.id, conversation_id=conversation_id, box=box,
            cancel=threading.Event(), settings=settings, model=model.path, adapter=model.adapter, mode=self.mode,
            started_at=started, saved_at=time.monotonic(),
        )
        self.reply = reply
        # Start once the new box and footer are on screen, so that work does not compete with decoding.
        self.call_after_refresh(self._generate, self.context.backend, reply.id, prompt, settings, reply.cancel)

    @work(thread=True, exclusive=True, group="reply")
    def _generate(self, backend: Backend, reply_id: int, prompt: Prompt, settings: GenerationSettings,
                  cancel: threading.Event) -> None:
        """Runs in a thread: iterate the backend, post text at most every `chunk_interval` seconds."""
        worker = get_current_worker()
        pending: list[str] = []
        last_post = 0.0
        live = self.live_attention
        try:
            reply = backend.stream(prompt, settings, cancel, on_attention=live.start(reply_id) if live else None)
            for delta in reply:
                if worker.is_cancelled:
                    cancel.set()
                pending.append(delta)
                now = time.monotonic()
                if now - last_post >= self.chunk_interval:
                    self.post_message(self.Chunk(reply_id, "".join(pending)))
                    pending.clear()
                    last_post = now
            if pending:
                self.post_message(self.Chunk(reply_id, "".join(pending)))
            self.post_message(self.StreamEnded(reply_id, reply.result))
        except BackendError as e:
            self.post_message(self.StreamEnded(reply_id, None, str(e)))
        except Exception as e:  # a bug or a device error must not take the UI down
            log.exception("generation failed")
            self.post_message(self.StreamEnded(reply_id, None, f"{type(e).__name__}: {e}"))

    @store_errors_as_notices
    async def on_chat_view_chunk(self, message: Chunk) -> None:
        reply = self.reply
        if reply is None or reply.id != message.reply_id:
            return  # a reply that was already ended (stopped by a switch, quit, ...)
        reply.chunks.append(message.text)
        self._pace(reply)
        await reply.box.write(message.text)
        if time.monotonic() - reply.saved_at >= SAVE_INTERVAL_S:
            reply.saved_at = time.monotonic()
            self.context.store.update_reply(reply.record_id, "".join(reply.chunks), finish_reason="streaming")

    def _pace(self, reply: ActiveReply) -> None:
        """Adapt chunk_interval to the UI thread's CPU share since the last chunk."""
        now = (time.perf_counter(), time.thread_time())
        if reply.last_chunk_at is not None:
            wall = now[0] - reply.last_chunk_at[0]
            busy = (now[1] - reply.last_chunk_at[1]) / wall if wall > 0 else 0.0
            if busy > UI_BUSY_TARGET:
                self.chunk_interval = min(MAX_CHUNK_INTERVAL_S, self.chunk_interval * 1.5)
            elif busy < UI_BUSY_TARGET / 2:
                self.chunk_interval = max(MIN_CHUNK_INTERVAL_S, self.chunk_interval / 1.25)
        reply.last_chunk_at = now

    async def on_chat_view_stream_ended(self, message: StreamEnded) -> None:
        reply = self.reply
        if reply is None or reply.id != message.reply_id:
            return
        if message.error is not None:
            await self._finish(reply, "error", None, message.error)
        else:
            await self._finish(reply, message.result.finish_reason, message.result)

    def stop(self) -> None:
        """Ask the engine to stop after the current token; the text so far is kept, marked stopped."""
        reply = self.reply
        if reply is None or reply.stopping:
            return
        reply.stopping = True
        reply.cancel.set()
        reply.box.set_meta("stopping…")

    async def end_reply(self) -> None:
        """End a reply at once (switching conversation, quitting): keep the text so far, marked stopped."""
        reply = self.reply
        if reply is None:
            return
        reply.cancel.set()
        await self._finish(reply, "cancelled", None)

    @store_errors_as_notices
    async def _finish(self, reply: ActiveReply, finish_reason: str, result: ReplyResult | None,
                      error: str | None = None) -> None:
        """Commit the reply (text so far; stats when it ran to its end), render it once in full and tell the
        screen."""
        self.reply = None
        if self.live_attention is not None and result is not None:
            self.live_attention.finish(reply.id, result.generated_tokens)
        text = "".join(reply.chunks)
        record = None
        if not text and finish_reason in ("cancelled", "error"):
            self.context.store.delete_message(reply.record_id)
            await reply.box.finish("", None, "")
            await reply.box.remove()
            if finish_reason == "cancelled":
                self.notify("Stopped before the first token")
        else:
            stats = {k: getattr(result, k) for k in STAT_KEYS} if result is not None else {}
            if error:
                stats["error"] = error
            record = self.context.store.update_reply(
                reply.record_id, text, finished_at=time.time(), finish_reason=finish_reason,
                prompt_tokens=result.prompt_tokens if result else None,
                generated_tokens=result.generated_tokens if result else None, stats=stats,
            )
            if self.conversation_id == reply.conversation_id:
                self.messages.append(record)
            await reply.box.finish(text, record, reply_meta(record), warning=finish_reason in ("cancelled", "error"))
        self.post_message(self.ReplyFailed(record, error) if error else self.ReplyFinished(record, result))
