"""Choose sampling defaults by trying them, generate sample conversations, and write the model card.

Every number in the card comes from models/default/training_log.json (written by the training stages and by
this module); `render_card(log)` is a pure function of that file, so a test can check the card against it.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 120  # for tuning and samples; the card's generation_config default

# Candidate sampling settings tried on held-out prompts: (temperature, top_k, top_p, repetition_penalty).
CANDIDATES = [
    (0.0, 0, 1.0, 1.0),
    (0.0, 0, 1.0, 1.2),
    (0.7, 50, 0.9, 1.0),
    (0.7, 50, 0.9, 1.1),
    (0.7, 50, 0.9, 1.2),
    (0.5, 50, 0.9, 1.15),
    (0.9, 50, 0.95, 1.15),
]
TUNE_SEEDS = (1, 2)

# The sample conversations shown in the card: each a list of user turns (the model answers each).
SAMPLE_CONVERSATIONS = [
    ["hi, how are you?"],
    ["Who are you?"],
    ["What does happy mean?"],
    ["What is another word for big?"],
    ["Use the word garden in a sentence."],
    ["What did you do this weekend?"],
    ["Do you like music?", "What kind of music do you listen to?"],
    ["I'm feeling a bit tired today.", "Any tips to relax?"],
    ["What is attention?"],
    ["What's your favorite food?"],
    ["Can you do math? What is 17 times 23?"],
]


def generation_config(choice: dict) -> dict:
    return {
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "do_sample": choice["temperature"] > 0,
        "temperature": choice["temperature"] if choice["temperature"] > 0 else 1.0,
        "top_k": choice["top_k"],
        "top_p": choice["top_p"],
        "repetition_penalty": choice["repetition_penalty"],
        "max_new_tokens": MAX_NEW_TOKENS,
    }


def repetition(ids: list[int], n: int = 3) -> float:
    """Fraction of the n-grams of ids that already occurred earlier in it (0: no repeats)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _held_out_prompts(work: Path, chats: int = 8, words: int = 4) -> list[str]:
    from models.build_default.data import read_jsonl

    val = read_jsonl(work / "val.jsonl")
    chat = [c["messages"][0]["content"] for c in val if c["source"] == "chitchat"][:chats]
    word = [c["messages"][0]["content"] for c in val if c["id"].startswith("wordnet/") and "/mean/" in c["id"]][:words]
    return chat + word


def _reply(engine, messages: list[dict], params, max_new_tokens: int = MAX_NEW_TOKENS):
    prompt = engine.chat_prompt(messages, max_new_tokens)
    generation = engine.generate(prompt.token_ids, params, prompt.max_new_tokens)
    text = "".join(generation)
    return text, generation.result


