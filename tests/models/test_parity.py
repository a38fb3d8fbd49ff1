"""Our model code gives the same logits as transformers for every supported family.

Each checkpoint is a tiny random-weight model saved by transformers itself (tests/checkpoints.py); we load
it with engine.checkpoint.load_model in float32 and compare logits against transformers' eager float32
forward on the same ids, for a full forward and for incremental decoding through the KV cache.

In bfloat16 the two sides round at different places (fused q/k/v matmuls, SDPA's float32 softmax against
eager's bfloat16 scores), so no fixed tolerance is honest for every family; instead, our bfloat16 logits
must be as close to the float32 truth as transformers' own bfloat16 logits are: the largest error within
2x of theirs (measured: 0.6x to 1.4x across families), the mean error within 1.25x (measured: 0.9x-1.0x).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from checkpoints import DEVICES, GEMMA3_FINAL_SOFTCAP, hf_model, make_checkpoint
from engine.checkpoint import load_model, read_model_config
from engine.kv_cache import KVCache
from models.config import RopeScaling

ATOL = 1e-4
RTOL = 1e-4
BATCH, SEQ = 2, 40  # SEQ is longer than Mistral's sliding window (24) and Gemma 3's test window (8)
CPU = torch.device("cpu")


def _ours(path: Path, config=None, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    config = config or read_model_config(path)
    return load_model(path, config, torch.device(device), dtype)


def _random_ids(vocab: int, batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _assert_logits_match_hf(path: Path, ids: torch.Tensor | None = None) -> torch.Tensor:
    ours = _ours(path)
    ids = _random_ids(ours.config.vocab_size) if ids is None else ids
    with torch.inference_mode():
        got = ours(ids)
        want = hf_model(path)(ids).logits
    assert got.shape == want.shape == (*ids.shape, ours.config.vocab_size)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    return got


def _perturbed_copy(src: Path, dst: Path, seed: int = 1) -> Path:
    """A copy of the checkpoint whose 1-D parameters (norm weights, biases) are random, not HF's 1s and 0s,
    so that mistakes in biases or norm scales cannot hide behind their default initialisation."""
    model = hf_model(src)
    g = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
                changed += 1
    assert changed > 0
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


# -- full forward ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_full_forward_logits_match_transformers(family_checkpoint, device):
    family, path = family_checkpoint
    ours = _ours(path, device=device)
    ids = _random_ids(ours.config.vocab_size).to(device)
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids), hf_model(path, device=device)(ids).logits, atol=ATOL, rtol=RTOL)


def assert_as_close_to_float32_as_transformers(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> None:
    """Our bfloat16 result is about as far from the float32 one as transformers' bfloat16 result (see above)."""
    ours, theirs, exact = ours.float().cpu(), theirs.float().cpu(), exact.float().cpu()
    our_error, their_error = (ours - exact).abs(), (theirs - exact).abs()
    assert our_error.max() <= 2 * their_error.max(), (our_error.max(), their_error.max())
    assert our_error.mean() <= 1.25 * their_error.mean(), (our_error.mean(), their_error.mean())


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_logits_are_as_accurate_as_transformers_in_bfloat16(family_checkpoint, device):
    family, path = family_checkpoint
    ours = _ours(path, dtype=torch.bfloat16, device=device)
    ids = _random_ids(ours.config.vocab_size).to(device)
    with torch.inference_mode():
        got = ours(ids)
        theirs = hf_model(path, torch.bfloat16, device)(ids).logits
        exact = hf_model(path, device=device)(ids).logits
    assert got.dtype == theirs.dtype == torch.bfloat16
    assert_as_close_to_float32_as_transformers(got, theirs, exact)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_incremental_decoding_is_as_accurate_as_transformers_full_forward(family_checkpoint, device):
    """Prefill then one token at a time through the bfloat16 KV cache (the decode kernels' path on CPU)."""
    family, path = family_checkpoint
    model = _ours(path, dtype=torch.bfloat16, device=device)
    ids = _random_ids(model.config.vocab_size, batch=1, seq=SEQ, seed=5).to(device)
    cache = KVCache.for_model(model.config, 64, torch.bfloat16, torch.device(device))
    with torch.inference_mode():
        steps = [model(ids[:, :20], start=0, cache=cache)]
        steps += [model(ids[:, t : t + 1], start=t, cache=cache) for t in range(20, SEQ)]
        theirs = hf_model(path, torch.bfloat16, device)(ids).logits
        exact = hf_model(path, device=device)(ids).logits
    assert_as_close_to_float32_as_transformers(torch.cat(steps, dim=1), theirs, exact)


def test_logits_match_transformers_with_random_norm_weights_and_biases(family_checkpoint, tmp_path):
    family, path = family_checkpoint
    _assert_logits_match_hf(_perturbed_copy(path, tmp_path / family))


