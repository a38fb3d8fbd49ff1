"""GGUF weights kept in their blocks (`--dtype auto` on CPU): which layers become quantized, that no dense
copy stays, and agreement with the dequantized float32 path of the same file, on the tiny test models of
every quantized type the kernels compute on."""

from __future__ import annotations

import logging

import gguf
import pytest
import torch
import torch.nn as nn

from engine import Engine, SamplingParams
from engine.checkpoint import load_model, load_weights, read_model_config
from engine.generate import decode_one_token, generate_tokens, prefill
from engine.kv_cache import KVCache
from engine.quant import FLOAT_INTERLEAVED_TYPES, INTERLEAVED_TYPES, QuantizedEmbedding, QuantizedLinear, quant_kernels_available
from gguf_files import Q, write_gguf

CPU = torch.device("cpu")
LEGACY = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
K_SHAPE = dict(hidden_size=256, intermediate_size=256, head_dim=64)  # K-quant blocks cover 256 values
# (family, weight type, checkpoint overrides): every type, tied and untied embeddings, q/k/v biases.
CASES = [("llama", q, {}) for q in LEGACY] + [("llama", q, K_SHAPE) for q in K_QUANTS] + [
    ("qwen2", Q.Q4_1, {}),  # tied embedding, q/k/v biases
    ("llama_tied_llama3_rope", Q.Q8_0, {}),
]
CASE_IDS = [f"{family}-{q.name}" for family, q, _ in CASES]

needs_kernels = pytest.mark.skipif(not quant_kernels_available(), reason="the quantized kernels need AVX2 and a C++ compiler")
pytestmark = pytest.mark.usefixtures("float32_prefill")  # compared with float32 references exactly


def _gguf(checkpoint_factory, tmp_path, family, weight_type, overrides):
    path, _ = write_gguf(checkpoint_factory(family, **overrides), tmp_path / "m.gguf", family, weight_type)
    return path


