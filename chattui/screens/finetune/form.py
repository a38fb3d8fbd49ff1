"""The new-job form: base model, data file, method, the hyperparameters, a data preview, and Start.

The form validates what was typed and posts `FinetuneForm.StartRequested(config)` with a valid job config;
the screen starts the job. The data preview reads the file with the model's tokenizer in a thread
(chattui.backend.inspect_data); Start waits while the model and data are the ones the preview refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Label, Select, Static

from chattui.backend import BackendError, inspect_data
from chattui.catalog import human_count, is_gguf_file
from chattui.widgets.loss_chart import histogram

# -- the settings and their validation ---------------------------------------------------------------------


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
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout")  # shown, and sent, only for the LoRA method
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
        for key in LORA_FIELDS:
            errors.pop(key, None)
            config.pop(key, None)
    if "batch_size" in config and "grad_accum" not in errors and config["batch_size"] > 4096:
        errors["batch_size"] = "Batch size: at most 4096"
    return config, errors


# -- the data preview's text ----------------------------------------------------------------------------------


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


# -- the form ---------------------------------------------------------------------------------------------------


class FinetuneForm(VerticalScroll):
    """The fields of a new job; posts StartRequested with a valid config, ChooseModelRequested for Choose…."""

    @dataclass
    class StartRequested(Message):
        config: dict[str, Any]  # the job's JobConfig fields (chattui.jobs.start_job), validated

    @dataclass
    class ChooseModelRequested(Message):
        current: str | None  # what the base model field holds now

    @dataclass
    class Previewed(Message):
        model: str
        data: str
        report: dict[str, Any] | None  # chattui.backend.inspect_data's report
        error: str | None = None

    def __init__(self, model: str | None = None, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.initial_model = model  # the base model field starts with this
        self.preview: dict[str, Any] | None = None  # the last data report
        self.rejected: tuple[str, str] | None = None  # (model, data) the preview refused: Start waits for a change

    def compose(self):
        yield Label("New fine-tune job", classes="dialog-title")
        with Horizontal(classes="ft-row"):
            yield Label("Base model", classes="ft-label")
            yield Input(self.initial_model or "", placeholder="model folder (Hugging Face format)", id="ft-model")
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

    def on_mount(self) -> None:
        self.query_one("#ft-errors").display = False
        self.query_one("#ft-preview").display = False
        self._toggle_lora_fields()

    def values(self) -> dict[str, str]:
        """The form's texts by JobConfig key."""
        values = {"model": self.query_one("#ft-model", Input).value, "data": self.query_one("#ft-data", Input).value}
        for key in CHOICES:
            values[key] = str(self.query_one(f"#ft-{key}", Select).value)
        for field in FIELDS:
            values[field.key] = self.query_one(f"#ft-{field.key}", Input).value
        return values

    def set_model(self, path: str | None) -> None:
        if path:
            self.query_one("#ft-model", Input).value = path

    def focus_model(self) -> None:
        self.query_one("#ft-model", Input).focus()

    def show_errors(self, errors: dict[str, str]) -> None:
        """Mark the fields in `errors` ({key: message}; key "start" for a job that could not start) and list them."""
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
        for key in LORA_FIELDS:
            self.query_one(f"#ft-row-{key}").display = lora

    @on(Button.Pressed, "#ft-choose")
    def _choose_model(self) -> None:
        self.post_message(self.ChooseModelRequested(self.query_one("#ft-model", Input).value or None))

    @on(Button.Pressed, "#ft-start")
    def action_start(self) -> None:
        config, errors = validate_form(self.values())
        self.show_errors(errors)
        if not errors:
            self.post_message(self.StartRequested(config))

    # -- the data preview ----------------------------------------------------------------------------------

    @on(Button.Pressed, "#ft-preview-button")
    @on(Input.Submitted, "#ft-data")
    def action_preview(self) -> None:
        values = self.values()
        config, errors = validate_form(values)  # the settings that are valid so far decide the plan shown
        errors = {k: v for k, v in errors.items() if k in ("model", "data", "max_seq_len")}
        self.show_errors(errors)
        if errors:
            return
        box = self.query_one("#ft-preview", Static)
        box.update("Reading the data with the model's tokenizer…")
        box.display = True
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

    def on_finetune_form_previewed(self, message: Previewed) -> None:
        message.stop()
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
