"""The `tokenizer.*` metadata of a GGUF file being written: the inverse of engine.gguf.tokenizer.

From a GGUF base, its `tokenizer.*` keys are copied as they are. From a Hugging Face folder, tokenizer.json
is described the way llama.cpp's converter describes it, in one of the two vocabulary types our reader
(and llama.cpp) know:
- `gpt2` (byte-level BPE): tokens, token types and merges, and `tokenizer.ggml.pre`, the name of the
  family of split expressions the pre-tokenizer applies (found from tokenizer.json's pre_tokenizer, not
  from a hash of sample tokenizations as the converter does; an unknown one is refused, naming it).
- `llama` (SentencePiece-style BPE with byte fallback): tokens, token types and scores, where a token's
  score is minus the rank of the merge that makes it, so that llama.cpp, which joins the pair whose
  result scores highest, merges in tokenizer.json's order.
Both also get the special ids (bos, eos, unknown, padding), whether BOS/EOS are added to a text, and the
chat template as ChatTokenizer reads them. The token list is padded to the embedding's rows with unused
`[PADn]` tokens, as the converter does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType, TokenType

from engine.errors import CheckpointError, ExportError
from engine.gguf.header import open_gguf
from engine.gguf.tokenizer import BYTE_LEVEL_SPLIT, pre_tokenizer_name
from engine.tokenizer import ChatTokenizer

TOKENIZER_PREFIX = "tokenizer."
# tokenizers.json writes Llama 3's and Qwen2's contractions case-insensitively; llama.cpp spells them out.
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA_CPP_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_DIGITS_ONE_BY_ONE = r"\p{N}"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
UNMERGED_SCORE = -1e9  # SentencePiece pieces no merge makes (characters, bytes, specials): never joined into


def add_tokenizer_metadata(writer: gguf.GGUFWriter, base: Path, vocab_size: int) -> None:
    """Write the tokenizer of `base` (a GGUF file or a Hugging Face folder) for a model of vocab_size rows."""
    if base.is_file():
        _copy_gguf_tokenizer(writer, base)
    else:
        _describe_tokenizer_json(writer, base, vocab_size)


def _copy_gguf_tokenizer(writer: gguf.GGUFWriter, base: Path) -> None:
    for key, field in open_gguf(base).fields.items():
        if not key.startswith(TOKENIZER_PREFIX) or not field.types:
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY and len(field.types) < 2:
            continue  # an empty array records no item type; nothing to copy
        writer.add_key_value(key, field.contents(), kind, sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)


def _describe_tokenizer_json(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    path = folder / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (the GGUF file needs the model's tokenizer)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    model = spec.get("model") or {}
    kind = model.get("type") or ("BPE" if "merges" in model else None)  # older files (GPT-2's) name no type
    if kind != "BPE":
        raise ExportError(f"{path}: a {kind!r} tokenizer model; GGUF export supports BPE ones "
                              "(byte-level, or SentencePiece-style with byte fallback)")
    tokens, added = _token_list(path, spec, vocab_size)
    chat = ChatTokenizer.from_dir(folder)
    if model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(_scores(tokens, _merges(model)))
        writer.add_token_types(_sentencepiece_types(tokens, added, model.get("unk_token")))
        writer.add_add_space_prefix(_adds_space_prefix(path, spec))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_name(path, spec))
        writer.add_token_list(tokens)
        writer.add_token_types(_byte_level_types(tokens, added))
        writer.add_token_merges([f"{left} {right}" for left, right in _merges(model)])

    ids = {text: i for i, text in reversed(list(enumerate(tokens)))}
    specials = {"bos_token": writer.add_bos_token_id, "eos_token": writer.add_eos_token_id,
                "unk_token": writer.add_unk_token_id, "pad_token": writer.add_pad_token_id}
    for name, add in specials.items():
        text = getattr(chat, name, None) if name != "unk_token" else model.get("unk_token")
        if text is not None and text in ids:
            add(ids[text])
    probe = chat.encode("a", add_special_tokens=True)
    plain = chat.encode("a", add_special_tokens=False)
    writer.add_add_bos_token(len(probe) > len(plain) and probe[0] == ids.get(chat.bos_token))
    writer.add_add_eos_token(len(probe) > len(plain) and probe[-1] == ids.get(chat.eos_token))
    if chat.has_chat_template:
        writer.add_chat_template(chat.chat_template)


def _token_list(path: Path, spec: dict[str, Any], vocab_size: int) -> tuple[list[str], dict[str, bool]]:
    """(every token's text by id, padded to vocab_size; the added tokens' texts -> whether special)."""
    by_id: dict[int, str] = {int(i): text for text, i in spec["model"].get("vocab", {}).items()}
    added = {}
    for token in spec.get("added_tokens", []):
        by_id[int(token["id"])] = token["content"]
        added[token["content"]] = bool(token.get("special"))
    count = max(by_id, default=-1) + 1
    if count > vocab_size:
        raise ExportError(f"{path}: {count} tokens, more than the model's {vocab_size} embedding rows")
    return [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)], added


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    """tokenizer.json's merges, written either as "a b" or as ["a", "b"]."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def _byte_level_types(tokens: list[str], added: dict[str, bool]) -> list[int]:
    return [TokenType.CONTROL if added.get(t) else TokenType.USER_DEFINED if t in added
            else TokenType.UNUSED if _is_padding(t, i) else TokenType.NORMAL for i, t in enumerate(tokens)]


