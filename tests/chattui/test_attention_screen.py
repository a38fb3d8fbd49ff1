"""The attention screen through Pilot: opened from the chat (f2) and the command palette, layer/head
navigation, views, the text view's query, the head overview, aggregations, export (CSV, JSON, SVG),
the live view while a reply streams, errors and the truncation notice; against FakeAttentionBackend,
plus one end-to-end run on a real (tiny, random) qwen2 checkpoint."""

from __future__ import annotations

import asyncio
import csv
import json

import numpy as np
import pytest
from ui_fakes import FakeAttentionBackend, FakeAttentionMaps, fake_tokens, record_notifications, wait_until

from chattui.app import ChattuiApp
from chattui.backend import EngineBackend
from chattui.catalog import Stores
from chattui.config import Config
from chattui.screens.attention import AttentionScreen
from chattui.store import Store
from engine.params import GenerationSettings, SamplingParams
from chattui.widgets.heatmap import Heatmap, token_label

SIZE = (120, 40)


@pytest.fixture
def make_app(tmp_path):
    def make(backend, model_dir) -> ChattuiApp:
        return ChattuiApp(
            backend, Store(tmp_path / "data" / "chattui.db"), Config(path=tmp_path / "config" / "config.toml"),
            model_dir=model_dir, bundled_dir=tmp_path / "none", stores=Stores.at(tmp_path / "hf"),
            export_dir=tmp_path / "exports",
        )

    return make


@pytest.fixture
def fake_dir(tmp_path):
    folder = tmp_path / "fake-model"
    folder.mkdir()
    return folder


def run(app, scenario) -> None:
    async def main():
        async with app.run_test(size=SIZE) as pilot:
            await scenario(pilot)

    asyncio.run(main())


async def chat_with_reply(pilot, text: str = "the quick brown fox jumps") -> None:
    app = pilot.app
    await wait_until(pilot, lambda: app.model is not None, what="the model to load")
    app.chat.prompt.focus()
    app.chat.prompt.load_text(text)
    await pilot.press("enter")
    await wait_until(pilot, lambda: app.chat.reply is None and len(app.chat.messages) == 2, what="the reply")


async def open_attention(pilot) -> AttentionScreen:
    await pilot.press("f2")
    screen = await wait_until(pilot, lambda: isinstance(pilot.app.screen, AttentionScreen) and pilot.app.screen,
                              what="the attention screen")
    await shown(pilot, screen, (0, 0, "head"))
    return screen


async def shown(pilot, screen: AttentionScreen, key) -> np.ndarray:
    await wait_until(pilot, lambda: screen.shown == key and not screen.busy, what=f"matrix {key}")
    return screen.matrix


def expected(screen: AttentionScreen) -> FakeAttentionMaps:
    return FakeAttentionMaps(screen.maps.tokens)


def test_opens_on_the_last_reply_and_layer_head_keys_change_the_matrix(make_app, fake_dir):
    backend = FakeAttentionBackend(["Hello", " there"])
    app = make_app(backend, fake_dir)

    async def scenario(pilot):
        await chat_with_reply(pilot)
        screen = await open_attention(pilot)
        assert backend.attention_requests[-1] == [
            {"role": "user", "content": "the quick brown fox jumps"}, {"role": "assistant", "content": "Hello there"}]
        fake = expected(screen)
        assert screen.maps.tokens == ["<user>", "the", "quick", "brown", "fox", "jumps", "<assistant>", "Hello",
                                      "there"]
        np.testing.assert_array_equal(screen.matrix, fake.head(0, 0))
        heatmap = screen.query_one(Heatmap)
        assert heatmap.matrix is screen.matrix and heatmap.virtual_size.height == Heatmap.HEADER_H + 9
        await pilot.press("full_stop")
        np.testing.assert_array_equal(await shown(pilot, screen, (0, 1, "head")), fake.head(0, 1))
        await pilot.press("right_square_bracket")
        np.testing.assert_array_equal(await shown(pilot, screen, (1, 1, "head")), fake.head(1, 1))
        await pilot.press("comma", "comma")
        np.testing.assert_array_equal(await shown(pilot, screen, (1, 2, "head")), fake.head(1, 2))  # wraps round
        await pilot.press("left_square_bracket")
        np.testing.assert_array_equal(await shown(pilot, screen, (0, 2, "head")), fake.head(0, 2))
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is app.chat, what="back to the chat")
        app.chat.boxes()[0].focus()  # the user's message: the conversation up to it
        screen = await open_attention(pilot)
        assert backend.attention_requests[-1] == [{"role": "user", "content": "the quick brown fox jumps"}]
        assert screen.maps.tokens == ["<user>", "the", "quick", "brown", "fox", "jumps"]
        assert "up to your message #1" in str(screen.query_one("#attention-title").render())

    run(app, scenario)


