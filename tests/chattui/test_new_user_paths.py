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
from chattui.config import Config
from chattui.screens.finetune import FinetuneScreen
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
            bundled_dir=tmp_path / "no-bundled", hf_cache=tmp_path / "hf-cache", export_dir=tmp_path / "exports",
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
    (folder / jobs.PROGRESS).write_text("".join(lines))
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
        keys = footer_keys(screen)
        assert {"left", "right"} <= keys or {"←", "→"} <= keys, keys
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
