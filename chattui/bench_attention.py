"""Benchmark (not a test): time and peak memory to open the attention screen's data at 256 and 1,024
tokens, i.e. what the screen's workers do: the capture pass, the first heatmap (layer 0, head 0)
and the head overview (head summaries of every layer).

    python -m chattui.bench_attention [--model DIR] [--device cpu] [--tokens 256 1024]

Each size runs in its own process so that its peak RSS is its own. Default model: models/default.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"
FILLER = ("The attention screen shows what every layer and head of the model attends to, for any message "
          "in a conversation. Long conversations make long sequences; this text repeats until it is long enough. ")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def measure(model: str, device: str, tokens: int) -> dict:
    """In this process: load the model, then time what the screen needs for a `tokens`-long conversation."""
    from chattui.backend import EngineBackend

    backend = EngineBackend()
    backend.load(model, device, "float32")
    engine = backend._engine
    ids = engine.tokenizer.encode(FILLER * (tokens // 8 + 1), add_special_tokens=False)[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"could only make {len(ids)} tokens of filler text")
    text = engine.tokenizer.decode(ids)
    rss_loaded = _peak_rss_mb()
    started = time.perf_counter()
    maps = backend.attention(text)  # the capture worker (forward of every layer)
    captured = time.perf_counter()
    first = maps.head(0, 0)  # the first heatmap
    shown = time.perf_counter()
    for layer in range(maps.num_layers):  # the head overview
        maps.head_summaries(layer)
    done = time.perf_counter()
    return {
        "tokens": len(maps.tokens), "layers": maps.num_layers, "heads": maps.num_heads, "device": str(engine.device),
        "capture_s": round(captured - started, 3), "first_heatmap_s": round(shown - captured, 3),
        "head_overview_s": round(done - shown, 3), "total_s": round(done - started, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_after_load_mb": round(rss_loaded, 1),
        "matrix_shape": list(first.shape),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chattui.bench_attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", metavar="DIR", help=f"checkpoint folder (default: {DEFAULT_MODEL} if it exists)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto ...")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024],
                        help="sequence lengths (default: 256 1024)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: measure one size here
    args = parser.parse_args(argv)
    model = args.model or (str(DEFAULT_MODEL) if (DEFAULT_MODEL / "config.json").exists() else None)
    if model is None:
        parser.error(f"no --model given and {DEFAULT_MODEL} is not installed")
    if args.one:
        print(json.dumps(measure(model, args.device, args.tokens[0])))
        return 0
    print(f"model {model}, device {args.device}")
    print(f"{'tokens':>7} {'capture s':>10} {'heatmap s':>10} {'heads s':>8} {'total s':>8} {'peak RSS MB':>12} "
          f"{'after load MB':>14}")
    for n in args.tokens:
        out = subprocess.run(
            [sys.executable, "-m", "chattui.bench_attention", "--model", model, "--device", args.device,
             "--tokens", str(n), "--one"], capture_output=True, text=True,
        )
        if out.returncode != 0:
            print(f"{n:>7} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['tokens']:>7} {r['capture_s']:>10.3f} {r['first_heatmap_s']:>10.3f} {r['head_overview_s']:>8.3f} "
              f"{r['total_s']:>8.3f} {r['peak_rss_mb']:>12.1f} {r['rss_after_load_mb']:>14.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
