"""The user's TOML config file: default model, device, dtype, theme, model folders, export folder.

A bad value never stops the app: it is left at its default and reported as
`<file>: <key>: <what is allowed>, got <value>`. Only `theme` is ever written back, and only by
replacing its own line, so the user's comments and layout survive.
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from chattui.paths import write_text_atomic
from engine.params import DTYPE_CHOICES, DTYPE_NAMES

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEFAULT_THEME = "textual-dark"

EXAMPLE = """\
# chattui configuration
# default_model = "~/models/SmolLM2-135M-Instruct"   # opened when --model is not given
# device = "auto"            # auto, cpu, cuda, cuda:N, mps
# dtype = "auto"             # auto, float32, bfloat16, float16
# theme = "textual-dark"     # any Textual theme (ctrl+t to pick one)
# model_folders = ["~/models"]   # listed by the model picker and `chattui models` (model folders, .gguf files, folders of them)
# export_dir = "~/chats"     # where exports go (default: the current directory)
"""


@dataclass
class Config:
    path: Path | None = None  # the file the values came from (None: built-in defaults)
    default_model: str | None = None  # model folder opened when --model is not given
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    theme: str = DEFAULT_THEME  # a Textual theme name (checked by the app, which knows the themes)
    model_folders: list[str] = field(default_factory=list)  # extra places the model picker lists
    export_dir: str | None = None  # where exports are written (None: the current directory)
    errors: list[str] = field(default_factory=list)  # one line per bad value, naming file and key

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.path}: {key}: {message}")

    def save_theme(self, theme: str) -> None:
        """Remember the theme; failures are logged, never raised (the UI keeps working)."""
        self.theme = theme
        if self.path is None:
            return
        try:
            set_value(self.path, "theme", theme)
        except (OSError, ValueError) as e:
            log.warning("could not save the theme to %s: %s", self.path, e)


def default_path(config_dir: Path) -> Path:
    return config_dir / CONFIG_FILE


def load_config(path: Path) -> Config:
    """Read the config file; a missing file gives the defaults, bad values give `errors`."""
    config = Config(path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return config
    except (OSError, UnicodeDecodeError) as e:
        config.errors.append(f"{path}: cannot read ({e})")
        return config
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        config.errors.append(f"{path}: invalid TOML ({e}); using the defaults")
        return config

    for key, value in data.items():
        if key not in _CHECKS:
            config.error(key, f"unknown key (known: {', '.join(_CHECKS)})")
            continue
        problem = _CHECKS[key](value)
        if problem:
            config.error(key, f"{problem}, got {value!r}")
            continue
        if key == "model_folders":
            value = list(value)
        setattr(config, key, value)
    return config


def _string(value) -> str | None:
    return None if isinstance(value, str) and value.strip() else "expected a non-empty string"


def _device(value) -> str | None:
    if isinstance(value, str) and DEVICE_PATTERN.fullmatch(value):
        return None
    return "expected auto, cpu, cuda, cuda:N or mps"


def _dtype(value) -> str | None:
    return None if value in DTYPE_CHOICES else f"expected auto, {', '.join(DTYPE_NAMES[:-1])} or {DTYPE_NAMES[-1]}"


def _folders(value) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return None
    return "expected a list of folder paths (strings)"


_CHECKS = {
    "default_model": _string,
    "device": _device,
    "dtype": _dtype,
    "theme": _string,
    "model_folders": _folders,
    "export_dir": _string,
}


def set_value(path: Path, key: str, value: str) -> None:
    """Set a top-level string key in the file, replacing its line or adding one; never rewrites
    a file that does not parse (the user's text is theirs to fix)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = EXAMPLE
    tomllib.loads(text)  # raises ValueError (TOMLDecodeError) rather than clobbering a broken file
    line = f"{key} = {_toml_string(value)}"
    lines = text.splitlines()
    pattern = re.compile(rf"\s*{re.escape(key)}\s*=")
    end = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("[")), len(lines))
    for i in range(end):
        if pattern.match(lines[i]):
            lines[i] = line
            break
    else:
        lines.insert(end, line)
    write_text_atomic(path, "\n".join(lines) + "\n")


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
