"""A model folder's tokenizer and chat template, with the `tokenizers` library and Jinja2 (no transformers).

Token ids and rendered prompts equal what transformers 5 produces for the same folder
(`AutoTokenizer.from_pretrained(folder)`, `apply_chat_template`), because a model only answers well when it
sees its prompts exactly as it was tuned on them. Where transformers 5 does not use `tokenizer.json` as is,
the rules that change token ids are mirrored here (see `_match_transformers_loading`).

Chat templates come with downloaded checkpoints, so they are untrusted code: they run in Jinja's immutable
sandbox, and every way a template can fail surfaces as a one-line `TemplateError`. The sandbox also bounds
what a template can cost: rendering stops after TEMPLATE_TIME_LIMIT_S (endless loops), the prompt and every
string, list or number the template builds stay under MAX_TEMPLATE_CHARS (`'x' * 10**9` is refused before it
is allocated), and tojson's indent and strftime_now's format are limited.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import jinja2.utils
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers

from engine.checkpoint import MAX_JSON_BYTES, check_regular_file, read_json
from engine.errors import CheckpointError, RenderCancelled, TemplateError
from engine.gguf.header import cached_gguf, is_gguf_path
from engine.gguf.tokenizer import build_tokenizer

log = logging.getLogger(__name__)

# Used when a checkpoint has no chat template: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then
# "<|im_start|>assistant\n" when a reply is wanted. ChatML is what most small chat models are tuned on.
CHATML_FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The special tokens transformers passes to chat templates as variables (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

TEMPLATE_TIME_LIMIT_S = 5.0  # a real chat template renders in milliseconds
CANCEL_POLL_S = 0.05  # how often a render looks at its request's cancel event (Esc stops it this soon)
MAX_TEMPLATE_CHARS = 8_000_000  # ~2M tokens: above any context window; also the cap on any value built
MAX_TEMPLATE_INT_BITS = 4096  # numbers a template computes (10**10**9 would take minutes of CPU)
MAX_TOJSON_INDENT = 16
MAX_TEMPLATE_FILE_BYTES = 4 << 20  # chat_template.jinja files are tens of kilobytes
MAX_STRFTIME_FORMAT = 256

# Names a message's reasoning goes by; templates read the first, transformers fills it (and `thinking`) from any.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTokenizer:
    """Text <-> token ids, and chat messages -> prompt text via the checkpoint's chat template."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: Mapping[str, str], chat_template: str | None) -> None:
        """`special_tokens` maps names in SPECIAL_TOKEN_NAMES to token text; None as template means ChatML."""
        self._tokenizer = tokenizer
        self._special_tokens = {name: text for name, text in special_tokens.items() if name in SPECIAL_TOKEN_NAMES}
        self.bos_token: str | None = self._special_tokens.get("bos_token")
        self.eos_token: str | None = self._special_tokens.get("eos_token")
        self.pad_token: str | None = self._special_tokens.get("pad_token")
        self.eos_token_id: int | None = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.has_chat_template = chat_template is not None
        self.chat_template: str = chat_template if chat_template is not None else CHATML_FALLBACK_TEMPLATE
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def load(cls, model_path: str | Path) -> ChatTokenizer:
        """The tokenizer of a checkpoint folder or of a GGUF file."""
        return cls.from_gguf(model_path) if is_gguf_path(model_path) else cls.from_dir(Path(model_path))

    @classmethod
    def from_gguf(cls, path: str | Path) -> ChatTokenizer:
        """Built from the file's tokenizer.ggml.* metadata (engine.gguf.tokenizer); template: tokenizer.chat_template."""
        gguf_file = cached_gguf(path)
        tokenizer, special_tokens = build_tokenizer(gguf_file)
        chat_template = gguf_file.value("tokenizer.chat_template", str, None) or None
        if chat_template is None:
            log.warning("%s: no chat template; using the ChatML fallback, which may not suit this model", gguf_file.path)
        return cls(tokenizer, special_tokens, chat_template)

    @classmethod
    def from_dir(cls, model_dir: Path) -> ChatTokenizer:
        """Load tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
        model_dir = Path(model_dir)
        tokenizer = _load_tokenizer_json(model_dir / "tokenizer.json")
        config = _read_optional_json(model_dir / "tokenizer_config.json")
        special_tokens_map = _read_optional_json(model_dir / "special_tokens_map.json")
        model_config = _read_optional_json(model_dir / "config.json")

        _check_field_types(model_dir / "tokenizer_config.json", config)
        _check_field_types(model_dir / "config.json", {"tokenizer_class": model_config.get("tokenizer_class")})
        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name)) or _token_text(special_tokens_map.get(name))
            if text:
                special_tokens[name] = text
        _match_transformers_loading(tokenizer, config, model_config, special_tokens)

        chat_template = _read_chat_template(model_dir, config)
        if chat_template is None:
            log.warning("%s: no chat template; using the ChatML fallback, which may not suit this model", model_dir)
        return cls(tokenizer, special_tokens, chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens adds what the tokenizer adds around a text (e.g. BOS)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ids, by the tokenizer's own decoder only.

        Unlike transformers, `clean_up_tokenization_spaces` is never applied: streaming output decodes growing
        prefixes of a reply and prints the new part, which relies on decode being a pure function of the ids
        that never rewrites text it already returned.
        """
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token's text decoded on its own, special tokens kept, for showing tokens one by one.

        A token that is only part of a UTF-8 character shows as U+FFFD; a decoder that strips the text's
        first space (SentencePiece-style) shows a word-initial token without its space.
        """
        return [self._tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None, *,
        cancel: threading.Event | None = None, **extra: Any
    ) -> str:
        """The prompt text for messages, as transformers' `apply_chat_template(..., tokenize=False)` renders it.

        tools are JSON schemas (dicts); extra (e.g. `documents`, `enable_thinking`) is passed to the template
        as variables and overrides the special tokens of the same name. Setting `cancel` stops a render that
        is still running within CANCEL_POLL_S (RenderCancelled).
        """
        context = {
            **self._special_tokens,
            "documents": None,
            **extra,
            "messages": _template_messages(messages),
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        template = self._template
        try:
            return _render_bounded(template, context, cancel)
        except (TemplateError, RenderCancelled):
            raise  # TemplateError from raise_exception(): the template's own message
        except jinja2.exceptions.SecurityError as e:
            where = _at_line(e.__traceback__)
            raise TemplateError(f"chat template tried an unsafe operation{where}: {_one_line(e)}") from None
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"chat template failed{_at_line(e.__traceback__)}: {_one_line(e)}") from None
        except Exception as e:  # a template is a program: it can fail with any Python error
            where = _at_line(e.__traceback__)
            raise TemplateError(f"chat template failed{where}: {type(e).__name__}: {_one_line(e)}") from None

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None, **extra: Any
    ) -> list[int]:
        """Token ids of render_chat's text, adding no BOS/EOS (the template writes them), as transformers does."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra)
        return self.encode(text, add_special_tokens=False)

    @cached_property
    def _template(self) -> jinja2.Template:
        """Compiled on first use, so a broken template only stops chat, not loading the model."""
        try:
            return _ENVIRONMENT.from_string(self.chat_template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TemplateError(f"chat template syntax error at line {e.lineno}: {_one_line(e.message)}") from None


def _load_tokenizer_json(path: Path) -> Tokenizer:
    if not path.exists():
        raise CheckpointError(f"{path}: file not found (the model folder needs its tokenizer.json)")
    check_regular_file(path, MAX_JSON_BYTES)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises plain Exception
        raise CheckpointError(f"{path}: not a valid tokenizer file ({_one_line(e)})") from None


def _read_optional_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.exists() else {}


_FIELD_TYPES = {  # tokenizer_config.json fields whose type this module relies on
    "tokenizer_class": (str, "a string"),
    "additional_special_tokens": (list, "a list of tokens"),
    "extra_special_tokens": ((list, dict), "a list or an object of tokens"),
}


def _check_field_types(path: Path, config: dict[str, Any]) -> None:
    for key, (kind, description) in _FIELD_TYPES.items():
        value = config.get(key)
        if value is not None and not isinstance(value, kind):
            raise CheckpointError(f"{path}: {key!r} must be {description}, got {type(value).__name__} {value!r}")


def _token_text(value: Any) -> str | None:
    """A token as written in tokenizer configs: a string or an AddedToken-style {"content": ...} dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json's chat_template (a string or a list of named ones)."""
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.exists():
        check_regular_file(jinja_path, MAX_TEMPLATE_FILE_BYTES)
        try:
            return jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jinja_path}: cannot read ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{model_dir / 'tokenizer_config.json'}: chat_template is not a string")
    return template or None


