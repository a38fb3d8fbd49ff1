"""The bundled default model (models/default/): it loads, chats, matches transformers, and its card is honest.

The model card's numbers must come from training_log.json (written by `python -m models.build_default`), so
the card is checked against a fresh rendering of that file.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine import Engine, SamplingParams
from engine.checkpoint import load_model, read_model_config
from engine.tokenizer import ChatTokenizer
from models import DEFAULT_MODEL_DIR
from models.build_default.card import _quote, render_card

CPU = torch.device("cpu")



@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(DEFAULT_MODEL_DIR, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def training_log() -> dict:
    return json.loads((DEFAULT_MODEL_DIR / "training_log.json").read_text(encoding="utf-8"))


def test_default_model_folder_is_complete_and_small():
    names = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    for required in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "README.md", "training_log.json", "LICENSE-WordNet"):
        assert required in names
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert total < 40 * 1024 * 1024


def test_config_names_llama_and_chatml_eos():
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    tokenizer = ChatTokenizer.from_dir(DEFAULT_MODEL_DIR)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["eos_token_id"] == tokenizer._tokenizer.token_to_id("<|im_end|>") == tokenizer.eos_token_id
    assert config["vocab_size"] == tokenizer.vocab_size
    generation = json.loads((DEFAULT_MODEL_DIR / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_engine_greedy_reply_is_nonempty_text(engine):
    prompt = engine.chat_prompt([{"role": "user", "content": "hi, how are you?"}], max_new_tokens=24)
    generation = engine.generate(prompt.token_ids, SamplingParams(temperature=0.0), prompt.max_new_tokens)
    text = "".join(generation)
    assert text.strip()
    assert generation.result.generated_tokens > 0
    assert "<|im_start|>" not in text


def test_engine_default_sampling_comes_from_generation_config(engine):
    generation = json.loads((DEFAULT_MODEL_DIR / "generation_config.json").read_text())
    params = engine.default_sampling()
    assert params.repetition_penalty == pytest.approx(generation["repetition_penalty"])
    assert params.top_p == pytest.approx(generation["top_p"])


def test_transformers_logits_equal_ours_in_float32():
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours = load_model(DEFAULT_MODEL_DIR, read_model_config(DEFAULT_MODEL_DIR), CPU, torch.float32)
    tokenizer = ChatTokenizer.from_dir(DEFAULT_MODEL_DIR)
    ids = tokenizer.encode_chat([{"role": "user", "content": "What does happy mean?"}])
    ids = torch.tensor([ids + tokenizer.encode("Happy means feeling good.", add_special_tokens=False)])
    with torch.inference_mode():
        expected = hf(ids).logits
        actual = ours(ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_tokenizer_has_chatml_template_and_matches_transformers():
    transformers = pytest.importorskip("transformers")
    config = json.loads((DEFAULT_MODEL_DIR / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"] and config["eos_token"] == "<|im_end|>"
    ours = ChatTokenizer.from_dir(DEFAULT_MODEL_DIR)
    hf = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"},
                {"role": "user", "content": "What's naïve? 🙂"}]
    assert ours.render_chat(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(messages).endswith("<|im_start|>assistant\n")
    for text in ("hi, how are you?", "  spaces\tand\nnewlines ", "naïve café 日本語 🙂", "<|im_end|> is special"):
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_model_card_numbers_come_from_the_training_log(training_log):
    card = (DEFAULT_MODEL_DIR / "README.md").read_text(encoding="utf-8")
    assert card == render_card(training_log)
    pre, sft = training_log["pretrain"], training_log["sft"]
    for value in (pre["final_val_loss"], sft["final_val_loss"], pre["final_train_loss"], sft["final_train_loss"]):
        assert f"{value:.3f}" in card
    assert f"{pre['parameters']['total']:,}" in card
    assert len(training_log["samples"]) >= 12
    for sample in training_log["samples"]:
        assert _quote(sample["messages"][-1]["content"]) in card


def test_model_card_parameter_count_is_the_real_one(engine, training_log):
    assert engine.num_parameters == training_log["pretrain"]["parameters"]["total"]
