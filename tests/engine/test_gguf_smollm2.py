"""End to end on the real SmolLM2-135M-Instruct Q4_1 GGUF (the file `chattui pull smollm2-135m-instruct` fetches).

The file is found by the `smollm2_gguf` fixture (tests/conftest.py): $CHATTUI_SMOLLM2_GGUF, else the pulled
file. Without it the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import math
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


# -- GGUF blocks kept (`--dtype auto` on CPU) against the dequantized float32 path of the same file ----------

# ~900 tokens of plain prose, written for this test (so no model has seen it): perplexity is measured on it.
# Shorter texts are too noisy for a 1% bound: float32 summation order alone moved 328 tokens' by ~1%.
HELD_OUT_TEXT = (
    "The village stood at the edge of a wide valley, where the river slowed and spread into a chain of shallow "
    "pools. Every spring the water rose over the lower fields, and every summer it fell back, leaving behind a "
    "layer of dark soil that made the farms there the richest in the region. The people who lived in the village "
    "had learned to plant late, after the floods had passed, and to harvest early, before the autumn rains began. "
    "Most families kept a small orchard beside the house, with apple and pear trees that were older than anyone "
    "could remember. In the evenings, when the work was done, the older men gathered on the bench outside the "
    "bakery and talked about the weather, the price of grain and the news from the town across the hills. The "
    "children ran along the river bank, looking for frogs and flat stones to skip across the water. Once a year, "
    "at the end of the harvest, the whole village came together for a long dinner in the square. Tables were "
    "carried out of every house and set end to end, and each family brought a dish to share. There was bread "
    "still warm from the oven, cheese from the farm on the hill, roasted vegetables, and pies filled with the "
    "last fruit of the season. When the sun went down, someone would bring out a violin, and the dancing would "
    "go on until the candles burned low. The visitors who passed through the valley often said that it seemed "
    "a place outside of time, untouched by the hurry of the cities. The villagers smiled at this, because they "
    "knew how hard the work was, and how much the river could take away in a bad year. "
    "In the year the old mill burned, the river had risen higher than anyone had seen it. The water came up "
    "through the floorboards of the houses nearest the bank, and for three days the families carried their "
    "furniture up to the church on the hill, where the ground was dry. When the flood went down, the mill was a "
    "black shell, its wheel broken in two, and the miller sat in front of it for a whole afternoon without "
    "saying a word. It was his daughter who decided that it would be rebuilt. She walked from house to house "
    "with a notebook, asking each family what they could give: a day of work, a cart of stones, a few planks "
    "from a barn that was no longer used. By the end of the month the notebook was full, and the work began. "
    "The men cut new beams in the forest above the village and dragged them down with horses, while the women "
    "cooked for everyone in the bakery, which had the biggest oven. The children carried water and nails, and "
    "they argued about who had carried the most. A carpenter came from the town across the hills to build the "
    "new wheel, because no one in the village knew how to shape the paddles so that they would turn smoothly. "
    "He stayed for the whole summer, sleeping in a room above the bakery, and in the evenings he taught the "
    "older boys how to read a drawing and measure twice before cutting once. When the wheel was finally set in "
    "its place and the water was let into the channel, the whole village stood on the bank to watch. For a "
    "moment nothing happened, and a few people began to laugh nervously. Then the wheel creaked, shook, and "
    "began to turn, slowly at first and then with a steady rhythm that everyone would remember for years. "
    "The miller did not say much that day either, but he shook the hand of every person who had helped, and "
    "that autumn the first bags of flour from the new mill were given away for free. The notebook his daughter "
    "had carried is still kept in a drawer at the bakery. Its pages are yellow now and the ink has faded, but "
    "the names are all there, one after another, with what each family gave written beside them. Some of the "
    "entries are only a few words long, a day of work or a basket of eggs, and some take up half a page. "
    "Visitors are sometimes shown the notebook, and they often ask why the village went to so much trouble "
    "for an old mill. The answer is usually a shrug, or a story about the flood, or about the carpenter who "
    "could not stop whistling while he worked. But anyone who has lived there for a while understands that "
    "the mill was never really the point. The point was the month when everyone had a place in the notebook."
)
QUESTIONS = [  # 24: with fewer, "most" turns on one or two near-ties
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "Write a haiku about the sea.", "What is 12 times 12?", "Give me a synonym for happy.",
    "Why is the sky blue?", "Translate 'good morning' into Spanish.",
    "What is the boiling point of water?", "Who wrote Romeo and Juliet?", "Name a fruit that is yellow.",
    "What do bees make?", "How many days are in a week?", "What is the opposite of cold?",
    "Name a large animal that lives in the ocean.", "What color are most leaves in summer?",
    "What is the largest planet in our solar system?", "How do you make a cup of tea?",
    "What is a noun?", "Tell me a fun fact about cats.", "What is the square root of 81?",
    "What language is spoken in Brazil?", "Describe a rainy day in one sentence.", "What is photosynthesis?",
]


@pytest.fixture(scope="module")
def quantized_engine(smollm2_path) -> Engine:
    return Engine.load(smollm2_path, device="cpu", dtype="auto")


def _perplexity(engine: Engine, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:], fed one token at a time (the decode path)."""
    from engine.generate import decode_one_token
    from engine.kv_cache import KVCache

    tokens = torch.tensor(ids)
    cache = KVCache.for_model(engine.config, len(ids), engine.dtype, engine.device)
    with torch.inference_mode():
        logits = torch.stack([decode_one_token(engine.model, tokens[i : i + 1], i, cache).float()
                              for i in range(len(ids) - 1)])  # (T - 1, V)
    nll = torch.nn.functional.cross_entropy(logits, tokens[1:])
    return math.exp(nll.item())


