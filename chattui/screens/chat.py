"""The chat screen: conversation list, the conversation (a ChatView), the input, the status bar.

The ChatView shows the messages and writes replies (streaming, saving, stopping); the screen decides what
is sent and when, and reacts to `ChatView.ReplyFinished` / `ReplyFailed` (status bar, sidebar, notices). A
message typed before a model is ready is saved and shown as queued, then sent when the model has loaded.
The screen takes the store, the backend and the model state from its ScreenContext.
"""

from __future__ import annotations

from textual import on
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, Label, OptionList

from chattui.context import ScreenContext
from chattui.export import write_export
from chattui.notices import store_errors_as_notices, store_errors_noticed_by
from chattui.screens.attention import AttentionScreen, LiveAttention
from chattui.screens.dialogs import ConfirmDialog, TextDialog
from chattui.screens.settings import SettingsScreen
from chattui.settings import effective
from chattui.store import Conversation, StoreError
from chattui.store import Message as StoredMessage
from chattui.widgets.chat_view import ActiveReply, ChatView
from chattui.widgets.conversation_list import ConversationList
from chattui.widgets.message_box import MessageBox
from chattui.widgets.prompt_input import PromptInput
from chattui.widgets.status_bar import StatusBar

QUEUED_NOTE = "⏳ queued: sent once the model is loaded"
NO_REPLY_NOTE = "no reply yet · ctrl+r writes one"


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