def test_aggregation_modes_show_mean_max_and_rollout(make_app, fake_dir):
    app = make_app(FakeAttentionBackend(["a b"]), fake_dir)

    async def scenario(pilot):
        await chat_with_reply(pilot)
        screen = await open_attention(pilot)
        fake = expected(screen)
        await pilot.press("right_square_bracket", "a")
        np.testing.assert_allclose(await shown(pilot, screen, (1, 0, "mean")), fake.layer(1).mean(0), rtol=1e-6)
        await pilot.press("a")
        np.testing.assert_allclose(await shown(pilot, screen, (1, 0, "max")), fake.layer(1).max(0), rtol=1e-6)
        await pilot.press("a")
        rollout = await shown(pilot, screen, (1, 0, "rollout"))
        T = len(fake)
        flow = np.eye(T)
        for layer in (0, 1):
            mixed = 0.5 * fake.layer(layer).mean(0) + 0.5 * np.eye(T)
            flow = (mixed / mixed.sum(-1, keepdims=True)) @ flow
        np.testing.assert_allclose(rollout, flow, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rollout.sum(-1), 1.0, rtol=1e-5)
        await pilot.press("a")
        np.testing.assert_array_equal(await shown(pilot, screen, (1, 0, "head")), fake.head(1, 0))

    run(app, scenario)


def test_views_switch_and_text_view_arrows_move_the_query(make_app, fake_dir):
    app = make_app(FakeAttentionBackend(["one", " two"]), fake_dir)

    async def scenario(pilot):
        await chat_with_reply(pilot, "a\nb")
        screen = await open_attention(pilot)
        assert screen.views.current == "heatmap"
        await pilot.press("v")
        assert screen.view == "text" and screen.views.current == "text"
        last = len(screen.maps.tokens) - 1
        assert screen.query_index == last
        await pilot.press("left", "left")
        assert screen.query_index == last - 2
        text = screen.query_one("#attention-text").render()
        assert "quick" not in str(text) and "one" in str(text)
        assert f"query {last - 2}" in str(screen.query_one("#attention-state").render())
        await pilot.press("right")
        assert screen.query_index == last - 1
        for _ in range(last + 3):
            await pilot.press("left")
        assert screen.query_index == 0, "the query stops at the first token"
        await pilot.press("v")
        assert screen.views.current == "heads"
        await pilot.press("left")  # in the head overview the arrows move the table's cursor, not the query
        assert screen.query_index == 0
        await pilot.press("v")
        assert screen.views.current == "live"
        await pilot.press("v")
        assert screen.views.current == "heatmap"

    run(app, scenario)


def test_head_overview_lists_every_head_and_selecting_a_cell_opens_it(make_app, fake_dir):
    app = make_app(FakeAttentionBackend(["x"]), fake_dir)

    async def scenario(pilot):
        await chat_with_reply(pilot)
        screen = await open_attention(pilot)
        await pilot.press("v", "v")
        assert screen.views.current == "heads"
        await wait_until(pilot, lambda: screen.table.row_count == 2, what="the head overview")
        table = screen.table
        assert len(table.columns) == 3
        top = expected(screen).layer(1)[2].mean(0).argmax()
        assert str(table.get_cell_at((1, 2))).endswith(token_label(screen.maps.tokens[top])[:10])
        table.focus()
        await pilot.press("down", "right", "right", "enter")
        np.testing.assert_array_equal(await shown(pilot, screen, (1, 2, "head")), expected(screen).head(1, 2))
        assert screen.views.current == "heatmap"

    run(app, scenario)


