"""Terminal charts for the fine-tune screen: a braille line chart of training and validation loss with axes,
and a block histogram of token lengths. Drawing is plain functions returning rich Text (easy to test); the
widgets only hold the data and size."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.text import Text
from textual.widget import Widget

Point = tuple[float, float]  # (x, y): (step, loss)

# Braille cell: 2 dots wide, 4 high; the bit of the dot at (column, row).
_DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
BLOCKS = " ▁▂▃▄▅▆▇█"


def _fmt(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 10000:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:.1e}"


def _line(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """The pixels from (x0, y0) to (x1, y1), Bresenham."""
    pixels = []
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        pixels.append((x0, y0))
        if x0 == x1 and y0 == y1:
            return pixels
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def line_chart(series: Sequence[tuple[str, str, Sequence[Point]]], width: int, height: int) -> Text:
    """A braille line chart of series (name, style, points) in width x height cells, a y axis with the
    high, middle and low values on the left, an x axis with the first and last x below, and a legend."""
    points = [p for _, _, pts in series for p in pts if math.isfinite(p[1])]
    if not points:
        return Text("no loss values yet", style="dim")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    labels = [_fmt(y_hi), _fmt((y_hi + y_lo) / 2), _fmt(y_lo)]
    margin = max(len(s) for s in labels) + 1
    cols, rows = max(4, width - margin - 1), max(2, height - 2)  # -1 for the axis, -2 for x labels + legend
    px_w, px_h = cols * 2, rows * 4
    cells: dict[tuple[int, int], list] = {}  # (row, col) -> [bits, style]

    def pixel(x: float, y: float) -> tuple[int, int]:
        fx = 0.0 if x_hi == x_lo else (x - x_lo) / (x_hi - x_lo)
        fy = (y - y_lo) / (y_hi - y_lo)
        return round(fx * (px_w - 1)), round((1 - fy) * (px_h - 1))

    for _, style, pts in series:
        pts = [p for p in pts if math.isfinite(p[1])]
        pixels = [pixel(*p) for p in pts]
        path = pixels[:1]
        for a, b in zip(pixels, pixels[1:]):
            path += _line(*a, *b)[1:]
        for px, py in path:
            cell = cells.setdefault((py // 4, px // 2), [0, style])
            cell[0] |= _DOTS[py % 4][px % 2]
            cell[1] = style
    text = Text()
    label_rows = {0: labels[0], rows // 2: labels[1], rows - 1: labels[2]}
    for row in range(rows):
        text.append(label_rows.get(row, "").rjust(margin - 1) + " ", style="dim")
        text.append("┤" if row in label_rows else "│", style="dim")
        for col in range(cols):
            bits, style = cells.get((row, col), (0, ""))
            text.append(chr(0x2800 + bits) if bits else " ", style=style)
        text.append("\n")
    first, last = _fmt(x_lo), _fmt(x_hi)
    text.append(" " * margin + "└" + first + " " * max(1, cols - len(first) - len(last)) + last + "\n", style="dim")
    text.append(" " * margin + " ")
    for i, (name, style, pts) in enumerate(series):
        if i:
            text.append("   ")
        text.append("⣿ ", style=style)
        text.append(f"{name}" + (f" {_fmt(pts[-1][1])}" if pts else " —"))
    text.append("   step", style="dim")
    return text


def histogram(bins: Sequence[Sequence[int]], width: int, marker: int | None = None) -> Text:
    """One bar per (from, to, count) bin, scaled to width; bins at or beyond `marker` (max_seq_len) are
    drawn in red: those examples get truncated."""
    bins = [tuple(b) for b in bins]
    if not bins:
        return Text("no examples", style="dim")
    top = max(c for _, _, c in bins) or 1
    label_w = max(len(f"{lo}–{hi - 1}") for lo, hi, _ in bins)
    count_w = max(len(str(c)) for _, _, c in bins)
    bar_w = max(4, width - label_w - count_w - 3)
    text = Text()
    for lo, hi, count in bins:
        eighths = round(count / top * bar_w * 8)
        bar = "█" * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")
        cut = marker is not None and hi - 1 > marker
        text.append(f"{lo}–{hi - 1}".rjust(label_w) + " ", style="dim")
        text.append(bar.ljust(bar_w), style="red" if cut else "green")
        text.append(" " + str(count).rjust(count_w) + "\n")
    text.rstrip()
    return text


class LossChart(Widget):
    """Training and validation loss against the step; call set_points() as progress arrives."""

    DEFAULT_CSS = """
    LossChart { height: 12; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.train: list[Point] = []
        self.val: list[Point] = []

    def set_points(self, train: Sequence[Point], val: Sequence[Point]) -> None:
        train, val = list(train), list(val)
        if (train, val) != (self.train, self.val):
            self.train, self.val = train, val
            self.refresh()

    def render(self) -> Text:
        size = self.content_size
        return line_chart(
            [("train", "bold cyan", self.train), ("val", "bold magenta", self.val)],
            max(size.width, 20), max(size.height, 5),
        )
