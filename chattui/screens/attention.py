"""The attention screen: what every layer and head of the model attends to, for a conversation up to
one message.

The capture and every matrix shown are computed in thread workers that post results as messages (a
1,024-token layer takes a moment on CPU, and waits while a reply is being generated on the model); the
screen only ever holds the backend's AttentionView and numpy arrays. Views:
heatmap (query x key), text (the conversation coloured by one query token's attention), heads (a
layers x heads table of entropy, mean distance and most-attended token) and live (what each new
token of the reply being written attended to, fed by the chat screen's LiveAttention).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import ContentSwitcher, DataTable, Footer, Label, Static

from chattui.backend import AttentionView, Backend, BackendError, Prompt
from chattui.context import ScreenContext
from chattui.paths import write_text_atomic
from chattui.widgets.heatmap import Heatmap, attended_text, legend, token_label

log = logging.getLogger(__name__)

VIEWS = ("heatmap", "text", "heads", "live")
AGGREGATIONS = ("head", "mean", "max", "rollout")
AGGREGATION_NAMES = {"head": "one head", "mean": "mean over heads", "max": "max over heads",
                     "rollout": "rollout to this layer"}
LIVE_REFRESH_S = 0.25  # the live view redraws at most this often, however fast tokens come
LIVE_HISTORY = 12  # generated tokens listed in the live view


def aggregate(maps: AttentionView, layer: int, head: int, aggregation: str) -> np.ndarray:
    """The (T, T) matrix shown for a layer/head/aggregation choice."""
    if aggregation == "head":
        return maps.head(layer, head)
    if aggregation == "mean":
        return maps.mean_over_heads(layer)
    if aggregation == "max":
        return maps.max_over_heads(layer)
    if aggregation == "rollout":
        return maps.rollout(layer)
    raise ValueError(f"unknown aggregation {aggregation!r}")


class LiveAttention:
    """Receives the reply thread's attention rows (called from that thread) and keeps only what the
    live view shows: the newest (layers, heads, S) rows and, per generated token, its top keys."""

    def __init__(self) -> None:
        self.reply_id: int | None = None
        self.rows: np.ndarray | None = None
        self.prompt_tokens: list[str] = []
        self.count = 0  # rows received for this reply: one per forward, each choosing the next token
        self.history: list[list[tuple[int, float]]] = []  # per generated token: (key, mean weight) top 3
        self.reply_tokens: int | None = None  # set when the reply ends: its tokens, the end token not counted

    def start(self, reply_id: int):
        self.reply_id, self.rows, self.count, self.history, self.reply_tokens = reply_id, None, 0, [], None
        return self.receive

    def finish(self, reply_id: int, generated_tokens: int | None) -> None:
        """The reply ended with generated_tokens tokens; a row beyond them chose the end token, not a reply token."""
        if reply_id == self.reply_id and generated_tokens is not None:
            self.reply_tokens = generated_tokens

    @property
    def chose_end(self) -> bool:
        """Whether the newest row is the forward that chose the end token."""
        return self.reply_tokens is not None and self.count > self.reply_tokens

    def receive(self, rows: np.ndarray, prompt_tokens: list[str]) -> None:
        mean = rows.mean(axis=(0, 1))  # (S,)
        top = np.argsort(mean)[::-1][:3]
        self.history = (self.history + [[(int(k), float(mean[k])) for k in top]])[-LIVE_HISTORY:]
        self.prompt_tokens = prompt_tokens
        self.rows = rows  # replaced whole: the UI thread reads a consistent array
        self.count += 1

    def token(self, position: int) -> str:
        if position < len(self.prompt_tokens):
            return self.prompt_tokens[position]
        return f"⟨gen {position - len(self.prompt_tokens) + 1}⟩"


class AttentionScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("right_square_bracket", "layer(1)", "Layer+"),
        Binding("left_square_bracket", "layer(-1)", "Layer-"),
        Binding("full_stop", "head(1)", "Head+"),
        Binding("comma", "head(-1)", "Head-"),
        Binding("v", "next_view", "View"),
        Binding("a", "next_aggregation", "Aggregate"),
        Binding("left", "query(-1)", "Query←"),  # the text view; the heatmap scrolls sideways instead
        Binding("right", "query(1)", "Query→"),
        Binding("c", "export('csv')", "CSV"),
        Binding("j", "export('json')", "JSON"),
        Binding("s", "screenshot", "SVG"),
    ]

    @dataclass
    class Captured(Message):
        maps: AttentionView

    @dataclass
    class CaptureFailed(Message):
        error: str

    @dataclass
    class MatrixReady(Message):
        key: tuple[int, int, str]  # (layer, head, aggregation)
        matrix: np.ndarray

    @dataclass
    class SummariesReady(Message):
        summaries: list  # per layer: list of HeadSummary

    def __init__(self, context: ScreenContext, prompt: Prompt, title: str = "", *, view: str = "heatmap",
                 live: LiveAttention | None = None) -> None:
        super().__init__()
        self.context = context  # the backend computes the maps; exports go to its export_dir
        self.prompt = prompt
        self.subject = title
        self.maps = None
        self.layer_index = 0
        self.head = 0
        self.aggregation = "head"
        self.view = view if view in VIEWS else "heatmap"
        self.query_index = 0
        self.matrix: np.ndarray | None = None  # what the heatmap and text view show
        self.shown: tuple[int, int, str] | None = None  # its (layer, head, aggregation)
        self.summaries: list | None = None
        self.live = live
        self.error: str | None = None
        self.busy = False  # a capture or matrix is being computed
        self._live_seen: tuple[int, bool] | None = None  # (rows, chose_end) last drawn

    def compose(self):
        with Vertical(id="attention"):
            yield Label("", id="attention-title", markup=False)
            yield Static("", id="attention-state", markup=False)
            with ContentSwitcher(initial=self.view, id="attention-views"):
                yield Heatmap(id="heatmap")
                with VerticalScroll(id="text", can_focus=False):
                    yield Static("", id="attention-text")
                yield DataTable(id="heads", cursor_type="cell", zebra_stripes=True)
                with VerticalScroll(id="live", can_focus=False):
                    yield Static("", id="live-body")
            yield Static(legend(), id="attention-legend")
        yield Footer()

    def on_mount(self) -> None:
        title = f"Attention · {self.subject}" if self.subject else "Attention"
        self.query_one("#attention-title", Label).update(title)
        self.switch_view(self.view)
        self._show_state("computing attention…")
        self._set_busy(True)
        self._capture(self.context.backend, self.prompt)
        self.set_interval(LIVE_REFRESH_S, self._refresh_live)
        self._refresh_live()

    @property
    def views(self) -> ContentSwitcher:
        return self.query_one("#attention-views", ContentSwitcher)

    def _set_busy(self, busy: bool) -> None:
        """The loading indicator over the computed views (not the live one, which has its own data)."""
        self.busy = busy
        for widget in (self.heatmap, self.query_one("#text"), self.table):
            widget.loading = busy
        self.refresh_bindings()  # the footer again shows the keys of the view under the loading indicator

    @property
    def heatmap(self) -> Heatmap:
        return self.query_one("#heatmap", Heatmap)

    @property
    def table(self) -> DataTable:
        return self.query_one("#heads", DataTable)

    # -- workers ---------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="attention-capture")
    def _capture(self, backend: Backend, prompt: Prompt) -> None:
        try:
            maps = backend.attention(prompt)
        except BackendError as e:
            self.post_message(self.CaptureFailed(str(e)))
        except Exception as e:  # an engine bug must not take the UI down
            log.exception("attention capture failed")
            self.post_message(self.CaptureFailed(f"{type(e).__name__}: {e}"))
        else:
            self.post_message(self.Captured(maps))

    @work(thread=True, exclusive=True, group="attention-matrix")
    def _compute(self, maps: AttentionView, key: tuple[int, int, str]) -> None:
        try:
            matrix = np.asarray(aggregate(maps, *key), dtype=np.float32)
        except Exception as e:
            log.exception("attention matrix failed")
            self.post_message(self.CaptureFailed(f"{type(e).__name__}: {e}"))
            return
        self.post_message(self.MatrixReady(key, matrix))

    @work(thread=True, exclusive=True, group="attention-summaries")
    def _summarise(self, maps: AttentionView) -> None:
        try:
            summaries = [maps.head_summaries(layer) for layer in range(maps.num_layers)]
        except Exception as e:
            log.exception("head summaries failed")
            self.post_message(self.CaptureFailed(f"{type(e).__name__}: {e}"))
            return
        self.post_message(self.SummariesReady(summaries))

    # -- results ---------------------------------------------------------------------------------

    def on_attention_screen_captured(self, message: Captured) -> None:
        maps = self.maps = message.maps
        self.query_index = len(maps.tokens) - 1
        if maps.truncated:
            self.notify(
                f"This conversation is longer than the capture limit: its first {maps.truncated} tokens are left "
                f"out; the last {len(maps.tokens)} are shown.", title="Attention", severity="warning", timeout=15,
                markup=False,
            )
        self._request()
        self._summarise(maps)

    def on_attention_screen_capture_failed(self, message: CaptureFailed) -> None:
        self.error = message.error
        self._set_busy(False)
        self._show_state(f"Could not compute attention: {message.error}")
        self.notify(message.error, title="Attention failed", severity="error", timeout=15, markup=False)

    def on_attention_screen_matrix_ready(self, message: MatrixReady) -> None:
        if message.key != self._key():
            return  # the user moved on meanwhile; a newer request is under way
        self.matrix, self.shown = message.matrix, message.key
        self._set_busy(False)
        self._redraw()

    def on_attention_screen_summaries_ready(self, message: SummariesReady) -> None:
        self.summaries = message.summaries
        table = self.table
        table.clear(columns=True)
        heads = len(message.summaries[0]) if message.summaries else 0
        table.add_columns(*[f"head {h}  entropy·dist·top" for h in range(heads)])
        tokens = self.maps.tokens
        for layer, row in enumerate(message.summaries):
            cells = [f"{s.entropy:5.2f} · {s.mean_distance:5.1f} · {token_label(tokens[s.top_key])[:10]}"
                     for s in row]
            table.add_row(*cells, label=f"layer {layer}", key=str(layer))

    @on(DataTable.CellSelected, "#heads")
    def _head_chosen(self, event: DataTable.CellSelected) -> None:
        self.open_head(event.coordinate.row, event.coordinate.column)

    def open_head(self, layer: int, head: int) -> None:
        self.layer_index, self.head, self.aggregation = layer, head, "head"
        self.switch_view("heatmap")
        self._request()

    # -- state -----------------------------------------------------------------------------------

    def _key(self) -> tuple[int, int, str]:
        return (self.layer_index, self.head, self.aggregation)

    def _request(self) -> None:
        if self.maps is None:
            return
        self._show_state()
        if self.shown == self._key():
            return
        self._set_busy(True)
        self._compute(self.maps, self._key())

    def _show_state(self, note: str = "") -> None:
        maps = self.maps
        if maps is None:
            text = note
        else:
            head = f"head {self.head}/{maps.num_heads - 1}" if self.aggregation == "head" else "all heads"
            text = (f"{self.view} · layer {self.layer_index}/{maps.num_layers - 1} · {head} · "
                    f"{AGGREGATION_NAMES[self.aggregation]} · {len(maps.tokens)} tokens")
            if maps.truncated:
                text += f" (first {maps.truncated} left out)"
            if self.view == "text":
                text += f" · query {self.query_index}: {token_label(maps.tokens[self.query_index])!r} (←/→)"
            if note:
                text += f" · {note}"
        self.query_one("#attention-state", Static).update(text)

    def _redraw(self) -> None:
        self._show_state()
        if self.matrix is None or self.maps is None:
            return
        if self.view == "heatmap":
            self.heatmap.query_row = self.query_index
            self.heatmap.show(self.matrix, self.maps.tokens)
        elif self.view == "text":
            self.query_one("#attention-text", Static).update(
                attended_text(self.maps.tokens, self.matrix[self.query_index], self.query_index)
            )

    def switch_view(self, view: str) -> None:
        self.view = view
        self.views.current = view
        focus = {"heatmap": self.heatmap, "heads": self.table}.get(view)
        if focus is not None:
            focus.focus()
        self._redraw()
        self._refresh_live()

    # -- actions ---------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "query":
            return self.view == "text" and self.maps is not None
        if action in ("export", "screenshot"):
            return True if self.matrix is not None or action == "screenshot" else None
        return True

    def action_layer(self, step: int) -> None:
        if self.maps is not None:
            self.layer_index = (self.layer_index + step) % self.maps.num_layers
            self._request()

    def action_head(self, step: int) -> None:
        if self.maps is not None:
            self.head = (self.head + step) % self.maps.num_heads
            if self.aggregation != "head":
                self.aggregation = "head"
            self._request()

    def action_next_view(self) -> None:
        self.switch_view(VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)])

    def action_next_aggregation(self) -> None:
        self.aggregation = AGGREGATIONS[(AGGREGATIONS.index(self.aggregation) + 1) % len(AGGREGATIONS)]
        self._request()

    def action_query(self, step: int) -> None:
        self.query_index = min(max(self.query_index + step, 0), len(self.maps.tokens) - 1)
        self._redraw()

    # -- export ----------------------------------------------------------------------------------

    def _stem(self) -> str:
        layer, head, aggregation = self.shown
        what = {"head": f"L{layer}-H{head}", "rollout": f"rollout-L{layer}"}.get(aggregation, f"L{layer}-{aggregation}")
        return f"attention-{time.strftime('%Y%m%d-%H%M%S')}-{what}"

    def action_export(self, fmt: str) -> None:
        if self.matrix is None or self.maps is None:
            self.notify("Nothing to export yet", severity="warning")
            return
        layer, head, aggregation = self.shown
        tokens = self.maps.tokens
        if fmt == "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(["query\\key", *tokens])
            for token, row in zip(tokens, self.matrix):
                writer.writerow([token, *(f"{w:.9g}" for w in row)])
            data = buffer.getvalue()
        else:
            data = json.dumps({
                "layer": layer, "head": head if aggregation == "head" else None, "aggregation": aggregation,
                "tokens": tokens, "token_ids": list(self.maps.token_ids), "truncated": self.maps.truncated,
                "dims": ["query", "key"], "attention": self.matrix.tolist(),
            }, ensure_ascii=False)
        try:
            path = self.context.export_dir / f"{self._stem()}.{fmt}"
            write_text_atomic(path, data)
        except OSError as e:
            self.notify(f"Export failed: {e}", title="Attention", severity="error", markup=False)
            return
        self.context.last_export = path
        self.notify(f"Exported the shown matrix to {path}", title="Attention", timeout=15, markup=False)

    def action_screenshot(self) -> None:
        try:
            folder = self.context.export_dir
            folder.mkdir(parents=True, exist_ok=True)
            stem = self._stem() if self.shown else f"attention-{time.strftime('%Y%m%d-%H%M%S')}"
            path = Path(self.app.save_screenshot(filename=f"{stem}.svg", path=str(folder)))
        except OSError as e:
            self.notify(f"Screenshot failed: {e}", title="Attention", severity="error", markup=False)
            return
        self.context.last_export = path
        self.notify(f"Screenshot saved to {path}", title="Attention", timeout=15, markup=False)

    # -- live ------------------------------------------------------------------------------------

    def _refresh_live(self) -> None:
        """Polled: redraw the live view when new rows came (at most every LIVE_REFRESH_S)."""
        if self.view != "live":
            return
        body = self.query_one("#live-body", Static)
        live = self.live
        if live is None:
            body.update("Live attention is off. In the chat, press f3 (or “Live attention” in ctrl+p) and the "
                        "next replies record what each new token attended to.")
            return
        rows = live.rows
        if rows is None:
            body.update("Live attention is on: it shows here while a reply is being written.")
            self._live_seen = None
            return
        seen = (live.count, live.chose_end)
        if seen == self._live_seen:
            return
        self._live_seen = seen
        layer = min(self.layer_index, rows.shape[0] - 1)
        if self.aggregation == "head":
            row = rows[layer, min(self.head, rows.shape[1] - 1)]
            what = f"layer {layer}, head {min(self.head, rows.shape[1] - 1)}"
        else:
            row = rows[layer].mean(axis=0)
            what = f"layer {layer}, mean over heads"
        S = row.shape[0]
        if live.chose_end:
            text = Text(f"The end token, after the reply's {live.reply_tokens} tokens, was chosen from {S} positions "
                        f"({what}):\n\n")
        else:
            text = Text(f"Token {live.count} of the reply chose from {S} positions ({what}):\n\n")
        tokens = [token_label(live.token(k)) for k in range(S)]
        text.append_text(attended_text(tokens, row, S - 1))
        text.append("\n\nRecent tokens, most attended (all layers and heads):\n")
        for i, top in enumerate(live.history, start=max(1, live.count - len(live.history) + 1)):
            name = "end" if live.chose_end and i == live.count else f"#{i}"
            text.append(f"  {name}: " + ", ".join(f"{token_label(live.token(k))!r} {w:.2f}" for k, w in top) + "\n")
        body.update(text)
