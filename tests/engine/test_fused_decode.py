"""engine.fused_decode: a Llama-family model's whole decode step in one kernel call (quant_decode_step),
against the module path it replaces, on tiny GGUF models of every kind it covers and on dense float32 and
bfloat16 weights; and where it must not apply (other families, LoRA, watched attention)."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, SamplingParams
from engine.attention import AttentionWatcher
from engine.checkpoint import load_model, load_weights, read_model_config
from engine.device import cpu_has_avx512_bf16
from engine.fused_decode import FUSED_DECODE_ENV
from engine.generate import decode_one_token, prefill
from engine.kernels import ISA_ENV, quant_ops
from engine.kv_cache import KVCache
from engine.quant import QuantizedLinear, quant_kernels_available
from gguf_files import Q, write_gguf

pytestmark = pytest.mark.skipif(not quant_kernels_available(), reason="the quantized kernels need AVX2 and a C++ compiler")

CPU = torch.device("cpu")
K_SHAPE = dict(hidden_size=256, intermediate_size=256, head_dim=64)
MIX = {"attn_v": Q.Q6_K, "ffn_down": Q.Q6_K}  # as a Q4_K_M file mixes them: v_proj apart from q and k
GEMMA3 = dict(hidden_size=64, attn_logit_softcapping=None)  # 64: whole 32-value blocks
# (family, weight type, overrides, per-name types): offsets (Q4_0, Q6_K), biases (Qwen2), per-head norms
# (Qwen3), a sliding window shorter than the steps (Mistral's 24), tied embeddings, mixed types; Gemma 3's
# (1 + w) norms around each sublayer, GeGLU, local layers (a window of 8) with their own RoPE base between
# global ones, scaled embeddings and soft-capped logits.
CASES = [
    ("llama", Q.Q4_1, {}, None), ("llama", Q.Q4_0, {}, None), ("llama", Q.Q8_0, {}, None),
    ("llama", Q.Q4_K, K_SHAPE, MIX), ("llama", Q.Q6_K, K_SHAPE, None), ("llama", Q.Q5_K, K_SHAPE, None), ("qwen2", Q.Q5_1, {}, None), ("qwen3", Q.Q8_0, {}, None),
    ("mistral", Q.Q5_0, {}, None), ("llama_tied_llama3_rope", Q.Q4_1, {}, None),
    ("gemma3", Q.Q8_0, GEMMA3, None), ("gemma3", Q.Q5_0, GEMMA3, None), ("gemma3", Q.Q4_K, {**GEMMA3, **K_SHAPE}, MIX),
]
CASE_IDS = [f"{family}-{q.name}{'-mix' if mix else ''}" for family, q, _, mix in CASES]


def _model(checkpoint_factory, tmp_path, family, weight_type, overrides, mix):
    path, _ = write_gguf(checkpoint_factory(family, **overrides), tmp_path / "m.gguf", family, weight_type,
                         types_by_name=mix)
    return load_model(path, read_model_config(path), CPU, torch.float32, keep_blocks=True)


def _steps(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, KVCache, KVCache]]:
    """For each position t >= 1 of ids: (module logits, fused logits, module cache, fused cache) of one decode
    step of ids[t] after a prefill of ids[:t] (each step from a fresh prefill, the same for both paths)."""
    steps = []
    with torch.inference_mode():
        for t in range(1, len(ids)):
            modules = KVCache.for_model(model.config, t + 1, torch.float32, CPU)
            prefill(model, ids[:t], 0, modules)
            fused = KVCache.for_model(model.config, t + 1, torch.float32, CPU)
            fused.k.copy_(modules.k), fused.v.copy_(modules.v)
            expected = model(ids[t : t + 1][None], start=t, cache=modules, last_only=True)[0, -1]
            steps.append((expected, model.fused_decode(ids[t : t + 1], t, fused), modules, fused))
    return steps


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(("family", "weight_type", "overrides", "mix"), CASES, ids=CASE_IDS)
def test_one_step_equals_the_module_path(checkpoint_factory, tmp_path, family, weight_type, overrides, mix):
    """The same kernels and float32 steps: only summation order differs (RMSNorm's mean, attention, the
    softmax's exp); where that moves an activation across an int8 rounding boundary, one value rounds one
    step the other way, which the tiny random model amplifies (so: most steps within 1e-5, all within 10%)."""
    model = _model(checkpoint_factory, tmp_path, family, weight_type, overrides, mix)
    assert model.fused_decode is not None
    ids = torch.randint(3, 400, (41,), generator=torch.Generator().manual_seed(2))
    logits, keys, values = [], [], []
    for expected, fused, modules, ours in _steps(model, ids):
        t = modules.k.shape[3] - 1
        logits.append(_relative(fused, expected))
        keys.append(_relative(ours.k[:, :, :, t], modules.k[:, :, :, t]))  # every layer's new key and value
        values.append(_relative(ours.v[:, :, :, t], modules.v[:, :, :, t]))
        assert torch.equal(ours.k[:, :, :, :t], modules.k[:, :, :, :t])  # the prefilled positions untouched
    for errors in (logits, keys, values):
        errors = torch.tensor(errors)
        assert (errors <= 1e-5).float().mean() >= 0.9, errors
        assert errors.max() <= 0.1, errors


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_long_contexts_split_positions_between_threads_and_merge_the_softmax(checkpoint_factory, threads):
    """From 128 cached positions on, each thread attends over its share of the positions for every head and
    the parts merge into one softmax: the same as the module path's attention over all of them. On dense
    float32 weights, where no int8 rounding can amplify a last-bit difference into a visible one."""
    folder = checkpoint_factory("qwen2")
    model = load_model(folder, read_model_config(folder), CPU, torch.float32)
    ids = torch.randint(3, 400, (200,), generator=torch.Generator().manual_seed(4))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            modules = KVCache.for_model(model.config, 200, torch.float32, CPU)
            prefill(model, ids[:150], 0, modules)
            fused = KVCache.for_model(model.config, 200, torch.float32, CPU)
            fused.k.copy_(modules.k), fused.v.copy_(modules.v)
            errors = []
            for t in range(150, 199):  # each path decodes the same tokens on its own cache
                expected = model(ids[t : t + 1][None], start=t, cache=modules, last_only=True)[0, -1]
                errors.append(_relative(model.fused_decode(ids[t : t + 1], t, fused), expected))
    finally:
        torch.set_num_threads(previous)
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "llama_tied_llama3_rope", "gemma3"])
def test_dense_float32_weights_step_as_the_module_path(checkpoint_factory, family):
    folder = checkpoint_factory(family)
    model = load_model(folder, read_model_config(folder), CPU, torch.float32)
    assert model.fused_decode is not None and model.fused_decode._qtypes[0] == 0  # F32 rows
    ids = torch.randint(3, 400, (31,), generator=torch.Generator().manual_seed(5))
    errors = [(_relative(fused, expected), _relative(ours.k, modules.k))
              for expected, fused, modules, ours in _steps(model, ids)]
    assert max(max(e) for e in errors) <= 1e-5, errors  # no int8 rounding here: only summation order differs


@pytest.mark.parametrize(("family", "isa"), [("llama", None), ("qwen2", None), ("qwen3", None), ("mistral", None),
                                           ("llama_tied_llama3_rope", None), ("gemma3", None), ("qwen2", "avx2"),
                                           ("gemma3", "avx2")])
def test_bfloat16_weights_step_in_float32(checkpoint_factory, family, isa, monkeypatch):
    """A bfloat16 model's step reads its bfloat16 rows and cache and computes in float32, the matmuls' inputs
    rounded to bfloat16 where the CPU multiplies bfloat16 natively (as llama.cpp does on BF16 weights): on the
    same cache it is the float32 module path on the same weights up to summation order, those inputs' rounding
    and the new key and value's rounding into the bfloat16 cache, and so nearer that float32 result than the
    bfloat16 module path (which rounds every activation to bfloat16) is. Forcing AVX2 keeps the inputs float32."""
    if isa:
        monkeypatch.setenv(ISA_ENV, isa)
    folder = checkpoint_factory(family)
    config = read_model_config(folder)
    model = load_model(folder, config, CPU, torch.bfloat16)
    assert model.fused_decode is not None and set(model.fused_decode._qtypes) == {30}  # BF16 rows
    assert isa != "avx2" or model.fused_decode._isa == 0
    reference = load_model(folder, config, CPU, torch.float32)
    with torch.no_grad():  # the float32 model on exactly the bfloat16 weights
        for p in reference.parameters():
            p.copy_(p.bfloat16())
    ids = torch.randint(3, 400, (25,), generator=torch.Generator().manual_seed(6))
    fused_errors, module_errors = [], []
    rounds_inputs = isa is None and cpu_has_avx512_bf16()  # the AVX-512 step's vdpbf16ps path
    with torch.inference_mode():
        for t in range(1, len(ids)):
            exact = KVCache.for_model(config, t + 1, torch.float32, CPU)
            prefill(reference, ids[:t], 0, exact)
            exact.k.copy_(exact.k.bfloat16()), exact.v.copy_(exact.v.bfloat16())  # what a bfloat16 cache holds
            ours, modules = (KVCache.for_model(config, t + 1, torch.bfloat16, CPU) for _ in range(2))
            for cache in (ours, modules):
                cache.k.copy_(exact.k), cache.v.copy_(exact.v)
            expected = reference(ids[t : t + 1][None], start=t, cache=exact, last_only=True)[0, -1]
            fused_errors.append(_relative(model.fused_decode(ids[t : t + 1], t, ours), expected))
            module_logits = model(ids[t : t + 1][None], start=t, cache=modules, last_only=True)[0, -1]
            module_errors.append(_relative(module_logits.float(), expected))
            # the first layer's new key: the float32 one rounded once to bfloat16 (half a unit in the last place,
            # 2**-8 of each value), up to the rounding of the projection's input (to bfloat16 on CPUs with
            # AVX512-BF16, as llama.cpp rounds it: 2**-9 of each input value, a few 2**-9 of the row's largest
            # values in all) and float32 summation order; later layers attend to the rounded key and value, and
            # differ by more
            new_key, exact_key = ours.k[0, :, :, t].float(), exact.k[0, :, :, t]
            input_rounding = 2**-7 if rounds_inputs else 2**-12
            assert ((new_key - exact_key).abs() <= exact_key.abs() * 2**-8
                    + exact_key.abs().amax(-1, keepdim=True) * input_rounding).all(), (new_key - exact_key).abs().max()
            assert torch.equal(ours.k[:, :, :, :t], modules.k[:, :, :, :t])  # the cached positions untouched
    fused_errors, module_errors = torch.tensor(fused_errors), torch.tensor(module_errors)
    # rounding the matmuls' inputs to bfloat16 takes the step half way to the module path's error (measured:
    # median 0.0055 against the module path's 0.010; with float32 inputs, 0.0006)
    nearer = 1.5 if rounds_inputs else 4
    assert fused_errors.max() <= (2e-2 if rounds_inputs else 1e-2), fused_errors
    assert fused_errors.median() * nearer <= module_errors.median(), (fused_errors, module_errors)


def test_lora_layers_decode_through_the_modules(checkpoint_factory, tmp_path):
    from engine.lora import apply_lora
    from engine.inference import prepare_for_inference

    folder = checkpoint_factory("llama")
    config = read_model_config(folder)
    model = load_weights(folder, config, CPU, torch.float32)
    apply_lora(model, ["q_proj"], r=4, alpha=8)
    assert prepare_for_inference(model, CPU, torch.float32).fused_decode is None


def test_the_avx2_path_runs_the_same_step(checkpoint_factory, tmp_path, monkeypatch):
    monkeypatch.setenv(ISA_ENV, "avx2")
    model = _model(checkpoint_factory, tmp_path, "qwen2", Q.Q4_0, {}, None)
    assert model.fused_decode._isa == 0
    ids = torch.randint(3, 400, (21,), generator=torch.Generator().manual_seed(3))
    errors = torch.tensor([_relative(fused, expected) for expected, fused, _, _ in _steps(model, ids)])
    assert (errors <= 1e-5).float().mean() >= 0.9 and errors.max() <= 0.1, errors


class _Counting:
    """A model's fused_decode that records the positions it is called at."""

    def __init__(self, fused):
        self.fused, self.positions = fused, []

    def applies(self, cache) -> bool:
        return self.fused.applies(cache)

    def __call__(self, token, position, cache):
        self.positions.append(position)
        return self.fused(token, position, cache)


def test_generation_runs_the_fused_step_and_greedy_tokens_follow_the_modules(checkpoint_factory, tmp_path):
    path, _ = write_gguf(checkpoint_factory("llama"), tmp_path / "m.gguf", "llama", Q.Q8_0)
    engine = Engine.load(path, device="cpu", dtype="auto")
    prompt = engine.raw_prompt("hello there")
    counting = engine.model.fused_decode = _Counting(engine.model.fused_decode)
    fused_text = "".join(engine.generate(prompt, SamplingParams(temperature=0.0), max_new_tokens=12))
    start = len(prompt)
    assert counting.positions == list(range(start, start + len(counting.positions))) and counting.positions
    engine.model.fused_decode = None
    engine.reset_cache()
    assert "".join(engine.generate(prompt, SamplingParams(temperature=0.0), max_new_tokens=12)) == fused_text


def test_other_families_decode_through_their_modules(checkpoint_factory, tmp_path):
    path, _ = write_gguf(checkpoint_factory("gpt2"), tmp_path / "m.gguf", "gpt2", Q.Q8_0)
    assert load_model(path, read_model_config(path), CPU, torch.float32, keep_blocks=True).fused_decode is None


def test_the_off_switch_decodes_through_the_fused_modules(checkpoint_factory, tmp_path, monkeypatch):
    path, _ = write_gguf(checkpoint_factory("llama"), tmp_path / "m.gguf", "llama", Q.Q8_0)
    config = read_model_config(path)
    assert load_model(path, config, CPU, torch.float16).fused_decode is None  # no float16 rows in the kernel
    monkeypatch.setenv(FUSED_DECODE_ENV, "0")
    model = load_model(path, config, CPU, torch.float32, keep_blocks=True)
    assert model.fused_decode is None
    for layer in model.model.layers:  # the module path fuses q/k/v and gate/up, the parts views of the fused blocks
        fused = layer.self_attn.fused_qkv
        assert type(fused) is QuantizedLinear
        assert layer.self_attn.q_proj.blocks.data_ptr() == fused.blocks.data_ptr()
        assert type(layer.mlp.fused_gate_up) is QuantizedLinear


def test_watched_attention_and_other_caches_take_the_module_path(checkpoint_factory, tmp_path):
    model = _model(checkpoint_factory, tmp_path, "llama", Q.Q8_0, {}, None)
    cache = KVCache.for_model(model.config, 8, torch.float32, CPU)
    assert model.fused_decode.applies(cache)
    assert not model.fused_decode.applies(KVCache.for_model(model.config, 8, torch.float16, CPU))
    rows = []
    with torch.inference_mode(), AttentionWatcher(model, rows.append):
        assert not model.fused_decode.applies(cache)
        prefill(model, torch.tensor([5, 6, 7]), 0, cache)
        decode_one_token(model, torch.tensor([8]), 3, cache)
    assert len(rows) == 2 and rows[1].shape[-1] == 4  # the watcher saw the decode step: the modules ran it
    assert model.fused_decode.applies(cache)


def test_bad_arguments_get_a_clear_error(checkpoint_factory, tmp_path):
    model = _model(checkpoint_factory, tmp_path, "llama", Q.Q8_0, {}, None)
    fused, cache = model.fused_decode, KVCache.for_model(model.config, 4, torch.float32, CPU)
    x = torch.zeros(model.config.hidden_size)
    step = quant_ops().quant_decode_step
    layers = model.config.num_hidden_layers
    tables = [torch.zeros(4, 16)] * layers
    args = [x, fused._blocks, fused._qtypes, fused._biases, fused._norms, 1e-5, tables, tables,
            cache.k, cache.v, 0, model.config.num_attention_heads, 0.25, [0] * layers, False, False, fused._isa]
    with pytest.raises(RuntimeError, match="expected .* weights, GGUF types and biases"):
        step(*args[:1], fused._blocks[1:], *args[2:])
    with pytest.raises(RuntimeError, match="position 4 is outside the cache's 4"):
        step(*args[:10], 4, *args[11:])
    with pytest.raises(RuntimeError, match="cos and sin must be contiguous float32"):
        step(*args[:6], [torch.zeros(4, 8)] * layers, *args[7:])
    with pytest.raises(RuntimeError, match=f"expected {layers} cos and sin tables and windows, one per layer"):
        step(*args[:13], [0] * (layers + 1), *args[14:])
    with pytest.raises(RuntimeError, match="a sliding window must be 0 .none. or positive, got -1"):
        step(*args[:13], [-1] * layers, *args[14:])
    with pytest.raises(RuntimeError, match=f"expected {4 * layers + 1} or {6 * layers + 1} norm weights"):
        step(*args[:14], True, *args[15:])  # output norms asked for, but none given
