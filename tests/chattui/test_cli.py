"""`chattui generate` and `chattui bench`, run in-process through chattui.cli.main on tiny checkpoints.

Greedy ids are compared with transformers' own generate on the same folder, shown prompts with transformers'
apply_chat_template; every user error must be one `chattui: error:` line and exit code 1, never a traceback.
One test runs `python -m chattui` in a subprocess to prove the entry point itself.
"""

from __future__ import annotations

import importlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoints import hf_model, hf_tokenizer  # noqa: E402

import chattui.cli  # noqa: E402
from chattui.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

JSON_TYPES = {
    "text": str,
    "token_ids": list,
    "prompt_tokens": int,
    "generated_tokens": int,
    "finish_reason": str,
    "ttft_s": float,
    "prefill_tokens_per_s": float,
    "decode_tokens_per_s": float,
    "device": str,
    "dtype": str,
    "model": str,
}


@pytest.fixture(scope="module")
def qwen2(checkpoint_factory) -> Path:
    return checkpoint_factory("qwen2")


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit code, stdout, stderr) of chattui.cli.main, in-process."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop whatever fixtures printed while being built
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_json(stdout: str) -> dict:
    lines = stdout.splitlines()
    assert len(lines) == 1, f"expected exactly one line of JSON, got {stdout!r}"
    value = json.loads(lines[0])
    assert isinstance(value, dict)
    return value


def chat_messages(user: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}
    ]


# -- generate --json ---------------------------------------------------------------------------


def test_generate_json_prints_one_object_with_typed_fields(cli, qwen2):
    code, out, err = cli("generate", "--model", qwen2, "--temperature", "0", "--max-new-tokens", "12", "--json", "hi")
    assert code == 0, err
    result = one_json(out)
    for key, kind in JSON_TYPES.items():
        assert key in result, f"missing key {key}"
        assert isinstance(result[key], kind), f"{key}={result[key]!r} is not {kind.__name__}"
    assert all(type(t) is int for t in result["token_ids"])
    assert result["generated_tokens"] == len(result["token_ids"]) <= 12
    assert result["finish_reason"] in {"eos", "stop", "length"}
    assert result["finish_reason"] != "length" or result["generated_tokens"] == 12
    assert result["prompt_tokens"] > 0
    assert result["ttft_s"] > 0 and result["prefill_tokens_per_s"] > 0
    assert result["device"] == "cpu"
    assert result["dtype"] in {"float32", "bfloat16"}
    assert Path(result["model"]) == qwen2


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_generate_greedy_float32_token_ids_equal_transformers_generate(cli, checkpoint_factory, family):
    folder = checkpoint_factory(family)
    code, out, err = cli(
        "generate", "--model", folder, "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "12",
        "--json", "hi",
    )
    assert code == 0, err
    ours = one_json(out)

    tok = hf_tokenizer(folder)
    prompt = tok.apply_chat_template(chat_messages("hi"), add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    model = hf_model(folder)
    with torch.inference_mode():
        output = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, eos_token_id=2,
            pad_token_id=0,
        )
    theirs = output[0, ids.shape[1]:].tolist()
    assert ours["prompt_tokens"] == ids.shape[1]
    if theirs[-1] == 2:  # eos: transformers keeps it, the CLI reports the ids before it
        assert ours["finish_reason"] == "eos"
        theirs = theirs[:-1]
    else:
        assert ours["finish_reason"] == "length"
    assert ours["token_ids"] == theirs
    assert ours["text"] == tok.decode(theirs, skip_special_tokens=True)


def test_plain_output_equals_json_text_plus_newline(cli, qwen2):
    args = ("generate", "--model", qwen2, "--temperature", "0.9", "--top-k", "0", "--seed", "1234",
            "--max-new-tokens", "16", "hi")
    code, out_json, err = cli(*args[:-1], "--json", "hi")
    assert code == 0, err
    result = one_json(out_json)
    assert result["seed"] == 1234
    code, out_plain, err = cli(*args)
    assert code == 0, err
    assert out_plain == result["text"] + "\n"


def test_same_seed_reproduces_and_another_seed_differs(cli, qwen2):
    def ids(seed):
        code, out, err = cli("generate", "--model", qwen2, "--temperature", "1.5", "--top-k", "0", "--top-p", "1",
                             "--seed", seed, "--max-new-tokens", "12", "--json", "hi")
        assert code == 0, err
        return one_json(out)["token_ids"]

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)


