"""Write a model as a GGUF file that llama.cpp and Ollama load: the inverse of engine.gguf's reader.

The tensors are our modules' weights under Hugging Face's names; they are written as llama.cpp's
convert_hf_to_gguf.py writes them: GGUF names (engine.gguf.tensors.gguf_tensor_name), Q/K rows of
`llama` models permuted for its RoPE, GPT-2's Conv1D weights transposed and its tied embedding written
again as `output.weight`, Llama 3 RoPE scaling as a `rope_freqs` tensor. Which type each tensor gets:
- 1-D tensors (norms, biases) and GPT-2's position embedding stay F32, as llama.cpp keeps them;
- every other matrix gets the file's type (F32, F16, BF16, or our quantizer's Q8_0, Q4_0, Q4_1),
  except that a 4-bit file keeps the output matrix (`output.weight`, or a tied `token_embd.weight`) in
  Q8_0, as llama-quantize keeps it above 4 bits;
- a matrix whose rows are not a whole number of 32-value blocks falls back to F16, as the converter does.
The metadata is what llama.cpp reads for the architecture, the tokenizer (engine.gguf.vocab) and the
chat template. The file is written to a temporary name and renamed into place (engine.atomic), tensors
streamed one at a time, so nothing is left behind by a failure and no second copy of the model is held.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType

from engine.atomic import atomic_file
from engine.errors import ExportError
from engine.gguf.config import ROPE_FREQS_TENSOR
from engine.gguf.quantize import BLOCK_VALUES, QUANTIZED_TYPES, quantize_rows
from engine.gguf.tensors import gguf_tensor_name, permute_rows, tensor_layout
from engine.gguf.vocab import add_tokenizer_metadata
from engine.params import GGUF_EXPORT_TYPES
from models.config import GPT2Config, LlamaConfig, ModelConfig, RopeScaling
from models.llama import rope_inverse_frequencies

log = logging.getLogger(__name__)

Q = GGMLQuantizationType
# Our architectures -> llama.cpp's (Mistral is converted as llama; Gemma 3 is not exported yet).
GGUF_ARCHITECTURE_OF = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                        "Qwen3ForCausalLM": "qwen3", "GPT2LMHeadModel": "gpt2"}
FILE_TYPES = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
              Q.Q8_0: LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1}
FALLBACK_TYPE = Q.F16  # for matrices whose rows are not whole blocks
OUTPUT_TYPE_OF_4_BIT = Q.Q8_0
_FLOAT32_BASES = {"position_embd"}
_QUANTIZE_ROWS_VALUES = 1 << 22  # values quantized per step of a large matrix (16 MiB of float32)


@dataclass(frozen=True)
class _Planned:
    """One tensor of the file, before its data is made."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    key: str  # our weight it is made from ("" for rope_freqs, made from the config)
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # as stored, numpy order: (out, in) for a matrix
    permute_heads: int | None  # llama Q/K rows: permuted for these many heads
    transpose: bool  # GPT-2 Conv1D: ours is (in, out)


@dataclass
class GGUFExport:
    """What export_gguf wrote."""

    path: Path
    weight_type: str  # the file's type, e.g. "Q8_0"
    tensor_types: dict[str, int] = field(default_factory=dict)  # tensors written per type name
    fallbacks: list[str] = field(default_factory=list)  # matrices written in FALLBACK_TYPE (rows not whole blocks)


def weight_type(name: str) -> GGMLQuantizationType:
    """"Q8_0" (any case) -> its type; ExportError lists the supported ones otherwise."""
    if name.upper() not in GGUF_EXPORT_TYPES:
        raise ExportError(f"GGUF type {name!r} is not supported for export (supported: {', '.join(GGUF_EXPORT_TYPES)})")
    return Q[name.upper()]


def gguf_architecture(config: ModelConfig) -> str:
    arch = GGUF_ARCHITECTURE_OF.get(config.architecture)
    if arch is None or not isinstance(config, (LlamaConfig, GPT2Config)):
        supported = ", ".join(GGUF_ARCHITECTURE_OF)
        raise ExportError(f"{config.architecture} cannot be exported to GGUF yet (supported: {supported})")
    return arch


