"""The training stages: model shape, pre-training on all text, chat fine-tuning, export to Hugging Face format.

Every stage reads and writes files in the work folder, so each can be rerun on its own, and appends its numbers
to work/training_log.json, which the model card is generated from.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from engine.tokenizer import ChatTokenizer
from engine.train import IGNORE_INDEX, Progress, TrainConfig, evaluate, train
from engine.train_data import ChatExample, RowBatches, chat_example, pack_documents, pack_examples
from models.build_default.data import read_jsonl
from models.build_default.tokenizer import IM_END, PAD, SPECIAL_TOKENS, render
from models.registry import config_from_hf
from models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

SEQ_LEN = 512  # context length, for training and in config.json
MICRO_BATCH = 8  # rows per forward pass
GRAD_ACCUM = 1  # micro-batches per optimizer step: 8 x 512 = 4096 tokens per step

# The architecture (see the model card for why this size): 6 layers of width 192, tied 8k embeddings.
MODEL_SHAPE = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 3,
    "num_key_value_heads": 3,
    "head_dim": 64,
}


def hf_config(vocab_size: int) -> dict:
    """config.json for transformers' LlamaForCausalLM (and our models.llama)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        **MODEL_SHAPE,
        "hidden_act": "silu",
        "max_position_embeddings": SEQ_LEN,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": SPECIAL_TOKENS.index(PAD),
        "eos_token_id": SPECIAL_TOKENS.index(IM_END),
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "float32",
    }


def build_model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model: N(0, 0.02) weights, residual outputs scaled by 1/sqrt(2 x layers) (GPT-2)."""
    torch.manual_seed(seed)
    config = config_from_hf(hf_config(vocab_size))
    model = LlamaForCausalLM(config)
    residual_std = 0.02 / math.sqrt(2 * config.num_hidden_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embedding = model.model.embed_tokens.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


# -- data ----------------------------------------------------------------------------------------------------


def _tokenize_texts(tokenizer: ChatTokenizer, conversations: list[dict]) -> list[list[int]]:
    encoded = tokenizer._tokenizer.encode_batch([render(c["messages"]) for c in conversations], add_special_tokens=False)
    return [e.ids for e in encoded]


def pretrain_rows(tokenizer: ChatTokenizer, conversations: list[dict]) -> torch.Tensor:
    """All conversations as ChatML text, separated by <|endoftext|>, packed into (N, SEQ_LEN) rows."""
    return pack_documents(_tokenize_texts(tokenizer, conversations), SEQ_LEN, SPECIAL_TOKENS.index(PAD))


COMMON_REPEATS = 3  # copies of each common-word record in the chat-tuning data


def sft_conversations(conversations: list[dict]) -> list[dict]:
    """Chat-tuning data: everything but the rarer WordNet words (pre-training has seen those); the common
    words' records repeated, so the model learns their definitions by heart."""
    kept = []
    for conv in conversations:
        if conv.get("common"):
            kept += [conv] * COMMON_REPEATS
        elif conv["source"] != "wordnet":
            kept.append(conv)
    return kept


def chat_examples(tokenizer: ChatTokenizer, conversations: list[dict]) -> list[ChatExample]:
    """Chat examples with loss on assistant messages; long conversations are cut into windows of whole turns."""
    examples = []
    for conv in conversations:
        for window in _windows(tokenizer, conv["messages"]):
            examples.append(chat_example(tokenizer, window, SEQ_LEN))
    return examples


def _windows(tokenizer: ChatTokenizer, messages: list[dict]) -> list[list[dict]]:
    """Consecutive (user, assistant) turns that fit SEQ_LEN tokens together, each window starting with a user."""
    lengths = [len(tokenizer.encode(render([m]), add_special_tokens=False)) for m in messages]
    windows, current, size = [], [], 0
    for i in range(0, len(messages) - 1, 2):
        pair, pair_len = messages[i : i + 2], lengths[i] + lengths[i + 1]
        if current and size + pair_len > SEQ_LEN:
            windows.append(current)
            current, size = [], 0
        current = current + pair
        size += pair_len
    if current:
        windows.append(current)
    return windows