# -- --show-prompt, --system, --raw, stdin ------------------------------------------------------------


def test_show_prompt_prints_exactly_the_rendered_chat_prompt_and_token_count(cli, qwen2):
    code, out, err = cli("generate", "--model", qwen2, "--show-prompt", "hi there")
    assert code == 0
    tok = hf_tokenizer(qwen2)
    expected = tok.apply_chat_template(chat_messages("hi there"), add_generation_prompt=True, tokenize=False)
    assert out == expected
    n = len(tok(expected, add_special_tokens=False).input_ids)
    assert err == f"{n} tokens\n"


def test_show_prompt_json_prints_prompt_and_token_count_only(cli, qwen2):
    code, out, err = cli("generate", "--model", qwen2, "--show-prompt", "--json", "hi there")
    assert code == 0, err
    result = one_json(out)
    assert set(result) == {"prompt", "prompt_tokens"}
    tok = hf_tokenizer(qwen2)
    expected = tok.apply_chat_template(chat_messages("hi there"), add_generation_prompt=True, tokenize=False)
    assert result["prompt"] == expected
    assert result["prompt_tokens"] == len(tok(expected, add_special_tokens=False).input_ids)


def test_system_prompt_appears_in_shown_prompt(cli, qwen2):
    code, out, _ = cli("generate", "--model", qwen2, "--system", "You are terse.", "--show-prompt", "hi")
    assert code == 0
    expected = hf_tokenizer(qwen2).apply_chat_template(
        chat_messages("hi", system="You are terse."), add_generation_prompt=True, tokenize=False
    )
    assert out == expected
    assert out.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")


def test_raw_prompt_is_tokenized_as_is(cli, qwen2):
    text = "The quick brown fox"
    code, out, err = cli("generate", "--model", qwen2, "--raw", "--temperature", "0", "--max-new-tokens", "3",
                         "--json", text)
    assert code == 0, err
    assert one_json(out)["prompt_tokens"] == len(hf_tokenizer(qwen2)(text).input_ids)
    code, out, err = cli("generate", "--model", qwen2, "--raw", "--show-prompt", text)
    assert code == 0
    assert out == text  # no chat template around it
    assert err == f"{len(hf_tokenizer(qwen2)(text).input_ids)} tokens\n"


def test_dash_reads_the_prompt_from_stdin(cli, qwen2, monkeypatch):
    text = "Tell me\na story about 你好"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    code, out, err = cli("generate", "--model", qwen2, "--show-prompt", "--json", "-")
    assert code == 0, err
    expected = hf_tokenizer(qwen2).apply_chat_template(chat_messages(text), add_generation_prompt=True, tokenize=False)
    assert one_json(out)["prompt"] == expected


# -- --stop -----------------------------------------------------------------------------------


def test_stop_string_cuts_the_reply_before_it(cli, qwen2):
    base = ("generate", "--model", qwen2, "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "12")
    code, out, err = cli(*base, "--json", "hi")
    assert code == 0, err
    full = one_json(out)["text"]
    assert len(full) >= 6, f"precondition: the greedy reply is long enough to cut ({full!r})"
    stop = full[2:5]
    cut = full.index(stop)
    code, out, err = cli(*base, "--stop", stop, "--json", "hi")
    assert code == 0, err
    result = one_json(out)
    assert result["finish_reason"] == "stop"
    assert result["text"] == full[:cut]
    code, out, err = cli(*base, "--stop", "no such string", "--stop", stop, "hi")
    assert code == 0, err
    assert out == full[:cut] + "\n"


# -- errors: one line, exit code 1 --------------------------------------------------------------


@pytest.fixture
def unsupported_arch(qwen2, tmp_path) -> Path:
    folder = tmp_path / "falcon"
    shutil.copytree(qwen2, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    config["model_type"] = "falcon"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 1
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one error line, got {err!r}"
    assert lines[0].startswith("chattui: error: ")
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_error_nonexistent_model_dir(cli, tmp_path):
    missing = tmp_path / "no-such-model"
    assert_one_line_error(*cli("generate", "--model", missing, "hi"), str(missing))


def test_error_unsupported_architecture(cli, unsupported_arch):
    assert_one_line_error(*cli("generate", "--model", unsupported_arch, "hi"), "FalconForCausalLM")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--top-p", "1.5"), "top-p"),
        (("--temperature", "-1"), "temperature"),
        (("--top-k", "-3"), "top-k"),
        (("--min-p", "1"), "min-p"),
        (("--repetition-penalty", "0"), "repetition penalty"),
        (("--max-new-tokens", "0"), "max-new-tokens"),
        (("--raw", "--system", "be nice"), "--system"),
    ],
)
def test_error_bad_generate_option(cli, qwen2, args, needle):
    assert_one_line_error(*cli("generate", "--model", qwen2, *args, "hi"), needle)


