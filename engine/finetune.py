"""Fine-tune jobs: LoRA or full fine-tuning of a Hugging Face-format model on JSONL data, run as a process.

    python -m engine.finetune --config JOB.toml [--resume]

JOB.toml holds the fields of `JobConfig` (only `model` and `data` are required). The job writes into its
output folder (`out`, default: <user data dir>/jobs/<id>):

    job.json          the resolved settings (JobConfig plus what was derived: steps, lr, targets, ...)
    progress.jsonl    one JSON object per line, appended as the job runs (see below)
    checkpoints/      step-NNNNNNN folders written atomically by engine.train (the last few kept)
    adapter/          the LoRA adapter in PEFT's format (adapter_config.json, adapter_model.safetensors)
    merged/           with merge = true: base + adapter as a Hugging Face checkpoint
    merged.gguf       with merge_gguf = "Q8_0" (or F32, F16, BF16, Q4_0, Q4_1): base + adapter as a GGUF file
                      that llama.cpp and Ollama load (engine.gguf.writer); the only merge of a GGUF base
    model/            full fine-tunes: the tuned model as a Hugging Face checkpoint

progress.jsonl lines have a "type":
- "status": {"status": queued|running|done|failed|cancelled, "time", ...}; running has "pid" (the process
  to signal), "start_step" and "resumed"; done has the result folders and final losses; failed has "reason"
  (one line); cancelled has "step" and the checkpoint it left.
- "data": the DataReport (records per file and format, truncated and dropped examples, token lengths).
- "progress": engine.train's Progress record (step, total_steps, epoch, loss, val_loss, lr, tokens_per_s,
  eta_s, ...) plus "time". A resumed run repeats steps after its checkpoint: readers keep the newest record
  per step (chattui.jobs does).
- "samples": at each evaluation, {"step", "held_out", "samples": [{"prompt", "reply", "expected"}]}: the model's
  greedy replies to the first SAMPLE_PROMPTS validation prompts (training prompts, held_out false, when there is
  no validation set), so a user sees what it learned, not only a loss.

Stopping: SIGTERM or SIGINT finishes the current step, writes a checkpoint and ends with status cancelled
(exit code 130); `--resume` continues from the newest checkpoint with the same losses as an uninterrupted run.
Errors end with status failed and its reason (exit code 1); checkpoints are written to a temporary folder and
renamed into place, so a crash, a kill or a full disk never leaves a partial one behind.

Several processes (`nproc` > 1): this process starts `torch.distributed.run` (torchrun) with nproc workers
that train under DistributedDataParallel (NCCL on GPUs, gloo on CPU). `batch_size` is the global batch, each
worker takes its slice, so the optimizer sees the same batches for any process count. Each worker keeps its
own checkpoint (rank 0 in checkpoints/, rank r in checkpoints/rank-r/); resuming needs the same nproc.
engine.train normalises each worker's loss by the target tokens of all workers (one all-reduce per step) and DDP
averages the gradients, so a step equals one process's step on the same global batch. DDP keeps a full copy of the model, gradients and optimizer state on every GPU; for models larger than one
GPU the path is FSDP (torch.distributed.fsdp.fully_shard, FSDP2), which shards parameters, gradients and
optimizer state across the workers: wrap each decoder layer and then the model with `fully_shard` instead of
DistributedDataParallel here, and save checkpoints with torch.distributed.checkpoint (sharded state dicts).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from engine.checkpoint import load_weights, read_defaults, read_model_config, uninitialised_on_meta
from engine.device import cpu_has_fast_bfloat16
from engine.errors import EngineError
from engine.finetune_data import DataCancelled, DataError, ExampleBatches, pad_token_id, prepare_data
from engine.job_files import (
    CANCEL_FILE, CHECKPOINTS, EXIT_CANCELLED, EXIT_DONE, EXIT_FAILED, FINAL_STATUSES, MERGED_GGUF, PROGRESS_FILE,
    RESOLVED_FILE, RESULT_DIRS, user_data_dir,
)
from engine.gguf.header import is_gguf_path
from engine.gguf.writer import export_gguf
from engine.lora import LoRAConfig, apply_lora, default_targets, merge_lora, save_adapter, save_hf_checkpoint
from engine.params import GGUF_EXPORT_TYPES
from engine.tokenizer import ChatTokenizer
from engine.train import IGNORE_INDEX, Progress, TrainConfig, latest_checkpoint, list_checkpoints, train
from models.registry import family_of

log = logging.getLogger(__name__)

AUTO_VAL_FRACTION, AUTO_VAL_MIN_RECORDS = 0.05, 20  # validation split when none is asked for
# The automatic learning rate: BASE_LR for a model of LR_REFERENCE_PARAMETERS, scaled by sqrt(reference / size)
# for smaller ones, at most LR_MAX_SCALE times. Measured on the bundled 4.2M-parameter model with 22 question-
# answer records (LoRA): 2e-4 for 80 steps halves the loss and learns none of the answers; the scaled 3.1e-3
# learns all 22 in 80 steps (and in 150).
BASE_LR = {"lora": 2e-4, "full": 2e-5}
LR_REFERENCE_PARAMETERS = 1e9
LR_MAX_SCALE = 20.0
DEFAULT_EPOCHS = 3  # epochs = 0 (automatic): this many passes, more for a small data set (below)
AUTO_MIN_STEPS, AUTO_MAX_EPOCHS = 100, 100  # ...so that training takes at least AUTO_MIN_STEPS steps
SAMPLE_PROMPTS, SAMPLE_TOKENS = 3, 32  # prompts answered at each evaluation, and their reply length


class JobError(EngineError):
    """A job that cannot start: bad settings, an output folder already in use."""


@dataclass
class JobConfig:
    """A fine-tune job, as written in JOB.toml (0, "" and [] mean "choose for me" where noted)."""

    model: str  # base model folder (Hugging Face format)
    data: list[str]  # training JSONL files
    out: str = ""  # output folder; "" = <user data dir>/jobs/<id>
    id: str = ""  # job id; "" = from the start time
    method: str = "lora"  # "lora": base frozen, adapters trained; "full": every weight trained
    epochs: int = 0  # passes over the training data (when max_steps is 0); 0 = auto_epochs()
    max_steps: int = 0  # optimizer steps; 0 = epochs decide
    lr: float = 0.0  # peak learning rate; 0 = auto_lr(): from the method and the model's size
    batch_size: int = 8  # examples per micro-step, all processes together
    grad_accum: int = 1  # micro-steps per optimizer step
    max_seq_len: int = 0  # tokens per example (longer ones are cut); 0 = min(1024, the model's context)
    lora_rank: int = 8  # LoRA r
    lora_alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the adapters' input
    target_modules: list[str] = field(default_factory=list)  # [] = every attention and MLP projection
    val_data: list[str] = field(default_factory=list)  # validation JSONL files
    val_fraction: float | None = None  # held-out share of the data; None = 5% with >= 20 records; 0 = none
    seed: int = 0  # seeds initialisation, shuffling, dropout and the validation split
    warmup_ratio: float = 0.03  # share of the steps spent warming the learning rate up
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW decay on matrices
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    eval_interval: int = 0  # steps between validation passes; 0 = about 10 per run
    checkpoint_interval: int = 0  # steps between checkpoints; 0 = the eval interval
    keep_checkpoints: int = 2  # checkpoints kept (older ones are deleted)
    log_interval: int = 0  # steps between progress records; 0 = every step up to 200 steps
    nproc: int = 1  # processes (GPUs) under torchrun with DistributedDataParallel
    merge: bool = False  # LoRA: also write base + adapter merged as a Hugging Face checkpoint
    merge_gguf: str = ""  # LoRA: also write base + adapter merged as merged.gguf of this type (Q8_0, ...); "" = no
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda
    precision: str = "auto"  # auto (bf16 autocast on GPUs and CPUs with bf16 instructions), bf16, fp32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """What a job derived from its config, the model and the data (written to job.json)."""

    total_steps: int
    warmup_steps: int
    lr: float
    max_seq_len: int
    batch_size: int  # global micro-batch (may be lowered to the number of training examples)
    target_modules: list[str]
    trainable_parameters: int
    total_parameters: int
    device: str
    bf16: bool
    val_fraction: float  # what was held out (0 with val_data or none)
    batches_per_epoch: int


@dataclass
class JobResult:
    status: str  # done, failed or cancelled
    step: int = 0
    reason: str = ""  # failed: the one-line cause
    train_loss: float | None = None
    val_loss: float | None = None
    adapter_dir: str | None = None
    merged_dir: str | None = None
    merged_gguf: str | None = None
    model_dir: str | None = None
    history: list[Progress] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"done": EXIT_DONE, "cancelled": EXIT_CANCELLED}.get(self.status, EXIT_FAILED)


# -- config --------------------------------------------------------------------------------------------------

_FIELD_TYPES = {
    "model": str, "data": list, "out": str, "id": str, "method": str, "epochs": int, "max_steps": int,
    "lr": float, "batch_size": int, "grad_accum": int, "max_seq_len": int, "lora_rank": int,
    "lora_alpha": float, "lora_dropout": float, "target_modules": list, "val_data": list,
    "val_fraction": float, "seed": int, "warmup_ratio": float, "min_lr_ratio": float, "weight_decay": float,
    "grad_clip": float, "eval_interval": int, "checkpoint_interval": int, "keep_checkpoints": int,
    "log_interval": int, "nproc": int, "merge": bool, "merge_gguf": str, "device": str, "precision": str,
}
_PATH_FIELDS = ("model", "out")
_PATH_LIST_FIELDS = ("data", "val_data")


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"


def config_from_dict(values: dict[str, Any], source: str = "job config", base_dir: Path | None = None) -> JobConfig:
    """A checked JobConfig; relative paths are taken from base_dir (the TOML file's folder) or the cwd."""
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise JobError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(_FIELD_TYPES)})")
    for key in ("model", "data"):
        if key not in values:
            raise JobError(f"{source}: missing {key!r}")
    checked: dict[str, Any] = {}
    for key, value in values.items():
        kind = _FIELD_TYPES[key]
        if kind is list and isinstance(value, str):
            value = [value]
        ok = (
            (kind is bool and isinstance(value, bool))
            or (kind is int and isinstance(value, int) and not isinstance(value, bool))
            or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (kind is str and isinstance(value, str))
            or (kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value))
        )
        if not ok:
            expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                        list: "a list of strings"}[kind]
            raise JobError(f"{source}: {key!r} must be {expected}, got {value!r}")
        checked[key] = float(value) if kind is float else value
    base = base_dir or Path.cwd()
    for key in _PATH_FIELDS:
        if checked.get(key):
            checked[key] = str((base / Path(checked[key]).expanduser()).resolve())
    for key in _PATH_LIST_FIELDS:
        if key in checked:
            checked[key] = [str((base / Path(p).expanduser()).resolve()) for p in checked[key]]
    config = JobConfig(**checked)
    _check_values(config, source)
    if not config.id:
        config.id = Path(config.out).name if config.out else new_job_id()
    if not config.out:
        config.out = str(user_data_dir() / "jobs" / config.id)
    return config


