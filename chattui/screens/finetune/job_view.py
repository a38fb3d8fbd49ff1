"""The jobs: the list of every job (from the store and the job folders, kept in step with their progress files),
and one job's view (status, progress, loss chart, sample replies, log, and its buttons).

Both post typed messages for what the user asks (`JobList.Chosen`, `JobView.ChatRequested`, ...); the screen
acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on
from textual.containers import HorizontalScroll, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, OptionList, ProgressBar, Static
from textual.widgets.option_list import Option

from chattui import jobs
from chattui.catalog import display_name
from chattui.notices import store_errors_as_notices
from chattui.store import Store
from chattui.widgets.loss_chart import LossChart

LOG_LINES = 8
STATUS_MARKS = {"queued": "…", "running": "▶", "done": "✔", "failed": "✗", "cancelled": "■"}
STATUS_STYLES = {"done": "bold green", "failed": "bold red", "cancelled": "bold yellow"}


def job_name(config: dict[str, Any]) -> str:
    """What the jobs list calls a job: its data file, method and base model."""
    data = config.get("data") or [""]
    return f"{Path(data[0]).name} · {config.get('method', 'lora')} · {display_name(config.get('model', '?'))}"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def status_text(state: jobs.JobState) -> Text:
    """The job's status, why it ended, what it produced, and whether its loss had settled."""
    text = Text(f"{STATUS_MARKS.get(state.status, '?')} {state.status}", style=STATUS_STYLES.get(state.status, "bold"))
    if state.reason:
        text.append(f": {state.reason}")
    target = state.chat_target()
    if state.finished and target:
        text.append("   result: " + " + ".join(p for p in target if p), style="dim")
    if state.status == "done" and state.loss_still_falling():
        text.append("\nThe loss was still falling when the run ended: it has not settled. More steps (Max "
                    "steps) or a higher learning rate would likely teach it more.", style="yellow")
    return text


def stats_line(state: jobs.JobState) -> str:
    """Step, ETA, speed, and the latest losses and learning rate."""
    latest = state.latest or {}
    parts = [f"step {state.step}/{state.total_steps or '?'}"]
    if state.eta_s is not None:
        parts.append(f"ETA {human_duration(state.eta_s)}")
    if state.tokens_per_s is not None:
        parts.append(f"{state.tokens_per_s:,.0f} tok/s")
    if latest.get("loss") is not None:
        parts.append(f"loss {latest['loss']:.4f}")
    val = state.val_points()
    if val:
        parts.append(f"val loss {val[-1][1]:.4f}")
    if latest.get("lr") is not None:
        parts.append(f"lr {latest['lr']:.2e}")
    return " · ".join(parts)


def samples_text(record: dict[str, Any]) -> Text:
    """The replies at the newest evaluation (engine.finetune's "samples" record), each with the expected one."""
    which = "held-out prompts" if record.get("held_out") else "training prompts (no validation set)"
    text = Text(f"At step {record.get('step')}, greedy replies to {which}:\n", style="bold")
    for sample in record["samples"]:
        text.append(f"  prompt:   {sample.get('prompt', '')}\n")
        text.append(f"  model:    {sample.get('reply', '')}\n", style="cyan")
        text.append(f"  expected: {sample.get('expected', '')}\n", style="dim")
    return text


# -- the jobs list -------------------------------------------------------------------------------------------


