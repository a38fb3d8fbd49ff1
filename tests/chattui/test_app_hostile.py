"""The app against hostile text, templates and broken databases: a reply full of escape sequences is shown
as marks (now and when the conversation is reopened), a template that never ends leaves Esc working and is
one notice, a full disk keeps the typed message in the input, and a locked database is one notice while
the app keeps running."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from faults import fill_disk, hold_exclusive_lock
from textual.widgets import Markdown
from ui_fakes import FakeBackend, record_notifications, wait_until

import engine.tokenizer
from chattui.app import ChattuiApp
from chattui.backend import EngineBackend
from chattui.catalog import Stores
from chattui.config import Config
from chattui.store import DB_FILE, Store

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m\r"
MARKED = "␛]0;pwned␇␛[2J\ufffd31m␍"


def make_app(tmp_path: Path, backend=None, store=None) -> ChattuiApp:
    model = tmp_path / "fake-model"
    model.mkdir(exist_ok=True)
    return ChattuiApp(
        backend or FakeBackend(), store or Store(tmp_path / "data" / DB_FILE),
        Config(path=tmp_path / "config" / "config.toml"), model_dir=model,
        bundled_dir=tmp_path / "no-bundled-model", stores=Stores.at(tmp_path / "stores"), export_dir=tmp_path / "exports",
    )


def run(app: ChattuiApp, scenario) -> None:
    async def main():
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.model is not None, what="the model to load")
            await scenario(pilot)

    asyncio.run(main())


async def send(pilot, text: str) -> None:
    chat = pilot.app.chat
    chat.prompt.focus()
    chat.prompt.load_text(text)
    await pilot.press("enter")


def shown_text(box) -> str:
    body = box.query_one(".message-body")
    return body.source if isinstance(body, Markdown) else str(body.content)


def test_escape_sequences_in_a_reply_are_shown_as_marks_and_stored_exactly(tmp_path):
    app = make_app(tmp_path, FakeBackend(["title ", ESCAPES, " end"]))

    async def scenario(pilot):
        chat = app.chat
        await send(pilot, f"user {ESCAPES}")
        await wait_until(pilot, lambda: chat.reply is None and len(chat.messages) == 2, what="the reply")
        user, reply = chat.boxes()
        assert shown_text(user) == f"user {MARKED}"
        assert shown_text(reply) == f"title {MARKED} end"
        assert "\x1b" not in shown_text(reply) + shown_text(user)
        assert reply.text == f"title {ESCAPES} end", "copy gets the exact text"
        assert [m.content for m in chat.messages] == [f"user {ESCAPES}", f"title {ESCAPES} end"]

    run(app, scenario)


def test_stored_escape_sequences_are_shown_as_marks_when_the_conversation_is_reopened(tmp_path):
    store = Store(tmp_path / "data" / DB_FILE)
    conversation = store.create_conversation(title=f"t{ESCAPES}")
    store.add_message(conversation.id, "user", f"u{ESCAPES}")
    store.add_message(conversation.id, "assistant", f"a{ESCAPES}")
    app = make_app(tmp_path, store=store)

    async def scenario(pilot):
        chat = app.chat
        await wait_until(pilot, lambda: len(chat.boxes()) == 2, what="the conversation to open")
        assert [shown_text(b) for b in chat.boxes()] == [f"u{MARKED}", f"a{MARKED}"]
        title = chat.query_one("#conversations").get_option_at_index(0).prompt
        assert "\x1b" not in str(title) and "␛" in str(title)

    run(app, scenario)


def test_a_full_disk_keeps_the_typed_message_in_the_input_and_says_why(tmp_path, tmpfs):
    data = tmpfs("1m")
    store = Store(data / DB_FILE)
    app = make_app(tmp_path, store=store)
    shown = record_notifications(app)
    message = "a long message " * 10_000

    async def scenario(pilot):
        chat = app.chat
        chat.store.create_conversation()  # so only the message itself needs room
        fill_disk(data)
        await send(pilot, message)
        await wait_until(pilot, lambda: any("not sent" in s for s in shown), what="the notice")
        assert chat.prompt.text == message, "the typed message is still in the input"
        assert chat.messages == [] and chat.reply is None
        (data / "filler").unlink()
        chat.prompt.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(chat.messages) == 2, what=f"the reply once there is room {shown}")
        assert chat.prompt.text == ""

    run(app, scenario)
    assert any(s.startswith("Not sent: Your message was not sent: not saved: the disk holding") for s in shown), shown


def test_a_locked_database_is_one_notice_and_the_app_keeps_running(tmp_path, monkeypatch):
    monkeypatch.setattr("chattui.store.BUSY_TIMEOUT_S", 0.1)
    app = make_app(tmp_path)
    shown = record_notifications(app)

    async def scenario(pilot):
        chat = app.chat
        await send(pilot, "first")
        await wait_until(pilot, lambda: len(chat.messages) == 2, what="the first reply")
        other = hold_exclusive_lock(tmp_path / "data" / DB_FILE)
        try:
            await pilot.press("ctrl+g")  # switching mode saves it: the lock makes that fail
            await wait_until(pilot, lambda: any("locked" in s for s in shown), what="the notice")
        finally:
            other.rollback()
            other.close()
        assert app.is_running and app.return_code is None
        await send(pilot, "second")
        await wait_until(pilot, lambda: len(chat.messages) == 4, what="a reply after the lock is gone")

    run(app, scenario)
    assert any(s.startswith("Not saved: ") and "is locked by another program" in s for s in shown), shown


def test_the_app_stays_responsive_to_esc_and_reports_a_template_timeout(checkpoint_factory, tmp_path,
                                                                          monkeypatch):
    """Esc stops a reply whose template is still rendering within moments, not at the render's time limit;
    a render that reaches its limit is one notice. (The pilot's key presses wait for the process to idle, up
    to a second or two while the render runs, so the limit for the Esc part is far above that.)"""
    monkeypatch.setattr(engine.tokenizer, "TEMPLATE_TIME_LIMIT_S", 30.0)
    folder = shutil.copytree(checkpoint_factory("qwen2"), tmp_path / "model")
    (folder / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    app = ChattuiApp(EngineBackend(), Store(tmp_path / "chattui.db"), Config(), model_dir=folder, device="cpu",
                     dtype="float32", bundled_dir=tmp_path / "none", stores=Stores.at(tmp_path / "stores"), export_dir=tmp_path)
    shown = record_notifications(app)

    async def scenario(pilot):
        chat = app.chat
        await wait_until(pilot, lambda: app.model is not None, timeout=60, what="the model to load")
        started = time.monotonic()
        await send(pilot, "first")
        assert chat.reply is not None  # the template is rendering in the worker thread
        await pilot.press("escape")
        await wait_until(pilot, lambda: chat.reply is None, timeout=20, what="Esc to stop the reply")
        assert time.monotonic() - started < 10, "Esc waited for the render's time limit"
        await wait_until(pilot, lambda: ": Stopped before the first token" in shown, what="the stopped notice")
        assert chat.messages and [m.role for m in chat.messages] == ["user"]  # no empty reply kept

        monkeypatch.setattr(engine.tokenizer, "TEMPLATE_TIME_LIMIT_S", 2.0)
        await send(pilot, "second")
        await wait_until(pilot, lambda: any("took more than 2 s" in s for s in shown), timeout=30,
                         what="the template error notice")
        await wait_until(pilot, lambda: chat.reply is None, what="the failed reply to end")
        assert app.is_running

    async def main():
        async with app.run_test(size=(120, 40)) as pilot:
            await scenario(pilot)

    asyncio.run(main())
    assert any(s.startswith("Generation failed: chat template took more than 2 s") for s in shown), shown
