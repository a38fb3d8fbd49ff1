"""The family registry: every entry is complete and consistent with the model it builds, it is readable
without torch, and the architecture files never reach into the engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_model, read_model_config
from engine.lora import default_targets
from models.config import ConfigError
from models.registry import FAMILIES, SUPPORTED_ARCHITECTURES, architecture_of, config_from_hf, family_of

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def test_models_config_and_registry_import_without_torch():
    code = "import sys, models, models.config, models.registry\nassert 'torch' not in sys.modules\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_architecture_files_never_import_the_engine():
    for path in sorted((ROOT / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "engine" or n.startswith("engine.") for n in names), (path.name, names)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_each_entry_names_its_architectures_model_types_and_module(family):
    assert len(family.architectures) == len(family.model_types) > 0
    for architecture, model_type in zip(family.architectures, family.model_types):
        assert architecture_of({"model_type": model_type}) == architecture  # files without `architectures`
    assert issubclass(family.module_class(), torch.nn.Module)
    assert set(SUPPORTED_ARCHITECTURES) >= set(family.architectures)


def test_an_unknown_architecture_is_refused_with_the_supported_list():
    with pytest.raises(ConfigError, match="unsupported architecture 'FalconForCausalLM'; supported: LlamaForCausalLM"):
        config_from_hf({"architectures": ["FalconForCausalLM"]})
    with pytest.raises(ConfigError, match="names no architecture"):
        config_from_hf({"model_type": "falcon"})


def test_the_fusion_plan_and_lora_targets_name_real_layers(family_checkpoint):
    """Every fusion of the family happens in every layer, and every default LoRA target matches a layer:
    a misspelt name in the registry fails here, not silently at decode speed."""
    name, folder = family_checkpoint
    model = load_model(folder, read_model_config(folder), CPU, torch.float32)
    family = family_of(model.config)
    for fusion in family.fusions:
        owners = [m for m in model.modules() if hasattr(type(m), fusion.into)]
        assert len(owners) == model.config.num_hidden_layers
        assert all(fusion.into in m.__dict__ for m in owners), fusion
    assert default_targets(model) == list(family.lora_targets)
    for target in family.lora_targets:
        assert any(n.endswith("." + target) for n, _ in model.named_modules()), target
