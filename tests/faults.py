"""Broken environments for tests: a disk that is full, a folder that is read-only (on a tmpfs from
conftest's `tmpfs` fixture), a database another program holds locked."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)


def fill_disk(folder: Path, leave: int = 0) -> None:
    """Write a filler file in folder until the disk is full, then free `leave` bytes of it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 1024):
                pass
        except OSError:
            pass
    if leave:
        with open(filler, "r+b") as f:
            f.truncate(max(0, filler.stat().st_size - leave))


def hold_exclusive_lock(path: Path) -> sqlite3.Connection:
    """A second connection holding `BEGIN EXCLUSIVE` on the database (close it to release)."""
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    return other


def fuzz_reader(path: Path, inputs, read, check_accepted, seconds: float) -> tuple[dict[str, int], int]:
    """Write each input to path and read it: a refusal must be a one-line CheckpointError, an acceptance
    passes check_accepted(result, data). Bounded to `seconds` whatever the machine's speed.
    Returns ({"ok": n, "refused": n}, peak traced memory in bytes)."""
    import time
    import tracemalloc

    from engine.errors import CheckpointError

    outcomes = {"ok": 0, "refused": 0}
    tracemalloc.start()
    deadline = time.monotonic() + seconds
    try:
        for data in inputs:
            if time.monotonic() > deadline:
                break
            path.write_bytes(data)
            try:
                result = read(path)
            except CheckpointError as e:
                assert "\n" not in str(e) and len(str(e)) < 600, str(e)
                outcomes["refused"] += 1
            else:
                check_accepted(result, data)
                outcomes["ok"] += 1
        return outcomes, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
