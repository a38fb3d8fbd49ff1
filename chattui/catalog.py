"""Find the models chattui can open, without loading them: config.json is read as JSON only, a
GGUF file's header only (engine.gguf.header, torch-free).

Sources, in the order the picker and `chattui models` list them: the bundled model, recently used
models, models fetched by `chattui pull`, folders named in the config file (`model_folders`), the
Hugging Face hub cache (`models--org--name/snapshots/<rev>/`: checkpoint folders and `.gguf`
files), Ollama's store, LM Studio's models folders and llama.cpp's download cache. Each entry says
its architecture, parameter count, the type the weights are stored in and the size on disk; a
folder or file the user named that cannot be loaded says why. A store that is absent, unreadable
or half-written is skipped with a logged reason; links that lead out of a store are not followed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

from chattui.paths import bundled_model_dir, hf_hub_cache, pulled_models_dir
from models.config import ConfigError
from models.registry import config_from_hf, family_of

if TYPE_CHECKING:
    from engine.gguf.header import GGUFSummary

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    path: Path
    name: str  # what `--model` accepts besides the path: see the store functions below
    source: str  # bundled, recent, pulled, config, hf-cache, ollama, lm-studio or llama.cpp
    architecture: str | None = None
    parameters: int | None = None  # estimated from config.json; counted from a GGUF header
    weight_type: str | None = None  # torch_dtype in config.json, or the GGUF file type ("Q4_1")
    size_bytes: int = 0
    problem: str | None = None  # why it cannot be loaded; None when it looks loadable

    def to_json(self) -> dict:
        return {
            "name": self.name, "source": self.source, "architecture": self.architecture,
            "parameters": self.parameters, "weight_type": self.weight_type, "size_bytes": self.size_bytes,
            "path": str(self.path),
        }


OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
STORE_SOURCES = ("pulled", "hf-cache", "ollama", "lm-studio", "llama.cpp")  # other tools' lists, not the user's


@dataclass(frozen=True)
class Found:
    """A model a store names, before its config.json or GGUF header is read (finding is cheap, reading
    a real GGUF vocabulary is not: names resolve from these)."""

    path: Path
    name: str
    source: str

    def inspect(self) -> ModelEntry:
        return inspect_model(self.path, self.source, self.name)


@dataclass(frozen=True)
class Stores:
    """Where the stores are on this machine (tests point them into a temporary folder)."""

    hf_cache: Path  # the Hugging Face hub cache
    pulled: Path  # `chattui pull`'s folder
    ollama: Path  # $OLLAMA_MODELS, else ~/.ollama/models
    lm_studio: tuple[Path, ...]  # ~/.lmstudio/models and the older ~/.cache/lm-studio/models
    llama_cpp: Path  # $LLAMA_CACHE, else llama.cpp's cache folder

    @classmethod
    def default(cls) -> Stores:
        home = Path.home()
        return cls(
            hf_cache=hf_hub_cache(),
            pulled=pulled_models_dir(),
            ollama=Path(os.environ.get("OLLAMA_MODELS") or home / ".ollama" / "models").expanduser(),
            lm_studio=(home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"),
            llama_cpp=Path(
                os.environ.get("LLAMA_CACHE") or platformdirs.user_cache_dir("llama.cpp", appauthor=False)
            ).expanduser(),
        )

    @classmethod
    def at(cls, root: Path) -> Stores:
        """Every store in its own folder under root (none of which needs to exist)."""
        return cls(root / "hf-cache", root / "pulled", root / "ollama", (root / "lm-studio",), root / "llama.cpp")


def display_name(path: str | Path) -> str:
    """A model as people call it: "org/name" for a hub-cache snapshot ("org/name:FILE" for a file in
    one), MODEL:TAG for an Ollama blob, the catalog name for a pulled file, else the folder's or
    file's name."""
    p = Path(path)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return "/".join(p.parent.parent.name.split("--")[1:])
    if p.parent.parent.name == "snapshots" and p.parent.parent.parent.name.startswith("models--"):
        return f"{display_name(p.parent)}:{p.name}"
    if p.parent.name == "blobs" and p.name.startswith("sha256-"):
        return ollama_blob_name(p) or p.name
    if p.parent.parent == pulled_models_dir():
        return p.parent.name  # the catalog name it was pulled by
    return p.name or str(p)


