"""A GGUF file's tensors as our HF-named weights: name mapping, layout fixes and dequantization.

llama.cpp stores a tensor's dimensions innermost first (`ne`); the reader's numpy view has them
reversed, which is PyTorch's order, so a Linear weight reads as (out, in) as in Hugging Face files.
Three changes undo what llama.cpp's converter did:
- `llama` architecture only: Q and K projection rows were interleaved per head for llama.cpp's RoPE
  (`permute` in convert_hf_to_gguf.py); `unpermute_rows` restores Hugging Face's half-split order.
  (`gemma3` keeps Hugging Face's order: llama.cpp runs it with the half-split, NEOX-style RoPE.)
- `gpt2`: Conv1D weights were transposed to (out, in); ours are (in, out).
- `gemma3`: every RMSNorm weight was stored as 1 + w (llama.cpp's norm multiplies by the weight, Gemma's
  by 1 + weight); 1 is subtracted again in float32, before any cast.
`tensor_layout` says which of the first two applies to a tensor; the GGUF writer (engine.gguf.writer) redoes
them (`permute_rows`) and names tensors with `gguf_tensor_name`, the inverse of the reader's map.

`model_tensors` describes every tensor with its raw, memory-mapped blocks (nothing is read), so a
loader that keeps quantized weights can take the blocks as they are: rows are whole blocks, so the
row permutation applies to raw blocks too. `dequantize` turns one tensor into a torch tensor of
the requested dtype in our layout; `read_blocks` reads a quantized matrix's blocks as they are, for
engine.quant's layers. Both read through the open file (`read_raw`), never through the map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from engine.errors import CheckpointError
from engine.gguf.config import ROPE_FREQS_TENSOR
from engine.gguf.header import GGUFFile
from models.config import GPT2Config, LlamaConfig, ModelConfig

Q = GGMLQuantizationType
# IQ4_NL is what llama-quantize falls back to for Q2_K/Q3_K rows that are not a multiple of 256 long.
SUPPORTED_TENSOR_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL,
)

# Per-block tensor names (after "blk.N.") -> our module names (after the layer prefix).
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Gemma 3 has a norm before and after both attention and MLP; `ffn_norm` is the one before the MLP here.
_GEMMA3_BLOCK = {
    **{base: name for base, name in _LLAMA_BLOCK.items() if base != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GEMMA3_NORMS = {"attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm",
                 "output_norm"}  # stored as 1 + w
_GPT2_BLOCK = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f"}
_GPT2_CONV1D = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}  # stored transposed: (out, in)
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_NAME = re.compile(r"(\w+)\.(weight|bias)$")

# Not weights of our modules: folded into the config (RoPE factors), or GPT-2's copy of the embedding that
# the converter writes as `output.weight` (our GPT-2 always ties it).
_CONSUMED = {"llama": {ROPE_FREQS_TENSOR}, "qwen2": {ROPE_FREQS_TENSOR}, "qwen3": {ROPE_FREQS_TENSOR},
             "gpt2": {"output.weight"}}


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file, described, not read."""

    gguf_name: str  # as in the file, e.g. "blk.0.attn_q.weight"
    key: str  # our module's state-dict key, e.g. "model.layers.0.self_attn.q_proj.weight"
    tensor_type: GGMLQuantizationType
    raw: np.ndarray  # the stored data, memory-mapped: floats for F32/F16, uint8 blocks (rows, bytes) otherwise
    data_offset: int  # where `raw` starts in the file (read_raw reads it without the memory map)
    shape: tuple[int, ...]  # element shape as stored, numpy order (GGUF's ne reversed): (out, in) for a Linear
    unpermute_heads: int | None  # llama Q/K: heads whose rows llama.cpp interleaved for its RoPE
    transpose: bool  # gpt2 Conv1D: stored (out, in), our module holds (in, out)
    norm_shift: float = 0.0  # gemma3 norms: the file holds weight + norm_shift

    @property
    def model_shape(self) -> tuple[int, ...]:
        """The shape our module expects once the layout is undone."""
        return tuple(reversed(self.shape)) if self.transpose else self.shape

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)


