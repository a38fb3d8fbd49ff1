"""Our quantizer for GGUF's Q8_0, Q4_0 and Q4_1 blocks, in torch, rounding as ggml's `quantize_row_*_ref`.

A (rows, cols) matrix is cut into blocks of 32 consecutive values of a row; each block is stored as its
float16 scale(s) followed by its codes (ggml-common.h's `block_q8_0`, `block_q4_0`, `block_q4_1`):
- Q8_0 (34 bytes): d = max|x| / 127, codes round(x / d) as int8 (round half away from zero).
- Q4_0 (18 bytes): d = x_max / -8, x_max the block's value of largest magnitude (the first of equals),
  codes min(15, trunc(x / d + 8.5)).
- Q4_1 (20 bytes): d = (max - min) / 15 and the minimum m, codes min(15, trunc((x - m) / d + 0.5)).
4-bit codes are packed two per byte: value j in the low nibble of byte j, value j + 16 in its high
nibble. The scale is stored as float16, but the values are multiplied by the float32 1 / d, as ggml
does, so the bytes equal the reference's (tests compare with gguf.quants.quantize).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

Q = GGMLQuantizationType
BLOCK_VALUES = 32
QUANTIZED_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1)


def quantize_rows(w: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """(rows, cols) floats -> (rows, bytes per row) uint8 blocks of qtype; cols must be a multiple of 32."""
    if qtype not in QUANTIZED_TYPES:
        raise ValueError(f"cannot quantize to {qtype.name} (supported: {', '.join(t.name for t in QUANTIZED_TYPES)})")
    rows, cols = w.shape
    if cols % BLOCK_VALUES:
        raise ValueError(f"rows of {cols} values are not a whole number of {qtype.name} blocks of {BLOCK_VALUES}")
    x = w.detach().to(torch.float32).reshape(rows, cols // BLOCK_VALUES, BLOCK_VALUES)  # (rows, blocks, 32)
    if qtype == Q.Q8_0:
        d = x.abs().amax(-1, keepdim=True) / 127  # (rows, blocks, 1)
        codes = _round_half_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)  # (rows, blocks, 32)
        parts = [_half_bytes(d), codes]
    elif qtype == Q.Q4_0:
        largest = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # (rows, blocks, 1), sign kept
        d = largest / -8
        parts = [_half_bytes(d), _nibbles(torch.trunc(x * _inverse(d) + 8.5))]
    else:
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)  # (rows, blocks, 1)
        d = (high - low) / 15
        parts = [_half_bytes(d), _half_bytes(low), _nibbles(torch.trunc((x - low) * _inverse(d) + 0.5))]
    return torch.cat(parts, dim=-1).reshape(rows, -1)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, and 0 for an all-zero block (whose codes are then all the zero point)."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves go away from zero (torch.round goes to the even neighbour)."""
    whole = torch.trunc(v)
    return whole + torch.where((v - whole).abs() >= 0.5, torch.sign(v), torch.zeros_like(v))


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    """(rows, blocks, 1) float32 -> (rows, blocks, 2) uint8: the float16 value's little-endian bytes."""
    return v.to(torch.float16).view(torch.uint8)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(rows, blocks, 32) codes in [0, 16] -> (rows, blocks, 16) bytes, codes clamped to 15."""
    q = codes.clamp(max=15).to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)
