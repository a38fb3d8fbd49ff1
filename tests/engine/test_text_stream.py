"""engine.text_stream.TextStream: token-by-token detokenization and stop strings.

Real byte-level tokenizers (the tiny trained one, GPT-2's, and the SentencePiece-style byte-fallback ones of
Mistral v0.3 and Phi-3) split Chinese, emoji (ZWJ sequences, flags, skin tones) and accented text into tokens
that are only parts of a character: the stream must never show U+FFFD and must add up to decode(all ids).
Stop-string logic is also checked with a character-level decoder, where every boundary is known exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.text_stream import TextStream
from engine.tokenizer import ChatTokenizer

REPLACEMENT = "\ufffd"

CHINESE = "你好，世界！今天天气很好。我们一起学习注意力机制，以及解码器模型逐词生成文本的过程。"
EMOJI = (
    "Family 👩‍👩‍👧 and 👨‍👩‍👧‍👦, flags 🇯🇵🇺🇦🇧🇷 🏳️‍🌈 🏴‍☠️, skin tones 👍🏽👋🏿, "
    "keycap 1️⃣, plain 😀🎉🚀"
)
ACCENTED = (
    "Crème brûlée à la façon de Zoë — naïve résumé, Ångström, straße, ñandú, "
    "e\u0301te\u0301 (combining), Łódź, Ελληνικά, Русский, Ærøskøbing"
)
MIXED = "Le café 咖啡 ☕ coûte 3 €; 北京 🇨🇳 → Zürich 🇨🇭! 안녕하세요 こんにちは مرحبا 👩‍💻 ok"
TEXTS = {"chinese": CHINESE, "emoji": EMOJI, "accented": ACCENTED, "mixed": MIXED}

REAL_TOKENIZERS = ("gpt2", "mistral-7b-instruct-v0.3", "phi-3-mini-4k-instruct")
TOKENIZER_NAMES = ("tiny", *REAL_TOKENIZERS)


class Codec:
    """encode(text) -> ids and decode(ids) -> text for one tokenizer, as the engine uses them."""

    def __init__(self, name: str, encode, decode, byte_fallback: bool):
        self.name = name
        self.encode = encode
        self.decode = decode
        self.byte_fallback = byte_fallback


@pytest.fixture(params=TOKENIZER_NAMES)
def codec(request, tokenizer) -> Codec:
    name = request.param
    if name == "tiny":  # tokenizers.Tokenizer, byte-level BPE like Qwen's
        return Codec(
            name, lambda text: tokenizer.encode(text, add_special_tokens=False).ids, tokenizer.decode, False
        )
    realworld = request.getfixturevalue("realworld")
    chat = ChatTokenizer.from_dir(Path(realworld) / name)
    return Codec(name, lambda text: chat.encode(text, add_special_tokens=False), chat.decode, name != "gpt2")


def stream_ids(decode, ids, stops=()):
    stream = TextStream(decode, stops)
    deltas = [stream.push(i) for i in ids]
    tail = stream.finish()
    return stream, deltas, tail


# -- plain streaming with real tokenizers ----------------------------------------------------------


@pytest.mark.parametrize("text_name", list(TEXTS))
def test_streamed_deltas_never_contain_replacement_char_and_add_up_to_decode(codec, text_name):
    text = TEXTS[text_name]
    ids = codec.encode(text)
    full = codec.decode(ids)
    assert full == text, "precondition: the tokenizer round-trips the text"
    stream, deltas, tail = stream_ids(codec.decode, ids)
    for i, delta in enumerate(deltas):
        assert REPLACEMENT not in delta, f"delta {i} {delta!r} shows a partial character"
    assert tail == ""  # the last token completes every character: nothing left to release
    assert "".join(deltas) == full
    assert stream.text == full
    assert not stream.stopped


@pytest.mark.parametrize("text_name", ["emoji", "mixed"])
def test_partial_characters_really_occur_and_are_held_back(codec, text_name):
    """Guard: the texts do split characters across tokens, so the test above exercises holding back."""
    ids = codec.encode(TEXTS[text_name])
    partial = [k for k in range(1, len(ids)) if codec.decode(ids[:k]).endswith(REPLACEMENT)]
    assert partial, f"{codec.name}: no token prefix ends inside a character"
    full = codec.decode(ids)
    _, deltas, _ = stream_ids(codec.decode, ids)
    complete = 0  # characters known complete so far; never shrinks (see below)
    for k in range(1, len(ids) + 1):
        # ByteFallback decoders turn a whole run of byte tokens into U+FFFD while its last character is
        # incomplete, hiding characters already shown: what was shown stays shown, nothing is retracted.
        complete = max(complete, len(codec.decode(ids[:k]).rstrip(REPLACEMENT)))
        assert "".join(deltas[:k]) == full[:complete], f"after token {k}"


def test_emoji_zwj_sequence_is_emitted_byte_for_byte(codec):
    text = "👩‍👩‍👧"
    ids = codec.encode(text)
    _, deltas, tail = stream_ids(codec.decode, ids)
    joined = "".join(deltas) + tail
    assert joined == codec.decode(ids)
    assert [hex(ord(c)) for c in joined.lstrip(" ")] == ["0x1f469", "0x200d", "0x1f469", "0x200d", "0x1f467"]


def test_generation_ending_inside_a_character_is_released_by_finish(codec):
    ids = codec.encode(MIXED)
    cut = next(k for k in range(1, len(ids)) if codec.decode(ids[:k]).endswith(REPLACEMENT))
    stream, deltas, tail = stream_ids(codec.decode, ids[:cut])
    assert REPLACEMENT not in "".join(deltas)
    assert tail.startswith(REPLACEMENT)  # held back until now
    assert "".join(deltas) + tail == codec.decode(ids[:cut])  # nothing is lost at the end


# -- stop strings with real tokenizers ----------------------------------------------------------------

SENTENCE = "Hello there! How are you doing today? I am fine, thank you very much."


def boundaries(codec: Codec, ids: list[int]) -> list[int]:
    """Character offset where each token ends in the decoded text (ASCII text: no partial characters)."""
    return [len(codec.decode(ids[: k + 1])) for k in range(len(ids))]


def test_stop_string_spanning_a_token_boundary_is_never_emitted(codec):
    ids = codec.encode(SENTENCE)
    full = codec.decode(ids)
    ends = boundaries(codec, ids)
    # A 4-character stop string: last 2 characters of token i, first 2 of token i + 1.
    i = next(
        i for i in range(2, len(ids) - 2)
        if ends[i] - ends[i - 1] >= 2 and ends[i + 1] - ends[i] >= 2 and full.find(full[ends[i] - 2 : ends[i] + 2]) == ends[i] - 2
    )
    stop = full[ends[i] - 2 : ends[i] + 2]
    stream = TextStream(codec.decode, [stop])
    deltas = []
    for k, token in enumerate(ids):
        deltas.append(stream.push(token))
        assert stream.stopped == (k >= i + 1), f"stopped={stream.stopped} after token {k} (stop {stop!r})"
    assert stream.finish() == ""
    assert stream.text == "".join(deltas) == full[: ends[i] - 2]
    assert stop not in stream.text and not any(stop[:2] in d for d in deltas[i:])


def test_stop_string_inside_multibyte_chinese_text(codec):
    ids = codec.encode(CHINESE)
    stream, deltas, tail = stream_ids(codec.decode, ids, ["世界"])
    assert stream.stopped
    assert tail == ""
    assert stream.text == "".join(deltas) == CHINESE[: CHINESE.index("世界")]
    assert all(REPLACEMENT not in d for d in deltas)


def test_stop_string_made_of_emoji(codec):
    ids = codec.encode(EMOJI)
    stream, deltas, _ = stream_ids(codec.decode, ids, ["🇺🇦"])
    assert stream.stopped
    assert stream.text == "".join(deltas) == EMOJI[: EMOJI.index("🇺🇦")]


def test_prefix_of_stop_string_is_held_then_released_with_real_tokens(codec):
    text = "Hello there! How is it going?"
    ids = codec.encode(text)
    ends = boundaries(codec, ids)
    how = text.index("How") + len("How")
    k_how = ends.index(how)  # the token that completes "How" (true for all four tokenizers)
    stream = TextStream(codec.decode, ["How are"])
    emitted = []
    for token in ids:
        stream.push(token)
        emitted.append(stream.text)
    assert emitted[k_how] == codec.decode(ids[: k_how + 1])[: -len("How")], "'How' could start the stop string"
    assert emitted[-1] == text  # released as soon as ' is' shows it is not the stop string
    assert not stream.stopped and stream.finish() == ""


def test_stop_string_at_the_very_start_gives_empty_text(codec):
    ids = codec.encode(SENTENCE)
    stream, deltas, tail = stream_ids(codec.decode, ids, ["Hello"])
    assert stream.stopped
    assert stream.text == "" and deltas == [""] * len(ids) and tail == ""


# -- stop-string logic with a character-level decoder (one token per character) ----------------------


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def char_decode(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def push_text(stream: TextStream, text: str) -> list[str]:
    return [stream.push(i) for i in chars(text)]


def test_text_that_may_start_a_stop_string_is_held_back_then_released():
    stream = TextStream(char_decode, ["STOP"])
    push_text(stream, "abcST")
    assert stream.text == "abc"
    assert push_text(stream, "O") == [""]
    assert stream.text == "abc"
    assert push_text(stream, "X") == ["STOX"]
    assert stream.text == "abcSTOX" and not stream.stopped


def test_held_back_prefix_is_released_by_finish():
    stream = TextStream(char_decode, ["STOP"])
    push_text(stream, "abcSTO")
    assert stream.text == "abc"
    assert stream.finish() == "STO"
    assert stream.text == "abcSTO" and not stream.stopped


def test_stop_string_completed_ends_text_right_before_it():
    stream = TextStream(char_decode, ["STOP"])
    deltas = push_text(stream, "abcSTOPdef")
    assert stream.stopped
    assert stream.text == "".join(deltas) == "abc"
    assert stream.push(ord("z")) == "" and stream.finish() == ""


def test_overlapping_stop_prefix_restarts_correctly():
    stream = TextStream(char_decode, ["aab"])
    deltas = push_text(stream, "xaaab")
    assert stream.stopped
    assert stream.text == "".join(deltas) == "xa"


@pytest.mark.parametrize("stops", [["world", "lo w"], ["lo w", "world"]])
def test_multiple_stop_strings_earliest_wins(stops):
    stream = TextStream(char_decode, stops)
    push_text(stream, "hello world")
    assert stream.stopped and stream.text == "hel"


@pytest.mark.parametrize("stops", [["cd", "b c"], ["b c", "cd"]])
def test_multiple_stop_strings_completed_in_one_token_earliest_wins(stops):
    pieces = ["x", "ab cd", "e"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    stream = TextStream(decode, stops)
    assert stream.push(0) == "x"
    assert stream.push(1) == "a"
    assert stream.stopped and stream.text == "xa"


@pytest.mark.parametrize("stops", [[], (), [""]])
def test_empty_stop_list_behaves_like_plain_streaming(stops, tokenizer):
    ids = tokenizer.encode(MIXED, add_special_tokens=False).ids
    plain = TextStream(tokenizer.decode)
    with_stops = TextStream(tokenizer.decode, stops)
    for token in ids:
        assert with_stops.push(token) == plain.push(token)
    assert with_stops.finish() == plain.finish() == ""
    assert with_stops.text == plain.text == tokenizer.decode(ids)
    assert not with_stops.stopped


def test_stop_string_at_the_very_start_character_level():
    stream = TextStream(char_decode, ["<|"])
    assert push_text(stream, "<|im_end|> more") == [""] * len("<|im_end|> more")
    assert stream.stopped and stream.text == ""


def test_stop_string_spanning_held_partial_character():
    """The stop string's last character arrives split in bytes: no early stop, no U+FFFD, exact cut."""
    data = "ab世界cd".encode()
    # one "token" per UTF-8 byte: decode like a byte-level tokenizer (lossy on incomplete sequences)
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    stream = TextStream(decode, ["b世"])
    deltas = [stream.push(b) for b in data]
    assert stream.stopped and stream.text == "".join(deltas) == "a"
    assert all(REPLACEMENT not in d for d in deltas)