def _name_maps(arch: str) -> tuple[dict[str, str], dict[str, str], str]:
    """(per-block names, top-level names, our layer prefix) of an architecture."""
    return {
        "gpt2": (_GPT2_BLOCK, _GPT2_TOP, "transformer.h"),
        "gemma3": (_GEMMA3_BLOCK, _LLAMA_TOP, "model.layers"),
    }.get(arch, (_LLAMA_BLOCK, _LLAMA_TOP, "model.layers"))


def _module_key(arch: str, gguf_name: str) -> tuple[str, str] | None:
    """(our key, the GGUF base name such as "attn_q") for a tensor name, None if it is not one we know."""
    block_map, top_map, layer_prefix = _name_maps(arch)
    if m := _BLOCK_NAME.fullmatch(gguf_name):
        layer, base, kind = m.groups()
        if base in block_map:
            return f"{layer_prefix}.{int(layer)}.{block_map[base]}.{kind}", base
    elif m := _TOP_NAME.fullmatch(gguf_name):
        base, kind = m.groups()
        if base in top_map:
            return f"{top_map[base]}.{kind}", base
    return None


def gguf_tensor_name(arch: str, key: str) -> tuple[str, str] | None:
    """(the GGUF tensor name, its base name such as "attn_q") for one of our keys: _module_key's inverse."""
    block_map, top_map, layer_prefix = _name_maps(arch)
    stem, _, kind = key.rpartition(".")
    if stem.startswith(layer_prefix + "."):
        layer, _, module = stem[len(layer_prefix) + 1 :].partition(".")
        base = next((b for b, m in block_map.items() if m == module), None)
        return (f"blk.{layer}.{base}.{kind}", base) if base and layer.isdigit() else None
    base = next((b for b, m in top_map.items() if m == stem), None)
    return (f"{base}.{kind}", base) if base else None


def model_tensors(gguf_file: GGUFFile, config: ModelConfig) -> dict[str, GGUFTensor]:
    """Every weight tensor of the file under our key; unknown names keep their GGUF name so the key check
    reports them. Refuses tensor types we cannot dequantize, by name."""
    arch = gguf_file.architecture
    tensors: dict[str, GGUFTensor] = {}
    for t in gguf_file.tensors:
        if t.name in _CONSUMED.get(arch, ()):
            continue
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(q.name for q in SUPPORTED_TENSOR_TYPES)
            raise CheckpointError(
                f"{gguf_file.path}: tensor {t.name} has type {t.tensor_type.name}, which chattui cannot load "
                f"(supported: {supported})"
            )
        mapped = _module_key(arch, t.name)
        key, base = mapped if mapped else (t.name, "")
        heads, transpose = tensor_layout(arch, config, key, base)
        tensors[key] = GGUFTensor(
            gguf_name=t.name,
            key=key,
            tensor_type=t.tensor_type,
            raw=t.data,
            data_offset=int(t.data_offset),
            shape=tuple(reversed(t.shape)),
            unpermute_heads=heads,
            transpose=transpose,
            norm_shift=1.0 if arch == "gemma3" and base in _GEMMA3_NORMS else 0.0,
        )
    return tensors


def tensor_layout(arch: str, config: ModelConfig, key: str, base: str) -> tuple[int | None, bool]:
    """How llama.cpp's layout of a tensor differs from ours: (the heads whose rows it permutes for `llama` Q/K,
    None otherwise; whether it stores a GPT-2 Conv1D weight transposed)."""
    heads = None
    if arch == "llama" and isinstance(config, LlamaConfig):
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(base)
    return heads, isinstance(config, GPT2Config) and base in _GPT2_CONV1D and key.endswith(".weight")


