"""Shared fixtures: tiny random checkpoints per family, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/checkpoints.py

from checkpoints import FAMILIES, REALWORLD, make_checkpoint, train_tokenizer  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """Tiny test models run fastest single-threaded, and CI machines are small and shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory, tokenizer):
    """checkpoint_factory(family, **config_overrides) -> folder; cached per argument set."""
    built: dict[tuple, Path] = {}

    def make(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(family)
            built[key] = make_checkpoint(folder, family, tokenizer, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session", params=FAMILIES)
def family_checkpoint(request, checkpoint_factory) -> tuple[str, Path]:
    """(family, folder) for every supported family."""
    return request.param, checkpoint_factory(request.param)


@pytest.fixture
def realworld() -> Path:
    if not REALWORLD.is_dir():
        pytest.skip(f"real-world tokenizer files not found at {REALWORLD}")
    return REALWORLD


@pytest.fixture
def tmpfs(tmp_path_factory):
    """tmpfs(size) -> a fresh folder on its own small tmpfs (a disk that fills up, or can be made read-only
    with remount_read_only). Skipped, saying why, where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: str = "64k") -> Path:
        folder = tmp_path_factory.mktemp("tmpfs")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill up ({done.stderr.strip() or 'mount failed'})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)

