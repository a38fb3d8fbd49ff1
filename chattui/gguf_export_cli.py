"""`chattui export-gguf MODEL OUT.gguf --type Q8_0`: write a model, or a LoRA adapter merged into its base, as a
GGUF file that llama.cpp and Ollama load (engine.gguf.writer), with progress bars on a terminal.

Wiring (chattui/cli.py): `gguf_export_cli.add_parser(sub)` in build_parser; `run` raises CommandError or
EngineError for cli.main to print as one line. The engine (and torch) is imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chattui.models_cli import MODEL_HELP
from chattui.trained import adapter_base
from engine.params import GGUF_EXPORT_TYPES


class ExportArgumentError(Exception):
    """A bad OUT path or MODEL/--adapter combination; one line."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export-gguf",
        help="write a model or a fine-tune's adapter (merged) as a GGUF file for llama.cpp and Ollama",
        description="Write MODEL as a GGUF file that llama.cpp and Ollama load, with its tokenizer and chat template. "
        "MODEL may be a LoRA adapter folder (a fine-tune job's adapter/): it is merged into its base model first. "
        "Norms, biases and position embeddings stay F32; matrices whose rows are not whole 32-value blocks are "
        "written F16; 4-bit files keep the output matrix in Q8_0. Supported: Llama, Mistral, Qwen2, Qwen3, GPT-2.",
    )
    p.add_argument("model", metavar="MODEL", help=f"{MODEL_HELP}, or a LoRA adapter folder")
    p.add_argument("out", type=Path, metavar="OUT.gguf", help="the file to write (must not exist yet)")
    p.add_argument("--type", dest="weight_type", type=str.upper, choices=GGUF_EXPORT_TYPES, default="Q8_0",
                   metavar="TYPE", help=f"the matrices' type: {', '.join(GGUF_EXPORT_TYPES)} (default: Q8_0)")
    p.add_argument("--adapter", type=Path, metavar="DIR", help="merge this LoRA adapter (PEFT format) into MODEL first")
    p.add_argument("--name", metavar="TEXT", help="general.name in the file (default: OUT's name without .gguf)")
    p.set_defaults(run=run)
    return p


def sources(model: Path, adapter: Path | None) -> tuple[Path, Path | None]:
    """(the base model, the adapter or None) for MODEL and --adapter."""
    base = adapter_base(model) if model.is_dir() else None
    if base is None:
        return model, adapter
    if adapter is not None:
        raise ExportArgumentError(f"{model} is a LoRA adapter folder; give its base model as MODEL to use --adapter")
    return Path(base), model


def check_out(out: Path) -> Path:
    out = out.expanduser()
    if out.suffix.lower() != ".gguf":
        raise ExportArgumentError(f"{out}: the output file's name must end in .gguf")
    if out.exists():
        raise ExportArgumentError(f"{out}: already exists; remove it or choose another name (nothing was written)")
    return out


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    from chattui.cli import CommandError
    from engine.gguf.writer import export_model

    try:
        out = check_out(args.out)
        model, adapter = sources(Path(args.model), args.adapter)
    except ExportArgumentError as e:
        raise CommandError(str(e)) from None
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as bar:
        loading = bar.add_task(f"loading {model}" + (f" + {adapter}" if adapter else ""), total=None)
        writing = bar.add_task(f"writing {out.name}", total=None, visible=False)

        def on_load(done: int, total: int) -> None:
            bar.update(loading, completed=done, total=total)

        def on_write(done: int, total: int) -> None:
            bar.update(loading, visible=False)
            bar.update(writing, completed=done, total=total, visible=True)

        result = export_model(model, out, args.weight_type, adapter=adapter, name=args.name or "",
                              on_load=on_load, on_write=on_write)
    types = ", ".join(f"{count} {name}" for name, count in sorted(result.tensor_types.items()))
    print(f"wrote {result.path} ({result.weight_type}; tensors: {types}; {result.path.stat().st_size / 1e6:,.1f} MB)")
    print(f"run it: chattui --model {result.path}  |  llama-cli -m {result.path}  |  "
          f"Ollama: a Modelfile with the line FROM {result.path}, then ollama create NAME -f Modelfile")
    return 0
