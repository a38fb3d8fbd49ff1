"""Model architectures, one file per family, and the registry that maps HF names to them."""

from __future__ import annotations

import re
from pathlib import Path

import torch.nn as nn

from models.config import GPT2Config, LlamaConfig, ModelConfig, config_from_hf
from models.gpt2 import GPT2LMHeadModel
from models.llama import LlamaForCausalLM

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"  # the bundled model chattui opens by default

# Keys some published checkpoints carry that are not weights (old causal-mask and RoPE buffers).
IGNORED_CHECKPOINT_KEYS = re.compile(r"(\.attn\.(bias|masked_bias)|\.rotary_emb\.inv_freq)$")


def build_model(config: ModelConfig) -> nn.Module:
    """An uninitialised model for the config (build it under torch.device('meta') to skip allocation)."""
    if isinstance(config, GPT2Config):
        return GPT2LMHeadModel(config)
    return LlamaForCausalLM(config)


def checkpoint_prefix(config: ModelConfig) -> str:
    """The base-model prefix HF adds to keys; some checkpoints (original GPT-2) are saved without it."""
    return "transformer." if isinstance(config, GPT2Config) else "model."


__all__ = [
    "DEFAULT_MODEL_DIR",
    "GPT2Config",
    "IGNORED_CHECKPOINT_KEYS",
    "LlamaConfig",
    "ModelConfig",
    "build_model",
    "checkpoint_prefix",
    "config_from_hf",
]
