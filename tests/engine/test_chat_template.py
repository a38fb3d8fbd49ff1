"""Chat template rendering: published templates against transformers' own rendering, and the sandbox."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from functools import cache
from pathlib import Path

import pytest

from checkpoints import REALWORLD, train_tokenizer

from engine.errors import TemplateError
from engine.tokenizer import SPECIAL_TOKEN_NAMES, ChatTokenizer

needs_realworld = pytest.mark.skipif(
    not REALWORLD.is_dir(), reason=f"real tokenizer files not found at {REALWORLD} (shared/ beside the clone)"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city; returns <temperature> in °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. 北京"}},
            "required": ["city"],
        },
    },
}

USER_HI = {"role": "user", "content": "Hi there! What is 2 + 2?"}
ASSISTANT_4 = {"role": "assistant", "content": "  It is 4.  "}
SYSTEM = {"role": "system", "content": "You are a terse assistant.\nAnswer in one line."}
TOOL_CALL = {
    "role": "assistant",
    "content": None,  # as OpenAI-style clients send it; transformers drops None values
    "tool_calls": [
        {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ],
}

# name -> (messages, extra render arguments)
CONVERSATIONS: dict[str, tuple[list[dict], dict]] = {
    "user": ([USER_HI], {}),
    "system_user": ([SYSTEM, USER_HI], {}),
    "multi_turn": ([USER_HI, ASSISTANT_4, {"role": "user", "content": "And 3 + 3?"}], {}),
    "system_multi_turn": ([SYSTEM, USER_HI, ASSISTANT_4, {"role": "user", "content": "And 3 + 3?"}], {}),
    "chinese_emoji": (
        [
            {"role": "user", "content": "你好，世界！今天天气怎么样？🌤️"},
            {"role": "assistant", "content": "很好 😀🎉 <b>不错</b>"},
            {"role": "user", "content": "谢谢 👍🏽"},
        ],
        {},
    ),
    "tools": ([{"role": "user", "content": "What's the weather in Paris?"}], {"tools": [WEATHER_TOOL]}),
    "tool_round_trip": (
        [
            {"role": "user", "content": "What's the weather in Paris?"},
            TOOL_CALL,
            {"role": "tool", "name": "get_weather", "tool_call_id": "call12345", "content": '{"temp": 22}'},
        ],
        {"tools": [WEATHER_TOOL]},
    ),
    "reasoning_no_thinking": (
        [USER_HI, {"role": "assistant", "content": "4", "reasoning_content": "2 + 2 = 4"}, USER_HI],
        {"enable_thinking": False},
    ),
}

# Folders without tokenizer_config.json templates of their own borrow the special tokens of their family.
TEMPLATES_ONLY_FAMILY = {
    "llama-3.1-8b-instruct": "llama-3.2-3b-instruct",
    "mistral-7b-instruct-v0.3.later-revision": "mistral-7b-instruct-v0.3",
    "phi-3.5-mini-instruct": "phi-3-mini-4k-instruct",
    "qwen3-0.6b.original-revision": "qwen3",
}


def _template_ids() -> list[str]:
    if not REALWORLD.is_dir():
        return []
    ids = [
        folder.name
        for folder in sorted(REALWORLD.iterdir())
        if (folder / "tokenizer_config.json").exists()
        and json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    ]
    ids += [f"templates_only/{p.name}" for p in sorted((REALWORLD / "templates_only").glob("*.jinja"))]
    return ids


TEMPLATE_IDS = _template_ids()


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _special_tokens(folder: Path) -> dict[str, str]:
    """What transformers passes to templates, read from the files independently of engine.tokenizer."""
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    stm_path = folder / "special_tokens_map.json"
    stm = json.loads(stm_path.read_text(encoding="utf-8")) if stm_path.exists() else {}
    tokens = {name: _token_text(config.get(name)) or _token_text(stm.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return {name: text for name, text in tokens.items() if text}


@cache
def _tiny_tokenizer_json() -> str:
    return train_tokenizer().to_str()


def _make_folder(path: Path, config: dict | None = None, jinja: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(_tiny_tokenizer_json(), encoding="utf-8")
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    return path


def _tokenizer_with_template(tmp_path: Path, template: str, **special_tokens: str) -> ChatTokenizer:
    return ChatTokenizer.from_dir(_make_folder(tmp_path / "model", {"chat_template": template, **special_tokens}))


@cache
def _hf_tokenizer(folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)


def _hf_render(template: str, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    """transformers' own renderer, with the message clean-up apply_chat_template does first."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    if not hasattr(utils, "render_jinja_template"):
        pytest.skip("this transformers version has no render_jinja_template")
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    rendered, _ = utils.render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return rendered[0]