def _match_transformers_loading(
    tokenizer: Tokenizer, config: dict[str, Any], model_config: dict[str, Any], special_tokens: dict[str, str]
) -> None:
    """Adjust a loaded tokenizer.json the ways transformers 5's AutoTokenizer does that change token ids.

    1. A folder that declares `LlamaTokenizer` (no config.json, or model_type llama) with a SentencePiece-style
       tokenizer.json is rebuilt by transformers with a Metaspace pre-tokenizer instead of the file's
       normalizer: no extra "▁" after special tokens unless `legacy` is true. Other model types (mistral, phi3,
       ...) are loaded from tokenizer.json as is.
    2. Special tokens named in tokenizer_config.json but missing from tokenizer.json become added tokens.
    3. `split_special_tokens: true` encodes special-token text as plain text.

    BOS/EOS come from tokenizer.json's post-processor alone: transformers ignores `add_bos_token` and
    `add_eos_token` when a tokenizer.json exists.
    """
    declared_class = config.get("tokenizer_class") or model_config.get("tokenizer_class") or ""
    if (
        declared_class.removesuffix("Fast") == "LlamaTokenizer"
        and model_config.get("model_type") in (None, "", "llama")
        and not _is_byte_level(tokenizer)
    ):
        add_prefix_space = config.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        scheme = ("always" if config.get("legacy") else "first") if add_prefix_space else "never"
        tokenizer.normalizer = None
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1))
        tokenizer.decoder = decoders.Sequence(steps)

    declared = list(special_tokens.values())
    extra = config.get("extra_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
    for value in [*(config.get("additional_special_tokens") or []), *extra]:
        if text := _token_text(value):
            declared.append(text)
    present = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    missing = list(dict.fromkeys(text for text in declared if text not in present))
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in missing])

    tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether a component is ByteLevel (GPT-2-style), which transformers loads as is whatever the class."""
    parts = (tokenizer.pre_tokenizer, tokenizer.decoder, tokenizer.post_processor)
    return any(part is not None and b'"ByteLevel"' in part.__getstate__() for part in parts)


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers hands them to templates: None-valued keys dropped, reasoning under every name."""
    result = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        result.append(message)
    return result


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


