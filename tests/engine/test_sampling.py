"""engine.sampling: the filtered distribution equals transformers' logits processors, token for token.

Hand-made logits check the exact surviving sets (and the order top-k -> top-p -> min-p); random logits are
compared against transformers' own warpers (Temperature, TopK, TopP, MinP) and RepetitionPenaltyLogitsProcessor.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.params import SamplingParams
from engine.sampling import apply_repetition_penalty, filter_logits, sample

# Probabilities chosen so that no top-p / min-p threshold used below sits on a boundary.
PROBS = [0.10, 0.50, 0.15, 0.25]  # token 1 > token 3 > token 2 > token 0


def logits_of(probs, shift: float = 3.0) -> torch.Tensor:
    """Logits whose softmax is probs (shifted, to show only differences matter)."""
    return torch.tensor([math.log(p) + shift for p in probs], dtype=torch.float32)


def survivors(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def filtered(logits, top_k=0, top_p=1.0, min_p=0.0):
    return filter_logits(logits.clone(), top_k=top_k, top_p=top_p, min_p=min_p)


# -- hand-made logits: exact surviving sets ------------------------------------------------------


@pytest.mark.parametrize(
    ("top_k", "expected"),
    [(1, {1}), (2, {1, 3}), (3, {1, 2, 3}), (4, {0, 1, 2, 3}), (0, {0, 1, 2, 3}), (10, {0, 1, 2, 3})],
)
def test_top_k_keeps_exactly_the_k_largest_logits(top_k, expected):
    assert survivors(filtered(logits_of(PROBS), top_k=top_k)) == expected


def test_top_k_keeps_all_tokens_tied_with_the_kth_like_transformers():
    logits = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.5])
    assert survivors(filtered(logits, top_k=2)) == {1, 2, 3}


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.45, {1}),  # 0.50 alone already covers 0.45
        (0.55, {1, 3}),  # 0.50 < 0.55 -> add 0.25
        (0.70, {1, 3}),  # 0.75 covers 0.70
        (0.80, {1, 3, 2}),  # 0.75 < 0.80 -> add 0.15 (0.90)
        (0.95, {0, 1, 2, 3}),  # 0.90 < 0.95 -> everything
        (1.0, {0, 1, 2, 3}),  # off
    ],
)
def test_top_p_keeps_the_smallest_most_likely_set_reaching_p(top_p, expected):
    assert survivors(filtered(logits_of(PROBS), top_p=top_p)) == expected


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [
        (0.0, {0, 1, 2, 3}),  # off
        (0.19, {0, 1, 2, 3}),  # threshold 0.095 < 0.10
        (0.25, {1, 2, 3}),  # threshold 0.125: drops 0.10
        (0.40, {1, 3}),  # threshold 0.20: drops 0.15
        (0.60, {1}),  # threshold 0.30: drops 0.25
    ],
)
def test_min_p_drops_tokens_below_min_p_times_the_top_probability(min_p, expected):
    assert survivors(filtered(logits_of(PROBS), min_p=min_p)) == expected


def test_top_p_is_applied_after_top_k_on_the_renormalised_distribution():
    # Alone, top_p=0.8 keeps {1, 3, 2} (0.75 < 0.8). After top_k=3 the survivors renormalise to
    # 0.556, 0.278, 0.167: the first two already reach 0.833 >= 0.8, so only {1, 3} may remain.
    assert survivors(filtered(logits_of(PROBS), top_p=0.8)) == {1, 2, 3}
    assert survivors(filtered(logits_of(PROBS), top_k=3, top_p=0.8)) == {1, 3}


def test_surviving_logits_are_unchanged_and_input_is_not_modified():
    logits = logits_of(PROBS)
    before = logits.clone()
    out = filter_logits(logits, top_k=3, top_p=0.8, min_p=0.1)
    assert torch.equal(logits, before), "filter_logits must not modify its input in place"
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], before[kept])
    assert torch.all(out[~kept] == float("-inf"))


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"),
    [(0, 1e-9, 0.0), (0, 1.0, 0.999999), (1, 1e-9, 0.999999), (0, 1e-12, 0.99)],
)
def test_at_least_the_most_likely_token_always_survives(top_k, top_p, min_p):
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        logits = torch.randn(1000, generator=generator) * 10
        out = filter_logits(logits, top_k=top_k, top_p=top_p, min_p=min_p)
        assert survivors(out) == {int(torch.argmax(logits))}


def test_at_least_one_token_survives_a_nearly_flat_or_peaked_distribution():
    flat = torch.zeros(50)
    assert survivors(filter_logits(flat, top_k=0, top_p=1e-9, min_p=0.0))  # not empty
    # All tokens are tied at the top: min_p near 1 keeps every one of them (they equal the max).
    assert survivors(filter_logits(flat, top_k=0, top_p=1.0, min_p=0.999)) == set(range(50))
    peaked = torch.full((50,), -1e4)
    peaked[17] = 1e4  # softmax underflows to exactly 0 for every other token
    assert survivors(filter_logits(peaked, top_k=0, top_p=0.5, min_p=0.5)) == {17}


# -- random logits: same surviving set and distribution as transformers' warpers ---------------


def hf_filtered(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """transformers' sampling chain, in the order `generate` builds it (temperature, top-k, top-p, min-p)."""
    chain = LogitsProcessorList()
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        chain.append(MinPLogitsWarper(min_p))
    return chain(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0]


