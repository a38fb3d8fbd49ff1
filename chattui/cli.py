"""Command-line interface: `chattui generate`, `chattui bench`, and the app when run bare
(`chattui [--model MODEL] [--adapter DIR] [--device D] [--dtype D]`). `--model` takes a path or a name
that `chattui models` lists; main() resolves it for every command.

Errors from bad input are printed as one line (`chattui: error: ...`) with a non-zero exit code.
The engine (and torch) is imported only by the subcommands that need it, so the app opens at once.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from chattui import models_cli
from chattui.catalog import is_gguf_file
from chattui.models_cli import MODEL_HELP
from chattui.paths import bundled_model_dir
from chattui.terminal_text import displayable, for_stream, json_for_terminal

DEFAULT_MODEL_DIR = bundled_model_dir()

log = logging.getLogger("chattui")


class CommandError(Exception):
    """A user error detected by the CLI itself."""


def default_model_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise CommandError(
            f"the bundled default model is not installed ({DEFAULT_MODEL_DIR} has no config.json); "
            "pass --model DIR with a Hugging Face-format checkpoint folder"
        )
    return DEFAULT_MODEL_DIR


def add_version_argument(p: argparse.ArgumentParser) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("chattui")
    except PackageNotFoundError:  # run from a source tree that was never installed
        installed = "(not installed)"
    p.add_argument("--version", action="version", version=f"chattui {installed}", help="print the version and exit")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="MODEL", help=f"{MODEL_HELP} (default: the bundled model)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps (default: auto)")
    p.add_argument(
        "--dtype", default="auto",
        help="auto, float32, bfloat16, float16 (default: auto = bfloat16 on CUDA and on CPUs with "
        "bfloat16 instructions, else float32; a GGUF's weights are dequantized to it)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chattui",
        description="Chat with, look inside and fine-tune Transformer language models in your terminal.",
    )
    add_version_argument(parser)
    parser.add_argument("--model", dest="app_model", metavar="MODEL",
                        help=f"with no COMMAND: open the chat app on this {MODEL_HELP} "
                        "(default: the most recently used one, at first the bundled model)")
    parser.add_argument("--device", dest="app_device", metavar="D", help="with no COMMAND: auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--adapter", dest="app_adapter", metavar="DIR", type=Path,
                        help="with no COMMAND: apply this LoRA adapter (a fine-tune job's adapter/ folder) unmerged")
    parser.add_argument("--dtype", dest="app_dtype", metavar="D",
                        help="with no COMMAND: auto, float32, bfloat16, float16")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="generate a reply (or a raw continuation) and print it",
        description="Generate a reply to PROMPT (one user message rendered with the model's chat template) "
        "or, with --raw, a plain continuation of PROMPT. The text streams to stdout.",
    )
    add_model_arguments(g)
    g.add_argument("--adapter", metavar="DIR", type=Path, help="apply this LoRA adapter (PEFT format) without merging")
    g.add_argument("--raw", action="store_true", help="continue PROMPT as-is, without the chat template")
    g.add_argument("--system", metavar="TEXT", help="system prompt (chat mode only)")
    g.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default: from generation_config.json)")
    g.add_argument("--top-k", type=int, metavar="K", help="0 = off")
    g.add_argument("--top-p", type=float, metavar="P", help="1 = off")
    g.add_argument("--min-p", type=float, metavar="P", help="0 = off")
    g.add_argument("--repetition-penalty", type=float, metavar="R", help="1 = off")
    g.add_argument("--seed", type=int, metavar="S", help="sampling seed (default: random, reported with --json)")
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="default: from generation_config.json, else 512")
    g.add_argument(
        "--stop", action="append", default=[], metavar="STR",
        help="stop when this string appears (never printed); repeatable",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object with the text, ids and stats instead")
    g.add_argument(
        "--show-prompt", action="store_true",
        help="do not generate: print the exact prompt to stdout and its token count to stderr",
    )
    g.add_argument("prompt", metavar="PROMPT|-", help="the prompt, or - to read it from stdin")
    g.set_defaults(run=cmd_generate)

    b = sub.add_parser(
        "bench",
        help="measure time to first token, prefill and decode speed",
        description="Benchmark prefill and decode on a checkpoint or on random weights of a preset shape, with "
        "weight GB/s against the memory bandwidth measured in the same run; --compare-hf runs transformers' "
        "generate and --compare-llamacpp llama.cpp on the same weights and prompt ids, interleaved, and prints ratios.",
    )
    from engine.presets import PRESETS

    b.add_argument("--model", metavar="MODEL", help=f"{MODEL_HELP} (instead of --preset)")
    b.add_argument("--preset", choices=sorted(PRESETS), help="random weights of a known shape (default: smollm-135m)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    b.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (default: auto)")
    b.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch and llama.cpp (default: torch's choice)")
    b.add_argument("--prompt-tokens", type=int, default=128, metavar="N", help="prompt length (default: 128)")
    b.add_argument("--new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default: 64)")
    b.add_argument("--repeat", type=int, default=5, metavar="N", help="measured runs after one warm-up (default: 5)")
    b.add_argument("--compare-hf", action="store_true", help="also run transformers' generate and print ratios")
    b.add_argument("--compare-llamacpp", action="store_true",
                   help="also run llama.cpp (llama-cpp-python, the bench extra) on the GGUF file and print ratios")
    b.add_argument("--llamacpp-model", metavar="FILE.gguf",
                   help="the GGUF of --model's weights for llama.cpp (e.g. an F32 or BF16 "
                   "GGUF of a safetensors folder; implies --compare-llamacpp; default: --model itself when it is a GGUF)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    b.set_defaults(run=cmd_bench)

    from chattui import attention_cli, finetune_cli, gguf_export_cli

    attention_cli.add_parser(sub)
    finetune_cli.add_parser(sub)
    gguf_export_cli.add_parser(sub)
    models_cli.add_parser(sub)
    return parser


def read_prompt(arg: str) -> str:
    """The PROMPT argument, or stdin for "-"; invalid UTF-8 is replaced (U+FFFD) with a warning."""
    if arg != "-":
        return text_argument(arg, "PROMPT")
    if sys.stdin is None:
        raise CommandError("PROMPT is - but standard input is closed")
    return decode_utf8(sys.stdin.buffer.read(), "standard input")


def text_argument(value: str, name: str) -> str:
    """A text argument from argv, where Python keeps invalid UTF-8 bytes as lone surrogates."""
    try:
        raw = value.encode("utf-8", "surrogateescape")  # the bytes as given on the command line
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "replace")
    return decode_utf8(raw, name)


def decode_utf8(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        log.warning("warning: %s is not valid UTF-8 (byte %d); invalid bytes were replaced with U+FFFD",
                    source, e.start)
        return raw.decode("utf-8", "replace")


def sampling_from_args(args, defaults: SamplingParams) -> SamplingParams:
    from engine import SamplingParams

    params = SamplingParams(
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        top_k=defaults.top_k if args.top_k is None else args.top_k,
        top_p=defaults.top_p if args.top_p is None else args.top_p,
        min_p=defaults.min_p if args.min_p is None else args.min_p,
        repetition_penalty=defaults.repetition_penalty if args.repetition_penalty is None else args.repetition_penalty,
        seed=args.seed,
    )
    try:
        params.validate()
    except ValueError as e:
        raise CommandError(str(e)) from None
    return params


def load_engine(args):
    """Load the model of --model/--device/--dtype/--adapter, with load_with_progress."""
    from engine import Engine

    adapter = getattr(args, "adapter", None)
    return load_with_progress(
        args, lambda model_dir, progress: Engine.load(model_dir, args.device, args.dtype, progress, adapter)
    )


def load_with_progress(args, load):
    """load(model folder or file, progress callback) with a progress bar on stderr when it is a terminal, else
    only the notes of slow steps (compiling kernels) as lines."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    model_dir = args.model or default_model_dir()
    if not sys.stderr.isatty():
        def note_only(done: int, total: int, note: str | None) -> None:
            if note:
                print(f"chattui: {note}", file=sys.stderr, flush=True)

        return load(model_dir, note_only)
    with Progress(
        TextColumn("loading {task.description}"), BarColumn(), DownloadColumn(),
        transient=True, console=_stderr_console(),
    ) as bar:
        task = bar.add_task(str(model_dir), total=None)

        def show(done: int, total: int, note: str | None) -> None:
            if note:
                bar.update(task, description=f"{model_dir}: {note}")
            else:
                bar.update(task, description=str(model_dir), completed=done, total=total)

        return load(model_dir, show)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def cmd_generate(args) -> int:
    if args.raw and args.system is not None:
        raise CommandError("--system applies to chat prompts; it cannot be combined with --raw")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    text = read_prompt(args.prompt)
    system = text_argument(args.system, "--system") if args.system is not None else None
    stop = [text_argument(s, "--stop") for s in args.stop]
    from chattui.backend import EngineBackend
    from engine.params import GenerationSettings

    backend = EngineBackend()  # the app's way to the engine
    adapter = str(args.adapter) if args.adapter is not None else None
    info = load_with_progress(
        args, lambda model_dir, progress: backend.load(str(model_dir), args.device, args.dtype, progress, adapter)
    )
    settings = GenerationSettings(
        sampling_from_args(args, info.defaults.sampling), args.max_new_tokens or info.defaults.max_new_tokens
    )
    if args.raw:
        prompt = text
    else:
        prompt = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": text}
        ]

    if args.show_prompt:
        rendered = backend.render_prompt(prompt, settings.max_new_tokens)
        if args.json:
            print_json({"prompt": rendered.text, "prompt_tokens": rendered.tokens})
        else:
            sys.stdout.write(for_stream(rendered.text, sys.stdout))
            sys.stdout.flush()
            print(f"{rendered.tokens} tokens", file=sys.stderr)
        return 0

    cancel = threading.Event()

    def on_interrupt(signum, frame):  # the first Ctrl-C stops the reply, a second one the process
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        reply = backend.stream(prompt, settings, cancel, stop=stop)
        for delta in reply:
            if not args.json:
                sys.stdout.write(for_stream(delta, sys.stdout))  # a terminal never gets the model's escapes
                sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    result = reply.result
    if args.json:
        out = {
            "text": result.text,
            "token_ids": result.token_ids,
            "prompt_tokens": result.prompt_tokens,
            "generated_tokens": result.generated_tokens,
            "finish_reason": result.finish_reason,
            "ttft_s": result.ttft_s,
            "prefill_tokens_per_s": result.prefill_tokens_per_s,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "seed": result.seed,
            "device": info.device,
            "dtype": info.dtype,
            "model": info.path,
        }
        print_json(out)
    else:
        sys.stdout.write("\n")
    return 130 if result.finish_reason == "cancelled" else 0


