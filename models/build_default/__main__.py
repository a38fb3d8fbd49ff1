"""`python -m models.build_default [STAGE]`: rebuild models/default/ from scratch (takes about 1.5 hours on 2 CPU cores).

Stages, in order (`all` runs them all): data, tokenizer, pretrain, sft, tune, card. Each reads what the previous
ones wrote in the work folder (default: <cache>/work), so a stage can be rerun alone; pretrain and sft resume
from their latest checkpoint if interrupted (delete the work folder to start over).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from models import DEFAULT_MODEL_DIR

STAGES = ("data", "tokenizer", "pretrain", "sft", "tune", "card")
console = Console(stderr=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.build_default", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", nargs="?", default="all", choices=(*STAGES, "all"), help="what to (re)build (default: all)")
    p.add_argument("--cache", type=Path, default=Path(user_cache_dir("chattui")) / "build_default",
                   help="downloads go here (default: %(default)s)")
    p.add_argument("--work", type=Path, help="corpus, checkpoints and logs (default: CACHE/work)")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="the model folder (default: %(default)s)")
    p.add_argument("--pretrain-minutes", type=float, default=55.0, help="time budget that sets the pre-training steps")
    p.add_argument("--sft-minutes", type=float, default=15.0, help="time budget that sets the chat-tuning steps")
    p.add_argument("--pretrain-steps", type=int, help="fixed number of pre-training steps (instead of the budget)")
    p.add_argument("--sft-steps", type=int, help="fixed number of chat-tuning steps (instead of the budget)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def progress_bar(title: str):
    """A rich progress bar driven by the training loop's progress records."""
    bar = Progress(
        TextColumn(f"[bold]{title}[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )
    task = bar.add_task(title, total=None, info="")

    def on_progress(record) -> None:
        info = f"loss {record.loss:.3f}" if record.loss is not None else ""
        if record.val_loss is not None:
            info += f" val {record.val_loss:.3f}"
        info += f" {record.tokens_per_s:,.0f} tok/s"
        bar.update(task, completed=record.step, total=record.total_steps, info=info)
        if not console.is_terminal:
            console.log(f"{title} step {record.step}/{record.total_steps} {info} eta {record.eta_s / 60:.1f} min")

    return bar, on_progress


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or args.cache / "work"
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        console.rule(f"[bold]{stage}")
        run_stage(stage, args, work)
    return 0


def run_stage(stage: str, args: argparse.Namespace, work: Path) -> None:
    if stage == "data":
        from models.build_default.data import build_corpus
        from models.build_default.sources import SOURCES, fetch

        for source in SOURCES:
            path = fetch(args.cache, source)
            console.log(f"{source.package}: {path.name}")
        stats = build_corpus(args.cache, work)
        console.log(json.dumps(stats))
    elif stage == "tokenizer":
        from models.build_default.data import read_jsonl
        from models.build_default.stages import SEQ_LEN
        from models.build_default.tokenizer import save_tokenizer, train_tokenizer

        save_tokenizer(train_tokenizer(read_jsonl(work / "train.jsonl")), work / "tokenizer", SEQ_LEN)
        console.log(f"tokenizer written to {work / 'tokenizer'}")
    elif stage in ("pretrain", "sft"):
        from models.build_default import stages

        bar, on_progress = progress_bar(stage)
        with bar:
            if stage == "pretrain":
                record = stages.pretrain(work, args.pretrain_minutes, args.pretrain_steps, on_progress, args.seed)
            else:
                record = stages.sft(work, args.sft_minutes, args.sft_steps, on_progress, args.seed)
        console.log(f"{stage}: val loss {record['final_val_loss']:.3f}, {record['wall_time_s'] / 60:.1f} min")
    elif stage == "tune":
        from models.build_default.card import tune_sampling

        tune_sampling(work, args.out, console)
    elif stage == "card":
        from models.build_default.card import write_card

        write_card(work, args.out, console)


if __name__ == "__main__":
    sys.exit(main())
