"""The fine-tune screen: a form to start a LoRA or full fine-tune job, the list of jobs, and a job's view.

Jobs run as detached processes (chattui.jobs): the UI only writes the job's folder and then tails its
progress.jsonl on a timer, so training never blocks or crashes the UI, and closing the app leaves jobs
running; reopening lists them again from the store (the jobs table) and the job folders. The data preview
reads the file with the model's tokenizer in a thread (chattui.backend.inspect_data).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, HorizontalScroll, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import (
    Button, ContentSwitcher, Footer, Input, Label, Markdown, OptionList, ProgressBar, Select, Static,
)
from textual.widgets.markdown import MarkdownStream
from textual.widgets.option_list import Option

from chattui import jobs
from chattui.backend import BackendError, inspect_data
from chattui.catalog import display_name, human_count, is_gguf_file, model_label
from chattui.notices import store_errors_as_notices
from chattui.widgets.loss_chart import LossChart, histogram

POLL_S = 0.5  # how often running jobs' progress files are read
LOG_LINES = 8
STATUS_MARKS = {"queued": "…", "running": "▶", "done": "✔", "failed": "✗", "cancelled": "■"}


# -- the form's settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    key: str  # the JobConfig field
    label: str
    default: str  # what the input starts with ("" = the engine decides)
    kind: type  # int or float
    low: float  # smallest allowed value
    low_open: bool = False  # low itself is not allowed
    high: float | None = None  # values must stay below this
    optional: bool = False  # blank means "the engine's default"


FIELDS = (
    Field("epochs", "Epochs (blank: auto)", "", int, 1, optional=True),
    Field("max_steps", "Max steps (0: epochs)", "0", int, 0),
    Field("lr", "Learning rate (blank: auto)", "", float, 0, low_open=True, optional=True),
    Field("batch_size", "Batch size", "8", int, 1),
    Field("grad_accum", "Grad accumulation", "1", int, 1),
    Field("max_seq_len", "Max seq len (0: auto)", "0", int, 0),
    Field("lora_rank", "LoRA rank", "8", int, 1),
    Field("lora_alpha", "LoRA alpha", "16", float, 0, low_open=True),
    Field("lora_dropout", "LoRA dropout", "0.05", float, 0, high=1),
    Field("val_fraction", "Validation share (blank: auto)", "", float, 0, high=1, optional=True),
    Field("seed", "Seed", "0", int, 0),
)
CHOICES = {
    "method": (("LoRA (base frozen, small adapter)", "lora"), ("Full fine-tune (every weight)", "full")),
    "device": (("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda")),
    "precision": (("auto (bf16 where fast)", "auto"), ("bf16", "bf16"), ("fp32", "fp32")),
}


def _number(field: Field, raw: str) -> tuple[Any, str | None]:
    """(value, error) for one hyperparameter's text."""
    raw = raw.strip()
    if not raw:
        return (None, None) if field.optional else (None, f"{field.label}: required")
    try:
        value = int(raw) if field.kind is int else float(raw)
    except ValueError:
        return None, f"{field.label}: {raw!r} is not {'a whole number' if field.kind is int else 'a number'}"
    if field.kind is float and value != value:
        return None, f"{field.label}: not a number"
    if value < field.low or (field.low_open and value == field.low):
        return None, f"{field.label}: must be {'>' if field.low_open else '>='} {field.low:g}"
    if field.high is not None and value >= field.high:
        return None, f"{field.label}: must be below {field.high:g}"
    return value, None


