"""Build the corpus: conversations from every source, deduplicated, split into train and validation.

Every record is one conversation `{"id", "source", "messages": [{"role", "content"}, ...]}`, written to
`train.jsonl` / `val.jsonl` in the work folder. Pre-training reads all of them as text (rendered with the chat
template); chat tuning reads the same records with the loss on assistant messages only. The split is by
conversation (a stable hash of its id), so no conversation is in both.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from models.build_default.persona import persona_conversations
from models.build_default.sources import SOURCE_BY_NAME, archive_path

log = logging.getLogger(__name__)

VAL_FRACTION = 0.03  # of the conversations of each source (persona data is all for training)
WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
SATELLITE = "s"  # adjective satellites are listed in data.adj with type "s"


# -- chitchat-dataset --------------------------------------------------------------------------------------


def chitchat_conversations(wheel: Path) -> Iterator[dict]:
    """Each conversation: turns alternate between the two people; a turn's messages are joined by spaces."""
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read("chitchat_dataset/dataset.json"))
    for conv_id, conv in data.items():
        messages = []
        for i, turn in enumerate(conv["messages"]):
            text = " ".join(_clean(m["text"]) for m in turn if _clean(m["text"]))
            if text:
                messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        if len(messages) >= 2:
            yield {"id": f"chitchat/{conv_id}", "source": "chitchat", "messages": messages}


