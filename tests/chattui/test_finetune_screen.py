"""The fine-tune screen driven through Pilot: form validation, the data preview of a known file, a real (tiny)
LoRA job started from the form and watched to done with its loss chart, Compare and "Chat with this", a
cancel and resume, and the job list surviving an app restart (store and job folders)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from textual.widgets import Button, Input, OptionList, Select, Static
from ui_fakes import FakeBackend, wait_until

from chattui import jobs
from chattui.app import ChattuiApp
from chattui.backend import EngineBackend
from chattui.catalog import Stores
from chattui.config import Config
from chattui.screens.chat import ChatScreen
from chattui.screens.finetune import FinetuneScreen
from chattui.screens.finetune.compare import CompareScreen
from chattui.screens.finetune.form import FinetuneForm, validate_form
from chattui.store import Store
from engine.params import GenerationSettings, SamplingParams
from chattui.widgets.loss_chart import LossChart, line_chart

SIZE = (140, 50)
JOB_TIMEOUT = 45.0


@pytest.fixture
def make_app(tmp_path):
    model = tmp_path / "fake-model"
    model.mkdir(exist_ok=True)

    def make(backend=None, *, db: str = "chattui.db") -> ChattuiApp:
        return ChattuiApp(
            backend or FakeBackend(), Store(tmp_path / "data" / db), Config(path=tmp_path / "config.toml"),
            model_dir=model, bundled_dir=tmp_path / "no-bundled", stores=Stores.at(tmp_path / "hf-cache"),
            export_dir=tmp_path / "exports", jobs_dir=tmp_path / "jobs",
        )

    yield make
    for job in jobs.list_jobs(tmp_path / "jobs"):  # a failed test leaves no training process behind
        if job.alive and jobs.cancel_job(job):
            jobs.wait(job, timeout=30)


@pytest.fixture
def data_file(tmp_path) -> Path:
    """24 chat records; the 4 long ones exceed 64 tokens."""
    path = tmp_path / "train.jsonl"
    rows = []
    for i in range(24):
        answer = f"The answer is {i}." if i % 6 else "long " * 80
        rows.append({"messages": [{"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(app: ChattuiApp, scenario) -> None:
    async def main():
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.model is not None, what="the fake model to load")
            await scenario(pilot)

    asyncio.run(main())


async def open_screen(pilot) -> FinetuneScreen:
    await pilot.press("f4")
    return await wait_until(pilot, lambda: isinstance(pilot.app.screen, FinetuneScreen) and pilot.app.screen,
                            what="the fine-tune screen")


def fill(screen: FinetuneScreen, **values: str) -> None:
    for key, value in values.items():
        widget = screen.query_one(f"#ft-{key}")
        widget.value = value


# -- the form ----------------------------------------------------------------------------------------------


def test_form_validation_lists_each_bad_field_and_starts_nothing(make_app, tmp_path):
    app = make_app()

    async def scenario(pilot):
        screen = await open_screen(pilot)
        assert screen.query_one("#ft-batch_size", Input).value == "8", "sensible defaults are filled in"
        assert screen.query_one("#ft-epochs", Input).value == "", "blank: the job chooses for the data size"
        fill(screen, model=str(tmp_path), data=str(tmp_path / "missing.jsonl"), epochs="0", lr="fast",
             lora_dropout="1.5", batch_size="2.5")
        screen.query_one("#ft-start", Button).press()
        errors = screen.query_one("#ft-errors", Static)
        await wait_until(pilot, lambda: errors.display, what="the error messages")
        text = str(errors.render())
        for expected in ("has no config.json", "missing.jsonl not found", "Epochs (blank: auto): must be >= 1",
                         "'fast' is not a number", "LoRA dropout: must be below 1", "'2.5' is not a whole number"):
            assert expected in text
        assert screen.query_one("#ft-epochs", Input).has_class("-invalid")
        assert not screen.query_one("#ft-seed", Input).has_class("-invalid")
        assert not (tmp_path / "jobs").exists() and app.store.jobs() == []

    run(app, scenario)


def test_choose_fills_the_base_model_from_the_picker_and_new_job_returns_to_the_form(make_app, tmp_path):
    from chattui.screens.models import ModelPickerScreen

    app = make_app()
    picked = tmp_path / "picked-model"

    async def scenario(pilot):
        screen = await open_screen(pilot)
        assert screen.query_one("#ft-model", Input).value == app.model.path, "the loaded model to start with"
        screen.query_one("#ft-choose", Button).press()
        picker = await wait_until(pilot, lambda: isinstance(app.screen, ModelPickerScreen) and app.screen,
                                  what="the model picker")
        assert picker.trained is None, "a base model to train on: fine-tuned adapters are not offered"
        picker.dismiss(str(picked))
        await wait_until(pilot, lambda: app.screen is screen, what="the fine-tune screen again")
        await wait_until(pilot, lambda: screen.query_one("#ft-model", Input).value == str(picked),
                         what="the picked model in the form")
        screen.query_one("#ft-main").current = "ft-job"
        screen.query_one("#ft-new", Button).press()
        await wait_until(pilot, lambda: screen.query_one("#ft-main").current == "ft-form", what="the form")
        await wait_until(pilot, lambda: app.focused is screen.query_one("#ft-model", Input), what="focus on the model")

    run(app, scenario)


def test_validate_form_defaults_and_full_method_ignore_lora_fields(tmp_path, data_file):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    values = {"model": str(tmp_path / "m"), "data": str(data_file), "method": "full", "lora_rank": "x",
              "lr": "", "val_fraction": ""}
    config, errors = validate_form(values)
    assert errors == {}
    assert config["method"] == "full" and "lora_rank" not in config and "lr" not in config
    assert "epochs" not in config, "blank: engine.finetune.auto_epochs"
    assert (config["batch_size"], config["max_steps"], config["seed"]) == (8, 0, 0)


def test_a_gguf_base_is_accepted_for_lora_and_refused_for_a_full_fine_tune(tmp_path, checkpoint_factory, data_file):
    from gguf_files import Q, write_gguf

    path, _ = write_gguf(checkpoint_factory("qwen2"), tmp_path / "base.gguf", "qwen2", Q.F32)
    config, errors = validate_form({"model": str(path), "data": str(data_file), "method": "lora"})
    assert errors == {} and config["model"] == str(path)
    _, errors = validate_form({"model": str(path), "data": str(data_file), "method": "full"})
    assert errors == {"model": "Base model: a GGUF base trains a LoRA adapter only (choose LoRA)"}
    (tmp_path / "notes.txt").write_text("not a model")
    _, errors = validate_form({"model": str(tmp_path / "notes.txt"), "data": str(data_file), "method": "lora"})
    assert "has no config.json and is not a .gguf file" in errors["model"]


def test_the_data_preview_reads_a_gguf_base(tmp_path, checkpoint_factory, data_file):
    from gguf_files import Q, write_gguf

    from chattui.backend import inspect_data

    path, _ = write_gguf(checkpoint_factory("qwen2"), tmp_path / "base.gguf", "qwen2", Q.F32)
    report = inspect_data(str(path), [str(data_file)])
    assert report["train_examples"] > 0 and report["first_records"]


def test_data_preview_shows_records_format_truncation_and_histogram(make_app, checkpoint_factory, data_file):
    app = make_app()
    model = checkpoint_factory("qwen2")

    async def scenario(pilot):
        screen = await open_screen(pilot)
        fill(screen, model=str(model), data=str(data_file), max_seq_len="64")
        screen.query_one("#ft-preview-button", Button).press()
        form = screen.query_one(FinetuneForm)
        await wait_until(pilot, lambda: form.preview is not None, timeout=30, what="the data preview")
        report = form.preview
        assert report["files"][0]["records"] == 24 and report["files"][0]["format"] == "chat"
        assert report["truncated"] == 4 and report["max_seq_len"] == 64
        assert sum(count for _, _, count in report["length_histogram"]) == 24
        text = str(screen.query_one("#ft-preview", Static).render())
        assert "24 records · format chat" in text and "4 will be truncated to 64 tokens" in text
        assert "█" in text, "the token-length histogram is drawn"

    run(app, scenario)


def test_loss_chart_draws_both_series_with_axes():
    text = line_chart([("train", "cyan", [(1, 3.0), (2, 2.0), (3, 1.0)]), ("val", "magenta", [(3, 1.5)])], 40, 8)
    plain = text.plain
    assert "3 ┤" in plain and "1 ┤" in plain and "└1" in plain
    assert "train 1" in plain and "val 1.5" in plain
    assert any(0x2800 < ord(c) <= 0x28FF for c in plain)


# -- a real job ----------------------------------------------------------------------------------------------


def test_job_from_the_form_runs_to_done_then_compare_chat_and_restart(make_app, checkpoint_factory, data_file,
                                                                        monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = checkpoint_factory("qwen2")
    backend = FakeBackend(lambda n, prompt: [f"reply {n}"])
    app = make_app(backend)
    seen: dict = {}

    async def scenario(pilot):
        screen = await open_screen(pilot)
        fill(screen, model=str(model), data=str(data_file), max_steps="5", batch_size="2", lora_rank="4",
             val_fraction="0.25", max_seq_len="64")
        screen.query_one("#ft-device", Select).value = "cpu"
        screen.query_one("#ft-precision", Select).value = "fp32"
        screen.query_one("#ft-start", Button).press()
        job = await wait_until(pilot, lambda: screen.job, what="the job to start")
        assert app.store.job(job.id).status in ("queued", "running")
        await wait_until(pilot, lambda: screen.job.finished, timeout=JOB_TIMEOUT, what="the job to finish")
        job = screen.job
        assert job.status == "done", job.reason
        await pilot.pause(0.6)  # one more poll
        chart = screen.query_one("#job-chart", LossChart)
        assert [s for s, _ in chart.train] == [1, 2, 3, 4, 5] and chart.val
        assert "5/5" in str(screen.query_one("#job-stats", Static).render())
        assert app.store.job(job.id).status == "done"
        assert "✔" in str(screen.query_one("#ft-job-list", OptionList).get_option(job.id).prompt)
        adapter = str(job.adapter_dir)
        seen["id"], seen["adapter"] = job.id, adapter

        # Compare: loads base + adapter, then the same prompt and seed with the adapter off and on
        screen.query_one("#job-compare", Button).press()
        compare = await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.is_mounted
                                   and app.screen.query("#cmp-prompt") and app.screen, what="the compare dialog")
        compare.query_one("#cmp-prompt", Input).value = "Question 1?"
        compare.query_one("#cmp-seed", Input).value = "7"
        compare.query_one("#cmp-run", Button).press()
        await wait_until(pilot, lambda: not compare.running and compare.texts["tuned"], timeout=10,
                         what="both replies")
        assert backend.adapters[-1] == adapter
        base, tuned = backend.requests[-2][1], backend.requests[-1][1]
        assert backend.used_adapter[-2:] == [False, True]
        assert base.sampling.seed == tuned.sampling.seed == 7
        assert compare.texts["base"] and compare.texts["tuned"]
        await pilot.press("escape")

        # Chat with this: back on the chat screen with base + adapter, unmerged
        await wait_until(pilot, lambda: app.screen is screen, what="the job view")
        app.load_model(str(app.initial_model))  # the plain model again, so "Chat with this" has to load
        await wait_until(pilot, lambda: app.loading is None and app.model.adapter is None, what="the plain model")
        screen.query_one("#job-chat", Button).press()
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen), what="the chat screen")
        await wait_until(pilot, lambda: app.loading is None and app.model.adapter == adapter,
                         what="base + adapter to load")
        assert Path(app.model.path) == model and backend.adapters[-1] == adapter

    run(app, scenario)

    # the job is listed again after a restart: from the store, and from its folder alone with a new store
    for db in ("chattui.db", "fresh.db"):
        again = make_app(db=db)

        async def reopened(pilot):
            screen = await open_screen(pilot)
            listed = screen.query_one("#ft-job-list", OptionList)
            assert listed.option_count == 1 and listed.get_option_at_index(0).id == seen["id"]
            assert again.store.job(seen["id"]).status == "done"
            screen.show_job(seen["id"])
            assert len(screen.query_one("#job-chart", LossChart).train) == 5

        run(again, reopened)

    # the real backend: base + adapter unmerged; with the adapter switched off it answers as the base model
    prompt = [{"role": "user", "content": "Question 1?"}]
    settings = GenerationSettings(SamplingParams(temperature=0.0, top_k=0, top_p=1.0, seed=0), max_new_tokens=8)

    def reply(backend, **options) -> str:
        pieces = backend.stream(prompt, settings, threading.Event(), **options)
        text = "".join(pieces)
        assert text == pieces.result.text
        return text

    tuned = EngineBackend()
    info = tuned.load(str(model), "cpu", "float32", adapter=seen["adapter"])
    assert info.adapter == seen["adapter"] and info.name == f"{model.name} + {seen['id']}", "named by its job"
    base = EngineBackend()
    base.load(str(model), "cpu", "float32")
    assert reply(tuned, use_adapter=False) == reply(base)
    reply(tuned)  # the adapter is back on after a base reply
    assert tuned._engine.adapter_dir is not None


def test_cancel_resume_and_reattach_after_closing_the_app(make_app, checkpoint_factory, data_file, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = checkpoint_factory("qwen2")
    app = make_app()
    seen: dict = {}

    async def scenario(pilot):
        screen = await open_screen(pilot)
        fill(screen, model=str(model), data=str(data_file), max_steps="5000", batch_size="2", lora_rank="4",
             max_seq_len="32")
        screen.query_one("#ft-device", Select).value = "cpu"
        screen.query_one("#ft-precision", Select).value = "fp32"
        screen.query_one("#ft-start", Button).press()
        await wait_until(pilot, lambda: screen.job and screen.job.step >= 2, timeout=JOB_TIMEOUT,
                         what="a few steps")
        cancel = screen.query_one("#job-cancel", Button)
        assert not cancel.disabled
        cancel.press()
        await wait_until(pilot, lambda: screen.job.finished, timeout=JOB_TIMEOUT, what="the job to stop")
        job = screen.job
        assert job.status == "cancelled" and app.store.job(job.id).status == "cancelled"
        stopped = job.step
        await pilot.pause(0.6)
        resume = screen.query_one("#job-resume", Button)
        assert not resume.disabled and screen.query_one("#job-cancel", Button).disabled
        resume.press()
        await wait_until(pilot, lambda: screen.job is not job and screen.job.step > stopped, timeout=JOB_TIMEOUT,
                         what="the resumed job to train")
        seen["id"], seen["step"] = job.id, screen.job.step

    run(app, scenario)  # closing the app leaves the job running

    again = make_app()

    async def reattached(pilot):
        screen = await open_screen(pilot)
        screen.show_job(seen["id"])
        job = screen.job
        assert job.status == "running" and job.alive, "the job outlived the app"
        await wait_until(pilot, lambda: screen.job.step > seen["step"], timeout=JOB_TIMEOUT,
                         what="progress read by the reopened app")
        screen.query_one("#job-cancel", Button).press()
        await wait_until(pilot, lambda: screen.job.status == "cancelled", timeout=JOB_TIMEOUT,
                         what="the job to stop")
        assert again.store.job(seen["id"]).status == "cancelled"

    run(again, reattached)


def test_the_screen_never_imports_torch():
    code = "import sys, chattui.app, chattui.screens.finetune; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], check=True)


def test_the_jobs_table_is_added_to_an_existing_database(tmp_path):
    from chattui.store import MIGRATIONS

    old = Store(tmp_path / "chattui.db", migrations=MIGRATIONS[:1])
    old._write("INSERT INTO conversations (title, created_at, updated_at) VALUES ('kept', 0, 0)")  # as version 1 wrote
    old.close()
    store = Store(tmp_path / "chattui.db")
    assert [c.title for c in store.conversations()] == ["kept"]
    store.save_job("j1", name="data · lora", status="queued", out_dir="/jobs/j1", base_model="/m")
    store.set_job_status("j1", "running")
    assert [(j.id, j.status, j.out_dir) for j in store.jobs()] == [("j1", "running", "/jobs/j1")]