def unigram_loss(train_rows: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats per token) of an add-one unigram model of train_rows on the labelled targets."""
    counts = torch.bincount(train_rows.flatten(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    t = targets[targets != IGNORE_INDEX]
    return float(-logp[t].mean())


# -- training ------------------------------------------------------------------------------------------------


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} CPU threads, no GPU, PyTorch {torch.__version__}"


DECAY_FRACTION = 0.25  # of a time budget spent decaying the learning rate (the rest at the peak rate)


def fit(
    name: str,
    model: nn.Module,
    train_batches: RowBatches,
    val_batches: RowBatches,
    config: TrainConfig,
    stage_dir: Path,
    minutes: float,
    steps: int | None,
    on_progress: Callable[[Progress], None] | None,
) -> dict:
    """Train for a fixed number of steps (cosine schedule) or for a wall-clock budget (warmup-stable-decay).

    With a budget, the learning rate stays at its peak until (1 - DECAY_FRACTION) of the time is used; the
    decay length is then set from the measured speed, so the run ends on time however busy the CPU is. The
    steps chosen are kept in plan.json (rerunning resumes the same plan; --steps fixes them for a rebuild).
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    plan_path = stage_dir / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    if steps is not None:
        plan = {"schedule": "cosine", "total_steps": steps, "decay_steps": 0}
    elif "total_steps" not in plan:
        deadline = time.monotonic() + minutes * 60 * (1 - DECAY_FRACTION)
        stable = replace(config, schedule="wsd", decay_steps=0, total_steps=10**9)
        result = train(
            model, train_batches, stable, val_data=val_batches, out_dir=stage_dir / "checkpoints",
            on_progress=on_progress, log_file=stage_dir / "progress.jsonl",
            should_stop=lambda: time.monotonic() > deadline,
        )
        recent = [r.tokens_per_s for r in result.history[-6:] if r.tokens_per_s > 0]
        step_tokens = config.grad_accum * MICRO_BATCH * SEQ_LEN
        step_s = step_tokens / (sum(recent) / len(recent)) if recent else 10.0
        decay = max(int(minutes * 60 * DECAY_FRACTION / step_s), 10)
        plan = {"schedule": "wsd", "stable_steps": result.step, "decay_steps": decay,
                "total_steps": result.step + decay, "minutes": minutes}
        log.info("%s: %d steps at the peak rate, then %d decay steps (%.2f s/step)", name, result.step, decay, step_s)
    plan_path.write_text(json.dumps(plan) + "\n")
    config = replace(config, schedule=plan["schedule"], total_steps=plan["total_steps"], decay_steps=plan["decay_steps"])
    record = run_stage(name, model, train_batches, val_batches, config, stage_dir, on_progress)
    record["plan"] = plan
    return record


