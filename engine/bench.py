"""`chattui bench`: time to first token, prefill and decode speed, peak memory, weight bandwidth.

Runs greedy generation of a fixed length (no early eos) on a checkpoint or on random weights of a
preset shape. Baselines run on the very same weights and prompt ids, interleaved run by run with
ours, so all see the same machine state; the report gives ratios, not absolutes: compare_hf runs
transformers' `generate`, compare_llamacpp runs llama.cpp on the GGUF file (engine/bench_llamacpp.py).
Weight GB/s is set against the memory read bandwidth measured in the same run.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.bench_llamacpp import LlamaCppRunner, gguf_bytes_per_token, import_llama_cpp
from engine.checkpoint import BLOCKS_COMPUTE_DTYPE, keeps_gguf_blocks, load_model, read_model_config, weight_files
from engine.device import dtype_name, resolve_device, resolve_dtype
from engine.errors import EngineError
from engine.generate import generate_tokens
from engine.gguf.header import is_gguf_path
from engine.inference import prepare_for_inference
from engine.kernels.bench_quant import measured_bandwidth
from engine.kv_cache import KVCache
from engine.params import SamplingParams
from engine.presets import PRESETS
from engine.quant import QuantizedEmbedding, QuantizedLinear, count_weights
from models.registry import config_from_hf, family_of


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
    compare_llamacpp: bool = False
    llamacpp_model: Path | None = None  # the GGUF llama.cpp runs; default: model_dir when it is a GGUF


@dataclass
class RunTiming:
    ttft_s: float
    decode_s: float  # from the first to the last generated token
    tokens: list[int]  # the greedy tokens, to tell how far the baselines agree with us


@dataclass
class Baseline:
    name: str  # its key in the report: "transformers", "llama.cpp"
    run: Callable[[list[int], int], RunTiming]  # (prompt ids, new tokens) -> timing
    weight_bytes: int  # bytes of weights one decode step reads on its side


def _random_model(hf_config: dict, device, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = config_from_hf(hf_config)
    model = family_of(config).build(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.init_buffers()
    return prepare_for_inference(model.to(device=device, dtype=dtype), device, dtype)


def _weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and persistent buffer as stored (dense or
    GGUF blocks), each storage once, except input-only embedding tables (a lookup reads one row; a
    table tied to the output head is counted through the head)."""
    read: dict[int, int] = {}  # storage address -> bytes
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, QuantizedEmbedding)):
            continue
        weights = [b for name, b in module.named_buffers(recurse=False)  # a quantized layer's blocks, too
                   if b is not None and (name not in module._non_persistent_buffers_set or isinstance(module, QuantizedLinear))]
        for t in [*module.parameters(recurse=False), *weights]:
            read[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(read.values())


def _time_ours(model, prompt: list[int], new_tokens: int, device, dtype) -> RunTiming:
    cache = KVCache.for_model(model.config, len(prompt) + new_tokens, dtype, device)
    greedy = SamplingParams(temperature=0.0)
    started = time.perf_counter()
    steps = list(generate_tokens(
        model, prompt, cache=cache, reuse=0, params=greedy, max_new_tokens=new_tokens,
        generator=torch.Generator(device=device),
    ))
    return RunTiming(steps[0].time - started, steps[-1].time - steps[0].time, [s.token for s in steps])


def _hf_model(options: BenchOptions, hf_config: dict | None, ours: torch.nn.Module, device, dtype):
    import transformers

    if options.model_dir is not None and is_gguf_path(options.model_dir):  # transformers dequantizes it too
        path = Path(options.model_dir)
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).to(device).eval()
    if options.model_dir is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(options.model_dir, dtype=dtype).to(device).eval()
    config = transformers.AutoConfig.for_model(
        family_of(ours.config).model_type(ours.config.architecture),
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
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, streamer=clock, pad_token_id=0,
        )
    token_times = clock.times[1:]  # the first put() is the prompt
    return RunTiming(token_times[0] - started, token_times[-1] - token_times[0], out[0, len(prompt):].tolist())


def _time_llamacpp(runner: LlamaCppRunner, prompt: list[int], new_tokens: int) -> RunTiming:
    """The same work as _time_ours: prefill the prompt ids, then one decode step per greedy token."""
    runner.reset()
    started = time.perf_counter()
    tokens = [runner.greedy_after(prompt)]
    first = time.perf_counter()
    while len(tokens) < new_tokens:
        tokens.append(runner.greedy_after(tokens[-1:]))
    return RunTiming(first - started, time.perf_counter() - first, tokens)