def test_export_csv_and_json_hold_the_shown_matrix_and_svg_is_written(make_app, fake_dir, tmp_path):
    app = make_app(FakeAttentionBackend(["Hi", "\n", "there"]), fake_dir)

    async def scenario(pilot):
        await chat_with_reply(pilot)
        screen = await open_attention(pilot)
        shown_notes = record_notifications(app)
        await pilot.press("full_stop", "a")
        matrix = await shown(pilot, screen, (0, 1, "mean"))
        await pilot.press("c")
        csv_path = app.last_export
        assert csv_path.suffix == ".csv" and csv_path.parent == tmp_path / "exports"
        rows = list(csv.reader(csv_path.open(encoding="utf-8")))
        assert rows[0] == ["query\\key", *screen.maps.tokens]
        assert [r[0] for r in rows[1:]] == screen.maps.tokens
        np.testing.assert_array_equal(np.array([[float(x) for x in r[1:]] for r in rows[1:]], dtype=np.float32), matrix)
        await pilot.press("j")
        json_path = app.last_export
        data = json.loads(json_path.read_text(encoding="utf-8"))
        assert (data["layer"], data["head"], data["aggregation"]) == (0, None, "mean")
        assert data["tokens"] == screen.maps.tokens
        np.testing.assert_array_equal(np.array(data["attention"], dtype=np.float32), matrix)
        await pilot.press("s")
        svg = app.last_export
        assert svg.suffix == ".svg" and svg.read_text(encoding="utf-8").lstrip().startswith("<svg")
        assert any(str(csv_path) in n for n in shown_notes) and any(str(svg) in n for n in shown_notes)
        assert not list((tmp_path / "exports").glob("*.part")), "no half-written files left"

    run(app, scenario)


def test_command_palette_opens_the_screen_and_errors_and_truncation_are_told(make_app, fake_dir):
    backend = FakeAttentionBackend(["ok"], truncated=7)
    app = make_app(backend, fake_dir)

    async def scenario(pilot):
        await chat_with_reply(pilot)
        notes = record_notifications(app)
        await pilot.press("ctrl+p")
        await pilot.press(*"Attention")
        await pilot.pause(0.3)
        await pilot.press("enter")
        screen = await wait_until(pilot, lambda: isinstance(app.screen, AttentionScreen) and app.screen,
                                  what="the attention screen from the palette")
        await shown(pilot, screen, (0, 0, "head"))
        assert any("first 7 tokens are left out" in n for n in notes)
        assert "first 7 left out" in str(screen.query_one("#attention-state").render())
        await pilot.press("escape")
        backend.attention_error = "the model is out of memory"
        await pilot.press("f2")
        screen = await wait_until(pilot, lambda: isinstance(app.screen, AttentionScreen) and app.screen,
                                  what="the attention screen")
        await wait_until(pilot, lambda: screen.error is not None, what="the error")
        assert any("out of memory" in n and "Attention failed" in n for n in notes)
        assert "Could not compute attention" in str(screen.query_one("#attention-state").render())

    run(app, scenario)


def test_live_view_shows_what_each_new_token_attended_to(make_app, fake_dir):
    backend = FakeAttentionBackend([f"w{i} " for i in range(40)], delay=0.03)
    app = make_app(backend, fake_dir)

    async def scenario(pilot):
        await chat_with_reply(pilot, "first message")
        await pilot.press("f3")
        assert app.chat.live_attention is not None
        app.chat.prompt.focus()
        app.chat.prompt.load_text("tell me more")
        await pilot.press("enter")
        live = app.chat.live_attention
        await wait_until(pilot, lambda: live.count >= 2, what="live rows")
        await pilot.press("f2")
        screen = await wait_until(pilot, lambda: isinstance(app.screen, AttentionScreen) and app.screen,
                                  what="the attention screen")
        assert screen.view == "live"
        body = screen.query_one("#live-body")
        await wait_until(pilot, lambda: "of the reply chose from" in str(body.render()), what="the live view")
        prompt = backend.requests[-1][0]
        assert live.prompt_tokens == fake_tokens(prompt)
        seen = live.count
        def following() -> bool:  # the newest row is shown: a reply token's, or once the reply ended the end token's
            shown = str(body.render())
            return live.count > seen + 3 and (f"Token {live.count} " in shown or live.chose_end and "end token" in shown)

        await wait_until(pilot, following, what="the live view to follow new tokens")
        S = live.rows.shape[-1]
        assert S == len(fake_tokens(prompt)) + live.count
        assert "⟨gen 1⟩" in str(body.render())
        await pilot.press("escape")
        app.chat.action_stop()

    run(app, scenario)


