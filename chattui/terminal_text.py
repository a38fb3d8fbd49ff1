"""Untrusted text (model replies, stored messages, token strings) made harmless for a terminal.

A reply can hold escape sequences: `ESC[2J` clears the screen, `ESC]0;...BEL` sets the window title,
OSC 52 writes the clipboard, a carriage return overwrites the line. Shown text keeps newlines and tabs;
every other control character becomes a visible mark instead of an instruction to the terminal: C0
controls and DEL their Unicode "control picture" (ESC -> ␛, BEL -> ␇, CR -> ␍), C1 controls
(U+0080-U+009F, which some terminals read as ESC sequences) U+FFFD.
"""

from __future__ import annotations

from typing import TextIO

_MARKS = {code: 0x2400 + code for code in range(0x20) if chr(code) not in "\n\t"}
_MARKS[0x7F] = 0x2421  # ␡
_MARKS.update({code: 0xFFFD for code in range(0x80, 0xA0)})

# json.dumps escapes C0 controls itself; these pass through it raw (with ensure_ascii=False).
_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in [0x7F, *range(0x80, 0xA0)]}


def displayable(text: str) -> str:
    """text with every control character but newline and tab replaced by a visible mark."""
    return text.translate(_MARKS)


def json_for_terminal(json_text: str) -> str:
    """A JSON document with DEL and C1 controls written as \\u escapes: the same value, no raw controls.

    Those characters can only occur inside JSON strings, where the escape means the same character."""
    return json_text.translate(_JSON_ESCAPES)


def for_stream(text: str, stream: TextIO) -> str:
    """displayable(text) when stream is a terminal; the exact text for pipes and files."""
    return displayable(text) if stream.isatty() else text
