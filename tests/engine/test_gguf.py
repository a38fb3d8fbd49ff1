"""GGUF files: header summary, bad files."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.errors import CheckpointError
from engine.gguf import summarize_gguf


def _write_small_gguf(path: Path, **metadata) -> Path:
    """A header-only-interesting GGUF: two tensors (one Q8_0), a name and a context length."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(metadata.get("name", "Tiny Test"))
    writer.add_context_length(128)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    weight = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)  # numpy (rows, cols)
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_summary_reads_the_header(tmp_path):
    path = _write_small_gguf(tmp_path / "tiny.gguf")
    summary = summarize_gguf(path)
    assert summary.architecture == "llama"
    assert summary.name == "Tiny Test"
    assert summary.parameters == 8 * 64 + 64
    assert summary.weight_type == "Q8_0"
    assert summary.size_bytes == path.stat().st_size
    assert summary.context_length == 128
    assert summary.supported


def test_summary_does_not_import_torch(tmp_path):
    import subprocess

    path = _write_small_gguf(tmp_path / "tiny.gguf")
    code = (f"import sys; from engine.gguf import summarize_gguf; summarize_gguf({str(path)!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={"PYTHONPATH": str(root)})


def test_summary_name_falls_back_to_the_file_stem(tmp_path):
    path = _write_small_gguf(tmp_path / "my-model.Q8_0.gguf", name="")
    assert summarize_gguf(path).name == "my-model.Q8_0"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b"GGML" + b[4:], "not a GGUF file (starts with b'GGML'"),
        (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "unsupported GGUF version 7"),
        (lambda b: b[:6], "truncated GGUF file"),
        (lambda b: b[:200], "truncated GGUF file"),
        (lambda b: b[:-10], "truncated GGUF file"),
        (lambda b: b"", "not a GGUF file"),
    ],
    ids=["magic", "version", "short-header", "short-metadata", "short-data", "empty"],
)
def test_bad_files_get_one_line_naming_the_file(tmp_path, corrupt, message):
    good = _write_small_gguf(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(corrupt(good))
    with pytest.raises(CheckpointError) as e:
        summarize_gguf(bad)
    assert str(e.value).startswith(f"{bad}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        summarize_gguf(tmp_path / "absent.gguf")


def test_metadata_of_the_wrong_type(tmp_path):
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("llama.context_length", "long")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"'llama.context_length' must be an integer, found string"):
        summarize_gguf(path)
