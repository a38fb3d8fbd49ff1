"""engine.layers: the one walk that swaps layers (kernels, LoRA, quantized), and recast's shared tensors."""

from __future__ import annotations

import torch
import torch.nn as nn

from engine.layers import recast, swap_layers


class Doubled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def tiny() -> nn.Module:
    return nn.Sequential(nn.Embedding(5, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 5, bias=False))


def test_swaps_the_layers_the_function_returns_and_descends_where_it_returns_none():
    model = tiny()
    seen = []

    def replace(name, layer):
        seen.append(name)
        return recast(layer, Doubled) if type(layer) is nn.Linear else None

    swapped = swap_layers(model, replace)
    assert seen == ["0", "1", "1.0", "1.1", "2"]
    assert list(swapped) == ["1.0", "2"] and type(model[1][0]) is Doubled and type(model[2]) is Doubled
    assert list(model.state_dict()) == list(tiny().state_dict())  # the same keys: HF names survive


def test_returning_the_layer_itself_keeps_it_and_skips_its_children():
    model = tiny()
    seen = []
    swapped = swap_layers(model, lambda name, layer: seen.append(name) or layer)
    assert swapped == {} and seen == ["0", "1", "2"]


def test_recast_shares_parameters_so_ties_and_views_survive():
    model = tiny()
    model[0].weight = model[2].weight  # tied, as lm_head and embed_tokens
    x = torch.randn(3, 4)
    expected = 2 * model[2](x)
    swap_layers(model, lambda name, layer: recast(layer, Doubled) if name == "2" else layer)
    assert model[2].weight is model[0].weight
    torch.testing.assert_close(model[2](x), expected)
