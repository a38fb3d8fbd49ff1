"""ChatTokenizer loading, encoding and decoding, against transformers on real published tokenizer files."""

from __future__ import annotations

import json
import logging
import shutil
from functools import cache
from pathlib import Path

import pytest

from checkpoints import REALWORLD, CHATML_TEMPLATE, train_tokenizer

from engine.errors import CheckpointError
from engine.tokenizer import CHATML_FALLBACK_TEMPLATE, ChatTokenizer

needs_realworld = pytest.mark.skipif(
    not REALWORLD.is_dir(), reason=f"real tokenizer files not found at {REALWORLD} (shared/ beside the clone)"
)
# Folders holding a tokenizer.json (the others have template files only).
TOKENIZER_FOLDERS = [
    "gpt2",
    "mistral-7b-instruct-v0.2",
    "mistral-7b-instruct-v0.3",
    "phi-3-mini-4k-instruct",
    "tinyllama-1.1b-chat-v1.0",
]

TEXTS = [
    "Hello world",
    "Hello, world! How are you?",
    " one leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\tindented",
    "你好，世界！今天天气怎么样？",
    "emoji 😀🎉🚀 family 👨‍👩‍👧 skin 👍🏽",
    "café naïve résumé — “quotes”",
    "<s>[INST] special text [/INST]</s>",
    "Hello <s> there </s> end",
    "<|endoftext|> x <|user|>\nhi<|end|>\n<|assistant|>\n",
    "</s>\n<|assistant|>\n",
    "<|im_start|>user\nhi<|im_end|>",
    "",
    " ",
    "\n",
]
ROUND_TRIP_TEXTS = [t for t in TEXTS if t and not t[0].isspace() and "<" not in t]

MESSAGES = [
    {"role": "user", "content": "Hi! 你好 😀"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "Tell me a joke."},
]


@cache
def _hf(folder: str):
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("engine.tokenizer mirrors transformers 5 tokenizer loading (4.x uses tokenizer.json as is)")
    return transformers.AutoTokenizer.from_pretrained(REALWORLD / folder)


@cache
def _ours(folder: str) -> ChatTokenizer:
    return ChatTokenizer.from_dir(REALWORLD / folder)


def _ids(output) -> list[int]:
    """apply_chat_template(tokenize=True) gives a BatchEncoding in transformers 5, a list in 4.x."""
    return list(output["input_ids"] if hasattr(output, "keys") else output)


