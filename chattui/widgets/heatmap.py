"""Attention weights as colour: a scrollable query x key heatmap that renders only the visible
window (a 1,024-token matrix is a million cells; only the ~40 x 60 on screen are ever built), and
the token text coloured by one query row."""

from __future__ import annotations

import numpy as np
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from chattui.terminal_text import displayable

# Viridis (perceptually uniform, readable by colour-blind users), dark = little attention.
_VIRIDIS = [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
            (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)]
LEVELS = 64


def _ramp(levels: int = LEVELS) -> list[tuple[int, int, int]]:
    stops = np.array(_VIRIDIS, dtype=np.float64)
    x = np.linspace(0, len(stops) - 1, levels)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(stops) - 1)
    frac = (x - lo)[:, None]
    rgb = stops[lo] * (1 - frac) + stops[hi] * frac
    return [tuple(int(round(c)) for c in row) for row in rgb]


RAMP = _ramp()
CELL_STYLES = [Style(bgcolor=Color.from_rgb(*rgb)) for rgb in RAMP]


def levels(matrix: np.ndarray) -> np.ndarray:
    """Weights -> ramp indices 0..LEVELS-1: scaled by the largest weight, square-rooted so the small
    weights that most tokens get are still told apart (a few 'sink' tokens take most attention)."""
    top = float(matrix.max()) if matrix.size else 0.0
    scaled = np.sqrt(np.clip(matrix / top, 0.0, 1.0)) if top > 0 else np.zeros_like(matrix)
    return np.minimum((scaled * LEVELS).astype(np.int32), LEVELS - 1)


def token_label(token: str) -> str:
    """A token string fit for one line: newlines, tabs and other control characters escaped."""
    out = []
    for ch in token:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or 127 <= ord(ch) < 160:  # C0, DEL and C1 controls never reach the terminal
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def legend() -> Text:
    text = Text("low ")
    for style in CELL_STYLES[:: max(1, LEVELS // 16)]:
        text.append("  ", style)
    text.append(" high  (√ of weight / max)")
    return text


class Heatmap(ScrollView, can_focus=True):
    """Rows: query tokens; columns: key tokens; each cell two characters wide, coloured by weight.
    Row labels and the column header (key tokens written downwards) stay put while the cells scroll."""

    CELL_W = 2
    LABEL_W = 14
    HEADER_H = 6
    KEY_STEP = 8  # key columns per left/right press
    BINDINGS = [  # shown in the footer: sideways is where long prompts hide most of the matrix
        Binding("left", "keys(-1)", "Keys←"),
        Binding("right", "keys(1)", "Keys→"),
        Binding("ctrl+pageup", "page_left", "Page←"),
        Binding("ctrl+pagedown", "page_right", "Page→"),
        Binding("home", "first_keys", "First keys", show=False),
        Binding("end", "last_keys", "Last keys", show=False),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.matrix: np.ndarray | None = None
        self.tokens: list[str] = []
        self._levels: np.ndarray | None = None
        self._labels: list[str] = []
        self.query_row: int | None = None  # highlighted query row (the text view's query)

    def show(self, matrix: np.ndarray, tokens: list[str]) -> None:
        self.matrix = matrix
        self.tokens = tokens
        self._levels = levels(matrix)
        self._labels = [token_label(t) for t in tokens]
        T = len(tokens)
        self.virtual_size = Size(self.LABEL_W + 1 + T * self.CELL_W, self.HEADER_H + T)
        self.refresh()

    def action_keys(self, direction: int) -> None:
        self.scroll_to(x=self.scroll_offset.x + direction * self.KEY_STEP * self.CELL_W, animate=False)

    def action_first_keys(self) -> None:
        self.scroll_to(x=0, animate=False)

    def action_last_keys(self) -> None:
        self.scroll_to(x=self.max_scroll_x, animate=False)

    def cell_at(self, x: int, y: int) -> tuple[int, int] | None:
        """(query, key) of the cell at widget coordinates x, y, or None off the cells."""
        if self.matrix is None or y < self.HEADER_H or x <= self.LABEL_W:
            return None
        q = y - self.HEADER_H + int(self.scroll_offset.y)
        k = (x - self.LABEL_W - 1 + int(self.scroll_offset.x)) // self.CELL_W
        return (q, k) if 0 <= k <= q < len(self.tokens) else None

    def on_mouse_move(self, event) -> None:
        cell = self.cell_at(event.x, event.y)
        if cell is None:
            self.tooltip = None
            return
        q, k = cell
        self.tooltip = f"query {q} {token_label(self.tokens[q])!r} → key {k} {token_label(self.tokens[k])!r}: " \
                       f"{self.matrix[q, k]:.4f}"

    def _visible_keys(self) -> range:
        T = len(self.tokens)
        first = int(self.scroll_offset.x) // self.CELL_W
        count = max(0, (self.size.width - self.LABEL_W - 1)) // self.CELL_W + 1
        return range(min(first, T), min(first + count, T))

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if self._levels is None:
            return Strip.blank(width)
        keys = self._visible_keys()
        muted = Style(dim=True)
        if y < self.HEADER_H:  # key tokens, one character per line, downwards
            segments = [Segment(" " * (self.LABEL_W + 1))]
            if y == self.HEADER_H - 1:
                segments = [Segment("query ↓ key →".ljust(self.LABEL_W + 1)[: self.LABEL_W + 1], muted)]
            for k in keys:
                label = self._labels[k]
                ch = label[y] if y < len(label) else " "
                segments.append(Segment(ch.ljust(self.CELL_W), muted if k % 2 else None))
            return Strip(segments).crop(0, width).extend_cell_length(width)
        q = y - self.HEADER_H + int(self.scroll_offset.y)
        if q >= len(self.tokens):
            return Strip.blank(width)
        label = self._labels[q]
        label = (label[: self.LABEL_W - 1] + "…") if len(label) > self.LABEL_W else label.rjust(self.LABEL_W)
        label_style = Style(reverse=True) if q == self.query_row else None
        segments = [Segment(label, label_style), Segment(" ")]
        row = self._levels[q]
        blank = " " * self.CELL_W
        for k in keys:
            segments.append(Segment(blank, CELL_STYLES[row[k]]) if k <= q else Segment(blank))
        return Strip(segments).crop(0, width).extend_cell_length(width)


def attended_text(tokens: list[str], weights: np.ndarray, query: int) -> Text:
    """The tokens in order, each on the background of how much `query` attends to it (weights: the
    query's row); the query token underlined, later tokens dimmed."""
    text = Text()
    row_levels = levels(weights[: query + 1])
    bright = LEVELS * 2 // 3
    for k, token in enumerate(tokens):
        shown = displayable(token.replace("\r", ""))
        if k <= query:
            level = int(row_levels[k])
            style = Style(bgcolor=Color.from_rgb(*RAMP[level]), color="black" if level >= bright else "white")
            if k == query:
                style += Style(underline=True, bold=True, reverse=True)
        else:
            style = Style(dim=True)
        text.append(shown if shown else "∅", style)
    return text
