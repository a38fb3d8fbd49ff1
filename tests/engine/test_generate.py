"""Engine.generate: greedy ids identical to transformers' generate, prefix reuse across chat turns,
finish reasons (length, eos, stop, cancelled), seeds, streaming text, context-window handling, stats."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from checkpoints import DEVICES, FAMILIES, hf_model
import engine.generate as generation
from engine import Engine, EngineError, PromptTooLongError, SamplingParams
from engine.kv_cache import KVCache
from engine.text_stream import TextStream



GREEDY = SamplingParams(temperature=0.0)
N = 40
USER_1 = {"role": "user", "content": "Hello there! How are you doing today?"}
USER_2 = {"role": "user", "content": "The quick brown fox jumps over the lazy dog."}

_hf_models: dict[Path, torch.nn.Module] = {}


def load(path: Path) -> Engine:
    return Engine.load(path, device="cpu", dtype="float32")


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int = N, eos_token_id="default") -> list[int]:
    """transformers' greedy continuation (eos included when it stopped there); eos_token_id=None disables eos."""
    if path not in _hf_models:
        _hf_models[path] = hf_model(path)
    kwargs = {} if eos_token_id == "default" else {"eos_token_id": eos_token_id}
    out = _hf_models[path].generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, **kwargs
    )
    return out[0, len(prompt) :].tolist()


def run(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY, max_new_tokens: int = N, **kw):
    """Generate to the end; (deltas, result)."""
    gen = engine.generate(prompt, params, max_new_tokens, **kw)
    deltas = list(gen)
    assert gen.result is not None
    return deltas, gen.result


def first_turn_prompt(engine: Engine) -> list[int]:
    return engine.chat_prompt([USER_1], N).token_ids


@pytest.fixture(scope="module")
def llama(checkpoint_factory) -> Path:
    return checkpoint_factory("llama")


