"""Find model folders for the picker without loading them: config.json is read as JSON only.

Sources, in the order the picker lists them: the bundled model, recently used models, folders
named in the config file, and the Hugging Face hub cache (`models--org--name/snapshots/<rev>/`).
Each entry says its architecture, an estimated parameter count, the dtype the weights are stored
in and the size on disk; a folder that cannot be loaded says why.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from chattui.paths import bundled_model_dir

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    path: Path
    name: str  # folder name, or "org/name" for the hub cache
    source: str  # "bundled", "recent", "config" or "hf-cache"
    architecture: str | None = None
    parameters: int | None = None  # estimated from config.json
    dtype: str | None = None  # torch_dtype in config.json (how the weights are stored)
    size_bytes: int = 0
    problem: str | None = None  # why it cannot be loaded; None when it looks loadable


@functools.cache
def _models_config() -> ModuleType | None:
    """models/config.py (pure Python) loaded on its own, so the `models` package and torch stay unimported."""
    if "models.config" in sys.modules:
        return sys.modules["models.config"]
    try:
        spec = importlib.util.find_spec("models")
        folder = Path(list(spec.submodule_search_locations)[0])
        file_spec = importlib.util.spec_from_file_location("chattui._models_config", folder / "config.py")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[file_spec.name] = module  # dataclasses look their module up here
        file_spec.loader.exec_module(module)
        return module
    except Exception as e:  # the picker still lists folders; loading will say what is wrong
        log.warning("cannot read models/config.py for architecture checks: %s", e)
        return None


def display_name(path: str | Path) -> str:
    """A model folder as people call it: "org/name" for a hub-cache snapshot, else the folder's name."""
    p = Path(path)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return "/".join(p.parent.parent.name.split("--")[1:])
    return p.name or str(p)


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
    entry.dtype = hf.get("torch_dtype") or hf.get("dtype")
    entry.size_bytes = folder_size(path)
    archs = hf.get("architectures") or []
    entry.architecture = archs[0] if archs and isinstance(archs[0], str) else hf.get("model_type")
    module = _models_config()
    if module is None:
        return entry
    try:
        config = module.config_from_hf(hf)
    except (module.ConfigError, ValueError, TypeError, KeyError) as e:
        entry.problem = str(e)
        return entry
    entry.architecture = config.architecture
    entry.parameters = estimate_parameters(config)
    if not any(path.glob("*.safetensors")):
        entry.problem = "no .safetensors weights"
    return entry


def estimate_parameters(config) -> int:
    if hasattr(config, "num_parameters_estimate"):
        return int(config.num_parameters_estimate)
    # GPT-2: embeddings + per block (2 LayerNorms, c_attn, c_proj, c_fc, mlp c_proj) + final LayerNorm.
    d, inner, layers = config.n_embd, config.n_inner, config.n_layer
    block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
    return config.vocab_size * d + config.n_positions * d + layers * block + 2 * d


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


def hf_cache_models(cache: Path) -> list[tuple[str, Path]]:
    """(org/name, snapshot folder) for every model repo in the hub cache (the `main` revision when known)."""
    found: list[tuple[str, Path]] = []
    try:
        repos = sorted(p for p in cache.iterdir() if p.name.startswith("models--"))
    except OSError:
        return found
    for repo in repos:
        name = "/".join(repo.name.split("--")[1:])
        snapshots = repo / "snapshots"
        main_ref = repo / "refs" / "main"
        try:
            revision = main_ref.read_text().strip() if main_ref.exists() else None
            candidates = [snapshots / revision] if revision else []
            candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            continue
        for snapshot in candidates:
            if (snapshot / "config.json").exists():
                found.append((name, snapshot))
                break
    return found


def scan(
    recent: list[str],
    folders: list[str],
    hf_cache: Path,
    bundled: Path | None = None,
) -> list[ModelEntry]:
    """Every model the picker offers, duplicates removed (the first source wins). Hub-cache repos
    of an unsupported architecture are left out; other entries keep their problem to show it."""
    entries: list[ModelEntry] = []
    seen: set[Path] = set()

    def add(entry: ModelEntry) -> None:
        key = entry.path.resolve() if entry.path.exists() else entry.path
        if key not in seen:
            seen.add(key)
            entries.append(entry)

    bundled = bundled or bundled_model_dir()
    entry = inspect_folder(bundled, "bundled", name=f"bundled ({bundled.name})")
    if entry.problem == "no config.json" or entry.problem == "folder not found":
        entry.problem = "not installed yet"
    add(entry)
    for p in recent:
        add(inspect_folder(Path(p), "recent"))
    for folder in folders:
        base = Path(folder).expanduser()
        if (base / "config.json").exists():
            add(inspect_folder(base, "config"))
            continue
        try:
            children = sorted(c for c in base.iterdir() if (c / "config.json").exists())
        except OSError:
            add(ModelEntry(path=base, name=base.name, source="config", problem="folder not found"))
            continue
        for child in children:
            add(inspect_folder(child, "config"))
    for _, snapshot in hf_cache_models(hf_cache):
        entry = inspect_folder(snapshot, "hf-cache")
        if entry.parameters is None and _models_config() is not None:
            continue  # not a supported architecture: the issue asks to list only those
        add(entry)
    return entries


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
