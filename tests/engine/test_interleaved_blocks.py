"""The kernels' interleaved layout of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K blocks (16 rows side by side,
engine/kernels/quant.cpp): the rearrangement, its decode kernels on both instruction sets (the float-activation
one of the output layer for the 32-value types), prefill tiles from it, and where loading uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

import engine.kernels as kernels
import engine.quant as quant
from engine.errors import EngineError
from engine.quant import INTERLEAVED, QuantizedEmbedding, QuantizedLinear, fuse_quantized_linears, interleave_blocks
from tests.engine.test_quant_kernels import (
    ISAS,
    activation_error_bound,
    assert_within_float32_rounding,
    linear_case,
    needs_kernels,
    quantized_activation,
    random_blocks,
)

T = GGMLQuantizationType
FLOAT_INTERLEAVED_TYPES = [T.Q4_0, T.Q4_1, T.Q8_0]  # x as it is on their groups (Q6_K: as two int8 parts)
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
INT8_ONLY_TYPES = [T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K]  # no float-activation kernel on their groups
INTERLEAVED_TYPES = [*FLOAT_INTERLEAVED_TYPES, T.Q5_0, T.Q5_1, *K_QUANTS]

pytestmark = needs_kernels


def interleaved(blocks: np.ndarray, qtype: T) -> torch.Tensor:
    return kernels.quant_ops().quant_interleave(torch.from_numpy(blocks.copy()), int(qtype))


@pytest.mark.parametrize("qtype", INTERLEAVED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("isa", ISAS)
def test_interleaving_rearranges_the_bytes_and_dequantizes_to_the_same_values(qtype, isa):
    blocks = random_blocks(qtype, 48, 512 if qtype in K_QUANTS else 96, seed=11)  # 2 superblocks, 3 blocks
    rearranged = interleaved(blocks, qtype)
    assert not torch.equal(rearranged, torch.from_numpy(blocks))
    # the same bytes, each group of 16 rows its own (the layout is local to a group); Q5's fifth bits are
    # reordered within their 4-byte words, so there the same bits
    for group in (slice(None), slice(16, 32)):
        if qtype in (T.Q5_0, T.Q5_1):
            assert np.unpackbits(rearranged[group].numpy()).sum() == np.unpackbits(blocks[group]).sum()
        else:
            assert sorted(rearranged[group].flatten().tolist()) == sorted(blocks[group].flatten().tolist())
    expected = torch.from_numpy(quants.dequantize(blocks, qtype))
    ops = kernels.quant_ops()
    code = int(qtype) | INTERLEAVED
    assert torch.equal(ops.quant_dequantize(rearranged, code, torch.float32, isa), expected)
    assert torch.equal(ops.quant_dequantize(rearranged, code, torch.bfloat16, isa), expected.bfloat16())
    assert torch.equal(ops.quant_dequantize(rearranged[16:48], code, torch.float32, isa), expected[16:48])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", INTERLEAVED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows_blocks", [(16, 1), (48, 3), (32, 18)], ids=lambda s: f"{s[0]}x{s[1]}blocks")
def test_interleaved_kernel_matches_the_dequantized_reference(qtype, rows_blocks, isa):
    """The smallest K (one block per row), one and three groups, and SmolLM's 576 columns (18 blocks): within
    the activation's rounding bound of the exact product, and within float32 rounding of the product with the
    activation rounded as the kernel does (a wrong scale, offset or word order fails the second)."""
    blocks, w, bias, xs = linear_case(qtype, *rows_blocks)
    rearranged = interleaved(blocks, qtype)
    for x in xs:
        y = kernels.quant_ops().quant_linear(x, rearranged, int(qtype) | INTERLEAVED, bias, isa)
        assert y.shape == (*x.shape[:-1], len(blocks)) and y.dtype == x.dtype
        x64 = x.double().numpy().reshape(-1)
        expected = w @ x64 + bias.double().numpy()
        rounding = np.abs(expected) * 2**-8 if x.dtype == torch.bfloat16 else 0.0  # a bfloat16 output's
        got = y.double().numpy().reshape(-1)
        assert (np.abs(got - expected) <= activation_error_bound(w, x64) + rounding).all()
        assert_within_float32_rounding(y, w, quantized_activation(x64), bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", FLOAT_INTERLEAVED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows_blocks", [(16, 1), (48, 3), (32, 18)], ids=lambda s: f"{s[0]}x{s[1]}blocks")
def test_interleaved_float_activation_kernel_matches_the_exact_product(qtype, rows_blocks, isa):
    """The output layer's path on interleaved blocks (a tied embedding's): x as it is, so the exact product of
    the dequantized weights and x within float32 rounding (a bfloat16 output: its own rounding)."""
    blocks, w, bias, xs = linear_case(qtype, *rows_blocks)
    rearranged = interleaved(blocks, qtype)
    for x in xs:
        y = kernels.quant_ops().quant_linear(x, rearranged, int(qtype) | INTERLEAVED, bias, isa, True)
        assert y.shape == (*x.shape[:-1], len(blocks)) and y.dtype == x.dtype
        assert_within_float32_rounding(y, w, x.double().numpy().reshape(-1), bias)


def two_part_activation(x: np.ndarray) -> np.ndarray:
    """x as the Q6_K groups' output-layer kernel sees it, in float64: its int8 rounding (quantized_activation) plus
    the int8 rounding of the residual x - that (computed in float32, rounded once, as the kernel's fma)."""
    rounded = quantized_activation(x)
    residual = (x.astype(np.float32).astype(np.float64) - rounded).astype(np.float32)
    return rounded + quantized_activation(residual)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows_blocks", [(16, 1), (48, 3)], ids=lambda s: f"{s[0]}x{s[1]}blocks")
def test_the_q6_k_output_layer_kernel_rounds_x_to_two_int8_parts(rows_blocks, isa):
    """The output layer's path on interleaved Q6_K groups: within float32 rounding of the product with x as the
    two parts (a wrong residual, scale or offset fails it), and within half the residual's step of the exact
    product: 254x inside one int8 rounding's bound, which the test checks it is."""
    blocks, w, bias, xs = linear_case(T.Q6_K, *rows_blocks)
    rearranged = interleaved(blocks, T.Q6_K)
    for x in xs:
        y = kernels.quant_ops().quant_linear(x, rearranged, int(T.Q6_K) | INTERLEAVED, bias, isa, True)
        assert y.shape == (*x.shape[:-1], len(blocks)) and y.dtype == x.dtype
        x64 = x.double().numpy().reshape(-1)
        two_parts = two_part_activation(x64)
        assert_within_float32_rounding(y, w, two_parts, bias)
        residual = x64 - quantized_activation(x64)
        bound = activation_error_bound(w, residual.astype(np.float32).astype(np.float64)) + 1e-5 * np.abs(w) @ np.abs(x64)
        assert (bound * 100 < activation_error_bound(w, x64)).all()
        if x.dtype == torch.float32:
            exact = w @ x64 + bias.double().numpy()
            assert (np.abs(y.double().numpy().reshape(-1) - exact) <= bound).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", INTERLEAVED_TYPES, ids=lambda t: t.name)
def test_interleaved_and_row_kernels_agree_to_float32_rounding(qtype, isa):
    cols = 768 if qtype in K_QUANTS else 576
    blocks = random_blocks(qtype, 64, cols, seed=12)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(3))
    ops = kernels.quant_ops()
    for float_activation in (False, True) if qtype in FLOAT_INTERLEAVED_TYPES else (False,):
        rows = ops.quant_linear(x, torch.from_numpy(blocks), int(qtype), None, isa, float_activation)
        groups = ops.quant_linear(x, interleaved(blocks, qtype), int(qtype) | INTERLEAVED, None, isa, float_activation)
        torch.testing.assert_close(groups, rows, rtol=1e-5, atol=1e-5 * rows.abs().max().item())


