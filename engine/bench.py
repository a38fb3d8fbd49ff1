"""`chattui bench`: time to first token, prefill and decode speed, peak memory, weight bandwidth.

Runs greedy generation of a fixed length (no early eos) on a checkpoint or on random weights of a
preset shape. With compare_hf, transformers' `generate` runs on the very same weights, interleaved
run by run with ours, so both see the same machine state; the report gives ratios, not absolutes.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import load_model, read_model_config
from engine.gguf.header import is_gguf_path
from engine.inference import prepare_for_inference
from engine.errors import EngineError
from engine.device import dtype_name, resolve_device, resolve_dtype
from engine.generate import generate_tokens
from engine.kv_cache import KVCache
from engine.sampling import SamplingParams
from models import build_model
from models.config import config_from_hf

PRESETS: dict[str, dict[str, Any]] = {
    "smollm-135m": {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "tie_word_embeddings": True, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "tie_word_embeddings": True, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    },
}


@dataclass
class BenchOptions:
    model_dir: Path | None = None
    preset: str | None = None  # used when model_dir is None; default smollm-135m
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    prompt_tokens: int = 128
    new_tokens: int = 64
    repeat: int = 5
    compare_hf: bool = False


@dataclass
class RunTiming:
    ttft_s: float
    decode_s: float  # from the first to the last generated token


def _random_model(hf_config: dict, device, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(config_from_hf(hf_config))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.init_buffers()
    return prepare_for_inference(model.to(device=device, dtype=dtype), device, dtype)


def _weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: all of them except input-only embedding tables."""
    lm_head = model.lm_head.weight
    total = 0
    for name, p in model.named_parameters():
        input_only = isinstance(_owner(model, name), torch.nn.Embedding) and p is not lm_head
        if not input_only:
            total += p.numel() * p.element_size()
    return total


def _owner(model: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0])


def _time_ours(model, prompt: list[int], new_tokens: int, device, dtype) -> RunTiming:
    cache = KVCache.for_model(model.config, len(prompt) + new_tokens, dtype, device)
    greedy = SamplingParams(temperature=0.0)
    started = time.perf_counter()
    times = [
        step.time
        for step in generate_tokens(
            model, prompt, cache=cache, reuse=0, params=greedy, max_new_tokens=new_tokens,
            generator=torch.Generator(device=device),
        )
    ]
    return RunTiming(times[0] - started, times[-1] - times[0])