def _storage_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds, each storage once (views, tied and fused weights share one)."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _int8_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n) as quant_linear rounds its input: per 32 values int8 q (32 values a row, as floats) and the step
    absmax / 127 (tests/engine/test_quant_kernels.py's quantized_activation, in torch)."""
    blocks = x.reshape(-1, 32)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    # 127 / absmax as a true division: torch computes `127 / t` as 127 * (1 / t), off by a rounding at ties
    inverse = torch.where(absmax > 0, torch.full_like(absmax, 127.0) / absmax, torch.zeros_like(absmax))
    return torch.round(blocks * inverse), absmax / 127


def _int8_rounded(x: torch.Tensor) -> torch.Tensor:
    q, step = _int8_parts(x)
    return (q * step).reshape(x.shape)


def _round_activations_as_the_kernels_do(model: nn.Module, output_in_two_parts: bool) -> None:
    """Single-row inputs of every Linear rounded as quant_linear rounds them (_int8_rounded); the output layer's
    kept as they are (QuantizedLinear.float_activation), or where output_in_two_parts (interleaved Q6_K groups)
    as the int8 rounding plus that of the residual (computed as the kernel's fma: rounded once)."""

    def hook(layer, args):
        (x,) = args
        if x.numel() != layer.in_features:
            return None  # prefill: the quantized layer dequantizes and runs the same GEMM
        if layer is not model.lm_head:
            return _int8_rounded(x)
        if not output_in_two_parts:
            return None
        q, step = _int8_parts(x)
        residual = (x.double().reshape(q.shape) - q.double() * step.double()).float().reshape(x.shape)
        return (q * step).reshape(x.shape) + _int8_rounded(residual)

    for module in model.modules():
        if type(module) is nn.Linear:
            module.register_forward_pre_hook(hook)


def _one_step_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(T - 1, V) float32 logits of one decode step at each position t >= 1 of ids (T,), after a prefill of
    ids[:t] (the decode path, each step on its own)."""
    steps = []
    with torch.inference_mode():
        for t in range(1, len(ids)):
            cache = KVCache.for_model(model.config, t + 1, torch.float32, CPU)
            prefill(model, ids[:t], 0, cache)
            steps.append(decode_one_token(model, ids[t : t + 1], t, cache).float())
    return torch.stack(steps)


def _prompts(n: int, length: int = 8) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 400, (length,), generator=g).tolist() for _ in range(n)]


def _greedy(model: nn.Module, dtype: torch.dtype, prompt: list[int], n: int = 16) -> list[int]:
    """n greedy tokens after prompt (no stop at eos: the whole n are compared)."""
    cache = KVCache.for_model(model.config, len(prompt) + n, dtype, CPU)
    steps = generate_tokens(model, prompt, cache=cache, reuse=0, params=SamplingParams(temperature=0.0),
                            max_new_tokens=n, generator=torch.Generator())
    return [step.token for step in steps]


@needs_kernels
@pytest.mark.parametrize(("family", "weight_type", "overrides"), CASES, ids=CASE_IDS)
def test_auto_keeps_the_blocks_and_no_dense_copy(checkpoint_factory, tmp_path, family, weight_type, overrides):
    path = _gguf(checkpoint_factory, tmp_path, family, weight_type, overrides)
    engine = Engine.load(path, device="cpu", dtype="auto")
    model = engine.model
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    assert linears and all(type(m) is QuantizedLinear and m.qtype == weight_type for m in linears)
    assert type(model.model.embed_tokens) is QuantizedEmbedding
    # the kernels' interleaved layout wherever it applies (a tied embedding's blocks too, with its output layer)
    assert all(m.interleaved == (m.qtype in (FLOAT_INTERLEAVED_TYPES if m.float_activation else INTERLEAVED_TYPES)
                                 and m.out_features % 16 == 0) for m in linears)
    assert any(m.interleaved for m in linears) == (weight_type in INTERLEAVED_TYPES)
    if model.config.tie_word_embeddings:
        assert model.model.embed_tokens.interleaved == model.lm_head.interleaved
    if model.config.tie_word_embeddings:  # the output projection reads the embedding's very blocks
        assert model.lm_head.blocks.data_ptr() == model.model.embed_tokens.blocks.data_ptr()
    assert model.fused_decode is not None  # which reads every part's blocks where they are: nothing fused
    assert all(layer.self_attn.fused_qkv is None and layer.mlp.fused_gate_up is None for layer in model.model.layers)
    assert all(p.dim() == 1 for p in model.parameters())  # only norms and biases are dense
    reader = gguf.GGUFReader(path)
    quantized = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type == weight_type)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    assert _storage_bytes(model) <= quantized + dense + 4096  # + RoPE frequencies
    assert engine.num_parameters == sum(int(t.n_elements) for t in reader.tensors if t.name != "rope_freqs.weight")


@needs_kernels
@pytest.mark.parametrize(("family", "weight_type", "overrides"), CASES, ids=CASE_IDS)
def test_decode_equals_the_dequantized_float32_path_with_the_kernels_activation_rounding(
    checkpoint_factory, tmp_path, family, weight_type, overrides
):
    """float32 activations on the blocks, one decode step at a time, against the dequantized float32 model
    whose single-row Linear inputs are rounded to 8 bits as the kernels round them: what is left is float32
    summation order (and, rarely, a value on a rounding boundary that rounds one int8 step the other way
    because its input differs in the last bit; each step starts from a fresh prefill so that cannot carry
    over into later steps through the cache). The decode steps run engine.fused_decode's single kernel call,
    whose RMSNorm and attention sum in another order than PyTorch's: a few more such steps."""
    path = _gguf(checkpoint_factory, tmp_path, family, weight_type, overrides)
    config = read_model_config(path)
    quantized = load_model(path, config, CPU, torch.float32, keep_blocks=True)
    reference = load_weights(path, config, CPU, torch.float32).eval()
    head = quantized.lm_head
    _round_activations_as_the_kernels_do(reference, head.interleaved and head.qtype == gguf.GGMLQuantizationType.Q6_K)
    ids = torch.tensor(_prompts(1, 41)[0])
    ours, expected = _one_step_logits(quantized, ids), _one_step_logits(reference, ids)  # (40, V)
    error = (ours - expected).abs().amax(dim=1) / expected.abs().max()  # per step
    assert (error <= 1e-5).float().mean() >= 0.9, error
    assert error.max() <= 0.1, error  # one int8 step of one value, amplified by the tiny random model
    with torch.inference_mode():  # prefill dequantizes and runs the same GEMMs as the dense model
        prefill, dense = quantized(ids[None]), load_model(path, config, CPU, torch.float32)(ids[None])
    # Equal up to float32 summation order: the BLAS may block a GEMM differently for other shapes (the fused
    # q/k/v), and the random models' activations reach the thousands, so the tolerance scales with the logits.
    torch.testing.assert_close(prefill, dense, rtol=1e-5, atol=1e-5 * dense.abs().max().item())


def _greedy_agreement(quantized: nn.Module, dense: nn.Module, prompts: list[list[int]]) -> tuple[int, float]:
    """(prompts whose 16 greedy tokens are the same, the fraction of the dense model's greedy tokens that
    the quantized model picks too when fed the dense model's sequence so far)."""
    same, agreeing, total = 0, 0, 0
    for prompt in prompts:
        expected = _greedy(dense, torch.float32, prompt)
        same += _greedy(quantized, torch.float32, prompt) == expected
        sequence = torch.tensor(prompt + expected)
        # step t (row t - 1) feeds sequence[t] and picks sequence[t + 1]: the rows that pick `expected`
        picks = _one_step_logits(quantized, sequence)[len(prompt) - 2 : -1].argmax(dim=-1)  # (16,)
        agreeing += (picks == torch.tensor(expected)).sum().item()
        total += len(expected)
    return same, agreeing / total


@needs_kernels
@pytest.mark.parametrize(("family", "weight_type", "overrides"), CASES, ids=CASE_IDS)
def test_greedy_tokens_on_the_blocks_follow_the_dequantized_float32_path(
    checkpoint_factory, tmp_path, family, weight_type, overrides
):
    """float32 activations, so only the kernels' 8-bit activation rounding differs. These tiny random models
    have near-tied logits over a flat vocabulary, where a rounding-sized change flips a token and the
    sequences part from there; so whole 16-token runs must agree on half of 16 prompts, and token by token
    (fed the same sequence) nearly all picks. bfloat16 activations (auto's choice on CPUs with bfloat16
    instructions) are compared on the real SmolLM2 model (tests/engine/test_gguf_smollm2.py)."""
    path = _gguf(checkpoint_factory, tmp_path, family, weight_type, overrides)
    config = read_model_config(path)
    quantized = load_model(path, config, CPU, torch.float32, keep_blocks=True)
    dense = load_model(path, config, CPU, torch.float32)
    same, agreement = _greedy_agreement(quantized, dense, _prompts(16))
    assert same >= 8 and agreement >= 0.9, f"{same} of 16 prompts the same; {agreement:.0%} of tokens"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_explicit_dtype_dequantizes_as_before(checkpoint_factory, tmp_path, dtype):
    path = _gguf(checkpoint_factory, tmp_path, "llama", Q.Q4_0, {})
    engine = Engine.load(path, device="cpu", dtype=dtype)
    assert not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in engine.model.modules())
    assert {p.dtype for p in engine.model.parameters()} == {getattr(torch, dtype)}


