"""engine.kernels: the bfloat16 decode kernel gives PyTorch's results (up to the order of float32 sums: rare
last-bit differences), is used for single-row calls only, and is skipped cleanly where it cannot be built."""

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine.kernels as kernels
from engine import checkpoint
from engine.device import cpu_has_avx512_bf16, cpu_flags
from engine.inference import DecodeBF16Conv1D, DecodeBF16Linear, DecodeBF16RMSNorm
from models.gpt2 import Conv1D
from models.llama import RMSNorm

CPU = torch.device("cpu")
PLAIN = {DecodeBF16Linear: nn.Linear, DecodeBF16Conv1D: Conv1D, DecodeBF16RMSNorm: RMSNorm}


def load_model(folder, device, dtype):
    return checkpoint.load_model(folder, checkpoint.read_model_config(folder), device, dtype)


needs_kernel = pytest.mark.skipif(
    not cpu_has_avx512_bf16() or kernels.bf16_decode_ops() is None,
    reason="the bfloat16 decode kernel needs a CPU with AVX512-BF16 and a C++ compiler",
)


def assert_last_bit_close(y: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal but for the last bit of a few values (float32 sums taken in another order than PyTorch's)."""
    last_bit = expected.float().abs() * 2**-7 + 1e-30  # one bfloat16 ulp or less
    assert ((y.float() - expected.float()).abs() <= last_bit).all()
    assert (y != expected).float().mean() < 0.02


def test_cpu_flags_are_read_from_cpuinfo():
    flags = cpu_flags()
    assert isinstance(flags, frozenset)
    assert cpu_has_avx512_bf16() == ("avx512_bf16" in flags)


@needs_kernel
@pytest.mark.parametrize(
    ("out", "inp"),
    [(960, 576), (577, 576), (3, 40), (5, 1536), (4, 31), (1, 1), (130, 64)],  # tails in both dimensions
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_bf16_matches_pytorch(out, inp, with_bias):
    """Against addmm: the bias is added to the float32 sums, one rounding (F.linear on 3-D input rounds twice;
    DecodeBF16Linear does the same, tested on whole models below). Sums run in another order than
    PyTorch's, so an output may differ in its last bit; it never differs by more."""
    g = torch.Generator().manual_seed(out * 1000 + inp)
    weight = torch.randn(out, inp, generator=g).bfloat16()
    bias = torch.randn(out, generator=g).bfloat16() if with_bias else None
    for shape in [(inp,), (1, inp), (1, 1, inp)]:
        x = torch.randn(shape, generator=g).bfloat16()
        y = kernels.bf16_decode_ops().linear_bf16(x, weight, bias)
        assert y.shape == (*shape[:-1], out)
        if bias is None:
            expected = F.linear(x, weight)
        else:
            expected = torch.addmm(bias, x.reshape(1, inp), weight.t()).reshape(y.shape)
        assert_last_bit_close(y, expected)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 9, 1, 64), (1, 1, 40), (3, 1, 100)])
def test_rms_norm_bf16_matches_the_module(shape):
    g = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], eps=1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = (torch.randn(shape, generator=g) * 3).bfloat16()
    y = kernels.bf16_decode_ops().rms_norm_bf16(x, norm.weight, norm.eps)
    assert y.shape == x.shape
    assert_last_bit_close(y, norm(x).detach())
    with pytest.raises(RuntimeError, match="weight"):
        kernels.bf16_decode_ops().rms_norm_bf16(x, norm.weight[:-1], norm.eps)


@needs_kernel
def test_linear_bf16_rejects_what_it_cannot_compute():
    op = kernels.bf16_decode_ops().linear_bf16
    weight = torch.randn(8, 16).bfloat16()
    with pytest.raises(RuntimeError, match="one row"):
        op(torch.randn(2, 16).bfloat16(), weight, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(1, 8).bfloat16(), weight.t(), None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        op(torch.randn(1, 16), weight, None)


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gpt2", "gemma3"])
def test_bfloat16_model_uses_the_kernel_for_decode_with_the_same_outputs(checkpoint_factory, family):
    folder = checkpoint_factory(family)
    model = load_model(folder, CPU, torch.bfloat16)
    kinds = {type(m) for m in model.modules()} & {DecodeBF16Linear, DecodeBF16Conv1D, DecodeBF16RMSNorm}
    # Gemma's (1 + weight) RMSNorm rounds once, after scaling: the kernel's Llama rounding does not apply.
    expected = {"gpt2": {DecodeBF16Linear, DecodeBF16Conv1D}, "gemma3": {DecodeBF16Linear}}
    assert kinds == expected.get(family, {DecodeBF16Linear, DecodeBF16RMSNorm})
    plain = load_model(folder, CPU, torch.bfloat16)
    for m in plain.modules():  # the same model on PyTorch's kernels only
        m.__class__ = PLAIN.get(type(m), type(m))
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.inference_mode():
        assert torch.equal(model(ids), plain(ids))  # prefill: PyTorch's kernels in both
        ours, reference = model(ids[:, :1]).float(), plain(ids[:, :1]).float()  # one row: our kernel
        torch.testing.assert_close(ours, reference, rtol=0.02, atol=0.02)
        assert ours.argmax() == reference.argmax()


@needs_kernel
def test_build_writes_one_library_and_removes_stale_ones(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path))
    stale = tmp_path / "decode_bf16-0000000000000000.so"
    stale.write_bytes(b"an older build")
    target = kernels._library_path()
    assert target.parent == tmp_path
    kernels._compile(target)  # not loaded: this process already holds the chattui ops
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert target.read_bytes()[:4] == b"\x7fELF"


