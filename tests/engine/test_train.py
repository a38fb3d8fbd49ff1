"""The training loop (engine.train) and its batching helpers (engine.train_data), on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.tokenizer import ChatTokenizer
from engine.train import (
    IGNORE_INDEX,
    Batch,
    TrainConfig,
    latest_checkpoint,
    list_checkpoints,
    lr_at,
    train,
)
from engine.train_data import RowBatches, assistant_spans, chat_example, pack_documents, pack_examples
from models.registry import config_from_hf
from models.llama import LlamaForCausalLM

VOCAB = 32



def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = config_from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    })
    return LlamaForCausalLM(config)


def random_rows(n: int = 12, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def losses(result) -> list[float]:
    return [r.loss for r in result.history]


def test_loop_memorizes_a_tiny_set():
    model = tiny_model()
    rows = random_rows(4)
    config = TrainConfig(lr=1e-2, warmup_steps=5, total_steps=120, weight_decay=0.0, log_interval=20)
    result = train(model, RowBatches(rows, batch_size=4), config)
    curve = losses(result)
    assert curve[0] > 2.5 and curve[-1] < 0.5 * curve[0]
    assert result.step == 120 and result.tokens_seen == 120 * 4 * 15


def test_lr_schedule_warmup_then_cosine_to_min():
    c = TrainConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_at(110, c) == pytest.approx(0.1)
    assert lr_at(500, c) == pytest.approx(0.1)


def test_lr_schedule_wsd_is_flat_then_decays():
    c = TrainConfig(lr=1.0, warmup_steps=10, total_steps=100, schedule="wsd", decay_steps=20, min_lr_ratio=0.0)
    assert lr_at(50, c) == 1.0 and lr_at(80, c) == 1.0
    assert lr_at(90, c) == pytest.approx(0.5)
    assert lr_at(100, c) == pytest.approx(0.0)
    assert lr_at(10**6, TrainConfig(lr=1.0, warmup_steps=1, schedule="wsd", decay_steps=0)) == 1.0


def test_scheduler_in_the_loop_follows_lr_at():
    config = TrainConfig(lr=1e-2, warmup_steps=3, total_steps=8, log_interval=1)
    result = train(tiny_model(), RowBatches(random_rows(8), batch_size=2), config)
    # Record for step s is written after s optimizer steps: the rate for the next one.
    assert [r.lr for r in result.history] == pytest.approx([lr_at(s, config) for s in range(1, 9)])


def test_grad_accumulation_equals_one_large_batch():
    rows = random_rows(4)
    labels = rows.clone()
    labels[0, :10] = IGNORE_INDEX  # unequal target counts per micro-batch: normalised per step, not per batch
    # A large eps makes AdamW's update proportional to the gradient, so parameters compare the gradients.
    base = dict(lr=1.0, eps=10.0, warmup_steps=0, total_steps=3, weight_decay=0.0, grad_clip=0.0)
    big, small = tiny_model(), tiny_model()
    train(big, RowBatches(rows, labels, batch_size=4, shuffle=False), TrainConfig(**base, grad_accum=1))
    train(small, RowBatches(rows, labels, batch_size=2, shuffle=False), TrainConfig(**base, grad_accum=2))
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=name)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    rows = random_rows(10)  # 5 batches per epoch: the 8 steps cross an epoch boundary
    config = TrainConfig(lr=5e-3, warmup_steps=2, total_steps=8, log_interval=1, checkpoint_interval=3, seed=7)
    full = train(tiny_model(), RowBatches(rows, batch_size=2, seed=1), config, out_dir=tmp_path / "a")

    calls = iter(range(100))
    stopped = train(
        tiny_model(), RowBatches(rows, batch_size=2, seed=1), config, out_dir=tmp_path / "b",
        should_stop=lambda: next(calls) >= 4,
    )
    assert stopped.cancelled and stopped.step == 4
    assert latest_checkpoint(tmp_path / "b").name == "step-0000004"
    resumed = train(tiny_model(seed=123), RowBatches(rows, batch_size=2, seed=1), config, out_dir=tmp_path / "b")
    assert resumed.step == 8
    assert losses(stopped) == losses(full)[:4]
    assert losses(resumed) == losses(full)[4:]  # bit-for-bit: same data order, weights, optimizer, schedule


def test_cancellation_stops_before_the_next_step():
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    result = train(tiny_model(), RowBatches(random_rows(8), batch_size=2), TrainConfig(total_steps=50), should_stop=should_stop)
    assert result.cancelled and result.step == 2


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    config = TrainConfig(total_steps=2, checkpoint_interval=1, keep_last=5)
    train(tiny_model(), RowBatches(random_rows(8), batch_size=2), config, out_dir=tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]

    def crash(*args, **kwargs):  # the weights are written, then saving the optimizer fails
        raise OSError("disk full")

    monkeypatch.setattr("engine.train.torch.save", crash)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_model(), RowBatches(random_rows(8), batch_size=2), TrainConfig(total_steps=3, checkpoint_interval=1),
              out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000001", "step-0000002"]  # no partial folder
    assert sorted(p.name for p in (tmp_path / "step-0000002").iterdir()) == ["meta.json", "model.safetensors", "trainer.pt"]


def test_progress_is_written_as_json_lines(tmp_path):
    log = tmp_path / "progress.jsonl"
    val = RowBatches(random_rows(4, seed=1), batch_size=2, shuffle=False)
    seen = []
    config = TrainConfig(total_steps=4, log_interval=2, eval_interval=4)
    train(tiny_model(), RowBatches(random_rows(8), batch_size=2), config, val_data=val, log_file=log, on_progress=seen.append)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] == [r.step for r in seen]
    assert records[-1]["val_loss"] is not None and records[0]["val_loss"] is None
    for key in ("epoch", "loss", "lr", "tokens_per_s", "eta_s", "tokens_seen"):
        assert key in records[0]
    assert math.isfinite(records[-1]["val_loss"])


# -- batching helpers --------------------------------------------------------------------------------------


def test_pack_documents_separates_and_cuts_rows():
    rows = pack_documents([[5, 6, 7], [8], [9, 10]], seq_len=3, separator_id=0)
    assert rows.tolist() == [[5, 6, 7], [0, 8, 0], [9, 10, 0]]


def test_row_batches_reshuffle_per_epoch_deterministically():
    rows = torch.arange(8).view(8, 1)
    loader = RowBatches(rows, batch_size=4, seed=3)
    first = [b.input_ids.flatten().tolist() for b in loader]
    again = [b.input_ids.flatten().tolist() for b in loader]
    loader.set_epoch(1)
    other = [b.input_ids.flatten().tolist() for b in loader]
    assert first == again != other
    assert sorted(sum(first, [])) == list(range(8))


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer) -> ChatTokenizer:
    return ChatTokenizer(tokenizer, {"eos_token": "<|im_end|>"}, None)  # the ChatML template


def test_chat_labels_cover_only_assistant_tokens(chat_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi! how are you"},
        {"role": "user", "content": "fine"},
        {"role": "assistant", "content": "good to hear"},
    ]
    example = chat_example(chat_tokenizer, messages)
    labelled = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    text = chat_tokenizer.decode(labelled, skip_special_tokens=False)
    assert text == "hi! how are you<|im_end|>\ngood to hear<|im_end|>\n"
    _, spans = assistant_spans(chat_tokenizer, messages)
    assert len(spans) == 2
    header = chat_tokenizer.decode(example.input_ids[: spans[0][0]], skip_special_tokens=False)
    assert header.endswith("<|im_start|>assistant\n")  # the role header is context, not a target


def test_pack_examples_keeps_labels_with_their_tokens(chat_tokenizer):
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(6)]
    examples = [chat_example(chat_tokenizer, c) for c in convs]
    ids, labels = pack_examples(examples, seq_len=64, pad_id=0)
    assert ids.shape[1] == 64 and ids.shape[0] < len(examples)
    kept = labels != IGNORE_INDEX
    assert torch.equal(ids[kept], labels[kept])
    assert int(kept.sum()) == sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples)


def test_batches_train_with_chat_labels(chat_tokenizer):
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello friend"}]] * 4
    ids, labels = pack_examples([chat_example(chat_tokenizer, c) for c in convs], seq_len=32, pad_id=0)
    model = tiny_model()
    model.model.embed_tokens = torch.nn.Embedding(chat_tokenizer.vocab_size, 32)
    model.lm_head = torch.nn.Linear(32, chat_tokenizer.vocab_size, bias=False)
    model.tie_weights()
    batch = Batch(ids, labels)
    result = train(model, [batch], TrainConfig(lr=1e-2, warmup_steps=1, total_steps=30, log_interval=10))
    assert result.history[-1].loss < result.history[0].loss
