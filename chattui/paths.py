"""Where chattui keeps its files (found without importing torch or creating anything), and how it writes them."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from engine.job_files import APP_NAME
from engine.job_files import user_data_dir as data_dir  # noqa: F401 (where jobs, conversations and pulls live)
from models import DEFAULT_MODEL_DIR

CONFIG_DIR_ENV = "CHATTUI_CONFIG_DIR"  # overrides the platform's user config dir


def bundled_model_dir() -> Path:
    """models/default (importing `models` imports no torch)."""
    return DEFAULT_MODEL_DIR


def pulled_models_dir() -> Path:
    """Where `chattui pull` puts models: one folder per catalog name."""
    return data_dir() / "models"


def config_dir() -> Path:
    return Path(os.environ.get(CONFIG_DIR_ENV) or platformdirs.user_config_dir(APP_NAME)).expanduser()


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, resolved the way huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file renamed into place: readers, and a crash, never
    leave a half-written file. Creates the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
