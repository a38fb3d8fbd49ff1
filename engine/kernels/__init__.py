"""bfloat16 decode kernels PyTorch lacks, compiled on first use with the system's C++ compiler and cached.

decode_bf16.cpp defines `torch.ops.chattui.linear_bf16` (a single-row matmul that reads weights near
memory bandwidth) and `rms_norm_bf16` (Llama's RMSNorm in one op); engine.inference uses them for
decoding on CPUs with AVX512-BF16. They are optional: with no compiler, a failed build or another
CPU, `bf16_decode_ops()` returns None and PyTorch's kernels run. The built library is kept under the
user's cache folder, keyed by the source, the flags and the PyTorch version, so the compiler runs
once per machine (about 10 s).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from torch.utils import cpp_extension

from engine.device import cpu_has_avx512_bf16

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_bf16.cpp")
FLAGS = [
    "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512bf16",
    "-ffp-contract=off",  # no fused multiply-adds: products round as PyTorch's do
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
]
KERNEL_DIR_ENV = "CHATTUI_KERNEL_DIR"  # where built kernels are cached (default: the user cache folder)


def _library_path() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + torch.__version__.encode()).hexdigest()[:16]
    root = Path(os.environ.get(KERNEL_DIR_ENV) or Path(user_cache_dir("chattui")) / "kernels")
    return root / f"decode_bf16-{key}.so"


def _compile(target: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (g++ or $CXX)")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libraries = [a for p in cpp_extension.library_paths() for a in (f"-L{p}", f"-Wl,-rpath,{p}")]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *FLAGS, *includes, str(SOURCE), "-o", str(built), *libraries, "-lc10", "-ltorch_cpu"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        built.replace(target)  # atomic: a concurrent loader sees the whole library or none
    for stale in target.parent.glob("decode_bf16-*.so"):  # builds for an older source or PyTorch
        if stale != target:
            stale.unlink(missing_ok=True)


BUILD_NOTE = "compiling CPU kernels, once (about 10 s)"  # what loaders show while the compiler runs


def needs_build() -> bool:
    """Whether the first bf16_decode_ops() call on this machine will run the compiler (seconds)."""
    return bf16_decode_ops.cache_info().currsize == 0 and cpu_has_avx512_bf16() and not _library_path().exists()


@functools.cache
def bf16_decode_ops():
    """torch.ops.chattui (linear_bf16, rms_norm_bf16), built if needed; None where they cannot run here."""
    if not cpu_has_avx512_bf16():
        return None
    path = _library_path()
    try:
        if not path.exists():
            log.info("compiling the bfloat16 decode kernels (once per machine) into %s", path)
            _compile(path)
        torch.ops.load_library(str(path))
        return torch.ops.chattui
    except (OSError, RuntimeError) as e:
        log.warning("bfloat16 decode kernels unavailable, using PyTorch's: %s", e)
        return None
