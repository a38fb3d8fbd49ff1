"""engine/bench.py on tiny GGUF files: the report's fields, the weight bytes per token, the measured memory
bandwidth, and the llama.cpp comparison (run for real only where llama-cpp-python is installed)."""

from __future__ import annotations

import importlib.util
import math
import sys

import gguf
import pytest
import torch
from rich.console import Console

from engine.bench import BenchOptions, _weight_bytes_per_token, format_report, run_bench
from engine.errors import EngineError
from gguf_files import Q, write_gguf

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def tiny_gguf(checkpoint_factory, tmp_path_factory):
    path, _ = write_gguf(checkpoint_factory("qwen2"), tmp_path_factory.mktemp("bench") / "m.gguf", "qwen2", Q.Q8_0)
    return path


def _options(path, **overrides) -> BenchOptions:
    return BenchOptions(**{"model_dir": path, "dtype": "float32", "prompt_tokens": 6, "new_tokens": 3, "repeat": 1,
                           **overrides})


def _read_tensors(path) -> list:
    """The file's tensors a decode step reads: all but an untied token_embd (from the file itself)."""
    tensors = gguf.GGUFReader(path).tensors
    untied = any(t.name == "output.weight" for t in tensors)
    return [t for t in tensors if not (untied and t.name == "token_embd.weight")]


def _rendered(report) -> str:
    console = Console(record=True, width=200)
    console.print(format_report(report))
    return console.export_text()


def test_report_of_a_gguf_has_speeds_bandwidth_and_weight_bytes(tiny_gguf):
    report = run_bench(_options(tiny_gguf))
    ours = report["chattui"]
    assert report["memory_read_gb_s"] > 0
    assert ours["decode_tokens_per_s"] > 0 and ours["prefill_tokens_per_s"] > 0 and ours["ttft_s"] > 0
    assert math.isclose(ours["prefill_tokens_per_s"], 6 / ours["ttft_s"])
    # Loaded as float32, every weight a decode step reads is 4 bytes.
    assert ours["weight_bytes_per_token"] == 4 * sum(int(t.n_elements) for t in _read_tensors(tiny_gguf))
    assert math.isclose(ours["weight_bandwidth_gb_s"], ours["weight_bytes_per_token"] * ours["decode_tokens_per_s"] / 1e9)
    assert math.isclose(ours["bandwidth_fraction"], ours["weight_bandwidth_gb_s"] / report["memory_read_gb_s"])
    assert "ratios" not in report and "llama.cpp" not in report
    assert "chattui" in _rendered(report) and "memory read" in _rendered(report)
    # peak RSS against the file + KV cache, whole and less what the process held before the model
    held = tiny_gguf.stat().st_size + report["kv_cache_mb"] * 1e6
    assert report["weights_file_mb"] == tiny_gguf.stat().st_size / 1e6
    assert math.isclose(report["peak_rss_over_file_and_kv"], report["peak_rss_mb"] * 2**20 / held)
    assert math.isclose(report["model_rss_over_file_and_kv"],
                        (report["peak_rss_mb"] - report["runtime_rss_mb"]) * 2**20 / held)
    assert f"{report['peak_rss_over_file_and_kv']:.2f}x the file + KV cache" in _rendered(report)


def test_a_checkpoint_folders_file_size_is_its_safetensors(checkpoint_factory):
    folder = checkpoint_factory("llama")
    report = run_bench(_options(folder))
    assert report["weights_file_mb"] == (folder / "model.safetensors").stat().st_size / 1e6
    assert report["model_rss_over_file_and_kv"] < report["peak_rss_over_file_and_kv"]


def test_with_the_blocks_kept_a_decode_step_reads_the_files_quantized_bytes(tiny_gguf):
    report = run_bench(_options(tiny_gguf, dtype="auto"))
    ours = report["chattui"]
    quantized = [t for t in _read_tensors(tiny_gguf) if t.tensor_type == gguf.GGMLQuantizationType.Q8_0]
    dense = [t for t in _read_tensors(tiny_gguf) if t.tensor_type != gguf.GGMLQuantizationType.Q8_0]
    assert quantized, "the tiny file has Q8_0 matrices"
    # the blocks as stored (their bytes), the dense rest (norms) in float32
    expected = sum(int(t.n_bytes) for t in quantized) + 4 * sum(int(t.n_elements) for t in dense)
    assert ours["weight_bytes_per_token"] == expected


class _Blocks(torch.nn.Module):
    """Stands in for a layer that keeps GGUF blocks: a persistent uint8 buffer, and a scratch buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("blocks", torch.zeros(8, 34, dtype=torch.uint8))
        self.register_buffer("scratch", torch.zeros(100), persistent=False)


def test_weight_bytes_count_storage_once_and_skip_input_only_embeddings():
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(50, 4)  # 800 bytes, one row read per token
    model.proj = torch.nn.Linear(4, 4, dtype=torch.bfloat16)  # 32 + 8 bytes
    model.quant = _Blocks()  # 272 bytes
    model.head = torch.nn.Linear(4, 50, bias=False)
    assert _weight_bytes_per_token(model) == 40 + 272 + 800
    model.head.weight = model.embed.weight  # tied: the table is read once, as the head
    assert _weight_bytes_per_token(model) == 40 + 272 + 800
    model.embed = torch.nn.Embedding(50, 4)  # untied again: the new table is input-only
    model.head = torch.nn.Linear(4, 50, bias=False, dtype=torch.bfloat16)
    assert _weight_bytes_per_token(model) == 40 + 272 + 400


def test_compare_llamacpp_without_llama_cpp_is_one_clear_error(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(EngineError, match=r'^--compare-llamacpp needs llama-cpp-python: .*pip install -e "\.\[bench\]"'):
        run_bench(_options(tiny_gguf, compare_llamacpp=True))


def test_compare_llamacpp_needs_a_gguf(checkpoint_factory):
    with pytest.raises(EngineError, match="runs llama.cpp on a GGUF file"):
        run_bench(_options(checkpoint_factory("qwen2"), compare_llamacpp=True))
    with pytest.raises(EngineError, match="a preset's weights are random"):
        run_bench(BenchOptions(preset="smollm-135m", compare_llamacpp=True, llamacpp_model=checkpoint_factory("qwen2")))


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python (the bench extra) is not installed")
def test_compare_llamacpp_runs_llama_cpp_on_the_same_file(tiny_gguf):
    report = run_bench(_options(tiny_gguf, compare_llamacpp=True))
    theirs = report["llama.cpp"]
    assert report["llamacpp_model"] == str(tiny_gguf)
    assert theirs["decode_tokens_per_s"] > 0 and theirs["ttft_s"] > 0
    assert theirs["weight_bytes_per_token"] == sum(int(t.n_bytes) for t in _read_tensors(tiny_gguf))
    assert 0 <= theirs["greedy_tokens_agreeing"] <= 3
    for key in ("decode_speedup", "prefill_speedup", "ttft_ratio"):
        assert report["ratios"]["llama.cpp"][key] > 0
    assert "chattui / llama.cpp" in _rendered(report)
