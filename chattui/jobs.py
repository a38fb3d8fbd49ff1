"""Fine-tune jobs on disk: start, watch, cancel, resume and list them. Pure Python: never imports torch.

A job is a folder (default: <user data dir>/jobs/<id>) that `engine.finetune` trains into:

    job.toml        the settings it was started with (written here)
    job.json        the resolved settings and plan (written by the job once its data and model are loaded)
    progress.jsonl  status, data and progress records, appended by the job (see engine/finetune.py)
    job.log         the job process's stdout and stderr
    job.pid         the process id of the job (written here when it starts)
    adapter/ merged/ merged.gguf model/ checkpoints/   results

Jobs run as `python -m engine.finetune --config <folder>/job.toml` in their own session (start_new_session):
the UI stays responsive, a crash in training cannot take it down, and closing the UI does not stop the job.
Reopening re-attaches by reading the folder: `list_jobs()` then `JobState.refresh()` on a timer.

    job = start_job({"model": "/models/smol", "data": ["/data/chat.jsonl"], "max_steps": 200})
    while not job.finished:
        for record in job.refresh():   # new progress.jsonl records since the last call
            ...                        # job.status, job.latest, job.loss_points(), job.eta_s ...
        time.sleep(0.5)
    cancel_job(job.dir)   # SIGTERM: the job checkpoints and ends "cancelled"
    resume_job(job.dir)   # continues from its newest checkpoint
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chattui.paths import data_dir
from engine.job_files import FINAL_STATUSES, JOB_CONFIG, LOG_FILE, MERGED_GGUF, PID_FILE, PROGRESS_FILE, RESOLVED_FILE

EXIT_GRACE_S = 15.0  # how long a job that reported its end may take to exit before resume_job gives up
SETTLED_SHARE = 0.05  # a loss still falling by this share of its whole fall at the end of a run has not settled
DIED_REASON = "the job process ended without reporting a result (killed, or out of memory?)"

_REPO_ROOT = Path(__file__).resolve().parents[1]  # holds the engine package next to chattui


class JobError(Exception):
    """A job that cannot be started, resumed or read; the message is one line."""


def jobs_root() -> Path:
    return data_dir() / "jobs"


def new_job_id() -> str:
    """Sortable and unique enough for one user: start time plus 4 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(2).hex()


# -- TOML ----------------------------------------------------------------------------------------------------


def _toml_value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, key) for v in value) + "]"
    raise JobError(f"job setting {key!r}: cannot write {type(value).__name__} values to TOML")


def to_toml(values: dict[str, Any]) -> str:
    """A flat table of strings, numbers, booleans and lists of those; None values are left out."""
    lines = []
    for key, value in values.items():
        if value is None:
            continue
        if not key.replace("_", "").isalnum():
            raise JobError(f"job setting {key!r}: not a plain key")
        lines.append(f"{key} = {_toml_value(value, key)}")
    return "\n".join(lines) + "\n"


def read_config(job_dir: Path) -> dict[str, Any]:
    path = Path(job_dir) / JOB_CONFIG
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise JobError(f"{path}: file not found (not a job folder?)") from None
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{path}: invalid TOML ({e})") from None


def read_resolved_config(job_dir: Path) -> dict[str, Any]:
    """job.json's settings with every default filled in ({} before the job has started)."""
    try:
        return json.loads((Path(job_dir) / RESOLVED_FILE).read_text(encoding="utf-8")).get("config", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


# -- reading progress ----------------------------------------------------------------------------------------


class ProgressTail:
    """Reads a JSON-lines file incrementally: each poll() returns the records appended since the last one.

    A line still being written (no newline yet) waits for the next poll; unreadable lines are skipped.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" after a complete last line
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def _pid_alive(pid: int | None) -> bool:
    """Whether pid is a live fine-tune job process (not a zombie, not a recycled pid of another program)."""
    if not pid:
        return False
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)  # our own child that has exited: reap it
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    except OSError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            cmdline = (proc / "cmdline").read_bytes()
            return b"engine.finetune" in cmdline or b"torch.distributed.run" in cmdline
        except (OSError, IndexError):
            return True
    return True


@dataclass
class JobState:
    """What is known about one job folder; refresh() reads what the job appended since."""

    dir: Path
    id: str
    config: dict[str, Any]  # job.toml as written when the job was started
    status: str = "queued"  # queued, running, done, failed or cancelled
    reason: str | None = None  # failed / cancelled: why
    pid: int | None = None
    created_at: float | None = None  # time of the first status record
    updated_at: float | None = None  # time of the newest record
    data: dict[str, Any] | None = None  # the data report: records, format, truncation, token lengths
    result: dict[str, Any] = field(default_factory=dict)  # the final status record (adapter, merged, losses)
    progress: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> newest progress record
    samples: dict[str, Any] | None = None  # the newest "samples" record: replies to a few prompts at an evaluation
    process: subprocess.Popen | None = field(default=None, repr=False)  # set when this process started it
    _tail: ProgressTail | None = field(default=None, repr=False)

    # -- reading ---------------------------------------------------------------------------------------------

    def refresh(self) -> list[dict[str, Any]]:
        """Apply the records appended since the last call (and return them). A job whose process is gone
        without a final status is marked failed, in progress.jsonl too."""
        if self._tail is None:
            self._tail = ProgressTail(self.dir / PROGRESS_FILE)
        alive = self.alive  # checked before reading, so a final record written just before exiting is seen
        records = self._tail.poll()
        for record in records:
            self.apply(record)
        if not alive and self.status in ("queued", "running") and self.current_pid() is not None:
            _append_status(self.dir, "failed", reason=self._death_reason())
            new = self._tail.poll()
            for record in new:
                self.apply(record)
            records += new
        return records

    def current_pid(self) -> int | None:
        """The job's process: the one this process started, else job.pid, else the running record's pid."""
        if self.process is not None:
            return self.process.pid
        try:
            return int((self.dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return self.pid

    def _death_reason(self) -> str:
        code = self.process.poll() if self.process is not None else None
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return f"the job process was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        last = log_tail(self.dir, 1)
        return DIED_REASON + (f"; last log line: {last[0]}" if last else "")

    def apply(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        when = record.get("time")
        if when is not None:
            self.updated_at = when
            self.created_at = self.created_at or when
        if kind == "status":
            self.status = record.get("status", self.status)
            self.reason = record.get("reason")
            if record.get("pid"):
                self.pid = record["pid"]
            if self.status in ("queued", "running"):
                self.result = {}
            if self.status == "running":
                start = record.get("start_step") or 0
                # A resumed run repeats the steps after its checkpoint: forget the old ones.
                self.progress = {s: r for s, r in self.progress.items() if s <= start}
            if self.status in FINAL_STATUSES:
                self.result = record
        elif kind == "data":
            self.data = {k: v for k, v in record.items() if k not in ("type", "time")}
        elif kind == "progress" and isinstance(record.get("step"), int):
            self.progress[record["step"]] = record
        elif kind == "samples" and isinstance(record.get("samples"), list):
            self.samples = record

    @property
    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _pid_alive(self.current_pid())

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def records(self) -> list[dict[str, Any]]:
        """Progress records in step order (one per step)."""
        return [self.progress[s] for s in sorted(self.progress)]

    @property
    def latest(self) -> dict[str, Any] | None:
        return self.progress[max(self.progress)] if self.progress else None

    @property
    def step(self) -> int:
        return max(self.progress) if self.progress else 0

    @property
    def total_steps(self) -> int | None:
        latest = self.latest
        if latest is not None:
            return latest.get("total_steps")
        plan = self.plan
        return plan.get("total_steps") if plan else None

    @property
    def fraction(self) -> float:
        total = self.total_steps
        return min(self.step / total, 1.0) if total else 0.0

    @property
    def eta_s(self) -> float | None:
        latest = self.latest
        return None if latest is None or self.finished else latest.get("eta_s")

    @property
    def tokens_per_s(self) -> float | None:
        latest = self.latest
        return None if latest is None else latest.get("tokens_per_s")

    def loss_points(self) -> list[tuple[int, float]]:
        """(step, training loss) for the loss chart."""
        return [(s, r["loss"]) for s, r in sorted(self.progress.items()) if r.get("loss") is not None]

    def loss_still_falling(self) -> bool:
        """Whether the training loss was still falling when the run ended: its mean over the last fifth of the
        records is below the fifth before by more than SETTLED_SHARE of all it fell since the first fifth (at
        least 3 records a fifth). Relative to the whole fall, so noise near a loss of 0 is not "falling"."""
        losses = [loss for _, loss in self.loss_points()]
        window = len(losses) // 5
        if window < 3:
            return False
        first, before, last = (sum(part) / window for part in
                               (losses[:window], losses[-2 * window: -window], losses[-window:]))
        return first > last and before - last > SETTLED_SHARE * (first - last)

    def val_points(self) -> list[tuple[int, float]]:
        return [(s, r["val_loss"]) for s, r in sorted(self.progress.items()) if r.get("val_loss") is not None]

    @property
    def plan(self) -> dict[str, Any] | None:
        """job.json's plan (total steps, lr, batch size, targets, device...) once the job has started."""
        try:
            return json.loads((self.dir / RESOLVED_FILE).read_text(encoding="utf-8")).get("plan")
        except (OSError, json.JSONDecodeError):
            return None

    # -- results ---------------------------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.config.get("method", "lora")

    @property
    def base_model(self) -> str:
        return self.config.get("model", "")

    @property
    def adapter_dir(self) -> Path | None:
        """The LoRA adapter, once written (at the end, or when cancelled after some steps)."""
        path = self.result.get("adapter") or (str(self.dir / "adapter") if self.method == "lora" else None)
        return Path(path) if path and (Path(path) / "adapter_config.json").exists() else None

    @property
    def merged_dir(self) -> Path | None:
        path = self.dir / "merged"
        return path if (path / "config.json").exists() else None

    @property
    def merged_gguf(self) -> Path | None:
        """The merged model as a GGUF file (merge_gguf), once written."""
        path = self.dir / MERGED_GGUF
        return path if path.is_file() else None

    @property
    def model_dir(self) -> Path | None:
        """A full fine-tune's result, a Hugging Face checkpoint folder."""
        path = self.dir / "model"
        return path if (path / "config.json").exists() else None

    def chat_target(self) -> tuple[str, str | None] | None:
        """(model folder, adapter folder or None) to chat with the result: base plus adapter, unmerged."""
        if self.model_dir is not None:
            return str(self.model_dir), None
        if self.adapter_dir is not None:
            return self.base_model, str(self.adapter_dir)
        return None


def read_job(job_dir: str | Path) -> JobState:
    """A job folder's state, every record so far applied."""
    job_dir = Path(job_dir).expanduser()
    config = read_config(job_dir)
    state = JobState(dir=job_dir, id=str(config.get("id") or job_dir.name), config=config)
    state.refresh()
    return state


def list_jobs(root: str | Path | None = None) -> list[JobState]:
    """Every job folder under root (default: the user data dir's jobs/), newest first."""
    root = Path(root) if root is not None else jobs_root()
    if not root.is_dir():
        return []
    jobs = []
    for folder in root.iterdir():
        if (folder / JOB_CONFIG).is_file():
            try:
                jobs.append(read_job(folder))
            except JobError:
                continue
    return sorted(jobs, key=lambda j: (j.created_at or 0.0, j.id), reverse=True)


def log_tail(job_dir: str | Path, lines: int = 20) -> list[str]:
    """The last lines of the job's log (its stdout and stderr)."""
    path = Path(job_dir) / LOG_FILE
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


# -- starting and stopping -----------------------------------------------------------------------------------


def _append_status(job_dir: Path, status: str, **extra: Any) -> None:
    record = {"type": "status", "status": status, **extra, "time": time.time()}
    with open(job_dir / PROGRESS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _spawn(job_dir: Path, resume: bool, env: dict[str, str] | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.finetune", "--config", str(job_dir / JOB_CONFIG)]
    if resume:
        cmd.append("--resume")
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), environment.get("PYTHONPATH")) if p)
    environment.setdefault("PYTHONUNBUFFERED", "1")
    try:
        with open(job_dir / LOG_FILE, "ab") as log:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environment,
                cwd=job_dir, start_new_session=True,  # its own session: Ctrl-C or closing the UI leaves it running
            )
    except OSError as e:
        _append_status(job_dir, "failed", reason=f"cannot start the job process: {e}")
        raise JobError(f"cannot start the job process: {e}") from None
    (job_dir / PID_FILE).write_text(f"{process.pid}\n", encoding="utf-8")
    return process


def start_job(config: dict[str, Any], root: str | Path | None = None, env: dict[str, str] | None = None) -> JobState:
    """Create the job folder, write job.toml and a queued status, and start the job process.

    config: JobConfig fields (engine/finetune.py); `model` and `data` required, paths absolute or relative to
    the current directory. Without `out`, the folder is <root or jobs_root()>/<id>.
    """
    for key in ("model", "data"):
        if not config.get(key):
            raise JobError(f"a job needs {key!r}")
    config = dict(config)
    config["id"] = config.get("id") or new_job_id()
    out = Path(config.get("out") or Path(root or jobs_root()) / config["id"]).expanduser().resolve()
    config["out"] = str(out)
    config["model"] = str(Path(config["model"]).expanduser().resolve())
    for key in ("data", "val_data"):
        if key in config:
            files = [config[key]] if isinstance(config[key], (str, Path)) else config[key]
            config[key] = [str(Path(p).expanduser().resolve()) for p in files]
    claim_folder(out, to_toml(config))
    _append_status(out, "queued")
    state = JobState(dir=out, id=config["id"], config=config)
    state.process = _spawn(out, resume=False, env=env)
    state.refresh()
    return state


def claim_folder(out: Path, job_toml: str) -> None:
    """Make `out` this job's folder by creating its job.toml, atomically: of two jobs started on one folder
    in the same instant, exactly one gets it. A folder that holds anything already (another job, or files
    chattui did not write) is refused, so a job never replaces what it did not create."""
    if out.exists() and not out.is_dir():
        raise JobError(f"{out}: is a file; the job's output must be a folder (a new or an empty one)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        present = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise JobError(f"{out}: cannot create the job folder ({e.strerror})") from None
    if any(name in present for name in (JOB_CONFIG, RESOLVED_FILE, PROGRESS_FILE)):
        raise JobError(f"{out}: already holds a job; resume it or choose another output folder")
    if present:
        shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
        raise JobError(f"{out}: not empty ({shown}); choose a new or empty folder for the job")
    staged = out / f".{JOB_CONFIG}.{os.getpid()}.{time.monotonic_ns()}"
    staged.write_text(job_toml, encoding="utf-8")
    try:
        os.link(staged, out / JOB_CONFIG)  # fails if job.toml exists: the folder is another job's
    except FileExistsError:
        raise JobError(f"{out}: already holds a job; resume it or choose another output folder") from None
    finally:
        staged.unlink()


def resume_job(job_dir: str | Path, env: dict[str, str] | None = None) -> JobState:
    """Continue a cancelled or failed job from its newest checkpoint, with its saved settings."""
    state = read_job(job_dir)
    deadline = time.monotonic() + EXIT_GRACE_S
    while state.alive and state.finished and time.monotonic() < deadline:
        time.sleep(0.05)  # it has reported its end and is exiting
    if state.alive:
        raise JobError(f"{state.dir}: the job is still running (pid {state.current_pid()})")
    if state.status == "done":
        raise JobError(f"{state.dir}: the job is already done")
    _append_status(state.dir, "queued", resumed=True)
    state.process = _spawn(state.dir, resume=True, env=env)
    state.refresh()
    return state


def cancel_job(job_dir: str | Path | JobState) -> bool:
    """Ask a running job to stop (SIGTERM): it finishes its step, checkpoints and ends "cancelled".
    Returns False when no job process is running."""
    state = job_dir if isinstance(job_dir, JobState) else read_job(job_dir)
    if not state.alive:
        return False
    try:
        os.kill(state.current_pid(), signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def wait(state: JobState, timeout: float | None = None, interval: float = 0.2) -> JobState:
    """Refresh until the job finishes (or timeout seconds pass); for scripts and tests."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state.refresh()
        if state.finished or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(interval)