def _check_values(c: JobConfig, source: str) -> None:
    def fail(message: str) -> None:
        raise JobError(f"{source}: {message}")

    if not c.data:
        fail("'data' names no file")
    if c.method not in ("lora", "full"):
        fail(f"'method' must be \"lora\" or \"full\", got {c.method!r}")
    for key in ("batch_size", "grad_accum", "lora_rank", "keep_checkpoints", "nproc"):
        if getattr(c, key) < 1:
            fail(f"{key!r} must be >= 1, got {getattr(c, key)}")
    for key in ("epochs", "max_steps", "max_seq_len", "eval_interval", "checkpoint_interval", "log_interval", "seed"):
        if getattr(c, key) < 0:
            fail(f"{key!r} must be >= 0, got {getattr(c, key)}")
    if c.lr < 0 or not math.isfinite(c.lr):
        fail(f"'lr' must be a positive number, got {c.lr}")
    if not 0 <= c.lora_dropout < 1:
        fail(f"'lora_dropout' must be in [0, 1), got {c.lora_dropout}")
    if not 0 < c.lora_alpha < math.inf:
        fail(f"'lora_alpha' must be a positive finite number, got {c.lora_alpha}")
    if c.seed >= 2**64:
        fail(f"'seed' must be < 2**64 (a 64-bit seed), got {c.seed}")
    if c.val_fraction is not None and not 0 <= c.val_fraction < 1:
        fail(f"'val_fraction' must be in [0, 1), got {c.val_fraction}")
    if c.val_data and c.val_fraction:
        fail("give either 'val_data' or 'val_fraction', not both")
    if not 0 <= c.warmup_ratio < 1:
        fail(f"'warmup_ratio' must be in [0, 1), got {c.warmup_ratio}")
    if c.device not in ("auto", "cpu", "cuda"):
        fail(f"'device' must be auto, cpu or cuda, got {c.device!r}")
    if c.precision not in ("auto", "bf16", "fp32"):
        fail(f"'precision' must be auto, bf16 or fp32, got {c.precision!r}")
    if c.batch_size % c.nproc:
        fail(f"'batch_size' ({c.batch_size}) must be divisible by 'nproc' ({c.nproc}): it is the global batch")
    if c.merge_gguf and c.merge_gguf not in GGUF_EXPORT_TYPES:
        fail(f"'merge_gguf' must be one of {', '.join(GGUF_EXPORT_TYPES)}, got {c.merge_gguf!r}")
    for key in ("merge", "merge_gguf"):
        if getattr(c, key) and c.method != "lora":
            fail(f"'{key}' applies to LoRA jobs (a full fine-tune is saved as a whole model anyway)")
    if c.model and is_gguf_path(c.model) and (c.merge or c.method != "lora"):
        # A Hugging Face folder needs the base folder's config and tokenizer files; a GGUF file carries its own.
        fail("a GGUF base model supports LoRA adapters only (no method \"full\"), merged into a GGUF file "
             "('merge_gguf'), not a Hugging Face folder ('merge')")


