"""GGUF's quantized weights kept in their blocks: QuantizedLinear, QuantizedEmbedding, and the swap that
puts them into a model in place of nn.Linear and nn.Embedding.

Decode (one activation row) runs engine.kernels' quant_linear on the blocks: a 4-bit matrix streams a
quarter of the bytes of bfloat16. interleave_blocks (engine.inference, at load) rearranges Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K blocks in place into the kernels' interleaved 16-row groups, which they
read ~1.5-2.5x as fast as rows (an output layer in Q5_0, Q5_1, Q4_K or Q5_K keeps its rows: its float-activation
kernel reads rows only). Prefill (many rows) dequantizes the weight in
chunks of rows, each chunk transiently (CHUNK_VALUES values at most, 16 MB in float32), and runs
PyTorch's GEMM on it (in bfloat16 on CPUs that multiply it natively: prefill_dtype): the GEMM does
~T multiply-adds per dequantized value, so the dequantization costs little next to it, and no dense
copy of the weight is ever kept. Under no_grad/inference_mode
the chunks go to one buffer per thread, reused by every layer (no fresh pages to fault in).

Without the compiled kernels (no compiler, no AVX2), every call dequantizes with gguf.quants (numpy)
and multiplies in PyTorch: correct and slow; where quant_kernels_available() is False, loading a
dense copy instead is the better choice.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.device import cpu_has_fast_bfloat16
from engine.errors import EngineError
from engine.kernels import quant_isa, quant_ops

SUPPORTED_TYPES = frozenset({
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
})
CHUNK_VALUES = 1 << 22  # weight values dequantized at once for a many-row call
# The kernels' interleaved layout (engine/kernels/quant.cpp): 16 rows' blocks side by side, read by a
# decode kernel ~2x as fast as rows one by one; a type code plus INTERLEAVED says the blocks are so.
# Types whose groups have an output layer's (float_activation) kernel too: x as it is, or for Q6_K as two int8
# parts (x's rounding and the rounding of its residual: 2^-8 of one int8 rounding's error).
FLOAT_INTERLEAVED_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0,
                                     GGMLQuantizationType.Q6_K})
# The other interleaved kernels take int8 activations only: an output layer (float activations) keeps its rows.
INTERLEAVED_TYPES = FLOAT_INTERLEAVED_TYPES | {GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
                                               GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K}
INTERLEAVED, GROUP_ROWS = 256, 16
INTERLEAVED_BLOCKS_ENV = "CHATTUI_INTERLEAVED_BLOCKS"
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # activations the kernels take


def quant_kernels_available() -> bool:
    return quant_ops() is not None


def as_block_rows(blocks: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int],
                  name: str = "weight") -> torch.Tensor:
    """GGUF's raw bytes of a (rows, cols) tensor as a (rows, bytes per row) uint8 tensor, sharing memory
    with `blocks` (a read-only memory map stays one: nothing here writes to it)."""
    if qtype not in SUPPORTED_TYPES:
        raise EngineError(f"{name}: GGUF type {qtype.name} has no quantized kernel "
                          f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
    rows, cols = shape
    values, nbytes = GGML_QUANT_SIZES[qtype]
    if cols % values:
        raise EngineError(f"{name}: {cols} columns is not a multiple of {qtype.name}'s block of {values}")
    expected = rows * cols // values * nbytes
    if isinstance(blocks, np.ndarray):
        with warnings.catch_warnings():  # a read-only memmap: torch warns that writing to it would be undefined
            warnings.simplefilter("ignore", UserWarning)
            blocks = torch.from_numpy(blocks)
    if blocks.dtype != torch.uint8 or blocks.numel() != expected:
        raise EngineError(f"{name}: expected {expected} bytes of {qtype.name} blocks for shape {rows}x{cols}, "
                          f"got {blocks.numel()} {str(blocks.dtype).removeprefix('torch.')} values")
    return blocks.reshape(rows, expected // rows).contiguous()


def dequantize(blocks: torch.Tensor, qtype: GGMLQuantizationType, dtype: torch.dtype,
               scratch: torch.Tensor | None = None, interleaved: bool = False) -> torch.Tensor:
    """(rows, bytes per row) uint8 -> (rows, cols) in dtype, as gguf.quants.dequantize computes it; into
    the start of `scratch` (flat, of dtype) where given and the kernels run. `interleaved`: the blocks are
    in the kernels' interleaved layout (whole groups of GROUP_ROWS rows; only the kernels read it)."""
    ops = quant_ops()
    if interleaved or (ops is not None and dtype in KERNEL_DTYPES):
        code = int(qtype) | (INTERLEAVED if interleaved else 0)
        return ops.quant_dequantize(blocks, code, dtype, quant_isa(), scratch)
    from gguf.quants import dequantize as gguf_dequantize

    return torch.from_numpy(gguf_dequantize(blocks.numpy(), qtype)).to(dtype)


