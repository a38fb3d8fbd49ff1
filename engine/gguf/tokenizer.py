"""A `tokenizers.Tokenizer` built from a GGUF file's `tokenizer.ggml.*` metadata, as llama.cpp tokenizes.

Two vocabulary types (`tokenizer.ggml.model`):
- `gpt2`: byte-level BPE with the file's merges. The text is first split by the regular expressions
  llama.cpp's `llm_tokenizer_bpe` uses for the file's `tokenizer.ggml.pre` (applied in turn, each
  splitting the pieces of the one before and keeping what it does not match: `Split(isolated)`).
- `llama`: SentencePiece-style BPE with byte fallback: spaces become "▁", one is put before every run
  of text, as llama.cpp does, the ones after special tokens included (when `add_space_prefix`), and
  pairs merge in the order of the merged piece's score (so the scores become the merges' ranking).
Control and unknown-type tokens, and the end-of-generation ones llama.cpp knows by their text, are
special (matched whole, skipped when decoding); user-defined ones are matched whole and kept. Torch-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from engine.errors import CheckpointError
from engine.gguf.header import GGUFFile

log = logging.getLogger(__name__)

# The split expressions of llama.cpp's src/llama-vocab.cpp, by pre-tokenizer family.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")
BYTE_LEVEL_SPLIT = _GPT2_SPLIT  # what tokenizers' ByteLevel(use_regex=True) splits by


@dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp treats one `tokenizer.ggml.pre` family."""

    splits: tuple[str, ...]  # split expressions, applied in order
    ignore_merges: bool = False  # a piece that is a whole token is kept whole
    add_bos: bool = False  # BOS is added when the file does not say (tokenizer.ggml.add_bos_token)


_LLAMA3 = _PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = _PreTokenizer((_QWEN2_SPLIT,))
_SMOLLM = _PreTokenizer((r"\p{N}", _GPT2_SPLIT))
_GPT2 = _PreTokenizer((_GPT2_SPLIT,))
# Names as llama-vocab.cpp reads them (the families asked for, and names llama.cpp gives the same rules);
# each family's first name is the one llama.cpp's converter writes, and the one our GGUF export writes.
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "kormo", "f2llmv2"), _QWEN2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b"), _SMOLLM),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo"), _GPT2),
    "tekken": _PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
    "default": _PreTokenizer(_DEFAULT_SPLITS),
}
SUPPORTED_TOKENIZER_TYPES = ("gpt2", "llama")

# Tokens llama.cpp ends a reply on wherever a vocabulary has them (llama-vocab.cpp's end-of-generation list);
# it treats them as control tokens whatever type the file gives them.
END_OF_GENERATION_TOKENS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
    "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<|fim_pad|>", "<|fim_repo|>", "<|repo_name|>",
    "<|file_sep|>",
})
# llama.cpp's special ids for a SentencePiece vocabulary whose file names none.
_SENTENCEPIECE_DEFAULT_IDS = {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}


def build_tokenizer(gguf_file: GGUFFile) -> tuple[Tokenizer, dict[str, str]]:
    """The tokenizer and the special tokens' text by name (bos_token, eos_token, unk_token, pad_token)."""
    kind = gguf_file.value("tokenizer.ggml.model", str)
    tokens = gguf_file.array("tokenizer.ggml.tokens", str)
    if not tokens:
        raise CheckpointError(f"{gguf_file.path}: metadata key 'tokenizer.ggml.tokens' is empty")
    token_types = gguf_file.array("tokenizer.ggml.token_type", int, [TokenType.NORMAL] * len(tokens))
    if len(token_types) != len(tokens):
        raise CheckpointError(
            f"{gguf_file.path}: 'tokenizer.ggml.token_type' has {len(token_types)} entries for {len(tokens)} tokens"
        )
    if kind == "gpt2":
        pre = _pre_tokenizer(gguf_file)
        tokenizer = _byte_level_bpe(gguf_file, tokens, pre)
        default_add_bos = pre.add_bos
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(gguf_file, tokens, token_types)
        default_add_bos = True  # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says not to
    else:
        raise CheckpointError(
            f"{gguf_file.path}: unsupported tokenizer type {kind!r} in 'tokenizer.ggml.model' "
            f"(supported: {', '.join(SUPPORTED_TOKENIZER_TYPES)})"
        )

    tokenizer.add_special_tokens([
        AddedToken(text, special=True, normalized=False)
        for text, token_type in zip(tokens, token_types)
        if token_type in (TokenType.CONTROL, TokenType.UNKNOWN) or text in END_OF_GENERATION_TOKENS
    ])
    tokenizer.add_tokens([
        AddedToken(text, special=False, normalized=False)
        for text, token_type in zip(tokens, token_types) if token_type == TokenType.USER_DEFINED
    ])

    special: dict[str, str] = {}
    special_ids: dict[str, int] = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        default_id = _SENTENCEPIECE_DEFAULT_IDS.get(key) if kind == "llama" else None
        token_id = gguf_file.value(f"tokenizer.ggml.{key}", int, default_id)
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise CheckpointError(f"{gguf_file.path}: 'tokenizer.ggml.{key}' is {token_id}, outside the {len(tokens)} tokens")
        special[name], special_ids[name] = tokens[token_id], token_id

    # What encode(text, add_special_tokens=True) puts around the text: llama.cpp's add_bos / add_eos.
    add_bos = "bos_token" in special and gguf_file.value("tokenizer.ggml.add_bos_token", bool, default_add_bos)
    add_eos = "eos_token" in special and gguf_file.value("tokenizer.ggml.add_eos_token", bool, False)
    before = ["bos_token"] if add_bos else []
    after = ["eos_token"] if add_eos else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=[*(special[n] for n in before), "$A", *(special[n] for n in after)],
        special_tokens=[(special[n], special_ids[n]) for n in before + after],
    )
    return tokenizer, special