def _llamacpp_file(options: BenchOptions) -> Path:
    """The GGUF llama.cpp runs, checked before anything loads: it must hold the weights chattui runs."""
    if options.llamacpp_model is not None:
        if options.model_dir is None:
            raise EngineError("--llamacpp-model needs --model with the same weights (a preset's weights are random)")
        path = Path(options.llamacpp_model).expanduser()
        if not is_gguf_path(path):
            raise EngineError(f"{path}: --llamacpp-model must be a GGUF file")
    elif options.model_dir is None or not is_gguf_path(options.model_dir):
        raise EngineError("--compare-llamacpp runs llama.cpp on a GGUF file: give --model FILE.gguf, or "
                          "--llamacpp-model FILE.gguf holding the same weights as --model")
    else:
        path = Path(options.model_dir).expanduser()
    import_llama_cpp()
    return path


def _agreement(ours: list[int], theirs: list[int]) -> int:
    """How many leading greedy tokens are the same."""
    same = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        same += 1
    return same


def _summary(runs: list[RunTiming], prompt_tokens: int, new_tokens: int, weight_bytes: int,
             memory_gb_s: float) -> dict[str, float]:
    ttft = statistics.median(r.ttft_s for r in runs)
    decode = statistics.median(r.decode_s for r in runs)
    decode_tokens_per_s = (new_tokens - 1) / decode if decode > 0 else 0.0
    weight_gb_s = weight_bytes * decode_tokens_per_s / 1e9
    return {
        "ttft_s": ttft,
        "prefill_tokens_per_s": prompt_tokens / ttft,
        "decode_tokens_per_s": decode_tokens_per_s,
        "weight_bytes_per_token": weight_bytes,
        "weight_bandwidth_gb_s": weight_gb_s,
        "bandwidth_fraction": weight_gb_s / memory_gb_s,
    }


def _kv_cache_bytes(config, positions: int, dtype: torch.dtype) -> int:
    """What a KV cache of `positions` positions holds (keys and values of every layer)."""
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_position * positions * torch.empty(0, dtype=dtype).element_size()


def _weights_file_bytes(model_dir: Path) -> int:
    """The checkpoint's weights on disk: the GGUF file, or the folder's safetensors files."""
    return sum(f.stat().st_size for f in ([model_dir] if is_gguf_path(model_dir) else weight_files(model_dir)))


def _rss_ratios(peak_rss_mb: float, runtime_rss_mb: float, file_bytes: int, kv_bytes: int) -> dict[str, float]:
    """Peak RSS against the weights file + KV cache: the whole process's, and what loading and running the
    model added to the process (peak minus what Python and PyTorch held before it)."""
    held = file_bytes + kv_bytes
    return {"peak_rss_over_file_and_kv": peak_rss_mb * 2**20 / held,
            "model_rss_over_file_and_kv": (peak_rss_mb - runtime_rss_mb) * 2**20 / held}


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