def test_the_kernels_refuse_what_the_layout_does_not_cover():
    ops = kernels.quant_ops()
    with pytest.raises(RuntimeError, match="whole groups of 16 rows"):
        ops.quant_interleave(torch.from_numpy(random_blocks(T.Q4_0, 24, 64, seed=1)), int(T.Q4_0))
    with pytest.raises(RuntimeError, match="no interleaved layout"):  # every type the kernels take has one
        ops.quant_interleave(torch.zeros(16, 64, dtype=torch.uint8), int(T.F16))
    rearranged = interleaved(random_blocks(T.Q8_0, 16, 64, seed=1), T.Q8_0)
    with pytest.raises(RuntimeError, match="whole groups of 16 rows"):
        ops.quant_linear(torch.randn(64), rearranged[:8], int(T.Q8_0) | INTERLEAVED, None, 0)
    for qtype in INT8_ONLY_TYPES:
        groups = interleaved(random_blocks(qtype, 16, 256, seed=1), qtype)
        with pytest.raises(RuntimeError, match="interleaved blocks of this type have no float-activation kernel"):
            ops.quant_linear(torch.randn(256), groups, int(qtype) | INTERLEAVED, None, 0, True)


@pytest.mark.parametrize("qtype", INTERLEAVED_TYPES, ids=lambda t: t.name)
def test_an_interleaved_layer_decodes_and_prefills_as_before(qtype, monkeypatch, float32_prefill):
    """One row through the interleaved kernel, to float32 rounding of the row kernel's; many rows (prefill)
    dequantize whole groups per chunk (a CHUNK_VALUES of 1.5 groups still takes whole ones), exactly."""
    monkeypatch.setattr(quant, "CHUNK_VALUES", 24 * 512)
    blocks, bias = random_blocks(qtype, 48, 512, seed=5), torch.randn(48)
    rows, layer = QuantizedLinear(512, 48, qtype, blocks, bias), QuantizedLinear(512, 48, qtype, blocks.copy(), bias)
    assert layer.can_interleave()
    layer.interleave()
    assert layer.interleaved and layer.kernel_code == int(qtype) | INTERLEAVED and "interleaved=True" in repr(layer)
    assert not layer.can_interleave()  # once
    x = torch.randn(2, 5, 512)
    with torch.inference_mode():
        assert torch.equal(layer(x), rows(x))
        one = x[:1, :1]
        torch.testing.assert_close(layer(one), rows(one), rtol=1e-5, atol=1e-5 * rows(one).abs().max().item())