def _sentencepiece_types(tokens: list[str], added: dict[str, bool], unk: str | None) -> list[int]:
    return [TokenType.UNKNOWN if t == unk else TokenType.CONTROL if added.get(t) else
            TokenType.USER_DEFINED if t in added else TokenType.BYTE if _BYTE_TOKEN.fullmatch(t) else
            TokenType.UNUSED if _is_padding(t, i) else TokenType.NORMAL for i, t in enumerate(tokens)]


def _is_padding(text: str, index: int) -> bool:
    return text == f"[PAD{index}]"


def _scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """Minus the rank of the first merge that makes each token (the earliest merge wins, as in BPE)."""
    rank_of = {}
    for rank, (left, right) in enumerate(merges):
        rank_of.setdefault(left + right, rank)
    return [-float(rank_of[t]) if t in rank_of else UNMERGED_SCORE for t in tokens]


def _adds_space_prefix(path: Path, spec: dict[str, Any]) -> bool:
    """Whether "▁" is put before the text: by a Prepend normalizer (Llama 2) or a Metaspace pre-tokenizer."""
    normalizer, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer else []
    if any(step.get("type") == "Prepend" and step.get("prepend") == "▁" for step in steps):
        return True
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    return False


def _pre_name(path: Path, spec: dict[str, Any]) -> str:
    """The tokenizer.ggml.pre family of a byte-level tokenizer.json's pre_tokenizer."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits: list[str] = []
    for i, step in enumerate(steps):
        kind, last = step.get("type"), i == len(steps) - 1
        if kind == "Split" and "Regex" in step.get("pattern", {}) and step.get("behavior") == "Isolated" \
                and not step.get("invert"):
            splits.append(step["pattern"]["Regex"].replace(_HF_CONTRACTIONS, _LLAMA_CPP_CONTRACTIONS))
        elif kind == "Digits" and step.get("individual_digits"):
            splits.append(_DIGITS_ONE_BY_ONE)
        elif kind == "ByteLevel" and last and not step.get("add_prefix_space"):
            if step.get("use_regex", True):
                splits.append(BYTE_LEVEL_SPLIT)
        else:
            raise ExportError(f"{path}: pre-tokenizer step {json.dumps(step)[:120]} has no llama.cpp "
                                  "equivalent chattui knows (GGUF export needs one)")
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise ExportError(f"{path}: a byte-level BPE tokenizer's pre_tokenizer must end with ByteLevel")
    name = pre_tokenizer_name(tuple(splits), bool(spec["model"].get("ignore_merges")))
    if name is None:
        raise ExportError(f"{path}: its pre-tokenizer's split expressions match no llama.cpp pre-tokenizer "
                              "chattui knows (GPT-2, Llama 3, Qwen2, SmolLM, Tekken)")
    return name
