"""The sidebar: every conversation, most recent first; Enter or a click opens one."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from chattui.store import Conversation
from chattui.terminal_text import displayable


class ConversationList(OptionList):
    def show(self, conversations: list[Conversation], current_id: int | None) -> None:
        self.clear_options()
        options = []
        width = max(self.size.width - 4, 12) if self.size.width else 24
        for c in conversations:
            title = displayable(c.title or "New chat")
            label = Text(title if len(title) <= width else title[: width - 1] + "…")
            if c.mode == "generate":
                label.append("  raw", style="dim italic")
            options.append(Option(label, id=str(c.id)))
        self.add_options(options)
        ids = [c.id for c in conversations]
        if current_id in ids:
            self.highlighted = ids.index(current_id)
