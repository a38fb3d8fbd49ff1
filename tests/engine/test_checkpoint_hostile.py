"""Malformed or hostile model folders give one CheckpointError line (file, key, what was expected), never a
traceback or a hang: bad metadata types, safetensors headers that lie, contradictory RoPE settings, FIFOs and
devices in place of files, a huge sparse header. Plus a fuzz test of the safetensors header reader."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from faults import fuzz_reader

from engine import Engine
from engine.checkpoint import _read_header
from engine.errors import CheckpointError, EngineError


@pytest.fixture
def folder(checkpoint_factory, tmp_path) -> Path:
    return shutil.copytree(checkpoint_factory("llama"), tmp_path / "model")


pytestmark = pytest.mark.usefixtures("no_hang")


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))  # NaN is written as NaN, as Python's json (and some tools) do


def load_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as error:
        Engine.load(folder, device="cpu", dtype="float32")
    message = str(error.value)
    assert "\n" not in message
    return message


def write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# -- metadata ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "changes", "needle"), [
    ("generation_config.json", {"eos_token_id": ["x"]}, "'eos_token_id' must be a token id or a list of token ids, got ['x']"),
    ("generation_config.json", {"bos_token_id": True}, "'bos_token_id' must be a token id"),
    ("tokenizer_config.json", {"tokenizer_class": 5}, "'tokenizer_class' must be a string, got int 5"),
    ("tokenizer_config.json", {"additional_special_tokens": 5}, "'additional_special_tokens' must be a list of tokens"),
    ("config.json", {"tokenizer_class": ["LlamaTokenizer"]}, "'tokenizer_class' must be a string"),
    ("config.json", {"rope_theta": math.nan}, "'rope_theta' must be a positive number, got nan"),
    ("config.json", {"rope_parameters": {"rope_type": "default", "rope_theta": math.nan}},
     "'rope_theta' must be a positive number, got nan"),
    ("config.json", {"rms_norm_eps": math.inf}, "'rms_norm_eps' must be a positive number, got inf"),
    ("config.json", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "'rope_scaling.rope_type' = 'linear' contradicts rope_parameters.rope_type = 'default'; keep only one of them"),
    ("config.json", {"rope_theta": 500000.0}, "'rope_theta' = 500000.0 contradicts rope_parameters.rope_theta = 10000.0"),
])
def test_malformed_metadata_is_one_line_naming_file_and_key(folder, file, changes, needle):
    edit_json(folder / file, **changes)
    message = load_error(folder)
    assert message.startswith(str(folder / file)) and needle in message, message


def test_rope_scaling_that_agrees_with_rope_parameters_is_accepted(folder):
    params = json.loads((folder / "config.json").read_text())["rope_parameters"]
    edit_json(folder / "config.json", rope_scaling={"type": params["rope_type"]}, rope_theta=params["rope_theta"])
    Engine.load(folder, device="cpu", dtype="float32")


# -- safetensors headers that lie --------------------------------------------------------------------------------


def test_a_dtype_that_does_not_match_the_bytes_is_refused(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}},
                             bytes(8))
    with pytest.raises(CheckpointError, match=r"w has 8 bytes, its dtype F32 and shape \[2, 2\] need 16$"):
        _read_header(path)


def test_overlapping_data_offsets_are_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    path = write_safetensors(tmp_path / "m.safetensors", header, bytes(16))
    with pytest.raises(CheckpointError, match="the data of a and b overlap"):
        _read_header(path)


@pytest.mark.parametrize(("entry", "needle"), [
    ({"dtype": "F4", "shape": [1], "data_offsets": [0, 1]}, "unknown dtype 'F4'"),
    ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "unknown dtype ['F32']"),
    ({"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}, "shape must be a list of sizes >= 0"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, "0 <= begin <= end"),
    ("not an object", "expected an object"),
])
def test_impossible_header_entries_are_refused(tmp_path, entry, needle):
    path = write_safetensors(tmp_path / "m.safetensors", {"w": entry}, bytes(16))
    with pytest.raises(CheckpointError, match="corrupt safetensors header entry for 'w'") as error:
        _read_header(path)
    assert needle in str(error.value)


def test_integer_weights_are_refused_by_name(folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].long()
    save_file(weights, folder / "model.safetensors")
    assert "model.norm.weight is stored as torch.int64; model weights must be floating point" in load_error(folder)


def test_a_huge_sparse_header_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 3_000_000_000))
        f.truncate(3_000_000_016)  # sparse: no disk space, 3 GB of zeros to a reader
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(CheckpointError, match="header of 3,000,000,000 bytes; at most 100,000,000"):
            _read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and time.monotonic() - started < 1


# -- files that are not files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "chat_template.jinja", "model.safetensors"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero-symlink"])
def test_fifos_and_devices_are_refused_without_reading_them(folder, name, kind):
    target = folder / name
    target.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(target)  # opening it to read would block until a writer comes
    else:
        target.symlink_to("/dev/zero")  # reading it never ends
    message = load_error(folder)
    assert message == f"{target}: not a regular file (a FIFO, device or socket); refusing to read it"


# -- fuzz --------------------------------------------------------------------------------------------------------


def _valid_safetensors(tmp_path: Path) -> bytes:
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}
    return write_safetensors(tmp_path / "valid.safetensors", header, bytes(range(32))).read_bytes()


def _mutations(valid: bytes, rng: random.Random, count: int):
    header_len = struct.unpack("<Q", valid[:8])[0]
    for i in range(count):
        data = bytearray(valid)
        kind = i % 6
        if kind == 0:  # flip bytes anywhere
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:  # flip bytes in the JSON header
            for _ in range(rng.randint(1, 4)):
                data[8 + rng.randrange(header_len)] = rng.choice(b'{}[]",:0123456789-eE.tfnx ')
        elif kind == 2:  # truncate
            data = data[: rng.randrange(len(data))]
        elif kind == 3:  # a lying header length
            data[:8] = struct.pack("<Q", rng.choice([0, 1, header_len - 1, header_len + 1, 2**63, 2**64 - 1,
                                                     rng.randrange(2**64)]))
        elif kind == 4:  # random bytes
            data = bytearray(rng.randbytes(rng.randrange(64)))
        else:  # a valid header length with random JSON-ish text
            text = "".join(rng.choice('{}[]",:0123456789-abdeFIU_ ') for _ in range(rng.randrange(80))).encode()
            data = bytearray(struct.pack("<Q", len(text)) + text + bytes(rng.randrange(64)))
        yield bytes(data)


def test_fuzzed_safetensors_headers_raise_only_checkpoint_errors(tmp_path):
    rng = random.Random(1234)
    valid = _valid_safetensors(tmp_path)

    def consistent(tensors, data):  # every tensor inside the file, no overlaps
        spans = sorted((t.begin, t.begin + t.nbytes) for t in tensors.values())
        assert all(end <= len(data) for _, end in spans)
        assert all(a_end <= b_begin for (_, a_end), (b_begin, _) in zip(spans, spans[1:]))

    outcomes, peak = fuzz_reader(tmp_path / "fuzz.safetensors", _mutations(valid, rng, 3000), _read_header,
                                 consistent, seconds=3.0)
    assert outcomes["refused"] > 100 and outcomes["ok"] > 0, outcomes
    assert peak < 16 << 20, f"{peak / 2**20:.1f} MiB"


def test_engine_errors_are_what_loading_a_fuzzed_checkpoint_raises(folder):
    valid = (folder / "model.safetensors").read_bytes()
    rng = random.Random(7)
    for data in _mutations(valid[:4096], rng, 12):  # the header and the start of the data
        (folder / "model.safetensors").write_bytes(data + valid[4096:])
        try:
            Engine.load(folder, device="cpu", dtype="float32")
        except EngineError as e:
            assert "\n" not in str(e)
