"""A fine-tune job's folder, as the job (engine.finetune) and the UI (chattui.jobs) both read it:
file names, statuses and exit codes. Plain Python: the UI imports it without torch."""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "chattui"
DATA_DIR_ENV = "CHATTUI_DATA_DIR"  # overrides the platform's user data dir (tests, portable installs)

JOB_CONFIG = "job.toml"  # the settings the job was started with
RESOLVED_FILE = "job.json"  # the resolved settings and plan, written once data and model are loaded
PROGRESS_FILE = "progress.jsonl"  # status, data and progress records, appended by the job
LOG_FILE = "job.log"  # the job process's stdout and stderr
PID_FILE = "job.pid"  # the job's process id
CANCEL_FILE = ".cancel"  # created by the launcher on SIGTERM/SIGINT; workers stop at the next step
CHECKPOINTS = "checkpoints"
RESULT_DIRS = ("adapter", "merged", "model")  # what a finished job saves into its folder
MERGED_GGUF = "merged.gguf"  # ...and the merged model as one GGUF file (merge_gguf)

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATUSES = ("done", "failed", "cancelled")
EXIT_DONE, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 130


def user_data_dir() -> Path:
    import platformdirs

    return Path(os.environ.get(DATA_DIR_ENV) or platformdirs.user_data_dir(APP_NAME)).expanduser()
