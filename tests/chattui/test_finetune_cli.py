"""`chattui finetune`: a job runs in the foreground and ends with the adapter and the command to chat with it;
bad data is one `chattui: error: FILE:LINE: ...` line with exit code 1; bad options are refused before any job
starts; --resume continues a cancelled job and refuses changed settings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from chattui import finetune_cli, jobs


def chat(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(chat(f"Question {i}?", f"Answer {i}.") for i in range(4)) + "\n")
    return path


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """cli(*argv) -> (exit code, stdout, stderr) of `chattui finetune ...`, jobs under tmp_path/data."""
    monkeypatch.setenv("CHATTUI_DATA_DIR", str(tmp_path / "data-dir"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(prog="chattui")
    finetune_cli.add_parser(parser.add_subparsers(dest="command"))

    def run(*argv) -> tuple[int, str, str]:
        args = parser.parse_args(["finetune", *map(str, argv)])
        capsys.readouterr()
        code = args.run(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_finetune_runs_the_job_and_prints_the_adapter_and_how_to_chat_with_it(cli, checkpoint_factory, data, tmp_path):
    base = checkpoint_factory("llama")
    out = tmp_path / "job"
    code, stdout, stderr = cli("--model", base, "--data", data, "--max-steps", 3, "--batch-size", 2, "--lr", 1e-2,
                               "--lora-rank", 4, "--out", out)
    assert code == 0, stderr
    assert f"adapter: {out / 'adapter'}" in stdout
    assert f"chat with it: chattui --model {base} --adapter {out / 'adapter'}" in stdout
    assert stdout.startswith("done: 3 steps, loss ")
    assert "data: 4 training / 0 validation examples (data.jsonl: 4 chat); 0 truncated" in stderr
    assert "step 3/3 | epoch" in stderr
    saved = jobs.read_config(out)
    assert saved["lr"] == 1e-2 and saved["model"] == str(base) and saved["data"] == [str(data)]
    assert jobs.read_job(out).status == "done"


def test_merge_gguf_writes_the_merged_model_as_a_gguf_file_and_prints_it(cli, checkpoint_factory, data, tmp_path):
    import gguf

    out = tmp_path / "job"
    code, stdout, stderr = cli("--model", checkpoint_factory("qwen2"), "--data", data, "--max-steps", 2,
                               "--batch-size", 2, "--lora-rank", 4, "--merge-gguf", "q4_1", "--out", out)
    assert code == 0, stderr
    assert f"merged GGUF: {out / 'merged.gguf'}" in stdout
    assert jobs.read_config(out)["merge_gguf"] == "Q4_1" and jobs.read_job(out).merged_gguf == out / "merged.gguf"
    reader = gguf.GGUFReader(out / "merged.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    assert "wrote merged.gguf" in stderr
    from chattui.trained import trained_models

    listed = [e for e in trained_models(tmp_path) if e.path == out / "merged.gguf"]
    assert len(listed) == 1 and listed[0].source == "merged" and listed[0].problem is None, listed
    assert listed[0].architecture == "qwen2" and listed[0].weight_type == "Q4_1"


def test_bad_data_is_one_error_line_naming_file_and_line(cli, checkpoint_factory, data, tmp_path):
    data.write_text(chat("a", "b") + "\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    code, stdout, stderr = cli("--model", checkpoint_factory("llama"), "--data", data, "--out", tmp_path / "job")
    assert code == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"chattui: error: {data}:2: messages[0]: unknown role 'robot'"), stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lora-rank", "0"], "--lora-rank must be >= 1, got 0"),
        (["--lr", "-1"], "--lr must be a positive finite number"),
        (["--lora-alpha", "inf"], "--lora-alpha must be a positive finite number, got inf"),
        (["--seed", str(2**64)], "--seed must be in [0, 2**64)"),
        (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
        (["--val-fraction", "1"], "--val-fraction must be between 0 and 1"),
        (["--method", "full", "--lora-rank", "4"], "--lora-rank applies to --method lora"),
        (["--method", "full", "--merge"], "--merge applies to --method lora"),
        (["--method", "full", "--merge-gguf", "q8_0"], "--merge-gguf applies to --method lora"),
        (["--batch-size", "3", "--nproc", "2"], "--batch-size (3) must be divisible by --nproc (2)"),
        (["--data", "missing.jsonl"], "missing.jsonl: file not found"),
    ],
)
def test_bad_options_are_refused_before_a_job_starts(cli, checkpoint_factory, data, tmp_path, argv, message):
    argv = argv if "--data" in argv else ["--data", str(data), *argv]
    code, stdout, stderr = cli("--model", checkpoint_factory("llama"), *argv, "--out", tmp_path / "job")
    assert code == 1 and stdout == ""
    assert stderr == f"chattui: error: {message}\n" or (stderr.startswith("chattui: error: ") and message in stderr)
    assert not (tmp_path / "job").exists()


def test_model_folder_and_data_are_checked(cli, data, tmp_path):
    assert cli("--model", tmp_path, "--data", data)[2].startswith(f"chattui: error: {tmp_path}: no config.json")
    assert cli("--model", tmp_path / "nope", "--data", data)[2] == (
        f"chattui: error: {tmp_path / 'nope'}: not a directory or a .gguf file\n"
    )
    assert cli("--model", tmp_path / "nope.gguf", "--data", data)[2] == f"chattui: error: {tmp_path / 'nope.gguf'}: file not found\n"
    assert "--data FILE is required" in cli("--model", tmp_path)[2]


def test_resume_continues_a_cancelled_job_and_refuses_changed_settings(cli, checkpoint_factory, data, tmp_path):
    from engine.finetune import config_from_dict, run_job  # the cancelled job is made in-process (fast)

    base = checkpoint_factory("llama")
    out = tmp_path / "job"
    settings = {"model": str(base), "data": [str(data)], "out": str(out), "max_steps": 4, "batch_size": 2,
                "log_interval": 1, "lora_rank": 4}
    (out).mkdir()
    (out / "job.toml").write_text(jobs.to_toml(settings))
    steps = []
    result = run_job(config_from_dict(settings), on_progress=lambda r: steps.append(r.step),
                     should_stop=lambda: len(steps) >= 2)
    assert result.status == "cancelled" and result.step == 2

    code, _, stderr = cli("--resume", "--out", out, "--lr", 0.5)
    assert code == 1
    assert stderr == "chattui: error: --lr differs from the job's setting (0.0); a resumed job keeps its settings\n"
    assert "--resume needs --out DIR" in cli("--resume")[2]

    code, stdout, stderr = cli("--resume", "--out", out, "--max-steps", 4)
    assert code == 0, stderr
    after_resume = stderr.split("resumed from step 2\n", 1)[1]
    assert "step 3/4" in after_resume and "step 4/4" in after_resume and "step 1/4" not in after_resume
    assert stdout.startswith("done: 4 steps")
