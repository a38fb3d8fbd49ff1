"""Fine-tune jobs never replace what they did not write, and a loss that becomes NaN fails the job without
saving a NaN adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from checkpoints import set_tensor

from engine.finetune import JobError, config_from_dict, read_records, run_job


def job_config(base: Path, data: Path, out: Path, **overrides):
    values = {"model": str(base), "data": [str(data)], "out": str(out), "max_steps": 3, "lr": 1e-2, "batch_size": 2,
              "lora_rank": 4, "val_fraction": 0.0, "warmup_ratio": 0.0, "log_interval": 1}
    return config_from_dict({**values, **overrides})


@pytest.fixture
def data(tmp_path) -> Path:
    records = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
               for i in range(4)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("result", ["adapter", "model", "merged"])
def test_a_folder_holding_a_result_folder_is_refused_and_left_untouched(checkpoint_factory, data, tmp_path, result):
    out = tmp_path / "job"
    (out / result).mkdir(parents=True)
    (out / result / "mine.txt").write_text("not chattui's")
    with pytest.raises(JobError, match=f"already holds {result}/; choose another output folder"):
        run_job(job_config(checkpoint_factory("llama"), data, out))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [result, f"{result}/mine.txt"]


def test_a_folder_holding_a_merged_gguf_is_refused_and_left_untouched(checkpoint_factory, data, tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    (out / "merged.gguf").write_bytes(b"someone's model")
    with pytest.raises(JobError, match="already holds merged.gguf; choose another output folder"):
        run_job(job_config(checkpoint_factory("llama"), data, out))
    assert [p.name for p in out.iterdir()] == ["merged.gguf"] and (out / "merged.gguf").read_bytes() == b"someone's model"


def test_a_loss_that_becomes_nan_fails_the_job_and_saves_no_adapter(checkpoint_factory, data, tmp_path):
    base = shutil.copytree(checkpoint_factory("llama"), tmp_path / "broken-model")
    set_tensor(base, "model.norm.weight", float("nan"))
    out = tmp_path / "job"
    result = run_job(job_config(base, data, out))
    assert result.status == "failed"
    assert result.reason.startswith("training diverged at step 1 (loss nan); lower the learning rate")
    status = [r for r in read_records(out / "progress.jsonl") if r["type"] == "status"][-1]
    assert status["status"] == "failed" and status["reason"] == result.reason
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


def test_a_stop_while_the_data_is_prepared_cancels_the_job_before_training(checkpoint_factory, data, tmp_path):
    out = tmp_path / "job"
    result = run_job(job_config(checkpoint_factory("llama"), data, out), should_stop=lambda: True)
    assert result.status == "cancelled" and result.step == 0
    status = [r for r in read_records(out / "progress.jsonl") if r["type"] == "status"][-1]
    assert status["status"] == "cancelled" and status["reason"] == "cancelled by request while preparing the data"
    assert not (out / "adapter").exists() and not (out / "job.json").exists()
