"""`chattui attention` streams its JSON layer by layer (memory holds one layer's weights, not the whole nest
as Python objects) and says when a text was cut to the capture cap."""

from __future__ import annotations

import json
import sys
import tracemalloc

import chattui.cli
import engine.attention
from chattui.cli import main


def test_json_for_a_long_text_is_streamed_with_bounded_memory(checkpoint_factory, tmp_path, monkeypatch):
    folder = checkpoint_factory("llama", max_position_embeddings=1024, num_hidden_layers=4)
    text = " ".join(f"w{i}" for i in range(55))  # ~250 tokens on this tiny vocabulary
    load_engine = chattui.cli.load_engine

    def load_then_measure(args):  # the peak from here on is the capture and the output, not the model
        engine = load_engine(args)
        tracemalloc.reset_peak()
        return engine

    monkeypatch.setattr(chattui.cli, "load_engine", load_then_measure)
    out_path = tmp_path / "attention.json"
    with open(out_path, "w", encoding="utf-8") as out:
        monkeypatch.setattr(sys, "stdout", out)
        tracemalloc.start()
        try:
            assert main(["attention", "--model", str(folder), "--raw", text]) == 0
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    result = json.loads(out_path.read_text(encoding="utf-8"))
    T = len(result["token_ids"])
    assert T > 200 and result["truncated_tokens"] == 0
    layers, heads = result["num_layers"], result["num_heads"]
    # Built whole, the nest would hold layers x heads x T x T Python floats (32 bytes each with its pointer).
    whole = layers * heads * T * T * 32
    one_layer = heads * T * T * 4  # float32 numpy; AttentionMaps keeps two layers
    assert peak < 3 * one_layer + (2 << 20) < whole / 3, f"peak {peak / 2**20:.1f} MiB, whole {whole / 2**20:.0f} MiB"
    assert len(result["attentions"]) == layers and len(result["attentions"][-1][-1][-1]) == T
    assert abs(sum(result["attentions"][1][2][T - 1]) - 1) < 1e-4


def test_a_text_cut_to_the_token_cap_says_so(checkpoint_factory, capsys, caplog, monkeypatch):
    monkeypatch.setattr(engine.attention, "MAX_CAPTURE_TOKENS", 8)
    folder = checkpoint_factory("qwen2")
    text = "the quick brown fox jumps over the lazy dog and more"
    assert main(["attention", "--model", str(folder), "--raw", "--layer", "0", "--head", "0", text]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["token_ids"]) == 8 and result["truncated_tokens"] > 0
    total = 8 + result["truncated_tokens"]
    assert f"the text is {total} tokens; only the last 8 were captured (the first {total - 8} were left out)" in caplog.text
