"""Every supported model family, described in one place: what the rest of chattui needs to know about it.

A `Family` names the Hugging Face architectures it reads, how to build its typed config from config.json,
which module class to build, how its checkpoint keys and LoRA targets are named, which projections
inference fuses into one matmul, and how many parameters a config means. Loading, inference, LoRA and
the model picker read these entries; none of them switches on a family by name.

Pure Python (no torch): the module class is named by its import path and imported when a model is built,
so the UI can read configs and estimates without loading PyTorch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.config import (
    ConfigError,
    Gemma3Config,
    GPT2Config,
    LlamaConfig,
    ModelConfig,
    estimate_gemma3_parameters,
    estimate_gpt2_parameters,
    estimate_llama_parameters,
    gemma3_config_from_hf,
    gpt2_config_from_hf,
    llama_config_from_hf,
)


@dataclass(frozen=True)
class Fusion:
    """Inference computes the projections `parts` of a module as one matmul, stored on it as `into`.

    Applies to every module whose class declares `into` (as None: the unfused forward) and has the parts
    as plain linear layers; the parts' weights become views of the fused weight."""

    into: str  # e.g. "fused_qkv"
    parts: tuple[str, ...]  # e.g. ("q_proj", "k_proj", "v_proj"), in the order the fused output is split


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # HF `architectures` names this family reads
    model_types: tuple[str, ...]  # HF `model_type` of each architecture, same order (for files without `architectures`)
    config_class: type  # the typed config `from_hf` returns
    from_hf: Callable[[dict[str, Any], str], Any]  # (config.json dict, architecture) -> config; raises ConfigError
    module: str  # "package.module.Class" of the nn.Module, built from the config
    checkpoint_prefix: str  # the base-model prefix HF adds to keys; some checkpoints are saved without it
    ignored_keys: str  # regex of checkpoint keys that are not weights (old buffers), "" for none
    lora_targets: tuple[str, ...]  # the module names LoRA adapts by default
    fusions: tuple[Fusion, ...]  # what prepare_for_inference fuses
    estimate_parameters: Callable[[Any], int]  # parameter count of a config, without building the model

    def model_type(self, architecture: str) -> str:
        """The HF model_type of one of the family's architectures."""
        return self.model_types[self.architectures.index(architecture)]

    def module_class(self) -> type:
        module, _, name = self.module.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def build(self, config: ModelConfig):
        """An uninitialised model for config (build it under torch.device('meta') to skip allocation)."""
        return self.module_class()(config)


# Every linear layer of attention and MLP (QLoRA's finding: adapting all of them beats q/v alone at the
# same parameter budget).
ROPE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QKV_AND_GATE_UP = (
    Fusion("fused_qkv", ("q_proj", "k_proj", "v_proj")),
    Fusion("fused_gate_up", ("gate_proj", "up_proj")),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama", architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
        model_types=("llama", "mistral", "qwen2", "qwen3"), config_class=LlamaConfig, from_hf=llama_config_from_hf,
        module="models.llama.LlamaForCausalLM", checkpoint_prefix="model.", ignored_keys=r"\.rotary_emb\.inv_freq$",
        lora_targets=ROPE_LORA_TARGETS, fusions=QKV_AND_GATE_UP, estimate_parameters=estimate_llama_parameters,
    ),
    Family(
        name="gpt2", architectures=("GPT2LMHeadModel",), model_types=("gpt2",), config_class=GPT2Config,
        from_hf=gpt2_config_from_hf, module="models.gpt2.GPT2LMHeadModel", checkpoint_prefix="transformer.",
        ignored_keys=r"\.attn\.(bias|masked_bias)$", lora_targets=("c_attn", "c_proj", "c_fc"), fusions=(),
        estimate_parameters=estimate_gpt2_parameters,
    ),
    Family(
        name="gemma3", architectures=("Gemma3ForCausalLM",), model_types=("gemma3_text",), config_class=Gemma3Config,
        from_hf=gemma3_config_from_hf, module="models.gemma3.Gemma3ForCausalLM", checkpoint_prefix="model.",
        ignored_keys="", lora_targets=ROPE_LORA_TARGETS, fusions=QKV_AND_GATE_UP,
        estimate_parameters=estimate_gemma3_parameters,
    ),
)

SUPPORTED_ARCHITECTURES = tuple(a for family in FAMILIES for a in family.architectures)
_BY_ARCHITECTURE = {a: family for family in FAMILIES for a in family.architectures}
_ARCHITECTURE_OF_MODEL_TYPE = {t: a for family in FAMILIES for a, t in zip(family.architectures, family.model_types)}


def architecture_of(hf: dict[str, Any]) -> str:
    """The HF architecture name in config.json, or one inferred from model_type."""
    architectures = hf.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    if architectures:
        return str(architectures[0])
    model_type = hf.get("model_type")
    if model_type in _ARCHITECTURE_OF_MODEL_TYPE:
        return _ARCHITECTURE_OF_MODEL_TYPE[model_type]
    raise ConfigError(
        f"names no architecture (no 'architectures', model_type={model_type!r}); "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Build the typed config for a config.json dict; ConfigError says which key is wrong and why."""
    architecture = architecture_of(hf)
    family = _BY_ARCHITECTURE.get(architecture)
    if family is None:
        raise ConfigError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return family.from_hf(hf, architecture)


def family_of(config: ModelConfig) -> Family:
    """The family a typed config (or a model's `.config`) belongs to."""
    for family in FAMILIES:
        if isinstance(config, family.config_class):
            return family
    raise TypeError(f"{type(config).__name__} is no registered family's config")