# -- parity with transformers -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ids_equal_transformers_for_40_tokens_with_eos_disabled(checkpoint_factory, family):
    """eos is turned off on both sides, so all 40 tokens are compared whatever the random model emits."""
    path = checkpoint_factory(family)
    engine = load(path)
    engine.eos_token_ids = set()
    prompt = first_turn_prompt(engine)
    _, result = run(engine, prompt)
    want = hf_greedy(path, prompt, eos_token_id=None)
    assert len(want) == N
    assert result.finish_reason == "length"
    assert result.token_ids == want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_greedy_ids_equal_transformers_in_bfloat16_for_8_tokens(checkpoint_factory, family, device):
    """Against transformers loaded in bfloat16. Only 8 tokens: the two sides round at different places, so on
    a random tiny model (whose top two logits are often a bfloat16 step apart) the ids may part later on."""
    path = checkpoint_factory(family)
    engine = Engine.load(path, device=device, dtype="bfloat16")
    engine.eos_token_ids = set()
    prompt = first_turn_prompt(engine)
    _, result = run(engine, prompt, max_new_tokens=8)
    theirs = hf_model(path, torch.bfloat16, device).generate(
        torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None
    )
    assert result.token_ids == theirs[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_prefilled_in_chunks_gives_the_logits_and_cache_of_one_forward(checkpoint_factory, family, monkeypatch):
    model = load(checkpoint_factory(family)).model
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[1]))

    def prefilled() -> tuple[torch.Tensor, KVCache]:
        cache = KVCache.for_model(model.config, 48, torch.float32, torch.device("cpu"))
        with torch.inference_mode():
            return generation.prefill(model, ids, 0, cache), cache

    whole, whole_cache = prefilled()
    # 40 tokens as 7 + 7 + 7 + 7 + 7 + 5: Gemma 3's 8-token and Mistral's 24-token windows straddle the chunks
    monkeypatch.setattr(generation, "PREFILL_CHUNK_TOKENS", 7)
    chunked, chunked_cache = prefilled()
    assert forwards == [40, 7, 7, 7, 7, 7, 5]
    assert torch.allclose(chunked, whole, rtol=1e-4, atol=1e-4)
    assert torch.allclose(chunked_cache.k, whole_cache.k, atol=1e-5)
    assert torch.allclose(chunked_cache.v, whole_cache.v, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ids_equal_transformers_with_the_checkpoints_eos(checkpoint_factory, family):
    """As shipped (eos from the checkpoint on both sides): same ids, and both stop at the same place."""
    path = checkpoint_factory(family)
    engine = load(path)
    assert 2 in engine.eos_token_ids  # <|im_end|>
    prompt = first_turn_prompt(engine)
    _, result = run(engine, prompt)
    want = hf_greedy(path, prompt)
    if result.finish_reason == "eos":
        assert want[-1] in engine.eos_token_ids and result.token_ids == want[:-1]
    else:
        assert result.finish_reason == "length"
        assert result.token_ids == want and len(want) == N


@pytest.mark.parametrize("family", FAMILIES)
def test_second_chat_turn_reuses_the_prefix_and_matches_a_fresh_engine_and_transformers(checkpoint_factory, family):
    path = checkpoint_factory(family)
    engine = load(path)
    first = engine.chat_prompt([USER_1], N)
    _, turn1 = run(engine, first.token_ids)
    assert turn1.reused_prompt_tokens == 0
    messages = [USER_1, {"role": "assistant", "content": turn1.text}, USER_2]
    second = engine.chat_prompt(messages, N)
    assert second.dropped_messages == 0
    assert second.token_ids[: len(first.token_ids)] == first.token_ids

    _, reused = run(engine, second.token_ids)
    assert reused.reused_prompt_tokens >= len(first.token_ids) > 0
    assert reused.reused_prompt_tokens < len(second.token_ids)

    _, fresh = run(load(path), second.token_ids)
    assert fresh.reused_prompt_tokens == 0
    assert reused.token_ids == fresh.token_ids
    assert reused.finish_reason == fresh.finish_reason

    want = hf_greedy(path, second.token_ids)
    if reused.finish_reason == "eos":
        assert want[-1] in engine.eos_token_ids and reused.token_ids == want[:-1]
    else:
        assert reused.token_ids == want


def test_same_prompt_twice_reuses_all_but_one_position_and_gives_the_same_ids(llama):
    engine = load(llama)
    prompt = first_turn_prompt(engine)
    _, a = run(engine, prompt)
    _, b = run(engine, prompt)
    assert b.reused_prompt_tokens == len(prompt) - 1
    assert a.token_ids == b.token_ids
    engine.reset_cache()
    _, c = run(engine, prompt)
    assert c.reused_prompt_tokens == 0 and c.token_ids == a.token_ids


@pytest.mark.parametrize("finish", ["length", "eos", "stop", "cancelled"])
def test_continuing_from_the_generated_ids_reuses_exactly_the_cached_positions(
    checkpoint_factory, tmp_path, finish
):
    """Turn 2 = turn-1 prompt + turn-1 ids (+ the eos) + new tokens. Every sampled token but the last was fed
    back, so the reuse must stop right there; reusing one position too many reads keys never written."""
    path = checkpoint_factory("llama")
    plain = load(path)
    plain.eos_token_ids = set()
    prompt = first_turn_prompt(plain)
    _, free = run(plain, prompt, max_new_tokens=12)
    kwargs = {}
    if finish == "eos":
        path = _with_generation_config(path, tmp_path / "ckpt", {"eos_token_id": [free.token_ids[8]]})
    elif finish == "stop":
        stop, _ = _two_token_stop_string(plain, free.token_ids)
        kwargs["stop"] = [stop]
    elif finish == "cancelled":
        kwargs["cancel"] = lambda: len(seen) >= 4
    seen: list[str] = []
    engine = load(path)
    if finish != "eos":
        engine.eos_token_ids = set()
    gen = engine.generate(prompt, GREEDY, 12, **kwargs)
    seen.extend(gen)
    first = gen.result
    assert first.finish_reason == finish
    assert 0 < len(first.token_ids) < 12 or finish == "length"
    sampled = first.token_ids + ([free.token_ids[len(first.token_ids)]] if finish == "eos" else [])
    assert sampled == free.token_ids[: len(sampled)]

    follow_up = prompt + sampled + engine.tokenizer.encode("Hello there! How are you?", add_special_tokens=False)
    _, second = run(engine, follow_up, max_new_tokens=12)
    assert second.reused_prompt_tokens == len(prompt) + len(sampled) - 1
    fresh = load(path)
    fresh.eos_token_ids = set(engine.eos_token_ids)
    _, want = run(fresh, follow_up, max_new_tokens=12)
    assert want.reused_prompt_tokens == 0
    assert second.token_ids == want.token_ids and second.finish_reason == want.finish_reason


# -- finish reasons -----------------------------------------------------------------------------


def test_max_new_tokens_finishes_with_length_and_exactly_n_tokens(llama):
    engine = load(llama)
    prompt = first_turn_prompt(engine)
    _, full = run(engine, prompt, max_new_tokens=N)
    for n in (1, 7):
        _, result = run(load(llama), prompt, max_new_tokens=n)
        assert result.finish_reason == "length"
        assert result.generated_tokens == len(result.token_ids) == n
        assert result.token_ids == full.token_ids[:n]


def _with_generation_config(src: Path, dst: Path, generation_config: dict) -> Path:
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(generation_config))
    return dst


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_eos_stops_generation_where_transformers_stops(checkpoint_factory, family, tmp_path):
    """Make a token the model really emits (the 11th greedy token) an eos id via generation_config.json:
    we stop right before its first occurrence with finish 'eos', and transformers stops at the same place."""
    path = checkpoint_factory(family)
    plain = load(path)
    plain.eos_token_ids = set()
    prompt = first_turn_prompt(plain)
    _, free = run(plain, prompt)
    eos = free.token_ids[10]

    engine = load(_with_generation_config(path, tmp_path / "ckpt", {"eos_token_id": [eos]}))
    assert eos in engine.eos_token_ids  # with the tokenizer's <|im_end|>
    cut = min(i for i, t in enumerate(free.token_ids) if t in engine.eos_token_ids)
    assert cut <= 10
    deltas, result = run(engine, prompt)
    assert result.finish_reason == "eos"
    assert result.token_ids == free.token_ids[:cut]
    assert not engine.eos_token_ids & set(result.token_ids)
    assert "".join(deltas) == result.text == engine.tokenizer.decode(result.token_ids)
    want = hf_greedy(path, prompt, eos_token_id=sorted(engine.eos_token_ids))
    assert want == free.token_ids[: cut + 1]