def run_bench(options: BenchOptions, progress=None) -> dict[str, Any]:
    """Run the benchmark; returns a plain dict (what --json prints)."""
    llamacpp_file = _llamacpp_file(options) if options.compare_llamacpp else None
    runtime_rss = _peak_rss_mb()  # Python, PyTorch and our modules, before any model: what every model adds to
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if options.model_dir is not None:
        hf_config = None  # only presets need it
        keep_blocks = keeps_gguf_blocks(options.model_dir, options.dtype, device)  # as Engine.load decides
        if keep_blocks:
            dtype = BLOCKS_COMPUTE_DTYPE
        model = load_model(options.model_dir, read_model_config(options.model_dir), device, dtype,
                           keep_blocks=keep_blocks)
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
    weight_bytes = _weight_bytes_per_token(model)
    baselines: list[Baseline] = []
    notes: dict[str, Any] = {}
    if options.compare_hf:
        say("building the transformers model on the same weights")
        hf = _hf_model(options, hf_config, model, device, dtype)
        baselines.append(Baseline("transformers", lambda p, n: _time_hf(hf, p, n, device), weight_bytes))
    if llamacpp_file is not None:
        say(f"loading {llamacpp_file} in llama.cpp")
        runner = LlamaCppRunner(llamacpp_file, torch.get_num_threads(), options.prompt_tokens + n_new)
        if runner.vocab_size < model.config.vocab_size:
            raise EngineError(f"{llamacpp_file}: llama.cpp's vocabulary has {runner.vocab_size} tokens, "
                              f"the model {model.config.vocab_size}: not the same weights")
        notes["llamacpp_model"] = str(llamacpp_file)
        notes["llamacpp_extra_layouts"] = runner.extra_layouts
        baselines.append(Baseline("llama.cpp", lambda p, n: _time_llamacpp(runner, p, n),
                                  gguf_bytes_per_token(llamacpp_file)))
    for baseline in baselines:
        baseline.run(prompt, n_new)  # warm-up
    ours_runs: list[RunTiming] = []
    baseline_runs: dict[str, list[RunTiming]] = {b.name: [] for b in baselines}
    memory_gb_s = 0.0  # the best read bandwidth of one measurement per run: what the machine can do
    for i in range(options.repeat):
        say(f"run {i + 1}/{options.repeat}")
        memory_gb_s = max(memory_gb_s, measured_bandwidth(seconds=0.2)[0])
        ours_runs.append(_time_ours(model, prompt, n_new, device, dtype))
        for baseline in baselines:
            baseline_runs[baseline.name].append(baseline.run(prompt, n_new))
    ours = _summary(ours_runs, options.prompt_tokens, n_new, weight_bytes, memory_gb_s)
    kv_bytes = _kv_cache_bytes(model.config, options.prompt_tokens + n_new, dtype)
    file_bytes = _weights_file_bytes(Path(options.model_dir)) if options.model_dir is not None else None
    report: dict[str, Any] = {
        "model": source,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "parameters": count_weights(model),
        "prompt_tokens": options.prompt_tokens,
        "new_tokens": n_new,
        "repeat": options.repeat,
        "peak_rss_mb": peak_rss,
        "runtime_rss_mb": runtime_rss,
        "kv_cache_mb": kv_bytes / 1e6,
        "weights_file_mb": file_bytes / 1e6 if file_bytes is not None else None,  # None: a preset's random weights
        **(_rss_ratios(peak_rss, runtime_rss, file_bytes, kv_bytes) if file_bytes is not None else {}),
        "memory_read_gb_s": memory_gb_s,
        **notes,
        "chattui": ours,
    }
    if baselines:
        report["ratios"] = {}
    for baseline in baselines:
        runs = baseline_runs[baseline.name]
        theirs = _summary(runs, options.prompt_tokens, n_new, baseline.weight_bytes, memory_gb_s)
        theirs["greedy_tokens_agreeing"] = _agreement(ours_runs[-1].tokens, runs[-1].tokens)
        report[baseline.name] = theirs
        report["ratios"][baseline.name] = {
            "decode_speedup": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
            "prefill_speedup": ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"],
            "ttft_ratio": ours["ttft_s"] / theirs["ttft_s"],
        }
    if llamacpp_file is not None:
        runner.close()
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
    table.add_column("of memory", justify="right")
    baselines = [name for name in report.get("ratios", {})]
    for name in ["chattui", *baselines]:
        r = report[name]
        table.add_row(
            name, f"{r['ttft_s'] * 1000:.1f}", f"{r['prefill_tokens_per_s']:.0f}",
            f"{r['decode_tokens_per_s']:.1f}", f"{r['weight_bandwidth_gb_s']:.1f}", f"{r['bandwidth_fraction']:.0%}",
        )
    for name in baselines:
        q = report["ratios"][name]
        table.add_row(
            f"chattui / {name}", f"{q['ttft_ratio']:.2f}x (lower is better)",
            f"{q['prefill_speedup']:.2f}x", f"{q['decode_speedup']:.2f}x", "", "",
        )
    agreeing = [f"{report[name]['greedy_tokens_agreeing']}/{report['new_tokens']} greedy tokens agree with {name}"
                for name in baselines]
    table.caption = " · ".join([
        f"memory read {report['memory_read_gb_s']:.1f} GB/s (measured in this run)",
        f"peak RSS {report['peak_rss_mb']:.0f} MB (chattui alone; {report['runtime_rss_mb']:.0f} MB of it before "
        f"the model loaded; KV cache {report['kv_cache_mb']:.0f} MB)",
        *([f"weights file {report['weights_file_mb']:.0f} MB: peak RSS {report['peak_rss_over_file_and_kv']:.2f}x "
           f"the file + KV cache, the model's part of it {report['model_rss_over_file_and_kv']:.2f}x"]
          if report.get("weights_file_mb") is not None else []),
        f"{report['chattui']['weight_bytes_per_token'] / 1e6:.0f} MB of weights read per token",
        *agreeing,
    ])
    return table
