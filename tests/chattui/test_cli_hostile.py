"""`chattui generate` and `attention` against hostile models and broken environments: escape sequences in a
reply, invalid UTF-8 on stdin and in argv, numbers at the edges, NaN logits, Ctrl-C, a closed or full stdout.
Every failure is one `chattui:` line on stderr, never a traceback."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoints import make_checkpoint, make_hostile_checkpoint, set_tensor

from chattui.cli import main

ROOT = Path(__file__).resolve().parents[2]
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b1m"  # set the window title, clear the screen, a C1 CSI


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    return make_hostile_checkpoint(tmp_path_factory.mktemp("hostile"), ESCAPES)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, tokenizer) -> Path:
    folder = make_checkpoint(tmp_path_factory.mktemp("nan"), "llama", tokenizer)
    return set_tensor(folder, "lm_head.weight", float("nan"))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def cli(capsys):
    def run(*argv) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_line_error(code: int, err: str, needle: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("chattui: error: "), err
    assert needle in lines[0] and "Traceback" not in err
    return lines[0]


GREEDY = ("--temperature", "0", "--max-new-tokens", "3")


# -- 1. terminal injection --------------------------------------------------------------------------------------


def test_a_reply_of_escape_sequences_reaches_a_terminal_as_visible_marks(hostile, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["generate", "--model", str(hostile), *GREEDY, "hi"]) == 0
    shown = terminal.getvalue()
    assert shown == " ".join(["␛]0;pwned␇␛[2J\ufffd1m"] * 3) + "\n"


def test_a_pipe_gets_the_exact_bytes_and_json_the_exact_text_without_raw_controls(cli, hostile):
    code, out, err = cli("generate", "--model", hostile, *GREEDY, "hi")
    assert code == 0 and out == " ".join([ESCAPES] * 3) + "\n", "pipes get the reply as the model wrote it"
    code, out, err = cli("generate", "--model", hostile, *GREEDY, "--json", "hi")
    assert code == 0 and json.loads(out)["text"] == " ".join([ESCAPES] * 3)
    assert not any(ch in out for ch in "\x1b\x07\x9b"), "escaped inside the JSON string"


def test_a_template_error_message_cannot_drive_the_terminal(cli, hostile, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in hostile.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "chat_template.jinja").write_text("{{ raise_exception('\\x1b[2Jgotcha') }}")
    line = one_line_error(*cli("generate", "--model", folder, "hi")[::2], "gotcha")
    assert "\x1b" not in line and "␛[2Jgotcha" in line


# -- 6. invalid UTF-8 ------------------------------------------------------------------------------------------


def test_invalid_utf8_on_stdin_is_replaced_with_a_warning(cli, hostile, monkeypatch, caplog):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello \xff\xfe")))
    code, out, err = cli("generate", "--model", hostile, "--raw", "--show-prompt", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["prompt"] == "hello \ufffd\ufffd"
    assert "standard input is not valid UTF-8 (byte 6)" in caplog.text and "Traceback" not in err


def test_invalid_utf8_in_argv_is_replaced_with_a_warning(cli, hostile, caplog):
    argv_text = b"hello \xff".decode("utf-8", "surrogateescape")  # what Python makes of such an argv
    code, out, err = cli("generate", "--model", hostile, "--raw", "--show-prompt", "--json", argv_text)
    assert code == 0 and json.loads(out)["prompt"] == "hello \ufffd"
    assert "PROMPT is not valid UTF-8" in caplog.text
    caplog.clear()
    code, out, err = cli("attention", "--model", hostile, "--raw", "--layer", "0", "--head", "0", argv_text)
    assert code == 0 and "PROMPT is not valid UTF-8" in caplog.text
    assert len(json.loads(out)["tokens"]) == 2  # "hello" and "\ufffd" (both unknown words to this vocabulary)


# -- 7. numbers at the edges, NaN logits ---------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (("--seed", str(2**64)), "seed must be in [0, 2**64)"),
    (("--seed", "-1"), "seed must be in [0, 2**64)"),
    (("--repetition-penalty", "1e-40"), "repetition penalty must be in [0.01, 100]"),
    (("--temperature", "inf"), "temperature must be >= 0 and finite"),
    (("--temperature", "nan"), "temperature"),
])
def test_numbers_at_the_edges_are_refused_in_one_line(cli, hostile, args, needle):
    one_line_error(*cli("generate", "--model", hostile, *args, "hi")[::2], needle)


def test_a_tiny_temperature_samples_the_top_token_instead_of_failing(cli, tokenizer, tmp_path):
    folder = make_checkpoint(tmp_path / "m", "llama", tokenizer)
    code, greedy, err = cli("generate", "--model", folder, "--temperature", "0", "--max-new-tokens", "8", "--json", "hi")
    code2, tiny, err2 = cli("generate", "--model", folder, "--temperature", "1e-45", "--max-new-tokens", "8",
                            "--json", "hi")
    assert code == code2 == 0, err + err2
    assert json.loads(tiny)["token_ids"] == json.loads(greedy)["token_ids"]


@pytest.mark.parametrize("temperature", ["0", "0.7"])
def test_nan_logits_stop_the_reply_saying_the_model_produced_nan(cli, nan_model, temperature):
    one_line_error(*cli("generate", "--model", nan_model, "--temperature", temperature, "hi")[::2],
                   "the model produced NaN logits")


# -- 9. signals and pipes (real processes) -----------------------------------------------------------------------


def chattui(*argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chattui", *map(str, argv)], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_ctrl_c_while_loading_exits_130_with_one_line(hostile):
    proc = chattui("generate", "--model", hostile, "--max-new-tokens", "100000", "hi", stdout=subprocess.DEVNULL)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:  # inside main, loading the engine
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # a second Ctrl-C ends it whatever it was doing
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "chattui: interrupted"


def test_a_full_stdout_is_one_line_and_exit_1(hostile):
    with open("/dev/full", "w") as full:
        proc = chattui("generate", "--model", hostile, *GREEDY, "hi", stdout=full)
        err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1 and err.strip() == "chattui: error: cannot write the output (No space left on device)"


def test_stdout_closed_early_is_one_line_and_exit_1(hostile):
    proc = chattui("generate", "--model", hostile, "--temperature", "0", "--max-new-tokens", "200", "hi",
                   stdout=subprocess.PIPE)
    proc.stdout.close()  # the reader went away (`| head -c0`)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1 and err.strip() == "chattui: error: cannot write the output (Broken pipe)"
