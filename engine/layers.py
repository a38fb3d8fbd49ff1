"""Swapping a model's layers for other implementations: inference kernels, LoRA, quantized layers.

One walk over the module tree (as gpt-fast's quantize.py does): each child is offered to a function that
returns its replacement, or None to look inside it instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

Replacement = Callable[[str, nn.Module], "nn.Module | None"]  # (qualified name, layer) -> new layer or None


def swap_layers(model: nn.Module, replace: Replacement) -> dict[str, nn.Module]:
    """setattr every child for which replace(name, child) returns a module (the child itself to keep it and
    skip its subtree); None descends into the child. Returns the new layers by qualified name."""
    swapped: dict[str, nn.Module] = {}

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = prefix + name
            new = replace(path, child)
            if new is None:
                walk(child, path + ".")
            elif new is not child:
                setattr(parent, name, new)
                swapped[path] = new

    walk(model, "")
    return swapped


def recast(layer: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """layer as a new instance of cls, a class that adds or changes behaviour only: the very same parameter
    and buffer tensors (so tied and fused weights stay shared), attributes and submodules."""
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        new.__dict__[registry] = dict(layer.__dict__[registry])  # its own tables, the same tensors
    return new
