"""What a new user hit at common terminal sizes (issue 14), driven through Pilot at 160x48 and 80x24:
the fine-tune form and job view scroll with every field and button reachable, focus comes back after
dialogs, raw mode continues only what was typed, the history that did not fit is shown, the reply that
was streaming survives a crash, the adapter in use is shown and kept, and the smaller inaccuracies."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from textual.widgets import Button, Input, Select
from ui_fakes import FakeBackend, record_notifications, wait_until

from chattui import jobs
from chattui.app import ChattuiApp
from chattui.catalog import Stores
from chattui.config import Config
from chattui.screens.finetune import FinetuneScreen
from chattui.screens.finetune.form import FinetuneForm
from chattui.store import Store

SIZES = [(160, 48), (80, 24)]


@pytest.fixture
def make_app(tmp_path):
    model = tmp_path / "fake-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")

    def make(backend=None, *, db: str = "chattui.db", **kwargs) -> ChattuiApp:
        kwargs.setdefault("model_dir", model)
        return ChattuiApp(
            backend or FakeBackend(), Store(tmp_path / "data" / db), Config(path=tmp_path / "config.toml"),
            bundled_dir=tmp_path / "no-bundled", stores=Stores.at(tmp_path / "stores"), export_dir=tmp_path / "exports",
            jobs_dir=tmp_path / "jobs", **kwargs,
        )

    return make


def run(app: ChattuiApp, size, scenario) -> None:
    async def main():
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: app.model is not None, what="the fake model to load")
            await scenario(pilot)

    asyncio.run(main())


def write_job(root: Path, job_id: str, model: Path, *records: dict) -> Path:
    """A job folder as engine.finetune leaves it: job.toml and the given progress records (no process)."""
    folder = root / job_id
    folder.mkdir(parents=True)
    (folder / jobs.JOB_CONFIG).write_text(jobs.to_toml({"id": job_id, "model": str(model), "data": ["d.jsonl"]}))
    now = time.time()
    lines = [json.dumps({"time": now, **r}) + "\n" for r in records]
    (folder / jobs.PROGRESS_FILE).write_text("".join(lines))
    return folder


def fully_visible(widget, container) -> bool:
    region, view = widget.region, container.region
    return region.area > 0 and view.contains_region(region)


async def open_finetune(pilot) -> FinetuneScreen:
    await pilot.press("f4")
    return await wait_until(pilot, lambda: isinstance(pilot.app.screen, FinetuneScreen) and pilot.app.screen,
                            what="the fine-tune screen")


# -- 1: the fine-tune form and the job view scroll and stay usable ------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_every_form_field_and_button_is_reachable_by_tab_and_visible(make_app, size):
    app = make_app()

    async def scenario(pilot):
        screen = await open_finetune(pilot)
        form = screen.query_one("#ft-form")
        preview = screen.query_one("#ft-preview")
        preview.update("\n".join(f"preview line {i}" for i in range(20)))  # as tall as a real preview
        preview.display = True
        controls = [w for w in form.query("Input, Select, Button") if w.display and w.parent.display]
        assert len(controls) >= 17
        screen.query_one("#ft-model", Input).focus()
        seen = set()
        for _ in range(len(controls) + 2):
            await pilot.pause()
            focused = app.focused
            if focused in controls:
                assert fully_visible(focused, form), f"{focused.id} is focused but not on screen at {size}"
                seen.add(focused)
            await pilot.press("tab")
        assert seen == set(controls), f"not reached by Tab: {[w.id for w in set(controls) - seen]}"
        for key in ("model", "data"):
            assert screen.query_one(f"#ft-{key}", Input).region.width >= 24, f"the {key} input is too narrow"
        for widget in form.query(".ft-number"):
            assert widget.region.width >= 10

    run(app, size, scenario)


@pytest.mark.parametrize("size", SIZES)
def test_job_view_buttons_are_on_screen(make_app, tmp_path, size):
    model = tmp_path / "fake-model"
    write_job(tmp_path / "jobs", "j1", model, {"type": "status", "status": "running"},
              *({"type": "progress", "step": s, "total_steps": 50, "loss": 3.0 - s / 10} for s in range(1, 11)))
    app = make_app()

    async def scenario(pilot):
        screen = await open_finetune(pilot)
        screen.show_job("j1")
        await pilot.pause()
        view = screen.query_one("#ft-job")
        for name in ("cancel", "resume", "chat", "compare"):
            assert fully_visible(screen.query_one(f"#job-{name}", Button), view), f"{name} is cut off at {size}"
        view.scroll_end(animate=False)
        await pilot.pause()
        assert fully_visible(screen.query_one("#job-log"), view), "the log is reachable by scrolling"

    run(app, size, scenario)


# -- 5: focus comes back after dialogs; one key focuses the message input -------------------------------------


async def send(pilot, text: str) -> None:
    chat = pilot.app.chat
    chat.prompt.focus()
    chat.prompt.load_text(text)
    await pilot.press("enter")
    await wait_until(pilot, lambda: chat.reply is None and chat.messages[-1].role == "assistant", what="the reply")


def footer_keys(screen) -> set[str]:
    from textual.widgets._footer import FooterKey

    return {key.key for key in screen.query(FooterKey)}


@pytest.mark.parametrize("size", SIZES)
def test_dialogs_give_focus_back_and_ctrl_l_focuses_the_message_input(make_app, size):
    from textual.widgets import OptionList

    from chattui.widgets.message_box import MessageBox

    app = make_app()

    async def scenario(pilot):
        chat = app.chat
        await send(pilot, "hello")
        await send(pilot, "again")
        assert "ctrl+l" in footer_keys(chat)
        box = chat.boxes()[0]
        box.focus()
        await pilot.press("e")  # the edit dialog, cancelled
        await wait_until(pilot, lambda: app.screen is not chat, what="the edit dialog")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is chat, what="the chat screen")
        assert app.focused is box, "focus is back on the message the dialog came from"
        await pilot.press("ctrl+l")
        assert app.focused is chat.prompt
        for key in ("ctrl+s", "ctrl+o", "f4"):  # settings, model picker, fine-tune screen
            await pilot.press(key)
            await wait_until(pilot, lambda: app.screen is not chat, what=f"the screen of {key}")
            await pilot.pause()
            await pilot.press("escape")
            await wait_until(pilot, lambda: app.screen is chat, what="the chat screen")
            assert app.focused is chat.prompt, f"focus after {key} and Esc"
        chat.query_one("#conversations", OptionList).focus()
        await pilot.press("ctrl+l")
        assert app.focused is chat.prompt and not isinstance(app.focused, MessageBox)

    run(app, size, scenario)


@pytest.mark.parametrize("size", SIZES)
def test_focus_stays_in_the_job_view_after_cancel(make_app, tmp_path, size):
    import subprocess
    import sys

    # a stand-in job process: its command line names engine.finetune, as chattui.jobs checks
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "engine.finetune"])
    folder = write_job(tmp_path / "jobs", "j1", tmp_path / "fake-model",
                       {"type": "status", "status": "running", "pid": process.pid},
                       {"type": "progress", "step": 1, "total_steps": 50, "loss": 3.0})
    (folder / jobs.PID_FILE).write_text(f"{process.pid}\n")
    app = make_app()

    async def scenario(pilot):
        screen = await open_finetune(pilot)
        screen.show_job("j1")
        cancel = screen.query_one("#job-cancel", Button)
        await wait_until(pilot, lambda: not cancel.disabled, what="Cancel enabled")
        cancel.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.job.finished, timeout=10, what="the job to end")
        await wait_until(pilot, lambda: cancel.disabled, what="Cancel disabled")
        assert app.focused is not None and app.focused is screen.query_one("#job-resume", Button)

    try:
        run(app, size, scenario)
    finally:
        process.kill()
        process.wait()


# -- 6: the heatmap scrolls sideways by keyboard; the working keys are in the footer ---------------------------


@pytest.mark.parametrize("size", SIZES)
def test_heatmap_scrolls_sideways_by_keyboard_and_says_so_in_the_footer(make_app, size):
    from ui_fakes import FakeAttentionBackend

    from chattui.screens.attention import AttentionScreen

    app = make_app(FakeAttentionBackend())
    words = " ".join(f"w{i}" for i in range(300))

    async def scenario(pilot):
        await send(pilot, words)
        await pilot.press("f2")
        screen = await wait_until(pilot, lambda: isinstance(app.screen, AttentionScreen) and app.screen.matrix is not None
                                  and not app.screen.busy and app.screen, what="the heatmap")
        heatmap = screen.heatmap
        assert app.focused is heatmap
        first = heatmap._visible_keys()
        await pilot.press("right", "right", "right")
        await pilot.pause()
        moved = heatmap._visible_keys()
        assert moved.start > first.start, "right scrolls the key columns"
        await pilot.press("left")
        await pilot.pause()
        assert heatmap._visible_keys().start < moved.start
        await pilot.press("end")
        await pilot.pause()
        assert heatmap._visible_keys().stop == len(screen.maps.tokens), "end shows the last key tokens"
        await pilot.press("home")
        await pilot.pause()
        assert heatmap._visible_keys().start == 0
        await wait_until(pilot, lambda: {"left", "right", "ctrl+pageup", "ctrl+pagedown"} <= footer_keys(screen),
                         what="the heatmap's scroll keys in the footer")
        await pilot.press("v")  # the text view: left/right move the query token
        await pilot.pause()
        before = screen.query_index
        await pilot.press("left")
        assert screen.query_index == before - 1

    run(app, size, scenario)


# -- 7: max new tokens bounded by the context and the conversation; left-out messages shown until they fit -----


@pytest.mark.parametrize("size", SIZES)
def test_max_new_tokens_is_bounded_and_left_out_messages_stay_shown(make_app, size):
    from textual.widgets import Input, Label

    from chattui.screens.chat import ChatScreen
    from chattui.screens.settings import SettingsScreen

    backend = FakeBackend(["x" * 20], context_length=512, drop_to_fit=True)
    app = make_app(backend)

    async def scenario(pilot):
        chat = app.chat
        await send(pilot, "a" * 200)
        await pilot.press("ctrl+s")
        dialog = await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen) and app.screen,
                                  what="the settings dialog")
        dialog.query_one("#max_new_tokens", Input).value = "511"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen is dialog, "511 on a 512-token context is refused"
        assert "at most 256" in dialog.errors["max_new_tokens"]
        dialog.query_one("#max_new_tokens", Input).value = "250"
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen), what="the chat")
        dropped = chat.query_one("#status-dropped", Label)
        assert not dropped.display
        await send(pilot, "b" * 200)  # 200 + 20 + 200 + 250 > 512: the first exchange is left out
        assert backend.requests[-1][0][0]["content"] == "b" * 200
        assert dropped.display and "2 oldest message(s) left out" in str(dropped.render())
        assert "left out of the prompt" in chat.boxes()[-1].meta
        await pilot.pause(1.0)
        assert dropped.display, "the indicator stays, unlike a notice"
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert not dropped.display
        await chat.open_conversation(chat.store.conversations()[-1].id)
        await pilot.pause()
        assert dropped.display, "reopening the conversation shows it again"

    run(app, size, scenario)


# -- 3: raw mode continues exactly what was typed; switching modes keeps the chat well formed -----------------


@pytest.mark.parametrize("size", SIZES)
def test_raw_mode_continues_only_the_typed_text_and_chat_mode_leaves_raw_turns_out(make_app, size):
    backend = FakeBackend(lambda n, prompt: [f" reply{n}"])
    app = make_app(backend)

    async def scenario(pilot):
        chat = app.chat
        await send(pilot, "hello")
        await pilot.press("ctrl+g")
        await wait_until(pilot, lambda: chat.mode == "generate", what="raw mode")
        await send(pilot, "Once upon a time")
        assert backend.requests[-1][0] == "Once upon a time", "only the typed text, not the chat before it"
        await send(pilot, "")  # Enter with no text continues it
        assert backend.requests[-1][0] == "Once upon a time reply2"
        assert "no earlier messages" in chat.prompt.placeholder
        await pilot.press("ctrl+g")
        await wait_until(pilot, lambda: chat.mode == "chat", what="chat mode")
        headers = [box._header for box in chat.boxes()]
        assert headers[2].startswith("Prompt") and "not in chat prompts" in headers[2]
        await send(pilot, "hi")
        assert backend.requests[-1][0] == [
            {"role": "user", "content": "hello"}, {"role": "assistant", "content": " reply1"},
            {"role": "user", "content": "hi"},
        ], "raw prompts and completions are not chat turns"
        assert [m.mode for m in chat.messages] == ["chat", "chat", "generate", "generate", "generate", "chat", "chat"]

    run(app, size, scenario)


# -- 8: the reply that was streaming is on disk, at most a second behind, and marked interrupted -------------


@pytest.mark.parametrize("size", SIZES)
def test_a_crash_mid_reply_keeps_the_partial_reply_marked_interrupted(make_app, tmp_path, size):
    import sqlite3

    from chattui.widgets.message_box import MessageBox

    backend = FakeBackend(lambda n, prompt: ["ok"] if n == 1 else [f"w{i} " for i in range(400)], delay=0.01)
    app = make_app(backend)
    snapshot = tmp_path / "data" / "after-kill.db"

    async def scenario(pilot):
        chat = app.chat
        await send(pilot, "first")
        chat.prompt.load_text("tell me more")
        await pilot.press("enter")
        await wait_until(pilot, lambda: chat.reply is not None and len(chat.reply.box.text) > 60, what="streaming")
        await pilot.pause(1.6)
        shown = chat.reply.box.text
        # what a kill -9 leaves: every committed transaction (a consistent copy of the database now)
        source = sqlite3.connect(tmp_path / "data" / "chattui.db")
        with sqlite3.connect(snapshot) as copy:
            source.backup(copy)
        source.close()
        saved = Store(snapshot).messages(chat.conversation.id)[-1]
        assert saved.role == "assistant" and saved.finish_reason == "streaming"
        assert saved.content and shown.startswith(saved.content)
        behind = len(shown.split()) - len(saved.content.split())
        assert behind < 150, f"{behind} chunks behind: at most about a second (chunks come every ~10 ms)"
        chat.reply.cancel.set()

    run(app, size, scenario)

    again = make_app(db="after-kill.db")

    async def reopened(pilot):
        chat = again.chat
        messages = chat.messages
        assert [m.content for m in messages[:3]] == ["first", "ok", "tell me more"], "earlier messages are kept"
        assert messages[-1].finish_reason == "interrupted" and messages[-1].content
        box = chat.boxes()[-1]
        assert isinstance(box, MessageBox) and "interrupted" in box.meta

    run(again, size, reopened)


# -- 9: the adapter in use is shown, stored and restored; adapters are in the picker; "Chat with this" -------


def make_adapter_job(root: Path, job_id: str, base: Path) -> Path:
    folder = write_job(root, job_id, base, {"type": "status", "status": "done", "adapter": str(root / job_id / "adapter"),
                                            "base_model": str(base)})
    adapter = folder / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 4}))
    return adapter


@pytest.mark.parametrize("size", SIZES)
def test_the_adapter_is_listed_shown_on_replies_stored_and_restored(make_app, tmp_path, size):
    from textual.widgets import OptionList

    from chattui.screens.models import ModelPickerScreen

    base = tmp_path / "fake-model"
    (base / "config.json").write_text((Path(__file__).parents[2] / "models/default/config.json").read_text())
    (base / "model.safetensors").touch()  # the picker lists folders that look loadable; the fake loads anything
    adapter = make_adapter_job(tmp_path / "jobs", "job-7", base)
    backend = FakeBackend(["ok"])
    app = make_app(backend)

    async def scenario(pilot):
        chat = app.chat
        await pilot.press("ctrl+o")
        picker = await wait_until(pilot, lambda: isinstance(app.screen, ModelPickerScreen) and app.screen.entries
                                  and app.screen, what="the picker's list")
        names = [e.name for e in picker.entries]
        assert "fake-model + job-7" in names, names
        index = names.index("fake-model + job-7")
        assert picker.entries[index].source == "adapter"
        picker.query_one("#model-list", OptionList).highlighted = index
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.model.adapter == str(adapter), what="base + adapter")
        assert backend.loads[-1] == str(base)
        assert "fake-model + job-7" in chat.status.model_text
        await send(pilot, "hi")
        assert chat.boxes()[-1]._header == "fake-model + job-7"
        assert chat.messages[-1].adapter == str(adapter) and chat.conversation.adapter == str(adapter)

    run(app, size, scenario)

    again = make_app(FakeBackend(["ok"]))

    async def reopened(pilot):
        assert again.model.adapter == str(adapter), "the conversation reopens on base + adapter"
        assert again.chat.boxes()[-1]._header == "fake-model + job-7"

    run(again, size, reopened)

    other = make_adapter_job(tmp_path / "jobs", "job-9", base)
    given = make_app(FakeBackend(["ok"]), adapter=other)  # chattui --adapter DIR

    async def on_the_given_adapter(pilot):
        assert given.model.adapter == str(other)

    run(given, size, on_the_given_adapter)


@pytest.mark.parametrize("size", SIZES)
def test_chat_with_this_opens_a_new_conversation(make_app, tmp_path, size):
    adapter = make_adapter_job(tmp_path / "jobs", "job-8", tmp_path / "fake-model")
    app = make_app()

    async def scenario(pilot):
        chat = app.chat
        await send(pilot, "before")
        earlier = chat.conversation.id
        screen = await open_finetune(pilot)
        screen.show_job("job-8")
        await pilot.pause()
        screen.query_one("#job-chat", Button).press()
        await wait_until(pilot, lambda: app.screen is chat and app.model.adapter == str(adapter), what="the chat")
        assert chat.conversation is None and not chat.messages, "a new conversation"
        await send(pilot, "after")
        assert chat.conversation.id != earlier and chat.conversation.adapter == str(adapter)
        assert [m.content for m in app.store.messages(earlier)][0] == "before"

    run(app, size, scenario)


def test_chat_with_this_opens_a_new_conversation_when_there_is_none_yet(make_app, tmp_path):
    adapter = make_adapter_job(tmp_path / "jobs", "job-8", tmp_path / "fake-model")
    app = make_app()

    async def scenario(pilot):
        chat = app.chat
        assert chat.conversation is None and app.store.conversations() == []
        chat.query_one("#conversations").focus()  # a new chat focuses the message input, wherever focus was
        screen = await open_finetune(pilot)
        screen.show_job("job-8")
        await pilot.pause()
        screen.query_one("#job-chat", Button).press()
        await wait_until(pilot, lambda: app.screen is chat and app.model.adapter == str(adapter), what="the chat")
        assert chat.conversation is None and not chat.messages and app.focused is chat.prompt
        await send(pilot, "hello")
        [conversation] = app.store.conversations()
        assert (conversation.model, conversation.adapter) == (str(tmp_path / "fake-model"), str(adapter))
        assert [m.content for m in app.store.messages(conversation.id)][0] == "hello"

    run(app, SIZES[1], scenario)


# -- 4: the first load says that the CPU kernels compile -------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_first_bfloat16_load_says_the_cpu_kernels_compile(make_app, checkpoint_factory, monkeypatch, tmp_path, size):
    import engine.kernels as kernels
    from chattui.backend import EngineBackend

    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path / "kernels"))  # never built on this "machine"
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))  # the build fails at once: PyTorch's kernels run
    monkeypatch.setattr(kernels, "cpu_has_avx512_bf16", lambda: True)
    kernels.bf16_decode_ops.cache_clear()
    app = make_app(EngineBackend(), model_dir=checkpoint_factory("llama"), device="cpu", dtype="bfloat16")
    notes: list[str] = []

    def hook(message):
        if isinstance(message, ChattuiApp.ModelLoadProgress) and message.note:
            notes.append(message.note)

    async def main():
        async with app.run_test(size=size, message_hook=hook) as pilot:
            await wait_until(pilot, lambda: app.model is not None, timeout=30, what="the model to load")
            status = app.chat.status
            status.show_loading("llama", 0, 0, notes[0])  # what the app's handler did with it
            assert status.loading_text == "loading llama: compiling CPU kernels, once (about 10 s)"
            assert status.query_one("#status-loading").display

    try:
        asyncio.run(main())
    finally:
        kernels.bf16_decode_ops.cache_clear()
    assert notes == [kernels.BUILD_NOTE]


# -- 10: the smaller inaccuracies ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_a_failed_job_has_a_still_progress_bar(make_app, tmp_path, size):
    from textual.widgets import ProgressBar

    write_job(tmp_path / "jobs", "j1", tmp_path / "fake-model", {"type": "status", "status": "running"},
              {"type": "status", "status": "failed", "reason": "data.jsonl:3: malformed JSON"})
    app = make_app()

    async def scenario(pilot):
        screen = await open_finetune(pilot)
        screen.show_job("j1")
        await pilot.pause()
        bar = screen.query_one("#job-progress", ProgressBar)
        assert bar.total is not None, "total None is the indeterminate (animated) bar"
        assert "malformed JSON" in str(screen.query_one("#job-status").render())

    run(app, size, scenario)


@pytest.mark.parametrize("size", SIZES)
def test_compare_renders_markdown_like_the_chat(make_app, tmp_path, size):
    from textual.widgets import Markdown

    from chattui.screens.finetune.compare import CompareScreen

    make_adapter_job(tmp_path / "jobs", "j1", tmp_path / "fake-model")
    app = make_app(FakeBackend(["Some ", "**bold**", " text"]))

    async def scenario(pilot):
        screen = await open_finetune(pilot)
        screen.show_job("j1")
        await pilot.pause()
        screen.query_one("#job-compare", Button).press()
        compare = await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen, what="Compare")
        await pilot.pause()
        compare.query_one("#cmp-prompt", Input).value = "hi"
        compare.query_one("#cmp-run", Button).press()
        await wait_until(pilot, lambda: not compare.running and compare.texts["tuned"], what="both replies")
        await pilot.pause()
        for pane in ("base", "tuned"):
            shown = compare.query_one(f"#cmp-{pane}", Markdown)
            assert shown.source == "Some **bold** text"
            rendered = " ".join(str(block.render()) for block in shown.query("MarkdownBlock"))
            assert "bold" in rendered and "**" not in rendered

    run(app, size, scenario)


async def open_compare(pilot, screen: FinetuneScreen, job_id: str):
    from chattui.screens.finetune.compare import CompareScreen

    screen.show_job(job_id)
    await pilot.pause()
    screen.query_one("#job-compare", Button).press()
    compare = await wait_until(pilot, lambda: isinstance(pilot.app.screen, CompareScreen) and pilot.app.screen,
                               what="Compare")
    await pilot.pause()
    return compare


def test_compare_streams_each_chunk_into_its_pane_without_rendering_the_earlier_blocks_again(make_app, tmp_path):
    from textual.widgets import Markdown
    from textual.widgets.markdown import MarkdownBlock

    make_adapter_job(tmp_path / "jobs", "j1", tmp_path / "fake-model")
    chunks = ["# Heading\n\n", "First ", "paragraph.\n\n", "Second paragraph."]
    backend = FakeBackend(chunks, stepped=True)
    app = make_app(backend)

    def shown(markdown: Markdown) -> str:
        return " ".join(str(block.render()) for block in markdown.query(MarkdownBlock))

    async def scenario(pilot):
        compare = await open_compare(pilot, await open_finetune(pilot), "j1")
        base, tuned = compare.query_one("#cmp-base", Markdown), compare.query_one("#cmp-tuned", Markdown)
        compare.query_one("#cmp-prompt", Input).value = "hi"
        compare.query_one("#cmp-run", Button).press()
        backend.steps.release()
        await wait_until(pilot, lambda: "Heading" in shown(base), what="the first chunk in the base pane")
        assert compare.running and len(backend.requests) == 1, "shown while the base reply is still being written"
        backend.steps.release(2)
        await wait_until(pilot, lambda: "First paragraph." in shown(base), what="the next chunks in the base pane")
        earlier = list(base.children)  # the heading and the first paragraph
        backend.steps.release()
        await wait_until(pilot, lambda: "Second paragraph." in shown(base), what="the base reply's last chunk")
        assert all(a is b for a, b in zip(earlier, base.children, strict=False)) and len(base.children) == 3, (
            "a chunk re-parses from the last block on; the blocks before it are not rendered again")
        assert compare.texts["tuned"] == "" and compare.running
        backend.steps.release(2)
        await wait_until(pilot, lambda: "First" in shown(tuned), what="the tuned reply streaming")
        assert compare.running and "Second" not in shown(tuned)
        backend.steps.release(2)
        await wait_until(pilot, lambda: not compare.running, what="both replies")
        for pane in (base, tuned):  # rendered in full once at the end
            assert pane.source == "".join(chunks)
            assert "Heading" in shown(pane) and "Second paragraph." in shown(pane) and "#" not in shown(pane)

    run(app, SIZES[0], scenario)


def test_compare_says_when_the_model_with_the_adapter_does_not_load(make_app, tmp_path):
    from textual.widgets import Static

    broken = tmp_path / "broken-model"  # the fake backend fails to load it
    broken.mkdir()
    make_adapter_job(tmp_path / "jobs", "j1", broken)
    backend = FakeBackend()
    app = make_app(backend)

    async def scenario(pilot):
        compare = await open_compare(pilot, await open_finetune(pilot), "j1")
        compare.query_one("#cmp-prompt", Input).value = "hi"
        compare.query_one("#cmp-run", Button).press()
        status = compare.query_one("#cmp-status", Static)
        await wait_until(pilot, lambda: "did not load" in str(status.render()), what="Compare to give up")
        assert not compare.running
        assert backend.loads[-1] == str(broken) and backend.requests == [], "nothing generated on the old model"
        assert app.model.path == str(tmp_path / "fake-model"), "the model loaded before stays"

    run(app, SIZES[0], scenario)


@pytest.mark.parametrize("size", SIZES)
def test_preview_shows_the_first_records_and_a_rejected_file_blocks_start(make_app, checkpoint_factory, tmp_path,
                                                                           size):
    from textual.widgets import Static

    model = checkpoint_factory("qwen2")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                            for i in range(5)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "cut off\n')
    app = make_app()

    async def scenario(pilot):
        screen = await open_finetune(pilot)
        screen.query_one("#ft-model", Input).value = str(model)
        screen.query_one("#ft-data", Input).value = str(bad)
        screen.query_one("#ft-preview-button", Button).press()
        start = screen.query_one("#ft-start", Button)
        await wait_until(pilot, lambda: start.disabled, timeout=30, what="Start disabled")
        preview = str(screen.query_one("#ft-preview", Static).render())
        assert "bad.jsonl:2: malformed JSON at column 10" in preview and "Start waits" in preview
        screen.query_one("#ft-data", Input).value = str(good)
        await wait_until(pilot, lambda: not start.disabled, what="Start enabled for another file")
        screen.query_one("#ft-preview-button", Button).press()
        form = screen.query_one(FinetuneForm)
        await wait_until(pilot, lambda: form.preview is not None, timeout=30, what="the preview")
        await pilot.pause()
        preview = str(screen.query_one("#ft-preview", Static).render())
        for i in range(3):
            assert f"user: Question {i}?" in preview and f"assistant: Answer {i}." in preview
        assert "Question 3?" not in preview
        assert not start.disabled
        # 2: the automatic choices are shown: 5 records in batches of 8 repeat for 100 steps at a high rate
        assert "Plan: learning rate 0.004 (auto: lora on" in preview, preview
        assert "100 steps = 100 epochs × 1 (auto:" in preview and "none held out" in preview

    run(app, size, scenario)


@pytest.mark.parametrize("size", SIZES)
def test_notices_do_not_stack_and_the_footer_shows_every_chat_key(make_app, size):
    app = make_app()

    async def scenario(pilot):
        for i in range(6):
            app.notify(f"notice {i}")
        await pilot.pause()
        assert [n.message for n in app._notifications] == ["notice 4", "notice 5"]
        await wait_until(pilot, lambda: {"ctrl+g", "ctrl+b", "f3", "ctrl+l"} <= footer_keys(app.chat),
                         what="the chat keys in the footer")

    run(app, size, scenario)


def test_markdown_export_keeps_its_structure_whatever_the_messages_hold(make_app, tmp_path):
    from chattui.export import to_markdown

    store = Store(tmp_path / "export.db")
    conversation = store.update_conversation(store.create_conversation().id, title="Mine")
    store.add_message(conversation.id, "user", "# Heading\nSetext title\n===\nand a fence:\n```python\n# comment")
    store.add_message(conversation.id, "assistant", "## Not a section\n```\n# kept in code\n```\nend")
    document = to_markdown(store.conversation(conversation.id), store.messages(conversation.id))
    headings, in_code = [], False
    for line in document.splitlines():  # the document's structure, as a CommonMark reader sees it
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            headings.append(line)
    assert headings == ["# Mine", "## User", "## Assistant"]
    assert not in_code, "every code block is closed"
    assert "\\# Heading" in document and "# comment" in document and "# kept in code" in document


@pytest.mark.parametrize("size", SIZES)
def test_live_attention_does_not_count_the_end_token_as_a_reply_token(make_app, size):
    from ui_fakes import FakeAttentionBackend

    from chattui.screens.attention import AttentionScreen

    app = make_app(FakeAttentionBackend(["a ", "b ", "c "], finish_reason="eos"))

    async def scenario(pilot):
        chat = app.chat
        await pilot.press("f3")
        await send(pilot, "hello there")
        live = chat.live_attention
        assert live.count == 4 and live.reply_tokens == 3 and live.chose_end
        await pilot.press("f2")
        screen = await wait_until(pilot, lambda: isinstance(app.screen, AttentionScreen) and app.screen,
                                  what="the attention screen")
        await pilot.press("v", "v", "v")  # heatmap -> text -> heads -> live
        body = screen.query_one("#live-body")
        await wait_until(pilot, lambda: "end token, after the reply's 3 tokens" in str(body.render()),
                         what="the live view")
        assert "Token 4 " not in str(body.render())

    run(app, size, scenario)


# -- 2: the job view shows what the model answers, and says when the loss had not settled ----------------------


@pytest.mark.parametrize("size", SIZES)
def test_job_view_shows_sample_replies_and_an_unsettled_loss(make_app, tmp_path, size):
    from textual.widgets import Static

    falling = [{"type": "progress", "step": s, "total_steps": 40, "loss": 3.0 * 0.95 ** s} for s in range(1, 41)]
    samples = {"type": "samples", "step": 40, "held_out": True, "samples": [
        {"prompt": "What is the capital of Kesh?", "reply": "The capital of Kesh is Dov.",
         "expected": "The capital of Kesh is Dovar."}]}
    write_job(tmp_path / "jobs", "falling", tmp_path / "fake-model", {"type": "status", "status": "running"},
              *falling, samples, {"type": "status", "status": "done"})
    flat = [{"type": "progress", "step": s, "total_steps": 40, "loss": 1.0 + 0.01 * (s % 2)} for s in range(1, 41)]
    write_job(tmp_path / "jobs", "settled", tmp_path / "fake-model", {"type": "status", "status": "running"},
              *flat, {"type": "status", "status": "done"})
    app = make_app()

    async def scenario(pilot):
        screen = await open_finetune(pilot)
        screen.show_job("falling")
        await pilot.pause()
        status = str(screen.query_one("#job-status", Static).render())
        assert "still falling when the run ended" in status
        shown = screen.query_one("#job-samples", Static)
        text = str(shown.render())
        assert "At step 40, greedy replies to held-out prompts" in text
        assert "What is the capital of Kesh?" in text and "The capital of Kesh is Dov." in text
        assert "expected: The capital of Kesh is Dovar." in text
        view = screen.query_one("#ft-job")
        shown.scroll_visible(animate=False)
        await pilot.pause()
        assert fully_visible(shown, view)
        screen.show_job("settled")
        await pilot.pause()
        assert "still falling" not in str(screen.query_one("#job-status", Static).render())
        assert not screen.query_one("#job-samples").display

    run(app, size, scenario)


# -- the footer at 80 columns: f1 comes first and lists every key ------------------------------------------


def visible_footer_keys(screen, width: int) -> list[str]:
    from textual.widgets._footer import FooterKey

    return [key.key for key in screen.query(FooterKey) if key.region.width and key.region.right <= width]


@pytest.mark.parametrize("size", SIZES)
def test_f1_is_in_the_footer_and_opens_every_key_of_the_screen(make_app, size):
    import io

    from rich.console import Console
    from textual.widgets import HelpPanel
    from textual.widgets._key_panel import BindingsTable

    app = make_app()

    async def scenario(pilot):
        chat = app.chat
        await wait_until(pilot, lambda: visible_footer_keys(chat, size[0]), what="the footer")
        shown = visible_footer_keys(chat, size[0])
        assert shown[0] == "f1"
        if size[0] >= 160:  # a wide terminal shows every key of the chat screen and the app
            assert {"escape", "ctrl+r", "ctrl+n", "ctrl+s", "ctrl+l", "ctrl+g", "ctrl+b", "f2", "f3", "ctrl+o",
                    "f4", "ctrl+q"} <= set(shown)
        await pilot.press("f1")
        await wait_until(pilot, lambda: chat.query(HelpPanel), what="the keys panel")
        console = Console(width=60, record=True, file=io.StringIO())
        console.print(chat.query_one(BindingsTable).render_bindings_table())
        listed = console.export_text()
        for description in ("Sidebar", "Attention", "Live attn", "Model", "Fine-tune", "Quit", "Raw/chat", "Stop"):
            assert description in listed
        await pilot.press("f1")
        await wait_until(pilot, lambda: not chat.query(HelpPanel), what="the keys panel to close")

    run(app, size, scenario)