def chitchat_licence(wheel: Path) -> str:
    """The MIT licence text shipped in the chitchat-dataset wheel."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/LICENSE"))
        return z.read(name).decode()


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# -- WordNet -----------------------------------------------------------------------------------------------


def read_wordnet(deb: Path) -> dict[str, bytes]:
    """The database files (data.noun, index.noun, ...) from the wordnet-base .deb."""
    with open(deb, "rb") as f:
        blob = f.read()
    files: dict[str, bytes] = {}
    for member, content in _ar_members(blob):
        if member.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(content)) as tar:
                for info in tar.getmembers():
                    name = info.name.rsplit("/", 1)[-1]
                    if "/usr/share/wordnet/" in info.name and info.isfile():
                        files[name] = tar.extractfile(info).read()
                    elif info.name.endswith("doc/wordnet-base/copyright"):
                        files["copyright"] = tar.extractfile(info).read()
    return files


def _ar_members(blob: bytes) -> Iterator[tuple[str, bytes]]:
    """Members of a Unix ar archive (a .deb is one)."""
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError("not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)


def wordnet_licence(files: dict[str, bytes]) -> str:
    """The WordNet 3.0 licence stanza of the Debian copyright file (not the packaging's own licence)."""
    text = files["copyright"].decode()
    stanza = text.split("License: WordNet3.0", 1)[1].split("\nFiles:", 1)[0]
    lines = [line[1:] if line.startswith(" ") else line for line in stanza.strip("\n").splitlines()]
    body = "\n".join("" if line.strip() == "." else line for line in lines)
    return "WordNet Release 3.0\n\n" + body.strip() + "\n"


def _synsets(data: bytes) -> dict[str, dict]:
    """offset -> {"words": [...], "definition", "examples": [...]} from one data.POS file."""
    out = {}
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        fields = head.split()
        offset, w_cnt = fields[0], int(fields[3], 16)
        words = [fields[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
        words = [re.sub(r"\(.*\)$", "", w) for w in words]  # adjective markers like (a), (p)
        examples = re.findall(r'"([^"]+)"', gloss)
        definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
        out[offset] = {"words": words, "definition": definition, "examples": [e.strip() for e in examples]}
    return out


def _index(data: bytes) -> Iterator[tuple[str, int, list[str]]]:
    """(lemma, tagged sense count, synset offsets most frequent first) per index.POS line."""
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("  "):
            continue
        f = line.split()
        synset_cnt, p_cnt = int(f[2]), int(f[3])
        tagsense_cnt = int(f[5 + p_cnt])
        yield f[0].replace("_", " "), tagsense_cnt, f[-synset_cnt:]


WHAT_DOES = ("What does {w} mean?", "what does {w} mean", "What is the meaning of {w}?", "Define {w}.",
             "What does the word {w} mean?", "Can you tell me what {w} means?", "meaning of {w}?")
WHAT_IS_NOUN = ("What is a {w}?", "What's a {w}?", "what is {w}")
USE_IN_SENTENCE = ("Use {w} in a sentence.", "Can you use {w} in a sentence?", "Give me an example of {w} in a sentence.",
                   "use the word {w} in a sentence")
SYNONYM = ("Another word for {w}?", "What is another word for {w}?", "What's a synonym for {w}?",
           "Give me a synonym of {w}.", "another word for {w}")


COMMON_WORDS = 2500  # WordNet words asked about most in chat tuning: the most frequent ones in the chat data
COMMON_PHRASINGS = 3  # "What does X mean?" asked in this many ways for a common word


def word_frequencies(conversations: list[dict]) -> Counter:
    """How often each lower-case word occurs in the conversations' messages."""
    counts: Counter = Counter()
    for conv in conversations:
        for m in conv["messages"]:
            counts.update(re.findall(r"[a-z]+(?:'[a-z]+)?", m["content"].lower()))
    return counts


def common_words(files: dict[str, bytes], frequencies: Counter, n: int = COMMON_WORDS) -> dict[str, str]:
    """The n most frequent (in `frequencies`) words WordNet knows -> their main part of speech (most tagged senses)."""
    best: dict[str, tuple[int, str]] = {}
    for pos in WORDNET_POS:
        for lemma, tagged, _ in _index(files[f"index.{pos}"]):
            if frequencies[lemma] and tagged > best.get(lemma, (-1, ""))[0]:
                best[lemma] = (tagged, pos)
    ranked = sorted(best, key=lambda w: (-frequencies[w], w))[:n]
    return {w: best[w][1] for w in ranked}


def wordnet_conversations(files: dict[str, bytes], common: dict[str, str], seed: int = 0) -> Iterator[dict]:
    """Questions about words seen in WordNet's sense-tagged corpus, answered from WordNet (most frequent sense).

    Records about a common word in its main part of speech carry `"common": True`: they stay in training
    (never validation), the meaning question comes in COMMON_PHRASINGS phrasings, and chat tuning repeats them.
    """
    rng = random.Random(seed)
    for pos, pos_name in WORDNET_POS.items():
        synsets = _synsets(files[f"data.{pos}"])
        for lemma, tagged, offsets in _index(files[f"index.{pos}"]):
            if tagged < 1 or not re.fullmatch(r"[a-z][a-z' -]*[a-z]", lemma):
                continue
            senses = [synsets[o] for o in offsets[: max(1, min(tagged, 3))] if o in synsets]
            if not senses:
                continue
            gid = f"wordnet/{lemma}"
            is_common = common.get(lemma) == pos
            # What does it mean? One sense, the most frequent: a small model learns one answer per word.
            first = senses[0]
            answer = f"{_cap(lemma)} ({pos_name}) means {_sentence(first['definition'])}"
            example = next((e for e in first["examples"] if lemma.split()[0] in e.lower()), None)
            if example:
                answer += f' For example: "{_cap(example)}."'
            questions = list(WHAT_IS_NOUN + WHAT_DOES if pos == "noun" else WHAT_DOES)
            rng.shuffle(questions)
            for k, template in enumerate(questions[: COMMON_PHRASINGS if is_common else 1]):
                yield _qa(f"{gid}/mean/{pos}/{k}", template.format(w=lemma), answer, is_common)
            # Use it in a sentence, when WordNet has an example that contains the word.
            examples = [e for s in senses for e in s["examples"] if re.search(rf"\b{re.escape(lemma)}", e.lower())]
            if examples:
                yield _qa(f"{gid}/use/{pos}", rng.choice(USE_IN_SENTENCE).format(w=lemma), f"{_cap(examples[0])}.",
                          is_common)
            # Another word for it.
            synonyms = list(dict.fromkeys(w for s in senses for w in s["words"] if w.lower() != lemma and "(" not in w))
            if synonyms:
                picked = synonyms[:3]
                listed = picked[0] if len(picked) == 1 else ", ".join(picked[:-1]) + f" or {picked[-1]}"
                yield _qa(f"{gid}/syn/{pos}", rng.choice(SYNONYM).format(w=lemma),
                          f"Another word for {lemma} is {listed}.", is_common)


def _qa(conv_id: str, question: str, answer: str, common: bool) -> dict:
    record = {"id": conv_id, "source": conv_id.split("/", 1)[0],
              "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    return (record | {"common": True}) if common else record


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(definition: str) -> str:
    definition = definition.strip().rstrip(".;,")
    return definition + "."


# -- chatterbot-corpus -------------------------------------------------------------------------------------

# Files about ChatterBot itself (its name, its Python code): they would contradict the model's own persona.
CHATTERBOT_SKIP = {"botprofile.yml", "ai.yml"}


def chatterbot_conversations(wheel: Path) -> Iterator[dict]:
    import yaml  # only needed to rebuild the model (pyyaml comes with transformers)

    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml"))
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base in CHATTERBOT_SKIP:
                continue
            doc = yaml.safe_load(z.read(name))
            for i, conv in enumerate(doc.get("conversations") or []):
                turns = [_clean(str(t)) for t in conv if t is not None and _clean(str(t))]
                if len(turns) < 2 or any(re.search(r"chatterbot|\bgunther\b", t, re.I) for t in turns):
                    continue
                messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
                if messages[-1]["role"] == "user":
                    messages = messages[:-1]
                yield {"id": f"chatterbot/{base}/{i}", "source": "chatterbot", "messages": messages}


# -- assembling ----------------------------------------------------------------------------------------------


def _key(conv: dict) -> str:
    text = "\x00".join(re.sub(r"\W+", " ", m["content"].lower()).strip() for m in conv["messages"])
    return hashlib.sha1(text.encode()).hexdigest()


def _is_val(conv_id: str) -> bool:
    # All questions about one word (wordnet/<word>/...) on the same side.
    group = "/".join(conv_id.split("/")[:2]) if conv_id.startswith("wordnet/") else conv_id
    h = int(hashlib.sha1(group.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < VAL_FRACTION


def build_corpus(cache: Path, work: Path) -> dict:
    """Write work/train.jsonl, work/val.jsonl and work/LICENSE-WordNet; return counts per source."""
    work.mkdir(parents=True, exist_ok=True)
    paths = {name: archive_path(cache, src) for name, src in SOURCE_BY_NAME.items()}
    missing = [n for n, p in paths.items() if p is None]
    if missing:
        raise RuntimeError(f"not downloaded yet: {', '.join(missing)} (run the `data` stage with network access)")
    wordnet_files = read_wordnet(paths["wordnet"])
    (work / "LICENSE-WordNet").write_text(wordnet_licence(wordnet_files), encoding="utf-8")
    (work / "LICENSE-chitchat-dataset").write_text(chitchat_licence(paths["chitchat"]), encoding="utf-8")

    chitchat = list(chitchat_conversations(paths["chitchat"]))
    common = common_words(wordnet_files, word_frequencies(chitchat))
    streams = [chitchat, wordnet_conversations(wordnet_files, common), chatterbot_conversations(paths["chatterbot"])]
    seen: set[str] = set()
    stats: dict[str, dict[str, int]] = {}
    with open(work / "train.jsonl", "w", encoding="utf-8") as train, open(work / "val.jsonl", "w", encoding="utf-8") as val:
        for stream in streams:
            for conv in stream:
                s = stats.setdefault(conv["source"], {"train": 0, "val": 0, "duplicates": 0})
                key = _key(conv)
                if key in seen:
                    s["duplicates"] += 1
                    continue
                seen.add(key)
                split = "val" if _is_val(conv["id"]) and not conv.get("common") else "train"
                s[split] += 1
                if conv.get("common"):
                    s["common"] = s.get("common", 0) + 1
                (val if split == "val" else train).write(json.dumps(conv, ensure_ascii=False) + "\n")
        for conv in persona_conversations():
            s = stats.setdefault(conv["source"], {"train": 0, "val": 0, "duplicates": 0})
            s["train"] += 1
            train.write(json.dumps(conv, ensure_ascii=False) + "\n")
    (work / "corpus_stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