def test_last_only_returns_the_last_position_of_the_full_forward(family_checkpoint):
    family, path = family_checkpoint
    model = _ours(path)
    ids = _random_ids(model.config.vocab_size)
    with torch.inference_mode():
        full = model(ids)
        last = model(ids, last_only=True)
    assert last.shape == (BATCH, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=RTOL)


def test_mistral_sliding_window_is_applied_and_matches_transformers(checkpoint_factory):
    path = checkpoint_factory("mistral")
    config = read_model_config(path)
    assert config.sliding_window == 24 < SEQ
    windowed = _assert_logits_match_hf(path)
    # The window must really matter over 40 positions: without it, positions >= 24 change, earlier ones don't.
    unwindowed = _ours(path, dataclasses.replace(config, sliding_window=None))
    with torch.inference_mode():
        full_attention = unwindowed(_random_ids(config.vocab_size))
    torch.testing.assert_close(full_attention[:, :24], windowed[:, :24], atol=ATOL, rtol=RTOL)
    assert (full_attention[:, 24:] - windowed[:, 24:]).abs().max() > 1e-2


def test_mistral_long_sequence_far_past_the_window_matches_transformers(checkpoint_factory):
    path = checkpoint_factory("mistral")
    _assert_logits_match_hf(path, _random_ids(read_model_config(path).vocab_size, batch=1, seq=100, seed=3))


def test_linear_rope_scaling_matches_transformers(checkpoint_factory):
    path = checkpoint_factory("llama_linear_rope")
    config = read_model_config(path)
    assert config.rope_scaling.kind == "linear" and config.rope_scaling.factor == 2.0
    scaled = _assert_logits_match_hf(path)
    unscaled = _ours(path, dataclasses.replace(config, rope_scaling=RopeScaling("default")))
    with torch.inference_mode():
        assert (unscaled(_random_ids(config.vocab_size)) - scaled).abs().max() > 1e-2  # the scaling is not a no-op


def test_llama3_rope_scaling_is_read_from_the_config(checkpoint_factory):
    config = read_model_config(checkpoint_factory("llama_tied_llama3_rope"))
    assert config.rope_scaling.kind == "llama3"
    assert config.rope_scaling.factor == 8.0
    assert config.rope_scaling.original_max_position_embeddings == 32
    assert config.tie_word_embeddings


