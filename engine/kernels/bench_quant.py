"""Micro benchmark of the quantized single-row kernels: weight GB/s per GGUF type on a SmolLM-135M-shaped
layer set, against this machine's memory bandwidth measured in the same run and against PyTorch's
bfloat16 and float32 single-row matmuls on the same shapes.

    python -m engine.kernels.bench_quant [--threads 2] [--seconds 0.3] [--footprint-mb 128]

Each shape is timed cycling through enough copies of its weights (--footprint-mb in all, at most 64
copies) that they come from memory, not from cache, as in a decode step; where the last-level cache
is larger than that (some virtual machines report hundreds of MB), raise --footprint-mb.
CHATTUI_KERNEL_ISA=avx2 times the AVX2 path. On a shared machine the numbers are noisy (a
descheduled thread shows as a near-zero cell): compare rows of the same run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.kernels import bf16_decode_ops, quant_isa, quant_ops

T = GGMLQuantizationType
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
# (out_features, in_features): attention q/o, MLP gate/up, MLP down, output head (SmolLM-135M)
SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]
# Offsets of each type's float16 scales in a block: set to 2**-10 so random bytes make finite weights.
SCALE_OFFSETS = {T.Q8_0: [0], T.Q4_0: [0], T.Q5_0: [0], T.Q4_1: [0, 2], T.Q5_1: [0, 2],
                 T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def measured_bandwidth(seconds: float) -> tuple[float, float]:
    """(read GB/s from a float32 sum, copy GB/s counting read + write) over 256 MB."""
    a = torch.ones(64 << 20)
    b = torch.empty_like(a)
    read = a.numel() * 4 / time_call(lambda: a.sum(), seconds) / 1e9
    copy = 2 * a.numel() * 4 / time_call(lambda: b.copy_(a), seconds) / 1e9
    return read, copy


def time_call(fn, seconds: float) -> float:
    """Seconds per call: the median of single calls over `seconds` (robust to a busy shared machine)."""
    fn()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_blocks(qtype: GGMLQuantizationType, out_features: int, in_features: int) -> torch.Tensor:
    values, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = torch.randint(0, 256, (out_features * in_features // values, nbytes), dtype=torch.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        blocks[:, offset : offset + 2] = torch.tensor([0x00, 0x14], dtype=torch.uint8)  # float16 2**-10
    return blocks.view(out_features, -1)


def streaming_gbps(make_weight, nbytes: int, call, footprint: int, seconds: float) -> float:
    """GB/s of weights read by `call(weight)`, cycling through copies of `make_weight()`."""
    weights = [make_weight() for _ in range(max(1, min(64, footprint // nbytes)))]
    index = [0]

    def step():
        index[0] = (index[0] + 1) % len(weights)
        call(weights[index[0]])

    return nbytes / time_call(step, seconds) / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=0.3, help="timing per measurement")
    parser.add_argument("--footprint-mb", type=int, default=128, help="weights cycled through per shape")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    footprint = args.footprint_mb << 20
    ops = quant_ops()
    if ops is None:
        raise SystemExit("the quantized kernels are unavailable here (see the warning above)")
    isa = quant_isa()
    read, copy = measured_bandwidth(args.seconds)
    print(f"threads {args.threads}, isa {'avx512-vnni' if isa else 'avx2'}; memory: read {read:.1f} GB/s, "
          f"copy {copy:.1f} GB/s (read + write)")
    print("GB/s of weights streamed by one-row matmuls, (out, in); K-quants on in rounded up to 256s")
    header = "type      " + "".join(f"{f'{o}x{i}':>13}" for o, i in SHAPES) + "   layer set ms"
    print(header)
    with torch.inference_mode():
        for qtype in TYPES:
            values, nbytes = GGML_QUANT_SIZES[qtype]
            cells, total_s = [], 0.0
            for out_features, in_features in SHAPES:
                in_features = math.ceil(in_features / values) * values
                x = torch.randn(in_features)
                size = out_features * in_features // values * nbytes
                gbps = streaming_gbps(lambda o=out_features, i=in_features: random_blocks(qtype, o, i), size,
                                      lambda w, x=x: ops.quant_linear(x, w, int(qtype), None, isa), footprint,
                                      args.seconds)
                cells.append(f"{gbps:13.1f}")
                total_s += size / gbps / 1e9
            print(f"{qtype.name:<10}" + "".join(cells) + f"{total_s * 1e3:15.3f}")
        dense = [("bf16 torch", torch.bfloat16, F.linear), ("f32 torch", torch.float32, F.linear)]
        if bf16_decode_ops() is not None:
            dense.insert(1, ("bf16 ours", torch.bfloat16, bf16_decode_ops().linear_bf16))
        for label, dtype, linear in dense:
            cells, total_s = [], 0.0
            for out_features, in_features in SHAPES:
                x = torch.randn(1, in_features, dtype=dtype)
                size = out_features * in_features * dtype.itemsize
                call = (lambda w, x=x: linear(x, w)) if linear is F.linear else (lambda w, x=x: linear(x, w, None))
                gbps = streaming_gbps(lambda o=out_features, i=in_features: torch.randn(o, i, dtype=dtype), size,
                                      call, footprint, args.seconds)
                cells.append(f"{gbps:13.1f}")
                total_s += size / gbps / 1e9
            print(f"{label:<10}" + "".join(cells) + f"{total_s * 1e3:15.3f}")


if __name__ == "__main__":
    main()
