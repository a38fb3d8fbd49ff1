"""The line above the footer: model, parameters, device/dtype, context gauge, last reply's speed,
and a progress bar while a model loads."""

from __future__ import annotations

from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar

from chattui.catalog import human_count


class StatusBar(Horizontal):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_text = "no model"
        self.context_text = ""
        self.speed_text = ""
        self.loading_text = ""
        self.dropped_text = ""

    def compose(self):
        yield Label(self.model_text, id="status-model", markup=False)
        yield Label("", id="status-loading", markup=False)
        yield ProgressBar(total=None, show_eta=False, id="status-load-bar")
        yield Label("ctx", id="status-context")
        yield ProgressBar(total=1, show_eta=False, show_percentage=False, id="status-gauge")
        yield Label("", id="status-dropped", markup=False)
        yield Label("", id="status-speed")

    def on_mount(self) -> None:
        self._show_loading(False)
        self.show_dropped(0)

    def _show_loading(self, loading: bool) -> None:
        self.query_one("#status-loading").display = loading
        self.query_one("#status-load-bar").display = loading

    def show_model(self, info) -> None:
        """info: a backend.ModelInfo, or None for no model."""
        if info is None:
            self.model_text = "no model · ctrl+o to choose one"
        else:
            self.model_text = (
                f"{info.name} · {human_count(info.parameters)} params · {info.device}/{info.dtype}"
            )
        self.query_one("#status-model", Label).update(self.model_text)

    def show_loading(self, name: str | None, done: int = 0, total: int | None = None, note: str | None = None) -> None:
        """Loading progress in bytes (total None or 0: not reading weights yet); name None hides it. note: a
        slow step before the weights, shown instead ("compiling CPU kernels, once")."""
        if name is None:
            self.loading_text = ""
            self._show_loading(False)
            return
        self._show_loading(True)
        self.loading_text = f"loading {name}: {note}" if note else f"loading {name}"
        self.query_one("#status-loading", Label).update(self.loading_text)
        self.query_one("#status-load-bar", ProgressBar).update(total=total or None, progress=done)

    def show_context(self, used: int, maximum: int | None) -> None:
        gauge = self.query_one("#status-gauge", ProgressBar)
        if not maximum:
            self.context_text = "ctx –"
            gauge.update(total=1, progress=0)
        else:
            self.context_text = f"ctx {used}/{maximum}"
            gauge.update(total=maximum, progress=min(used, maximum))
        self.query_one("#status-context", Label).update(self.context_text)

    def show_dropped(self, count: int) -> None:
        """How many of the oldest messages the last prompt left out to fit the context (0 hides it)."""
        self.dropped_text = f"⚠ {count} oldest message(s) left out" if count else ""
        label = self.query_one("#status-dropped", Label)
        label.update(self.dropped_text)
        label.display = bool(count)

    def show_speed(self, ttft_s: float | None, tokens_per_s: float | None) -> None:
        if ttft_s is None:
            self.speed_text = ""
        else:
            self.speed_text = f"TTFT {ttft_s:.2f} s · {tokens_per_s or 0:.1f} tok/s"
        self.query_one("#status-speed", Label).update(self.speed_text)