def test_llama_attention_bias_matches_transformers(checkpoint_factory, tmp_path):
    path = _perturbed_copy(checkpoint_factory("llama", attention_bias=True), tmp_path / "attention_bias")
    config = read_model_config(path)
    assert config.qkv_bias and config.o_bias and not config.mlp_bias
    model = _ours(path)
    attn = model.model.layers[0].self_attn
    assert all(m.bias is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    _assert_logits_match_hf(path)


def test_llama_mlp_bias_matches_transformers(checkpoint_factory, tmp_path):
    path = _perturbed_copy(checkpoint_factory("llama", mlp_bias=True), tmp_path / "mlp_bias")
    config = read_model_config(path)
    assert config.mlp_bias and not config.qkv_bias
    mlp = _ours(path).model.layers[0].mlp
    assert all(m.bias is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    _assert_logits_match_hf(path)


def test_gemma3_local_layers_use_the_window_and_their_own_rope_and_global_layers_do_not(checkpoint_factory):
    path = checkpoint_factory("gemma3")
    config = read_model_config(path)
    assert config.sliding == (True, False, True, False) and config.sliding_window == 8 < SEQ
    assert (config.rope_theta, config.rope_local_theta) == (5000.0, 100.0)
    windowed = _assert_logits_match_hf(path)
    ids = _random_ids(config.vocab_size)
    with torch.inference_mode():
        all_global = _ours(path, dataclasses.replace(config, sliding=(False,) * 4))(ids)
        one_rope = _ours(path, dataclasses.replace(config, rope_local_theta=config.rope_theta))(ids)
    assert (all_global[:, 8:] - windowed[:, 8:]).abs().max() > 1e-2  # the window matters past 8 positions
    assert (one_rope - windowed).abs().max() > 1e-2  # and so does the local RoPE base


def test_gemma3_final_logits_are_soft_capped(checkpoint_factory):
    path = checkpoint_factory("gemma3")
    config = read_model_config(path)
    assert config.final_logit_softcapping == GEMMA3_FINAL_SOFTCAP
    capped = _assert_logits_match_hf(path)
    with torch.inference_mode():
        uncapped_model = _ours(path, dataclasses.replace(config, final_logit_softcapping=None))
        uncapped = uncapped_model(_random_ids(config.vocab_size))
    assert capped.abs().max() < GEMMA3_FINAL_SOFTCAP < uncapped.abs().max()
    torch.testing.assert_close(capped, torch.tanh(uncapped / GEMMA3_FINAL_SOFTCAP) * GEMMA3_FINAL_SOFTCAP)


def test_gemma3_embeddings_are_scaled_by_sqrt_hidden_rounded_to_their_dtype_as_transformers_does(checkpoint_factory):
    path = checkpoint_factory("gemma3")
    ids = _random_ids(read_model_config(path).vocab_size)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.inference_mode():
            assert torch.equal(_ours(path, dtype=dtype).embed(ids), hf_model(path, dtype).model.embed_tokens(ids))


def test_gemma3_published_config_spelling_matches_transformers(checkpoint_factory, tmp_path):
    """The hub's Gemma 3 config.json files predate transformers 5: rope_theta, rope_local_base_freq and
    sliding_window_pattern instead of rope_parameters and layer_types; the 4B and larger also scale the
    global layers' RoPE linearly (rope_scaling). Both sides read that spelling to the same model."""
    folder = Path(shutil.copytree(checkpoint_factory("gemma3"), tmp_path / "gemma3"))
    hf = json.loads((folder / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):
        del hf[key]
    hf.update(rope_theta=5000.0, rope_local_base_freq=100.0, sliding_window_pattern=2,
              rope_scaling={"rope_type": "linear", "factor": 8.0})
    (folder / "config.json").write_text(json.dumps(hf))
    config = read_model_config(folder)
    assert config.sliding == (True, False, True, False)
    assert (config.rope_theta, config.rope_local_theta) == (5000.0, 100.0)
    assert config.rope_scaling == RopeScaling("linear", 8.0)
    _assert_logits_match_hf(folder)


def test_gemma3_untied_and_with_attention_bias_matches_transformers(tokenizer, tmp_path):
    folder = make_checkpoint(tmp_path / "base", "gemma3", tokenizer, tie_word_embeddings=False, attention_bias=True)
    path = _perturbed_copy(folder, tmp_path / "perturbed")
    config = read_model_config(path)
    assert not config.tie_word_embeddings and config.attention_bias
    _assert_logits_match_hf(path)


# -- incremental decoding through the KV cache --------------------------------------------------


def _batched_cache(config, capacity: int) -> KVCache:
    return KVCache(
        config.num_hidden_layers, config.num_key_value_heads, config.head_dim, capacity, torch.float32, CPU,
        batch_size=BATCH,
    )


def test_incremental_decoding_with_kv_cache_equals_full_forward(family_checkpoint):
    """Prefill 16 positions, then a 14-position chunk at start=16, then one token at a time to 40."""
    family, path = family_checkpoint
    model = _ours(path)
    config = model.config
    ids = _random_ids(config.vocab_size)
    cache = _batched_cache(config, capacity=64)
    with torch.inference_mode():
        full = model(ids)
        want_hf = hf_model(path)(ids).logits
        pieces = [model(ids[:, :16], start=0, cache=cache), model(ids[:, 16:30], start=16, cache=cache)]
        pieces += [model(ids[:, t : t + 1], start=t, cache=cache) for t in range(30, SEQ)]
    incremental = torch.cat(pieces, dim=1)
    assert incremental.shape == full.shape
    torch.testing.assert_close(incremental, full, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(incremental, want_hf, atol=ATOL, rtol=RTOL)


def test_incremental_decoding_with_last_only_matches_per_step_logits(family_checkpoint):
    """What generation uses: last_only logits at each step equal the full forward's row for that position."""
    family, path = family_checkpoint
    model = _ours(path)
    ids = _random_ids(model.config.vocab_size, batch=1, seq=SEQ, seed=5)
    cache = KVCache.for_model(model.config, 64, torch.float32, CPU)
    with torch.inference_mode():
        full = model(ids)
        steps = [model(ids[:, :20], start=0, cache=cache, last_only=True)]
        steps += [model(ids[:, t : t + 1], start=t, cache=cache, last_only=True) for t in range(20, SEQ)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 19:], atol=ATOL, rtol=RTOL)


def test_cache_positions_beyond_the_prefix_are_overwritten_not_read(family_checkpoint):
    """Re-running a different continuation from position 20 over a used cache gives fresh-cache logits
    (the engine reuses one cache across turns, so stale keys past the shared prefix must never be seen)."""
    family, path = family_checkpoint
    model = _ours(path)
    first = _random_ids(model.config.vocab_size, batch=1, seq=SEQ, seed=7)
    second = torch.cat([first[:, :20], _random_ids(model.config.vocab_size, batch=1, seq=15, seed=8)], dim=1)
    cache = KVCache.for_model(model.config, 64, torch.float32, CPU)
    with torch.inference_mode():
        model(first, start=0, cache=cache)  # fills positions 0..39
        reused = model(second[:, 20:], start=20, cache=cache)  # positions 20..34, keys 35..39 are stale
        fresh = model(second)[:, 20:]
    torch.testing.assert_close(reused, fresh, atol=ATOL, rtol=RTOL)