def print_json(value) -> None:
    """One JSON line on stdout: exact values, and no raw control character even inside strings."""
    print(json_for_terminal(json.dumps(value, ensure_ascii=False)))


def cmd_bench(args) -> int:
    from engine.bench import BenchOptions, format_report, run_bench

    if args.model is not None and args.preset is not None:
        raise CommandError("give either --model or --preset, not both")
    for name in ("prompt_tokens", "new_tokens", "repeat"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    options = BenchOptions(
        model_dir=args.model,
        preset=args.preset if args.model is None else None,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeat=args.repeat,
        compare_hf=args.compare_hf,
        compare_llamacpp=args.compare_llamacpp or args.llamacpp_model is not None,
        llamacpp_model=args.llamacpp_model,
    )
    report = run_bench(options, progress=None if args.json else _stderr_console())
    if args.json:
        print_json(report)
    else:
        from rich.console import Console

        Console().print(format_report(report))
    return 0


def cmd_app(args) -> int:
    from chattui.app import run_app
    from chattui.config import DEVICE_PATTERN
    from engine.params import DTYPE_CHOICES, DTYPE_NAMES

    if args.app_device is not None and not DEVICE_PATTERN.fullmatch(args.app_device):
        raise CommandError(f"unknown device {args.app_device!r} (expected auto, cpu, cuda, cuda:N or mps)")
    if args.app_dtype is not None and args.app_dtype not in DTYPE_CHOICES:
        raise CommandError(f"unknown dtype {args.app_dtype!r} (expected auto, {', '.join(DTYPE_NAMES)})")
    model = args.app_model.resolve() if args.app_model is not None else None
    if model is not None and not (model.is_dir() or model.is_file() and is_gguf_file(model)):
        raise CommandError(f"{model}: not a model folder or a .gguf file")
    adapter = args.app_adapter.expanduser().resolve() if args.app_adapter is not None else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise CommandError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    return run_app(str(model) if model else None, args.app_device, args.app_dtype, str(adapter) if adapter else None)


def resolve_model_args(args: argparse.Namespace) -> None:
    """Turn --model's text into a path, for whichever command took it."""
    for attr in ("model", "app_model"):
        value = getattr(args, attr, None)
        if isinstance(value, str):
            try:
                setattr(args, attr, models_cli.resolve_model_arg(value))
            except ValueError as e:
                raise CommandError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input, Ctrl-C (exit 130) and an unwritable stdout end with one line, no traceback."""
    logging.basicConfig(level=logging.WARNING, format="chattui: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = _dispatch(argv)
        if sys.stdout is not None:
            sys.stdout.flush()  # a full disk or a closed pipe shows here, not in the interpreter's exit flush
        return code
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # exiting anyway: another Ctrl-C must not add a traceback
        _say("interrupted")
        return 130
    except OSError as e:
        if e.errno not in (errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EBADF):
            raise
        _say(f"error: cannot write the output ({os.strerror(e.errno)})")
        _discard_stdout()
        return 1


def _dispatch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) is None:
        try:
            resolve_model_args(args)
            return cmd_app(args)
        except CommandError as e:
            _say(f"error: {e}")
            return 1
    from chattui.backend import BackendError
    from engine import EngineError

    try:
        resolve_model_args(args)
        return args.run(args)
    except (CommandError, BackendError, EngineError) as e:
        _say(f"error: {e}")
        return 1


def _say(message: str) -> None:
    """One line on stderr; model-made text in it (a template's own error message) cannot drive the terminal."""
    try:
        print(f"chattui: {displayable(message)}", file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass  # stderr is gone too: the exit code is all that is left


def _discard_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of what is still buffered cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
