"""Incremental detokenization with stop strings.

Each step decodes the whole generated sequence and emits only the new suffix, so the concatenated
stream equals decode(all ids) (unless generation ends inside a character: then one U+FFFD): multi-byte characters split across tokens (Chinese, emoji) are held
back until complete, never emitted as U+FFFD. Text that could be the start of a stop string is held
back too, and a stop string is never emitted, even when it spans several tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()):
        self._decode = decode
        self._stops = [s for s in stop_strings if s]
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already handed out
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found; nothing more will be emitted

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to show (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        full = self._decode(self._ids)
        visible = full.rstrip(REPLACEMENT)  # an incomplete UTF-8 sequence decodes to trailing U+FFFD
        end = self._stop_position(visible)
        if end is not None:
            self.stopped = True
        else:
            end = len(visible) - self._held_for_stop(visible)
        return self._emit(visible, end)

    def finish(self) -> str:
        """Generation ended without a stop string: release everything still held back."""
        if self.stopped:
            return ""
        full = self._decode(self._ids)
        if not full.startswith(self.text):
            # Byte-fallback decoders turn a whole run of byte tokens into U+FFFD when it ends inside a
            # character, rewriting text already shown: report the unfinished character once instead.
            self.text += REPLACEMENT
            return REPLACEMENT
        return self._emit(full, None)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        delta = text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        self.text += delta
        return delta

    def _stop_position(self, text: str) -> int | None:
        """Index where the earliest stop string starts, searching only text that could hold a new one."""
        longest = max((len(s) for s in self._stops), default=0)
        search_from = max(0, self._emitted - longest)
        found = [i for s in self._stops if (i := text.find(s, search_from)) != -1]
        return min(found) if found else None

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        held = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:n]):
                    held = n
                    break
        return held
