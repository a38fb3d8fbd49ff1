"""engine.kernels' quantized-weight kernels and engine.quant's modules against gguf.quants.dequantize and
a float64 matmul, on both instruction sets, and the fallback without kernels."""

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

import engine.kernels as kernels
import engine.quant as quant
from engine.device import cpu_flags
from engine.errors import EngineError
from engine.quant import QuantizedEmbedding, QuantizedLinear, fuse_quantized_linears, replace_with_quantized

T = GGMLQuantizationType
LEGACY_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]  # gguf.quants can quantize these
K_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K]
TYPES = LEGACY_TYPES + K_TYPES
ISAS = [pytest.param(0, id="avx2"),
        pytest.param(1, id="avx512", marks=pytest.mark.skipif(not kernels.AVX512_VNNI_FLAGS <= cpu_flags(),
                                                               reason="no AVX-512 VNNI"))]

needs_kernels = pytest.mark.skipif(kernels.quant_ops() is None,
                                   reason="the quantized kernels need AVX2 and a C++ compiler")


def random_blocks(qtype: T, rows: int, cols: int, seed: int) -> np.ndarray:
    """(rows, bytes per row) uint8: quantized random normals, or for K-quants (which gguf cannot quantize)
    random bytes whose float16 scales are set to a sane range (no inf or nan)."""
    rng = np.random.default_rng(seed)
    if qtype in LEGACY_TYPES:
        return quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    values, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // values, nbytes), dtype=np.uint8)
    scale_offsets = [208] if qtype == T.Q6_K else [0, 2]  # Q6_K: d at the end; Q4_K, Q5_K: d, dmin first
    for offset in scale_offsets:
        scales = rng.uniform(0.5e-3, 2e-3, blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def reference(blocks: np.ndarray, qtype: T) -> np.ndarray:  # (rows, cols) float64
    return quants.dequantize(blocks, qtype).astype(np.float64)


def activation_error_bound(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per output row, the most |x_q · w - x · w| can be: each 32 values of x are rounded to int8 steps of
    absmax / 127, an error of at most half a step each, so the bound is sum over blocks of
    (absmax / 254) * sum |w|; plus float32 rounding of the scaled sums (1e-5 of sum |w x|)."""
    half_steps = np.abs(x.reshape(-1, 32)).max(axis=1) / 254  # (in / 32,)
    per_block = np.abs(w).reshape(w.shape[0], -1, 32).sum(axis=2)  # (out, in / 32)
    return per_block @ half_steps * 1.001 + 1e-5 * np.abs(w) @ np.abs(x) + 1e-30


def quantized_activation(x: np.ndarray) -> np.ndarray:
    """x as the kernels see it, in float64: per 32 values, float32 round(x * 127 / absmax) * absmax / 127."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse = np.where(absmax > 0, np.float32(127) / absmax, np.float32(0))
    q = np.rint(blocks * inverse)  # round half to even, as vcvtps2dq
    return (q * (absmax / np.float32(127)).astype(np.float64)).reshape(-1)


def linear_case(qtype, rows: int, n_blocks: int):
    """(blocks, their float64 dequantized weights (rows, cols), a float32 bias, inputs: one float32 row and a
    (1, 1, cols) bfloat16 one) for a quant_linear test."""
    cols = n_blocks * GGML_QUANT_SIZES[qtype][0]
    blocks = random_blocks(qtype, rows, cols, seed=rows * 100 + int(qtype))
    g = torch.Generator().manual_seed(rows)
    bias = torch.randn(rows, generator=g)
    xs = [torch.randn(cols, generator=g), torch.randn(1, 1, cols, generator=g).bfloat16()]
    return blocks, reference(blocks, qtype), bias, xs


def assert_within_float32_rounding(y: torch.Tensor, w: np.ndarray, x: np.ndarray, bias: torch.Tensor) -> None:
    """y is w @ x + bias within float32 rounding (1e-5 of sum |w x|), and a bfloat16 y within its own rounding."""
    expected = w @ x + bias.double().numpy()
    tight = 1e-5 * (np.abs(w) @ np.abs(x) + np.abs(expected)) + 1e-30
    if y.dtype == torch.bfloat16:
        tight = tight + np.abs(expected) * 2**-8
    error = np.abs(y.double().numpy().reshape(-1) - expected)
    assert (error <= tight).all(), f"worst error {error.max():.3g} against {tight[error.argmax()]:.3g}"


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows_blocks", [(1, 1), (7, 1), (37, 3)], ids=lambda s: f"{s[0]}x{s[1]}blocks")
def test_quant_linear_matches_the_dequantized_reference(qtype, rows_blocks, isa):
    """Rows 1, 7 and 37 (not multiples of the 4-row step) and the smallest K: one block per row. Within the
    activation's rounding bound of the exact product, and within float32 rounding (1e-5 of sum |w x|) of
    the product with the activation rounded as the kernel does: a wrong scale or bit fails the second."""
    blocks, w, bias, xs = linear_case(qtype, *rows_blocks)
    for x in xs:
        y = kernels.quant_ops().quant_linear(x, torch.from_numpy(blocks), int(qtype), bias, isa)
        assert y.shape == (*x.shape[:-1], len(blocks)) and y.dtype == x.dtype
        x64 = x.double().numpy().reshape(-1)
        expected = w @ x64 + bias.double().numpy()
        bound = activation_error_bound(w, x64)
        if x.dtype == torch.bfloat16:  # and the output's rounding to bfloat16
            bound = bound + np.abs(expected) * 2**-8
        got = y.double().numpy().reshape(-1)
        error = np.abs(got - expected)
        assert (error <= bound).all(), f"worst error {error.max():.3g} against bound {bound[error.argmax()]:.3g}"
        assert_within_float32_rounding(y, w, quantized_activation(x64), bias)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows_blocks", [(1, 1), (7, 1), (37, 3)], ids=lambda s: f"{s[0]}x{s[1]}blocks")
def test_quant_linear_with_float_activation_matches_the_exact_product(qtype, rows_blocks, isa):
    """The output layer's path: x is not rounded to int8, so the result is the exact product of the dequantized
    weights and x within float32 rounding (1e-5 of sum |w x|; bfloat16 output: its own rounding)."""
    blocks, w, bias, xs = linear_case(qtype, *rows_blocks)
    for x in xs:
        y = kernels.quant_ops().quant_linear(x, torch.from_numpy(blocks), int(qtype), bias, isa, True)
        assert y.shape == (*x.shape[:-1], len(blocks)) and y.dtype == x.dtype
        assert_within_float32_rounding(y, w, x.double().numpy().reshape(-1), bias)
        if x.dtype == torch.float32:  # and not the int8 path, off by the activation's rounding (float32 shows it)
            int8 = kernels.quant_ops().quant_linear(x, torch.from_numpy(blocks), int(qtype), bias, isa)
            assert not torch.equal(int8, y)


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_both_instruction_sets_agree_to_float32_rounding(qtype):
    """Their integer dot products are exact; only the order of the float32 sums differs (AVX-512 takes the
    32-value types two blocks at a time)."""
    if not kernels.AVX512_VNNI_FLAGS <= cpu_flags():
        pytest.skip("no AVX-512 VNNI")
    blocks = torch.from_numpy(random_blocks(qtype, 9, 512, seed=1))
    x = torch.randn(512, generator=torch.Generator().manual_seed(0))
    ops = kernels.quant_ops()
    avx2, avx512 = (ops.quant_linear(x, blocks, int(qtype), None, isa) for isa in (0, 1))
    torch.testing.assert_close(avx2, avx512, rtol=1e-5, atol=1e-5 * avx2.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_kernel_equals_gguf(qtype, isa):
    blocks = random_blocks(qtype, 5, 512, seed=2)
    expected = torch.from_numpy(quants.dequantize(blocks, qtype))
    ops = kernels.quant_ops()
    assert torch.equal(ops.quant_dequantize(torch.from_numpy(blocks), int(qtype), torch.float32, isa), expected)
    assert torch.equal(ops.quant_dequantize(torch.from_numpy(blocks), int(qtype), torch.bfloat16, isa),
                       expected.bfloat16())


@needs_kernels
def test_kernels_reject_what_they_cannot_compute():
    ops = kernels.quant_ops()
    blocks = torch.from_numpy(random_blocks(T.Q8_0, 4, 64, seed=3))
    with pytest.raises(RuntimeError, match="one row of 64"):
        ops.quant_linear(torch.randn(2, 64), blocks, int(T.Q8_0), None, 0)
    with pytest.raises(RuntimeError, match="whole number of 18-byte blocks"):
        ops.quant_linear(torch.randn(64), blocks, int(T.Q4_0), None, 0)
    with pytest.raises(RuntimeError, match="not supported"):
        ops.quant_dequantize(blocks, int(T.Q2_K), torch.float32, 0)
    with pytest.raises(RuntimeError, match="isa must be"):
        ops.quant_linear(torch.randn(64), blocks, int(T.Q8_0), None, 7)


@needs_kernels
@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q6_K], ids=lambda t: t.name)
def test_quantized_linear_decode_uses_the_kernel_and_prefill_the_dequantized_gemm(qtype, monkeypatch, float32_prefill):
    """One row: within the activation bound. Many rows: dequantized float32 weights and PyTorch's GEMM,
    so float32 accuracy; a small CHUNK_VALUES makes several chunks and a short last one."""
    monkeypatch.setattr(quant, "CHUNK_VALUES", 3 * 512)
    blocks = random_blocks(qtype, 11, 512, seed=4)
    w = reference(blocks, qtype)
    bias = torch.randn(11)
    layer = QuantizedLinear(512, 11, qtype, blocks, bias)
    x = torch.randn(2, 5, 512)
    y = layer(x)
    expected = x.double().numpy() @ w.T + bias.double().numpy()
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    with torch.inference_mode():  # the chunks in a reused buffer instead of fresh tensors
        assert torch.equal(layer(x), y)
        assert torch.equal(layer(x[:1]), y[:1])
    one = x[:1, :1]
    y1 = layer(one).double().numpy().reshape(-1)
    assert (np.abs(y1 - expected[0, 0]) <= activation_error_bound(w, one.double().numpy().reshape(-1))).all()
    kernel = kernels.quant_ops().quant_linear
    assert torch.equal(layer(one), kernel(one, layer.blocks, int(qtype), layer.bias, layer.isa))


@needs_kernels
def test_prefill_multiplies_bfloat16_tiles_where_the_cpu_does_natively(monkeypatch):
    """float32 inference on a CPU with AVX512-BF16 or AMX: bfloat16 tiles and activations (float32
    accumulation, a bfloat16 result); float32 tiles elsewhere and under autograd (fine-tuning)."""
    monkeypatch.setattr(quant, "CHUNK_VALUES", 3 * 512)
    blocks = torch.from_numpy(random_blocks(T.Q4_K, 11, 512, seed=6))
    bias = torch.randn(11)
    layer = QuantizedLinear(512, 11, T.Q4_K, blocks, bias)
    x = torch.randn(2, 5, 512)
    w = quant.dequantize(layer.blocks, T.Q4_K, torch.float32)
    for fast in (True, False):
        monkeypatch.setattr(quant, "cpu_has_fast_bfloat16", lambda: fast)
        with torch.inference_mode():
            y, dtype = layer(x), quant.prefill_dtype(torch.float32)
        assert dtype == (torch.bfloat16 if fast else torch.float32)
        tiles = torch.nn.functional.linear(x.to(dtype), w.to(dtype)).float() + bias  # the definition
        torch.testing.assert_close(y, tiles, rtol=1e-6, atol=1e-6 * tiles.abs().max().item())
        assert quant.prefill_dtype(torch.float32) == torch.float32  # autograd on: the float32 tiles
    # bfloat16 rounding of weights, inputs and outputs: ~2^-8 of the sums' scale
    exact = x.double() @ w.double().T + bias.double()
    with torch.inference_mode():
        monkeypatch.setattr(quant, "cpu_has_fast_bfloat16", lambda: True)
        error = (layer(x).double() - exact).abs().max() / exact.abs().max()
    assert 1e-5 < error < 2e-2


@needs_kernels
def test_kernel_isa_env_forces_avx2(monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, "avx2")
    assert QuantizedLinear(32, 4, T.Q8_0, random_blocks(T.Q8_0, 4, 32, seed=5)).isa == kernels.ISA_CODES["avx2"]
    monkeypatch.setenv(kernels.ISA_ENV, "sse2")
    with pytest.raises(EngineError, match="CHATTUI_KERNEL_ISA='sse2'"):
        kernels.quant_isa()


def test_without_kernels_layers_dequantize_with_gguf(monkeypatch):
    """The fallback: no compiled library, gguf.quants' numpy dequantization and PyTorch's matmul."""
    monkeypatch.setattr(quant, "quant_ops", lambda: None)
    blocks = random_blocks(T.Q5_K, 6, 256, seed=6)
    w = reference(blocks, T.Q5_K)
    layer = QuantizedLinear(256, 6, T.Q5_K, blocks)
    assert layer.isa is None
    for x in [torch.randn(256), torch.randn(3, 256)]:
        expected = x.double().numpy() @ w.T
        np.testing.assert_allclose(layer(x).double().numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    embedding = QuantizedEmbedding(6, 256, T.Q5_K, blocks)
    assert torch.equal(embedding(torch.tensor([5, 0])), torch.from_numpy(w[[5, 0]]).float())


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K, T.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_embedding_returns_the_dequantized_rows(qtype, dtype):
    blocks = random_blocks(qtype, 20, 256, seed=7)
    table = torch.from_numpy(quants.dequantize(blocks, qtype)).to(dtype)
    embedding = QuantizedEmbedding(20, 256, qtype, blocks, dtype)
    ids = torch.tensor([[3, 19, 3], [0, 7, 11]])
    out = embedding(ids)
    assert out.shape == (2, 3, 256) and out.dtype == dtype
    assert torch.equal(out, table[ids])


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 64)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64, bias=False))])
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 40, bias=False)


