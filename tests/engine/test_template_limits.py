"""Hostile chat templates are bounded: endless loops stop at the time limit, huge values are refused before
they are allocated, the prompt has a size limit; each is one TemplateError line, the process stays alive and
the next render works. Setting the request's cancel event stops a slow render within moments. The same
errors reach `chattui generate`, the app's backend and fine-tune data prep, and data prep stops when asked to."""

from __future__ import annotations

import json
import threading
import time
import tracemalloc

import pytest

import engine.tokenizer
from engine.errors import RenderCancelled, TemplateError
from engine.finetune_data import DataCancelled, DataError, prepare_data
from engine.tokenizer import ChatTokenizer

MESSAGES = [{"role": "user", "content": "hi"}]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture
def with_template(tokenizer):
    return lambda template: ChatTokenizer(tokenizer, {"eos_token": "<|im_end|>"}, template)


@pytest.fixture
def short_time_limit(monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "TEMPLATE_TIME_LIMIT_S", 0.5)


def test_nested_loops_stop_at_the_time_limit_and_the_next_render_works(with_template, short_time_limit):
    started = time.monotonic()
    with pytest.raises(TemplateError, match=r"^chat template took more than 0.5 s to render \(an endless or huge loop\?\)$"):
        with_template(NESTED_LOOPS).render_chat(MESSAGES)
    assert time.monotonic() - started < 3
    time.sleep(0.6)  # no stray timeout is left pending for this thread
    assert with_template("{{ messages[0]['content'] }}").render_chat(MESSAGES) == "hi"


def test_the_time_limit_also_stops_a_render_in_a_worker_thread(with_template, short_time_limit):
    errors: list[str] = []

    def render() -> None:
        try:
            with_template(NESTED_LOOPS).render_chat(MESSAGES)
        except TemplateError as e:
            errors.append(str(e))

    worker = threading.Thread(target=render)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive() and errors and "took more than 0.5 s" in errors[0]


def test_cancel_stops_a_slow_render_long_before_its_time_limit_and_the_next_render_works(with_template):
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(RenderCancelled, match="^cancelled while the chat template was rendering$"):
        with_template(NESTED_LOOPS).render_chat(MESSAGES, cancel=cancel)
    assert time.monotonic() - started < engine.tokenizer.TEMPLATE_TIME_LIMIT_S - 2
    time.sleep(2 * engine.tokenizer.CANCEL_POLL_S)  # no stray exception is left pending for this thread
    assert with_template("{{ messages[0]['content'] }}").render_chat(MESSAGES, cancel=cancel) == "hi"


def test_a_cancelled_render_ends_the_backend_reply_as_cancelled(checkpoint_factory, tmp_path):
    import shutil

    from chattui.backend import EngineBackend

    folder = shutil.copytree(checkpoint_factory("qwen2"), tmp_path / "model")
    (folder / "chat_template.jinja").write_text(NESTED_LOOPS)
    backend = EngineBackend()
    info = backend.load(str(folder), device="cpu", dtype="float32")
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with backend.stream(MESSAGES, info.defaults.updated({"max_new_tokens": 2}), cancel) as reply:
        assert list(reply) == []
    assert time.monotonic() - started < engine.tokenizer.TEMPLATE_TIME_LIMIT_S - 2
    assert reply.result.finish_reason == "cancelled" and reply.result.generated_tokens == 0


