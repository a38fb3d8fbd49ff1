"""End to end on the real SmolLM2-135M-Instruct Q4_1 GGUF (the file `chattui pull smollm2-135m-instruct` fetches).

The file is found by the `smollm2_gguf` fixture (tests/conftest.py): $CHATTUI_SMOLLM2_GGUF, else the pulled
file. Without it the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import Engine, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_path(smollm2_gguf) -> Path:
    return smollm2_gguf


@pytest.fixture(scope="module")
def engine(smollm2_path) -> Engine:
    return Engine.load(smollm2_path, device="cpu", dtype="float32")


def _greedy(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], str]:
    generation = engine.generate(prompt, SamplingParams(temperature=0.0), max_new_tokens=n)
    text = "".join(generation)
    assert generation.result is not None
    return generation.result.token_ids, text


def test_the_header_summary_describes_the_file(smollm2_path):
    from engine.gguf import summarize_gguf

    summary = summarize_gguf(smollm2_path)
    assert (summary.architecture, summary.weight_type, summary.context_length) == ("llama", "Q4_1", 8192)
    assert 130e6 < summary.parameters < 140e6


def test_greedy_chat_answers_paris(engine):
    prompt = engine.chat_prompt(QUESTION, max_new_tokens=32)
    assert prompt.text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    _, text = _greedy(engine, prompt.token_ids, 32)
    assert "Paris" in text


def test_float32_greedy_ids_equal_transformers_on_the_same_file(engine, smollm2_path):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    prompt = engine.chat_prompt(QUESTION, max_new_tokens=24)
    assert prompt.text == tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt.token_ids == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]

    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()  # transformers dequantizes the file to float32 too
    with torch.inference_mode():
        expected = model.generate(torch.tensor([prompt.token_ids]), max_new_tokens=24, do_sample=False,
                                  eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, len(prompt.token_ids):]
    ids, _ = _greedy(engine, prompt.token_ids, 24)
    # Ours stops at <|im_end|>; transformers was told not to, so compare what both produced.
    assert ids == expected.tolist()[: len(ids)]
    assert len(ids) >= 5
