"""A conversation as a Markdown document or a JSON object, and the file it is written to."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from chattui.catalog import display_name
from chattui.paths import write_text_atomic
from chattui.store import Conversation, Message

EXPORT_FORMAT = "chattui.conversation"
EXPORT_VERSION = 1


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_BREAKS_STRUCTURE = re.compile(r" {0,3}(#{1,6}(\s|$)|=+\s*$|-+\s*$)")  # an ATX heading, a setext underline


def message_markdown(text: str) -> str:
    """A message's text made safe to place under the export's "## ..." headings: outside code blocks, a line that
    would start a heading ("# Title", or "===" / "---" under a line) is escaped, and a code block left open is
    closed, so a message can never end the document's structure or swallow the messages after it."""
    lines = []
    fence: str | None = None  # the fence that opened the code block we are in
    for line in text.split("\n"):
        marker = _FENCE.match(line)
        if fence is None:
            if marker:
                fence = marker.group(1)
            elif _BREAKS_STRUCTURE.match(line):
                indent = len(line) - len(line.lstrip(" "))
                line = line[:indent] + "\\" + line[indent:]
        elif marker and line.strip() == marker.group(1) and marker.group(1).startswith(fence):  # it closes
            fence = None
        lines.append(line)
    if fence is not None:
        lines.append(fence)
    return "\n".join(lines)


def to_markdown(conversation: Conversation, messages: list[Message]) -> str:
    title = conversation.title or "Untitled conversation"
    lines = [f"# {title}", ""]
    lines.append(f"- Mode: {conversation.mode}")
    if conversation.model:
        lines.append(f"- Model: `{conversation.model}`")
    lines.append(f"- Created: {_when(conversation.created_at)}")
    overrides = {k: v for k, v in conversation.settings.items() if k != "system_prompt"}
    if overrides:
        lines.append("- Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())))
    lines.append("")
    system = conversation.settings.get("system_prompt")
    if system and conversation.mode == "chat":
        lines += ["## System", "", message_markdown(system), ""]
    for m in messages:
        if m.role == "user":
            heading = "User" if m.mode == "chat" else "Prompt"
        else:
            heading = "Assistant" if m.mode == "chat" else "Completion"
        lines.append(f"## {heading}")
        details = [_when(m.created_at)]
        if m.role == "assistant":
            if m.model:
                details.append(display_name(m.model))
            if m.generated_tokens is not None:
                details.append(f"{m.generated_tokens} tokens")
            if m.stats.get("decode_tokens_per_s"):
                details.append(f"{m.stats['decode_tokens_per_s']:.1f} tok/s")
            if m.finish_reason:
                details.append("stopped" if m.finish_reason == "cancelled" else f"finish: {m.finish_reason}")
        lines += ["", f"*{' · '.join(d for d in details if d)}*", "", message_markdown(m.content), ""]
    return "\n".join(lines).rstrip() + "\n"


def to_json(conversation: Conversation, messages: list[Message]) -> str:
    data = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "title": conversation.title,
        "mode": conversation.mode,
        "model": conversation.model,
        "settings": conversation.settings,
        "created_at": conversation.created_at,
        "updated_at": conversation.updated_at,
        "messages": [m.to_dict() for m in messages],
    }
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def export_path(folder: Path, conversation: Conversation, extension: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", conversation.title or "conversation").strip("-").lower()[:40]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{slug or 'conversation'}-{conversation.id}-{stamp}.{extension}"
    n = 1
    while path.exists():
        path = folder / f"{slug or 'conversation'}-{conversation.id}-{stamp}-{n}.{extension}"
        n += 1
    return path


def write_export(folder: Path, conversation: Conversation, messages: list[Message], fmt: str) -> Path:
    """Write the conversation as "markdown" or "json" into folder; returns the file's path."""
    text = to_markdown(conversation, messages) if fmt == "markdown" else to_json(conversation, messages)
    folder.mkdir(parents=True, exist_ok=True)
    path = export_path(folder, conversation, "md" if fmt == "markdown" else "json")
    write_text_atomic(path, text)
    return path