@pytest.mark.parametrize(("template", "needle"), [
    ("{{ 'x' * 10**9 }}", "repeating 1 characters or items 1,000,000,000 times"),
    ("{{ ['x'] * 10**9 }}", "repeating 1 characters or items"),
    ("{% set a = 'x' * 1000000 %}{% set b = a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a %}{{ b | length }}", "~ concatenation"),
    ("{% set a = 'x' * 5000000 %}{{ (a + a) | length }}", "a concatenation of 10,000,000"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "characters"),
    ("{{ 10 ** 100000000 }}", "a power of more than 4,096 bits"),
    ("{% set ns = namespace(n=2) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", "bits"),
    ("{{ 'x'.center(10**9) }}", "a count or width of 1,000,000,000"),
    ("{{ 'x' | center(10**9) }}", "a count or width of 1,000,000,000"),
    ("{{ '{:>1000000000}'.format(1) }}", "a format width"),
    ("{{ '%1000000000d' % 1 }}", "a format width"),
    ("{{ messages | tojson(indent=10**6) }}", "tojson indent of 1,000,000 (the limit is 16)"),
    ("{{ strftime_now('%Y' * 1000000) }}", "strftime_now format of 2,000,000 characters"),
    ("{{ strftime_now('%999999999Y') }}", "with a field width"),
])
def test_huge_values_are_refused_before_they_are_allocated(with_template, template, needle):
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match="^chat template tried an unsafe operation") as error:
            with_template(template).render_chat(MESSAGES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert needle in str(error.value)
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated"


def test_a_prompt_beyond_the_size_limit_is_refused(with_template):
    template = "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}"
    with pytest.raises(TemplateError, match="^chat template produced more than 8,000,000 characters$"):
        with_template(template).render_chat(MESSAGES)


def test_ordinary_templates_are_untouched(with_template):
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{{ m['role'] ~ ':' ~ m['content'] }}{% endfor %}{{ ns.n }}{{ messages | tojson(indent=2) }}"
                "{{ '%5d' % 3 }}{{ '{:>4}'.format('a') }}{{ 'ab' * 3 }}{{ 2 ** 10 }}"
                "{{ '%d' % 1700000000 }}{{ '{}'.format(1700000000) }}{{ 1700000000 | string }}")
    expected = "user:hi1" + json.dumps(MESSAGES, indent=2) + "    3   aababab1024" + "1700000000" * 3
    assert with_template(template).render_chat(MESSAGES) == expected


# -- where the errors show ------------------------------------------------------------------------------------


def test_generate_reports_a_template_timeout_in_one_line(checkpoint_factory, tmp_path, capsys, short_time_limit):
    import shutil

    from chattui.cli import main

    folder = shutil.copytree(checkpoint_factory("qwen2"), tmp_path / "model")
    (folder / "chat_template.jinja").write_text(NESTED_LOOPS)
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "hi"]) == 1
    err = capsys.readouterr().err
    assert err == "chattui: error: chat template took more than 0.5 s to render (an endless or huge loop?)\n"


def test_the_app_backend_reports_a_template_timeout_as_a_backend_error(checkpoint_factory, tmp_path,
                                                                        short_time_limit):
    import shutil

    from chattui.backend import BackendError, EngineBackend

    folder = shutil.copytree(checkpoint_factory("qwen2"), tmp_path / "model")
    (folder / "chat_template.jinja").write_text(NESTED_LOOPS)
    backend = EngineBackend()
    info = backend.load(str(folder), device="cpu", dtype="float32")
    with pytest.raises(BackendError, match="took more than 0.5 s"):
        list(backend.stream(MESSAGES, info.defaults.updated({"max_new_tokens": 2}), threading.Event()))


def test_data_prep_reports_a_template_timeout_with_the_record_and_stops_when_asked(with_template, tmp_path,
                                                                                   short_time_limit):
    data = tmp_path / "data.jsonl"
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    data.write_text((json.dumps(record) + "\n") * 3)
    with pytest.raises(DataError, match=f"^{data}:1: .*took more than 0.5 s"):
        prepare_data(with_template(NESTED_LOOPS), [data], 64)
    asked = iter([False, True])
    with pytest.raises(DataCancelled, match=f"stopped before {data}:2"):
        prepare_data(with_template(engine.tokenizer.CHATML_FALLBACK_TEMPLATE), [data], 64,
                     should_stop=lambda: next(asked))