def pre_tokenizer_name(splits: tuple[str, ...], ignore_merges: bool) -> str | None:
    """The `tokenizer.ggml.pre` name of the family that splits text by these expressions, None if none does."""
    return next((name for name, pre in _PRE_TOKENIZERS.items()
                 if pre.splits == splits and pre.ignore_merges == ignore_merges), None)


def _pre_tokenizer(gguf_file: GGUFFile) -> _PreTokenizer:
    name = gguf_file.value("tokenizer.ggml.pre", str, None)
    if name is None:
        log.warning("%s: no 'tokenizer.ggml.pre'; splitting text with llama.cpp's default rules", gguf_file.path)
        name = "default"
    if name not in _PRE_TOKENIZERS:
        raise CheckpointError(
            f"{gguf_file.path}: unsupported pre-tokenizer {name!r} in 'tokenizer.ggml.pre' "
            f"(supported: {', '.join(_PRE_TOKENIZERS)})"
        )
    return _PRE_TOKENIZERS[name]


def _byte_level_bpe(gguf_file: GGUFFile, tokens: list[str], pre: _PreTokenizer) -> Tokenizer:
    merges = [_split_merge(gguf_file, m) for m in gguf_file.array("tokenizer.ggml.merges", str)]
    vocab = {text: i for i, text in reversed(list(enumerate(tokens)))}  # a repeated text keeps its first id
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _split_merge(gguf_file: GGUFFile, merge: str) -> tuple[str, str]:
    """"a b" -> ("a", "b"), splitting at the first space after the first character as llama.cpp does."""
    at = merge.find(" ", 1)
    if at < 0:
        raise CheckpointError(f"{gguf_file.path}: malformed merge {merge!r} in 'tokenizer.ggml.merges' (expected 'a b')")
    return merge[:at], merge[at + 1 :]


def _sentencepiece_bpe(gguf_file: GGUFFile, tokens: list[str], token_types: list[int]) -> Tokenizer:
    scores = gguf_file.array("tokenizer.ggml.scores", float)
    if len(scores) != len(tokens):
        raise CheckpointError(f"{gguf_file.path}: 'tokenizer.ggml.scores' has {len(scores)} entries for {len(tokens)} tokens")
    vocab = {text: i for i, text in reversed(list(enumerate(tokens)))}
    unk_id = gguf_file.value("tokenizer.ggml.unknown_token_id", int, _SENTENCEPIECE_DEFAULT_IDS["unknown_token_id"])
    tokenizer = Tokenizer(models.BPE(
        vocab, _merges_by_score(tokens, token_types, scores, vocab), byte_fallback=True, fuse_unk=True,
        unk_token=tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None,
    ))
    space_prefix = gguf_file.value("tokenizer.ggml.add_space_prefix", bool, True)
    # A normalizer, not Metaspace: like llama.cpp (and Llama's own tokenizer.json) it puts "▁" before every run
    # of text, even one that already starts with a space and the ones after special tokens.
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_by_score(
    tokens: list[str], token_types: list[int], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """Every split of a mergeable token into two vocabulary pieces, best merged score first.

    llama.cpp's SentencePiece tokenizer repeatedly joins the adjacent pair whose joined text is the
    vocabulary token with the highest score; BPE with merges in this order does the same."""
    ranked = []
    for token_id, (text, kind, score) in enumerate(zip(tokens, token_types, scores)):
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.BYTE) or vocab.get(text) != token_id:
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
