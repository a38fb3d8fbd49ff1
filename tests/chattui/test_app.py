"""The chat app driven through Textual's Pilot against a fake backend that yields scripted chunks
with delays: streaming, stop, regenerate, edit-and-resend, copy, settings, model loading, queued
messages, persistence, export, raw generate mode, the command palette and themes.

Every test runs the app headless with `App.run_test()` inside `asyncio.run` and polls with
`wait_until` rather than sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from textual.widgets import Input, Markdown, TextArea
from ui_fakes import FakeBackend, record_notifications, wait_until

from chattui.app import ChattuiApp
from chattui.catalog import Stores
from chattui.config import Config, load_config
from chattui.screens.chat import ChatScreen
from chattui.screens.dialogs import TextDialog
from chattui.screens.models import ModelPickerScreen
from chattui.screens.settings import SettingsScreen
from chattui.store import Store
from engine.params import GenerationSettings, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
SIZE = (120, 40)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "fake-model"
    folder.mkdir()
    return folder


@pytest.fixture
def make_app(tmp_path, model_dir):
    """make_app(backend=..., **app kwargs) -> ChattuiApp on a store and config in tmp_path."""

    def make(backend=None, *, store=None, config=None, **kwargs) -> ChattuiApp:
        kwargs.setdefault("model_dir", model_dir)
        kwargs.setdefault("bundled_dir", tmp_path / "no-bundled-model")
        kwargs.setdefault("stores", Stores.at(tmp_path / "stores"))
        kwargs.setdefault("export_dir", tmp_path / "exports")
        return ChattuiApp(
            backend or FakeBackend(),
            store or Store(tmp_path / "data" / "chattui.db"),
            config or Config(path=tmp_path / "config" / "config.toml"),
            **kwargs,
        )

    return make


def run(app: ChattuiApp, scenario) -> None:
    """Run scenario(pilot) inside the headless app."""

    async def main():
        async with app.run_test(size=SIZE) as pilot:
            await scenario(pilot)

    asyncio.run(main())


async def ready(pilot) -> ChatScreen:
    app = pilot.app
    await wait_until(pilot, lambda: app.model is not None, what="the model to load")
    return app.chat


async def send(pilot, text: str) -> None:
    chat: ChatScreen = pilot.app.chat
    chat.prompt.focus()
    chat.prompt.load_text(text)
    await pilot.press("enter")


async def reply_done(pilot, count: int) -> None:
    """Wait until the conversation holds `count` finished replies, all rendered in full."""
    chat: ChatScreen = pilot.app.chat
    await wait_until(
        pilot,
        lambda: chat.reply is None and sum(m.role == "assistant" for m in chat.messages) == count
        and all(b.record is not None for b in chat.boxes()),
        what=f"reply #{count} to finish",
    )


def stored(app: ChattuiApp) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in app.store.messages(app.chat.conversation.id)]


# -- streaming -------------------------------------------------------------------------------------


def test_reply_streams_into_markdown_then_is_rendered_and_committed(make_app):
    chunks = [f"word{i} " for i in range(12)] + ["\n\n```python\nprint('hi')\n```\n"]
    backend = FakeBackend(chunks, delay=0.03)
    app = make_app(backend)

    async def scenario(pilot):
        chat = await ready(pilot)
        await send(pilot, "hello")
        await wait_until(pilot, lambda: chat.reply is not None and len(chat.reply.box.text) > 0, what="first chunk")
        box = chat.reply.box
        assert box._stream is not None, "a streaming reply goes through Markdown.get_stream()"
        partial = box.text
        assert 0 < len(partial) < len("".join(chunks)), "the reply shows up piece by piece"
        assert stored(app)[0] == ("user", "hello"), "the user message is committed when sent"
        assert chat.messages[-1].role == "user", "the reply joins the conversation's messages when it ends"
        await reply_done(pilot, 1)
        assert box._stream is None
        assert box.query_one(Markdown).source == "".join(chunks)
        assert stored(app) == [("user", "hello"), ("assistant", "".join(chunks))]
        reply = chat.messages[-1]
        assert reply.finish_reason == "eos" and reply.generated_tokens == len(chunks)
        assert reply.settings["temperature"] == 0.7 and reply.model == str(app.model.path)
        assert "tokens" in box.meta and "tok/s" in box.meta
        assert chat.status.speed_text.startswith("TTFT 0.03 s")
        assert chat.status.context_text == f"ctx {len('hello') + len(chunks)}/256"
        assert backend.requests[0][0] == [{"role": "user", "content": "hello"}]

    run(app, scenario)


def test_input_and_scrolling_stay_responsive_while_a_reply_streams(make_app):
    backend = FakeBackend([f"token{i} " for i in range(3000)], delay=0.005)
    app = make_app(backend)

    async def scenario(pilot):
        chat = await ready(pilot)
        await send(pilot, "go")
        await wait_until(pilot, lambda: chat.reply is not None and chat.reply.chunks, what="streaming")
        await pilot.press(*"typing")
        assert chat.prompt.text == "typing"
        assert chat.reply is not None, "typing happened while the reply was still streaming"
        await pilot.press("escape")
        await reply_done(pilot, 1)

    run(app, scenario)


def test_enter_sends_and_ctrl_j_adds_a_newline(make_app):
    backend = FakeBackend(["ok"])
    app = make_app(backend)

    async def scenario(pilot):
        chat = await ready(pilot)
        chat.prompt.focus()
        await pilot.press("l", "i", "n", "e", "1", "ctrl+j", "l", "i", "n", "e", "2")
        assert chat.prompt.text == "line1\nline2"
        await pilot.press("enter")
        await reply_done(pilot, 1)
        assert stored(app)[0] == ("user", "line1\nline2")
        assert chat.prompt.text == ""

    run(app, scenario)


# -- stop, regenerate, edit, copy ------------------------------------------------------------------


def test_escape_stops_the_reply_and_keeps_the_partial_text_marked_stopped(make_app):
    chunks = [f"w{i} " for i in range(300)]
    backend = FakeBackend(chunks, delay=0.01)
    app = make_app(backend)

    async def scenario(pilot):
        chat = await ready(pilot)
        await send(pilot, "long please")
        await wait_until(pilot, lambda: chat.reply is not None and len(chat.reply.chunks) >= 2, what="some text")
        await pilot.press("escape")
        await reply_done(pilot, 1)
        reply = chat.messages[-1]
        assert reply.finish_reason == "cancelled"
        assert 0 < len(reply.content) < len("".join(chunks))
        assert "".join(chunks).startswith(reply.content)
        box = chat.boxes()[-1]
        assert "stopped" in box.meta
        assert box.query_one(Markdown).source == reply.content
        assert app.store.messages(chat.conversation.id)[-1].finish_reason == "cancelled"

    run(app, scenario)


def test_regenerate_replaces_the_last_reply(make_app):
    backend = FakeBackend(lambda n, prompt: [f"reply {n}"])
    app = make_app(backend)

    async def scenario(pilot):
        chat = await ready(pilot)
        await send(pilot, "question")
        await reply_done(pilot, 1)
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: len(backend.requests) == 2 and chat.reply is None, what="regeneration")
        await reply_done(pilot, 1)
        assert stored(app) == [("user", "question"), ("assistant", "reply 2")]
        assert [b.text for b in chat.boxes()] == ["question", "reply 2"]
        assert backend.requests[0][0] == backend.requests[1][0], "the same prompt is sent again"

    run(app, scenario)


def test_edit_a_past_message_and_resend_drops_what_followed(make_app):
    backend = FakeBackend(lambda n, prompt: [f"reply {n}"])
    app = make_app(backend)

    async def scenario(pilot):
        chat = await ready(pilot)
        await send(pilot, "first")
        await reply_done(pilot, 1)
        await send(pilot, "second")
        await reply_done(pilot, 2)
        first_box = chat.boxes()[0]
        first_box.focus()
        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, TextDialog), what="the edit dialog")
        assert "3 later message" in app.screen.title_text
        app.screen.query_one(TextArea).load_text("first, edited")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: len(backend.requests) == 3 and chat.reply is None, what="the resent reply")
        assert stored(app) == [("user", "first, edited"), ("assistant", "reply 3")]
        assert backend.requests[-1][0] == [{"role": "user", "content": "first, edited"}]
        assert [b.text for b in chat.boxes()] == ["first, edited", "reply 3"]

    run(app, scenario)


def test_copy_puts_the_focused_message_on_the_clipboard(make_app):
    app = make_app(FakeBackend(["copy ", "me"]))

    async def scenario(pilot):
        chat = await ready(pilot)
        await send(pilot, "hi")
        await reply_done(pilot, 1)
        chat.boxes()[-1].focus()
        await pilot.press("c")
        assert app.clipboard == "copy me"
        chat.boxes()[0].focus()
        await pilot.press("c")
        assert app.clipboard == "hi"

    run(app, scenario)


# -- settings --------------------------------------------------------------------------------------


def test_settings_reject_bad_values_saying_what_is_allowed_then_apply_good_ones(make_app):
    backend = FakeBackend(["ok"])
    app = make_app(backend)

    async def scenario(pilot):
        chat = await ready(pilot)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen), what="the settings dialog")
        dialog = app.screen
        assert dialog.query_one("#temperature", Input).placeholder == "model default: 0.7"
        dialog.query_one("#temperature", Input).value = "-1"
        dialog.query_one("#top_p", Input).value = "1.5"
        dialog.query_one("#top_k", Input).value = "many"
        dialog.query_one("#max_new_tokens", Input).value = "100000"
        await pilot.click("#save")
        assert app.screen is dialog, "invalid settings keep the dialog open"
        assert dialog.errors == {
            "temperature": "Temperature must be a number >= 0 (0 = greedy); got '-1'",
            "top_p": "Top-p must be a number > 0 and <= 1 (1 = off); got '1.5'",
            "top_k": "Top-k must be a whole number >= 0 (0 = off); got 'many'",
            "max_new_tokens": "Max new tokens must be at most 128: the model's context window is 256 tokens; a "
                              "larger value would leave earlier messages out of every prompt; got '100000'",
        }
        assert dialog.query_one("#temperature", Input).has_class("-invalid")
        dialog.query_one("#temperature", Input).value = "0.25"
        dialog.query_one("#top_p", Input).value = ""
        dialog.query_one("#top_k", Input).value = "5"
        dialog.query_one("#max_new_tokens", Input).value = "32"
        dialog.query_one("#seed", Input).value = "7"
        dialog.query_one("#system_prompt", TextArea).load_text("You are terse.")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen is chat, what="the dialog to close")
        assert chat.conversation.settings == {
            "temperature": 0.25, "top_k": 5, "max_new_tokens": 32, "seed": 7, "system_prompt": "You are terse.",
        }
        await send(pilot, "hi")
        await reply_done(pilot, 1)
        prompt, settings = backend.requests[-1]
        assert prompt[0] == {"role": "system", "content": "You are terse."}
        assert settings == GenerationSettings(
            SamplingParams(temperature=0.25, top_k=5, top_p=0.9, min_p=0.0, repetition_penalty=1.0, seed=7),
            max_new_tokens=32,
        )

    run(app, scenario)


# -- models ----------------------------------------------------------------------------------------


def test_a_model_that_fails_to_load_leaves_the_previous_one_working(make_app, tmp_path, model_dir):
    backend = FakeBackend(["still here"])
    app = make_app(backend)
    broken = tmp_path / "broken-model"
    broken.mkdir()

    shown = record_notifications(app)

    async def scenario(pilot):
        chat = await ready(pilot)
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPickerScreen), what="the model picker")
        app.screen.query_one("#model-path", Input).value = str(broken)
        app.screen.query_one("#model-path", Input).focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.last_load_error is not None, what="the load to fail")
        assert "corrupt or truncated" in app.last_load_error
        assert app.model.path == str(model_dir)
        assert app.loading is None
        assert any(f"Could not load {broken}" in s and "Still using fake-model" in s for s in shown), shown
        assert chat.status.model_text.startswith("fake-model")
        await send(pilot, "are you there?")
        await reply_done(pilot, 1)
        assert chat.messages[-1].content == "still here"

    run(app, scenario)


def test_picker_lists_recent_and_config_folders_and_loads_the_choice(make_app, tmp_path, checkpoint_factory):
    backend = FakeBackend(["ok"])
    qwen2 = checkpoint_factory("qwen2")
    folders = tmp_path / "models"
    folders.mkdir()
    (folders / "mine").symlink_to(qwen2, target_is_directory=True)
    config = Config(path=tmp_path / "config.toml", model_folders=[str(folders)])
    app = make_app(backend, config=config)

    async def scenario(pilot):
        await ready(pilot)
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPickerScreen) and app.screen.entries,
                         what="the scan")
        entries = {e.name: e for e in app.screen.entries}
        assert entries["fake-model"].source == "recent"
        assert entries["fake-model"].problem == "no config.json"
        mine = entries["mine"]
        assert mine.source == "config" and mine.problem is None
        assert mine.architecture == "Qwen2ForCausalLM" and mine.parameters > 50_000 and mine.size_bytes > 0
        index = app.screen.entries.index(mine)
        app.screen.query_one("#model-list").highlighted = index
        app.screen.query_one("#model-list").focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.model.name == "mine", what="the chosen model to load")
        assert backend.loads[-1] == str(folders / "mine")

    run(app, scenario)


def test_a_message_typed_while_the_model_loads_is_sent_once_it_is_ready(make_app):
    backend = FakeBackend(["late ", "reply"], load_delay=-1)  # the load waits for release_load
    app = make_app(backend)

    async def scenario(pilot):
        chat = app.chat
        await wait_until(pilot, lambda: app.loading is not None, what="loading to start")
        assert app.model is None
        await send(pilot, "early bird")
        await wait_until(pilot, lambda: chat.boxes() and "queued" in chat.boxes()[-1].meta, what="the queued note")
        assert stored(app) == [("user", "early bird")]
        assert backend.requests == []
        backend.release_load.set()
        await reply_done(pilot, 1)
        assert stored(app) == [("user", "early bird"), ("assistant", "late reply")]
        assert "queued" not in chat.boxes()[0].meta

    run(app, scenario)


def test_app_opens_without_a_bundled_model_and_asks_to_choose_one(make_app, tmp_path, model_dir):
    backend = FakeBackend(["hello"])
    app = make_app(backend, model_dir=None)  # bundled_dir has no config.json
    shown = record_notifications(app)

    async def scenario(pilot):
        chat = app.chat
        await wait_until(pilot, lambda: chat.is_mounted, what="the chat screen")
        assert any("bundled model is not installed yet" in s for s in shown), shown
        assert app.startup_model() is None and app.loading is None and backend.loads == []
        assert chat.status.model_text.startswith("no model")
        await send(pilot, "anyone?")
        await wait_until(pilot, lambda: chat.boxes() and "queued" in chat.boxes()[-1].meta, what="the queued note")
        assert any("Press ctrl+o to choose" in s for s in shown), shown
        app.load_model(str(model_dir))
        await reply_done(pilot, 1)

    run(app, scenario)


def test_model_load_progress_shows_in_the_status_bar(make_app):
    backend = FakeBackend(load_delay=-1)
    app = make_app(backend)

    async def scenario(pilot):
        chat = app.chat
        await wait_until(pilot, lambda: chat.status.loading_text == "loading fake-model", what="loading indicator")
        backend.release_load.set()
        await ready(pilot)
        await wait_until(pilot, lambda: chat.status.loading_text == "", what="loading indicator to go")
        assert chat.status.model_text == "fake-model · 1.2M params · cpu/float32"

    run(app, scenario)


# -- persistence, export ---------------------------------------------------------------------------


def test_conversation_is_there_after_quit_and_reopen(make_app, tmp_path):
    db = tmp_path / "data" / "chattui.db"

    async def first(pilot):
        await ready(pilot)
        await send(pilot, "remember me")
        await reply_done(pilot, 1)
        await pilot.press("ctrl+q")

    app = make_app(FakeBackend(["I will"]), store=Store(db))
    run(app, first)
    assert app.return_code == 0
    app.store.close()

    store = Store(db)
    app2 = make_app(FakeBackend(["again"]), store=store)

    async def second(pilot):
        chat = await ready(pilot)
        assert [(m.role, m.content) for m in chat.messages] == [("user", "remember me"), ("assistant", "I will")]
        assert [b.text for b in chat.boxes()] == ["remember me", "I will"]
        assert chat.conversation.title == "remember me"
        assert chat.query_one("#conversations").option_count == 1
        await send(pilot, "and now?")
        await reply_done(pilot, 2)

    run(app2, second)
    assert [m.content for m in store.messages(store.conversations()[0].id)] == ["remember me", "I will", "and now?",
                                                                                "again"]


def test_quitting_mid_reply_saves_the_partial_reply_as_stopped(make_app, tmp_path):
    db = tmp_path / "data" / "chattui.db"
    backend = FakeBackend([f"w{i} " for i in range(500)], delay=0.01)
    app = make_app(backend, store=Store(db))

    async def scenario(pilot):
        chat = await ready(pilot)
        await send(pilot, "talk")
        await wait_until(pilot, lambda: chat.reply is not None and chat.reply.chunks, what="streaming")
        await pilot.press("ctrl+q")

    run(app, scenario)
    store = Store(db)
    messages = store.messages(store.conversations()[0].id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[1].finish_reason == "cancelled" and messages[1].content.startswith("w0 ")


def test_export_to_markdown_and_json_from_the_command_palette(make_app, tmp_path):
    app = make_app(FakeBackend(["The answer is **42**."]))

    async def palette(pilot, command: str) -> None:
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: app.screen.id == "--command-palette", what="the command palette")
        await pilot.press(*command)
        await pilot.pause(0.3)  # let the palette search
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is app.chat, what="the palette to close")

    shown = record_notifications(app)

    async def scenario(pilot):
        await ready(pilot)
        await send(pilot, "What is the answer?")
        await reply_done(pilot, 1)
        await palette(pilot, "Export as Markdown")
        await wait_until(pilot, lambda: app.last_export and app.last_export.suffix == ".md", what="the md export")
        md_path = app.last_export
        await palette(pilot, "Export as JSON")
        await wait_until(pilot, lambda: app.last_export.suffix == ".json", what="the json export")
        json_path = app.last_export
        assert any(str(md_path) in s for s in shown) and any(str(json_path) in s for s in shown), shown

        assert md_path.parent == tmp_path / "exports"
        md = md_path.read_text()
        assert md.startswith("# What is the answer?\n")
        assert "## User" in md and "What is the answer?" in md
        assert "## Assistant" in md and "The answer is **42**." in md
        assert md.index("## User") < md.index("## Assistant")

        data = json.loads(json_path.read_text())
        assert data["format"] == "chattui.conversation" and data["mode"] == "chat"
        assert [(m["role"], m["content"]) for m in data["messages"]] == [
            ("user", "What is the answer?"), ("assistant", "The answer is **42**."),
        ]
        reply = data["messages"][1]
        assert reply["finish_reason"] == "eos" and reply["generated_tokens"] == 1
        assert reply["settings"]["temperature"] == 0.7 and reply["model"] == str(app.model.path)
        assert reply["stats"]["ttft_s"] > 0

    run(app, scenario)


# -- modes, conversations, palette, themes ---------------------------------------------------------


def test_raw_generate_mode_continues_the_text_without_a_template(make_app):
    backend = FakeBackend(lambda n, prompt: [f" more{n}"])
    app = make_app(backend)

    async def scenario(pilot):
        chat = await ready(pilot)
        await pilot.press("ctrl+g")
        assert chat.conversation.mode == "generate"
        await send(pilot, "Once upon a time")
        await reply_done(pilot, 1)
        assert backend.requests[0][0] == "Once upon a time"
        await send(pilot, "")  # Enter with no text continues the document
        await reply_done(pilot, 2)
        assert backend.requests[1][0] == "Once upon a time more1"
        assert [b.query_one(".message-header").content for b in chat.boxes()][:2] == ["Prompt", "Completion"]

    run(app, scenario)


def test_new_chat_and_switching_conversations(make_app):
    backend = FakeBackend(lambda n, prompt: [f"reply {n}"])
    app = make_app(backend)

    async def scenario(pilot):
        chat = await ready(pilot)
        await send(pilot, "chat one")
        await reply_done(pilot, 1)
        first = chat.conversation.id
        await pilot.press("ctrl+n")
        assert chat.conversation is None and chat.boxes() == []
        await send(pilot, "chat two")
        await reply_done(pilot, 1)
        assert chat.conversation.id != first
        assert backend.requests[-1][0] == [{"role": "user", "content": "chat two"}], "a new chat starts empty"
        await chat.open_conversation(first)
        assert [b.text for b in chat.boxes()] == ["chat one", "reply 1"]
        assert chat.query_one("#conversations").option_count == 2

    run(app, scenario)


def test_a_failing_request_shows_the_error_and_keeps_the_message(make_app):
    backend = FakeBackend(["never"])

    def failing_stream(prompt, settings, cancel, **options):
        from chattui.backend import BackendError

        raise BackendError("the last message alone is 300 tokens; the model's context window is 256")
        yield

    backend.stream = failing_stream
    app = make_app(backend)
    shown = record_notifications(app)

    async def scenario(pilot):
        chat = await ready(pilot)
        await send(pilot, "way too long")
        await wait_until(pilot, lambda: any("context window" in s for s in shown), what="the error")
        assert chat.reply is None
        assert stored(app) == [("user", "way too long")]
        assert [b.role for b in chat.boxes()] == ["user"]

    run(app, scenario)


def test_every_action_is_in_the_command_palette(make_app):
    app = make_app()

    async def scenario(pilot):
        await ready(pilot)
        titles = {c.title for c in app.get_system_commands(app.chat)}
        for needed in ("New chat", "Stop reply", "Regenerate reply", "Edit last message", "Copy last reply",
                       "Export as Markdown", "Export as JSON", "Conversation settings",
                       "Switch chat / raw generate mode", "Choose model", "Toggle sidebar", "Rename conversation",
                       "Delete conversation", "Theme", "Quit", "Keys"):
            assert needed in titles, needed
        footer_keys = {key for key, b in app.chat.active_bindings.items() if b.binding.show}
        assert {"escape", "ctrl+r", "ctrl+n", "ctrl+s", "ctrl+o", "ctrl+q"} <= footer_keys

    run(app, scenario)


def test_theme_choice_is_saved_in_the_config_file(make_app, tmp_path):
    path = tmp_path / "config" / "config.toml"
    path.parent.mkdir()
    path.write_text('# mine\ndevice = "cpu"\n')
    app = make_app(config=load_config(path))

    async def scenario(pilot):
        await ready(pilot)
        app.theme = "nord"
        await wait_until(pilot, lambda: 'theme = "nord"' in path.read_text(), what="the theme to be saved")

    run(app, scenario)
    assert path.read_text() == '# mine\ndevice = "cpu"\ntheme = "nord"\n'
    app2 = make_app(config=load_config(path))

    async def reopened(pilot):
        assert app2.theme == "nord"

    run(app2, reopened)


def test_config_errors_and_an_unknown_theme_are_reported_with_file_and_key(make_app, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('device = "gpu"\ntheme = "no-such-theme"\n')
    app = make_app(config=load_config(path))
    shown = record_notifications(app)

    async def scenario(pilot):
        await ready(pilot)

    run(app, scenario)
    assert f"Config file: {path}: device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'" in shown, shown
    assert any(s.startswith(f"Config file: {path}: theme: unknown theme 'no-such-theme'") for s in shown), shown


def test_store_notice_is_shown_at_start(make_app):
    app = make_app(notices=["The conversation database x could not be read; it was moved to y"])
    shown = record_notifications(app)

    async def scenario(pilot):
        await ready(pilot)

    run(app, scenario)
    assert "Conversations: The conversation database x could not be read; it was moved to y" in shown


def test_app_modules_never_import_torch_nor_the_engine_runtime():
    code = (
        "import sys, chattui.app, chattui.cli, chattui.bench_ui, chattui.catalog, engine.params\n"
        "from chattui.backend import Reply, ReplyResult\n"
        "from chattui.catalog import scan\n"
        "plain = {'engine', 'engine.params', 'engine.job_files', 'engine.presets', 'engine.errors'}\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('torch', 'engine')) and m not in plain)\n"
        "assert not loaded, loaded  # the UI shares only the engine's torch-free definitions\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_chat_view_tells_the_screen_each_reply_with_its_stored_record_and_typed_result(make_app, monkeypatch):
    from chattui.backend import ReplyResult
    from chattui.widgets.chat_view import ChatView

    seen: list[ChatView.ReplyFinished | ChatView.ReplyFailed] = []
    for name in ("on_chat_view_reply_finished", "on_chat_view_reply_failed"):
        handler = getattr(ChatScreen, name)
        monkeypatch.setattr(ChatScreen, name, lambda self, message, handler=handler: (seen.append(message),
                                                                                     handler(self, message)))
    backend = FakeBackend(lambda n, prompt: ["a", "b"] if n == 1 else [])
    app = make_app(backend)

    async def scenario(pilot):
        chat = await ready(pilot)
        await send(pilot, "hello")
        await reply_done(pilot, 1)
        await wait_until(pilot, lambda: seen, what="ReplyFinished")
        finished = seen[0]
        assert isinstance(finished, ChatView.ReplyFinished) and finished.record == chat.messages[-1]
        assert isinstance(finished.result, ReplyResult) and finished.result.text == "ab" == finished.record.content
        assert finished.result.seed == finished.record.stats["seed"]
        def broken(*args, **options):
            raise RuntimeError("a bug in the backend")

        backend.stream = broken
        await send(pilot, "again")
        await wait_until(pilot, lambda: len(seen) == 2, what="ReplyFailed")
        assert isinstance(seen[1], ChatView.ReplyFailed) and seen[1].record is None, "no text: nothing kept"
        assert seen[1].error == "RuntimeError: a bug in the backend"

    run(app, scenario)


def test_long_conversations_mount_recent_messages_and_show_earlier_on_request(make_app, tmp_path):
    from chattui.widgets.chat_view import MOUNT_LIMIT

    store = Store(tmp_path / "long.db")
    c = store.create_conversation(title="long")
    for i in range(15):
        store.add_message(c.id, "user", f"q{i}")
        store.add_message(c.id, "assistant", f"a{i}", finish_reason="eos")
    app = make_app(FakeBackend(["a15"]), store=store)

    async def scenario(pilot):
        chat = await ready(pilot)
        assert [b.text for b in chat.boxes()] == [m.content for m in chat.messages[-MOUNT_LIMIT:]]
        button = chat.query_one("#earlier")
        assert f"{30 - MOUNT_LIMIT} not shown" in str(button.label)
        for shown in (2 * MOUNT_LIMIT, 30):
            chat.view.scroll_home(animate=False)  # the button waits at the top of the conversation
            await pilot.pause()
            chat.query_one("#earlier").press()
            await wait_until(pilot, lambda: len(chat.boxes()) == shown, what=f"{shown} messages on screen")
        await wait_until(pilot, lambda: not chat.query("#earlier"), what="the 'show earlier' button to go")
        await send(pilot, "q15")
        await reply_done(pilot, 16)
        shown = len(chat.boxes())
        assert MOUNT_LIMIT <= shown <= MOUNT_LIMIT + 4, "sending trims the screen back to the recent messages"
        assert chat.boxes()[-1].text == "a15"
        assert f"({32 - shown} not shown)" in str(chat.query_one("#earlier").label)

    run(app, scenario)


def test_sidebar_toggles(make_app):
    app = make_app()

    async def scenario(pilot):
        chat = await ready(pilot)
        assert chat.query_one("#sidebar").display
        await pilot.press("ctrl+b")
        assert not chat.query_one("#sidebar").display
        await pilot.press("ctrl+b")
        assert chat.query_one("#sidebar").display

    run(app, scenario)
