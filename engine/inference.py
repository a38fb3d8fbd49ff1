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
- Layers that carry a LoRA adapter (engine.lora) are left as they are: no fusing, no oneDNN class.

`prepare_for_training` undoes all of it, for fine-tuning a model loaded by engine.checkpoint.load_model.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from engine.kernels import bf16_decode_ops
from engine.lora import is_lora_layer
from models.gpt2 import Conv1D
from models.llama import LlamaAttention, LlamaMLP, RMSNorm


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


def prepare_for_inference(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Freeze the model and arrange its weights for decoding (see module docstring).

    The last step after loading: moving the model afterwards would break the shared storage."""
    model.eval().requires_grad_(False)
    with_lora = {id(m) for layer in model.modules() if is_lora_layer(layer) for m in layer.modules()}
    fused_parts: list[nn.Linear] = []
    fused_layers: list[nn.Linear] = []
    for module in model.modules():
        # object.__setattr__ keeps the fused layers out of _modules, so state_dict() stays HF's keys.
        if isinstance(module, LlamaAttention):
            parts = [module.q_proj, module.k_proj, module.v_proj]
            if any(id(p) in with_lora for p in parts):
                continue
            fused = fuse_linears(parts)
            object.__setattr__(module, "fused_qkv", fused)
            fused_parts += parts
            fused_layers.append(fused)
        elif isinstance(module, LlamaMLP):
            parts = [module.gate_proj, module.up_proj]
            if any(id(p) in with_lora for p in parts):
                continue
            fused = fuse_linears(parts)
            object.__setattr__(module, "fused_gate_up", fused)
            fused_parts += parts
            fused_layers.append(fused)
    if device.type != "cpu":
        return model
    standalone = [
        m for m in model.modules() if isinstance(m, nn.Linear) and m not in fused_parts and id(m) not in with_lora
    ]
    conv1ds = [m for m in model.modules() if isinstance(m, Conv1D) and id(m) not in with_lora]
    if dtype == torch.float32 and onednn_available():
        for linear in standalone + fused_layers:
            linear.weight.data = _store_for_onednn(linear.weight.data)
            linear.__class__ = OneDNNLinear
        for conv in conv1ds:
            conv.weight.data = _store_for_onednn(conv.weight.data.t()).t()
            conv.__class__ = OneDNNConv1D
        return model
    # bfloat16 kernels (PyTorch's and ours) read (out, in)-contiguous weights fastest; GPT-2 stores (in, out).
    for conv in conv1ds:
        conv.weight.data = conv.weight.data.t().contiguous().t()
    if dtype == torch.bfloat16 and bf16_decode_ops() is not None:
        for linear in standalone + fused_layers:
            if linear.weight.is_contiguous():
                linear.__class__ = DecodeBF16Linear
        for conv in conv1ds:
            conv.__class__ = DecodeBF16Conv1D
        for module in model.modules():
            if type(module) is RMSNorm:
                module.__class__ = DecodeBF16RMSNorm
    return model


def prepare_for_training(model: nn.Module) -> nn.Module:
    """Undo prepare_for_inference: separate q/k/v and gate/up weights again, plain nn.Linear/Conv1D layers,
    contiguous weights in HF's layout, every parameter trainable, train mode. Values are unchanged.

    For fine-tuning a model loaded with engine.checkpoint.load_model (which prepares for inference);
    each fused weight is released as soon as its parts own their storage again.
    """
    for module in model.modules():
        for attr, parts in (("fused_qkv", ("q_proj", "k_proj", "v_proj")), ("fused_gate_up", ("gate_proj", "up_proj"))):
            if attr in module.__dict__:
                for name in parts:
                    part = getattr(module, name)
                    part.weight.data = part.weight.data.clone()
                    if part.bias is not None:
                        part.bias.data = part.bias.data.clone()
                object.__delattr__(module, attr)  # back to the class attribute None: unfused forward
    for module in model.modules():
        if type(module) in (OneDNNLinear, DecodeBF16Linear):
            module.__class__ = nn.Linear
        elif type(module) in (OneDNNConv1D, DecodeBF16Conv1D):
            module.__class__ = Conv1D
        elif type(module) is DecodeBF16RMSNorm:
            module.__class__ = RMSNorm
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    return model.train().requires_grad_(True)