def unpermute_rows(w: torch.Tensor | np.ndarray, n_heads: int) -> torch.Tensor | np.ndarray:
    """Undo convert_hf_to_gguf.py's `permute` of Q/K rows (n_heads * head_dim, ...): there each head's rows
    were reordered from [first half | second half] to interleaved pairs, i.e.
    `w.reshape(n_heads, 2, head_dim // 2, ...).swapaxes(1, 2)`; this is its inverse. Works on a torch tensor
    of values and on a numpy array of raw quantized rows alike (a row is whole blocks)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's `permute` of Q/K rows for llama.cpp's RoPE, which rotates adjacent pairs:
    each head's rows go from [first half | second half] to interleaved pairs. unpermute_rows undoes it."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_raw(tensor: GGUFTensor, file: BinaryIO, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of the tensor's stored data (`raw`'s first axis), read from the open file into memory
    of their own. The memory map is never touched: the page cache hands a mapping whole folios (up to 2 MB on
    recent kernels), so reading even the small norms through it kept ~half of a 100 MB file resident until the
    file was closed, beside the copy."""
    stop = tensor.raw.shape[0] if stop is None else min(stop, tensor.raw.shape[0])
    out = np.empty((stop - start, *tensor.raw.shape[1:]), dtype=tensor.raw.dtype)
    file.seek(tensor.data_offset + start * tensor.raw.strides[0])  # raw is C-contiguous: a row's bytes
    if file.readinto(memoryview(out).cast("B")) != out.nbytes:
        raise CheckpointError(f"truncated GGUF file while reading {tensor.gguf_name}")
    return out


def read_blocks(tensor: GGUFTensor, file: BinaryIO) -> torch.Tensor:
    """A quantized matrix's blocks as (rows, bytes per row) uint8 in our row order (read_raw). Llama Q/K rows
    are un-permuted as whole rows of blocks."""
    blocks = torch.from_numpy(read_raw(tensor, file))  # (rows, bytes per row)
    if tensor.unpermute_heads is not None:
        blocks = unpermute_rows(blocks, tensor.unpermute_heads).contiguous()
    return blocks


_STAGING_ELEMENTS = 4 << 20  # float32 values dequantized per step of a large tensor (16 MiB)


def _dequantize_raw(tensor: GGUFTensor, raw: np.ndarray) -> torch.Tensor:
    """float32 values of raw data (whole rows of the tensor), numpy order."""
    try:
        array = gguf.quants.dequantize(raw, tensor.tensor_type)
    except (ValueError, NotImplementedError) as e:  # a malformed block array; types were checked before
        raise CheckpointError(f"cannot dequantize {tensor.gguf_name} ({tensor.tensor_type.name}): {e}") from None
    return torch.from_numpy(array)


def dequantize(tensor: GGUFTensor, file: BinaryIO, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor in our layout, e.g. (out, in) for a Linear and (in, out) for GPT-2's Conv1D, in dtype on device,
    read from the open file (read_raw).

    A matrix whose layout stays as stored is read and dequantized a few rows at a time straight into the result,
    so a large embedding needs no full float32 copy beside it."""
    rows = tensor.shape[0]
    as_stored = tensor.unpermute_heads is None and not tensor.transpose and not tensor.norm_shift
    if as_stored and len(tensor.shape) == 2 and tensor.raw.shape[0] == rows:
        out = torch.empty(tensor.shape, dtype=dtype, device=device)
        step = max(1, _STAGING_ELEMENTS // tensor.shape[1])
        for start in range(0, rows, step):
            chunk = _dequantize_raw(tensor, read_raw(tensor, file, start, start + step))
            out[start : start + step].copy_(chunk.reshape(-1, tensor.shape[1]))
        return out
    w = _dequantize_raw(tensor, read_raw(tensor, file)).reshape(tensor.shape)
    if tensor.unpermute_heads is not None:
        w = unpermute_rows(w, tensor.unpermute_heads)
    if tensor.transpose:
        w = w.t()
    if tensor.norm_shift:
        w = w - tensor.norm_shift  # in float32: a bfloat16 1 + w has lost most of w's bits
    return w.to(device=device, dtype=dtype).contiguous()
