"""A fine-tune job's output folder is claimed atomically: of many jobs started on one folder in the same
instant exactly one gets it, and a folder holding anything chattui did not write (or a file) is refused
without touching it."""

from __future__ import annotations

import threading

import pytest

from chattui import jobs


def test_of_jobs_started_on_one_folder_at_once_exactly_one_claims_it(tmp_path):
    out = tmp_path / "job"
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def claim(n: int) -> None:
        barrier.wait()
        try:
            jobs.claim_folder(out, f'id = "job-{n}"\n')
            outcomes.append(f"job-{n}")
        except jobs.JobError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("job-")]
    assert len(winners) == 1, outcomes
    assert (out / jobs.JOB_CONFIG).read_text() == f'id = "{winners[0]}"\n'
    assert sorted(p.name for p in out.iterdir()) == [jobs.JOB_CONFIG], "no staged file left behind"
    assert all("already holds a job" in o or "not empty" in o for o in outcomes if o not in winners)


def test_a_folder_with_files_chattui_did_not_write_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(jobs.JobError, match=r"not empty \(adapter, notes.txt\); choose a new or empty folder"):
        jobs.start_job({"model": str(tmp_path), "data": [str(tmp_path / "d.jsonl")], "out": str(out)})
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "notes.txt"]


def test_an_existing_job_folder_is_refused(tmp_path):
    out = tmp_path / "job"
    jobs.claim_folder(out, 'id = "first"\n')
    with pytest.raises(jobs.JobError, match="already holds a job; resume it"):
        jobs.start_job({"model": str(tmp_path), "data": [str(tmp_path / "d.jsonl")], "out": str(out)})
    assert (out / jobs.JOB_CONFIG).read_text() == 'id = "first"\n'


def test_out_naming_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    with pytest.raises(jobs.JobError, match="is a file; the job's output must be a folder"):
        jobs.start_job({"model": str(tmp_path), "data": [str(tmp_path / "d.jsonl")], "out": str(target)})
    assert target.read_text() == "keep me"
