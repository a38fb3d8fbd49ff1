"""Model discovery for the picker: bundled, recent, config folders and the Hugging Face cache, read
from config.json alone (no torch), with parameter estimates and sizes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from safetensors import safe_open

from chattui.catalog import Stores, hf_cache_models, human_bytes, human_count, inspect_folder, scan
from chattui.paths import bundled_model_dir, hf_hub_cache


def parameter_count(folder: Path) -> int:
    total = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def fake_hub_repo(cache: Path, name: str, source: Path, revision: str = "abc123") -> Path:
    repo = cache / ("models--" + name.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    blobs = repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in source.iterdir():
        blob = blobs / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_parameter_estimate_is_close_to_the_real_count(checkpoint_factory):
    for family in ("qwen2", "gpt2", "llama"):
        folder = checkpoint_factory(family)
        entry = inspect_folder(folder, "config")
        assert entry.problem is None, entry.problem
        real = parameter_count(folder)
        assert abs(entry.parameters - real) / real < 0.02, (family, entry.parameters, real)
        assert entry.size_bytes == sum(f.stat().st_size for f in folder.iterdir())


def test_hf_cache_lists_supported_models_only_with_org_name(tmp_path, checkpoint_factory):
    qwen2 = checkpoint_factory("qwen2")
    cache = tmp_path / "hub"
    snapshot = fake_hub_repo(cache, "Qwen/Qwen2-tiny", qwen2)
    falcon = fake_hub_repo(cache, "tiiuae/falcon-tiny", qwen2)
    config = json.loads((falcon / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (falcon / "config.json").unlink()
    (falcon / "config.json").write_text(json.dumps(config))
    (cache / "datasets--x--y").mkdir()

    assert [n for n, _ in hf_cache_models(cache)] == ["Qwen/Qwen2-tiny", "tiiuae/falcon-tiny"]
    entries = scan([], [], replace(Stores.at(tmp_path), hf_cache=cache), bundled=tmp_path / "none")
    hub = [e for e in entries if e.source == "hf-cache"]
    assert [(e.name, e.path) for e in hub] == [("Qwen/Qwen2-tiny", snapshot)]
    assert hub[0].architecture == "Qwen2ForCausalLM"
    assert hub[0].size_bytes == sum(f.stat().st_size for f in qwen2.iterdir()), "symlinks to blobs are followed"


def test_sources_in_order_with_problems_explained(tmp_path, checkpoint_factory):
    qwen2 = checkpoint_factory("qwen2")
    gpt2 = checkpoint_factory("gpt2")
    folders = tmp_path / "models"
    folders.mkdir()
    shutil.copytree(gpt2, folders / "gpt2-copy")
    (folders / "empty").mkdir()
    broken = folders / "bad-json"
    broken.mkdir()
    (broken / "config.json").write_text("{nope")
    entries = scan([str(qwen2), str(tmp_path / "gone")], [str(folders), str(tmp_path / "missing")],
                   Stores.at(tmp_path), bundled=tmp_path / "no-default")
    summary = [(e.source, e.path.name, e.problem) for e in entries]
    assert summary[0] == ("bundled", "no-default", "not installed yet")
    assert ("recent", qwen2.name, None) in summary
    assert ("recent", "gone", "folder not found") in summary
    assert ("config", "gpt2-copy", None) in summary
    assert ("config", "missing", "folder not found") in summary
    bad = next(e for e in entries if e.path.name == "bad-json")
    assert bad.problem.startswith("config.json unreadable")
    assert all(e.path.name != "empty" for e in entries), "folders without config.json are not models"


def test_the_same_folder_is_listed_once(tmp_path, checkpoint_factory):
    qwen2 = checkpoint_factory("qwen2")
    entries = scan([str(qwen2)], [str(qwen2)], Stores.at(tmp_path), bundled=qwen2)
    assert [e.source for e in entries] == ["bundled"]


def test_hub_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert hf_hub_cache() == tmp_path / "direct"


def test_bundled_model_dir_matches_models_package():
    import models

    assert bundled_model_dir() == models.DEFAULT_MODEL_DIR


def test_human_numbers():
    assert [human_count(n) for n in (None, 999, 99_900, 1_234_567, 134_515_008, 7_000_000_000)] == [
        "?", "999", "99.9K", "1.2M", "134.5M", "7B"]
    assert [human_bytes(n) for n in (12, 2048, 538_090_408)] == ["12 B", "2.0 KB", "513.2 MB"]
