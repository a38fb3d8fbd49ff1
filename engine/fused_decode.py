"""A whole decode step of a Llama-family model or of Gemma 3 in one kernel call.

engine.kernels' quant_decode_step runs every layer and then the output layer in one parallel region:
at 135M parameters a step streams ~100 MB of weights in a few milliseconds, and the module path's ~45
PyTorch ops per layer (each a dispatch and a wake of the thread pool) cost as much again. It applies on
CPU where every linear layer is a QuantizedLinear on the compiled kernels (GGUF blocks) or a plain
float32 or bfloat16 Linear (no LoRA adapter), the model is Llama's (Llama, Mistral, Qwen2, Qwen3: SwiGLU)
or Gemma 3's (GeGLU, (1 + w) norms around each sublayer, sliding-window layers with their own RoPE base
between global ones, scaled embeddings, soft-capped logits), and only while nobody watches attention
(live attention capture needs the module path's queries and keys); everywhere else decode_one_token runs
the modules.

It computes in float32: GGUF blocks as engine.quant's kernels do, bfloat16 weights and KV cache widened
in registers (the new key and value rounded once into the cache), except that on CPUs with AVX512-BF16 a
bfloat16 matmul rounds its input to bfloat16 and sums bfloat16 products in float32 (vdpbf16ps), as llama.cpp
does on BF16 weights (1.2-1.5x faster there). On float32 models its arithmetic is the
module path's up to summation order in RMSNorm, attention and the softmax's exp; on bfloat16 models it is
nearer the float32 model than the module path (about half its error with bfloat16 matmul inputs, a
twentieth without), which rounds every activation to bfloat16 as transformers
does and so follows transformers' bfloat16 greedy tokens where this step parts from them at near-ties
(tests/engine/test_fused_decode.py). CHATTUI_FUSED_DECODE=0 turns it off: the module path, to compare
with transformers or to measure what the step gains.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from engine.kernels import quant_isa, quant_ops
from engine.quant import QuantizedEmbedding, QuantizedLinear
from models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM
from models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, rope_cos_sin

FUSED_DECODE_ENV = "CHATTUI_FUSED_DECODE"
DENSE_CODES = {torch.float32: 0, torch.bfloat16: 30}  # the kernel's codes for dense rows (GGML's F32 and BF16)


FAMILIES = {LlamaForCausalLM: LlamaDecoderLayer, Gemma3ForCausalLM: Gemma3DecoderLayer}  # model -> its layer class
ACTIVATIONS = {"silu": False, "gelu_pytorch_tanh": True}  # hidden_act -> the kernel's gelu flag


def _linears(model: LlamaForCausalLM | Gemma3ForCausalLM) -> list[nn.Module]:
    """The kernel's slots: per layer q, k, v, o, gate, up, down, then the output layer."""
    slots: list[nn.Module] = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        slots += [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                  mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return [*slots, model.lm_head]


def _norms(model: LlamaForCausalLM | Gemma3ForCausalLM) -> list[torch.Tensor]:
    """Per layer the input and pre-MLP norm weights (then q_norm and k_norm's, then Gemma 3's attention and MLP
    output norms'), then the final one: float32, Gemma 3's (1 + w) given as that sum."""
    gemma = isinstance(model, Gemma3ForCausalLM)
    weights: list[nn.Module] = []
    for layer in model.model.layers:
        weights += [layer.input_layernorm, layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm]
        if model.config.qk_norm:
            weights += [layer.self_attn.q_norm, layer.self_attn.k_norm]
        if gemma:
            weights += [layer.post_attention_layernorm, layer.post_feedforward_layernorm]
    weights.append(model.model.norm)
    return [1.0 + norm.weight.detach().float() if gemma else norm.weight.detach().float() for norm in weights]


def _kernel_slot(layer: nn.Module) -> bool:
    """GGUF blocks on the kernels, or a plain float32 or bfloat16 Linear."""
    if type(layer) is QuantizedLinear:
        return layer.isa is not None
    return type(layer) is nn.Linear and layer.weight.dtype in DENSE_CODES and layer.in_features % 16 == 0


def supports(model: nn.Module) -> bool:
    """Whether the fused step can run `model` (as loaded, before engine.inference swaps in its CPU layer
    classes): see the module docstring. False where CHATTUI_FUSED_DECODE=0."""
    layer_class = FAMILIES.get(type(model))
    if os.environ.get(FUSED_DECODE_ENV, "1") == "0" or layer_class is None or quant_ops() is None:
        return False
    config, layers = model.config, model.model.layers
    if config.hidden_act not in ACTIVATIONS or config.head_dim % 8 or config.intermediate_size % 8:
        return False
    if any(type(layer) is not layer_class or type(layer.self_attn) is not LlamaAttention
           or type(layer.mlp) is not LlamaMLP or layer.self_attn.spec.scale != layers[0].self_attn.spec.scale
           for layer in layers):
        return False
    embedding = model.model.embed_tokens
    if isinstance(embedding, QuantizedEmbedding):
        embeds = embedding.dtype == torch.float32
    else:
        embeds = type(embedding) is nn.Embedding and embedding.weight.dtype in DENSE_CODES
    # the norm weights are parameters: this covers them and any dense weight
    return (embeds and all(_kernel_slot(s) for s in _linears(model))
            and all(p.device.type == "cpu" and p.dtype in DENSE_CODES for p in model.parameters()))


class FusedDecode:
    """decode_one_token's fast path for one prepared model (built by engine.inference where supports())."""

    def __init__(self, model: LlamaForCausalLM | Gemma3ForCausalLM):
        config = model.config
        slots = _linears(model)
        # dense weights must be (out, in)-contiguous rows: engine.inference keeps them so under this path
        self._blocks = [s.blocks if isinstance(s, QuantizedLinear) else s.weight.detach() for s in slots]
        self._qtypes = [s.kernel_code if isinstance(s, QuantizedLinear) else DENSE_CODES[s.weight.dtype] for s in slots]
        no_bias = torch.empty(0)
        # the kernel computes in float32: a bfloat16 model's biases and norm weights widened once (a copy)
        self._biases = [no_bias if s.bias is None else s.bias.detach().float() for s in slots]
        self._norms = _norms(model)
        self._gemma = isinstance(model, Gemma3ForCausalLM)
        self._embed = model.model.embed_tokens
        # Gemma 3 scales its embeddings by sqrt(D), here in float32 (the module path rounds the product to the
        # embedding's dtype, as transformers does: for a bfloat16 model this is nearer the float32 model)
        self._embed_scale = torch.tensor(config.hidden_size**0.5).item() if self._gemma else 1.0
        self._softcap = config.final_logit_softcapping if self._gemma else None
        self._attention = [layer.self_attn for layer in model.model.layers]
        # per layer its RoPE frequencies: Gemma 3's local (sliding) layers have their own base
        if self._gemma:
            self._inv_freqs = [model.inv_freq_local if layer.sliding else model.inv_freq_global
                               for layer in model.model.layers]
        else:
            self._inv_freqs = [model.inv_freq] * len(self._attention)
        spec = self._attention[0].spec
        self._scale = config.head_dim**-0.5 if spec.scale is None else spec.scale
        self._windows = [a.spec.window or 0 for a in self._attention]
        self._gelu = ACTIVATIONS[config.hidden_act]
        self._heads, self._eps = config.num_attention_heads, config.rms_norm_eps
        self._positions = 0  # how many positions the RoPE tables below hold, grown on demand
        self._cos: list[torch.Tensor] = []  # per layer (positions, head_dim), layers of one base sharing a table
        self._sin: list[torch.Tensor] = []
        self._step, self._isa = quant_ops().quant_decode_step, quant_isa()

    def applies(self, cache) -> bool:
        """Whether this step can run on `cache` now: float32 or bfloat16, one sequence, attention not watched."""
        return (cache.k.dtype in DENSE_CODES and cache.k.shape[1] == 1
                and all(a.observer is None for a in self._attention))

    def _grow_rope_tables(self, positions: int) -> None:
        tables = {}
        for inv_freq in self._inv_freqs:
            if id(inv_freq) not in tables:
                cos, sin = rope_cos_sin(inv_freq, 0, positions, torch.float32)
                tables[id(inv_freq)] = cos[0, 0], sin[0, 0]  # (positions, head_dim) each
        self._cos = [tables[id(f)][0] for f in self._inv_freqs]
        self._sin = [tables[id(f)][1] for f in self._inv_freqs]
        self._positions = positions

    def __call__(self, token: torch.Tensor, position: int, cache) -> torch.Tensor:
        """Feed one token (1,) at position, writing its keys and values into cache; next-token logits (V,)."""
        if self._positions <= position:
            self._grow_rope_tables(max(cache.capacity, position + 1))
        x = self._embed(token).reshape(-1).float()  # (D,)
        if self._gemma:
            x = x * self._embed_scale
        logits = self._step(x, self._blocks, self._qtypes, self._biases, self._norms, self._eps, self._cos, self._sin,
                            cache.k, cache.v, position, self._heads, self._scale, self._windows, self._gemma,
                            self._gelu, self._isa)  # (V,)
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits
