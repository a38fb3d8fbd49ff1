"""Arrange a loaded model's weights for fast inference; names, shapes and values stay HF's.

- q/k/v and gate/up projections are fused into one matmul each (their weights become views of
  the fused weight, so nothing is stored twice): fewer, larger matmuls per decode step.
- On CPU in float32, matmuls run through oneDNN, which spreads a single-row (decode) matmul over
  every core where MKL's sgemv uses one, and each weight is stored in the memory order that kernel
  reads fastest. `chattui bench` measures the effect.
- On CPU in bfloat16 with AVX512-BF16, single-row (decode) matmuls run through engine.kernels'
  linear_bf16, which streams the weights about twice as fast as PyTorch's kernel, with the same
  rounding steps (float32 sums in another order: rare last-bit differences), and so does each
  single-position RMSNorm (rms_norm_bf16, one op instead of eight); prefill keeps PyTorch's kernels.
- A Llama-family or Gemma 3 model on GGUF blocks or dense float32 or bfloat16 weights gets `fused_decode`
  (engine.fused_decode): its whole decode step in one kernel call, reading each layer's weights where
  they are ((out, in)-contiguous rows: no oneDNN layout then); other models get None and decode
  through their modules.
- On CPU, GGUF blocks of every type the kernels take (engine.quant's QuantizedLinear, a tied
  QuantizedEmbedding with them; not an output layer in Q5_0, Q5_1, Q4_K or Q5_K) are first rearranged in
  place into the kernels' interleaved 16-row groups (interleave_blocks).
- GGUF weights kept in their blocks (engine.quant's QuantizedLinear) of other models fuse like dense
  ones where the parts share one GGUF type (a Q4_K_M file's Q6_K v_proj stays separate); under
  `fused_decode` they stay apart: fusing copies the blocks out of the file's memory map, and the
  copy and the mapped pages it read would both count in the process's memory.
- Layers that carry a LoRA adapter (engine.lora) are left as they are: no fusing, no oneDNN class.

What fuses comes from the family's registry entry (models.registry.Family.fusions); kernels are swapped
in with engine.layers.swap_layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from engine.fused_decode import FusedDecode, supports as fused_decode_supports
from engine.kernels import bf16_decode_ops
from engine.layers import recast, swap_layers
from engine.lora import is_lora_layer
from engine.quant import QuantizedLinear, fuse_quantized_linears, interleave_blocks
from models.gpt2 import Conv1D
from models.llama import RMSNorm
from models.registry import Fusion, family_of


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight (out, in)ᵀ + bias via oneDNN; weight may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


class OneDNNLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _onednn_linear(x, self.weight, self.bias)


class OneDNNConv1D(Conv1D):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _onednn_linear(x, self.weight.t(), self.bias)


class DecodeBF16Linear(nn.Linear):
    """bfloat16 Linear whose single-row calls use engine.kernels' linear_bf16, with nn.Linear's results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features:
            return super().forward(x)
        if self.bias is not None and x.dim() > 2:
            # F.linear rounds x Wᵀ to bfloat16 before adding the bias for inputs of 3+ dims: so do we.
            return bf16_decode_ops().linear_bf16(x, self.weight, None).add_(self.bias)
        return bf16_decode_ops().linear_bf16(x, self.weight, self.bias)


class DecodeBF16Conv1D(Conv1D):
    """GPT-2's Conv1D, its weight stored (out, in)-contiguous, single-row calls as in DecodeBF16Linear
    (addmm adds the bias before rounding, as the kernel does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.weight.shape[0]:
            return super().forward(x)
        return bf16_decode_ops().linear_bf16(x, self.weight.t(), self.bias)


class DecodeBF16RMSNorm(RMSNorm):
    """RMSNorm whose single-position calls use engine.kernels' rms_norm_bf16 (one op instead of eight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[-2] != 1:
            return super().forward(x)
        return bf16_decode_ops().rms_norm_bf16(x, self.weight, self.eps)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def fuse_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear computing cat([p(x) for p in parts], -1); each part's weight becomes a view of it."""
    weight = torch.cat([p.weight.data for p in parts])  # (sum of outs, in)
    has_bias = parts[0].bias is not None
    bias = torch.cat([p.bias.data for p in parts]) if has_bias else None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    offset = 0
    for p in parts:
        n = p.out_features
        p.weight.data = weight[offset : offset + n]
        if has_bias:
            p.bias.data = bias[offset : offset + n]
        offset += n
    return fused