def _at_line(tb: TracebackType | None) -> str:
    """' at line N' of the innermost template frame (Jinja rewrites tracebacks to point into the template)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" at line {line}" if line is not None else ""


# --- Bounds on what a template may cost. ---


class _RenderTimeout(BaseException):
    """Raised into the rendering thread at the deadline; a BaseException so nothing on the way catches it."""


class _RenderCancelled(BaseException):
    """Raised into the rendering thread once its request is cancelled."""


def _render_bounded(template: jinja2.Template, context: dict[str, Any], cancel: threading.Event | None) -> str:
    """template.render(context), stopped at TEMPLATE_TIME_LIMIT_S, at MAX_TEMPLATE_CHARS of output or once
    cancel is set."""
    pieces, size = [], 0

    def render() -> str:
        nonlocal size
        for piece in template.generate(context):
            size += len(piece)
            if size > MAX_TEMPLATE_CHARS:
                raise TemplateError(f"chat template produced more than {MAX_TEMPLATE_CHARS:,} characters")
            pieces.append(piece)
        return "".join(pieces)

    try:
        return _with_deadline(render, TEMPLATE_TIME_LIMIT_S, cancel)
    except _RenderTimeout:
        raise TemplateError(
            f"chat template took more than {TEMPLATE_TIME_LIMIT_S:g} s to render (an endless or huge loop?)"
        ) from None
    except _RenderCancelled:
        raise RenderCancelled("cancelled while the chat template was rendering") from None


def _with_deadline(run: Callable[[], str], seconds: float, cancel: threading.Event | None = None) -> str:
    """run() in this thread, interrupted with _RenderTimeout once seconds have passed, or with _RenderCancelled
    within CANCEL_POLL_S of cancel being set.

    A watchdog thread raises the exception asynchronously in this thread (PyThreadState_SetAsyncExc), which
    stops pure-Python work such as a template's loops wherever it is; single huge C operations are what the
    value limits below prevent."""
    thread_id = threading.get_ident()
    lock = threading.Lock()
    finished = threading.Event()
    fired = False

    def fire(exception: type[BaseException]) -> None:
        nonlocal fired
        with lock:
            if not finished.is_set():
                fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exception))

    def watch() -> None:
        deadline = time.monotonic() + seconds
        step = seconds if cancel is None else CANCEL_POLL_S
        while not finished.wait(max(0.0, min(step, deadline - time.monotonic()))):
            if cancel is not None and cancel.is_set():
                return fire(_RenderCancelled)
            if time.monotonic() >= deadline:
                return fire(_RenderTimeout)

    watchdog = threading.Thread(target=watch, name="template-watchdog", daemon=True)
    watchdog.start()
    try:
        return run()
    finally:
        with lock:
            finished.set()
            if fired:  # fired after run() ended: take back the exception not yet raised
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


def _too_big(what: str) -> jinja2.exceptions.SecurityError:
    return jinja2.exceptions.SecurityError(f"{what} (the limit is {MAX_TEMPLATE_CHARS:,})")


def _check_size(value: Any) -> None:
    """Refuse a string or sequence longer than MAX_TEMPLATE_CHARS, or a number of more than MAX_TEMPLATE_INT_BITS."""
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > MAX_TEMPLATE_CHARS:
        raise _too_big(f"a value of {len(value):,} characters or items")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_TEMPLATE_INT_BITS:
        raise jinja2.exceptions.SecurityError(f"a number of {value.bit_length():,} bits")


def _check_arguments(args: tuple, kwargs: dict, counts: bool) -> None:
    """A call's arguments: sizes, and with counts (the callee takes widths or counts: `'x'.center(10**9)`)
    no integer above MAX_TEMPLATE_CHARS."""
    for value in (*args, *kwargs.values()):
        _check_size(value)
        if counts and isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEMPLATE_CHARS:
            raise _too_big(f"a count or width of {value:,}")


# Filters whose integer arguments are widths or counts of what they build.
_WIDTH_FILTERS = frozenset({"center", "indent", "truncate", "wordwrap", "batch", "slice", "tojson"})


def _takes_counts(function: Any) -> bool:
    """Whether a callable is a method of a string or sequence (center, ljust, zfill, expandtabs, ...)."""
    return isinstance(getattr(function, "__self__", None), (str, bytes, list, tuple))


_FORMAT_WIDTH = re.compile(r"%[-+ #0]*\d{8,}|%[-+ #0]*\d*\.\d{8,}|\{[^{}]*:[^{}]*\d{8,}[^{}]*\}")


def _check_format(text: Any) -> None:
    """Refuse `'%1000000000d' % x` and `'{:>1000000000}'.format(x)` before they allocate."""
    if isinstance(text, str) and _FORMAT_WIDTH.search(text):
        raise _too_big("a format width")


def _binop_result_size(operator: str, left: Any, right: Any) -> None:
    sequences = (str, bytes, list, tuple)
    if operator == "*":
        count, seq = (right, left) if isinstance(left, sequences) else (left, right)
        if isinstance(seq, sequences) and isinstance(count, int) and len(seq) * max(count, 0) > MAX_TEMPLATE_CHARS:
            raise _too_big(f"repeating {len(seq):,} characters or items {count:,} times")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_TEMPLATE_INT_BITS:
            raise jinja2.exceptions.SecurityError(f"a product of more than {MAX_TEMPLATE_INT_BITS:,} bits")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and left.bit_length() * right > MAX_TEMPLATE_INT_BITS:
            raise jinja2.exceptions.SecurityError(f"a power of more than {MAX_TEMPLATE_INT_BITS:,} bits")
    elif operator == "+":
        if isinstance(left, sequences) and isinstance(right, sequences) and len(left) + len(right) > MAX_TEMPLATE_CHARS:
            raise _too_big(f"a concatenation of {len(left) + len(right):,} characters or items")
    elif operator == "%" and isinstance(left, str):
        _check_format(left)
        _check_arguments(right if isinstance(right, tuple) else (right,), {}, counts="*" in left)  # '%*s' widths


def _bounded_filter(name: str, function: Callable) -> Callable:
    """A Jinja filter whose arguments are checked first (filters are called directly, not through call())."""

    @functools.wraps(function)  # keeps Jinja's pass_context / pass_environment marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        values = tuple(a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment)))
        _check_arguments(values, kwargs, counts=name in _WIDTH_FILTERS)
        if name == "format" and args:
            _check_format(args[0])
        return function(*args, **kwargs)

    return bounded


class _BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    """Compiles `a ~ b` to a size-checked join (Jinja's own str_join is out of the sandbox's reach)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: jinja2.compiler.Frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