def tune_sampling(work: Path, out: Path, console) -> dict:
    """Export the tuned model to `out`, try CANDIDATES on held-out prompts, keep the best as the default."""
    from engine import Engine, SamplingParams
    from models.build_default.stages import export, update_log

    export(work, out, generation_config({"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.0}))
    engine = Engine.load(out, device="cpu", dtype="float32")
    prompts = _held_out_prompts(work)
    rows = []
    for temperature, top_k, top_p, penalty in CANDIDATES:
        reps, eos, lengths, examples = [], 0, [], []
        for seed in TUNE_SEEDS if temperature > 0 else (0,):
            for prompt in prompts:
                params = SamplingParams(temperature, top_k, top_p, 0.0, penalty, seed=seed)
                text, result = _reply(engine, [{"role": "user", "content": prompt}], params)
                reps.append(repetition(result.token_ids))
                eos += result.finish_reason == "eos"
                lengths.append(result.generated_tokens)
                if seed in (0, TUNE_SEEDS[0]) and len(examples) < 2:
                    examples.append({"prompt": prompt, "reply": text})
        n = len(reps)
        row = {
            "temperature": temperature, "top_k": top_k, "top_p": top_p, "repetition_penalty": penalty,
            "repeated_3gram_fraction": sum(reps) / n, "ended_with_eos": eos / n, "mean_tokens": sum(lengths) / n,
            "replies": n, "examples": examples,
        }
        # Lower is better: repeated text, and replies that run on to the token limit instead of ending.
        row["score"] = row["repeated_3gram_fraction"] + 0.5 * (1 - row["ended_with_eos"])
        rows.append(row)
        console.log(f"T={temperature} top_p={top_p} rep={penalty}: repeats {row['repeated_3gram_fraction']:.3f}, "
                    f"eos {row['ended_with_eos']:.2f}, {row['mean_tokens']:.0f} tokens")
    sampled = [r for r in rows if r["temperature"] > 0]  # a chat model should vary its replies
    best = min(sampled, key=lambda r: r["score"])
    choice = {k: best[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")}
    record = {"prompts": prompts, "seeds": list(TUNE_SEEDS), "max_new_tokens": MAX_NEW_TOKENS, "trials": rows,
              "chosen": choice, "rule": "lowest repeated-3-gram fraction + 0.5 x share of replies cut at the limit, "
              "among sampled (temperature > 0) settings"}
    update_log(work, "sampling", record)
    (out / "generation_config.json").write_text(json.dumps(generation_config(choice), indent=2) + "\n")
    console.log(f"chosen: {choice}")
    return record


def make_samples(engine, held_out: dict) -> list[dict]:
    """A dozen conversations with the model's own defaults, each with its seed; the last one on a word whose WordNet
    entry (held_out, a validation record) was held out of training, with WordNet's answer as the reference."""
    from engine import SamplingParams

    d = engine.defaults
    settings = {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p,
                "repetition_penalty": d.repetition_penalty, "max_new_tokens": MAX_NEW_TOKENS}
    conversations = [(100 + i, turns) for i, turns in enumerate(SAMPLE_CONVERSATIONS)]
    conversations.append((200, [held_out["messages"][0]["content"]]))
    samples = []
    for seed, turns in conversations:
        messages: list[dict] = []
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            params = SamplingParams(d.temperature, d.top_k, d.top_p, d.min_p, d.repetition_penalty, seed=seed)
            text, _ = _reply(engine, messages, params)
            messages.append({"role": "assistant", "content": text})
        samples.append({"messages": messages, "seed": seed, "settings": settings})
    samples[-1]["reference"] = held_out["messages"][1]["content"]
    return samples


EVAL_WORDS = 100  # trained-on common words asked about in the definition test (and half as many held-out ones)


def _words(text: str) -> Counter:
    return Counter(re.findall(r"[a-z0-9']+", text.lower()))


def overlap_f1(reply: str, reference: str) -> float:
    """Word-overlap F1 of reply against reference (1: the same words, 0: none shared)."""
    a, b = _words(reply), _words(reference)
    shared = sum((a & b).values())
    if not shared:
        return 0.0
    precision, recall = shared / sum(a.values()), shared / sum(b.values())
    return 2 * precision * recall / (precision + recall)


def definition_of(answer: str) -> str:
    """The definition in a "Word (pos) means DEFINITION. For example: ..." answer (the whole text if not so shaped)."""
    body = answer.split(" means ", 1)[-1]
    return re.split(r"\. (?:For example:|It can also mean)", body, maxsplit=1)[0].strip().rstrip(".")


def definition_test(engine, train: list[dict], val: list[dict]) -> dict:
    """Greedy answers to "What does X mean?" against WordNet's, for common words it trained on and held-out ones."""
    from engine import SamplingParams

    trained = [c for c in train if c.get("common") and re.search(r"/mean/\w+/0$", c["id"])]
    trained = random.Random(0).sample(trained, min(EVAL_WORDS, len(trained)))
    held_out = [c for c in val if "/mean/" in c["id"]][: EVAL_WORDS // 2]
    greedy = SamplingParams(temperature=0.0)
    result = {}
    for name, records in (("trained", trained), ("held_out", held_out)):
        rows = []
        for c in records:
            question, reference = c["messages"][0]["content"], c["messages"][1]["content"]
            reply, _ = _reply(engine, [{"role": "user", "content": question}], greedy, max_new_tokens=80)
            headword = reference.split(" (", 1)[0].lower()
            rows.append({"question": question, "reply": reply.strip(), "reference": reference,
                         "right_word": reply.strip().lower().startswith(headword + " ("),
                         "exact": definition_of(reply) == definition_of(reference),
                         "f1": overlap_f1(definition_of(reply), definition_of(reference))})
        result[name] = {
            "words": len(rows),
            "right_word": sum(r["right_word"] for r in rows),
            "exact": sum(r["exact"] for r in rows),
            "half_right": sum(r["f1"] >= 0.5 for r in rows),
            "mean_f1": sum(r["f1"] for r in rows) / max(len(rows), 1),
            "examples": rows[:3],
        }
    return result


def write_card(work: Path, out: Path, console) -> None:
    """Samples, then models/default/README.md and training_log.json from work/training_log.json."""
    from engine import Engine
    from models.build_default.data import COMMON_PHRASINGS, read_jsonl
    from models.build_default.sources import SOURCES
    from models.build_default.stages import COMMON_REPEATS, GRAD_ACCUM, MICRO_BATCH, SEQ_LEN, update_log

    engine = Engine.load(out, device="cpu", dtype="float32")
    train, val = read_jsonl(work / "train.jsonl"), read_jsonl(work / "val.jsonl")
    held_out = next(c for c in val if "/mean/" in c["id"] and c["id"].startswith("wordnet/"))
    update_log(work, "samples", make_samples(engine, held_out))
    update_log(work, "definitions", definition_test(engine, train, val))
    corpus = json.loads((work / "corpus_stats.json").read_text())
    common = {c["id"].split("/")[1] for c in train if c.get("common")}
    corpus["wordnet"].update(common_words=len(common), common_phrasings=COMMON_PHRASINGS, sft_repeats=COMMON_REPEATS)
    update_log(work, "corpus", corpus)
    update_log(work, "sources", [s.__dict__ for s in SOURCES])
    config = json.loads((out / "config.json").read_text())
    update_log(work, "model", {
        "config": config, "batch_tokens": MICRO_BATCH * SEQ_LEN * GRAD_ACCUM, "size_candidates": size_candidates(config),
    })
    shutil.copyfile(work / "training_log.json", out / "training_log.json")
    training_log = json.loads((out / "training_log.json").read_text())
    (out / "README.md").write_text(render_card(training_log), encoding="utf-8")
    console.log(f"model card written to {out / 'README.md'}")


def size_candidates(chosen: dict) -> list[dict]:
    """Parameters and training compute per token of a few model shapes, relative to the chosen one."""
    shapes = [(128, 4, 384), (192, 6, 512), (256, 6, 768), (320, 8, 864), (384, 8, 1024)]
    rows = []
    for d, layers, ff in shapes:
        v, t = chosen["vocab_size"], chosen["max_position_embeddings"]
        blocks = layers * (4 * d * d + 3 * d * ff + 2 * d)
        # Multiply-adds per token: blocks, output head, attention scores and mixing (average context t/2).
        macs = blocks + v * d + layers * 2 * d * t / 2
        rows.append({"hidden_size": d, "num_hidden_layers": layers, "intermediate_size": ff,
                     "parameters": blocks + v * d + d, "macs": macs,
                     "chosen": (d, layers, ff) == (chosen["hidden_size"], chosen["num_hidden_layers"],
                                                   chosen["intermediate_size"])})
    base = next(r["macs"] for r in rows if r["chosen"])
    for r in rows:
        r["relative_cost"] = r["macs"] / base
    return rows


# -- the card ------------------------------------------------------------------------------------------------


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _int(x: float) -> str:
    return f"{int(round(x)):,}"


def _common_words_note(wordnet: dict) -> str:
    if "common_words" not in wordnet:
        return ""
    return (f"The {_int(wordnet['common_words'])} words of WordNet used most in the chat data are always in "
            f"training, their meaning asked in {wordnet['common_phrasings']} phrasings ({_int(wordnet['common'])} "
            f"records); chat tuning repeats those {wordnet['sft_repeats']} times and leaves the rarer words to "
            "pre-training. ")


def render_card(L: dict) -> str:
    """The model card text; every number is read from the training log L."""
    pre, sft, sampling = L["pretrain"], L["sft"], L["sampling"]
    params = pre["parameters"]
    cfg = L["model"]["config"]
    corpus = L["corpus"]
    chosen = sampling["chosen"]
    pre_speed = pre["input_tokens_seen"] / pre["wall_time_s"]
    total_min = (pre["wall_time_s"] + sft["wall_time_s"]) / 60
    tokens_per_param = pre["input_tokens_seen"] / params["total"]
    lines = [
        "# chattui default model",
        "",
        "chattui's default model: a small Llama-architecture chat model trained from scratch on a laptop-class "
        "CPU by the chattui project's own code (`engine/train.py`), first pre-trained on all the text, then "
        "chat-tuned with the loss on assistant replies only. It opens offline and answers instantly on any "
        "computer; it is a toy for exploring chattui (attention views, sampling, fine-tuning), not a useful "
        "assistant.",
        "",
        "```",
        'chattui generate "hi, how are you?"',
        "chattui            # the app, with this model",
        "```",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| Architecture | `LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU), loads in transformers unchanged |",
        f"| Parameters | {_int(params['total'])} ({_int(params['embedding'])} in the tied embedding, "
        f"{_int(params['non_embedding'])} in the {cfg['num_hidden_layers']} blocks) |",
        f"| Shape | {cfg['num_hidden_layers']} layers, width {cfg['hidden_size']}, {cfg['num_attention_heads']} heads "
        f"of {cfg['head_dim']}, MLP {cfg['intermediate_size']}, tied input/output embeddings |",
        f"| Context | {cfg['max_position_embeddings']} tokens |",
        f"| Tokenizer | byte-level BPE, {_int(cfg['vocab_size'])} tokens, trained on the corpus; ChatML "
        "(`<|im_start|>`, `<|im_end|>` = EOS, `<|endoftext|>` between documents) |",
        f"| Weights | float32 safetensors |",
        "",
        "## Why this size",
        "",
        f"Training throughput was measured first on this machine's 2 CPU cores: bfloat16 autocast was about "
        "2x faster than float32 on this AVX512-BF16 CPU, so both stages use it. The cores were shared with "
        f"other work while the model trained; the sustained speed was {_int(pre_speed)} tokens/s, so the "
        f"{pre['wall_time_s'] / 60:.0f}-minute pre-training budget bought {pre['input_tokens_seen'] / 1e6:.1f}M "
        f"tokens ({pre['epochs']:.2f} epochs of the {pre['train_tokens_per_epoch'] / 1e6:.1f}M-token corpus). "
        "Chinchilla's rule of about 20 tokens per parameter would ask for a model of "
        f"{pre['input_tokens_seen'] / 20 / 1e3:.0f}k parameters at this compute, less than the 8k-token "
        "embedding table of any usable width; so the choice is the smallest model that still has room for "
        "its vocabulary and a few blocks for the chat format, since every extra parameter costs tokens seen. "
        "The table gives each candidate's training compute per token (blocks, output layer and attention over "
        "the 512-token context) and the tokens it would have seen in the same time: width 256 would have seen "
        "40% fewer, the 12-17M-parameter models a third to a quarter as many, far below one epoch. Width 192 "
        f"with six blocks keeps {params['non_embedding'] / params['total']:.0%} of the parameters in the "
        f"blocks and reached {tokens_per_param:.2f} tokens per parameter.",
        "",
        "| Candidate | Parameters | Compute per token (relative) | Tokens in the same time |",
        "|---|---|---|---|",
        *[
            f"| width {c['hidden_size']}, {c['num_hidden_layers']} layers{' (chosen)' if c['chosen'] else ''} | "
            f"{c['parameters'] / 1e6:.1f}M | {c['relative_cost']:.2f} | "
            f"{pre['input_tokens_seen'] / c['relative_cost'] / 1e6:.1f}M |"
            for c in L["model"]["size_candidates"]
        ],
        "",
        "The learning-rate schedule is warmup-stable-decay: the peak rate is held for three quarters of the "
        "time budget and the decay length is then set from the speed measured at that point, so the run ends "
        "on time however busy the CPU is. "
        + " ".join(
            f"{stage.capitalize()}: {r['plan']['stable_steps']} steps at the peak rate, {r['plan']['decay_steps']} "
            f"decaying{'; ' + r['plan']['note'] if r['plan'].get('note') else ''}."
            for stage, r in (("pre-training", pre), ("chat tuning", sft)) if "stable_steps" in r["plan"]
        ),
        "",
        "## Data",
        "",
        "| Source | Licence | Used for | Conversations (train / validation) |",
        "|---|---|---|---|",
    ]
    for s in L["sources"]:
        c = corpus.get(s["name"], {"train": 0, "val": 0})
        lines.append(f"| [{s['title']}]({s['url']}) (`{s['package']}` {s['version']}, {s['fetch']}) | {s['licence']} "
                     f"| {s['use']} | {_int(c['train'])} / {_int(c['val'])} |")
    persona = corpus.get("persona", {"train": 0})
    lines += [
        f"| Persona Q&A written for this project (`models/build_default/persona.py`) | MIT (this project) | who the "
        f"model is, what it can do | {_int(persona['train'])} / 0 |",
        "",
        "The build downloads the archives with `pip download --no-deps` and `apt-get download` (never at run "
        "time), deduplicates conversations (normalised text), and splits train / validation by conversation "
        "(all questions about one word stay on one side). WordNet entries of words seen in WordNet's "
        "sense-tagged corpus become \"What does X mean?\", \"Use X in a sentence\" and \"Another word for X?\" "
        "questions answered from the definitions (most frequent sense), examples and synonyms. "
        + _common_words_note(corpus.get("wordnet", {})) +
        "ChatterBot's `ai.yml` and "
        "`botprofile.yml` were left out (they describe ChatterBot itself). Licence notices: "
        "`LICENSE-WordNet` (WordNet 3.0 licence, kept as it requires) and `LICENSE-chitchat-dataset` (MIT); "
        "the ChatterBot corpus is BSD-licensed per its package metadata. No GPL text is included.",
        "",
        "## Training",
        "",
        f"Hardware: {pre['hardware']}. Total training time: {total_min:.0f} minutes.",
        "",
        "| | Pre-training | Chat tuning |",
        "|---|---|---|",
        f"| Objective | next token, every position | next token, assistant tokens only |",
        f"| Steps (batch {L['model']['batch_tokens']:,} tokens) | {_int(pre['steps'])} | {_int(sft['steps'])} |",
        f"| Tokens seen (input) | {_int(pre['input_tokens_seen'])} | {_int(sft['input_tokens_seen'])} |",
        f"| Trained-on (target) tokens | {_int(pre['tokens_seen'])} | {_int(sft['tokens_seen'])} |",
        f"| Epochs of its data | {pre['epochs']:.2f} | {sft['epochs']:.2f} |",
        f"| Peak learning rate | {pre['config']['lr']:g} | {sft['config']['lr']:g} |",
        f"| Wall time | {pre['wall_time_s'] / 60:.1f} min | {sft['wall_time_s'] / 60:.1f} min |",
        f"| Final train loss | {_f(pre['final_train_loss'])} | {_f(sft['final_train_loss'])} |",
        f"| Validation loss | {_f(pre['final_val_loss'])} | {_f(sft['final_val_loss'])} (before tuning: "
        f"{_f(sft['val_loss_before_sft'])}) |",
        f"| Validation perplexity | {_f(pre['val_perplexity'], 1)} | {_f(sft['val_perplexity'], 1)} |",
        f"| Unigram baseline perplexity | {_f(pre['unigram_val_perplexity'], 1)} | "
        f"{_f(sft['unigram_val_perplexity'], 1)} |",
        "",
        "Both stages: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), gradient clipping at 1.0, bfloat16 "
        "autocast, float32 weights. Losses are nats per token. Validation is held-out conversations "
        f"({_int(pre['val_tokens'])} tokens for pre-training, {_int(sft['val_assistant_tokens'])} assistant "
        "tokens for chat tuning); the unigram baseline is the add-one-smoothed token frequency of the training "
        "text, scored on the same targets." + _tuning_tradeoff(sft),
        "",
        f"Validation loss during pre-training, on the first {pre['config']['eval_batches']} validation batches "
        "(Chit-Chat conversations, harder than the WordNet answers, so above the full-set figure): "
        + ", ".join(f"step {p['step']}: {_f(p['val_loss'])}" for p in pre["val_curve"]) + ".",
        "",
        "## Sampling defaults",
        "",
        f"Chosen by trying {len(sampling['trials'])} settings on {len(sampling['prompts'])} held-out prompts "
        f"(seeds {', '.join(map(str, sampling['seeds']))}, up to {sampling['max_new_tokens']} new tokens); "
        f"rule: {sampling['rule']}.",
        "",
        "| temperature | top-k | top-p | repetition penalty | repeated 3-grams | ended by EOS | mean tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in sampling["trials"]:
        lines.append(f"| {t['temperature']:g} | {t['top_k']} | {t['top_p']:g} | {t['repetition_penalty']:g} | "
                     f"{_f(t['repeated_3gram_fraction'])} | {t['ended_with_eos']:.2f} | {t['mean_tokens']:.0f} |")
    lines += [
        "",
        f"`generation_config.json`: temperature {chosen['temperature']:g}, top-k {chosen['top_k']}, top-p "
        f"{chosen['top_p']:g}, repetition penalty {chosen['repetition_penalty']:g}, at most {MAX_NEW_TOKENS} new "
        "tokens.",
        "",
        "## Sample conversations",
        "",
        "Generated by `engine.Engine` with the defaults above on CPU in float32, unedited. Reproduce one with "
        '`chattui generate --seed SEED "PROMPT"` (single-turn ones).',
        "",
    ]
    for i, sample in enumerate(L["samples"], 1):
        s = sample["settings"]
        lines.append(f"**{i}.** seed {sample['seed']}, temperature {s['temperature']:g}, top-k {s['top_k']}, "
                     f"top-p {s['top_p']:g}, repetition penalty {s['repetition_penalty']:g}")
        lines.append("")
        for m in sample["messages"]:
            who = "User" if m["role"] == "user" else "Model"
            lines.append(f"> **{who}:** {_quote(m['content'])}")
            lines.append(">")
        lines.pop()
        if "reference" in sample:
            lines += ["", f"(A word held out of training; WordNet's answer: {_quote(sample['reference'])})"]
        lines.append("")
    lines += _definition_lines(L["definitions"]) if "definitions" in L else []
    lines += [
        "## What it can and cannot do",
        "",
        "It can: greet and make short small talk in the casual style of the Chit-Chat data, answer a question "
        "with a related sentence and ask one back, and stay on the general topic for a turn or two. "
        + _can_define(L.get("definitions")) + "It knows the shape of the dictionary answers (word, part of "
        "speech, definition, example) and of its persona answers.",
        "",
        "It cannot, honestly:",
        "",
        "- Define words it was not drilled on: for the rarer WordNet words (seen only in pre-training) and "
        "held-out ones it invents a definition, often for a different or misspelled word. Even for common "
        "words some answers are wrong or half-invented, synonyms are often wrong, and the example sentences it "
        "writes itself ramble (see the samples).",
        "- Hold a conversation together: replies are often generic, contradictory or off topic, and it loses "
        "the thread after a few turns.",
        "- Know facts, do arithmetic, write code or follow instructions; it knows no news and only simple "
        "English.",
        "- Describe itself reliably: the Chit-Chat data was written by people, so it may claim to be a person, "
        "have a job, family or hobbies, and it may reproduce opinions or language from that data.",
        f"- The context window is {cfg['max_position_embeddings']} tokens; chattui drops the oldest turns beyond it.",
        "",
        "## Rebuild",
        "",
        "```",
        "python -m models.build_default all     # data, tokenizer, pretrain, sft, tune, card",
        "```",
        "",
        "Stages can be run one at a time (`data`, `tokenizer`, `pretrain`, `sft`, `tune`, `card`); downloads go "
        "to `--cache` (default: the platform's user cache folder); `--pretrain-minutes` / `--sft-minutes` set "
        "the time budgets (defaults 55 and 15; this model: "
        f"{pre['plan'].get('minutes', 0):g} and {sft['plan'].get('minutes', 0):g}). The numbers on this page "
        "are read from `training_log.json`, which the build writes.",
        "",
    ]
    return "\n".join(lines)


def _tuning_tradeoff(sft: dict) -> str:
    before, after = sft["val_loss_before_sft"], sft["final_val_loss"]
    if after <= before:
        return ""
    return (f" Chat tuning raised the validation loss on held-out conversations ({_f(before)} -> {_f(after)}): its "
            "data is weighted towards the repeated dictionary answers, trading some fit to small talk for "
            "definitions (see \"Definitions, measured\").")


def _can_define(d: dict | None) -> str:
    if not d:
        return ""
    t = d["trained"]
    return (f"It defines many common words with WordNet's own definition ({t['exact']} of {t['words']} sampled, "
            "greedy; see above). ")


def _definition_lines(d: dict) -> list[str]:
    lines = [
        "## Definitions, measured",
        "",
        "Greedy answers (temperature 0) to \"What does X mean?\"-style questions, compared with WordNet's: does "
        "the reply name the word asked about, is its definition WordNet's word for word, and how many words the "
        "two definitions share (word-overlap F1: 1 = the same words, 0 = none).",
        "",
        "| words asked about | names the word | exact definition | definition F1 >= 0.5 | mean definition F1 |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("trained", "common words it was trained on (random sample)"), ("held_out", "held-out words")):
        r = d[name]
        lines.append(f"| {r['words']} {label} | {r['right_word']} | {r['exact']} | {r['half_right']} | "
                     f"{_f(r['mean_f1'], 2)} |")
    lines += ["", "First three of each:", ""]
    for name in ("trained", "held_out"):
        for r in d[name]["examples"]:
            lines.append(f"- {_quote(r['question'])} → {_quote(r['reply'])} (WordNet: {_quote(r['reference'])})")
    return lines + [""]


def _quote(text: str) -> str:
    """Message text safe inside a Markdown blockquote line."""
    return re.sub(r"\s*\n\s*", " / ", text.strip()) or "(empty reply)"