def load_config(path: str | Path) -> JobConfig:
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise JobError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{path}: invalid TOML ({e})") from None
    return config_from_dict(values, str(path), path.resolve().parent)


# -- the job folder ------------------------------------------------------------------------------------------


class ProgressLog:
    """Appends JSON lines to progress.jsonl, flushed per line (readers tail the file)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({**record, "time": record.get("time", time.time())}, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def status(self, status: str, **extra: Any) -> None:
        self.write({"type": "status", "status": status, **extra})


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of a progress file (a torn last line is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def last_status(path: Path) -> dict[str, Any] | None:
    statuses = [r for r in read_records(path) if r.get("type") == "status"]
    return statuses[-1] if statuses else None


def _rank_checkpoint_dir(out: Path, rank: int) -> Path:
    return out / CHECKPOINTS if rank == 0 else out / CHECKPOINTS / f"rank-{rank}"


def reconcile_rank_checkpoints(out: Path, nproc: int) -> int | None:
    """Keep only checkpoints every rank has (a kill can land between ranks' saves); returns the newest step."""
    steps = []
    for rank in range(nproc):
        found = {int(p.name.split("-")[1]) for p in list_checkpoints(_rank_checkpoint_dir(out, rank))}
        steps.append(found)
    common = set.intersection(*steps) if steps else set()
    newest = max(common) if common else None
    for rank in range(nproc):
        for p in list_checkpoints(_rank_checkpoint_dir(out, rank)):
            if newest is None or int(p.name.split("-")[1]) > newest:
                shutil.rmtree(p, ignore_errors=True)
    return newest


def _check_out_dir(config: JobConfig, resume: bool) -> None:
    out = Path(config.out)
    if resume:
        saved = out / RESOLVED_FILE
        if saved.exists():
            previous = json.loads(saved.read_text(encoding="utf-8"))["config"]
            for key in ("model", "data", "method", "nproc", "seed", "batch_size", "grad_accum", "max_steps", "epochs"):
                if previous.get(key) != getattr(config, key):
                    raise JobError(
                        f"{out}: the job was started with {key} = {previous.get(key)!r}, now {getattr(config, key)!r}; "
                        "a resumed job keeps its settings"
                    )
        return
    if (out / RESOLVED_FILE).exists() or latest_checkpoint(out / CHECKPOINTS) is not None:
        raise JobError(f"{out}: already holds a job; resume it (--resume) or choose another output folder")
    results = [f"{name}/" for name in RESULT_DIRS if (out / name).exists()] + (
        [MERGED_GGUF] if (out / MERGED_GGUF).exists() else [])
    if results:  # a new job would replace them: they are another job's, or the user's
        raise JobError(f"{out}: already holds {results[0]}; choose another output folder (nothing was changed)")


# -- the model -----------------------------------------------------------------------------------------------


def load_trainable_model(model_dir: str | Path, device: torch.device) -> nn.Module:
    """A checkpoint as a trainable float32 model in Hugging Face's layout (no inference fusing), in train mode."""
    model_dir = Path(model_dir)
    return load_weights(model_dir, read_model_config(model_dir), device, torch.float32)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# -- distributed ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def _resolve_device(config: JobConfig, dist: Dist) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise JobError("device cuda requested but no CUDA GPU is available")
        return torch.device("cuda", dist.local_rank if dist.active else torch.cuda.current_device())
    return torch.device("cpu")


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays off: GPUs that support it, CPUs with bfloat16 instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bfloat16()


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
    return t.tolist()


# -- the job -------------------------------------------------------------------------------------------------


def model_parameters(model_dir: str | Path) -> int:
    """The base model's parameters (tied weights once), from its config alone: built on the meta device."""
    config = read_model_config(Path(model_dir))
    with uninitialised_on_meta():
        model = family_of(config).build(config)
    model.tie_weights()
    return count_parameters(model)[1]


def auto_lr(method: str, parameters: int) -> float:
    """The peak learning rate when none is given (see BASE_LR), to two significant digits."""
    scale = min(LR_MAX_SCALE, max(1.0, math.sqrt(LR_REFERENCE_PARAMETERS / max(parameters, 1))))
    return float(f"{BASE_LR[method] * scale:.2g}")


def auto_epochs(steps_per_epoch: int) -> int:
    """DEFAULT_EPOCHS, or as many more passes (up to AUTO_MAX_EPOCHS) as a small data set needs for AUTO_MIN_STEPS
    steps: three passes over 22 records are 6 steps, which teach a model nothing."""
    return max(DEFAULT_EPOCHS, min(AUTO_MAX_EPOCHS, math.ceil(AUTO_MIN_STEPS / max(steps_per_epoch, 1))))


def steps_per_epoch(config: JobConfig, batches_per_epoch: int) -> int:
    return max(batches_per_epoch // config.grad_accum, 1)


def epochs_of(config: JobConfig, batches_per_epoch: int) -> int:
    """The passes a job makes when max_steps does not decide: config.epochs, or auto_epochs()."""
    return config.epochs or auto_epochs(steps_per_epoch(config, batches_per_epoch))


def resolve_val_fraction(config: JobConfig) -> float:
    """The share of the records held out: config.val_fraction, else AUTO_VAL_FRACTION with enough records."""
    if config.val_fraction is None and not config.val_data:
        return AUTO_VAL_FRACTION if _count_records(config.data) >= AUTO_VAL_MIN_RECORDS else 0.0
    return config.val_fraction or 0.0


def preview_plan(config: JobConfig, examples: int) -> dict[str, Any]:
    """What a job would choose, before it starts, for `examples` usable examples (the data preview's count):
    held-out and training examples, batch size, steps, epochs and learning rate, and which of these were
    automatic. For the fine-tune form; the job itself derives the same numbers with the same functions."""
    val_fraction = resolve_val_fraction(config)
    held_out = max(1, round(examples * val_fraction)) if val_fraction else 0
    batch, per_epoch, total, _ = plan_job(config, max(examples - held_out, 1))
    parameters = model_parameters(config.model)
    return {
        "lr": config.lr or auto_lr(config.method, parameters), "lr_auto": not config.lr, "parameters": parameters,
        "total_steps": total, "steps_per_epoch": steps_per_epoch(config, per_epoch), "batch_size": batch,
        "epochs": None if config.max_steps else epochs_of(config, per_epoch),
        "epochs_auto": not config.max_steps and not config.epochs, "train_examples": examples - held_out,
        "val_examples": held_out, "method": config.method,
    }


def plan_job(config: JobConfig, train_examples: int) -> tuple[int, int, int, int]:
    """(batch_size, batches_per_epoch, total_steps, eval_interval) for the data size."""
    batch = config.batch_size
    if train_examples < batch:
        batch = max(config.nproc, train_examples - train_examples % config.nproc)
        if train_examples < config.nproc:
            raise DataError(f"{train_examples} training example(s) cannot be split over {config.nproc} processes")
        log.warning("only %d training examples: batch size lowered from %d to %d", train_examples, config.batch_size, batch)
    per_epoch = train_examples // batch
    total = config.max_steps or epochs_of(config, per_epoch) * steps_per_epoch(config, per_epoch)
    eval_interval = config.eval_interval or max(1, total // 10)
    return batch, per_epoch, total, eval_interval


def run_job(
    config: JobConfig,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> JobResult:
    """Run a job to its end in this process (one worker of it under torchrun); never raises for job failures.

    should_stop: polled before every step, like SIGTERM (cancels with a checkpoint). on_progress gets every
    progress record. The outcome is the returned JobResult and the last status line of progress.jsonl.
    Raises JobError, before writing anything, if the output folder holds another job (or, with resume,
    the same job with other settings).
    """
    dist = Dist.from_env()
    out = Path(config.out)
    if not dist.active:
        _check_out_dir(config, resume)
    out.mkdir(parents=True, exist_ok=True)
    progress = ProgressLog(out / PROGRESS_FILE, enabled=dist.is_main)
    stop = _StopFlag(out / CANCEL_FILE)
    if not dist.active:
        (out / CANCEL_FILE).unlink(missing_ok=True)  # a leftover of an earlier run (only the launcher makes it)
    try:
        with stop.handling_signals():
            return _run(config, resume, dist, out, progress, stop, should_stop, on_progress)
    except BaseException as e:  # noqa: BLE001 - every failure is reported, then the process exits non-zero
        reason = failure_reason(e)
        if not isinstance(e, (EngineError, ValueError)):
            log.exception("job failed")
        else:
            log.error("%s", reason)
        try:
            progress.status("failed", reason=reason)
            if dist.active:
                (out / f".rank-{dist.rank}.error").write_text(reason + "\n", encoding="utf-8")
        except OSError:
            pass
        if isinstance(e, KeyboardInterrupt):
            raise
        return JobResult("failed", reason=reason)


class _StopFlag:
    """Set by SIGTERM/SIGINT (or the launcher's cancel file); read by the training loop between steps."""

    def __init__(self, cancel_file: Path):
        self.cancel_file = cancel_file
        self.signal_name: str | None = None

    def is_set(self) -> bool:
        if self.signal_name is None and self.cancel_file.exists():
            self.signal_name = self.cancel_file.read_text(encoding="utf-8").strip() or "request"
        return self.signal_name is not None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT set the flag while inside (signal handlers exist in the main thread only)."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def failure_reason(e: BaseException) -> str:
    """One line for progress.jsonl and the CLI."""
    text = " ".join(str(e).split())
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text.lower():
        return (f"out of memory ({text[:200]}); lower batch_size or max_seq_len (raise grad_accum to keep the "
                "global batch), or use LoRA")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"disk full: {text}"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, (EngineError, ValueError)):
        return text
    return f"{type(e).__name__}: {text}"


def _run(config, resume, dist, out, progress, stop, should_stop, on_progress) -> JobResult:
    if not dist.active:
        progress.status("running", pid=os.getpid(), resumed=resume, nproc=1, start_step=_start_step(out, resume))
    device = _resolve_device(config, dist)
    if dist.active:
        import torch.distributed as tdist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(config.seed)

    model_dir = Path(config.model)
    model_config = read_model_config(model_dir)
    tokenizer = ChatTokenizer.load(model_dir)
    max_seq_len = min(config.max_seq_len or 1024, model_config.max_position_embeddings)
    val_fraction = resolve_val_fraction(config)

    def stop_requested() -> bool:  # this process only: no collective call before training starts
        if should_stop is not None and stop.signal_name is None and should_stop():
            stop.signal_name = "request"
        return stop.is_set()

    try:
        data = prepare_data(tokenizer, config.data, max_seq_len, config.val_data, val_fraction or None, config.seed,
                            should_stop=stop_requested)
    except DataCancelled:
        progress.status("cancelled", reason=f"cancelled by {stop.signal_name} while preparing the data", step=0,
                        start_step=_start_step(out, resume), checkpoint=None, adapter=None)
        return JobResult("cancelled", step=0)
    progress.write({"type": "data", **data.report.to_dict()})
    batch, per_epoch, total_steps, eval_interval = plan_job(config, len(data.train))

    model = load_trainable_model(model_dir, device)
    targets: list[str] = []
    lora: LoRAConfig | None = None
    if config.method == "lora":
        targets = list(config.target_modules) or default_targets(model)
        torch.manual_seed(config.seed)  # the adapters' initialisation
        try:
            lora = apply_lora(model, targets, config.lora_rank, config.lora_alpha, config.lora_dropout)
        except ValueError as e:
            raise JobError(str(e)) from None
    trainable, total_params = count_parameters(model)
    lr = config.lr or auto_lr(config.method, model_parameters(model_dir))
    bf16 = config.precision == "bf16" or (config.precision == "auto" and has_fast_bf16(device))
    plan = Plan(
        total_steps=total_steps, warmup_steps=math.ceil(config.warmup_ratio * total_steps), lr=lr,
        max_seq_len=max_seq_len, batch_size=batch, target_modules=targets, trainable_parameters=trainable,
        total_parameters=total_params, device=str(device), bf16=bf16, val_fraction=val_fraction or 0.0,
        batches_per_epoch=per_epoch,
    )
    if dist.is_main:
        (out / RESOLVED_FILE).write_text(
            json.dumps({"config": config.to_dict(), "plan": asdict(plan)}, indent=2) + "\n", encoding="utf-8"
        )
    train_config = TrainConfig(
        lr=lr, warmup_steps=plan.warmup_steps, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio,
        weight_decay=config.weight_decay, betas=(0.9, 0.999), grad_clip=config.grad_clip,
        grad_accum=config.grad_accum, bf16=bf16, eval_interval=eval_interval if data.val else 0,
        checkpoint_interval=config.checkpoint_interval or eval_interval, keep_last=config.keep_checkpoints,
        log_interval=config.log_interval or max(1, total_steps // 200), seed=config.seed,
    )
    pad = pad_token_id(tokenizer)
    train_batches = ExampleBatches(data.train, batch, pad, seed=config.seed, rank=dist.rank, world_size=dist.world)
    val_batches = (
        ExampleBatches(data.val, batch // dist.world, pad, shuffle=False, drop_last=False) if data.val else None
    )

    net: nn.Module = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    def stop_now() -> bool:
        flag = stop_requested()
        if dist.active:
            flag = _all_reduce([float(flag)], device, "max")[0] > 0
        return flag

    sample_examples = (data.val or data.train)[:SAMPLE_PROMPTS]
    eos_ids = set(read_defaults(model_dir).eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)

    def report(record: Progress) -> None:
        if dist.active:  # every rank reports at the same steps: combine their numbers (losses are world x shares)
            loss, speed, seen = _all_reduce([record.loss or 0.0, record.tokens_per_s, float(record.tokens_seen)], device)
            record.loss = loss / dist.world if record.loss is not None else None
            record.tokens_per_s, record.tokens_seen = speed, int(seen)
        progress.write({"type": "progress", **asdict(record)})
        if record.val_loss is not None and dist.is_main:  # an evaluation: what the model now answers
            progress.write({"type": "samples", "step": record.step, "held_out": bool(data.val),
                            "samples": sample_replies(model, tokenizer, sample_examples, eos_ids, device)})
        if on_progress is not None:
            on_progress(record)

    start_step = _start_step(out, resume)
    if dist.is_main:
        log.info("training %s: %d steps, %d/%d parameters trainable", config.method, total_steps, trainable, total_params)
    result = train(
        net, train_batches, train_config, val_data=val_batches, out_dir=_rank_checkpoint_dir(out, dist.rank),
        resume=resume, on_progress=report, should_stop=stop_now,
    )
    if dist.active:
        import torch.distributed as tdist

        tdist.destroy_process_group()
    if not dist.is_main:
        return JobResult("cancelled" if result.cancelled else "done", step=result.step)

    if result.history:  # the last record's loss (averaged over the ranks under DDP)
        result.train_loss = result.history[-1].loss if result.history[-1].loss is not None else result.train_loss
    adapter_dir = merged_dir = merged_gguf = tuned_dir = None
    if lora is not None and result.step > 0:
        adapter_dir = str(save_adapter(model, lora, out / "adapter", model_dir))
    checkpoint = latest_checkpoint(out / CHECKPOINTS)
    if result.cancelled:
        reason = f"cancelled by {stop.signal_name}"
        progress.status("cancelled", reason=reason, step=result.step, start_step=start_step,
                        checkpoint=str(checkpoint) if checkpoint else None, adapter=adapter_dir)
        return JobResult("cancelled", step=result.step, train_loss=result.train_loss, val_loss=result.val_loss,
                         adapter_dir=adapter_dir, history=result.history)
    model.eval()
    if lora is not None and (config.merge or config.merge_gguf):
        merged = merge_lora(model)
        if config.merge:
            merged_dir = str(save_hf_checkpoint(merged, model_dir, out / "merged"))
        if config.merge_gguf:
            merged_gguf = str(_export_merged(merged, model_config, model_dir, out, config.merge_gguf, progress))
    elif lora is None:
        tuned_dir = str(save_hf_checkpoint(model, model_dir, out / "model"))
    progress.status("done", step=result.step, train_loss=result.train_loss, val_loss=result.val_loss,
                    adapter=adapter_dir, merged=merged_dir, merged_gguf=merged_gguf, model=tuned_dir,
                    base_model=str(model_dir))
    return JobResult("done", step=result.step, train_loss=result.train_loss, val_loss=result.val_loss,
                     adapter_dir=adapter_dir, merged_dir=merged_dir, merged_gguf=merged_gguf, model_dir=tuned_dir,
                     history=result.history)


def _export_merged(model: nn.Module, config, base: Path, out: Path, file_type: str, progress: ProgressLog) -> Path:
    """merged.gguf, with "export" records ({"done", "total"}: weight values written) for the watchers."""
    def report(done: int, total: int) -> None:
        progress.write({"type": "export", "file": MERGED_GGUF, "done": done, "total": total})

    name = f"{base.stem if base.is_file() else base.name} ({out.name}, fine-tuned)"
    return export_gguf(dict(model.named_parameters()), config, base, out / MERGED_GGUF, file_type, name=name,
                       progress=report).path


def sample_replies(model: nn.Module, tokenizer: ChatTokenizer, examples: list, eos_ids: set[int], device: torch.device,
                   max_new_tokens: int = SAMPLE_TOKENS) -> list[dict[str, str]]:
    """The model's greedy replies to each example's prompt (its tokens before the first trained one; a text record's
    first few tokens), with the expected reply (the first trained span). No KV cache: a few short replies per
    evaluation."""
    was_training = model.training
    model.eval()
    samples = []
    with torch.no_grad():
        for example in examples:
            trained = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
            start = trained[0] or min(8, len(example.input_ids) // 2)  # text records train on every token
            end = next((i for i in range(start, len(example.labels)) if example.labels[i] == IGNORE_INDEX),
                       len(example.labels))
            ids = list(example.input_ids[:start])
            reply: list[int] = []
            for _ in range(max_new_tokens):
                logits = model(torch.tensor([ids + reply], device=device))  # (1, T, V)
                token = int(logits[0, -1].argmax())
                if token in eos_ids:
                    break
                reply.append(token)
            samples.append({"prompt": example.prompt or tokenizer.decode(ids).strip(),
                            "reply": tokenizer.decode(reply).strip(),
                            "expected": tokenizer.decode(list(example.input_ids[start:end])).strip()})
    model.train(was_training)
    return samples


def _start_step(out: Path, resume: bool) -> int:
    """The step a run starts from: its newest checkpoint's when resuming, else 0."""
    checkpoint = latest_checkpoint(out / CHECKPOINTS) if resume else None
    return int(checkpoint.name.split("-")[1]) if checkpoint is not None else 0


def _count_records(files: list[str]) -> int:
    n = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                n += sum(1 for line in f if line.strip())
        except OSError:
            return 0  # prepare_data reports the missing file
    return n


# -- several processes ---------------------------------------------------------------------------------------


def launch_distributed(config: JobConfig, config_path: Path, resume: bool) -> int:
    """Run the job under torchrun with config.nproc workers; this process relays cancellation and reports
    failures the workers could not (a worker killed, or torchrun failing to start them)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = ProgressLog(out / PROGRESS_FILE)
    try:
        _check_out_dir(config, resume)
    except JobError as e:
        print(f"engine.finetune: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    (out / CANCEL_FILE).unlink(missing_ok=True)
    for stale in out.glob(".rank-*.error"):
        stale.unlink()
    start_step = (reconcile_rank_checkpoints(out, config.nproc) or 0) if resume else 0
    progress.status("running", pid=os.getpid(), resumed=resume, nproc=config.nproc, start_step=start_step)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc-per-node={config.nproc}", "-m", "engine.finetune", "--config", str(config_path), "--worker",
    ] + (["--resume"] if resume else [])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.nproc)))

    def cancel(signum, frame):
        (out / CANCEL_FILE).write_text(signal.Signals(signum).name, encoding="utf-8")

    previous = {sig: signal.signal(sig, cancel) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = subprocess.call(cmd, env=env)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        (out / CANCEL_FILE).unlink(missing_ok=True)
    status = last_status(out / PROGRESS_FILE)
    if status is None or status["status"] not in FINAL_STATUSES:
        errors = [p.read_text(encoding="utf-8").strip() for p in sorted(out.glob(".rank-*.error"))]
        reason = errors[0] if errors else f"torchrun exited with code {code} (a worker died; see the job log)"
        progress.status("failed", reason=reason)
        return EXIT_FAILED
    return {"done": EXIT_DONE, "cancelled": EXIT_CANCELLED}.get(status["status"], EXIT_FAILED)


# -- entry point ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.finetune", description="Run a fine-tune job.")
    p.add_argument("--config", required=True, type=Path, metavar="JOB.toml", help="the job's settings")
    p.add_argument("--resume", action="store_true", help="continue from the job's newest checkpoint")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the torchrun launch
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except JobError as e:
        print(f"engine.finetune: error: {e}", file=sys.stderr)
        queued_here = args.config.parent / PROGRESS_FILE  # a job folder made by chattui.jobs: say why there
        if queued_here.exists():
            ProgressLog(queued_here).status("failed", reason=str(e))
        return EXIT_FAILED
    if config.nproc > 1 and not args.worker:
        return launch_distributed(config, args.config, args.resume)
    try:
        return run_job(config, resume=args.resume).exit_code
    except JobError as e:  # not written to progress.jsonl: the folder belongs to another job
        print(f"engine.finetune: error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