@needs_kernels
def test_gpt2_keeps_its_transposed_conv1d_weights_dense_and_its_embeddings_quantized(checkpoint_factory, tmp_path):
    path = _gguf(checkpoint_factory, tmp_path, "gpt2", Q.Q8_0, {})
    engine = Engine.load(path, device="cpu", dtype="auto")
    transformer = engine.model.transformer
    assert type(transformer.wte) is QuantizedEmbedding and type(transformer.wpe) is QuantizedEmbedding
    assert engine.model.lm_head.blocks.data_ptr() == transformer.wte.blocks.data_ptr()
    assert transformer.h[0].attn.c_attn.weight.dim() == 2  # dense, dequantized
    config = read_model_config(path)
    quantized, dense = (load_model(path, config, CPU, torch.float32, keep_blocks=keep) for keep in (True, False))
    same, agreement = _greedy_agreement(quantized, dense, _prompts(16))
    assert same >= 8 and agreement >= 0.9, f"{same} of 16 prompts the same; {agreement:.0%} of tokens"


def test_without_the_kernels_auto_dequantizes_with_a_warning(checkpoint_factory, tmp_path, monkeypatch, caplog):
    import engine.checkpoint

    path = _gguf(checkpoint_factory, tmp_path, "llama", Q.Q4_0, {})
    monkeypatch.setattr(engine.checkpoint, "quant_kernels_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        loaded = Engine.load(path, device="cpu", dtype="auto")
    assert not any(isinstance(m, QuantizedLinear) for m in loaded.model.modules())
    assert "no quantized-weight kernels here; dequantizing" in caplog.text
