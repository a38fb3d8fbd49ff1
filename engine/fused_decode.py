"""A whole decode step of a Llama-family model in one kernel call.

engine.kernels' quant_decode_step runs every layer and then the output layer in one parallel region:
at 135M parameters a step streams ~100 MB of weights in a few milliseconds, and the module path's ~45
PyTorch ops per layer (each a dispatch and a wake of the thread pool) cost as much again. It applies on
CPU where every linear layer is a QuantizedLinear on the compiled kernels (GGUF blocks) or a plain
float32 or bfloat16 Linear (no LoRA adapter), the MLP is SwiGLU (Llama, Mistral, Qwen2, Qwen3), and only
while nobody watches attention (live attention capture needs the module path's queries and keys);
everywhere else decode_one_token runs the modules.

It computes in float32: GGUF blocks as engine.quant's kernels do, bfloat16 weights and KV cache widened
in registers (the new key and value rounded once into the cache). On float32 models its arithmetic is the
module path's up to summation order in RMSNorm, attention and the softmax's exp; on bfloat16 models it is
nearer the float32 model than the module path, which rounds every activation to bfloat16 as transformers
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
from models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, rope_cos_sin

FUSED_DECODE_ENV = "CHATTUI_FUSED_DECODE"
DENSE_CODES = {torch.float32: 0, torch.bfloat16: 30}  # the kernel's codes for dense rows (GGML's F32 and BF16)


def _linears(model: LlamaForCausalLM) -> list[nn.Module]:
    """The kernel's slots: per layer q, k, v, o, gate, up, down, then the output layer."""
    slots: list[nn.Module] = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        slots += [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                  mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return [*slots, model.lm_head]


def _norms(model: LlamaForCausalLM) -> list[torch.Tensor]:
    """Per layer the input and post-attention norm weights (then q_norm and k_norm's), then the final one."""
    weights: list[torch.Tensor] = []
    for layer in model.model.layers:
        weights += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        if model.config.qk_norm:
            weights += [layer.self_attn.q_norm.weight, layer.self_attn.k_norm.weight]
    return [*weights, model.model.norm.weight]


def _kernel_slot(layer: nn.Module) -> bool:
    """GGUF blocks on the kernels, or a plain float32 or bfloat16 Linear."""
    if type(layer) is QuantizedLinear:
        return layer.isa is not None
    return type(layer) is nn.Linear and layer.weight.dtype in DENSE_CODES and layer.in_features % 16 == 0


def supports(model: nn.Module) -> bool:
    """Whether the fused step can run `model` (as loaded, before engine.inference swaps in its CPU layer
    classes): see the module docstring. False where CHATTUI_FUSED_DECODE=0."""
    if os.environ.get(FUSED_DECODE_ENV, "1") == "0" or type(model) is not LlamaForCausalLM or quant_ops() is None:
        return False
    config, layers = model.config, model.model.layers
    if config.hidden_act != "silu" or config.head_dim % 8 or config.intermediate_size % 8:
        return False
    if any(type(layer) is not LlamaDecoderLayer or type(layer.self_attn) is not LlamaAttention
           or type(layer.mlp) is not LlamaMLP or layer.self_attn.spec != layers[0].self_attn.spec
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

    def __init__(self, model: LlamaForCausalLM):
        config = model.config
        slots = _linears(model)
        # dense weights must be (out, in)-contiguous rows: engine.inference keeps them so under this path
        self._blocks = [s.blocks if isinstance(s, QuantizedLinear) else s.weight.detach() for s in slots]
        self._qtypes = [s.kernel_code if isinstance(s, QuantizedLinear) else DENSE_CODES[s.weight.dtype] for s in slots]
        no_bias = torch.empty(0)
        # the kernel computes in float32: a bfloat16 model's biases and norm weights widened once (a copy)
        self._biases = [no_bias if s.bias is None else s.bias.detach().float() for s in slots]
        self._norms = [w.detach().float() for w in _norms(model)]
        self._embed = model.model.embed_tokens
        self._inv_freq = model.inv_freq
        self._attention = [layer.self_attn for layer in model.model.layers]
        spec = self._attention[0].spec
        self._scale = config.head_dim**-0.5 if spec.scale is None else spec.scale
        self._window = spec.window or 0
        self._heads, self._eps = config.num_attention_heads, config.rms_norm_eps
        self._cos = self._sin = torch.empty(0, config.head_dim)  # (positions, head_dim), grown on demand
        self._step, self._isa = quant_ops().quant_decode_step, quant_isa()

    def applies(self, cache) -> bool:
        """Whether this step can run on `cache` now: float32 or bfloat16, one sequence, attention not watched."""
        return (cache.k.dtype in DENSE_CODES and cache.k.shape[1] == 1
                and all(a.observer is None for a in self._attention))

    def __call__(self, token: torch.Tensor, position: int, cache) -> torch.Tensor:
        """Feed one token (1,) at position, writing its keys and values into cache; next-token logits (V,)."""
        if self._cos.shape[0] <= position:
            cos, sin = rope_cos_sin(self._inv_freq, 0, max(cache.capacity, position + 1), torch.float32)
            self._cos, self._sin = cos[0, 0], sin[0, 0]  # (positions, head_dim)
        x = self._embed(token).reshape(-1).float()  # (D,)
        return self._step(x, self._blocks, self._qtypes, self._biases, self._norms, self._eps, self._cos, self._sin,
                          cache.k, cache.v, position, self._heads, self._scale, self._window, self._isa)