def ollama_blob_name(blob: Path) -> str | None:
    """The MODEL:TAG whose manifest names this blob as its model layer, if any does."""
    root = blob.parent.parent
    digest = "sha256:" + blob.name.removeprefix("sha256-")
    for manifest in _files_at_depth(root / "manifests", 4):
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
            if any(x.get("mediaType") == OLLAMA_MODEL_LAYER and x.get("digest") == digest for x in layers):
                return ollama_name(manifest, root / "manifests")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            continue  # ollama_models() says what is wrong with it
    return None


def adapter_name(path: str | Path) -> str:
    """A LoRA adapter folder as people call it: the job's folder for a job's adapter/, else its own name."""
    p = Path(path)
    return p.parent.name if p.name == "adapter" and p.parent.name else p.name


def model_label(model: str | Path, adapter: str | Path | None = None) -> str:
    """What the status bar and a reply's header call a model: "name", or "name + adapter" with a LoRA adapter."""
    return display_name(model) + (f" + {adapter_name(adapter)}" if adapter else "")


def inspect_folder(path: Path, source: str, name: str | None = None) -> ModelEntry:
    entry = ModelEntry(path=path, name=name or display_name(path), source=source)
    config_path = path / "config.json"
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(hf, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        entry.problem = "no config.json" if path.is_dir() else "folder not found"
        return entry
    except (OSError, UnicodeDecodeError, ValueError) as e:
        entry.problem = f"config.json unreadable ({e})"
        return entry
    entry.weight_type = hf.get("torch_dtype") or hf.get("dtype")
    entry.size_bytes = folder_size(path)
    archs = hf.get("architectures") or []
    entry.architecture = archs[0] if archs and isinstance(archs[0], str) else hf.get("model_type")
    try:
        config = config_from_hf(hf)
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        entry.problem = str(e)
        return entry
    entry.architecture = config.architecture
    entry.parameters = family_of(config).estimate_parameters(config)
    if not any(path.glob("*.safetensors")):
        entry.problem = "no .safetensors weights"
    return entry


def folder_size(path: Path) -> int:
    """Bytes of the files directly in the folder (symlinks followed, as in the hub cache)."""
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    if e.is_file():
                        total += e.stat().st_size
                except OSError:
                    continue
    except OSError:
        pass
    return total


def inspect_gguf(path: Path, source: str, name: str | None = None) -> ModelEntry:
    """A GGUF file from its header; a bad file or an architecture chattui cannot build is a problem."""
    from engine.errors import CheckpointError
    from engine.gguf.header import SUPPORTED_GGUF_ARCHITECTURES

    entry = ModelEntry(path=path, name=name or display_name(path), source=source)
    try:
        stat = path.stat()
        summary = _summary_of_unchanged(path, stat.st_mtime_ns, stat.st_size)
    except OSError as e:
        entry.problem = f"cannot read it ({e.strerror or e})"
        return entry
    except CheckpointError as e:
        entry.problem = str(e).removeprefix(f"{path}: ")
        return entry
    entry.architecture = summary.architecture
    entry.parameters = summary.parameters
    entry.weight_type = summary.weight_type
    entry.size_bytes = summary.size_bytes
    if not summary.supported:
        entry.problem = (
            f"GGUF architecture {summary.architecture!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )
    return entry


@functools.lru_cache(maxsize=256)
def _summary_of_unchanged(path: Path, mtime_ns: int, size: int) -> GGUFSummary:
    """summarize_gguf, once per file version: parsing a real vocabulary takes a second or more, and
    the picker scans again each time it opens."""
    from engine.gguf.header import summarize_gguf

    return summarize_gguf(path)


def is_gguf_file(path: Path) -> bool:
    """A .gguf file, or a file that starts with GGUF's magic (Ollama's blobs have no suffix)."""
    from engine.gguf.header import is_gguf_path  # here: the gguf package is not needed at start-up

    return is_gguf_path(path)


def inspect_model(path: Path, source: str, name: str | None = None) -> ModelEntry:
    """A checkpoint folder or a GGUF file."""
    if is_gguf_file(path):
        return inspect_gguf(path, source, name)
    return inspect_folder(path, source, name)


def _inside(path: Path, root: Path) -> bool:
    """Whether path, links followed, stays inside root (a store's own links, as in the hub cache, do)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def gguf_files(root: Path, depth: int, store: Path | None = None) -> list[Path]:
    """The .gguf files at most `depth` folders below root, sorted, skipping hidden names (a pull's
    staging folder) and linked folders; a linked file counts only when it stays inside `store`
    (default: root)."""
    store = store or root
    found: list[Path] = []
    try:
        children = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        if root.exists():
            log.warning("skipped %s: cannot read it (%s)", root, e.strerror or e)
        return found
    for child in children:
        if child.name.startswith("."):
            continue
        try:
            if child.is_dir(follow_symlinks=False):
                if depth > 1:
                    found += gguf_files(Path(child.path), depth - 1, store)
            elif child.name.lower().endswith(".gguf") and child.is_file():
                if child.is_symlink() and not _inside(Path(child.path), store):
                    log.warning("skipped %s: it links out of %s", child.path, store)
                    continue
                found.append(Path(child.path))
        except OSError as e:
            log.warning("skipped %s: %s", child.path, e.strerror or e)
    return found


def _kept(entry: ModelEntry) -> bool:
    """Whether scan() lists the entry: a store's entry only when it can be opened (the others are
    logged); the bundled model, recent models and config folders keep their problem to show it."""
    if entry.problem is None or entry.source not in STORE_SOURCES:
        return True
    # A known architecture chattui does not build is routine; a bad file is news.
    level = logging.INFO if entry.architecture else logging.WARNING
    log.log(level, "skipped %s (%s): %s", entry.name, entry.path, entry.problem)
    return False


def _hf_cache_repos(cache: Path) -> list[tuple[str, Path, list[Path]]]:
    """(org/name, repo folder, snapshots: the `main` revision first when known, then newest first)."""
    found: list[tuple[str, Path, list[Path]]] = []
    try:
        repos = sorted(p for p in cache.iterdir() if p.name.startswith("models--"))
    except OSError as e:
        if cache.exists():
            log.warning("skipped the Hugging Face cache %s: cannot read it (%s)", cache, e.strerror or e)
        return found
    for repo in repos:
        name = "/".join(repo.name.split("--")[1:])
        snapshots = repo / "snapshots"
        main_ref = repo / "refs" / "main"
        try:
            revision = main_ref.read_text().strip() if main_ref.exists() else None
            candidates = [snapshots / revision] if revision and (snapshots / revision).is_dir() else []
            candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError as e:
            log.info("skipped %s: %s", repo, e.strerror or e)
            continue
        found.append((name, repo, candidates))
    return found


def hf_cache_models(cache: Path) -> list[Found]:
    """Checkpoint folders ("org/name") and .gguf files ("org/name:FILE", from the newest snapshot
    holding any) in the hub cache. Snapshot files link into the repo's blobs/, inside the store."""
    found: list[Found] = []
    for name, repo, snapshots in _hf_cache_repos(cache):
        snapshot = next((s for s in snapshots if (s / "config.json").exists()), None)
        if snapshot is not None:
            found.append(Found(snapshot, name, "hf-cache"))
        for snapshot in snapshots:
            files = gguf_files(snapshot, depth=3, store=repo)
            if files:
                found += [Found(f, f"{name}:{f.relative_to(snapshot).as_posix()}", "hf-cache") for f in files]
                break
    return found


def ollama_name(manifest: Path, manifests: Path) -> str:
    """How Ollama names a model: MODEL:TAG for its own library, NAMESPACE/MODEL:TAG for other
    namespaces, REGISTRY/NAMESPACE/MODEL:TAG for other registries."""
    registry, namespace, model, tag = manifest.relative_to(manifests).parts
    if registry == "registry.ollama.ai":
        return f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    return f"{registry}/{namespace}/{model}:{tag}"


def ollama_models(root: Path) -> list[Found]:
    """Models in Ollama's store: each manifest (manifests/REGISTRY/NAMESPACE/MODEL/TAG, JSON) names
    its model layer by digest, a GGUF file in blobs/sha256-HEX."""
    manifests = root / "manifests"
    if not manifests.is_dir():
        if root.exists():
            log.warning("skipped Ollama's store %s: no manifests/ folder", root)
        return []
    found: list[Found] = []
    for manifest in _files_at_depth(manifests, 4):
        name = ollama_name(manifest, manifests)
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            layers = data["layers"]
            layer = next(x for x in layers if isinstance(x, dict) and x.get("mediaType") == OLLAMA_MODEL_LAYER)
            algorithm, _, digest = layer["digest"].partition(":")
            if algorithm != "sha256" or not digest.isalnum():
                raise ValueError(f"unexpected digest {layer['digest']!r}")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("skipped Ollama model %s: manifest %s unreadable (%s: %s)", name, manifest, type(e).__name__, e)
            continue
        except StopIteration:
            log.info("skipped Ollama model %s: its manifest names no %s layer", name, OLLAMA_MODEL_LAYER)
            continue
        blob = root / "blobs" / f"sha256-{digest}"
        if blob.is_symlink() and not _inside(blob, root):
            log.warning("skipped Ollama model %s: %s links out of the store", name, blob)
            continue
        try:
            size = blob.stat().st_size
        except OSError:
            log.warning("skipped Ollama model %s: its blob %s is missing", name, blob)
            continue
        if isinstance(layer.get("size"), int) and layer["size"] != size:
            log.warning("skipped Ollama model %s: blob %s has %d of %d bytes", name, blob, size, layer["size"])
            continue
        found.append(Found(blob, name, "ollama"))
    return found


def _files_at_depth(root: Path, depth: int) -> list[Path]:
    """Regular files exactly `depth` levels below root (hidden names and linked folders skipped)."""
    if depth == 0:
        return [root] if root.is_file() and not root.is_symlink() else []
    try:
        children = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        log.warning("skipped %s: cannot read it (%s)", root, e.strerror or e)
        return []
    found: list[Path] = []
    for child in children:
        if child.name.startswith(".") or child.is_symlink():
            continue
        if depth == 1 and child.is_file() or depth > 1 and child.is_dir():
            found += _files_at_depth(Path(child.path), depth - 1)
    return found


def lm_studio_models(root: Path) -> list[Found]:
    """LM Studio's models folder: PUBLISHER/MODEL/*.gguf, named "PUBLISHER/MODEL/FILE"."""
    return [
        Found(f, f.relative_to(root).as_posix(), "lm-studio") for f in gguf_files(root, depth=3)
        if len(f.relative_to(root).parts) == 3
    ]


def llama_cpp_models(root: Path) -> list[Found]:
    """llama.cpp's download cache (`llama-cli -hf` and `--model-url` write ORG_REPO_FILE.gguf there)."""
    return [Found(f, f.name, "llama.cpp") for f in gguf_files(root, depth=1)]


def pulled_models(root: Path) -> list[Found]:
    """`chattui pull`'s folder: NAME/FILE.gguf, named NAME (NAME/FILE when a folder holds several)."""
    files = gguf_files(root, depth=2)
    found = []
    for f in files:
        several = sum(g.parent == f.parent for g in files) > 1
        found.append(Found(f, f"{f.parent.name}/{f.name}" if several else f.parent.name, "pulled"))
    return found


def config_folder_models(folders: list[str]) -> list[Found]:
    """Each config `model_folders` item: a model folder, a .gguf file, or a folder of them (checkpoint
    folders one level down, .gguf files up to two). A missing one is found too, to say so."""
    found: list[Found] = []
    for folder in folders:
        base = Path(folder).expanduser()
        if (base / "config.json").exists() or base.suffix.lower() == ".gguf" and base.is_file():
            found.append(Found(base, display_name(base), "config"))
            continue
        try:
            children = sorted(c for c in base.iterdir() if (c / "config.json").exists())
        except OSError:
            found.append(Found(base, base.name, "config"))  # inspect says "folder not found"
            continue
        found += [Found(child, display_name(child), "config") for child in children]
        found += [Found(f, f.relative_to(base).as_posix(), "config") for f in gguf_files(base, depth=2)]
    return found


def find(recent: list[str], folders: list[str], stores: Stores, bundled: Path | None = None) -> list[Found]:
    """Every model on this machine, each path once, in the order they are listed: the bundled model,
    the recent ones (under the name their store gives them), then every store's. Reads no weights,
    no config.json and no GGUF header."""
    bundled = bundled or bundled_model_dir()
    stored = [
        *pulled_models(stores.pulled),
        *config_folder_models(folders),
        *hf_cache_models(stores.hf_cache),
        *ollama_models(stores.ollama),
        *(f for root in stores.lm_studio for f in lm_studio_models(root)),
        *llama_cpp_models(stores.llama_cpp),
    ]
    by_path: dict[Path, Found] = {}
    for f in stored:
        by_path.setdefault(_key(f.path), f)

    found: list[Found] = []
    seen: set[Path] = set()

    def add(f: Found) -> None:
        if _key(f.path) not in seen:
            seen.add(_key(f.path))
            found.append(f)

    add(Found(bundled, f"bundled ({bundled.name})", "bundled"))
    for p in recent:
        add(by_path.get(_key(Path(p))) or Found(Path(p), display_name(p), "recent"))
    for f in stored:
        add(f)
    return found


def scan(recent: list[str], folders: list[str], stores: Stores, bundled: Path | None = None) -> list[ModelEntry]:
    """What find() finds, inspected. Entries from the stores that cannot be opened (a bad file, an
    unsupported architecture) are left out and logged; the others keep their problem to show it."""
    entries = []
    for f in find(recent, folders, stores, bundled):
        entry = f.inspect()
        if f.source == "bundled" and entry.problem in ("no config.json", "folder not found"):
            entry.problem = "not installed yet"
        if _kept(entry):
            entries.append(entry)
    return entries


def _key(path: Path) -> Path:
    try:
        return path.resolve() if path.exists() else path
    except (OSError, RuntimeError):
        return path


class ModelNotFound(LookupError):
    """--model names neither a file or folder nor a model `chattui models` lists."""


def resolve_model(value: str, found: Callable[[], list[Found]]) -> Path:
    """A --model value as a path: an existing file or folder as is, else the model of that name
    (`chattui models`' NAME column; the stores are searched only then, and only the match is read)."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if path.is_absolute():  # no name is an absolute path
        raise ModelNotFound(f"{path}: no such file or folder")
    problem = None
    for f in found():
        if f.name == value:
            entry = f.inspect()
            if entry.problem is None:
                return f.path
            problem = problem or f"{value} ({f.path}): {entry.problem}"
    if problem:
        raise ModelNotFound(problem)
    from chattui.pull import CATALOG

    if value in CATALOG:
        size = human_bytes(CATALOG[value].size_bytes)
        raise ModelNotFound(f"{value} is not pulled yet: `chattui pull {value}` fetches it ({size})")
    raise ModelNotFound(f"{value}: no such file or folder, and no model of that name (`chattui models` lists them)")


def human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0" + unit, unit)
    return str(n)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