class ChatScreen(Screen):
    BINDINGS = [
        Binding("f1", "app.toggle_keys", "Keys"),  # first: at 80 columns the footer shows the first few keys
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

    def __init__(self, context: ScreenContext) -> None:
        super().__init__()
        self.context = context
        self.store = context.store
        self.conversation: Conversation | None = None
        self.waiting: int | None = None  # conversation whose last message waits for a model
        self.view = ChatView(context, id="messages")

    def compose(self):
        with Horizontal(id="main"):
            with Vertical(id="sidebar"):
                yield Label("Conversations", id="sidebar-title")
                yield ConversationList(id="conversations")
            with Vertical(id="chat"):
                yield self.view
                yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer(compact=True)

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
    def mode(self) -> str:
        return self.conversation.mode if self.conversation else "chat"

    @property
    def messages(self) -> list[StoredMessage]:
        """The open conversation's stored messages (the view's)."""
        return self.view.messages

    @property
    def reply(self) -> ActiveReply | None:
        """The reply being written, if any."""
        return self.view.reply

    @property
    def live_attention(self) -> LiveAttention | None:
        """Set: replies record what each new token attended to (the attention screen's live view)."""
        return self.view.live_attention

    def boxes(self) -> list[MessageBox]:
        return self.view.boxes()

    def _ensure_conversation(self) -> Conversation:
        if self.conversation is None:
            self.conversation = self.store.create_conversation()
            self.view.conversation_id = self.conversation.id
            self._refresh_sidebar()
        return self.conversation

    def _refresh_sidebar(self) -> None:
        self.query_one("#conversations", ConversationList).show(
            self.store.conversations(), self.conversation.id if self.conversation else None
        )

    def _last_measured_reply(self) -> StoredMessage | None:
        """The newest reply with token counts: what the conversation takes of the context."""
        return next((m for m in reversed(self.messages) if m.role == "assistant" and m.prompt_tokens is not None),
                    None)

    def context_used(self) -> int:
        last = self._last_measured_reply()
        return last.prompt_tokens + (last.generated_tokens or 0) if last else 0

    def _show_context_from_history(self) -> None:
        model = self.context.model
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
        messages = self.store.messages(conversation_id) if conversation_id is not None else []
        await self.view.show(conversation_id, messages, self.mode)
        boxes = self.boxes()
        if boxes and self.messages[-1].role == "user":
            waiting = self.waiting is not None and self.waiting == conversation_id
            boxes[-1].set_meta(QUEUED_NOTE if waiting else NO_REPLY_NOTE)
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
            await self.view.add(msg)
            self._refresh_sidebar()
        await self.request_reply()

    @store_errors_as_notices
    async def request_reply(self) -> None:
        """Start a reply to the conversation as it stands, or queue it until a model is ready."""
        conversation = self.conversation
        if conversation is None or not self.messages:
            return
        model = self.context.model
        if model is None:
            self.waiting = conversation.id
            self.boxes()[-1].set_meta(QUEUED_NOTE)
            if self.context.loading is None:
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
        await self.view.start_reply(conversation.id, prompt, effective(conversation.settings, model.defaults), model)
        if conversation.model != model.path or conversation.adapter != model.adapter:
            self.conversation = self.store.update_conversation(conversation.id, model=model.path,
                                                               adapter=model.adapter or "")
        self.refresh_bindings()

    def on_chat_view_reply_finished(self, message: ChatView.ReplyFinished) -> None:
        result = message.result
        if result is not None and message.record is not None:  # no record: stopped before its first token
            model = self.context.model
            self.status.show_speed(result.ttft_s, result.decode_tokens_per_s)
            self.status.show_context(result.prompt_tokens + result.generated_tokens,
                                     model.context_length if model else None)
            self.status.show_dropped(result.dropped_messages)
        self._reply_ended()

    def on_chat_view_reply_failed(self, message: ChatView.ReplyFailed) -> None:
        self.notify(message.error, title="Generation failed", severity="error", timeout=15, markup=False)
        self._reply_ended()

    def _reply_ended(self) -> None:
        self.refresh_bindings()
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
        self.view.stop()

    async def stop_reply(self) -> None:
        """End a reply at once (switching conversation, quitting): keep the text so far, marked stopped."""
        await self.view.end_reply()

    @store_errors_as_notices
    async def action_regenerate(self) -> None:
        await self.stop_reply()
        if not self.messages:
            self.notify("Nothing to regenerate yet", severity="warning")
            return
        last = self.messages[-1]
        if last.role == "assistant":
            self.store.delete_message(last.id)
            await self.view.remove_last()
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
            path = write_export(self.context.export_dir, self.conversation, self.messages, fmt)
        except OSError as e:
            self.notify(f"Export failed: {e}", severity="error", markup=False)
            return
        self.context.last_export = path
        self.notify(f"Exported to {path}", title="Export", timeout=15, markup=False)

    def action_attention(self) -> None:
        """Open the attention screen on the focused message (else the last one), up to and including it;
        while a reply is being written, on the live view."""
        if self.conversation is None or not self.messages:
            self.notify("Nothing to look at yet: send a message first", severity="warning")
            return
        if self.context.model is None:
            self.notify("No model is loaded: press ctrl+o to choose one", severity="warning")
            return
        focused = self.focused
        while focused is not None and not isinstance(focused, MessageBox):
            focused = focused.parent if isinstance(focused.parent, Widget) else None
        record = focused.record if isinstance(focused, MessageBox) and focused.record is not None else self.messages[-1]
        upto = next((i for i, m in enumerate(self.messages) if m.id == record.id), len(self.messages) - 1)
        who = "your message" if record.role == "user" else "the reply"
        self.app.push_screen(AttentionScreen(
            self.context, build_prompt(self.conversation, self.messages[: upto + 1], record.mode),
            f"{self.conversation.title or 'New chat'} · up to {who} #{upto + 1}",
            view="live" if self.reply is not None and self.live_attention is not None else "heatmap",
            live=self.live_attention,
        ))

    def action_toggle_live_attention(self) -> None:
        if self.view.live_attention is None:
            self.view.live_attention = LiveAttention()
            self.notify("Live attention on: the next replies record what each new token attends to (f2, live view). "
                        "Decoding is a little slower.")
        else:
            self.view.live_attention = None
            self.notify("Live attention off")

    def action_settings(self) -> None:
        model = self.context.model
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