class _Case:
    """One published template: ours loaded through from_dir, and transformers' rendering of the same template."""

    def __init__(self, template_id: str, work_dir: Path):
        if template_id.startswith("templates_only/"):
            jinja_path = REALWORLD / template_id
            family = REALWORLD / TEMPLATES_ONLY_FAMILY[jinja_path.name.removesuffix(".chat_template.jinja")]
            self.template = jinja_path.read_text(encoding="utf-8")
            self.special_tokens = _special_tokens(family)
            folder = _make_folder(work_dir / "model", dict(self.special_tokens), jinja=self.template)
            self.hf_tokenizer = None
        else:
            source = REALWORLD / template_id
            config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
            self.template = config["chat_template"]
            self.special_tokens = _special_tokens(source)
            if (source / "tokenizer.json").exists():
                folder, self.hf_tokenizer = source, _hf_tokenizer(source)
            else:  # template files only: give it a stand-in tokenizer.json, rendering does not use it
                folder, self.hf_tokenizer = work_dir / "model", None
                folder.mkdir(parents=True)
                for name in ("tokenizer_config.json", "special_tokens_map.json"):
                    if (source / name).exists():
                        shutil.copy(source / name, folder / name)
                (folder / "tokenizer.json").write_text(_tiny_tokenizer_json(), encoding="utf-8")
        self.ours = ChatTokenizer.from_dir(folder)

    def expected(self, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
        if self.hf_tokenizer is not None:
            return self.hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        return _hf_render(self.template, messages, add_generation_prompt, **self.special_tokens, **kwargs)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    loaded: dict[str, _Case] = {}

    def get(template_id: str) -> _Case:
        if template_id not in loaded:
            loaded[template_id] = _Case(template_id, tmp_path_factory.mktemp("template"))
        return loaded[template_id]

    return get


@needs_realworld
@pytest.mark.parametrize("template_id", TEMPLATE_IDS)
def test_published_template_is_loaded(cases, template_id):
    case = cases(template_id)
    assert case.ours.has_chat_template
    assert case.ours.chat_template == case.template
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(case.ours, name) == case.special_tokens.get(name)


@needs_realworld
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template_id", TEMPLATE_IDS)
def test_published_template_renders_like_transformers(cases, template_id, conversation, add_generation_prompt):
    case = cases(template_id)
    messages, kwargs = CONVERSATIONS[conversation]
    try:
        expected = case.expected(messages, add_generation_prompt, **kwargs)
    except Exception as hf_error:  # the template rejects this conversation (e.g. a system role, no alternation)
        with pytest.raises(TemplateError) as ours:
            case.ours.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        assert " ".join(str(hf_error).split()) in str(ours.value)
        assert "\n" not in str(ours.value)
        return
    assert case.ours.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs) == expected


@needs_realworld
@pytest.mark.parametrize("template_id", TEMPLATE_IDS)
def test_published_template_accepts_plain_turns(cases, template_id):
    """Guards the comparison above against passing only because both sides raise."""
    rendered = cases(template_id).ours.render_chat(CONVERSATIONS["multi_turn"][0])
    assert "And 3 + 3?" in rendered and "It is 4." in rendered


@needs_realworld
@pytest.mark.parametrize(
    "template_id",
    [
        "llama-3.2-3b-instruct",
        "qwen2.5-instruct",
        "qwen3",
        "templates_only/llama-3.1-8b-instruct.chat_template.jinja",
        "templates_only/mistral-7b-instruct-v0.3.later-revision.chat_template.jinja",
    ],
)
def test_tool_templates_show_the_tools(cases, template_id):
    rendered = cases(template_id).ours.render_chat(*CONVERSATIONS["tools"][:1], tools=[WEATHER_TOOL])
    assert "get_weather" in rendered and "北京" in rendered  # tojson keeps non-ASCII text as is


# --- The template environment, against transformers' implementation of the same functions. ---

ENVIRONMENT_TEMPLATE = """\
{%- set ns = namespace(count=0, seen=[]) -%}
{%- for message in messages -%}
  {%- if message.role == 'skip' %}{% continue %}{% endif -%}
  {%- if ns.count >= 3 %}{% break %}{% endif -%}
  {%- set ns.count = ns.count + 1 -%}
  {%- generation %}[{{ loop.index0 }}:{{ message.role }}:{{ message.content | trim }}]{% endgeneration %}
{% endfor -%}
{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|{{ {"b": "é<>&", "a": [1, 2]} | tojson(sort_keys=True) }}
{{ {"x": 1} | tojson(separators=(",", ":")) }}|{{ dict(a=1, b="2") | tojson }}|{{ dict.fromkeys(["k"], 0) }}
{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ documents | tojson }}|{{ custom }}
{{ messages[-1].tool_calls is defined }}|{{ messages[-1].content is defined }}|{{ add_generation_prompt }}
"""


