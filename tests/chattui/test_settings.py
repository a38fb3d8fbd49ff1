"""Per-conversation settings: what each field allows, said in the error, and defaults underneath."""

from __future__ import annotations

import pytest

from chattui.settings import FIELD_BY_KEY, SettingError, effective, parse_overrides, parse_value
from engine.params import GenerationSettings, SamplingParams


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [("temperature", "0", 0.0), ("temperature", " 1.5 ", 1.5), ("top_p", "1", 1.0), ("top_k", "0", 0),
     ("top_k", "40.0", 40), ("min_p", "0.05", 0.05), ("repetition_penalty", "1.1", 1.1),
     ("max_new_tokens", "1", 1), ("seed", "0", 0), ("seed", "9223372036854775807", 2**63 - 1)],
)
def test_allowed_values_parse(key, text, value):
    assert parse_value(FIELD_BY_KEY[key], text, context_length=2048) == value


@pytest.mark.parametrize(
    ("key", "text", "message"),
    [
        ("temperature", "-0.1", "Temperature must be a number >= 0 (0 = greedy); got '-0.1'"),
        ("temperature", "nan", "Temperature must be a number >= 0 (0 = greedy); got 'nan'"),
        ("temperature", "inf", "Temperature must be a number >= 0 (0 = greedy); got 'inf'"),
        ("top_p", "0", "Top-p must be a number > 0 and <= 1 (1 = off); got '0'"),
        ("top_k", "2.5", "Top-k must be a whole number >= 0 (0 = off); got '2.5'"),
        ("min_p", "1", "Min-p must be a number >= 0 and < 1 (0 = off); got '1'"),
        ("repetition_penalty", "0", "Repetition penalty must be a number > 0 (1 = off); got '0'"),
        ("max_new_tokens", "0", "Max new tokens must be a whole number >= 1; got '0'"),
        ("max_new_tokens", "1025", "Max new tokens must be at most 1024: the model's context window is 2048 tokens; "
                                   "a larger value would leave earlier messages out of every prompt; got '1025'"),
        ("seed", "-1", "Seed must be a whole number from 0 to 9223372036854775807, or empty for a random seed; "
                       "got '-1'"),
    ],
)
def test_rejected_values_say_what_is_allowed(key, text, message):
    with pytest.raises(SettingError) as info:
        parse_value(FIELD_BY_KEY[key], text, context_length=2048)
    assert str(info.value) == message


def test_max_new_tokens_is_bounded_by_what_the_conversation_leaves_free():
    field = FIELD_BY_KEY["max_new_tokens"]
    assert parse_value(field, "1024", context_length=2048) == 1024  # half the window
    assert parse_value(field, "248", context_length=512, context_used=264) == 248
    with pytest.raises(SettingError, match="at most 248: .* this conversation already takes 264"):
        parse_value(field, "249", context_length=512, context_used=264)
    assert parse_value(field, "1", context_length=512, context_used=600) == 1  # full: still a valid setting


def test_empty_fields_mean_model_default_and_errors_are_per_field():
    overrides, errors = parse_overrides({"temperature": "", "top_k": "x", "seed": "3"})
    assert overrides == {"seed": 3}
    assert list(errors) == ["top_k"]


def test_effective_settings_layer_overrides_on_model_defaults():
    defaults = GenerationSettings(SamplingParams(temperature=0.0, top_k=20, top_p=0.8, repetition_penalty=1.05),
                                  max_new_tokens=256)
    values = effective({"top_k": 5, "seed": 9, "system_prompt": "ignored here"}, defaults)
    assert values == GenerationSettings(
        SamplingParams(temperature=0.0, top_k=5, top_p=0.8, min_p=0.0, repetition_penalty=1.05, seed=9), 256
    )
    assert values.to_dict() == {"temperature": 0.0, "top_k": 5, "top_p": 0.8, "min_p": 0.0,
                                "repetition_penalty": 1.05, "seed": 9, "max_new_tokens": 256}, "as the store keeps it"
    assert defaults.sampling.top_k == 20, "the model's defaults are left as they are"
    assert effective({"max_new_tokens": 7}, None) == GenerationSettings(SamplingParams(), 7), "no model: the engine's"
