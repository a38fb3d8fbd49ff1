"""`chattui finetune`: run a LoRA or full fine-tune job in the foreground, with a progress bar.

The job itself is a subprocess (`python -m engine.finetune`, started through chattui.jobs, the same way the
fine-tune screen starts it) writing into its folder; this command tails its progress.jsonl. Ctrl-C asks
the job to stop: it writes a checkpoint and ends "cancelled", and `--resume` continues it later.

Wiring (chattui/cli.py): `finetune_cli.add_parser(sub)` in build_parser; the parser's `run` default is
`finetune_cli.run`, which prints its own `chattui: error: ...` line and returns the exit code
(0 done, 1 failed or bad arguments, 130 cancelled). Never imports torch.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

from chattui import jobs
from chattui.models_cli import MODEL_HELP
from chattui.paths import bundled_model_dir
from engine.params import GGUF_EXPORT_TYPES

POLL_S = 0.25  # how often the progress file is read

# CLI option -> job setting (JobConfig field in engine/finetune.py), for the options a user may give.
_SETTINGS = {
    "model": "model", "data": "data", "method": "method", "epochs": "epochs", "max_steps": "max_steps",
    "lr": "lr", "batch_size": "batch_size", "grad_accum": "grad_accum", "max_seq_len": "max_seq_len",
    "lora_rank": "lora_rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
    "target_modules": "target_modules", "val_data": "val_data", "val_fraction": "val_fraction", "seed": "seed",
    "nproc": "nproc", "merge": "merge", "merge_gguf": "merge_gguf", "device": "device",
}
_LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules", "merge", "merge_gguf")


class ArgumentError(Exception):
    """A bad combination or value of options; one line."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on a JSONL file (LoRA or full)",
        description="Fine-tune a model on JSONL data: chat {\"messages\": [...]}, instruction "
        "{\"instruction\", \"input\", \"output\"} or plain {\"text\"} records (format detected per file). "
        "Chat and instruction data train on the assistant's tokens only. The job runs as a subprocess writing "
        "into its folder (default: the user data dir's jobs/<id>); Ctrl-C stops it with a checkpoint, and "
        "--resume continues it.",
    )
    p.add_argument("--model", metavar="MODEL",
                   help=f"base model: {MODEL_HELP}; a .gguf file for LoRA only, merged with --merge-gguf "
                   "(default: the bundled model)")
    p.add_argument("--data", type=Path, action="append", metavar="FILE", help="training JSONL file; repeatable")
    p.add_argument("--method", choices=("lora", "full"), help="LoRA adapters on a frozen base, or every weight (default: lora)")
    p.add_argument("--epochs", type=int, metavar="N",
                   help="passes over the data (default: 3, more for a small data set: at least 100 steps)")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps, instead of --epochs")
    p.add_argument("--lr", type=float, metavar="X",
                   help="peak learning rate (default: 2e-4 LoRA, 2e-5 full at 1B parameters, times sqrt(1e9 / "
                   "parameters) for smaller models, at most 20x)")
    p.add_argument("--batch-size", type=int, metavar="N", help="examples per step, all processes together (default: 8)")
    p.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="tokens per example; longer ones are cut and counted (default: min(1024, context))")
    p.add_argument("--lora-rank", type=int, metavar="R", help="LoRA rank r (default: 8)")
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha; the update is scaled by alpha/r (default: 16)")
    p.add_argument("--lora-dropout", type=float, metavar="D", help="dropout on the adapters' input (default: 0.05)")
    p.add_argument("--target-modules", nargs="+", metavar="NAME",
                   help="projections to adapt, e.g. q_proj v_proj (default: every attention and MLP projection)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-data", type=Path, action="append", metavar="FILE", help="validation JSONL file")
    val.add_argument("--val-fraction", type=float, metavar="F",
                     help="hold out this share of the data for validation (default: 0.05 with >= 20 records)")
    p.add_argument("--seed", type=int, metavar="S", help="seed for initialisation, shuffling and the split (default: 0)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="job folder, new or empty (default: the user data dir's jobs/<id>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the job in --out (or the newest unfinished one for --model/--data) from its checkpoint")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="processes (GPUs) under torchrun with DistributedDataParallel (default: 1)")
    p.add_argument("--merge", action="store_true", default=None,
                   help="LoRA: also save base + adapter merged as a Hugging Face checkpoint (merged/)")
    p.add_argument("--merge-gguf", type=str.upper, choices=GGUF_EXPORT_TYPES, metavar="TYPE",
                   help="LoRA: also save base + adapter merged as a GGUF file for llama.cpp and Ollama (merged.gguf), "
                   f"its matrices in TYPE: {', '.join(GGUF_EXPORT_TYPES)} (Q8_0, Q4_0, Q4_1 quantized by chattui)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto (cuda if available)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        state = _resume(args) if args.resume else jobs.start_job(job_config(args))
    except (ArgumentError, jobs.JobError) as e:
        print(f"chattui: error: {e}", file=sys.stderr)
        return 1
    return watch(state)


# -- arguments -----------------------------------------------------------------------------------------------


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave (None = not given)."""
    return {key: getattr(args, opt) for opt, key in _SETTINGS.items() if getattr(args, opt, None) is not None}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_arguments(settings: dict[str, Any]) -> None:
    """Value checks that need no model or data (the job checks everything again)."""
    at_least_1 = ("epochs", "max_steps", "batch_size", "grad_accum", "max_seq_len", "lora_rank", "nproc")
    for key in at_least_1:
        if key in settings and settings[key] < 1:
            raise ArgumentError(f"{_flag(key)} must be >= 1, got {settings[key]}")
    if "seed" in settings and not 0 <= settings["seed"] < 2**64:
        raise ArgumentError(f"--seed must be in [0, 2**64), got {settings['seed']}")
    for key in ("lr", "lora_alpha"):
        if key in settings and not 0 < settings[key] < math.inf:
            raise ArgumentError(f"{_flag(key)} must be a positive finite number, got {settings[key]}")
    if "lora_dropout" in settings and not 0 <= settings["lora_dropout"] < 1:
        raise ArgumentError(f"--lora-dropout must be in [0, 1), got {settings['lora_dropout']}")
    if "val_fraction" in settings and not 0 < settings["val_fraction"] < 1:
        raise ArgumentError(f"--val-fraction must be between 0 and 1, got {settings['val_fraction']}")
    if settings.get("method") == "full":
        lora_given = [k for k in _LORA_ONLY if k in settings]
        if lora_given:
            raise ArgumentError(f"{_flag(lora_given[0])} applies to --method lora")
    batch, nproc = settings.get("batch_size", 8), settings.get("nproc", 1)
    if batch % nproc:
        raise ArgumentError(f"--batch-size ({batch}) must be divisible by --nproc ({nproc}): it is the global batch")


def job_config(args: argparse.Namespace) -> dict[str, Any]:
    """The job settings for a new job from the options (checked; paths absolute)."""
    settings = _given(args)
    if not settings.get("data"):
        raise ArgumentError("--data FILE is required (a JSONL file of chat, instruction or text records)")
    model = settings.get("model")
    if model is None:
        model = bundled_model_dir()
        if not (model / "config.json").exists():
            raise ArgumentError(f"the bundled default model is not installed ({model}); pass --model DIR")
    model = Path(model).expanduser()
    if model.suffix.lower() == ".gguf":
        if not model.is_file():
            raise ArgumentError(f"{model}: file not found")
    elif not model.is_dir():
        raise ArgumentError(f"{model}: not a directory or a .gguf file")
    elif not (model / "config.json").is_file():
        raise ArgumentError(f"{model}: no config.json (expected a Hugging Face-format model folder or a .gguf file)")
    settings["model"] = str(model.resolve())
    for key in ("data", "val_data"):
        for path in settings.get(key, []):
            if not Path(path).expanduser().is_file():
                raise ArgumentError(f"{path}: file not found")
        if key in settings:
            settings[key] = [str(Path(p).expanduser().resolve()) for p in settings[key]]
    check_arguments(settings)
    if args.out is not None:
        settings["out"] = str(args.out.expanduser().resolve())
    return settings


def _same(key: str, given: Any, saved: Any) -> bool:
    if key in ("model",):
        return str(Path(given).expanduser().resolve()) == saved
    if key in ("data", "val_data"):
        return [str(Path(p).expanduser().resolve()) for p in given] == saved
    if isinstance(given, float) and isinstance(saved, (int, float)):
        return abs(given - saved) <= 1e-12 * max(abs(given), 1.0)
    return given == saved


def _resume(args: argparse.Namespace) -> jobs.JobState:
    given = _given(args)
    if args.out is not None:
        job_dir = args.out.expanduser()
        if not job_dir.is_dir():
            raise ArgumentError(f"{job_dir}: not a job folder (--resume --out DIR names the folder of a job)")
    else:
        if "model" not in given or "data" not in given:
            raise ArgumentError("--resume needs --out DIR (the job folder), or the --model and --data of the job")
        candidates = [
            j for j in jobs.list_jobs()
            if j.status != "done"
            if _same("model", given["model"], j.config.get("model")) and _same("data", given["data"], j.config.get("data"))
        ]
        if not candidates:
            raise ArgumentError(f"no unfinished job for this --model and --data under {jobs.jobs_root()}; pass --out DIR")
        job_dir = candidates[0].dir
    saved = {**jobs.read_resolved_config(job_dir), **jobs.read_config(job_dir)}
    for key, value in given.items():
        if key not in saved or not _same(key, value, saved[key]):
            setting = f"the job's setting ({saved[key]!r})" if key in saved else "the job's settings"
            raise ArgumentError(f"{_flag(key)} differs from {setting}; a resumed job keeps its settings")
    return jobs.resume_job(job_dir)


# -- watching ------------------------------------------------------------------------------------------------


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}/{r['total_steps']}", f"epoch {r['epoch'] + 1}"]
    if r.get("loss") is not None:
        parts.append(f"loss {r['loss']:.4f}")
    if r.get("val_loss") is not None:
        parts.append(f"val loss {r['val_loss']:.4f}")
    parts += [f"lr {r['lr']:.2e}", f"{r['tokens_per_s']:,.0f} tok/s", f"eta {_fmt_eta(r.get('eta_s'))}"]
    return " | ".join(parts)


def bar_info(r: dict[str, Any]) -> str:
    parts = [f"loss {r['loss']:.4f}" if r.get("loss") is not None else "loss -"]
    if r.get("val_loss") is not None:
        parts.append(f"val {r['val_loss']:.4f}")
    parts += [f"{r['tokens_per_s']:,.0f} tok/s", f"eta {_fmt_eta(r.get('eta_s'))}"]
    return " | ".join(parts)


def data_line(d: dict[str, Any]) -> str:
    formats = ", ".join(f"{Path(f['path']).name}: {f['records']} {f['format']}" for f in d["files"] + d["val_files"])
    return (
        f"data: {d['train_examples']} training / {d['val_examples']} validation examples ({formats}); "
        f"{d['truncated']} truncated to {d['max_seq_len']} tokens, {d['dropped']} left out"
    )


class _Display:
    """A rich progress bar on a terminal; one line per record otherwise (logs, pipes, tests)."""

    def __init__(self, state: jobs.JobState):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.bar = None
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("[bold]fine-tune"), BarColumn(bar_width=20), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), console=self.console, transient=False,
            )
            self.task = self.bar.add_task("train", total=None, info="starting...")
            self.bar.start()

    def show(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        if kind == "data":
            self.print(data_line(record))
        elif kind == "progress":
            if self.bar is not None:
                info = bar_info(record)
                self.bar.update(self.task, completed=record["step"], total=record["total_steps"], info=info)
            else:
                self.print(progress_line(record))
        elif kind == "export":
            if self.bar is not None:
                self.bar.update(self.task, completed=record["done"], total=record["total"], info=f"writing {record['file']}")
            elif record["done"] == record["total"]:
                self.print(f"wrote {record['file']}")
        elif kind == "status" and record.get("status") == "running":
            self.print("resumed" + (f" from step {record.get('start_step')}" if record.get("start_step") else "")
                       if record.get("resumed") else "running")

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def watch(state: jobs.JobState) -> int:
    """Follow a job until it ends; Ctrl-C (or SIGTERM, SIGHUP) cancels it with a checkpoint."""
    display = _Display(state)
    display.print(f"job folder: {state.dir} (log: {jobs.LOG_FILE})")
    cancelling: list[str] = []

    def on_signal(signum, frame):
        if not cancelling:
            display.print("stopping: the job writes a checkpoint first (Ctrl-C again stops watching)")
            jobs.cancel_job(state)
            cancelling.append(signal.Signals(signum).name)
        else:
            raise KeyboardInterrupt

    handled = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        for record in state.records:  # already read while starting
            display.show(record)
        while True:
            for record in state.refresh():
                display.show(record)
            if state.finished:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        display.stop()
        print(f"chattui: stopped watching; the job goes on in {state.dir} (pid {state.current_pid()})", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        display.stop()
    return report(state)


def report(state: jobs.JobState) -> int:
    result = state.result
    if state.status == "failed":
        print(f"chattui: error: {state.reason or 'the job failed'} (log: {state.dir / jobs.LOG_FILE})", file=sys.stderr)
        return 1
    if state.status == "cancelled":
        print(
            f"cancelled at step {result.get('step', state.step)}; continue with: "
            f"chattui finetune --resume --out {state.dir}",
            file=sys.stderr,
        )
        return 130
    loss = result.get("train_loss")
    val = result.get("val_loss")
    summary = f"done: {result.get('step', state.step)} steps"
    if loss is not None:
        summary += f", loss {loss:.4f}"
    if val is not None:
        summary += f", validation loss {val:.4f}"
    print(summary)
    if state.adapter_dir is not None:
        print(f"adapter: {state.adapter_dir}")
    if state.merged_dir is not None:
        print(f"merged model: {state.merged_dir}")
    if state.merged_gguf is not None:
        print(f"merged GGUF: {state.merged_gguf}")
    if state.model_dir is not None:
        print(f"model: {state.model_dir}")
    target = state.chat_target()
    if target is not None:
        model, adapter = target
        print(f"chat with it: chattui --model {model}" + (f" --adapter {adapter}" if adapter else ""))
    return 0