def test_environment_matches_transformers(tmp_path):
    tok = _tokenizer_with_template(
        tmp_path, ENVIRONMENT_TEMPLATE, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|im_start|>"
    )
    messages = [
        {"role": "system", "content": "  sys  "},
        {"role": "skip", "content": "hidden"},
        {"role": "user", "content": "中文 😀"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "never shown"},
        {"role": "assistant", "content": None, "tool_calls": None},
    ]
    kwargs = {"tools": [WEATHER_TOOL], "documents": [{"title": "t", "text": "x"}], "custom": "extra value"}
    rendered = tok.render_chat(messages, add_generation_prompt=False, **kwargs)
    assert rendered == _hf_render(
        ENVIRONMENT_TEMPLATE, messages, False, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|im_start|>", **kwargs,
    )
    assert "[0:system:sys]" in rendered and "hidden" not in rendered and "never shown" not in rendered
    assert '"é<>&"' in rendered  # no HTML escaping, no \\u escapes
    assert "False|False|False" in rendered  # None-valued keys are dropped


def test_defaults_and_extra_variables(tmp_path):
    tok = _tokenizer_with_template(
        tmp_path, "{{ bos_token }}|{{ tools }}|{{ documents }}|{{ add_generation_prompt }}|{{ flag }}",
        bos_token="<|endoftext|>",
    )
    assert tok.render_chat([USER_HI]) == "<|endoftext|>|None|None|True|"
    assert tok.render_chat([USER_HI], bos_token="B", flag=1, documents=["d"]) == "B|None|['d']|True|1"


def test_strftime_now(tmp_path):
    tok = _tokenizer_with_template(tmp_path, "{{ strftime_now('%Y') }}")
    assert tok.render_chat([USER_HI]) == str(datetime.now().year)


def test_reasoning_is_passed_under_every_name(tmp_path):
    tok = _tokenizer_with_template(tmp_path, "{{ messages[0].reasoning_content }}|{{ messages[0].thinking }}")
    assert tok.render_chat([{"role": "assistant", "content": "", "reasoning": "why"}]) == "why|why"


def test_template_is_compiled_once(tmp_path, monkeypatch):
    import engine.tokenizer as module

    compiled = []
    original = module._ENVIRONMENT.from_string
    def counting_from_string(source):
        compiled.append(source)
        return original(source)

    monkeypatch.setattr(module._ENVIRONMENT, "from_string", counting_from_string)
    tok = _tokenizer_with_template(tmp_path, "{{ messages[0].content }}")
    assert [tok.render_chat([USER_HI]) for _ in range(3)] == [USER_HI["content"]] * 3
    assert tok.encode_chat([USER_HI]) == tok.encode(USER_HI["content"], add_special_tokens=False)
    assert len(compiled) == 1


# --- Failures: each one a one-line TemplateError, never a crash or a leak. ---


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.append({'role': 'user'}) }}",
        "{% set ns = namespace(__class__=1) %}",
        "{% set ns = namespace() %}{% set ns._private = 1 %}",
    ],
)
def test_sandbox_escape_is_refused(tmp_path, template):
    tok = _tokenizer_with_template(tmp_path, "line one\n" + template)
    with pytest.raises(TemplateError) as error:
        tok.render_chat([USER_HI])
    message = str(error.value)
    assert "unsafe operation at line 2" in message
    assert "\n" not in message


def test_raise_exception_gives_the_templates_message(tmp_path):
    template = "{% if messages[0].role != 'system' %}{{ raise_exception('bad\nrole') }}{% endif %}"
    tok = _tokenizer_with_template(tmp_path, template)
    with pytest.raises(TemplateError, match=r"^chat template raised: bad role$"):
        tok.render_chat([USER_HI])


def test_syntax_error_names_the_line_when_rendering(tmp_path):
    tok = _tokenizer_with_template(tmp_path, "ok\n{% if %}\n")  # loading succeeds: plain completion still works
    assert tok.has_chat_template
    for _ in range(2):
        with pytest.raises(TemplateError, match=r"^chat template syntax error at line 2: "):
            tok.render_chat([USER_HI])


def test_unknown_filter_is_a_syntax_error(tmp_path):
    tok = _tokenizer_with_template(tmp_path, "{{ messages | no_such_filter }}")
    with pytest.raises(TemplateError, match=r"line 1: No filter named 'no_such_filter'"):
        tok.render_chat([USER_HI])


@pytest.mark.parametrize(
    ("template", "pattern"),
    [
        ("a\n\n{{ nothing.attribute }}", r"^chat template failed at line 3: 'nothing' is undefined$"),
        ("{{ messages[0].content + 1 }}", r"^chat template failed at line 1: TypeError: can only concatenate"),
        ("{{ range(10 ** 9) | list }}", r"^chat template failed at line 1: OverflowError: Range too big"),
    ],
)
def test_runtime_errors(tmp_path, template, pattern):
    tok = _tokenizer_with_template(tmp_path, template)
    with pytest.raises(TemplateError, match=pattern):
        tok.render_chat([USER_HI])
