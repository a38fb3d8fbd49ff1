"""Bare `chattui` (and `chattui --model DIR --device D --dtype D`) opens the app; every subcommand still
goes to its own parser; bad app options are one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import chattui.app
from chattui.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def launched(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(chattui.app, "run_app", lambda *args: calls.append(args) or 0)
    return calls


def test_bare_chattui_opens_the_app_on_the_default_model(launched):
    assert main([]) == 0
    assert launched == [(None, None, None, None)]


def test_model_device_and_dtype_are_passed_to_the_app(launched, tmp_path):
    assert main(["--model", str(tmp_path), "--device", "cpu", "--dtype", "float32"]) == 0
    assert launched == [(str(tmp_path.resolve()), "cpu", "float32", None)]


def test_an_adapter_is_passed_to_the_app(launched, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["--model", str(tmp_path), "--adapter", str(tmp_path / "adapter")]) == 0
    assert launched == [(str(tmp_path.resolve()), None, None, str((tmp_path / "adapter").resolve()))]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["--device", "gpu"], "unknown device 'gpu'"), (["--dtype", "int4"], "unknown dtype 'int4'"),
     (["--model", "/no/such/folder"], "/no/such/folder: no such file or folder"),
     (["--adapter", "/no/such/adapter"], "/no/such/adapter: not a LoRA adapter folder (no adapter_config.json)")],
)
def test_bad_app_options_are_one_line_errors(launched, capsys, argv, needle):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("chattui: error: ") and needle in err and err.count("\n") == 1
    assert launched == []


def test_help_still_lists_the_subcommands_and_the_app_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "bench" in out and "--model MODEL" in out and "pull" in out and "models" in out


def test_a_subcommand_is_not_mistaken_for_the_app(launched, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--raw" in capsys.readouterr().out
    assert launched == []


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, chattui.cli, chattui.__main__; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