def test_no_compiler_means_pytorch_kernels_and_a_warning(monkeypatch, tmp_path, caplog, checkpoint_factory):
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "cpu_has_avx512_bf16", lambda: True)
    kernels.bf16_decode_ops.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="engine.kernels"):
            assert kernels.bf16_decode_ops() is None
            model = load_model(checkpoint_factory("llama"), CPU, torch.bfloat16)
        assert "decode kernels unavailable" in caplog.text
        assert not any(isinstance(m, DecodeBF16Linear) for m in model.modules())
        assert list(tmp_path.iterdir()) == []  # nothing half-built left behind
    finally:
        kernels.bf16_decode_ops.cache_clear()


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma3"])
def test_bfloat16_greedy_ids_equal_transformers_in_bfloat16(checkpoint_factory, family, monkeypatch):
    """What a user compares: `--dtype bfloat16 --temperature 0` against transformers loaded in bfloat16, on the
    module path. (Llama-family models decode through engine.fused_decode's float32 step by default, which is
    nearer the float32 model than either: tests/engine/test_fused_decode.py; CHATTUI_FUSED_DECODE=0 is this.)"""
    import transformers

    from engine import Engine, SamplingParams
    from engine.fused_decode import FUSED_DECODE_ENV

    monkeypatch.setenv(FUSED_DECODE_ENV, "0")

    folder = checkpoint_factory(family)
    engine = Engine.load(folder, device="cpu", dtype="bfloat16")
    assert any(isinstance(m, DecodeBF16Linear) for m in engine.model.modules())
    engine.eos_token_ids = set()  # compare all 32 tokens whatever the random model emits
    prompt = engine.chat_prompt([{"role": "user", "content": "Hello there, how are you today? 你好"}], 32).token_ids
    generation = engine.generate(prompt, SamplingParams(temperature=0.0), 32)
    list(generation)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    want = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, pad_token_id=0,
                              eos_token_id=None)[0, len(prompt):].tolist()
    assert generation.result.token_ids == want


@pytest.fixture
def kernels_unbuilt(monkeypatch, tmp_path):
    """A machine that has never built the kernels (an empty kernel folder) and whose compiler is missing, so the
    build step runs and falls back at once."""
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "cpu_has_avx512_bf16", lambda: True)
    kernels.bf16_decode_ops.cache_clear()
    yield
    kernels.bf16_decode_ops.cache_clear()


def test_loading_in_float32_says_when_the_fused_decode_kernels_compile(monkeypatch, tmp_path, checkpoint_factory):
    """A float32 Llama-family model decodes through engine.fused_decode, whose kernel lives in the quantized
    library: its first build is announced too, and without a compiler the model decodes through its modules."""
    from engine import Engine

    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    kernels.quant_ops.cache_clear()
    try:
        calls = []
        engine = Engine.load(checkpoint_factory("llama"), device="cpu", dtype="float32",
                             progress=lambda *a: calls.append(a))
        assert calls[0] == (0, 0, kernels.BUILD_NOTE)
        assert engine.model.fused_decode is None
    finally:  # the real library again, cached, before later tests point the kernel folder elsewhere
        monkeypatch.undo()
        kernels.quant_ops.cache_clear()
        kernels.quant_ops()


def test_loading_in_bfloat16_says_when_the_kernels_compile(kernels_unbuilt, checkpoint_factory):
    from engine import Engine

    calls = []
    Engine.load(checkpoint_factory("llama"), device="cpu", dtype="bfloat16", progress=lambda *a: calls.append(a))
    assert calls[0] == (0, 0, kernels.BUILD_NOTE), "said before the compiler runs, not after the weights"
    assert calls[-1][0] == calls[-1][1] > 0 and all(note is None for *_, note in calls[1:])
    again = []
    Engine.load(checkpoint_factory("llama"), device="cpu", dtype="bfloat16", progress=lambda *a: again.append(a))
    assert all(note is None for *_, note in again), "once: not on the next load"