BFLOAT16_PREFILL = True  # tests turn it off to check the float32 tiles exactly


def prefill_dtype(x_dtype: torch.dtype, keep_float: bool = False) -> torch.dtype:
    """What a many-row (prefill) call on the blocks multiplies in: bfloat16 tiles and activations (float32
    accumulation, bfloat16 result) for float32 inference on a CPU that multiplies bfloat16 natively
    (AVX512-BF16, AMX), where that GEMM ran 3-5x the float32 one (SmolLM-135M's shapes, 128 and 1,024
    rows, AMD Zen 5). Otherwise, under autograd (fine-tuning) and where keep_float (the output layer, whose
    decode input stays float too), x's dtype if the kernels take it, else float32. The rounding (2^-9 of each weight, input and output) is of the order of the 8-bit activation
    rounding decode does on the blocks, as llama.cpp's prefill rounds its activations to 8 bits too."""
    if (x_dtype == torch.float32 and not keep_float and not torch.is_grad_enabled() and BFLOAT16_PREFILL
            and cpu_has_fast_bfloat16()):
        return torch.bfloat16
    return x_dtype if x_dtype in KERNEL_DTYPES else torch.float32


_scratch_buffers = threading.local()  # per thread: the generation worker and the UI's never share one


def _scratch(values: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least `values` values of dtype, reused by this thread's prefill matmuls."""
    buffer = getattr(_scratch_buffers, str(dtype), None)
    if buffer is None or buffer.numel() < values:
        buffer = torch.empty(values, dtype=dtype)
        setattr(_scratch_buffers, str(dtype), buffer)
    return buffer


class QuantizedLinear(nn.Module):
    """nn.Linear (y = x Wᵀ + b) whose weight stays in GGUF blocks: `blocks` (out, bytes per row) uint8."""

    def __init__(self, in_features: int, out_features: int, qtype: GGMLQuantizationType, blocks: torch.Tensor,
                 bias: torch.Tensor | None = None, float_activation: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, GGMLQuantizationType(qtype)
        self.register_buffer("blocks", as_block_rows(blocks, self.qtype, (out_features, in_features)),
                             persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        # Plain attributes for the per-token path: a decode step calls this ~200 times.
        self.isa = quant_isa() if quant_kernels_available() else None
        self._kernel = None if self.isa is None else quant_ops().quant_linear
        self.interleaved = False  # blocks in row order; interleave() rearranges them
        self.kernel_code = int(self.qtype)  # the type code the kernels take
        # The output layer keeps its input as it is (the kernel dequantizes weight rows instead of rounding x
        # to int8): its argmax picks the token, and int8 rounding there flips near-ties. Measured on
        # SmolLM2-135M Q4_1: 16 greedy tokens equal to the dequantized float32 path on 14 of 24 prompts with
        # int8, 20 of 24 without, and decoding no slower (104 vs 107 tok/s, AMD Zen 5: streaming the
        # 49152x576 Q8_0 output layer's bytes decides, not the arithmetic). On interleaved Q6_K groups, x is
        # two int8 parts instead (FLOAT_INTERLEAVED_TYPES), 254x finer than one.
        self.float_activation = float_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self._kernel is not None and x.numel() == self.in_features and x.dtype in KERNEL_DTYPES:
            return self._kernel(x, self.blocks, self.kernel_code, self.bias, self.isa, self.float_activation)
        rows_per_chunk = max(1, CHUNK_VALUES // self.in_features)
        if self.interleaved:  # chunks of whole groups
            rows_per_chunk = max(GROUP_ROWS, rows_per_chunk // GROUP_ROWS * GROUP_ROWS)
        gemm_dtype = prefill_dtype(x.dtype, keep_float=self.float_activation)
        # Autograd would keep each chunk for the backward pass, so only inference reuses one buffer.
        scratch = None if torch.is_grad_enabled() else _scratch(rows_per_chunk * self.in_features, gemm_dtype)
        x_gemm = x.to(gemm_dtype)
        parts = [
            F.linear(x_gemm, dequantize(self.blocks[start : start + rows_per_chunk], self.qtype, gemm_dtype, scratch,
                                        self.interleaved))
            for start in range(0, self.out_features, rows_per_chunk)
        ]  # each (..., rows in chunk)
        y = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype)  # (..., out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def can_interleave(self) -> bool:
        """Whether interleave() applies: the kernels built, a type with that layout, whole groups of rows."""
        return self.isa is not None and _interleavable(self.qtype, self.out_features, self.interleaved,
                                                       self.float_activation)

    def interleave(self) -> None:
        """Rearrange the blocks in place into the kernels' interleaved layout (see can_interleave)."""
        _interleave([self])

    def mark_interleaved(self) -> None:  # the blocks are in the interleaved layout from now on
        self.interleaved, self.kernel_code = True, int(self.qtype) | INTERLEAVED

    def extra_repr(self) -> str:
        exact = ", float_activation=True" if self.float_activation else ""
        layout = ", interleaved=True" if self.interleaved else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}{exact}{layout}"


class QuantizedEmbedding(nn.Module):
    """nn.Embedding whose table stays in GGUF blocks; a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: GGMLQuantizationType, blocks: torch.Tensor,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.qtype, self.dtype = GGMLQuantizationType(qtype), dtype
        self.register_buffer("blocks", as_block_rows(blocks, self.qtype, (num_embeddings, embedding_dim)),
                             persistent=False)

        self.interleaved = False  # shared with a tied output layer, the blocks may be interleaved

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., dim)
        flat = ids.reshape(-1)
        if not self.interleaved:
            rows = self.blocks.index_select(0, flat)  # (n, bytes per row)
            return dequantize(rows, self.qtype, self.dtype).view(*ids.shape, self.embedding_dim)
        # the groups holding the rows, each dequantized once (16 rows for one: a few microseconds)
        groups, which = torch.unique(flat // GROUP_ROWS, return_inverse=True)
        grouped = self.blocks.view(-1, GROUP_ROWS, self.blocks.shape[1])  # (groups, 16, bytes per row)
        rows = dequantize(grouped[groups].flatten(0, 1), self.qtype, self.dtype, interleaved=True)
        values = rows.view(-1, GROUP_ROWS, self.embedding_dim)[which, flat % GROUP_ROWS]  # (n, dim)
        return values.view(*ids.shape, self.embedding_dim)

    def can_interleave(self) -> bool:
        return quant_kernels_available() and _interleavable(self.qtype, self.num_embeddings, self.interleaved)

    def mark_interleaved(self) -> None:
        self.interleaved = True

    def extra_repr(self) -> str:
        layout = ", interleaved=True" if self.interleaved else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}{layout}"


def _interleavable(qtype: GGMLQuantizationType, rows: int, interleaved: bool, float_activation: bool = False) -> bool:
    types = FLOAT_INTERLEAVED_TYPES if float_activation else INTERLEAVED_TYPES
    return not interleaved and qtype in types and rows % GROUP_ROWS == 0


def _interleave(layers: list[QuantizedLinear | QuantizedEmbedding]) -> None:
    """Rearrange the blocks the layers share (one tensor: a tied embedding and output layer) in place."""
    if not all(layer.can_interleave() for layer in layers):
        raise EngineError(f"cannot interleave {', '.join(layer.extra_repr() for layer in layers)}")
    quant_ops().quant_interleave(layers[0].blocks, int(layers[0].qtype))
    for layer in layers:
        layer.mark_interleaved()


def fuse_quantized_linears(parts: list[QuantizedLinear]) -> QuantizedLinear | None:
    """One QuantizedLinear computing cat([p(x) for p in parts], -1), like engine.inference.fuse_linears:
    the parts' blocks become views of the fused ones (no second copy). None where the parts' GGUF types
    differ (a Q4_K_M file stores some v_proj in Q6_K): those stay separate matmuls."""
    first = parts[0]
    if any(p.qtype != first.qtype or p.in_features != first.in_features or p.interleaved != first.interleaved
           for p in parts):
        return None
    if any((p.bias is None) != (first.bias is None) for p in parts):
        return None
    blocks = torch.cat([p.blocks for p in parts])  # (sum of outs, bytes per row)
    bias = None if first.bias is None else torch.cat([p.bias for p in parts])
    fused = QuantizedLinear(first.in_features, blocks.shape[0], first.qtype, blocks, bias)
    if first.interleaved:  # whole groups each: the concatenation is the fused matrix's interleaved layout
        fused.interleaved, fused.kernel_code = True, first.kernel_code
    offset = 0
    for p in parts:
        p.blocks = fused.blocks[offset : offset + p.out_features]
        if bias is not None:
            p.bias = nn.Parameter(fused.bias[offset : offset + p.out_features], requires_grad=False)
        offset += p.out_features
    return fused


def interleave_blocks(model: nn.Module) -> None:
    """The model's GGUF blocks in the kernels' interleaved layout, in place, wherever every layer reading them
    can (can_interleave; a tied embedding and output layer share theirs); nothing where
    CHATTUI_INTERLEAVED_BLOCKS=0 (to measure what it gains)."""
    if os.environ.get(INTERLEAVED_BLOCKS_ENV, "1") == "0":
        return
    readers: dict[int, list[QuantizedLinear | QuantizedEmbedding]] = {}
    for layer in model.modules():
        if type(layer) in (QuantizedLinear, QuantizedEmbedding):
            readers.setdefault(layer.blocks.data_ptr(), []).append(layer)
    for layers in readers.values():
        if all(layer.can_interleave() for layer in layers):
            _interleave(layers)


def count_weights(model: nn.Module) -> int:
    """The model's parameters, those kept in GGUF blocks included (blocks shared by a tied embedding and
    output layer count once)."""
    quantized = {
        m.blocks.data_ptr(): m.blocks.shape[0] * (m.in_features if isinstance(m, QuantizedLinear) else m.embedding_dim)
        for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))
    }
    return sum(p.numel() for p in model.parameters()) + sum(quantized.values())


RawWeight = tuple[GGMLQuantizationType, np.ndarray | torch.Tensor]  # (GGUF type, its raw block bytes)
OUTPUT_LAYER_WEIGHT = "lm_head.weight"  # every family's output projection (models/*.py)


def replace_with_quantized(module: nn.Module, weights: dict[str, RawWeight], prefix: str = "",
                           embedding_dtype: torch.dtype | None = None) -> None:
    """Swap each nn.Linear / nn.Embedding whose weight name (e.g. "model.layers.0.mlp.up_proj.weight")
    is in `weights` for a QuantizedLinear / QuantizedEmbedding on those blocks, in place. A Linear's
    bias, if any, is kept (float32); the output layer keeps float activations. The blocks are used in place, never copied: two names given the
    same raw array (a tied embedding and output) share it. Embeddings return embedding_dtype (default:
    the replaced weight's dtype)."""
    for name, child in module.named_children():
        key = f"{prefix}{name}.weight"
        if key in weights and isinstance(child, (nn.Linear, nn.Embedding)):
            qtype, raw = weights[key]
            qtype = GGMLQuantizationType(qtype)
            if isinstance(child, nn.Linear):
                shape = (child.out_features, child.in_features)
                swapped = QuantizedLinear(*shape[::-1], qtype, as_block_rows(raw, qtype, shape, key), child.bias,
                                          float_activation=key == OUTPUT_LAYER_WEIGHT)
            else:
                shape = (child.num_embeddings, child.embedding_dim)
                swapped = QuantizedEmbedding(*shape, qtype, as_block_rows(raw, qtype, shape, key),
                                             embedding_dtype or child.weight.dtype)
            setattr(module, name, swapped)
        else:
            replace_with_quantized(child, weights, f"{prefix}{name}.", embedding_dtype)