def _store_for_onednn(weight_out_in: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix stored (out, in)-contiguous when out > in, else (in, out)-contiguous
    (measured: oneDNN's single-row float32 kernel is fastest so)."""
    out_features, in_features = weight_out_in.shape
    if out_features > in_features:
        return weight_out_in.contiguous()
    return weight_out_in.t().contiguous().t()


def _fused(parts: list[nn.Module], blocks: bool) -> nn.Module | None:
    """The parts as one layer: plain Linear layers, or (where `blocks`) QuantizedLinear layers of one GGUF
    type; None for anything else (LoRA-wrapped layers, mixed types)."""
    if all(type(p) is nn.Linear for p in parts):
        return fuse_linears(parts)
    if blocks and all(type(p) is QuantizedLinear for p in parts):
        return fuse_quantized_linears(parts)
    return None


def _fuse(model: nn.Module, fusions: tuple[Fusion, ...], blocks: bool) -> list[tuple[nn.Module, Fusion]]:
    """Apply the family's fusion plan wherever _fused can (to GGUF blocks too where `blocks`); returns the
    (module, fusion) pairs done."""
    done = []
    for module in model.modules():
        for fusion in fusions:
            if not hasattr(type(module), fusion.into):
                continue
            fused = _fused([getattr(module, name) for name in fusion.parts], blocks)
            if fused is None:
                continue
            # object.__setattr__ keeps the fused layer out of _modules, so state_dict() stays HF's keys.
            object.__setattr__(module, fusion.into, fused)
            done.append((module, fusion))
    return done


def prepare_for_inference(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Freeze the model and arrange its weights for decoding (see module docstring).

    The last step of loading (build, load weights, apply an adapter if any, prepare): moving the model
    afterwards would break the shared storage, and nothing undoes it (fine-tuning loads unprepared)."""
    model.eval().requires_grad_(False)
    model.fused_decode = None
    fused_decode = device.type == "cpu" and fused_decode_supports(model)
    interleave_blocks(model)  # before fusing: fused parts then share one layout
    fused = _fuse(model, family_of(model.config).fusions, blocks=not fused_decode)
    if device.type != "cpu":
        return model
    fused_parts = {id(getattr(module, name)) for module, fusion in fused for name in fusion.parts}
    onednn = dtype == torch.float32 and onednn_available()
    bf16_kernels = dtype == torch.bfloat16 and bf16_decode_ops() is not None

    def on_cpu_kernel(layer: nn.Module) -> nn.Module:
        """The plain layer on the fastest CPU kernel for dtype, its weight laid out as that kernel reads it."""
        if type(layer) is nn.Linear:
            if onednn:
                if not fused_decode:  # which reads (out, in)-contiguous rows
                    layer.weight.data = _store_for_onednn(layer.weight.data)
                return recast(layer, OneDNNLinear)
            if bf16_kernels and layer.weight.is_contiguous():
                return recast(layer, DecodeBF16Linear)
        elif type(layer) is Conv1D:
            if onednn:
                layer.weight.data = _store_for_onednn(layer.weight.data.t()).t()
                return recast(layer, OneDNNConv1D)
            # bfloat16 kernels (PyTorch's and ours) read (out, in)-contiguous weights fastest; GPT-2 stores (in, out).
            layer.weight.data = layer.weight.data.t().contiguous().t()
            if bf16_kernels:
                return recast(layer, DecodeBF16Conv1D)
        elif type(layer) is RMSNorm and bf16_kernels:
            return recast(layer, DecodeBF16RMSNorm)
        return layer

    def replace(name: str, layer: nn.Module) -> nn.Module | None:
        if is_lora_layer(layer) or id(layer) in fused_parts:
            return layer  # as it is: LoRA layers run unfused on PyTorch's kernels; fused parts do not run
        return on_cpu_kernel(layer) if type(layer) in (nn.Linear, Conv1D, RMSNorm) else None

    swap_layers(model, replace)
    for module, fusion in fused:
        object.__setattr__(module, fusion.into, on_cpu_kernel(getattr(module, fusion.into)))
    if fused_decode:
        model.fused_decode = FusedDecode(model)
    return model