# --- The template environment: what transformers' chat_template_utils gives templates. ---


def _raise_exception(message: object) -> None:
    raise TemplateError(f"chat template raised: {_one_line(message)}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Plain json.dumps: Jinja's own tojson HTML-escapes, which would change prompts."""
    width = len(indent) if isinstance(indent, str) else indent or 0
    if width > MAX_TOJSON_INDENT:
        raise jinja2.exceptions.SecurityError(f"tojson indent of {width:,} (the limit is {MAX_TOJSON_INDENT})")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    if len(format) > MAX_STRFTIME_FORMAT or re.search(r"%[-_0^#]*\d", format):
        raise jinja2.exceptions.SecurityError(
            f"strftime_now format of {len(format):,} characters or with a field width (at most {MAX_STRFTIME_FORMAT}, no widths)"
        )
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace(), refusing underscore names so templates cannot reach Python internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # no named self: `namespace(self=...)` must still work
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        _check_size(value)  # a namespace is the one place a template can grow a value across loop iterations
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}` ... `{% endgeneration %}` marks assistant text for training masks; we keep the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' sandbox, except that reading an unsafe attribute fails at once.

    Jinja renders a lone `{{ x.__globals__ }}` as an empty string and only fails when the result is used;
    a template that probes Python internals is hostile, and saying so beats rendering a quietly wrong prompt.
    """

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _binop_result_size(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_arguments(args, kwargs, counts=_takes_counts(__obj))
        result = super().call(__context, __obj, *args, **kwargs)
        _check_size(result)
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)  # `text.format`: checked when read, before any call
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped

    def concat(self, parts: tuple) -> str:
        texts = [str(part) for part in parts]
        if sum(map(len, texts)) > MAX_TEMPLATE_CHARS:
            raise _too_big(f"a ~ concatenation of {sum(map(len, texts)):,} characters")
        return "".join(texts)


def _make_environment() -> _Sandbox:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENVIRONMENT = _make_environment()