def test_attention_screen_end_to_end_on_a_qwen2_checkpoint(make_app, checkpoint_factory):
    qwen2 = checkpoint_factory("qwen2")
    backend = EngineBackend()
    app = make_app(backend, qwen2)

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.model is not None, timeout=30, what="the model to load")
        messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, how are you"}]
        conversation = app.store.create_conversation()
        for m in messages:
            app.store.add_message(conversation.id, m["role"], m["content"])
        await app.chat.open_conversation(conversation.id)
        screen = await open_attention(pilot)
        maps = backend._engine.attention(backend._engine.tokenizer.encode(
            backend._engine.tokenizer.render_chat(messages, add_generation_prompt=False), add_special_tokens=False))
        assert screen.maps.tokens == maps.tokens and screen.maps.truncated == 0
        np.testing.assert_allclose(screen.matrix, maps.head(0, 0), atol=1e-6)
        np.testing.assert_allclose(screen.matrix.sum(-1), 1.0, atol=1e-5)
        await pilot.press("right_square_bracket", "a")
        np.testing.assert_allclose(await shown(pilot, screen, (1, 0, "mean")), maps.mean_over_heads(1), atol=1e-6)
        await pilot.press("v", "v")
        await wait_until(pilot, lambda: screen.table.row_count == maps.num_layers, timeout=10, what="head overview")

    run(app, scenario)


def test_engine_attention_view_gives_numpy_and_waits_for_a_reply_being_generated(checkpoint_factory):
    import threading

    backend = EngineBackend()
    backend.load(str(checkpoint_factory("qwen2")), "cpu", "float32")
    view = backend.attention("hello there")
    layer = view.layer(0)
    assert type(layer) is np.ndarray and layer.shape == (view.num_heads, len(view), len(view))
    assert type(view.rollout()) is np.ndarray and type(view.token_ids[0]) is int
    backend._engine.eos_token_ids = set()  # the reply cannot end by itself before it is closed
    reply = backend.stream("Once", GenerationSettings(SamplingParams(temperature=0.0, top_k=0, top_p=1.0), 200),
                           threading.Event())
    next(iter(reply))  # the reply is being generated: it holds the model
    computed = threading.Event()
    worker = threading.Thread(target=lambda: (view.mean_over_heads(1), computed.set()))
    worker.start()
    assert not computed.wait(0.5), "a layer was computed while a reply was being generated on the model"
    reply.close()
    assert computed.wait(30), "the layer is computed once the reply has ended"
    worker.join()


def test_heatmap_builds_only_the_visible_window_of_a_1024_token_matrix():
    from textual.app import App

    tokens = [f"tok{i}\n" for i in range(1024)]
    matrix = FakeAttentionMaps(tokens).head(1, 2)

    class One(App):
        def compose(self):
            yield Heatmap()

    async def main():
        async with One().run_test(size=(80, 30)) as pilot:
            heatmap = pilot.app.query_one(Heatmap)
            heatmap.show(matrix, tokens)
            await pilot.pause()
            assert heatmap.virtual_size.width == Heatmap.LABEL_W + 1 + 1024 * Heatmap.CELL_W
            heatmap.scroll_to(x=600 * Heatmap.CELL_W, y=700, animate=False)
            await pilot.pause()
            keys = heatmap._visible_keys()
            assert keys.start == 600 and len(keys) <= 80 // Heatmap.CELL_W
            line = heatmap.render_line(Heatmap.HEADER_H)  # the first visible query row
            assert line.cell_length == heatmap.size.width
            assert line.text.startswith("tok700\\n".rjust(Heatmap.LABEL_W)), "row labels escape newlines"
            segments = list(line)
            assert len(segments) <= 2 + len(keys) + 1, "only the visible cells are built"
            q, k = heatmap.cell_at(Heatmap.LABEL_W + 1 + 2 * Heatmap.CELL_W, Heatmap.HEADER_H + 1)
            assert (q, k) == (701, 602)

    asyncio.run(main())


def test_engine_backend_streams_live_attention_rows(checkpoint_factory):
    import threading

    backend = EngineBackend()
    backend.load(str(checkpoint_factory("qwen2")), "cpu", "float32")
    received = []
    settings = GenerationSettings(SamplingParams(temperature=0.0, top_k=0, top_p=1.0), max_new_tokens=5)
    reply = backend.stream("hello there", settings, threading.Event(),
                           on_attention=lambda rows, tokens: received.append((rows, tokens)))
    list(reply)
    prompt_len = reply.result.prompt_tokens
    assert len(received) >= reply.result.generated_tokens >= 1
    config = backend._engine.config
    for i, (rows, tokens) in enumerate(received):
        assert rows.shape == (config.num_hidden_layers, config.num_attention_heads, prompt_len + i)
        np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)
        assert len(tokens) == prompt_len + i  # the prompt's and the generated tokens' strings
        assert tokens[:prompt_len] == received[0][1]