def export_gguf(
    weights: Mapping[str, torch.Tensor],
    config: ModelConfig,
    tokenizer_source: Path,
    out: Path,
    file_type: str,
    name: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> GGUFExport:
    """Write `weights` (a model's named_parameters(): HF names, tied ones once) as the GGUF file `out`.

    tokenizer_source is the base model: a Hugging Face folder (tokenizer.json, tokenizer_config.json) or a GGUF
    file whose tokenizer is copied. progress(done, total) counts the weights' elements written."""
    qtype = weight_type(file_type)
    arch = gguf_architecture(config)
    _check_config(arch, config)
    plan = _plan(arch, config, weights, qtype)
    fallbacks = [p for p in plan if qtype in QUANTIZED_TYPES and p.qtype == FALLBACK_TYPE]
    for p in fallbacks:
        log.warning("%s: rows of %d values are not whole %s blocks; written as %s", p.name, p.shape[-1], qtype.name,
                    FALLBACK_TYPE.name)
    result = GGUFExport(path=Path(out), weight_type=qtype.name, tensor_types=dict(Counter(p.qtype.name for p in plan)),
                        fallbacks=[p.name for p in fallbacks])
    total = sum(int(np.prod(p.shape)) for p in plan)
    with atomic_file(result.path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_name(name or result.path.stem)
            writer.add_file_type(FILE_TYPES[qtype])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_hyperparameters(writer, arch, config)
            add_tokenizer_metadata(writer, Path(tokenizer_source), config.vocab_size)
            for p in plan:
                stored = gguf.quant_shape_to_byte_shape(p.shape, p.qtype) if p.qtype not in (Q.F32, Q.F16) else p.shape
                dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(p.qtype, np.uint8)
                nbytes = int(np.prod(stored)) * np.dtype(dtype).itemsize
                writer.add_tensor_info(p.name, stored, np.dtype(dtype), nbytes, raw_dtype=p.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            done = 0
            for p in plan:
                writer.write_tensor_data(_encode(_source(p, weights, config), p.qtype))
                done += int(np.prod(p.shape))
                if progress:
                    progress(done, total)
        finally:
            writer.close()
    return result


def export_model(
    model_path: Path,
    out: Path,
    file_type: str,
    adapter: Path | None = None,
    name: str = "",
    on_load: Callable[[int, int], None] | None = None,
    on_write: Callable[[int, int], None] | None = None,
) -> GGUFExport:
    """A checkpoint folder or GGUF file, with a LoRA adapter merged into it if given, as the GGUF file `out`.

    The weights are loaded in float32 (a GGUF's dequantized), the adapter folded in (W += scale * B @ A);
    on_load(bytes done, total) and on_write(values done, total) report progress."""
    from engine.checkpoint import load_weights, read_model_config
    from engine.lora import load_adapter, merge_lora

    config = read_model_config(model_path)
    gguf_architecture(config)  # refuse an architecture we cannot write before loading it
    weight_type(file_type)
    model = load_weights(model_path, config, torch.device("cpu"), torch.float32, progress=on_load)
    if adapter is not None:
        load_adapter(model, adapter)
        merge_lora(model)
    return export_gguf(dict(model.named_parameters()), config, model_path, out, file_type, name=name, progress=on_write)


def _check_config(arch: str, config: ModelConfig) -> None:
    if isinstance(config, GPT2Config):
        if config.activation_function != "gelu_new":
            raise ExportError(f"GPT-2 with activation {config.activation_function!r}: llama.cpp's gpt2 graph uses "
                              "gelu_new (the tanh approximation)")
        return
    kind = config.rope_scaling.kind
    if kind not in ("default", "linear") and arch != "llama":
        raise ExportError(f"{config.architecture} with {kind} RoPE scaling: llama.cpp reads per-frequency RoPE "
                          "factors for the llama architecture only")
    if config.sliding_window and arch != "llama":
        raise ExportError(f"{config.architecture} with a sliding window: llama.cpp's {arch} graph has none")
    if config.sliding_window:  # written for chattui's reader; llama.cpp's converter drops it as well
        log.warning("%s: llama.cpp's llama graph ignores the sliding window of %d tokens (it attends to every "
                    "earlier token), so beyond that many tokens it computes another model", config.architecture,
                    config.sliding_window)


def _add_hyperparameters(writer: gguf.GGUFWriter, arch: str, config: ModelConfig) -> None:
    """The {arch}.* keys llama.cpp reads (the ones engine.gguf.config reads back)."""
    writer.add_vocab_size(config.vocab_size)
    if isinstance(config, GPT2Config):
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.n_inner)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.rope_scaling.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling.factor)
    if config.sliding_window:
        writer.add_sliding_window(config.sliding_window)


def _plan(arch: str, config: ModelConfig, weights: Mapping[str, torch.Tensor], qtype: GGMLQuantizationType) -> list[_Planned]:
    plan = []
    if isinstance(config, LlamaConfig) and config.rope_scaling.kind in ("llama3", "factors"):
        plan.append(_Planned(ROPE_FREQS_TENSOR, "", Q.F32, (config.head_dim // 2,), None, False))
    has_output = any(gguf_tensor_name(arch, key) == ("output.weight", "output") for key in weights)
    for key, w in weights.items():
        named = gguf_tensor_name(arch, key)
        if named is None:
            raise ExportError(f"weight {key} has no GGUF tensor name for the {arch} architecture")
        name, base = named
        heads, transpose = tensor_layout(arch, config, key, base)
        shape = tuple(reversed(w.shape)) if transpose else tuple(w.shape)
        # The output matrix: output.weight, or the embedding where the output is tied to it.
        is_output = base == "output" or (base == "token_embd" and not has_output)
        plan.append(_Planned(name, key, _tensor_type(base, shape, qtype, is_output), shape, heads, transpose))
        if arch == "gpt2" and base == "token_embd":  # llama.cpp's converter writes GPT-2's tied output again
            plan.append(_Planned("output.weight", key, plan[-1].qtype, shape, None, False))
    return plan


def _tensor_type(base: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, is_output: bool) -> GGMLQuantizationType:
    if len(shape) < 2 or base in _FLOAT32_BASES:
        return Q.F32
    if qtype in (Q.Q4_0, Q.Q4_1) and is_output:
        qtype = OUTPUT_TYPE_OF_4_BIT
    if qtype in QUANTIZED_TYPES and shape[-1] % BLOCK_VALUES:
        return FALLBACK_TYPE
    return qtype


def _source(p: _Planned, weights: Mapping[str, torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """The planned tensor's float32 values in llama.cpp's layout."""
    if not p.key:
        return _rope_factors(config)
    w = weights[p.key].detach().to(device="cpu", dtype=torch.float32)
    if p.transpose:
        w = w.t()
    if p.permute_heads is not None:
        w = permute_rows(w, p.permute_heads)
    return w.contiguous()


def _rope_factors(config: LlamaConfig) -> torch.Tensor:
    """(head_dim // 2,) divisors of the base frequencies: llama.cpp's form of Llama 3 RoPE scaling."""
    scaling = config.rope_scaling
    if scaling.kind == "factors":
        return torch.tensor(scaling.frequency_factors, dtype=torch.float32)
    plain = rope_inverse_frequencies(config.head_dim, config.rope_theta, RopeScaling("default"))
    return plain / rope_inverse_frequencies(config.head_dim, config.rope_theta, scaling)


def _encode(w: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values -> the array written: floats for F32/F16, (rows, bytes) uint8 blocks otherwise."""
    if qtype == Q.F32:
        return w.numpy()
    if qtype == Q.F16:
        return w.to(torch.float16).numpy()
    if qtype == Q.BF16:
        return w.to(torch.bfloat16).view(torch.uint8).numpy()
    rows, cols = w.shape
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    out = torch.empty((rows, cols // block_values * block_bytes), dtype=torch.uint8)
    step = max(1, _QUANTIZE_ROWS_VALUES // cols)
    for start in range(0, rows, step):
        out[start : start + step] = quantize_rows(w[start : start + step], qtype)
    return out.numpy()