def test_quantized_layers_hold_about_the_files_bytes(quantized_engine, smollm2_path):
    from engine.quant import QuantizedEmbedding, QuantizedLinear

    model = quantized_engine.model
    assert type(model.model.embed_tokens) is QuantizedEmbedding and type(model.lm_head) is QuantizedLinear
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    assert sum(storages.values()) <= smollm2_path.stat().st_size  # no dense copy beside the blocks


def test_quantized_greedy_tokens_equal_the_dequantized_float32_path_on_most_prompts(engine, quantized_engine):
    same = 0
    for question in QUESTIONS:
        prompt = engine.chat_prompt([{"role": "user", "content": question}], max_new_tokens=16).token_ids
        same += _greedy(quantized_engine, prompt, 16)[0] == _greedy(engine, prompt, 16)[0]
    print(f"\nSmolLM2 Q4_1: {same} of {len(QUESTIONS)} prompts give the same 16 greedy tokens on the blocks "
          f"({quantized_engine.dtype_name} activations) as dequantized float32")
    assert same > len(QUESTIONS) // 2  # most: 16 tokens are long enough for one near-tie to part the two


def test_quantized_perplexity_is_within_one_percent_of_the_dequantized_float32_path(engine, quantized_engine):
    ids = engine.tokenizer.encode(HELD_OUT_TEXT)
    assert 850 <= len(ids) <= 1200
    dense, quantized = _perplexity(engine, ids), _perplexity(quantized_engine, ids)
    print(f"\nSmolLM2 Q4_1 perplexity on {len(ids)} held-out tokens: dequantized float32 {dense:.4f}, "
          f"blocks with {quantized_engine.dtype_name} activations {quantized:.4f} ({quantized / dense - 1:+.2%})")
    assert abs(quantized / dense - 1) <= 0.01


def test_quantized_prefill_perplexity_is_within_one_percent_of_the_dequantized_float32_path(engine, quantized_engine):
    """The prefill path: one forward over the whole text (bfloat16 tiles where the CPU multiplies bfloat16
    natively, engine.quant.prefill_dtype; float32 tiles elsewhere)."""
    from engine.quant import prefill_dtype

    ids = engine.tokenizer.encode(HELD_OUT_TEXT)
    tokens = torch.tensor(ids)

    def perplexity(model) -> float:
        with torch.inference_mode():
            logits = model(tokens[None])[0, :-1].float()  # (T - 1, V)
        return math.exp(torch.nn.functional.cross_entropy(logits, tokens[1:]).item())

    with torch.inference_mode():
        tiles = str(prefill_dtype(torch.float32)).removeprefix("torch.")
    dense, quantized = perplexity(engine.model), perplexity(quantized_engine.model)
    print(f"\nSmolLM2 Q4_1 prefill perplexity on {len(ids)} held-out tokens: dequantized float32 {dense:.4f}, "
          f"blocks in {tiles} tiles {quantized:.4f} ({quantized / dense - 1:+.2%})")
    assert abs(quantized / dense - 1) <= 0.01


def test_exported_again_as_q4_1_every_tensor_has_llama_cpps_bytes(smollm2_path, tmp_path):
    """Dequantized, Q/K rows un-permuted, then written by chattui's exporter (rows permuted back, our quantizer),
    every tensor is byte for byte what llama.cpp wrote, the tied embedding kept in Q8_0 as it kept it; the
    hyperparameters and the tokenizer metadata are the file's."""
    import gguf
    import numpy as np

    from engine.gguf.writer import export_model

    original = gguf.GGUFReader(smollm2_path)
    exported = gguf.GGUFReader(export_model(smollm2_path, tmp_path / "again.gguf", "Q4_1").path)
    theirs, ours = {t.name: t for t in original.tensors}, {t.name: t for t in exported.tensors}
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.asarray(ours[name].data).tobytes() == np.asarray(t.data).tobytes(), name
    for key, field in original.fields.items():
        if key.startswith(("llama.", "tokenizer.")):
            assert exported.fields[key].contents() == field.contents(), key
