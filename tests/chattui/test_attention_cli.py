"""`chattui attention` prints weights equal to transformers' eager attentions."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from checkpoints import hf_model, hf_tokenizer

from chattui.cli import main


def run_json(capsys, *argv) -> dict:
    assert main(["attention", *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_json_equals_transformers_output_attentions_on_the_chat_prompt(checkpoint_factory, capsys, family):
    folder = checkpoint_factory(family)
    out = run_json(capsys, "--model", str(folder), "Hello there, 你好!")
    tok = hf_tokenizer(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello there, 你好!"}], add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert out["token_ids"] == list(ids)
    assert len(out["tokens"]) == len(ids)
    assert out["dims"] == ["layer", "head", "query", "key"]
    with torch.no_grad():
        reference = hf_model(folder)(torch.tensor([ids]), output_attentions=True).attentions
    ours = np.array(out["attentions"])
    theirs = torch.stack([a[0] for a in reference]).numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_raw_layer_and_head_selection_drop_those_dimensions(checkpoint_factory, capsys):
    folder = checkpoint_factory("llama")
    full = run_json(capsys, "--model", str(folder), "--raw", "the quick brown fox")
    assert full["token_ids"] == hf_tokenizer(folder)("the quick brown fox")["input_ids"]
    one_layer = run_json(capsys, "--model", str(folder), "--raw", "--layer", "1", "the quick brown fox")
    assert one_layer["dims"] == ["head", "query", "key"]
    assert one_layer["attentions"] == full["attentions"][1]
    one_head = run_json(capsys, "--model", str(folder), "--raw", "--layer", "1", "--head", "2", "the quick brown fox")
    assert one_head["dims"] == ["query", "key"]
    assert one_head["attentions"] == full["attentions"][1][2]
    head_only = run_json(capsys, "--model", str(folder), "--raw", "--head", "3", "the quick brown fox")
    assert head_only["attentions"] == [layer[3] for layer in full["attentions"]]


def test_csv_lists_every_causal_entry(checkpoint_factory, capsys):
    folder = checkpoint_factory("llama")
    full = run_json(capsys, "--model", str(folder), "--raw", "abc def")
    assert main(["attention", "--model", str(folder), "--raw", "--format", "csv", "--layer", "0", "abc def"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    T = len(full["tokens"])
    assert len(rows) == full["num_heads"] * T * (T + 1) // 2
    for row in rows:
        expected = full["attentions"][0][int(row["head"])][int(row["query"])][int(row["key"])]
        assert float(row["weight"]) == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert row["key_token"] == full["tokens"][int(row["key"])]


def test_out_of_range_layer_is_a_one_line_error(checkpoint_factory, capsys):
    assert main(["attention", "--model", str(checkpoint_factory("llama")), "--layer", "7", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("chattui: error: --layer 7 is out of range")