def test_replace_with_quantized_swaps_the_named_layers_and_shares_tied_blocks():
    model = TinyLM()
    embed = random_blocks(T.Q8_0, 40, 64, seed=8)
    weights = {
        "embed.weight": (T.Q8_0, embed),
        "head.weight": (T.Q8_0, embed),  # tied
        "blocks.0.0.weight": (T.Q4_0, random_blocks(T.Q4_0, 96, 64, seed=9)),
    }
    bias = model.blocks[0][0].bias.detach().clone()
    replace_with_quantized(model, weights)
    assert isinstance(model.embed, QuantizedEmbedding) and isinstance(model.head, QuantizedLinear)
    assert isinstance(model.blocks[0][0], QuantizedLinear) and type(model.blocks[0][1]) is nn.Linear
    assert torch.equal(model.blocks[0][0].bias, bias)
    assert model.embed.blocks.data_ptr() == model.head.blocks.data_ptr() == embed.ctypes.data  # no copies
    x = torch.randn(3, 64)
    expected = x.double().numpy() @ reference(weights["blocks.0.0.weight"][1], T.Q4_0).T + bias.double().numpy()
    np.testing.assert_allclose(model.blocks[0][0](x).double().numpy(), expected, rtol=1e-5, atol=1e-4)


def test_fused_quantized_linears_compute_the_parts_and_share_their_blocks():
    parts = [QuantizedLinear(64, n, T.Q8_0, random_blocks(T.Q8_0, n, 64, seed=n), torch.randn(n)) for n in (8, 4, 4)]
    x = torch.randn(1, 1, 64)
    separate = torch.cat([p(x) for p in parts], dim=-1)
    fused = fuse_quantized_linears(parts)
    assert torch.equal(fused(x), separate)
    assert torch.equal(torch.cat([p(x) for p in parts], dim=-1), separate)  # the parts still work, on views
    assert parts[1].blocks.data_ptr() == fused.blocks.data_ptr() + 8 * fused.blocks.shape[1]
    other_type = QuantizedLinear(64, 4, T.Q4_0, random_blocks(T.Q4_0, 4, 64, seed=1), torch.randn(4))
    assert fuse_quantized_linears([parts[0], other_type]) is None


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: tied embeddings, q/k/v biases
def test_quantized_transformers_model_matches_its_dequantized_twin(checkpoint_factory, family, float32_prefill):
    """The swap on a real module tree (transformers' own model): prefill through the dequantized GEMM
    equals the dense twin to float32 accuracy, a one-token step through the kernels is within 2%."""
    from tests.checkpoints import hf_model

    folder = checkpoint_factory(family)
    quantized, dense = hf_model(folder), hf_model(folder)
    weights, dequantized = {}, {}
    for name, module in quantized.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            qtype = T.Q8_0 if isinstance(module, nn.Embedding) or name == "lm_head" else T.Q4_1
            blocks = quants.quantize(module.weight.detach().numpy(), qtype)
            weights[f"{name}.weight"] = (qtype, blocks)
            dequantized[f"{name}.weight"] = torch.from_numpy(quants.dequantize(blocks, qtype))
    if quantized.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        dequantized["lm_head.weight"] = dequantized["model.embed_tokens.weight"]
    dense.load_state_dict(dequantized, strict=False)
    replace_with_quantized(quantized, weights)
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in quantized.modules())
    with torch.inference_mode():
        ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
        torch.testing.assert_close(quantized(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
        one_step, reference = quantized(ids[:, :1]).logits, dense(ids[:, :1]).logits
        assert (one_step - reference).abs().max() <= 0.02 * reference.abs().max()


def test_blocks_of_the_wrong_size_or_type_are_one_clear_error():
    expected = r"blk.0.ffn_up.weight: expected 1152 bytes of Q4_0 blocks for shape 16x128, got 1000"
    with pytest.raises(EngineError, match=expected):
        quant.as_block_rows(np.zeros(1000, np.uint8), T.Q4_0, (16, 128), "blk.0.ffn_up.weight")
    with pytest.raises(EngineError, match="not a multiple of Q4_K's block of 256"):
        quant.as_block_rows(np.zeros(1000, np.uint8), T.Q4_K, (4, 128))
    with pytest.raises(EngineError, match="GGUF type Q2_K has no quantized kernel"):
        quant.as_block_rows(np.zeros(1000, np.uint8), T.Q2_K, (4, 256))


def test_no_compiler_means_no_quant_ops_and_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    kernels.quant_ops.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="engine.kernels"):
            assert kernels.quant_ops() is None
        assert "quantized-weight kernels unavailable" in caplog.text
        assert list(tmp_path.iterdir()) == []
    finally:
        kernels.quant_ops.cache_clear()
