"""End to end on a real (tiny, random) checkpoint: chattui's engine behind the backend adapter, and
the app chatting with it through Pilot."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest
from ui_fakes import record_notifications, wait_until

from chattui.app import ChattuiApp
from chattui.backend import BackendError, EngineBackend, ReplyResult
from chattui.catalog import Stores
from chattui.config import Config
from chattui.store import Store
from engine.params import GenerationSettings, SamplingParams

GREEDY = GenerationSettings(SamplingParams(temperature=0.0, top_k=0, top_p=1.0), max_new_tokens=12)


@pytest.fixture(scope="module")
def qwen2(checkpoint_factory) -> Path:
    return checkpoint_factory("qwen2")


@pytest.fixture
def broken(qwen2, tmp_path) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(qwen2, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def test_backend_reply_streams_text_then_holds_a_typed_result(qwen2):
    backend = EngineBackend()
    info = backend.load(str(qwen2), "cpu", "float32")
    assert (info.name, info.device, info.dtype, info.context_length) == (qwen2.name, "cpu", "float32", 256)
    assert info.architecture == "Qwen2ForCausalLM" and info.parameters > 50_000
    assert info.defaults == backend._engine.default_settings()
    reply = backend.stream([{"role": "user", "content": "hi"}], GREEDY, threading.Event())
    deltas = list(reply)
    assert all(isinstance(d, str) for d in deltas) and isinstance(reply.result, ReplyResult)
    result = reply.result
    assert result.text == "".join(deltas)
    assert result.finish_reason in {"eos", "length"} and result.dropped_messages == 0
    assert result.generated_tokens == len(result.token_ids) >= 1 and result.prompt_tokens > 0
    raw = backend.stream("The quick brown", GREEDY, threading.Event())
    list(raw)
    assert raw.result.prompt_tokens == len(backend._engine.tokenizer.encode("The quick brown", add_special_tokens=True))


def test_backend_stops_between_tokens_when_cancelled(qwen2):
    backend = EngineBackend()
    backend.load(str(qwen2), "cpu", "float32")
    cancel = threading.Event()
    settings = GREEDY.updated({"temperature": 1.0, "max_new_tokens": 200, "seed": 3})
    received = []
    reply = backend.stream("Once", settings, cancel)
    for delta in reply:
        received.append(delta)
        cancel.set()
    assert reply.result.finish_reason == "cancelled"
    assert reply.result.generated_tokens < 200 and reply.result.text == "".join(received)


def test_backend_load_failure_keeps_the_previous_model(qwen2, broken):
    backend = EngineBackend()
    backend.load(str(qwen2), "cpu", "float32")
    with pytest.raises(BackendError, match="truncated safetensors file"):
        backend.load(str(broken), "cpu", "float32")
    assert backend.info().path == str(qwen2)
    reply = backend.stream([{"role": "user", "content": "hi"}], GREEDY, threading.Event())
    list(reply)
    assert reply.result.generated_tokens >= 1


def test_backend_reports_bad_settings_and_long_prompts_as_one_line(qwen2):
    backend = EngineBackend()
    backend.load(str(qwen2), "cpu", "float32")
    with pytest.raises(BackendError, match="top-p"):
        list(backend.stream("hi", GREEDY.updated({"top_p": 2.0}), threading.Event()))
    with pytest.raises(BackendError, match="context window"):
        list(backend.stream("word " * 400, GREEDY, threading.Event()))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the decode kernels run in the worker thread
def test_chat_end_to_end_on_a_tiny_qwen2_checkpoint(qwen2, broken, tmp_path, dtype):
    store = Store(tmp_path / "chattui.db")
    app = ChattuiApp(
        EngineBackend(), store, Config(), model_dir=qwen2, device="cpu", dtype=dtype,
        bundled_dir=tmp_path / "none", stores=Stores.at(tmp_path / "hub"), export_dir=tmp_path,
    )
    shown = record_notifications(app)

    async def scenario(pilot):
        chat = app.chat
        await wait_until(pilot, lambda: app.model is not None, timeout=60, what="the model to load")
        assert chat.status.model_text.startswith(f"{qwen2.name} · ") and f"cpu/{dtype}" in chat.status.model_text
        for turn, text in enumerate(["hi", "and again"], start=1):
            chat.prompt.load_text(text)
            chat.prompt.focus()
            await pilot.press("enter")
            await wait_until(
                pilot, lambda: chat.reply is None and sum(m.role == "assistant" for m in chat.messages) == turn
                and all(b.record for b in chat.boxes()), timeout=60, what=f"reply {turn}",
            )
        replies = [m for m in store.messages(chat.conversation.id) if m.role == "assistant"]
        for reply in replies:
            assert reply.finish_reason in {"eos", "length"}
            assert reply.generated_tokens >= 1 and reply.model == str(qwen2)
            assert reply.stats["ttft_s"] > 0 and "seed" in reply.stats
        assert replies[1].stats["reused_prompt_tokens"] > 0, "the second turn reuses the KV cache"
        assert chat.status.context_text == (
            f"ctx {replies[1].prompt_tokens + replies[1].generated_tokens}/256"
        )
        app.load_model(str(broken))
        await wait_until(pilot, lambda: app.last_load_error is not None, timeout=60, what="the failed load")
        assert app.model.path == str(qwen2)
        assert any("truncated safetensors file" in s and f"Still using {qwen2.name}" in s for s in shown), shown

    async def main():
        async with app.run_test(size=(120, 40)) as pilot:
            await scenario(pilot)

    asyncio.run(main())