def test_only_blocks_every_reader_covers_are_interleaved(monkeypatch):
    """A tied embedding and output layer share one tensor of blocks: interleaved for both, or for neither."""
    odd = QuantizedLinear(64, 24, T.Q4_0, random_blocks(T.Q4_0, 24, 64, seed=1))
    q5_k_output = QuantizedLinear(256, 16, T.Q5_K, random_blocks(T.Q5_K, 16, 256, seed=1), float_activation=True)
    q4_k = QuantizedLinear(256, 16, T.Q4_K, random_blocks(T.Q4_K, 16, 256, seed=1))
    q4_k_output = QuantizedLinear(256, 16, T.Q4_K, random_blocks(T.Q4_K, 16, 256, seed=4), float_activation=True)
    q5_0_output = QuantizedLinear(64, 16, T.Q5_0, random_blocks(T.Q5_0, 16, 64, seed=5), float_activation=True)
    covered = QuantizedLinear(64, 32, T.Q4_1, random_blocks(T.Q4_1, 32, 64, seed=1))
    table = torch.from_numpy(random_blocks(T.Q8_0, 48, 64, seed=2))
    embedding = QuantizedEmbedding(48, 64, T.Q8_0, table)
    output = QuantizedLinear(64, 48, T.Q8_0, table, float_activation=True)
    assert output.blocks.data_ptr() == embedding.blocks.data_ptr()
    odd_table = torch.from_numpy(random_blocks(T.Q8_0, 24, 64, seed=3))
    odd_embedding, odd_output = QuantizedEmbedding(24, 64, T.Q8_0, odd_table), QuantizedLinear(64, 24, T.Q8_0, odd_table)
    model = torch.nn.ModuleList([odd, q5_k_output, covered, embedding, output, odd_embedding, odd_output, q4_k, q4_k_output,
                                 q5_0_output])
    ids = torch.tensor([[0, 47, 17, 17, 30]])
    x = torch.randn(1, 64)
    before_lookup, before_logits = embedding(ids), output(x)
    monkeypatch.setenv(quant.INTERLEAVED_BLOCKS_ENV, "0")
    interleave_blocks(model)
    assert not any(layer.interleaved for layer in model)
    monkeypatch.delenv(quant.INTERLEAVED_BLOCKS_ENV)
    interleave_blocks(model)
    # Q4_K: its int8-activation layer, not an output layer (no float-activation kernel on its groups, nor on
    # Q5_K's or Q5_0's)
    assert [layer.interleaved for layer in model] == [False, False, True, True, True, False, False, True, False, False]
    assert "interleaved=True" in repr(embedding)
    assert torch.equal(embedding(ids), before_lookup)  # rows looked up through their groups
    torch.testing.assert_close(output(x), before_logits, rtol=1e-5, atol=1e-5 * before_logits.abs().max().item())
    with pytest.raises(EngineError, match="cannot interleave"):
        odd.interleave()


def test_interleaved_parts_fuse_into_an_interleaved_layer():
    parts = [QuantizedLinear(64, n, T.Q8_0, random_blocks(T.Q8_0, n, 64, seed=n), torch.randn(n)) for n in (32, 16, 16)]
    x = torch.randn(1, 1, 64)
    for p in parts:
        p.interleave()
    separate = torch.cat([p(x) for p in parts], dim=-1)
    fused = fuse_quantized_linears(parts)
    assert fused.interleaved and fused.kernel_code == parts[0].kernel_code
    torch.testing.assert_close(fused(x), separate, rtol=1e-6, atol=1e-6)
    rows = QuantizedLinear(64, 16, T.Q8_0, random_blocks(T.Q8_0, 16, 64, seed=2))
    assert fuse_quantized_linears([parts[1], rows]) is None  # layouts differ