def validate_form(values: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The job config for the form's texts, and {field key: error message} (empty when it can start)."""
    config: dict[str, Any] = {}
    errors: dict[str, str] = {}
    model = values.get("model", "").strip()
    model_path = Path(model).expanduser()
    if not model:
        errors["model"] = "Base model: choose a model folder or a .gguf file"
    elif model_path.is_file() and is_gguf_file(model_path):
        config["model"] = str(model_path)
        if values.get("method", "lora") != "lora":
            errors["model"] = "Base model: a GGUF base trains a LoRA adapter only (choose LoRA)"
    elif not (model_path / "config.json").is_file():
        errors["model"] = f"Base model: {model} has no config.json and is not a .gguf file"
    else:
        config["model"] = str(model_path)
    data = values.get("data", "").strip()
    if not data:
        errors["data"] = "Data file: give a JSONL file"
    elif not Path(data).expanduser().is_file():
        errors["data"] = f"Data file: {data} not found"
    else:
        config["data"] = [str(Path(data).expanduser())]
    for key in CHOICES:
        config[key] = values.get(key) or CHOICES[key][0][1]
    for field in FIELDS:
        value, error = _number(field, values.get(field.key, field.default))
        if error:
            errors[field.key] = error
        elif value is not None:
            config[field.key] = value
    if config.get("method") == "full":
        for key in ("lora_rank", "lora_alpha", "lora_dropout"):
            errors.pop(key, None)
            config.pop(key, None)
    if "batch_size" in config and "grad_accum" not in errors and config["batch_size"] > 4096:
        errors["batch_size"] = "Batch size: at most 4096"
    return config, errors


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def record_lines(record: dict[str, Any], width: int) -> list[str]:
    """One data record for the preview, a line per message ("role: content"), each cut to width."""
    if record.get("messages") is None:
        turns = [("text", record.get("text") or "")]
    else:
        turns = [(m.get("role", "?"), str(m.get("content", ""))) for m in record["messages"]]
    lines = []
    for role, content in turns:
        line = f"{role}: " + " ".join(content.split())
        lines.append(line if len(line) <= width else line[: width - 1] + "…")
    return lines


def preview_text(report: dict[str, Any], width: int = 60) -> Text:
    """The data preview: records and format per file, the first records, examples, token lengths, truncation,
    a histogram."""
    text = Text()
    for f in report["files"]:
        text.append(f"{Path(f['path']).name}: ", style="bold")
        text.append(f"{f['records']} records · format {f['format']}\n")
    for record in report.get("first_records", []):
        text.append(f"line {record['line']}:\n", style="dim")
        for line in record_lines(record, width - 2):
            text.append(f"  {line}\n")
    text.append(
        f"{report['train_examples']} examples · {report['train_target_tokens']} tokens with a loss · token lengths "
        f"{report['length_min']}–{report['length_max']} (mean {report['length_mean']:.0f})\n"
    )
    truncated = report["truncated"]
    text.append(
        f"{truncated} will be truncated to {report['max_seq_len']} tokens" + (
            f", {report['dropped']} dropped (nothing left to train on)" if report["dropped"] else ""
        ) + "\n",
        style="yellow" if truncated else "green",
    )
    text.append_text(histogram(report["length_histogram"], width, marker=report["max_seq_len"]))
    if report.get("plan"):
        text.append("\n" + plan_text(report["plan"]) + "\n", style="bold")
    return text


def plan_text(plan: dict[str, Any]) -> str:
    """The learning rate and steps a job will use (engine.finetune.preview_plan), saying which were chosen for you."""
    lr = f"learning rate {plan['lr']:.2g}"
    if plan["lr_auto"]:
        lr += f" (auto: {plan['method']} on {human_count(plan['parameters'])} parameters)"
    steps = f"{plan['total_steps']} steps"
    if plan["epochs"] is not None:
        steps += f" = {plan['epochs']} epochs × {plan['steps_per_epoch']}"
        if plan["epochs_auto"]:
            steps += " (auto: a small data set is repeated for enough steps to learn from)"
    held = f" · {plan['val_examples']} held out for validation" if plan["val_examples"] else " · none held out"
    return f"Plan: {lr} · {steps} · batch {plan['batch_size']}{held}"


def samples_text(record: dict[str, Any]) -> Text:
    """The replies at the newest evaluation (engine.finetune's "samples" record), each with the expected one."""
    which = "held-out prompts" if record.get("held_out") else "training prompts (no validation set)"
    text = Text(f"At step {record.get('step')}, greedy replies to {which}:\n", style="bold")
    for sample in record["samples"]:
        text.append(f"  prompt:   {sample.get('prompt', '')}\n")
        text.append(f"  model:    {sample.get('reply', '')}\n", style="cyan")
        text.append(f"  expected: {sample.get('expected', '')}\n", style="dim")
    return text


def is_loaded(app, model: str, adapter: str | None) -> bool:
    """Whether the app's current model is `model` with exactly `adapter` (None: no adapter)."""
    info = getattr(app, "model", None)
    if info is None or Path(info.path).resolve() != Path(model).resolve():
        return False
    if adapter is None or info.adapter is None:
        return adapter is None and info.adapter is None
    return Path(info.adapter).resolve() == Path(adapter).resolve()


def job_name(config: dict[str, Any]) -> str:
    data = config.get("data") or [""]
    return f"{Path(data[0]).name} · {config.get('method', 'lora')} · {display_name(config.get('model', '?'))}"


# -- the screen --------------------------------------------------------------------------------------------


class FinetuneScreen(Screen):
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]  # chattui.tcss narrows the columns below 120
    BINDINGS = [
        Binding("escape", "back", "Back to chat"),
        Binding("ctrl+n", "new_job", "New job"),
    ]

    @dataclass
    class Previewed(Message):
        model: str
        data: str
        report: dict[str, Any] | None
        error: str | None = None

    @dataclass
    class Resumed(Message):
        job_id: str
        state: jobs.JobState | None
        error: str | None = None

    def __init__(self, jobs_dir: Path | None = None) -> None:
        super().__init__()
        self.jobs_dir = Path(jobs_dir) if jobs_dir else jobs.jobs_root()
        self.states: dict[str, jobs.JobState] = {}
        self.missing: dict[str, str] = {}  # job id -> why its folder cannot be read
        self.current: str | None = None  # the job shown
        self.preview: dict[str, Any] | None = None  # the last data report
        self.rejected: tuple[str, str] | None = None  # (model, data) the preview refused: Start waits for a change
        self._labels: dict[str, Text] = {}

    def compose(self):
        with Horizontal(id="ft-body"):
            with Vertical(id="ft-jobs"):
                yield Button("New job", id="ft-new", variant="primary")
                yield OptionList(id="ft-job-list")
            with ContentSwitcher(id="ft-main", initial="ft-form"):
                with VerticalScroll(id="ft-form"):
                    yield Label("New fine-tune job", classes="dialog-title")
                    with Horizontal(classes="ft-row"):
                        yield Label("Base model", classes="ft-label")
                        yield Input(placeholder="model folder (Hugging Face format)", id="ft-model")
                        yield Button("Choose…", id="ft-choose")
                    with Horizontal(classes="ft-row"):
                        yield Label("Data (JSONL)", classes="ft-label")
                        yield Input(placeholder="chat, instruction or text records, one per line", id="ft-data")
                        yield Button("Preview", id="ft-preview-button")
                    yield Static("", id="ft-preview", markup=False)
                    for key, options in CHOICES.items():
                        with Horizontal(classes="ft-row"):
                            yield Label(key.capitalize(), classes="ft-label")
                            yield Select(options, value=options[0][1], allow_blank=False, id=f"ft-{key}")
                    with Vertical(id="ft-grid"):
                        for field in FIELDS:
                            with Horizontal(classes="ft-row", id=f"ft-row-{field.key}"):
                                yield Label(field.label, classes="ft-label")
                                yield Input(field.default, id=f"ft-{field.key}", classes="ft-number")
                    yield Static("", id="ft-errors", markup=False)
                    yield Button("Start", id="ft-start", variant="success")
                with VerticalScroll(id="ft-job"):
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
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#ft-errors").display = False
        self.query_one("#ft-preview").display = False
        model = getattr(self.app, "model", None)
        if model is not None:
            self.query_one("#ft-model", Input).value = model.path
        self._toggle_lora_fields()
        self.load_jobs()
        self.set_interval(POLL_S, self.poll)

    # -- the jobs list ---------------------------------------------------------------------------------

    @property
    def store(self):
        return self.app.store

    @store_errors_as_notices
    def load_jobs(self) -> None:
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
        self._rebuild_list()

    def _label(self, job_id: str) -> Text:
        record = self.store.job(job_id)
        state = self.states.get(job_id)
        text = Text()
        status = state.status if state else record.status
        text.append(f"{STATUS_MARKS.get(status, '?')} {record.name}\n", style="bold")
        if state is None:
            text.append(f"  {status} · folder missing", style="dim")
        else:
            total = state.total_steps
            text.append(f"  {status} · step {state.step}/{total or '?'} · {job_id}", style="dim")
        return text

    def _rebuild_list(self) -> None:
        option_list = self.query_one("#ft-job-list", OptionList)
        ids = [r.id for r in self.store.jobs()]
        self._labels = {i: self._label(i) for i in ids}
        option_list.clear_options()
        option_list.add_options([Option(self._labels[i], id=i) for i in ids])
        if self.current in ids:
            option_list.highlighted = ids.index(self.current)

    def _relabel(self, job_id: str) -> None:
        label = self._label(job_id)
        if self._labels.get(job_id) != label:
            self._labels[job_id] = label
            try:
                self.query_one("#ft-job-list", OptionList).replace_option_prompt(job_id, label)
            except Exception:  # not listed yet
                self._rebuild_list()

    @on(OptionList.OptionSelected, "#ft-job-list")
    def _job_chosen(self, event: OptionList.OptionSelected) -> None:
        self.show_job(event.option.id)

    # -- polling ----------------------------------------------------------------------------------------

    @store_errors_as_notices
    def poll(self) -> None:
        """Read what running jobs appended to their progress files; update the list and the job shown."""
        for job_id, state in list(self.states.items()):
            if state.finished and job_id != self.current:
                continue
            before = (state.status, state.step)
            state.refresh()
            if state.status != before[0]:
                self.store.set_job_status(job_id, state.status)
            if (state.status, state.step) != before:
                self._relabel(job_id)
        if self.current is not None:
            self._update_view()

    # -- the form ---------------------------------------------------------------------------------------

    def form_values(self) -> dict[str, str]:
        values = {"model": self.query_one("#ft-model", Input).value, "data": self.query_one("#ft-data", Input).value}
        for key in CHOICES:
            values[key] = str(self.query_one(f"#ft-{key}", Select).value)
        for field in FIELDS:
            values[field.key] = self.query_one(f"#ft-{field.key}", Input).value
        return values

    def show_errors(self, errors: dict[str, str]) -> None:
        for widget in self.query(".ft-number").results(Input):
            widget.set_class(widget.id.removeprefix("ft-") in errors, "-invalid")
        for key in ("model", "data"):
            self.query_one(f"#ft-{key}", Input).set_class(key in errors, "-invalid")
        box = self.query_one("#ft-errors", Static)
        box.update("\n".join(errors.values()))
        box.display = bool(errors)

    @on(Select.Changed, "#ft-method")
    def _toggle_lora_fields(self) -> None:
        lora = self.query_one("#ft-method", Select).value == "lora"
        for key in ("lora_rank", "lora_alpha", "lora_dropout"):
            self.query_one(f"#ft-row-{key}").display = lora

    @on(Button.Pressed, "#ft-choose")
    def action_choose_model(self) -> None:
        from chattui.screens.models import ModelPickerScreen

        app = self.app

        def chosen(path: str | None) -> None:
            if path:
                self.query_one("#ft-model", Input).value = path

        app.push_screen(
            ModelPickerScreen(recent=app.store.recent_models(), folders=app.config.model_folders,
                              stores=app.stores, current=self.query_one("#ft-model", Input).value or None,
                              bundled=app.bundled_dir),
            chosen,
        )

    @on(Button.Pressed, "#ft-preview-button")
    @on(Input.Submitted, "#ft-data")
    def action_preview(self) -> None:
        values = self.form_values()
        _, errors = validate_form(values)
        errors = {k: v for k, v in errors.items() if k in ("model", "data", "max_seq_len")}
        self.show_errors(errors)
        if errors:
            return
        box = self.query_one("#ft-preview", Static)
        box.update("Reading the data with the model's tokenizer…")
        box.display = True
        config, _ = validate_form(values)  # the settings that are valid so far decide the plan shown
        job = {k: v for k, v in config.items() if k not in ("model", "data")}
        self._preview(values["model"].strip(), values["data"].strip(), int(values["max_seq_len"]), job)

    @work(thread=True, exclusive=True, group="preview")
    def _preview(self, model: str, data: str, max_seq_len: int, job: dict[str, Any]) -> None:
        try:
            report = inspect_data(str(Path(model).expanduser()), [str(Path(data).expanduser())], max_seq_len, job)
        except BackendError as e:
            self.post_message(self.Previewed(model, data, None, str(e)))
        except Exception as e:  # an engine bug must not take the UI down
            self.post_message(self.Previewed(model, data, None, f"{type(e).__name__}: {e}"))
        else:
            self.post_message(self.Previewed(model, data, report))

    def on_finetune_screen_previewed(self, message: Previewed) -> None:
        box = self.query_one("#ft-preview", Static)
        self.preview = message.report
        if message.error:
            box.update(Text(f"{message.error}\nStart waits until the data file or model changes.", style="red"))
            self.rejected = (message.model, message.data)
        else:
            box.update(preview_text(message.report, max(40, box.size.width or 60)))
            self.rejected = None
        self._update_start()

    @on(Input.Changed, "#ft-model, #ft-data")
    def _update_start(self) -> None:
        """Start is disabled while the model and data are the ones the preview just refused."""
        current = (self.query_one("#ft-model", Input).value.strip(), self.query_one("#ft-data", Input).value.strip())
        self.query_one("#ft-start", Button).disabled = self.rejected == current

    @on(Button.Pressed, "#ft-start")
    @store_errors_as_notices
    def action_start(self) -> None:
        config, errors = validate_form(self.form_values())
        self.show_errors(errors)
        if errors:
            return
        try:
            state = jobs.start_job(config, root=self.jobs_dir)
        except jobs.JobError as e:
            self.show_errors({"start": f"Could not start the job: {e}"})
            return
        self.states[state.id] = state
        self.store.save_job(state.id, name=job_name(state.config), status=state.status, out_dir=str(state.dir),
                            base_model=state.base_model)
        self.current = state.id
        self._rebuild_list()
        self.show_job(state.id)
        self.notify(f"Training in {state.dir}; it keeps running if you close chattui.", title="Job started",
                    markup=False)

    def action_new_job(self) -> None:
        self.current = None
        self.query_one("#ft-main", ContentSwitcher).current = "ft-form"
        self.query_one("#ft-model", Input).focus()

    def action_back(self) -> None:
        self.app.pop_screen()

    # -- a job's view ------------------------------------------------------------------------------------

    def show_job(self, job_id: str) -> None:
        if job_id not in self.states:
            self.notify(self.missing.get(job_id, "the job folder cannot be read"), title="Job", severity="error",
                        markup=False)
            return
        self.current = job_id
        self.query_one("#ft-main", ContentSwitcher).current = "ft-job"
        self._update_view()

    @property
    def job(self) -> jobs.JobState | None:
        return self.states.get(self.current) if self.current else None

    def _update_view(self) -> None:
        state = self.job
        if state is None:
            return
        record = self.store.job(state.id)
        self.query_one("#job-title", Static).update(
            Text.assemble((record.name, "bold"), f"\nbase {state.base_model}\nfolder {state.dir}")
        )
        status = Text(f"{STATUS_MARKS.get(state.status, '?')} {state.status}", style={
            "done": "bold green", "failed": "bold red", "cancelled": "bold yellow"}.get(state.status, "bold"))
        if state.reason:
            status.append(f": {state.reason}")
        if state.finished and state.chat_target():
            status.append("   result: " + " + ".join(p for p in state.chat_target() if p), style="dim")
        if state.status == "done" and state.loss_still_falling():
            status.append("\nThe loss was still falling when the run ended: it has not settled. More steps (Max "
                          "steps) or a higher learning rate would likely teach it more.", style="yellow")
        self.query_one("#job-status", Static).update(status)
        total = state.total_steps
        # A job that ended before it knew its steps gets a still bar (None would animate as "in progress").
        bar_total = total or (max(state.step, 1) if state.finished else None)
        self.query_one("#job-progress", ProgressBar).update(total=bar_total, progress=state.step)
        latest = state.latest or {}
        parts = [f"step {state.step}/{total or '?'}"]
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
        self.query_one("#job-stats", Static).update(" · ".join(parts))
        self.query_one("#job-chart", LossChart).set_points(state.loss_points(), val)
        samples = self.query_one("#job-samples", Static)
        samples.update(samples_text(state.samples) if state.samples else "")
        samples.display = state.samples is not None
        self.query_one("#job-log", Static).update("\n".join(jobs.log_tail(state.dir, LOG_LINES)) or "(no log yet)")
        running = state.status in ("queued", "running")
        self.query_one("#job-cancel", Button).disabled = not running
        self.query_one("#job-resume", Button).disabled = state.status not in ("failed", "cancelled")
        target = state.chat_target()
        self.query_one("#job-chat", Button).disabled = target is None
        self.query_one("#job-compare", Button).disabled = target is None or target[1] is None
        if self.focused is None:  # the focused button was just disabled (Cancel, Resume): stay in the view
            enabled = [b for b in self.query("#ft-job Button").results(Button) if not b.disabled]
            (enabled[0] if enabled else self.query_one("#ft-job-list")).focus()

    @on(Button.Pressed, "#job-cancel")
    def action_cancel_job(self) -> None:
        state = self.job
        if state is None:
            return
        if jobs.cancel_job(state):
            self.notify("The job finishes its step, writes a checkpoint and stops.", title="Cancelling",
                        markup=False)
        else:
            self.notify("The job is not running.", title="Cancel", severity="warning", markup=False)

    @on(Button.Pressed, "#job-resume")
    def action_resume_job(self) -> None:
        state = self.job
        if state is not None:
            self.query_one("#job-resume", Button).disabled = True
            self._resume(state.id, state.dir)

    @work(thread=True, group="resume")
    def _resume(self, job_id: str, job_dir: Path) -> None:
        try:
            self.post_message(self.Resumed(job_id, jobs.resume_job(job_dir)))
        except jobs.JobError as e:
            self.post_message(self.Resumed(job_id, None, str(e)))

    @store_errors_as_notices
    def on_finetune_screen_resumed(self, message: Resumed) -> None:
        if message.state is None:
            self.notify(message.error, title="Cannot resume", severity="error", markup=False)
            return
        self.states[message.job_id] = message.state
        self.store.set_job_status(message.job_id, message.state.status)
        self._relabel(message.job_id)
        if self.current == message.job_id:
            self._update_view()

    @on(Button.Pressed, "#job-chat")
    async def action_chat_with_job(self) -> None:
        """Back to the chat, in a new conversation, with the job's result loaded."""
        state = self.job
        target = state.chat_target() if state else None
        if target is None:
            return
        model, adapter = target
        if not is_loaded(self.app, model, adapter):
            self.app.load_model(model, adapter=adapter)
        self.app.pop_screen()
        await self.app.chat.action_new_chat()

    @on(Button.Pressed, "#job-compare")
    def action_compare(self) -> None:
        state = self.job
        target = state.chat_target() if state else None
        if target is None or target[1] is None:
            return
        self.app.push_screen(CompareScreen(*target))