def run_stage(
    name: str,
    model: nn.Module,
    train_batches: RowBatches,
    val_batches: RowBatches,
    config: TrainConfig,
    stage_dir: Path,
    on_progress: Callable[[Progress], None] | None,
) -> dict:
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = train(
        model, train_batches, config, val_data=val_batches, out_dir=stage_dir / "checkpoints",
        on_progress=on_progress, log_file=stage_dir / "progress.jsonl",
    )
    final_val = evaluate(model, val_batches, bf16=config.bf16)
    curve = [json.loads(line) for line in (stage_dir / "progress.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in curve if r["loss"] is not None]
    return {
        "stage": name,
        "steps": result.step,
        "epochs": round(result.step * config.grad_accum / max(len(train_batches), 1), 3),
        "tokens_seen": result.tokens_seen,
        "input_tokens_seen": result.step * config.grad_accum * MICRO_BATCH * SEQ_LEN,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_val_loss": final_val,
        "val_perplexity": math.exp(final_val),
        "wall_time_s": round(sum_wall_time(curve, time.time() - started), 1),
        "config": asdict(config),
        "val_curve": [{"step": r["step"], "val_loss": r["val_loss"]} for r in curve if r["val_loss"] is not None],
        "train_curve": [{"step": r["step"], "loss": r["loss"]} for r in curve if r["loss"] is not None],
    }


def sum_wall_time(curve: list[dict], this_call_s: float) -> float:
    """Training wall time across resumes: each resumed call restarts elapsed_s from zero."""
    total, last = 0.0, 0.0
    for r in curve:
        if r["elapsed_s"] < last:
            total += last
        last = r["elapsed_s"]
    return total + last if curve else this_call_s


def pretrain(work: Path, minutes: float, steps: int | None, on_progress=None, seed: int = 0) -> dict:
    torch.set_flush_denormal(True)
    tokenizer = ChatTokenizer.from_dir(work / "tokenizer")
    train_rows = pretrain_rows(tokenizer, read_jsonl(work / "train.jsonl"))
    val_rows = pretrain_rows(tokenizer, read_jsonl(work / "val.jsonl"))
    model = build_model(tokenizer.vocab_size, seed)
    train_batches = RowBatches(train_rows, batch_size=MICRO_BATCH, seed=seed)
    val_batches = RowBatches(val_rows, batch_size=MICRO_BATCH, shuffle=False, drop_last=False)
    config = TrainConfig(
        lr=2e-3, warmup_steps=40, min_lr_ratio=0.1, weight_decay=0.1, betas=(0.9, 0.95),
        grad_clip=1.0, grad_accum=GRAD_ACCUM, bf16=True, eval_interval=150, eval_batches=8,
        checkpoint_interval=150, keep_last=2, log_interval=10, seed=seed,
    )
    record = fit("pretrain", model, train_batches, val_batches, config, work / "pretrain", minutes, steps, on_progress)
    return finish_stage(
        work, "pretrain", model, record,
        train_tokens_per_epoch=int(train_rows.numel()),
        val_tokens=int(val_rows.numel()),
        unigram_val_loss=unigram_loss(train_rows, val_rows[:, 1:], tokenizer.vocab_size),
    )


def sft(work: Path, minutes: float, steps: int | None, on_progress=None, seed: int = 0) -> dict:
    torch.set_flush_denormal(True)
    tokenizer = ChatTokenizer.from_dir(work / "tokenizer")
    pad = SPECIAL_TOKENS.index(PAD)
    train_chats = sft_conversations(read_jsonl(work / "train.jsonl"))
    train_ids, train_labels = pack_examples(chat_examples(tokenizer, train_chats), SEQ_LEN, pad, seed)
    val_chats = sft_conversations(read_jsonl(work / "val.jsonl"))
    val_ids, val_labels = pack_examples(chat_examples(tokenizer, val_chats), SEQ_LEN, pad, None)
    model = build_model(tokenizer.vocab_size, seed)
    load_weights(model, work / "pretrain" / "model.safetensors")
    train_batches = RowBatches(train_ids, train_labels, batch_size=MICRO_BATCH, seed=seed + 1)
    val_batches = RowBatches(val_ids, val_labels, batch_size=MICRO_BATCH, shuffle=False, drop_last=False)
    config = TrainConfig(
        lr=1e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1, betas=(0.9, 0.95),
        grad_clip=1.0, grad_accum=GRAD_ACCUM, bf16=True, eval_interval=60, eval_batches=8,
        checkpoint_interval=60, keep_last=2, log_interval=10, seed=seed,
    )
    before = evaluate(model, val_batches, bf16=True)
    record = fit("sft", model, train_batches, val_batches, config, work / "sft", minutes, steps, on_progress)
    train_rows = pretrain_rows(tokenizer, read_jsonl(work / "train.jsonl"))
    return finish_stage(
        work, "sft", model, record,
        train_examples_rows=len(train_ids),
        assistant_tokens_per_epoch=int((train_labels[:, 1:] != IGNORE_INDEX).sum()),
        val_assistant_tokens=int((val_labels[:, 1:] != IGNORE_INDEX).sum()),
        val_loss_before_sft=before,
        unigram_val_loss=unigram_loss(train_rows, val_labels[:, 1:], tokenizer.vocab_size),
    )


def finish_stage(work: Path, stage: str, model: nn.Module, record: dict, **numbers) -> dict:
    """Complete a stage's record (its numbers, the model size, the hardware), save its weights, log it."""
    record.update(numbers, parameters=count_parameters(model), hardware=hardware())
    record["unigram_val_perplexity"] = math.exp(record["unigram_val_loss"])
    save_weights(model, work / stage / "model.safetensors")
    update_log(work, stage, record)
    return record


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's weights as Hugging Face keys, lm_head left out (tied to embed_tokens)."""
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()


def update_log(work: Path, stage: str, record: dict) -> None:
    path = work / "training_log.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[stage] = record
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export(work: Path, out: Path, generation_config: dict) -> None:
    """models/default/: config, generation config, weights, tokenizer, licences and the training log."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = work / "tokenizer"
    vocab = ChatTokenizer.from_dir(tokenizer_dir).vocab_size
    (out / "config.json").write_text(json.dumps(hf_config(vocab), indent=2) + "\n", encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(work / "sft" / "model.safetensors", out / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    for name in ("LICENSE-WordNet", "LICENSE-chitchat-dataset"):
        shutil.copyfile(work / name, out / name)
