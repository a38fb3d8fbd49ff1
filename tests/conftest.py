"""Shared fixtures: tiny random checkpoints per family, built once per test session."""

from __future__ import annotations

import os
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


@pytest.fixture
def float32_prefill(monkeypatch):
    """Prefill on GGUF blocks in float32 tiles even where the CPU multiplies bfloat16 natively (where
    engine.quant.prefill_dtype picks bfloat16): for the tests that compare it with float32 references
    exactly. tests/engine/test_quant_kernels.py and test_gguf_smollm2.py check the bfloat16 tiles."""
    import engine.quant

    monkeypatch.setattr(engine.quant, "BFLOAT16_PREFILL", False)


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


SMOLLM2_ENV = "CHATTUI_SMOLLM2_GGUF"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF: $CHATTUI_SMOLLM2_GGUF, else where `chattui pull
    smollm2-135m-instruct` puts it. Missing: skipped, except under CI=true, where it fails (CI pulls it
    as an install step, so a missing file there is a broken pipeline)."""
    from chattui.paths import pulled_models_dir
    from chattui.pull import CATALOG

    entry = CATALOG["smollm2-135m-instruct"]
    value = os.environ.get(SMOLLM2_ENV)
    path = Path(value).expanduser() if value else pulled_models_dir() / entry.name / entry.file_name
    if path.is_file():
        return path
    reason = f"{path} not found ({'$' + SMOLLM2_ENV if value else 'not pulled, and $' + SMOLLM2_ENV + ' is not set'})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI pulls smollm2-135m-instruct before the tests (chattui pull smollm2-135m-instruct)")
    pytest.skip(f"{reason}: run `chattui pull smollm2-135m-instruct` to run these tests")


@pytest.fixture
def no_hang():
    """Fail instead of hanging if something blocks on a FIFO, reads /dev/zero forever or loops on bad bytes."""
    import signal

    def timeout(signum, frame):
        raise AssertionError("timed out: the reader blocked or read without end")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
