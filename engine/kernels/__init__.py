"""CPU kernels PyTorch lacks, compiled on first use with the system's C++ compiler and cached.

decode_bf16.cpp defines `torch.ops.chattui.linear_bf16` (a single-row matmul that reads weights near
memory bandwidth) and `rms_norm_bf16` (Llama's RMSNorm in one op); engine.inference uses them for
decoding on CPUs with AVX512-BF16. quant.cpp (with quant_isa.inc) defines `quant_linear` and
`quant_dequantize` on GGUF's quantized blocks, for engine.quant, on CPUs with AVX2 or AVX-512 VNNI.
They are optional: with no compiler, a failed build or another CPU, `bf16_decode_ops()` and
`quant_ops()` return None and PyTorch's kernels run. A built library is kept under the user's cache
folder, keyed by its sources, the flags and the PyTorch version, so the compiler runs once per
machine (about 10 s each).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from torch.utils import cpp_extension

from engine.device import cpu_flags, cpu_has_avx512_bf16
from engine.errors import EngineError

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
ABI = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
KERNEL_DIR_ENV = "CHATTUI_KERNEL_DIR"  # where built kernels are cached (default: the user cache folder)
ISA_ENV = "CHATTUI_KERNEL_ISA"  # avx512 or avx2: force the quantized kernels' instruction set (tests, benchmarks)


@dataclass(frozen=True)
class Library:
    name: str  # file name stem of the built library
    sources: tuple[Path, ...]  # the first is compiled, the others are included by it
    flags: tuple[str, ...]


BF16 = Library(
    "decode_bf16",
    (HERE / "decode_bf16.cpp",),
    ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512bf16",
     "-ffp-contract=off",  # no fused multiply-adds: products round as PyTorch's do
     ABI),
)
# No -m flags: quant.cpp compiles each instruction set's half for its own target and the caller picks
# one at run time. -fopenmp: at::parallel_for runs on PyTorch's OpenMP pool from the headers.
QUANT = Library(
    "quant",
    (HERE / "quant.cpp", HERE / "quant_isa.inc", HERE / "decode_isa.inc"),
    ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", ABI),
)


def _library_path(library: Library = BF16) -> Path:
    text = b"".join(p.read_bytes() for p in library.sources) + " ".join(library.flags).encode()
    key = hashlib.sha256(text + torch.__version__.encode()).hexdigest()[:16]
    root = Path(os.environ.get(KERNEL_DIR_ENV) or Path(user_cache_dir("chattui")) / "kernels")
    return root / f"{library.name}-{key}.so"


def _compile(target: Path, library: Library = BF16) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (g++ or $CXX)")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libraries = [a for p in cpp_extension.library_paths() for a in (f"-L{p}", f"-Wl,-rpath,{p}")]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *library.flags, *includes, str(library.sources[0]), "-o", str(built), *libraries,
                   "-lc10", "-ltorch_cpu"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        built.replace(target)  # atomic: a concurrent loader sees the whole library or none
    for stale in target.parent.glob(f"{library.name}-*.so"):  # builds for an older source or PyTorch
        if stale != target:
            stale.unlink(missing_ok=True)


def _load(library: Library, what: str):
    """torch.ops.chattui after loading `library` (built if needed); None, with a warning, if that fails."""
    path = _library_path(library)
    try:
        if not path.exists():
            log.info("compiling the %s (once per machine) into %s", what, path)
            _compile(path, library)
        torch.ops.load_library(str(path))
        return torch.ops.chattui
    except (OSError, RuntimeError) as e:
        log.warning("%s unavailable, using PyTorch's: %s", what, e)
        return None


BUILD_NOTE = "compiling CPU kernels, once (about 10 s)"  # what loaders show while the compiler runs


def needs_build(library: Library = BF16) -> bool:
    """Whether the first bf16_decode_ops() / quant_ops() call on this machine will run the compiler (seconds)."""
    ops, runs_here = (bf16_decode_ops, cpu_has_avx512_bf16()) if library is BF16 else (quant_ops, AVX2_FLAGS <= cpu_flags())
    return ops.cache_info().currsize == 0 and runs_here and not _library_path(library).exists()


@functools.cache
def bf16_decode_ops():
    """torch.ops.chattui (linear_bf16, rms_norm_bf16), built if needed; None where they cannot run here."""
    if not cpu_has_avx512_bf16():
        return None
    return _load(BF16, "bfloat16 decode kernels")


AVX512_VNNI_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
AVX2_FLAGS = frozenset({"avx2", "fma", "f16c"})
ISA_CODES = {"avx2": 0, "avx512": 1}  # quant.cpp's `isa` argument


def quant_isa() -> int:
    """The instruction set for the quantized kernels: AVX-512 VNNI where the CPU has it, else AVX2, or
    what CHATTUI_KERNEL_ISA names. Call only where quant_ops() is not None."""
    available = ["avx512"] if AVX512_VNNI_FLAGS <= cpu_flags() else []
    available.append("avx2")
    wanted = os.environ.get(ISA_ENV) or available[0]
    if wanted not in available:
        raise EngineError(f"{ISA_ENV}={wanted!r}: this CPU runs {' or '.join(available)}")
    return ISA_CODES[wanted]


@functools.cache
def quant_ops():
    """torch.ops.chattui (quant_linear, quant_dequantize), built if needed; None where they cannot run here."""
    if not AVX2_FLAGS <= cpu_flags():
        return None
    return _load(QUANT, "quantized-weight kernels")
