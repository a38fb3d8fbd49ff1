"""Model architectures, one file per family, and the registry (models.registry) that describes each family.

Importing `models`, `models.config` or `models.registry` does not import torch; the family files do.
"""

from __future__ import annotations

from pathlib import Path

from models.config import ConfigError, ModelConfig
from models.registry import FAMILIES, Family, config_from_hf, family_of

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"  # the bundled model chattui opens by default

__all__ = ["DEFAULT_MODEL_DIR", "FAMILIES", "ConfigError", "Family", "ModelConfig", "config_from_hf", "family_of"]