def test_eos_as_the_first_token_gives_an_empty_reply(llama, tmp_path):
    plain = load(llama)
    prompt = first_turn_prompt(plain)
    _, free = run(plain, prompt, max_new_tokens=1)
    engine = load(_with_generation_config(llama, tmp_path / "ckpt", {"eos_token_id": free.token_ids[0]}))
    deltas, result = run(engine, prompt)
    assert result.finish_reason == "eos"
    assert result.token_ids == [] and result.text == "" and deltas == []


def _tokens_for_deltas(engine: Engine, ids: list[int], k: int) -> int:
    """How many of ids a TextStream needs before it has produced k non-empty deltas."""
    stream = TextStream(lambda x: engine.tokenizer.decode(x))
    seen = 0
    for i, token in enumerate(ids, 1):
        if stream.push(token):
            seen += 1
            if seen == k:
                return i
    raise AssertionError(f"only {seen} deltas in {len(ids)} tokens")


def test_cancel_event_set_inside_the_loop_stops_within_one_step(llama):
    engine = load(llama)
    engine.eos_token_ids = set()
    prompt = first_turn_prompt(engine)
    _, full = run(engine, prompt)
    k = 5
    needed = _tokens_for_deltas(engine, full.token_ids, k)

    engine = load(llama)
    engine.eos_token_ids = set()
    cancel = threading.Event()
    gen = engine.generate(prompt, GREEDY, N, cancel=cancel)
    count = 0
    for _ in gen:
        count += 1
        if count == k:
            cancel.set()
    result = gen.result
    assert result.finish_reason == "cancelled"
    assert needed <= len(result.token_ids) <= needed + 1 < N
    assert result.token_ids == full.token_ids[: len(result.token_ids)]


def test_cancel_callable_stops_within_one_step(llama):
    engine = load(llama)
    engine.eos_token_ids = set()
    prompt = first_turn_prompt(engine)
    _, full = run(engine, prompt)
    k = 3
    needed = _tokens_for_deltas(engine, full.token_ids, k)

    engine = load(llama)
    engine.eos_token_ids = set()
    deltas: list[str] = []
    gen = engine.generate(prompt, GREEDY, N, cancel=lambda: len(deltas) >= k)
    for delta in gen:
        deltas.append(delta)
    assert gen.result.finish_reason == "cancelled"
    assert needed <= len(gen.result.token_ids) <= needed + 1 < N


def test_cancel_already_set_generates_nothing(llama):
    engine = load(llama)
    cancel = threading.Event()
    cancel.set()
    deltas, result = run(engine, first_turn_prompt(engine), cancel=cancel)
    assert result.finish_reason == "cancelled"
    assert result.token_ids == [] and deltas == [] and result.text == ""


def test_engine_is_usable_after_a_cancelled_generation(llama):
    engine = load(llama)
    prompt = first_turn_prompt(engine)
    cancel = threading.Event()
    gen = engine.generate(prompt, GREEDY, N, cancel=cancel)
    next(iter(gen))
    cancel.set()
    list(gen)
    _, after = run(engine, prompt)
    _, fresh = run(load(llama), prompt)
    assert after.token_ids == fresh.token_ids


