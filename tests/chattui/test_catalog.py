"""Model discovery: bundled, recent, config folders, the Hugging Face cache (folders and GGUF files),
Ollama, LM Studio, llama.cpp's cache and pulled models, from config.json and GGUF headers alone (no
torch), with parameter counts and sizes; broken stores skipped; names resolving to files and opening."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from gguf_files import write_gguf as write_checkpoint_gguf
from model_stores import gguf_parameters, hub_gguf_repo, ollama_model, write_gguf
from safetensors import safe_open

from chattui.catalog import Stores, display_name, hf_cache_models, human_bytes, human_count, inspect_folder, scan
from chattui.cli import main
from chattui.models_cli import resolve_model_arg
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
    for family in ("qwen2", "gpt2", "llama", "gemma3"):
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

    assert [(f.name, f.path) for f in hf_cache_models(cache)] == [("Qwen/Qwen2-tiny", snapshot),
                                                                  ("tiiuae/falcon-tiny", falcon)]
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


# -- GGUF files in other tools' stores -------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A temporary HOME, with chattui's data and config dirs in it and no store variables set."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("OLLAMA_MODELS", "LLAMA_CACHE", "HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHATTUI_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("CHATTUI_CONFIG_DIR", str(home / "config"))
    return home


@pytest.fixture
def stores(home, tmp_path, monkeypatch) -> dict[str, Path]:
    """One usable model in every store, plus broken ones beside them; returns name -> expected path."""
    models = tmp_path / "gguf"
    llama, qwen2, qwen3, gpt2 = (write_gguf(models / f"{a}.gguf", a, rows=8 * (i + 1))
                                 for i, a in enumerate(("llama", "qwen2", "qwen3", "gpt2")))
    phi3 = write_gguf(models / "phi3.gguf", "phi3")
    ollama = home / ".ollama" / "models"
    expected = {
        "tiny:latest": ollama_model(ollama, "tiny", "latest", llama),
        "hf.co/org/Model-GGUF:Q8_0": ollama_model(ollama, "Model-GGUF", "Q8_0", qwen2, registry="hf.co",
                                                  namespace="org"),
    }
    ollama_model(ollama, "phi3", "mini", phi3)  # an architecture chattui does not build
    half = write_gguf(models / "half.gguf", "llama", rows=16)
    ollama_model(ollama, "half", "latest", half, size=half.stat().st_size + 100)  # blob still downloading
    broken = ollama / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"layers": [')
    gone = ollama / "manifests" / "registry.ollama.ai" / "library" / "gone" / "latest"
    gone.parent.mkdir(parents=True)
    gone.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                            "digest": "sha256:" + "ab" * 32, "size": 10}]}))

    lm_studio = home / ".lmstudio" / "models"
    expected["lmstudio-community/Qwen3-GGUF/qwen3-Q8_0.gguf"] = write_gguf(
        lm_studio / "lmstudio-community" / "Qwen3-GGUF" / "qwen3-Q8_0.gguf", "qwen3", rows=24)
    (lm_studio / "pub" / "Linked").mkdir(parents=True)
    (lm_studio / "pub" / "Linked" / "out.gguf").symlink_to(gpt2)  # leads out of the store
    (lm_studio / "pub" / "Linked" / "bad.gguf").write_bytes(b"GGML" + bytes(64))
    old = home / ".cache" / "lm-studio" / "models"
    expected["old/M/m.gguf"] = write_gguf(old / "old" / "M" / "m.gguf", "llama")

    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "llama-cache"))
    expected["org_repo_gpt2.gguf"] = write_gguf(tmp_path / "llama-cache" / "org_repo_gpt2.gguf", "gpt2", rows=32)

    hub = home / ".cache" / "huggingface" / "hub"
    expected["org/Tiny-GGUF:tiny-q8_0.gguf"] = hub_gguf_repo(hub, "org/Tiny-GGUF", "tiny-q8_0.gguf", qwen3)

    expected["fake-pulled"] = write_gguf(home / "data" / "models" / "fake-pulled" / "Fake.gguf", "llama")
    (home / "data" / "models" / ".pull-fake-x1").mkdir()  # a pull in progress: not a model yet
    write_gguf(home / "data" / "models" / ".pull-fake-x1" / "half.gguf")

    mine = tmp_path / "mine"
    expected["a.gguf"] = write_gguf(mine / "a.gguf", "qwen2")
    (home / "config").mkdir()
    (home / "config" / "config.toml").write_text(f"model_folders = [{json.dumps(str(mine))}]\n")
    return expected


def test_models_json_lists_every_store_with_header_fields(stores, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="chattui")
    assert main(["models", "--json"]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"bundled (default)", *stores}
    assert {n: Path(e["path"]) for n, e in listed.items() if n in stores} == stores
    tiny = listed["tiny:latest"]
    assert tiny == {"name": "tiny:latest", "source": "ollama", "architecture": "llama",
                    "parameters": gguf_parameters(8), "weight_type": "Q8_0",
                    "size_bytes": stores["tiny:latest"].stat().st_size, "path": str(stores["tiny:latest"])}
    sources = {n: e["source"] for n, e in listed.items()}
    assert sources == {"bundled (default)": "bundled", "tiny:latest": "ollama", "hf.co/org/Model-GGUF:Q8_0": "ollama",
                       "lmstudio-community/Qwen3-GGUF/qwen3-Q8_0.gguf": "lm-studio", "old/M/m.gguf": "lm-studio",
                       "org_repo_gpt2.gguf": "llama.cpp", "org/Tiny-GGUF:tiny-q8_0.gguf": "hf-cache",
                       "fake-pulled": "pulled", "a.gguf": "config"}
    assert listed["org_repo_gpt2.gguf"]["architecture"] == "gpt2"
    assert listed["org_repo_gpt2.gguf"]["parameters"] == gguf_parameters(32)
    assert listed["org/Tiny-GGUF:tiny-q8_0.gguf"]["architecture"] == "qwen3"

    reasons = "\n".join(r.getMessage() for r in caplog.records)
    size = (tmp_path / "gguf" / "half.gguf").stat().st_size
    assert "skipped Ollama model broken:latest: manifest" in reasons and "unreadable" in reasons
    assert "skipped Ollama model gone:latest: its blob" in reasons and "is missing" in reasons
    assert "skipped Ollama model half:latest: blob" in reasons and f"has {size} of {size + 100} bytes" in reasons
    assert "'phi3' is not supported" in reasons
    assert "out.gguf: it links out of" in reasons
    assert "pub/Linked/bad.gguf" in reasons and "not a GGUF file" in reasons


def test_models_prints_one_line_per_model(stores, capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "ARCHITECTURE", "PARAMETERS", "WEIGHTS", "SIZE", "PATH"]
    assert len(lines) == 1 + 1 + len(stores)
    tiny = next(line for line in lines if line.startswith("tiny:latest "))
    assert tiny.split()[:5] == ["tiny:latest", "ollama", "llama", "576", "Q8_0"]
    assert tiny.endswith(str(stores["tiny:latest"]))


def test_model_names_resolve_to_their_files(stores, capsys):
    for name, path in stores.items():
        assert resolve_model_arg(name) == path, name
    with pytest.raises(ValueError, match="smollm2-135m-instruct is not pulled yet: `chattui pull"):
        resolve_model_arg("smollm2-135m-instruct")
    assert main(["generate", "--model", "nonesuch:7b", "hi"]) == 1
    assert capsys.readouterr().err == ("chattui: error: nonesuch:7b: no such file or folder, and no model of "
                                       "that name (`chattui models` lists them)\n")


def test_absent_and_odd_stores_are_skipped_without_a_crash(home, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama-file"))
    (tmp_path / "ollama-file").write_text("not a folder")
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "absent"))
    entries = scan([], [], Stores.default(), bundled=tmp_path / "none")
    assert [e.source for e in entries] == ["bundled"]
    assert "skipped Ollama's store" in caplog.text and "no manifests/ folder" in caplog.text


def test_a_recent_gguf_keeps_the_name_its_store_gives_it(stores):
    blob = stores["tiny:latest"]
    entries = scan([str(blob)], [], Stores.default(), bundled=Path("/nonexistent"))
    assert [(e.name, e.source) for e in entries[:2]] == [("bundled (nonexistent)", "bundled"),
                                                         ("tiny:latest", "ollama")]
    assert sum(e.path == blob for e in entries) == 1


@pytest.fixture
def loadable_gguf(tmp_path, checkpoint_factory) -> Path:
    """A tiny random llama checkpoint as a complete GGUF file (weights, tokenizer) that chattui can open."""
    path, _ = write_checkpoint_gguf(checkpoint_factory("llama"), tmp_path / "tiny-llama.gguf", "llama")
    return path


def generated_by(model: str, capsys) -> str:
    """The model file that `chattui generate --model MODEL` opened."""
    argv = ["generate", "--model", model, "--raw", "--temperature", "0", "--max-new-tokens", "2", "--json", "Hi"]
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)["model"]


def test_store_names_open_their_files(home, loadable_gguf, capsys):
    lm_studio = home / ".lmstudio" / "models" / "pub" / "Tiny-GGUF" / "tiny-llama.gguf"
    lm_studio.parent.mkdir(parents=True)
    shutil.copy(loadable_gguf, lm_studio)
    assert generated_by("pub/Tiny-GGUF/tiny-llama.gguf", capsys) == str(lm_studio)


def test_model_name_tag_opens_the_ollama_blob(home, loadable_gguf, capsys):
    blob = ollama_model(home / ".ollama" / "models", "tiny", "latest", loadable_gguf)
    assert generated_by("tiny:latest", capsys) == str(blob)


def test_gguf_files_are_called_by_their_store_names(stores):
    assert display_name(stores["tiny:latest"]) == "tiny:latest"
    assert display_name(stores["fake-pulled"]) == "fake-pulled"
    assert display_name(stores["org/Tiny-GGUF:tiny-q8_0.gguf"]) == "org/Tiny-GGUF:tiny-q8_0.gguf"


def test_models_and_pull_never_import_torch(stores):
    import subprocess
    import sys

    code = ("import sys; from chattui.cli import main; assert main(['models', '--json']) == 0; "
            "assert main(['pull', 'nonesuch']) == 1; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tiny:latest" in proc.stdout


def test_a_name_resolves_reading_only_its_own_header(stores):
    import chattui.catalog

    chattui.catalog._summary_of_unchanged.cache_clear()
    assert resolve_model_arg("old/M/m.gguf") == stores["old/M/m.gguf"]
    assert chattui.catalog._summary_of_unchanged.cache_info().misses == 1