def test_error_missing_default_model_when_model_omitted(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(chattui.cli, "DEFAULT_MODEL_DIR", tmp_path)
    line = assert_one_line_error(*cli("generate", "hi"), "--model")
    assert str(tmp_path) in line


def test_error_prompt_longer_than_context(cli, qwen2):
    assert_one_line_error(*cli("generate", "--model", qwen2, "--raw", "word " * 400), "context")


# -- the entry point --------------------------------------------------------------------------


def test_console_script_entry_point_resolves_to_cli_main():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["chattui"].partition(":")
    assert getattr(importlib.import_module(module), attr) is main


def test_python_dash_m_chattui_generates_json_in_a_subprocess(qwen2):
    proc = subprocess.run(
        [sys.executable, "-m", "chattui", "generate", "--model", str(qwen2), "--temperature", "0",
         "--max-new-tokens", "5", "--json", "hi"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = one_json(proc.stdout)
    assert set(JSON_TYPES) <= set(result)
    assert 1 <= result["generated_tokens"] == len(result["token_ids"]) <= 5
    assert Path(result["model"]) == qwen2


def test_python_dash_m_chattui_error_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "chattui", "generate", "--model", str(tmp_path / "missing"), "hi"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)


# -- bench ------------------------------------------------------------------------------------


def test_bench_json_reports_positive_decode_speed(cli, qwen2):
    code, out, err = cli("bench", "--model", qwen2, "--new-tokens", "4", "--prompt-tokens", "8", "--repeat", "1",
                         "--json")
    assert code == 0, err
    report = one_json(out)
    assert report["chattui"]["decode_tokens_per_s"] > 0
    assert report["prompt_tokens"] == 8 and report["new_tokens"] == 4 and report["repeat"] == 1
    assert "transformers" not in report and "ratios" not in report


def test_bench_compare_hf_reports_ratios(cli, qwen2):
    code, out, err = cli("bench", "--model", qwen2, "--new-tokens", "4", "--prompt-tokens", "8", "--repeat", "1",
                         "--dtype", "float32", "--compare-hf", "--json")
    assert code == 0, err
    report = one_json(out)
    assert report["transformers"]["decode_tokens_per_s"] > 0
    assert report["transformers"]["weight_bytes_per_token"] == report["chattui"]["weight_bytes_per_token"]
    for key in ("decode_speedup", "prefill_speedup", "ttft_ratio"):
        assert report["ratios"]["transformers"][key] > 0


def test_bench_compare_llamacpp_without_llama_cpp_is_a_one_line_error(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(20))  # the check comes before the file is read
    assert_one_line_error(*cli("bench", "--model", path, "--compare-llamacpp", "--json"),
                          "--compare-llamacpp needs llama-cpp-python", "[bench]")


def test_bench_prompt_longer_than_context_is_a_one_line_error(cli, qwen2):
    # The tiny checkpoint's context is 256 positions.
    assert_one_line_error(
        *cli("bench", "--model", qwen2, "--new-tokens", "4", "--prompt-tokens", "300", "--repeat", "1", "--json"),
        "context",
    )


def test_generate_says_when_the_cpu_kernels_compile(cli, qwen2, monkeypatch, tmp_path):
    import engine.kernels as kernels

    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))  # the build fails at once: PyTorch's kernels run
    monkeypatch.setattr(kernels, "cpu_has_avx512_bf16", lambda: True)
    kernels.bf16_decode_ops.cache_clear()
    try:
        code, out, err = cli("generate", "--model", qwen2, "--device", "cpu", "--dtype", "bfloat16",
                             "--temperature", "0", "--max-new-tokens", "2", "hi")
    finally:
        kernels.bf16_decode_ops.cache_clear()
    assert code == 0 and f"chattui: {kernels.BUILD_NOTE}" in err.splitlines()


def test_version_prints_the_installed_version_without_importing_torch():
    import os
    import re
    from importlib.metadata import version

    code = "from chattui.cli import main; main(['--version'])"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout == f"chattui {version('chattui')}\n"
    assert not re.search(r"\|\s+torch$", done.stderr, re.M), "torch was imported"
