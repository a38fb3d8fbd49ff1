"""A fuzz test of the GGUF header reader: random and mutated bytes give a one-line CheckpointError (or a
consistent summary), never another exception, a hang or unbounded memory."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from faults import fuzz_reader

from engine.gguf import summarize_gguf


pytestmark = pytest.mark.usefixtures("no_hang")


def _valid_gguf(tmp_path: Path) -> bytes:
    path = tmp_path / "valid.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("fuzz")
    writer.add_context_length(64)
    writer.add_block_count(1)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.arange(24, dtype=np.float32).reshape(3, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _mutations(valid: bytes, rng: random.Random, count: int):
    header_end = min(len(valid), 512)  # magic, version, counts, metadata and tensor infos live up front
    for i in range(count):
        data = bytearray(valid)
        kind = i % 5
        if kind == 0:  # flip bytes in the header
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(header_end)] = rng.randrange(256)
        elif kind == 1:  # truncate
            data = data[: rng.randrange(len(data))]
        elif kind == 2:  # lying tensor or metadata counts (u64 at offsets 8 and 16)
            offset = rng.choice([8, 16])
            data[offset : offset + 8] = struct.pack("<Q", rng.choice([0, 1, 3, 2**32, 2**63, 2**64 - 1,
                                                                       rng.randrange(2**64)]))
        elif kind == 3:  # a lying length or type somewhere in the header (any aligned u64 / u32)
            offset = rng.randrange(24, header_end - 8) & ~3
            data[offset : offset + 8] = struct.pack("<Q", rng.choice([2**31, 2**40, 2**64 - 1, rng.randrange(2**64)]))
        else:  # random bytes after a valid magic
            data = bytearray(b"GGUF" + rng.randbytes(rng.randrange(8, 256)))
        yield bytes(data)


def test_fuzzed_gguf_headers_raise_only_checkpoint_errors(tmp_path):
    rng = random.Random(2026)
    valid = _valid_gguf(tmp_path)
    assert summarize_gguf(tmp_path / "valid.gguf").parameters == 24 + 8

    def fits(summary, data):  # what is accepted describes a file that fits in its bytes
        assert 0 <= summary.parameters and summary.size_bytes == len(data)

    outcomes, peak = fuzz_reader(tmp_path / "fuzz.gguf", _mutations(valid, rng, 3000), summarize_gguf, fits,
                                 seconds=4.0)
    assert outcomes["refused"] > 50 and outcomes["ok"] > 0, outcomes
    assert peak < 64 << 20, f"{peak / 2**20:.1f} MiB"
