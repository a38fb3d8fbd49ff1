"""The job API the fine-tune screen builds on: a job starts detached in its own session, its progress is read
incrementally, it cancels with a checkpoint and resumes; a job whose process died is reported failed;
listing works from the folders alone; nothing here imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from chattui import jobs

ROOT = Path(__file__).resolve().parents[2]


def test_job_api_never_imports_torch():
    code = "import sys, chattui.jobs, chattui.finetune_cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_toml_round_trips_awkward_strings_and_lists():
    values = {"model": 'C:\\models\\"quoted"', "data": ["a b.jsonl", "ünï😀.jsonl"], "lr": 1e-05, "epochs": 3,
              "merge": False, "note": "line\nbreak\ttab\x7f", "val_fraction": None}
    parsed = tomllib.loads(jobs.to_toml(values))
    assert parsed == {k: v for k, v in values.items() if v is not None}


def test_progress_tail_returns_only_new_complete_lines(tmp_path):
    path = tmp_path / "progress.jsonl"
    tail = jobs.ProgressTail(path)
    assert tail.poll() == []
    path.write_text('{"a": 1}\n{"b": ')
    assert tail.poll() == [{"a": 1}]
    with open(path, "a") as f:
        f.write('2}\nnot json\n{"c": 3}\n')
    assert tail.poll() == [{"b": 2}, {"c": 3}]
    assert tail.poll() == []


def _write(job_dir: Path, *records: dict) -> None:
    with open(job_dir / jobs.PROGRESS_FILE, "a") as f:
        for r in records:
            f.write(json.dumps({"time": time.time(), **r}) + "\n")


def _progress(step: int, loss: float, val: float | None = None) -> dict:
    return {"type": "progress", "step": step, "total_steps": 4, "epoch": 0, "loss": loss, "val_loss": val,
            "lr": 1e-3, "tokens_per_s": 100.0, "eta_s": 4.0 - step}


def test_state_keeps_the_newest_record_per_step_across_a_resume(tmp_path):
    (tmp_path / jobs.JOB_CONFIG).write_text(jobs.to_toml({"model": "/m", "data": ["/d.jsonl"]}))
    _write(tmp_path, {"type": "status", "status": "running", "pid": 0, "start_step": 0},
           _progress(1, 3.0), _progress(2, 2.0, 2.5), _progress(3, 1.5),
           {"type": "status", "status": "failed", "reason": "boom"})
    state = jobs.read_job(tmp_path)
    assert (state.status, state.reason, state.step, state.fraction) == ("failed", "boom", 3, 0.75)
    # resumed from the checkpoint of step 2: step 3 is trained again
    _write(tmp_path, {"type": "status", "status": "queued", "resumed": True},
           {"type": "status", "status": "running", "pid": 0, "start_step": 2}, _progress(3, 1.4), _progress(4, 1.0, 1.2),
           {"type": "status", "status": "done", "adapter": None})
    state.refresh()
    assert state.status == "done" and state.finished and state.eta_s is None
    assert state.loss_points() == [(1, 3.0), (2, 2.0), (3, 1.4), (4, 1.0)]
    assert state.val_points() == [(2, 2.5), (4, 1.2)]
    assert state.chat_target() is None  # no adapter was written


def test_a_running_job_whose_process_is_gone_is_marked_failed(tmp_path):
    (tmp_path / jobs.JOB_CONFIG).write_text(jobs.to_toml({"model": "/m", "data": ["/d.jsonl"]}))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / jobs.LOG_FILE).write_text("loading\nKilled\n")
    _write(tmp_path, {"type": "status", "status": "running", "pid": gone.pid, "start_step": 0}, _progress(1, 3.0))
    state = jobs.read_job(tmp_path)
    assert state.status == "failed" and state.reason.startswith(jobs.DIED_REASON) and "Killed" in state.reason
    assert jobs.read_job(tmp_path).status == "failed"  # written to progress.jsonl, not only in memory
    assert not jobs.cancel_job(tmp_path)


def test_start_cancel_resume_and_list_a_real_job(checkpoint_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"Sample number {i}."}) + "\n" for i in range(4)))
    config = {"model": str(checkpoint_factory("llama")), "data": [str(data)], "max_steps": 120, "batch_size": 2,
              "lora_rank": 4, "log_interval": 1, "checkpoint_interval": 1000, "precision": "fp32"}
    root = tmp_path / "jobs"
    job = jobs.start_job(config, root=root)
    assert job.dir.parent == root and job.status == "queued" and (job.dir / jobs.JOB_CONFIG).exists()
    assert os.getsid(job.process.pid) != os.getsid(0)  # its own session: the UI closing does not end it

    while job.step < 2 and not job.finished:  # started and training
        job.refresh()
        time.sleep(0.01)
    assert job.status == "running" and job.data["train_examples"] == 4
    assert jobs.cancel_job(job)
    jobs.wait(job, timeout=60)
    assert job.status == "cancelled" and job.reason == "cancelled by SIGTERM"
    stopped_at = job.result["step"]
    assert 2 <= stopped_at < 120 and Path(job.result["checkpoint"]).is_dir()
    assert job.adapter_dir is not None and job.chat_target() == (config["model"], str(job.adapter_dir))

    resumed = jobs.resume_job(job.dir)
    jobs.wait(resumed, timeout=120)
    assert resumed.status == "done", jobs.log_tail(job.dir)
    assert [s for s, _ in resumed.loss_points()] == list(range(1, 121))
    assert resumed.plan["total_steps"] == 120

    listed = jobs.list_jobs(root)
    assert [j.id for j in listed] == [job.id] and listed[0].status == "done"