@needs_realworld
@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_encode_matches_transformers(folder):
    ours, hf = _ours(folder), _hf(folder)
    for text in TEXTS:
        for add_special_tokens in (True, False):
            expected = hf(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, (text, add_special_tokens)


@needs_realworld
@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_attributes_match_transformers(folder):
    ours, hf = _ours(folder), _hf(folder)
    assert ours.vocab_size == len(hf)
    if ours.eos_token is not None:  # gpt2's files name no special tokens; transformers falls back to class defaults
        assert (ours.bos_token, ours.eos_token, ours.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
        assert ours.eos_token_id == hf.eos_token_id


@needs_realworld
@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_encode_chat_matches_transformers(folder):
    ours, hf = _ours(folder), _hf(folder)
    template = None if ours.has_chat_template else CHATML_FALLBACK_TEMPLATE
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(
            MESSAGES, chat_template=template, tokenize=True, add_generation_prompt=add_generation_prompt
        )
        assert ours.encode_chat(MESSAGES, add_generation_prompt=add_generation_prompt) == _ids(expected)


@needs_realworld
@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_decode(folder):
    ours, hf = _ours(folder), _hf(folder)
    for text in ROUND_TRIP_TEXTS:
        assert ours.decode(ours.encode(text)) == text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    for text in TEXTS:
        ids = ours.encode(text)
        for skip in (True, False):
            expected = hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, (text, skip)


@needs_realworld
@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_token_strings(folder):
    ours = _ours(folder)
    for text in TEXTS:
        ids = ours.encode(text)
        strings = ours.token_strings(ids)
        assert len(strings) == len(ids)
        assert strings == [ours.decode([i], skip_special_tokens=False) for i in ids]
    if ours.bos_token and (ids := ours.encode("Hi")) and ids[0] == ours.encode(ours.bos_token, False)[0]:
        assert ours.token_strings(ids)[0] == ours.bos_token  # special tokens are shown, not skipped


@needs_realworld
def test_gpt2_token_strings_join_to_the_text():
    text = "Hello, world! How are you?"
    assert "".join(_ours("gpt2").token_strings(_ours("gpt2").encode(text))) == text


@needs_realworld
@pytest.mark.parametrize(
    ("folder", "model_type", "space_after_special"),
    [("tinyllama-1.1b-chat-v1.0", "llama", False), ("mistral-7b-instruct-v0.2", "mistral", True)],
)
def test_llama_rebuild_follows_model_type(tmp_path, folder, model_type, space_after_special):
    """transformers 5 rebuilds a declared LlamaTokenizer of model_type llama, but loads a Mistral's file as is."""
    copy = tmp_path / folder
    shutil.copytree(REALWORLD / folder, copy)
    (copy / "config.json").write_text(json.dumps({"model_type": model_type}))
    tok = ChatTokenizer.from_dir(copy)
    ids = tok.encode("</s>\nhi", add_special_tokens=False)
    assert (tok.token_strings(ids)[1] != "\n") == space_after_special
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        hf = transformers.AutoTokenizer.from_pretrained(copy)
        assert ids == hf("</s>\nhi", add_special_tokens=False)["input_ids"]


# --- Loading rules, on a tiny tokenizer trained on the fly. ---


@cache
def _tiny_tokenizer_json() -> str:
    return train_tokenizer().to_str()


def _folder(path: Path, config: dict | None = None, files: dict[str, str] | None = None) -> Path:
    """A model folder with the tiny tokenizer.json, tokenizer_config.json (unless None) and other files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(_tiny_tokenizer_json(), encoding="utf-8")
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, text in (files or {}).items():
        (path / name).write_text(text, encoding="utf-8")
    return path


def test_tiny_checkpoint_loads(tmp_path):
    tok = ChatTokenizer.from_dir(
        _folder(tmp_path, {"eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>"}, "bos_token": None,
                           "chat_template": CHATML_TEMPLATE})
    )
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert tok.eos_token_id == 2
    assert tok.has_chat_template and tok.chat_template == CHATML_TEMPLATE
    assert tok.vocab_size == 400
    assert tok.encode_chat([{"role": "user", "content": "Hello"}])[:1] == [1]  # <|im_start|>


def test_missing_template_uses_chatml_fallback(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="engine.tokenizer"):
        tok = ChatTokenizer.from_dir(_folder(tmp_path, {"eos_token": "<|im_end|>"}))
    assert not tok.has_chat_template
    assert tok.chat_template == CHATML_FALLBACK_TEMPLATE
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ChatML" in warnings[0].getMessage() and str(tmp_path) in warnings[0].getMessage()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert tok.render_chat(messages) == expected
    assert tok.render_chat(messages, add_generation_prompt=False).endswith("U<|im_end|>\n")
    ids = tok.encode_chat(messages)
    assert tok.decode(ids, skip_special_tokens=False) == tok.render_chat(messages)


def test_folder_without_tokenizer_config(tmp_path):
    tok = ChatTokenizer.from_dir(_folder(tmp_path))
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id, tok.has_chat_template) == (None, None, None, False)


def test_chat_template_jinja_wins(tmp_path):
    folder = _folder(tmp_path, {"chat_template": "from config"}, {"chat_template.jinja": "from file"})
    tok = ChatTokenizer.from_dir(folder)
    assert tok.chat_template == "from file"


@pytest.mark.parametrize(
    ("templates", "expected"),
    [
        ([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}], "D"),
        ([{"name": "rag", "template": "R"}, {"name": "tool_use", "template": "T"}], "R"),
    ],
)
def test_named_templates(tmp_path, templates, expected):
    assert ChatTokenizer.from_dir(_folder(tmp_path, {"chat_template": templates})).chat_template == expected


def test_special_tokens_map_is_the_fallback(tmp_path):
    stm = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    config = {"eos_token": "<|im_end|>", "pad_token": None}
    tok = ChatTokenizer.from_dir(_folder(tmp_path, config, {"special_tokens_map.json": json.dumps(stm)}))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok.eos_token_id == 2


@pytest.mark.parametrize(
    "config",
    [
        # transformers ignores add_bos_token/add_eos_token when there is a tokenizer.json
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": True, "add_eos_token": True},
        {"eos_token": "<|end_of_turn|>", "additional_special_tokens": ["<tool>", "</tool>"]},
        {"eos_token": "<|im_end|>", "extra_special_tokens": {"image_token": "<image>"}},
        {"eos_token": "<|im_end|>", "split_special_tokens": True},
        {"tokenizer_class": "LlamaTokenizer", "legacy": False, "eos_token": "<|im_end|>"},  # ByteLevel: used as is
    ],
)
def test_config_rules_match_transformers(tmp_path, config):
    transformers = pytest.importorskip("transformers")
    folder = _folder(tmp_path, {"tokenizer_class": "PreTrainedTokenizerFast", **config})
    ours, hf = ChatTokenizer.from_dir(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(hf)
    for text in ("Hello world", "a<|end_of_turn|>b <tool>x</tool> <image>", "<|im_start|>hi<|im_end|>"):
        for add_special_tokens in (True, False):
            expected = hf(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert ours.encode(text, add_special_tokens) == expected, (text, add_special_tokens)


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: file not found") as error:
        ChatTokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(error.value)


@pytest.mark.parametrize(
    "content",
    ['{"version": "1.0", "model": ', "not json at all", '{"version": "1.0"}', "\x00\x01binary"],
)
def test_corrupt_tokenizer_json(tmp_path, content):
    _folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError) as error:
        ChatTokenizer.from_dir(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "tokenizer.json") in message and "\n" not in message


def test_corrupt_tokenizer_config_names_line_and_column(tmp_path):
    _folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{\n  "eos_token": "x",\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json:3:3: invalid JSON"):
        ChatTokenizer.from_dir(tmp_path)