def random_cases(n: int):
    generator = torch.Generator().manual_seed(1234)

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    for i in range(n):
        vocab = int(torch.randint(8, 3000, (), generator=generator))
        scale = uniform(0.3, 8.0)
        logits = torch.randn(vocab, generator=generator) * scale
        temperature = [1.0, uniform(0.2, 2.0)][i % 2]
        top_k = [0, int(torch.randint(1, vocab + 5, (), generator=generator))][(i // 2) % 2]
        top_p = [1.0, uniform(0.05, 0.999)][(i // 4) % 2]
        min_p = [0.0, uniform(0.001, 0.9)][(i // 8) % 2]
        yield i, logits, temperature, top_k, top_p, min_p


@pytest.mark.parametrize(("case", "logits", "temperature", "top_k", "top_p", "min_p"), list(random_cases(64)))
def test_filter_logits_matches_transformers_warpers_on_random_logits(case, logits, temperature, top_k, top_p, min_p):
    ours = filter_logits(logits / temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    theirs = hf_filtered(logits, temperature, top_k, top_p, min_p)
    assert survivors(ours) == survivors(theirs), f"case {case}: surviving tokens differ"
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=1e-5, atol=1e-7)


def test_random_cases_really_filter_something():
    """Guard for the comparison above: most cases must drop tokens, or it would prove little."""
    dropped = 0
    for _, logits, temperature, top_k, top_p, min_p in random_cases(64):
        out = filter_logits(logits / temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        dropped += len(survivors(out)) < logits.numel()
    assert dropped >= 50


# -- repetition penalty ---------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 2.0, 0.7])
def test_repetition_penalty_equals_transformers_processor(penalty):
    generator = torch.Generator().manual_seed(int(penalty * 10))
    vocab = 300
    logits = torch.randn(vocab, generator=generator) * 4
    logits[5] = 0.0  # zero stays zero either way
    ids = torch.randint(0, vocab, (40,), generator=generator).tolist() + [5, 5, 7]  # repeats included
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[ids] = True
    ours = apply_repetition_penalty(logits.clone(), seen, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits[None].clone())[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(ours, logits)  # it did something
    assert torch.equal(ours[~seen], logits[~seen])  # unseen tokens untouched


def test_repetition_penalty_pushes_seen_tokens_down_whatever_their_sign():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    seen = torch.tensor([True, True, False, False])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [1.0, -4.0, 2.0, -2.0]


def test_repetition_penalty_of_one_is_a_no_op():
    logits = torch.randn(20)
    assert torch.equal(apply_repetition_penalty(logits, torch.ones(20, dtype=torch.bool), 1.0), logits)


# -- sample -----------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_whatever_the_filters_and_generator():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(500, generator=generator)
        token = sample(logits, temperature=0.0, top_k=5, top_p=0.3, min_p=0.2, generator=generator)
        assert type(token) is int
        assert token == int(torch.argmax(logits))


def test_seeded_generator_reproduces_the_same_samples():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(3))

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, temperature=1.0, generator=g) for _ in range(60)]

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)


def chi_square(samples: list[int], expected_probs: dict[int, float]) -> float:
    n = len(samples)
    counts = {t: 0 for t in expected_probs}
    for s in samples:
        assert s in counts, f"sampled token {s}, which has probability 0"
        counts[s] += 1
    return sum((counts[t] - n * p) ** 2 / (n * p) for t, p in expected_probs.items())


# chi-square critical values at p = 0.001; a fixed seed makes each test deterministic anyway.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27}


def test_samples_follow_the_softmax_distribution():
    probs = [0.4, 0.3, 0.2, 0.1]
    g = torch.Generator().manual_seed(2024)
    samples = [sample(torch.tensor(probs).log(), temperature=1.0, generator=g) for _ in range(2000)]
    assert chi_square(samples, dict(enumerate(probs))) < CHI2_999[3]


def test_samples_follow_temperature_then_top_k_distribution():
    # temperature 0.5 squares the probabilities; top_k=3 drops token 3 and renormalises.
    probs = [0.4, 0.3, 0.2, 0.1]
    squared = [p * p for p in probs[:3]]
    expected = {i: q / sum(squared) for i, q in enumerate(squared)}  # 0.552, 0.310, 0.138
    g = torch.Generator().manual_seed(99)
    samples = [sample(torch.tensor(probs).log(), temperature=0.5, top_k=3, generator=g) for _ in range(2000)]
    assert chi_square(samples, expected) < CHI2_999[2]
    # And the plain softmax (temperature 1, no top-k) is clearly rejected by the same data.
    assert chi_square(samples, {i: probs[i] / 0.9 for i in range(3)}) > CHI2_999[2]


def test_samples_follow_top_p_and_min_p_filtered_distribution():
    logits = logits_of(PROBS)  # token 1: 0.50, token 3: 0.25, token 2: 0.15, token 0: 0.10
    g = torch.Generator().manual_seed(5)
    samples = [sample(logits, temperature=1.0, top_p=0.8, min_p=0.35, generator=g) for _ in range(2000)]
    # top_p=0.8 keeps {1, 3, 2}; min_p=0.35 drops token 2 (0.15 / 0.50 = 0.3 of the top probability).
    assert chi_square(samples, {1: 0.50 / 0.75, 3: 0.25 / 0.75}) < CHI2_999[1]


# -- SamplingParams.validate ------------------------------------------------------------------


def test_default_and_boundary_sampling_params_are_valid():
    SamplingParams().validate()
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0).validate()
    SamplingParams(temperature=5.0, top_k=100000, top_p=1e-6, min_p=0.999, repetition_penalty=0.01).validate()


@pytest.mark.parametrize(
    ("field", "value", "name"),
    [
        ("temperature", -0.1, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("top_k", -1, "top-k"),
        ("top_p", 0.0, "top-p"),
        ("top_p", 1.5, "top-p"),
        ("top_p", -0.2, "top-p"),
        ("top_p", float("nan"), "top-p"),
        ("min_p", -0.01, "min-p"),
        ("min_p", 1.0, "min-p"),
        ("min_p", float("nan"), "min-p"),
        ("repetition_penalty", 0.0, "repetition penalty"),
        ("repetition_penalty", -1.2, "repetition penalty"),
    ],
)
def test_validate_rejects_out_of_range_value_naming_the_setting(field, value, name):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError) as info:
        params.validate()
    message = str(info.value)
    assert name in message
    assert "\n" not in message
