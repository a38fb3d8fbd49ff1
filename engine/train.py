"""A small, generic training loop: AdamW, warmup + cosine schedule, clipping, accumulation, checkpoints.

Used to pre-train and chat-tune the bundled default model (`python -m models.build_default`) and meant to be
reused by fine-tunes (full or LoRA: only parameters with `requires_grad` are optimised and checkpointed).

Batches are `Batch(input_ids, labels)` with labels aligned to input_ids (Hugging Face convention: the loss at
position t compares logits[t] with labels[t + 1]; -100 marks positions that are not trained on).

Resuming restores the model, the optimizer, the schedule, the RNG states and the position in the data
(batches already consumed in the current epoch are skipped), so a resumed run continues with exactly the
losses an uninterrupted one would have produced.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.atomic import atomic_folder
from engine.errors import TrainingDiverged

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value for positions without a loss
CHECKPOINT_PREFIX = "step-"  # checkpoint folders are out_dir/step-0000123


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX where no loss; aligned with input_ids


@dataclass
class TrainConfig:
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps
    warmup_steps: int = 100  # linear warmup from 0 to lr
    total_steps: int = 1000  # optimizer steps; the decay ends here
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    schedule: str = "cosine"  # "cosine": decay from warmup to total_steps; "wsd": constant, then decay_steps of cosine
    decay_steps: int = 0  # wsd only: length of the final decay (0: constant lr after warmup)
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only (not norms, biases)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    bf16: bool = False  # bfloat16 autocast for forward/backward (weights and optimizer stay float32)
    eval_interval: int = 0  # steps between validation passes; 0: only at the end
    eval_batches: int = 0  # validation batches per pass; 0: all
    checkpoint_interval: int = 0  # steps between checkpoints; 0: only at the end (when out_dir is set)
    keep_last: int = 2  # checkpoints kept in out_dir (older ones are deleted)
    log_interval: int = 10  # steps between progress records
    seed: int = 0  # seeds torch and random at the start of a fresh run


@dataclass
class Progress:
    """One JSON-lines progress record (also passed to the callback)."""

    step: int  # optimizer steps done
    total_steps: int
    epoch: int  # passes over the training data started so far (0-based)
    loss: float | None  # mean training loss per target token over the steps since the last record
    val_loss: float | None  # set on records written right after a validation pass
    lr: float  # learning rate of the last step
    tokens_seen: int  # target tokens trained on so far (positions with a label)
    tokens_per_s: float  # input tokens per second since the last record
    elapsed_s: float  # wall time of this run (not counting time before a resume)
    eta_s: float  # estimated seconds to total_steps at the recent speed
    grad_norm: float | None = None  # global gradient norm before clipping, of the last step


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    epoch: int
    tokens_seen: int
    train_loss: float | None  # mean loss over the last log interval
    val_loss: float | None  # the last validation loss
    elapsed_s: float
    cancelled: bool  # stopped early by should_stop
    history: list[Progress] = field(default_factory=list)  # every progress record of this call


ProgressCallback = Callable[[Progress], None]


# -- schedule ------------------------------------------------------------------------------------------------


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio.

    With schedule "wsd" (warmup-stable-decay) the rate stays at lr until the last decay_steps, which follow the
    cosine: a run can be extended (or its end decided late) without changing the steps already taken.
    """
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "wsd":
        if config.decay_steps <= 0:
            return config.lr
        decay_start = config.total_steps - config.decay_steps
        progress = min(max(step - decay_start, 0) / config.decay_steps, 1.0)
    elif config.schedule == "cosine":
        decay_steps = max(config.total_steps - config.warmup_steps, 1)
        progress = min(max(step - config.warmup_steps, 0) / decay_steps, 1.0)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r} (expected 'cosine' or 'wsd')")
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; weight decay on 2-D+ tensors only."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, config) / config.lr)


# -- loss ----------------------------------------------------------------------------------------------------


