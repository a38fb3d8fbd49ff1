"""Attention capture equals transformers' eager attentions and has the properties softmax weights must."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import DEVICES, hf_model

from engine import Engine, SamplingParams
from engine.attention import MAX_CAPTURE_TOKENS, AttentionMaps
from models.attention import AttentionSpec, attention_probabilities


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 300, (60,), generator=torch.Generator().manual_seed(1)).tolist()


def test_captured_weights_equal_transformers_eager_attentions(family_checkpoint, ids):
    family, folder = family_checkpoint
    maps = Engine.load(folder, dtype="float32").attention(ids)
    with torch.no_grad():
        reference = hf_model(folder)(torch.tensor([ids]), output_attentions=True).attentions
    assert maps.num_layers == len(reference)
    for layer in range(maps.num_layers):
        np.testing.assert_allclose(maps.layer(layer), reference[layer][0].numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_captured_weights_are_as_accurate_as_transformers_eager_in_bfloat16(family_checkpoint, ids, device):
    """Ours (float32 softmax of bfloat16 queries and keys) against transformers' bfloat16 eager weights: each
    no further from the float32 weights than 2x the other's largest error (measured over all layers: 0.8x to 1.3x)."""
    family, folder = family_checkpoint
    ours = Engine.load(folder, device=device, dtype="bfloat16").attention(ids)
    exact = Engine.load(folder, device=device, dtype="float32").attention(ids)
    with torch.no_grad():
        theirs = hf_model(folder, torch.bfloat16, device)(torch.tensor([ids], device=device), output_attentions=True)
    for layer in range(ours.num_layers):
        their_error = np.abs(theirs.attentions[layer][0].float().cpu().numpy() - exact.layer(layer)).max()
        assert np.abs(ours.layer(layer) - exact.layer(layer)).max() <= 2 * their_error
        np.testing.assert_allclose(ours.layer(layer).sum(-1), 1.0, atol=1e-5)


def test_rows_sum_to_one_and_future_keys_get_zero(checkpoint_factory, ids):
    maps = Engine.load(checkpoint_factory("qwen3"), dtype="float32").attention(ids)
    weights = maps.layer(1)  # (nh, T, T)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(weights, k=1) == 0)
    assert np.all(weights >= 0)


def test_mistral_sliding_window_zeroes_keys_older_than_the_window(checkpoint_factory, ids):
    maps = Engine.load(checkpoint_factory("mistral"), dtype="float32").attention(ids)
    weights = maps.layer(0)
    window = 24
    older = np.tril(np.ones((len(ids), len(ids)), dtype=bool), k=-window)  # key <= query - window
    assert np.all(weights[:, older] == 0)
    assert np.all(weights[:, ~older & np.tril(np.ones_like(older))] > 0)


def test_gemma3_local_layers_zero_keys_older_than_the_window_and_global_layers_do_not(checkpoint_factory, ids):
    maps = Engine.load(checkpoint_factory("gemma3"), dtype="float32").attention(ids)
    window = 8
    older = np.tril(np.ones((len(ids), len(ids)), dtype=bool), k=-window)  # key <= query - window
    for layer, local in enumerate((True, False, True, False)):
        weights = maps.layer(layer)
        assert np.all(weights[:, older] == 0) if local else np.all(weights[:, older] > 0)


def test_gqa_query_head_reads_kv_head_h_div_groups():
    torch.manual_seed(0)
    q = torch.randn(1, 6, 5, 8)  # 6 query heads
    k = torch.randn(1, 2, 5, 8)  # 2 kv heads: heads 0-2 read kv 0, heads 3-5 read kv 1
    weights = attention_probabilities(q, k)
    for h in range(6):
        scores = q[0, h] @ k[0, h // 3].T / 8**0.5
        scores = scores.masked_fill(torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), float("-inf"))
        torch.testing.assert_close(weights[0, h], scores.softmax(-1))