# -- sampling -----------------------------------------------------------------------------------


def _sampling(seed: int | None) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed)


def test_same_seed_gives_the_same_ids_and_different_seeds_differ(llama):
    engine = load(llama)
    engine.eos_token_ids = set()
    prompt = first_turn_prompt(engine)
    _, a = run(engine, prompt, _sampling(1234))
    other = load(llama)
    other.eos_token_ids = set()
    _, b = run(other, prompt, _sampling(1234))
    _, c = run(other, prompt, _sampling(4321))
    _, greedy = run(other, prompt)
    assert a.seed == b.seed == 1234 and c.seed == 4321
    assert len(a.token_ids) == N
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.token_ids != greedy.token_ids  # temperature 1.0 really samples


def test_reported_random_seed_reproduces_the_reply(llama):
    engine = load(llama)
    prompt = first_turn_prompt(engine)
    _, a = run(engine, prompt, _sampling(None))
    _, b = run(load(llama), prompt, _sampling(a.seed))
    assert isinstance(a.seed, int)
    assert a.token_ids == b.token_ids


def test_temperature_zero_is_deterministic_whatever_the_seed(llama):
    engine = load(llama)
    prompt = first_turn_prompt(engine)
    results = [run(engine, prompt, SamplingParams(temperature=0.0, seed=s))[1].token_ids for s in (1, 2, 3)]
    assert results[0] == results[1] == results[2]


# -- streaming text and stop strings ------------------------------------------------------------


def test_concatenated_deltas_equal_result_text_and_decoded_ids(family_checkpoint):
    family, path = family_checkpoint
    engine = load(path)
    deltas, result = run(engine, first_turn_prompt(engine))
    assert "".join(deltas) == result.text
    assert result.text == engine.tokenizer.decode(result.token_ids)
    assert all(deltas)  # no empty deltas are yielded