def token_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, number of those positions)."""
    logits = model(batch.input_ids)  # (B, T, V)
    targets = batch.labels[:, 1:]  # (B, T-1)
    logits = logits[:, :-1].float()  # (B, T-1, V)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, int((targets != IGNORE_INDEX).sum())


def _loss_scale(targets: int, device: torch.device) -> float:
    """1 / (target tokens of the step). Under DistributedDataParallel, which averages gradients over
    ranks, world / (targets of all ranks): the step then equals one large batch even when ranks hold
    different numbers of target tokens."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1.0 / max(targets, 1)
    total = torch.tensor([float(targets)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return dist.get_world_size() / max(float(total.item()), 1.0)


def count_targets(batch: Batch) -> int:
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], bf16: bool = False, max_batches: int = 0) -> float:
    """Mean next-token loss per labelled position over the batches (at most max_batches; 0 = all)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = _to_device(batch, device)
        with _autocast(device, bf16):
            loss_sum, n = token_losses(model, batch)
        total += float(loss_sum)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(batch.input_ids.to(device), batch.labels.to(device))


# -- checkpoints ---------------------------------------------------------------------------------------------


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, each tensor once (tied weights under their first name)."""
    state, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            state[name] = p.detach().contiguous()
    return state


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": _encode_python_rng(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _encode_python_rng(state: tuple) -> torch.Tensor:
    version, internal, gauss = state
    assert gauss is None or isinstance(gauss, float)
    return torch.tensor([version, *internal], dtype=torch.int64)


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    values = [int(v) for v in state["python"].tolist()]
    random.setstate((values[0], tuple(values[1:]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    meta: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write out_dir/step-NNNNNNN/{model.safetensors, trainer.pt, meta.json} atomically and prune old ones.

    Written through engine.atomic.atomic_folder: a crash leaves either the whole checkpoint or none of it
    (stale temporary folders are removed later).
    """
    final = Path(out_dir) / f"{CHECKPOINT_PREFIX}{meta['step']:07d}"
    with atomic_folder(final) as tmp:
        save_file(trainable_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
            tmp / "trainer.pt",
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    pattern = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := pattern.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint folder into model (and optimizer, scheduler, RNG); returns its meta.json."""
    path = Path(path)
    weights = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{path}: checkpoint has weights the model lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{path}: shape mismatch for {name}: {list(tensor.shape)} vs {list(params[name].shape)}")
            params[name].copy_(tensor)
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _restore_rng(state["rng"])
    return json.loads((path / "meta.json").read_text(encoding="utf-8"))


def _remove_stale_temporaries(out_dir: Path) -> None:
    if out_dir.is_dir():
        for p in [*out_dir.glob(".tmp-*"), *out_dir.glob(".old-*")]:  # left by a write that crashed
            shutil.rmtree(p, ignore_errors=True)


# -- the loop ------------------------------------------------------------------------------------------------


def _epoch_batches(data: Iterable[Batch], epoch: int) -> Iterator[Batch]:
    """Iterate one epoch; loaders with set_epoch (like torch's DistributedSampler) reshuffle per epoch."""
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
    return iter(data)


def train(
    model: nn.Module,
    train_data: Iterable[Batch],
    config: TrainConfig,
    val_data: Iterable[Batch] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    on_progress: ProgressCallback | None = None,
    log_file: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train model for config.total_steps optimizer steps over train_data (re-iterated per epoch).

    out_dir: where checkpoints go (none without it); with resume, training continues from the latest one.
    log_file: JSON-lines progress records are appended to it. on_progress gets the same records.
    should_stop: checked before every step; when it returns True, a checkpoint is written (with out_dir) and
    the call returns with cancelled=True.
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    device = _device_of(model)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    step, epoch, batch_in_epoch, tokens_seen = 0, 0, 0, 0
    val_loss: float | None = None

    checkpoint = latest_checkpoint(out_dir) if (out_dir is not None and resume) else None
    if out_dir is not None:
        _remove_stale_temporaries(out_dir)
    if checkpoint is not None:
        meta = load_checkpoint(checkpoint, model, optimizer, scheduler)
        step, epoch, batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        tokens_seen, val_loss = meta["tokens_seen"], meta.get("val_loss")
        log.info("resumed from %s (step %d)", checkpoint, step)
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)

    log_fh = open(log_file, "a", encoding="utf-8") if log_file is not None else None
    history: list[Progress] = []
    started = time.perf_counter()
    # The window: steps since the last progress record, for its mean loss, speed and ETA.
    window_started, window_tokens, window_loss, window_count = started, 0, 0.0, 0
    window_eval_s = 0.0  # validation time inside the window, left out of the training speed
    last_loss: float | None = None
    grad_norm: float | None = None
    cancelled = False

    batches = _epoch_batches(train_data, epoch)
    for _ in range(batch_in_epoch):  # fast-forward to where the checkpoint left the data
        next(batches)

    def next_batch() -> Batch:
        nonlocal batches, epoch, batch_in_epoch
        while True:
            try:
                batch = next(batches)
                batch_in_epoch += 1
                return batch
            except StopIteration:
                if batch_in_epoch == 0:
                    raise ValueError("the training data yielded no batches") from None
                epoch += 1
                batch_in_epoch = 0
                batches = _epoch_batches(train_data, epoch)

    def checkpoint_meta() -> dict[str, Any]:
        return {
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "tokens_seen": tokens_seen,
            "val_loss": val_loss, "train_loss": last_loss, "config": asdict(config),
        }

    def emit(with_val: bool) -> None:
        nonlocal window_started, window_tokens, window_loss, window_count, window_eval_s, last_loss
        now = time.perf_counter()
        train_s = max(now - window_started - window_eval_s, 1e-9)
        speed = window_tokens / train_s
        last_loss = window_loss / window_count if window_count else last_loss
        remaining = config.total_steps - step
        step_time = train_s / max(window_count, 1)
        record = Progress(
            step=step, total_steps=config.total_steps, epoch=epoch, loss=last_loss,
            val_loss=val_loss if with_val else None, lr=scheduler.get_last_lr()[0], tokens_seen=tokens_seen,
            tokens_per_s=speed, elapsed_s=now - started, eta_s=remaining * step_time, grad_norm=grad_norm,
        )
        history.append(record)
        if log_fh is not None:
            log_fh.write(json.dumps(asdict(record)) + "\n")
            log_fh.flush()
        if on_progress is not None:
            on_progress(record)
        window_started, window_tokens, window_loss, window_count, window_eval_s = now, 0, 0.0, 0, 0.0

    def validate() -> float:
        nonlocal window_eval_s
        t0 = time.perf_counter()
        loss = evaluate(model, val_data, config.bf16, config.eval_batches)
        window_eval_s += time.perf_counter() - t0
        return loss

    model.train()
    try:
        while step < config.total_steps:
            if should_stop is not None and should_stop():
                cancelled = True
                break
            micro = [next_batch() for _ in range(config.grad_accum)]
            targets = sum(count_targets(b) for b in micro)
            scale = _loss_scale(targets, device)
            step_loss = 0.0
            for batch in micro:
                batch = _to_device(batch, device)
                with _autocast(device, config.bf16):
                    loss_sum, _ = token_losses(model, batch)
                # Normalise by the targets of the whole step, so accumulation equals one large batch.
                (loss_sum * scale).backward()
                step_loss += float(loss_sum.detach())
                window_tokens += batch.input_ids.numel()
            params = [p for g in optimizer.param_groups for p in g["params"]]
            if config.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
            # Stop before the update: the weights (and every checkpoint) stay those of the last healthy step.
            if not math.isfinite(step_loss) or (config.grad_clip > 0 and not math.isfinite(grad_norm)):
                what = f"loss {step_loss}" if not math.isfinite(step_loss) else f"gradient norm {grad_norm}"
                raise TrainingDiverged(f"training diverged at step {step + 1} ({what}); lower the learning rate "
                                       "(nothing of this step was saved)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            tokens_seen += targets
            window_loss += step_loss * scale  # under DDP: this rank's share of the global mean, times world
            window_count += 1

            evaluated = False
            if val_data is not None and config.eval_interval and step % config.eval_interval == 0:
                val_loss = validate()
                evaluated = True
            if step % max(config.log_interval, 1) == 0 or evaluated:
                emit(evaluated)
            if out_dir is not None and config.checkpoint_interval and step % config.checkpoint_interval == 0:
                save_checkpoint(out_dir, model, optimizer, scheduler, checkpoint_meta(), config.keep_last)

        if not cancelled and val_data is not None and not (config.eval_interval and step % config.eval_interval == 0):
            val_loss = validate()
            emit(True)
        elif window_count:
            emit(False)
        if out_dir is not None and step > 0:
            latest = latest_checkpoint(out_dir)
            if latest is None or not latest.name.endswith(f"{step:07d}"):
                save_checkpoint(out_dir, model, optimizer, scheduler, checkpoint_meta(), config.keep_last)
    finally:
        if log_fh is not None:
            log_fh.close()
    return TrainResult(
        step=step, epoch=epoch, tokens_seen=tokens_seen, train_loss=last_loss, val_loss=val_loss,
        elapsed_s=time.perf_counter() - started, cancelled=cancelled, history=history,
    )