# -- compare base and tuned ---------------------------------------------------------------------------------


class CompareScreen(ModalScreen[None]):
    """The same prompt and seed on the base model and on base + adapter, side by side; one engine in memory,
    the adapter switched off for the base reply (stream's use_adapter=False)."""

    BINDINGS = [Binding("escape", "close", "Close")]
    LOAD_TIMEOUT_S = 600.0

    @dataclass
    class Chunk(Message):
        pane: str  # "base" or "tuned"
        text: str

    @dataclass
    class Done(Message):
        error: str | None = None

    def __init__(self, model: str, adapter: str) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.texts = {"base": "", "tuned": ""}
        self.streams: dict[str, MarkdownStream] = {}  # pane -> the stream its reply is written into
        self.running = False
        self.cancel = threading.Event()

    def compose(self):
        with Vertical(id="dialog", classes="compare-dialog"):
            yield Label(f"Compare: {display_name(self.model)} vs {model_label(self.model, self.adapter)}",
                        classes="dialog-title")
            with Horizontal(classes="ft-row"):
                yield Input(placeholder="A prompt for both models, Enter runs", id="cmp-prompt")
                yield Input("0", id="cmp-seed", classes="ft-number")
                yield Button("Run", id="cmp-run", variant="primary")
            yield Static("", id="cmp-status", markup=False)
            with Horizontal(id="cmp-panes"):
                with VerticalScroll(classes="cmp-pane"):
                    yield Label("Base", classes="ft-label")
                    yield Markdown(id="cmp-base")  # rendered as the chat renders replies
                with VerticalScroll(classes="cmp-pane"):
                    yield Label("Tuned (base + adapter)", classes="ft-label")
                    yield Markdown(id="cmp-tuned")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#cmp-prompt", Input).focus()

    def _loaded(self) -> bool:
        return is_loaded(self.app, self.model, self.adapter)

    @on(Button.Pressed, "#cmp-run")
    @on(Input.Submitted)
    def action_run(self) -> None:
        prompt = self.query_one("#cmp-prompt", Input).value.strip()
        status = self.query_one("#cmp-status", Static)
        try:
            seed = int(self.query_one("#cmp-seed", Input).value)
        except ValueError:
            status.update("The seed must be a whole number")
            return
        if not prompt or self.running:
            return
        if not self._loaded():
            status.update("Loading the base model with the adapter…")
            self.app.load_model(self.model, adapter=self.adapter)
        else:
            status.update(f"Generating with seed {seed}…")
        self.texts = {"base": "", "tuned": ""}
        for pane in self.texts:
            self.query_one(f"#cmp-{pane}", Markdown).update("")
        self.streams = {}
        self.running = True
        self._generate(prompt, seed)

    @work(thread=True, exclusive=True, group="compare")
    def _generate(self, prompt: str, seed: int) -> None:
        deadline = time.monotonic() + self.LOAD_TIMEOUT_S
        while not self._loaded():
            if self.cancel.is_set() or time.monotonic() > deadline:
                self.post_message(self.Done("the model with the adapter did not load (see the notifications)"))
                return
            time.sleep(0.05)
        settings = self.app.model.defaults.updated({"seed": seed})
        try:
            for pane, enabled in (("base", False), ("tuned", True)):
                for piece in self.app.backend.stream(
                    [{"role": "user", "content": prompt}], settings, self.cancel, use_adapter=enabled
                ):
                    self.post_message(self.Chunk(pane, piece))
        except BackendError as e:
            self.post_message(self.Done(str(e)))
            return
        self.post_message(self.Done())

    async def on_compare_screen_chunk(self, message: Chunk) -> None:
        self.texts[message.pane] += message.text
        if message.pane not in self.streams:
            self.streams[message.pane] = Markdown.get_stream(self.query_one(f"#cmp-{message.pane}", Markdown))
        await self.streams[message.pane].write(message.text)

    async def on_compare_screen_done(self, message: Done) -> None:
        for pane, stream in self.streams.items():  # then each reply rendered once in full
            await stream.stop()
            await self.query_one(f"#cmp-{pane}", Markdown).update(self.texts[pane])
        self.streams = {}
        self.running = False
        self.query_one("#cmp-status", Static).update(
            f"Error: {message.error}" if message.error else "Same prompt and seed; only the adapter differs."
        )

    def action_close(self) -> None:
        self.cancel.set()
        self.dismiss(None)