class JobList(Vertical):
    """"New job" and every job; the jobs' states, read from their folders, and their rows in the store."""

    @dataclass
    class Chosen(Message):
        job_id: str

    class NewJobRequested(Message):
        pass

    def __init__(self, store: Store, jobs_dir: Path, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.store = store
        self.jobs_dir = jobs_dir
        self.states: dict[str, jobs.JobState] = {}
        self.missing: dict[str, str] = {}  # job id -> why its folder cannot be read
        self._labels: dict[str, Text] = {}

    def compose(self):
        yield Button("New job", id="ft-new", variant="primary")
        yield OptionList(id="ft-job-list")

    @store_errors_as_notices
    def load(self) -> None:
        """Jobs from the store and from the job folders (a folder the store lacks is added to it)."""
        for state in jobs.list_jobs(self.jobs_dir):
            self.states[state.id] = state
        known = {}
        for record in self.store.jobs():
            known[record.id] = record
            if record.id not in self.states:
                try:
                    self.states[record.id] = jobs.read_job(record.out_dir)
                except jobs.JobError as e:
                    self.missing[record.id] = str(e)
        for job_id, state in self.states.items():
            record = known.get(job_id)
            if record is None or record.status != state.status:
                self.store.save_job(job_id, name=record.name if record else job_name(state.config),
                                    status=state.status, out_dir=str(state.dir), base_model=state.base_model,
                                    created_at=state.created_at)
        self._rebuild()

    def add(self, state: jobs.JobState) -> None:
        """A job just started: saved in the store, listed and highlighted. Raises StoreError."""
        self.states[state.id] = state
        self.store.save_job(state.id, name=job_name(state.config), status=state.status, out_dir=str(state.dir),
                            base_model=state.base_model)
        self._rebuild(highlight=state.id)

    def replace(self, state: jobs.JobState) -> None:
        """The job's new state (it was resumed). Raises StoreError."""
        self.states[state.id] = state
        self.store.set_job_status(state.id, state.status)
        self._relabel(state.id)

    @store_errors_as_notices
    def poll(self, shown: str | None) -> None:
        """Read what unfinished jobs (and the one `shown`) appended to their progress files."""
        for job_id, state in list(self.states.items()):
            if state.finished and job_id != shown:
                continue
            before = (state.status, state.step)
            state.refresh()
            if state.status != before[0]:
                self.store.set_job_status(job_id, state.status)
            if (state.status, state.step) != before:
                self._relabel(job_id)

    def title_of(self, job_id: str) -> str:
        return self.store.job(job_id).name

    def _label(self, job_id: str) -> Text:
        record = self.store.job(job_id)
        state = self.states.get(job_id)
        text = Text()
        status = state.status if state else record.status
        text.append(f"{STATUS_MARKS.get(status, '?')} {record.name}\n", style="bold")
        if state is None:
            text.append(f"  {status} · folder missing", style="dim")
        else:
            text.append(f"  {status} · step {state.step}/{state.total_steps or '?'} · {job_id}", style="dim")
        return text

    def _rebuild(self, highlight: str | None = None) -> None:
        """List every job again, highlighting `highlight` (default: the job highlighted now)."""
        option_list = self.query_one("#ft-job-list", OptionList)
        if highlight is None and option_list.highlighted_option is not None:
            highlight = option_list.highlighted_option.id
        ids = [r.id for r in self.store.jobs()]
        self._labels = {i: self._label(i) for i in ids}
        option_list.clear_options()
        option_list.add_options([Option(self._labels[i], id=i) for i in ids])
        if highlight in ids:
            option_list.highlighted = ids.index(highlight)

    def _relabel(self, job_id: str) -> None:
        label = self._label(job_id)
        if self._labels.get(job_id) != label:
            self._labels[job_id] = label
            try:
                self.query_one("#ft-job-list", OptionList).replace_option_prompt(job_id, label)
            except Exception:  # not listed yet
                self._rebuild()

    @on(Button.Pressed, "#ft-new")
    def _new_job(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(self.NewJobRequested())

    @on(OptionList.OptionSelected, "#ft-job-list")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.post_message(self.Chosen(event.option.id))


# -- one job's view ------------------------------------------------------------------------------------------


class JobView(VerticalScroll):
    """One job as it trains or ended; its buttons post the requests below, enabled when they can be done."""

    @dataclass
    class CancelRequested(Message):
        state: jobs.JobState

    @dataclass
    class ResumeRequested(Message):
        state: jobs.JobState

    @dataclass
    class ChatRequested(Message):
        model: str  # the base model, or the merged model of a full fine-tune
        adapter: str | None  # the job's LoRA adapter, if it made one

    @dataclass
    class CompareRequested(Message):
        model: str
        adapter: str

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.state: jobs.JobState | None = None  # the job shown

    def compose(self):
        yield Static("", id="job-title", markup=False)
        yield Static("", id="job-status", markup=False)
        yield ProgressBar(id="job-progress", show_eta=False)
        yield Static("", id="job-stats", markup=False)
        with HorizontalScroll(classes="buttons"):  # above the chart: visible on a short terminal
            yield Button("Cancel", id="job-cancel", variant="error", compact=True)
            yield Button("Resume", id="job-resume", compact=True)
            yield Button("Chat with this", id="job-chat", variant="primary", compact=True)
            yield Button("Compare", id="job-compare", compact=True)
        yield LossChart(id="job-chart")
        yield Static("", id="job-samples", markup=False)
        yield Static("", id="job-log", markup=False)

    def show(self, state: jobs.JobState, name: str) -> None:
        """Draw `state` (the job called `name`), as it is now."""
        self.state = state
        self.query_one("#job-title", Static).update(
            Text.assemble((name, "bold"), f"\nbase {state.base_model}\nfolder {state.dir}")
        )
        self.query_one("#job-status", Static).update(status_text(state))
        # A job that ended before it knew its steps gets a still bar (None would animate as "in progress").
        bar_total = state.total_steps or (max(state.step, 1) if state.finished else None)
        self.query_one("#job-progress", ProgressBar).update(total=bar_total, progress=state.step)
        self.query_one("#job-stats", Static).update(stats_line(state))
        self.query_one("#job-chart", LossChart).set_points(state.loss_points(), state.val_points())
        samples = self.query_one("#job-samples", Static)
        samples.update(samples_text(state.samples) if state.samples else "")
        samples.display = state.samples is not None
        self.query_one("#job-log", Static).update("\n".join(jobs.log_tail(state.dir, LOG_LINES)) or "(no log yet)")
        self.query_one("#job-cancel", Button).disabled = state.status not in ("queued", "running")
        self.query_one("#job-resume", Button).disabled = state.status not in ("failed", "cancelled")
        target = state.chat_target()
        self.query_one("#job-chat", Button).disabled = target is None
        self.query_one("#job-compare", Button).disabled = target is None or target[1] is None
        if self.screen.focused is None:  # the focused button was just disabled (Cancel, Resume): stay in the view
            enabled = [b for b in self.query(Button).results(Button) if not b.disabled]
            self.screen.set_focus(enabled[0] if enabled else self)  # now, not after a refresh as focus() would

    @on(Button.Pressed, "#job-cancel")
    def _cancel(self, event: Button.Pressed) -> None:
        event.stop()
        if self.state is not None:
            self.post_message(self.CancelRequested(self.state))

    @on(Button.Pressed, "#job-resume")
    def _resume(self, event: Button.Pressed) -> None:
        event.stop()
        if self.state is not None:
            event.button.disabled = True  # one resume per press; the job's next state enables it again
            self.post_message(self.ResumeRequested(self.state))

    @on(Button.Pressed, "#job-chat")
    def _chat(self, event: Button.Pressed) -> None:
        event.stop()
        target = self.state.chat_target() if self.state else None
        if target is not None:
            self.post_message(self.ChatRequested(*target))

    @on(Button.Pressed, "#job-compare")
    def _compare(self, event: Button.Pressed) -> None:
        event.stop()
        target = self.state.chat_target() if self.state else None
        if target is not None and target[1] is not None:
            self.post_message(self.CompareRequested(*target))
