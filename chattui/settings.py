"""Per-conversation generation settings: parsing, validation and defaults, in plain Python.

A conversation stores only what the user changed (`overrides`); the rest comes from the loaded
model's generation_config.json, so a new model brings its own defaults. The allowed ranges match
the engine's `SamplingParams.validate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.params import GenerationSettings

MAX_SEED = 2**63 - 1  # below the engine's 2**64: conversations keep the seed in SQLite, whose integers are signed 64-bit


class SettingError(ValueError):
    """One setting with a value outside what is allowed; the message names both."""


@dataclass(frozen=True)
class SettingField:
    key: str  # the key in settings dicts (GenerationSettings.to_dict())
    label: str  # what the user sees
    kind: type  # int or float
    allowed: str  # what is allowed, in words, for error messages and hints
    check: Callable[[Any], bool]  # True when the parsed value is allowed


FIELDS: tuple[SettingField, ...] = (
    SettingField("temperature", "Temperature", float, "a number >= 0 (0 = greedy)", lambda v: v >= 0),
    SettingField("top_p", "Top-p", float, "a number > 0 and <= 1 (1 = off)", lambda v: 0 < v <= 1),
    SettingField("top_k", "Top-k", int, "a whole number >= 0 (0 = off)", lambda v: v >= 0),
    SettingField("min_p", "Min-p", float, "a number >= 0 and < 1 (0 = off)", lambda v: 0 <= v < 1),
    SettingField("repetition_penalty", "Repetition penalty", float, "a number > 0 (1 = off)", lambda v: v > 0),
    SettingField("max_new_tokens", "Max new tokens", int, "a whole number >= 1", lambda v: v >= 1),
    SettingField("seed", "Seed", int, f"a whole number from 0 to {MAX_SEED}, or empty for a random seed",
                 lambda v: 0 <= v <= MAX_SEED),
)
FIELD_BY_KEY = {f.key: f for f in FIELDS}


def max_new_tokens_limit(context_length: int, context_used: int = 0) -> int:
    """The largest max_new_tokens that leaves the conversation in the prompt: at most half the context window,
    and no more than the conversation (context_used tokens so far) leaves free. Beyond it, every reply would
    push the oldest messages out of the prompt."""
    return max(1, min(context_length // 2, context_length - context_used))


def parse_value(field: SettingField, text: str, context_length: int | None = None, context_used: int = 0) -> int | float:
    """The value typed for one field; SettingError says what is allowed (max_new_tokens: see max_new_tokens_limit)."""
    raw = text.strip()
    try:
        value = field.kind(raw)
    except ValueError:
        value = None
    if field.kind is int and value is None:
        try:  # accept "512.0" but not "0.5"
            as_float = float(raw)
            value = int(as_float) if as_float.is_integer() else None
        except (ValueError, OverflowError):
            value = None
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or not field.check(value):
        raise SettingError(f"{field.label} must be {field.allowed}; got {raw!r}")
    if field.key == "max_new_tokens" and context_length and value > max_new_tokens_limit(context_length, context_used):
        limit = max_new_tokens_limit(context_length, context_used)
        used = f", and this conversation already takes {context_used}" if context_used else ""
        raise SettingError(
            f"{field.label} must be at most {limit}: the model's context window is {context_length} tokens{used}; "
            f"a larger value would leave earlier messages out of every prompt; got {raw!r}"
        )
    return value


def parse_overrides(
    texts: dict[str, str], context_length: int | None = None, context_used: int = 0
) -> tuple[dict[str, Any], dict[str, str]]:
    """Typed overrides from the text of each field (empty = model default), and an error per bad field."""
    overrides: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for key, text in texts.items():
        if not text.strip():
            continue
        try:
            overrides[key] = parse_value(FIELD_BY_KEY[key], text, context_length, context_used)
        except SettingError as e:
            errors[key] = str(e)
    return overrides, errors


def effective(overrides: dict[str, Any], defaults: GenerationSettings | None) -> GenerationSettings:
    """The settings a reply uses: the model's defaults (before a model is loaded, the engine's own) with the
    conversation's overrides, as the store keeps them, on top."""
    return (defaults or GenerationSettings()).updated(overrides)


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