def _hf_model(options: BenchOptions, hf_config: dict | None, ours: torch.nn.Module, device, dtype):
    import transformers

    if options.model_dir is not None and is_gguf_path(options.model_dir):  # transformers dequantizes it too
        path = Path(options.model_dir)
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).to(device).eval()
    if options.model_dir is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(options.model_dir, dtype=dtype).to(device).eval()
    config = transformers.AutoConfig.for_model(
        {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[hf_config["architectures"][0]],
        **{k: v for k, v in hf_config.items() if k != "architectures"},
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Same key names on both sides: the same values, in the standard memory layout transformers uses.
    weights = {name: t.contiguous() for name, t in ours.state_dict().items()}
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    return model.to(device).eval()


def _time_hf(model, prompt: list[int], new_tokens: int, device) -> RunTiming:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    ids = torch.tensor([prompt], device=device)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, streamer=clock, pad_token_id=0,
        )
    token_times = clock.times[1:]  # the first put() is the prompt
    return RunTiming(token_times[0] - started, token_times[-1] - token_times[0])


def _summary(runs: list[RunTiming], prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    ttft = statistics.median(r.ttft_s for r in runs)
    decode = statistics.median(r.decode_s for r in runs)
    return {
        "ttft_s": ttft,
        "prefill_tokens_per_s": prompt_tokens / ttft,
        "decode_tokens_per_s": (new_tokens - 1) / decode if decode > 0 else 0.0,
    }


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


def run_bench(options: BenchOptions, progress=None) -> dict[str, Any]:
    """Run the benchmark; returns a plain dict (what --json prints)."""
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if options.model_dir is not None:
        hf_config = None  # only presets need it
        model = load_model(options.model_dir, read_model_config(options.model_dir), device, dtype)
        source = str(options.model_dir)
    else:
        preset = options.preset or "smollm-135m"
        hf_config = PRESETS[preset]
        model = _random_model(hf_config, device, dtype)
        source = f"preset {preset} (random weights)"
    n_new = options.new_tokens
    context = model.config.max_position_embeddings
    if options.prompt_tokens + n_new > context:
        raise EngineError(f"prompt + new tokens ({options.prompt_tokens + n_new}) exceed the context ({context})")
    prompt = torch.randint(0, model.config.vocab_size, (options.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()

    def say(msg: str) -> None:
        if progress is not None:
            progress.log(msg)

    say(f"warm-up on {source}")
    _time_ours(model, prompt, n_new, device, dtype)
    peak_rss = _peak_rss_mb()
    hf = None
    if options.compare_hf:
        say("building the transformers model on the same weights")
        hf = _hf_model(options, hf_config, model, device, dtype)
        _time_hf(hf, prompt, n_new, device)
    ours_runs, hf_runs = [], []
    for i in range(options.repeat):
        say(f"run {i + 1}/{options.repeat}")
        ours_runs.append(_time_ours(model, prompt, n_new, device, dtype))
        if hf is not None:
            hf_runs.append(_time_hf(hf, prompt, n_new, device))
    ours = _summary(ours_runs, options.prompt_tokens, n_new)
    weight_bytes = _weight_bytes_per_token(model)
    ours["weight_bandwidth_gb_s"] = weight_bytes * ours["decode_tokens_per_s"] / 1e9
    report: dict[str, Any] = {
        "model": source,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompt_tokens": options.prompt_tokens,
        "new_tokens": n_new,
        "repeat": options.repeat,
        "peak_rss_mb": peak_rss,
        "chattui": ours,
    }
    if hf is not None:
        theirs = _summary(hf_runs, options.prompt_tokens, n_new)
        theirs["weight_bandwidth_gb_s"] = weight_bytes * theirs["decode_tokens_per_s"] / 1e9
        report["transformers"] = theirs
        report["ratios"] = {
            "decode_speedup": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
            "prefill_speedup": ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"],
            "ttft_ratio": ours["ttft_s"] / theirs["ttft_s"],
        }
    return report


def format_report(report: dict[str, Any]):
    """A rich Table of the report."""
    from rich.table import Table

    table = Table(
        title=f"{report['model']} · {report['device']} {report['dtype']} · {report['threads']} threads · "
        f"{report['prompt_tokens']} prompt + {report['new_tokens']} new tokens · median of {report['repeat']}",
    )
    table.add_column("")
    table.add_column("TTFT (ms)", justify="right")
    table.add_column("prefill tok/s", justify="right")
    table.add_column("decode tok/s", justify="right")
    table.add_column("weights GB/s", justify="right")
    rows = [("chattui", report["chattui"])]
    if "transformers" in report:
        rows.append(("transformers", report["transformers"]))
    for name, r in rows:
        table.add_row(
            name, f"{r['ttft_s'] * 1000:.1f}", f"{r['prefill_tokens_per_s']:.0f}",
            f"{r['decode_tokens_per_s']:.1f}", f"{r['weight_bandwidth_gb_s']:.1f}",
        )
    if "ratios" in report:
        q = report["ratios"]
        table.add_row(
            "chattui / transformers", f"{q['ttft_ratio']:.2f}x (lower is better)",
            f"{q['prefill_speedup']:.2f}x", f"{q['decode_speedup']:.2f}x", "",
        )
    table.caption = f"peak RSS {report['peak_rss_mb']:.0f} MB (chattui alone) · {report['parameters'] / 1e6:.1f}M parameters"
    return table
