"""The chat screen: conversation list, messages, the input, the status bar.

Replies are generated in a thread worker that iterates the backend and posts `ReplyChunk`s (never
touching a widget); the screen streams them into the reply's Markdown and, when the reply ends,
renders it once more in full and commits it to the store. A message typed before a model is ready
is saved and shown as queued, then sent when the model has loaded.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Button, Footer, Label, OptionList, Static
from textual.worker import get_current_worker

from chattui.backend import Backend, BackendError, ReplyResult
from chattui.catalog import model_label
from chattui.export import write_export
from chattui.notices import store_errors_as_notices, store_errors_noticed_by
from chattui.screens.attention import AttentionScreen, LiveAttention
from chattui.screens.dialogs import ConfirmDialog, TextDialog
from chattui.screens.settings import SettingsScreen
from chattui.settings import effective
from chattui.store import Conversation, Store, StoreError
from chattui.store import Message as StoredMessage
from chattui.widgets.conversation_list import ConversationList
from chattui.widgets.message_box import MessageBox, reply_meta
from chattui.widgets.prompt_input import PromptInput
from chattui.widgets.status_bar import StatusBar
from engine.params import GenerationSettings

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
             "dropped_messages")
QUEUED_NOTE = "⏳ queued: sent once the model is loaded"
NO_REPLY_NOTE = "no reply yet · ctrl+r writes one"
EMPTY_HINT = (
    "Type a message and press Enter to send it (ctrl+j adds a new line; ctrl+l comes back here).\n"
    "ctrl+o chooses a model · ctrl+s sets the system prompt and sampling · ctrl+g switches to raw "
    "generate mode · ctrl+p lists every command."
)


def build_prompt(
    conversation: Conversation, messages: list[StoredMessage], mode: str | None = None
) -> list[dict] | str:
    """What the model is given, in `mode` (default: the conversation's).

    Chat mode: the system prompt and the messages written in chat mode, for the chat template (raw prompts and
    completions are not chat turns). Generate (raw) mode: exactly the text last typed in raw mode, followed by
    the completions that continued it; nothing earlier.
    """
    if (mode or conversation.mode) == "generate":
        starts = [i for i, m in enumerate(messages) if m.mode == "generate" and m.role == "user"]
        if not starts:
            return ""
        return "".join(m.content for m in messages[starts[-1]:] if m.mode == "generate")
    system = conversation.settings.get("system_prompt")
    prompt = [{"role": "system", "content": system}] if system else []
    return prompt + [{"role": m.role, "content": m.content} for m in messages if m.mode == "chat"]


def title_from(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line[:48] + ("…" if len(line) > 48 else "")


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


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+l", "focus_prompt", "Message"),
        Binding("ctrl+g", "toggle_mode", "Raw/chat"),
        Binding("ctrl+b", "toggle_sidebar", "Sidebar"),
        Binding("f2", "attention", "Attention"),
        Binding("f3", "toggle_live_attention", "Live attn"),
    ]

    @dataclass
    class ReplyChunk(Message):
        reply_id: int
        text: str

    @dataclass
    class ReplyFinished(Message):
        reply_id: int
        result: ReplyResult

    @dataclass
    class ReplyFailed(Message):
        reply_id: int
        error: str

    def __init__(self, store: Store, backend: Backend) -> None:
        super().__init__()
        self.store = store
        self.backend = backend
        self.conversation: Conversation | None = None
        self.messages: list[StoredMessage] = []
        self.reply: ActiveReply | None = None
        self.waiting: int | None = None  # conversation whose last message waits for a model
        self.chunk_interval = 1 / 15  # read by the reply worker; adapted by _pace()
        self._reply_ids = itertools.count(1)
        self.live_attention: LiveAttention | None = None  # set: replies record what each new token attended to

    def compose(self):
        with Horizontal(id="main"):
            with Vertical(id="sidebar"):
                yield Label("Conversations", id="sidebar-title")
                yield ConversationList(id="conversations")
            with Vertical(id="chat"):
                yield VerticalScroll(id="messages")
                yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        interrupted = self.store.mark_interrupted()
        if interrupted:
            self.notify(f"{interrupted} reply(ies) were being written when chattui last ended; their text so far "
                        "is kept, marked interrupted.", title="Conversations", severity="warning", timeout=15)
        conversations = self.store.conversations()
        await self.open_conversation(conversations[0].id if conversations else None)
        self.prompt.focus()

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def prompt(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    @property
    def status(self) -> StatusBar:
        return self.query_one("#status", StatusBar)

    @property
    def view(self) -> VerticalScroll:
        return self.query_one("#messages", VerticalScroll)

    @property
    def mode(self) -> str:
        return self.conversation.mode if self.conversation else "chat"

    def boxes(self) -> list[MessageBox]:
        return list(self.view.query(MessageBox))

    def _ensure_conversation(self) -> Conversation:
        if self.conversation is None:
            self.conversation = self.store.create_conversation()
            self._refresh_sidebar()
        return self.conversation

    def _refresh_sidebar(self) -> None:
        self.query_one("#conversations", ConversationList).show(
            self.store.conversations(), self.conversation.id if self.conversation else None
        )

    def _header(self, role: str, mode: str, model: str | None = None, adapter: str | None = None) -> str:
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
        header = self._header(msg.role, msg.mode, msg.model, msg.adapter)
        return MessageBox(msg.role, msg.content, header=header, meta=meta, record=msg)

    async def _mount_box(self, box: MessageBox) -> None:
        for hint in self.view.query("#empty-hint"):
            await hint.remove()
        await self.view.mount(box)
        boxes = self.boxes()
        if len(boxes) > MOUNT_LIMIT + 4:
            await self.view.remove_children(boxes[: len(boxes) - MOUNT_LIMIT])
            await self._update_earlier_button()
        self.view.scroll_end(animate=False)
        self.view.anchor()

    def _hidden_count(self) -> int:
        """How many messages of the conversation are not mounted (the earliest ones)."""
        boxes = self.boxes()
        if not boxes or boxes[0].record is None:
            return 0
        first_id = boxes[0].record.id
        return next((i for i, m in enumerate(self.messages) if m.id == first_id), 0)

    async def _update_earlier_button(self) -> None:
        hidden = self._hidden_count()
        buttons = self.view.query("#earlier")
        if not hidden:
            await buttons.remove()
            return
        label = f"↑ show {min(hidden, MOUNT_LIMIT)} earlier message(s) ({hidden} not shown)"
        if buttons:
            buttons.first(Button).label = label
        else:
            await self.view.mount(Button(label, id="earlier", compact=True), before=0)

    @on(Button.Pressed, "#earlier")
    async def show_earlier(self) -> None:
        hidden = self._hidden_count()
        if not hidden:
            return
        earlier = self.messages[max(0, hidden - MOUNT_LIMIT): hidden]
        await self.view.mount_all([self._box_for(m) for m in earlier], before=self.boxes()[0])
        await self._update_earlier_button()

    def _last_measured_reply(self) -> StoredMessage | None:
        """The newest reply with token counts: what the conversation takes of the context."""
        return next((m for m in reversed(self.messages) if m.role == "assistant" and m.prompt_tokens is not None),
                    None)

    def context_used(self) -> int:
        last = self._last_measured_reply()
        return last.prompt_tokens + (last.generated_tokens or 0) if last else 0

    def _show_context_from_history(self) -> None:
        model = self.app.model
        self.status.show_context(self.context_used(), model.context_length if model else None)
        last = self._last_measured_reply()
        self.status.show_dropped(last.stats.get("dropped_messages", 0) if last else 0)

    def _update_placeholder(self) -> None:
        if self.mode == "generate":
            self.prompt.placeholder = ("Raw mode: the model continues exactly this text (no template, no earlier "
                                       "messages). Enter with no text continues further.")
        else:
            self.prompt.placeholder = "Message (Enter sends · ctrl+j new line · Esc stops a reply)"

    # -- conversations ---------------------------------------------------------------------------

    @store_errors_as_notices
    async def open_conversation(self, conversation_id: int | None) -> None:
        """Show a conversation (None: a new, empty one). A reply in progress is stopped and kept."""
        await self.stop_reply()
        self.conversation = self.store.conversation(conversation_id) if conversation_id is not None else None
        self.messages = self.store.messages(conversation_id) if conversation_id is not None else []
        await self.view.remove_children()
        if self.messages:
            await self.view.mount_all([self._box_for(m) for m in self.messages[-MOUNT_LIMIT:]])
            await self._update_earlier_button()
        else:
            await self.view.mount(Static(EMPTY_HINT, id="empty-hint", markup=False))
        boxes = self.boxes()
        if boxes and self.messages[-1].role == "user":
            waiting = self.waiting is not None and self.waiting == conversation_id
            boxes[-1].set_meta(QUEUED_NOTE if waiting else NO_REPLY_NOTE)
        self.view.scroll_end(animate=False)
        self.view.anchor()
        self._refresh_sidebar()
        self._update_placeholder()
        self._show_context_from_history()
        self.refresh_bindings()

    @on(OptionList.OptionSelected, "#conversations")
    async def _conversation_chosen(self, event: OptionList.OptionSelected) -> None:
        conversation_id = int(event.option.id)
        if self.conversation is None or conversation_id != self.conversation.id:
            await self.open_conversation(conversation_id)
        self.prompt.focus()

    async def action_new_chat(self) -> None:
        await self.open_conversation(None)
        self.prompt.focus()

    def action_focus_prompt(self) -> None:
        self.prompt.focus()

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.display = not sidebar.display

    @store_errors_as_notices
    async def action_toggle_mode(self) -> None:
        conversation = self._ensure_conversation()
        mode = "generate" if conversation.mode == "chat" else "chat"
        self.conversation = self.store.update_conversation(conversation.id, mode=mode)
        await self.open_conversation(conversation.id)
        self.notify(
            "Raw generate mode: the model continues exactly the text you type next, without the chat template "
            "or earlier messages; Enter with no text continues it further."
            if mode == "generate" else
            "Chat mode: messages go through the model's chat template; raw prompts and completions are left out."
        )

    def action_rename(self) -> None:
        if self.conversation is None:
            self.notify("Nothing to rename yet: send a message first", severity="warning")
            return
        conversation = self.conversation

        @store_errors_noticed_by(self)
        def renamed(title: str | None) -> None:
            if title and title.strip():
                self.conversation = self.store.update_conversation(conversation.id, title=title.strip())
                self._refresh_sidebar()

        self.app.push_screen(TextDialog("Rename conversation", conversation.title, "Rename", multiline=False), renamed)

    def action_delete(self) -> None:
        if self.conversation is None:
            return
        conversation = self.conversation

        @store_errors_noticed_by(self)
        async def confirmed(yes: bool | None) -> None:
            if yes:
                await self.stop_reply()
                self.store.delete_conversation(conversation.id)
                remaining = self.store.conversations()
                await self.open_conversation(remaining[0].id if remaining else None)
                self.notify(f"Deleted “{conversation.title or 'New chat'}”", markup=False)

        self.app.push_screen(
            ConfirmDialog(f"Delete “{conversation.title or 'New chat'}” and all its messages?", "Delete"), confirmed
        )

    # -- sending ---------------------------------------------------------------------------------

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        await self.send(event.text)

    async def send(self, text: str) -> None:
        """Send a message (in generate mode, empty text continues the document)."""
        if self.reply is not None:
            self.notify("A reply is still being written: press Esc to stop it first", severity="warning")
            return
        if not text.strip() and (self.mode == "chat" or not self.conversation
                                 or not build_prompt(self.conversation, self.messages)):
            return  # raw mode continues with no text only when there is raw text to continue
        try:
            conversation = self._ensure_conversation()
            if text.strip():
                if not conversation.title:
                    self.conversation = conversation = self.store.update_conversation(
                        conversation.id, title=title_from(text)
                    )
                msg = self.store.add_message(conversation.id, "user", text, mode=self.mode)  # committed now
        except StoreError as e:  # e.g. a full disk: the text stays in the input, to send again
            self.notify(f"Your message was not sent: {e}", title="Not sent", severity="error", timeout=15,
                        markup=False)
            return
        self.prompt.clear()
        if text.strip():
            self.messages.append(msg)
            await self._mount_box(self._box_for(msg))
            self._refresh_sidebar()
        await self.request_reply()

    @store_errors_as_notices
    async def request_reply(self) -> None:
        """Start a reply to the conversation as it stands, or queue it until a model is ready."""
        conversation = self.conversation
        if conversation is None or not self.messages:
            return
        model = self.app.model
        if model is None:
            self.waiting = conversation.id
            self.boxes()[-1].set_meta(QUEUED_NOTE)
            if self.app.loading is None:
                self.notify(
                    "No model is loaded. Press ctrl+o to choose one; your message is sent once it loads.",
                    severity="warning", timeout=10,
                )
            return
        prompt = build_prompt(conversation, self.messages)
        if not prompt or (isinstance(prompt, list) and prompt[-1]["role"] != "user"):
            self.notify("Nothing to answer in this mode: the last message was written in the other mode. Type a "
                        "message (ctrl+g switches mode).", severity="warning", timeout=10)
            return
        if self.waiting == conversation.id:
            self.waiting = None
        for box in self.boxes():
            if box.meta in (QUEUED_NOTE, NO_REPLY_NOTE):
                box.set_meta("")
        settings = effective(conversation.settings, model.defaults)
        box = MessageBox("assistant", header=self._header("assistant", self.mode, model.path, model.adapter), meta="…")
        await self._mount_box(box)
        box.start_stream()
        started = time.time()
        record = self.store.add_message(  # on disk from the start: a crash keeps the text so far
            conversation.id, "assistant", "", created_at=started, finish_reason="streaming", settings=settings.to_dict(),
            model=model.path, adapter=model.adapter, mode=self.mode,
        )
        reply = ActiveReply(
            id=next(self._reply_ids), record_id=record.id, conversation_id=conversation.id, box=box,
            cancel=threading.Event(), settings=settings, model=model.path, adapter=model.adapter, mode=self.mode,
            started_at=started, saved_at=time.monotonic(),
        )
        self.reply = reply
        if conversation.model != model.path or conversation.adapter != model.adapter:
            self.conversation = self.store.update_conversation(conversation.id, model=model.path,
                                                               adapter=model.adapter or "")
        self.refresh_bindings()
        # Start once the new box and footer are on screen, so that work does not compete with decoding.
        self.call_after_refresh(self._generate, self.backend, reply.id, prompt, settings, reply.cancel)

    @work(thread=True, exclusive=True, group="reply")
    def _generate(self, backend: Backend, reply_id: int, prompt, settings: GenerationSettings,
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
                    self.post_message(self.ReplyChunk(reply_id, "".join(pending)))
                    pending.clear()
                    last_post = now
            if pending:
                self.post_message(self.ReplyChunk(reply_id, "".join(pending)))
            self.post_message(self.ReplyFinished(reply_id, reply.result))
        except BackendError as e:
            self.post_message(self.ReplyFailed(reply_id, str(e)))
        except Exception as e:  # a bug or a device error must not take the UI down
            log.exception("generation failed")
            self.post_message(self.ReplyFailed(reply_id, f"{type(e).__name__}: {e}"))

    async def on_chat_screen_reply_chunk(self, message: ReplyChunk) -> None:
        reply = self.reply
        if reply is None or reply.id != message.reply_id:
            return  # a reply that was already ended (stopped by a switch, quit, ...)
        reply.chunks.append(message.text)
        self._pace(reply)
        await reply.box.write(message.text)
        if time.monotonic() - reply.saved_at >= SAVE_INTERVAL_S:
            reply.saved_at = time.monotonic()
            self.store.update_reply(reply.record_id, "".join(reply.chunks), finish_reason="streaming")

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

    async def on_chat_screen_reply_finished(self, message: ReplyFinished) -> None:
        reply = self.reply
        if reply is not None and reply.id == message.reply_id:
            await self._finish(reply, message.result.finish_reason, message.result)

    async def on_chat_screen_reply_failed(self, message: ReplyFailed) -> None:
        reply = self.reply
        if reply is not None and reply.id == message.reply_id:
            await self._finish(reply, "error", None, error=message.error)

    @store_errors_as_notices
    async def _finish(self, reply: ActiveReply, finish_reason: str, result: ReplyResult | None,
                      error: str | None = None) -> None:
        """Commit the reply (text so far; stats when it ran to its end) and render it once in full."""
        self.reply = None
        if self.live_attention is not None and result is not None:
            self.live_attention.finish(reply.id, result.generated_tokens)
        self.refresh_bindings()
        text = "".join(reply.chunks)
        if not text and finish_reason in ("cancelled", "error"):
            self.store.delete_message(reply.record_id)
            await reply.box.finish("", None, "")
            await reply.box.remove()
            if finish_reason == "cancelled":
                self.notify("Stopped before the first token")
        else:
            stats = {k: getattr(result, k) for k in STAT_KEYS} if result is not None else {}
            if error:
                stats["error"] = error
            record = self.store.update_reply(
                reply.record_id, text, finished_at=time.time(), finish_reason=finish_reason,
                prompt_tokens=result.prompt_tokens if result else None,
                generated_tokens=result.generated_tokens if result else None, stats=stats,
            )
            if self.conversation is not None and self.conversation.id == reply.conversation_id:
                self.messages.append(record)
            await reply.box.finish(text, record, reply_meta(record), warning=finish_reason in ("cancelled", "error"))
        if error:
            self.notify(error, title="Generation failed", severity="error", timeout=15, markup=False)
        if result is not None:
            model = self.app.model
            self.status.show_speed(result.ttft_s, result.decode_tokens_per_s)
            self.status.show_context(result.prompt_tokens + result.generated_tokens,
                                     model.context_length if model else None)
            self.status.show_dropped(result.dropped_messages)
        self._refresh_sidebar()

    # -- stop, regenerate, edit, copy, export ------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return True if self.reply is not None else None  # None: shown disabled
        if action == "regenerate":
            return True if self.messages else None
        return True

    def action_stop(self) -> None:
        """Esc: ask the engine to stop after the current token; the text so far is kept, marked stopped."""
        reply = self.reply
        if reply is None or reply.stopping:
            return
        reply.stopping = True
        reply.cancel.set()
        reply.box.set_meta("stopping…")

    async def stop_reply(self) -> None:
        """End a reply at once (switching conversation, quitting): keep the text so far, marked stopped."""
        reply = self.reply
        if reply is None:
            return
        reply.cancel.set()
        await self._finish(reply, "cancelled", None)

    @store_errors_as_notices
    async def action_regenerate(self) -> None:
        await self.stop_reply()
        if not self.messages:
            self.notify("Nothing to regenerate yet", severity="warning")
            return
        last = self.messages[-1]
        if last.role == "assistant":
            self.store.delete_message(last.id)
            self.messages.pop()
            boxes = self.boxes()
            if boxes and boxes[-1].record is not None and boxes[-1].record.id == last.id:
                await boxes[-1].remove()
        await self.request_reply()

    async def on_message_box_edit_requested(self, event: MessageBox.EditRequested) -> None:
        if event.box.record is not None:
            self.edit_message(event.box.record)

    def action_edit_last(self) -> None:
        users = [m for m in self.messages if m.role == "user"]
        if not users:
            self.notify("No message of yours to edit yet", severity="warning")
            return
        self.edit_message(users[-1])

    def edit_message(self, record: StoredMessage) -> None:
        """Edit a past user message; on confirm, later messages are removed and a new reply starts."""

        @store_errors_noticed_by(self)
        async def edited(text: str | None) -> None:
            if text is None:
                return
            if not text.strip():
                self.notify("An empty message cannot be sent", severity="warning")
                return
            await self.stop_reply()
            self.store.edit_and_truncate(record.id, text)
            await self.open_conversation(record.conversation_id)
            self.prompt.focus()
            await self.request_reply()

        later = sum(m.position > record.position for m in self.messages)
        title = "Edit and resend" + (f" (the {later} later message(s) will be removed)" if later else "")
        self.app.push_screen(TextDialog(title, record.content, "Resend"), edited)

    def action_copy_last(self) -> None:
        replies = [m for m in self.messages if m.role == "assistant"]
        if not replies:
            self.notify("No reply to copy yet", severity="warning")
            return
        self.app.copy_to_clipboard(replies[-1].content)
        self.notify(f"Copied the last reply ({len(replies[-1].content)} characters) to the clipboard")

    def action_export(self, fmt: str) -> None:
        if self.conversation is None or not self.messages:
            self.notify("Nothing to export yet", severity="warning")
            return
        try:
            path = write_export(self.app.export_dir, self.conversation, self.messages, fmt)
        except OSError as e:
            self.notify(f"Export failed: {e}", severity="error", markup=False)
            return
        self.app.context.last_export = path
        self.notify(f"Exported to {path}", title="Export", timeout=15, markup=False)

    def action_attention(self) -> None:
        """Open the attention screen on the focused message (else the last one), up to and including it;
        while a reply is being written, on the live view."""
        if self.conversation is None or not self.messages:
            self.notify("Nothing to look at yet: send a message first", severity="warning")
            return
        if self.app.model is None:
            self.notify("No model is loaded: press ctrl+o to choose one", severity="warning")
            return
        focused = self.focused
        while focused is not None and not isinstance(focused, MessageBox):
            focused = focused.parent if isinstance(focused.parent, Widget) else None
        record = focused.record if isinstance(focused, MessageBox) and focused.record is not None else self.messages[-1]
        upto = next((i for i, m in enumerate(self.messages) if m.id == record.id), len(self.messages) - 1)
        who = "your message" if record.role == "user" else "the reply"
        self.app.push_screen(AttentionScreen(
            self.backend, build_prompt(self.conversation, self.messages[: upto + 1], record.mode),
            f"{self.conversation.title or 'New chat'} · up to {who} #{upto + 1}",
            view="live" if self.reply is not None and self.live_attention is not None else "heatmap",
            live=self.live_attention,
        ))

    def action_toggle_live_attention(self) -> None:
        if self.live_attention is None:
            self.live_attention = LiveAttention()
            self.notify("Live attention on: the next replies record what each new token attends to (f2, live view). "
                        "Decoding is a little slower.")
        else:
            self.live_attention = None
            self.notify("Live attention off")

    def action_settings(self) -> None:
        model = self.app.model
        conversation = self.conversation

        @store_errors_noticed_by(self)
        async def saved(result: dict | None) -> None:
            if result is None:
                return
            target = self._ensure_conversation()
            mode_changed = result["mode"] != target.mode
            self.conversation = self.store.update_conversation(target.id, mode=result["mode"], settings=result["settings"])
            if mode_changed:
                await self.open_conversation(target.id)
            self.notify("Settings saved for this conversation")

        self.app.push_screen(
            SettingsScreen(
                conversation.settings if conversation else {},
                self.mode,
                effective({}, model.defaults if model else None).to_dict(),
                model.context_length if model else None,
                self.context_used() if conversation else 0,
            ),
            saved,
        )

    # -- the model -------------------------------------------------------------------------------

    async def model_changed(self, info) -> None:
        """Called by the app when a model has loaded: show it and send a queued message."""
        self.status.show_model(info)
        self._show_context_from_history()
        if (
            self.waiting is not None and self.reply is None
            and self.conversation is not None and self.conversation.id == self.waiting
        ):
            await self.request_reply()