def _two_token_stop_string(engine: Engine, ids: list[int]) -> tuple[str, int]:
    """A 2-character stop string made of the last character of token j-1 and the first of token j, whose
    first occurrence in the reply is exactly there; returns (stop, index of that occurrence)."""
    decode = engine.tokenizer.decode
    full = decode(ids)
    for j in range(3, len(ids) - 1):
        before, upto = decode(ids[:j]), decode(ids[: j + 1])
        if (
            before
            and upto.startswith(before)
            and len(upto) > len(before)
            and full.startswith(upto)
            and len(before) > len(decode(ids[: j - 1]))
        ):
            stop = before[-1] + upto[len(before)]
            if "\ufffd" not in stop and full.find(stop) == len(before) - 1:
                return stop, len(before) - 1
    raise AssertionError("no token boundary usable for a stop string")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stop_string_spanning_two_tokens_ends_the_text_right_before_it(checkpoint_factory, family):
    path = checkpoint_factory(family)
    engine = load(path)
    engine.eos_token_ids = set()
    prompt = first_turn_prompt(engine)
    _, free = run(engine, prompt)
    stop, at = _two_token_stop_string(engine, free.token_ids)
    full = engine.tokenizer.decode(free.token_ids)

    deltas, result = run(engine, prompt, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == full[:at]
    assert "".join(deltas) == result.text
    assert stop not in result.text
    assert result.token_ids == free.token_ids[: len(result.token_ids)] and len(result.token_ids) < N
    assert stop in engine.tokenizer.decode(result.token_ids)  # it stopped at the token completing it


def test_stop_string_never_produced_has_no_effect(llama):
    engine = load(llama)
    prompt = first_turn_prompt(engine)
    _, plain = run(engine, prompt)
    _, stopped = run(load(llama), prompt, stop=["this string never appears"])
    assert stopped.finish_reason == plain.finish_reason
    assert stopped.token_ids == plain.token_ids and stopped.text == plain.text


# -- context window -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_context(checkpoint_factory) -> Path:
    return checkpoint_factory("llama", max_position_embeddings=64)


SYSTEM = {"role": "system", "content": "Be brief."}


def _long_conversation() -> list[dict]:
    messages = [SYSTEM]
    for i in range(6):
        messages += [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Ok {i}"}]
    return messages + [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("max_new_tokens", [1, 8])
def test_chat_prompt_drops_oldest_turns_keeps_system_and_fits(short_context, max_new_tokens):
    engine = load(short_context)
    assert engine.context_length == 64
    messages = _long_conversation()
    assert len(engine.tokenizer.encode_chat(messages)) > 64
    prompt = engine.chat_prompt(messages, max_new_tokens=max_new_tokens)
    assert prompt.dropped_messages > 0
    assert prompt.dropped_messages % 2 == 0  # whole user+assistant turns
    assert len(prompt.token_ids) + prompt.max_new_tokens <= 64
    assert prompt.max_new_tokens == max_new_tokens
    kept = [SYSTEM] + messages[1 + prompt.dropped_messages :]
    assert prompt.text == engine.tokenizer.render_chat(kept, add_generation_prompt=True)
    assert prompt.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert prompt.text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.token_ids == engine.tokenizer.encode(prompt.text, add_special_tokens=False)
    # Dropping is minimal: keeping one more turn would not have fitted.
    one_more = [SYSTEM] + messages[1 + prompt.dropped_messages - 2 :]
    assert len(engine.tokenizer.encode_chat(one_more)) + max_new_tokens > 64
    _, result = run(engine, prompt.token_ids, max_new_tokens=prompt.max_new_tokens)
    assert result.generated_tokens <= max_new_tokens


def test_chat_prompt_keeps_a_turn_when_it_fits(short_context):
    engine = load(short_context)
    messages = _long_conversation()
    # Leave room for exactly the latest earlier turn beside the system and last messages.
    room = 64 - len(engine.tokenizer.encode_chat([SYSTEM, *messages[-3:]]))
    assert room > 0
    prompt = engine.chat_prompt(messages, max_new_tokens=room)
    assert prompt.dropped_messages == 10
    assert prompt.max_new_tokens == room
    assert "Hi 5" in prompt.text and "Ok 5" in prompt.text and "Hi 4" not in prompt.text


def test_chat_prompt_reduces_max_new_tokens_when_only_the_last_message_is_left(short_context):
    engine = load(short_context)
    message = {"role": "user", "content": "The quick brown fox jumps over the lazy dog."}
    prompt = engine.chat_prompt([message], max_new_tokens=60)
    assert prompt.dropped_messages == 0
    assert 0 < prompt.max_new_tokens < 60
    assert len(prompt.token_ids) + prompt.max_new_tokens == 64
    engine.eos_token_ids = set()
    _, result = run(engine, prompt.token_ids, max_new_tokens=60)  # generate() clamps it too
    assert result.finish_reason == "length"
    assert len(prompt.token_ids) + result.generated_tokens == 64


def test_raw_prompt_longer_than_the_context_raises(short_context):
    engine = load(short_context)
    with pytest.raises(PromptTooLongError, match="context window is 64"):
        engine.raw_prompt("The quick brown fox jumps over the lazy dog. " * 20)


def test_generate_with_prompt_ids_longer_than_the_context_raises(short_context):
    engine = load(short_context)
    with pytest.raises(PromptTooLongError):
        engine.generate(list(range(3, 3 + 64)), GREEDY, 4)


@pytest.mark.parametrize("history", [[], [USER_1, {"role": "assistant", "content": "Fine."}]])
def test_single_enormous_last_message_raises(short_context, history):
    engine = load(short_context)
    huge = {"role": "user", "content": "Hello there! How are you doing today? " * 30}
    with pytest.raises(PromptTooLongError, match="last message"):
        engine.chat_prompt([SYSTEM, *history, huge], max_new_tokens=8)


def test_empty_prompt_ids_are_rejected_with_a_clear_error(llama):
    engine = load(llama)
    with pytest.raises((EngineError, ValueError), match="empty"):
        list(engine.generate([], GREEDY, 4))  # raw_prompt refuses empty prompts; generate must too
    # and the engine still works afterwards
    _, result = run(engine, first_turn_prompt(engine), max_new_tokens=3)
    assert result.generated_tokens == 3 or result.finish_reason == "eos"


# -- stats --------------------------------------------------------------------------------------


def test_result_stats_are_positive_and_consistent(llama):
    engine = load(llama)
    engine.eos_token_ids = set()
    prompt = first_turn_prompt(engine)
    _, result = run(engine, prompt, max_new_tokens=12)
    assert result.prompt_tokens == len(prompt)
    assert result.generated_tokens == len(result.token_ids) == 12
    assert result.reused_prompt_tokens == 0
    assert result.ttft_s > 0
    assert result.prefill_tokens_per_s > 0
    assert result.decode_tokens_per_s > 0
    assert isinstance(result.seed, int)
    assert result.finish_reason == "length"