def test_aggregations_and_rollout(checkpoint_factory, ids):
    maps = Engine.load(checkpoint_factory("llama"), dtype="float32").attention(ids)
    layer = maps.layer(1)
    np.testing.assert_allclose(maps.mean_over_heads(1), layer.mean(0), rtol=1e-6)
    np.testing.assert_array_equal(maps.max_over_heads(1), layer.max(0))
    rollout = maps.rollout()
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-4)  # still a distribution per query
    assert np.all(np.triu(rollout, k=1) < 1e-7)  # information only flows from earlier tokens
    first = 0.5 * maps.mean_over_heads(0) + 0.5 * np.eye(len(ids))
    np.testing.assert_allclose(maps.rollout(0), first / first.sum(-1, keepdims=True), rtol=1e-5)


def test_head_summaries_describe_each_head(checkpoint_factory, ids):
    maps = Engine.load(checkpoint_factory("gpt2"), dtype="float32").attention(ids)
    summaries = maps.head_summaries(0)
    assert [s.head for s in summaries] == list(range(maps.num_heads))
    weights = maps.layer(0)
    T = len(ids)
    for s in summaries:
        rows = weights[s.head]
        assert 0 <= s.entropy <= np.log(T)
        assert 0 <= s.mean_distance <= T - 1
        assert s.top_key == int(rows.mean(0).argmax())


def test_uniform_attention_has_maximal_entropy():
    """A head that spreads attention evenly over the past: row i has entropy log(i+1)."""
    T = 16

    class Uniform:
        config = type("C", (), {"num_hidden_layers": 1, "num_attention_heads": 1})()

        def attention_inputs(self, ids):
            yield torch.zeros(1, 1, T, 4), torch.zeros(1, 1, T, 4), AttentionSpec()  # equal scores everywhere

    maps = AttentionMaps(Uniform(), list(range(T)), [str(i) for i in range(T)], torch.device("cpu"))
    (summary,) = maps.head_summaries(0)
    assert summary.entropy == pytest.approx(np.mean(np.log(np.arange(1, T + 1))), rel=1e-5)
    assert summary.mean_distance == pytest.approx(np.mean(np.arange(T) / 2), rel=1e-5)


def test_long_inputs_keep_the_most_recent_tokens(checkpoint_factory):
    engine = Engine.load(checkpoint_factory("qwen2"), dtype="float32")
    engine.context_length = MAX_CAPTURE_TOKENS + 10
    ids = [5] * (MAX_CAPTURE_TOKENS + 3)
    maps = AttentionMaps(engine.model, ids, [str(i) for i in range(len(ids))], engine.device)
    assert maps.truncated == 3 and len(maps) == MAX_CAPTURE_TOKENS
    assert maps.tokens[0] == "3"


def test_bad_layer_and_head_indices_are_reported(checkpoint_factory, ids):
    maps = Engine.load(checkpoint_factory("llama"), dtype="float32").attention(ids[:5])
    with pytest.raises(IndexError, match="layer 9"):
        maps.layer(9)
    with pytest.raises(IndexError, match="head 4"):
        maps.head(0, 4)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_live_attention_rows_equal_the_captured_matrix_rows(checkpoint_factory, family):
    """Each step's live weights equal the row of a full capture at the position that chose the token."""
    engine = Engine.load(checkpoint_factory(family), dtype="float32")
    prompt = torch.randint(3, 300, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    rows, covered = [], []
    generation = engine.generate(
        prompt, SamplingParams(temperature=0), 6, on_attention=lambda w, ids: (rows.append(w), covered.append(ids))
    )
    list(generation)
    result = generation.result
    assert len(rows) == len(result.token_ids)  # one per forward: prefill + each decode step but the last
    sequence = prompt + result.token_ids
    assert covered == [sequence[: len(prompt) + i] for i in range(len(rows))]
    maps = engine.attention(sequence)
    for i, row in enumerate(rows):
        position = len(prompt) - 1 + i
        assert row.shape == (maps.num_layers, maps.num_heads, position + 1)
        for layer in range(maps.num_layers):
            np.testing.assert_allclose(row[layer], maps.layer(layer)[:, position, : position + 1], atol=1e-5)
    assert all(m.observer is None for m in engine.model.modules() if hasattr(type(m), "observer"))
