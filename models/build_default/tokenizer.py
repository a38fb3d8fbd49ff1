"""Train the byte-level BPE tokenizer and write tokenizer.json + tokenizer_config.json (ChatML template)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.tokenizer import CHATML_FALLBACK_TEMPLATE

VOCAB_SIZE = 8192
PAD = "<|endoftext|>"  # id 0: separates pre-training documents, pads batches
IM_START = "<|im_start|>"  # id 1
IM_END = "<|im_end|>"  # id 2: ends every message; the model's EOS
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
CHAT_TEMPLATE = CHATML_FALLBACK_TEMPLATE  # "<|im_start|>{role}\n{content}<|im_end|>\n" per message


def render(messages: list[dict]) -> str:
    """A conversation as ChatML text (what the template renders without a generation prompt)."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def train_tokenizer(conversations: list[dict], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: every byte is a token, so any text encodes) with ChatML special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterator[str]:
        for conv in conversations:
            for m in conv["messages"]:
                yield m["role"] + "\n" + m["content"]

    tokenizer.train_from_iterator(texts(), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, f"{token} should have id {i}"
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
