"""Load a Hugging Face-format checkpoint folder: config.json, generation_config.json, safetensors weights.

Weights are validated against the architecture from the file headers alone (every key and shape)
before any tensor is read, then read one tensor at a time, through a small staging buffer, straight
into the requested device and dtype: peak memory stays close to the final model size (no mmap of
the whole file, no second copy).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from gguf import GGMLQuantizationType

from engine.errors import CheckpointError
from engine.gguf.config import config_from_gguf
from engine.gguf.header import byte_chunk_hint, cached_gguf, is_gguf_path, release_cached_gguf
from engine.gguf.tensors import dequantize, model_tensors, read_blocks
from engine.gguf.tokenizer import END_OF_GENERATION_TOKENS
from engine.inference import prepare_for_inference
from engine.params import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from engine.quant import SUPPORTED_TYPES as KERNEL_TYPES, RawWeight, quant_kernels_available, replace_with_quantized
from models.config import ConfigError, ModelConfig
from models.registry import config_from_hf, family_of

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)


MAX_JSON_BYTES = 256 << 20  # tokenizer.json of a 256k vocabulary is ~35 MB
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000  # as the safetensors library itself


def check_regular_file(path: Path, max_bytes: int | None = None) -> int:
    """The size of path, a regular file (symlinks followed) of at most max_bytes; checked before any read,
    so a FIFO, a device (a symlink to /dev/zero) or a huge file never blocks or fills memory."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO, device or socket"
        raise CheckpointError(f"{path}: not a regular file ({kind}); refusing to read it")
    if max_bytes is not None and info.st_size > max_bytes:
        raise CheckpointError(f"{path}: {info.st_size:,} bytes, more than the {max_bytes:,} such a file can need")
    return info.st_size


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file; errors name the file, line and column."""
    check_regular_file(path, MAX_JSON_BYTES)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_model_config(model_path: Path) -> ModelConfig:
    """The typed config of a checkpoint folder (config.json) or a GGUF file (its metadata)."""
    if is_gguf_path(model_path):
        return config_from_gguf(cached_gguf(model_path))
    path = model_path / "config.json"
    try:
        return config_from_hf(read_json(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


_ENGINE_SAMPLING = SamplingParams()  # the defaults where generation_config.json says nothing


@dataclass
class GenerationDefaults:
    """Sampling defaults and stop ids from generation_config.json (absent values: our defaults)."""

    temperature: float = _ENGINE_SAMPLING.temperature  # 0 means greedy
    top_k: int = _ENGINE_SAMPLING.top_k  # 0 disables
    top_p: float = _ENGINE_SAMPLING.top_p  # 1.0 disables
    min_p: float = _ENGINE_SAMPLING.min_p  # 0 disables
    repetition_penalty: float = _ENGINE_SAMPLING.repetition_penalty  # 1.0 disables
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    eos_token_ids: list[int] = field(default_factory=list)  # any of these ends a reply
    bos_token_id: int | None = None


def read_generation_defaults(model_dir: Path, model_json: dict[str, Any]) -> GenerationDefaults:
    """generation_config.json's values; `do_sample: false` there means greedy by default."""
    path = model_dir / "generation_config.json"
    gen = read_json(path) if path.exists() else {}
    defaults = GenerationDefaults()
    fields = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
              "repetition_penalty": float, "max_new_tokens": int}
    for key, cast in fields.items():
        if gen.get(key) is None:
            continue
        try:
            setattr(defaults, key, cast(gen[key]))
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: {key!r} must be a number, got {gen[key]!r}") from None
    if gen.get("do_sample") is False:
        defaults.temperature = 0.0
    try:
        SamplingParams(defaults.temperature, defaults.top_k, defaults.top_p, defaults.min_p,
                       defaults.repetition_penalty).validate()
        if defaults.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {defaults.max_new_tokens}")
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    eos_file, eos = (path, gen["eos_token_id"]) if "eos_token_id" in gen else (model_dir / "config.json", model_json.get("eos_token_id"))
    defaults.eos_token_ids = _token_ids(eos_file, "eos_token_id", eos)
    bos_file, bos = (path, gen["bos_token_id"]) if "bos_token_id" in gen else (model_dir / "config.json", model_json.get("bos_token_id"))
    bos_ids = _token_ids(bos_file, "bos_token_id", bos)
    defaults.bos_token_id = bos_ids[0] if bos_ids else None
    return defaults


def read_defaults(model_path: Path) -> GenerationDefaults:
    """Generation defaults of a checkpoint folder (generation_config.json) or a GGUF file, which has no
    sampling settings: ours, with its end-of-sequence, end-of-turn and end-of-message ids as stop ids, and the
    end-of-generation tokens llama.cpp stops on."""
    if not is_gguf_path(model_path):
        return read_generation_defaults(model_path, read_json(model_path / "config.json"))
    gguf_file = cached_gguf(model_path)
    stops = [gguf_file.value(f"tokenizer.ggml.{key}", int, None) for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    tokens = gguf_file.array("tokenizer.ggml.tokens", str, [])
    stops += [i for i, text in enumerate(tokens) if text in END_OF_GENERATION_TOKENS]
    return GenerationDefaults(
        eos_token_ids=list(dict.fromkeys(i for i in stops if i is not None)),
        bos_token_id=gguf_file.value("tokenizer.ggml.bos_token_id", int, None),
    )


def check_model_path(model_path: str | Path) -> Path:
    """The path of a model as given, once it names a checkpoint folder or an existing .gguf file."""
    path = Path(model_path).expanduser()
    if is_gguf_path(path):
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    elif not path.is_dir():
        raise CheckpointError(f"{path}: not a directory or a .gguf file{byte_chunk_hint(path)}")
    return path


def _token_ids(path: Path, key: str, value: Any) -> list[int]:
    """A config's token id field: an id, a list of ids, or null."""
    values = value if isinstance(value, list) else [value]
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in values):
        raise CheckpointError(f"{path}: {key!r} must be a token id or a list of token ids, got {value!r}")
    return [v for v in values if v is not None]


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded through the index."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'")
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard named in {index.name} not found")
        return files
    if single.exists():
        return [single]
    if (model_dir / "pytorch_model.bin").exists():
        raise CheckpointError(
            f"{model_dir}: only pytorch_model.bin found; chattui loads safetensors only "
            "(pickle files can run code). Convert it to model.safetensors first."
        )
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


# safetensors dtype names -> torch dtypes (the format: 8-byte little-endian header length, a JSON
# header of {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw little-endian data).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_READ_CHUNK_BYTES = 16 << 20  # staging buffer size: loading holds at most this beyond the model


@dataclass
class _TensorInfo:
    file: Path
    file_key: str  # the key as written in the file
    dtype: torch.dtype  # as stored in the file
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    """Parse and check one safetensors header: every tensor's bytes must lie inside the file, in ranges that
    do not overlap, and match its dtype and shape."""
    size = check_regular_file(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes, file has {size})")
        if header_len > MAX_SAFETENSORS_HEADER_BYTES:  # read into memory whole: a sparse 3 GB one must not be
            raise CheckpointError(
                f"{path}: corrupt safetensors file (header of {header_len:,} bytes; at most {MAX_SAFETENSORS_HEADER_BYTES:,})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({_short(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    tensors: dict[str, _TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        tensors[key] = _tensor_info(path, key, entry, data_start, size)
    spans = sorted((info.begin, info.begin + info.nbytes, key) for key, info in tensors.items())
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: corrupt safetensors header: the data of {first} and {second} overlap")
    return tensors


def _tensor_info(path: Path, key: str, entry: Any, data_start: int, size: int) -> _TensorInfo:
    where = f"{path}: corrupt safetensors header entry for {_short(key)}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: expected an object, got {_short(entry)}")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {_short(dtype)} (known: {', '.join(_SAFETENSORS_DTYPES)})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of sizes >= 0, got {_short(shape)}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {_short(offsets)}")
    torch_dtype = _SAFETENSORS_DTYPES[dtype]
    begin, end = offsets
    expected = math.prod(shape) * torch_dtype.itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: corrupt safetensors header: {key} has {end - begin} bytes, its dtype {dtype} and shape {shape} need {expected}"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: {key} needs bytes up to {data_start + end}, the file has {size}"
        )
    return _TensorInfo(path, key, torch_dtype, tuple(shape), data_start + begin, expected)


def _short(value: Any, limit: int = 80) -> str:
    """repr of a value from an untrusted file, cut to one readable piece."""
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _scan_headers(files: list[Path]) -> dict[str, _TensorInfo]:
    tensors: dict[str, _TensorInfo] = {}
    for path in files:
        tensors.update(_read_header(path))
    return tensors


def _read_tensor(f, info: _TensorInfo, device: torch.device, dtype: torch.dtype, staging: torch.Tensor) -> torch.Tensor:
    """Read one tensor into its final device and dtype through the reusable uint8 staging buffer."""
    out = torch.empty(info.shape, dtype=dtype, device=device)  # load_model lets floating-point weights only
    flat = out.view(-1)
    per_chunk = staging.numel() // info.dtype.itemsize
    f.seek(info.begin)
    for start in range(0, flat.numel(), per_chunk):
        n = min(per_chunk, flat.numel() - start)
        chunk = staging[: n * info.dtype.itemsize]
        if f.readinto(memoryview(chunk.numpy())) != chunk.numel():
            raise CheckpointError(f"{info.file}: truncated safetensors file while reading {info.file_key}")
        flat[start : start + n].copy_(chunk.view(info.dtype))  # converts dtype and moves to the device
    return out


def _normalize_keys(
    tensors: dict[str, _TensorInfo], expected: set[str], prefix: str, ignored: str
) -> dict[str, _TensorInfo]:
    """Drop non-weight keys (matching the regex `ignored`) and add the base-model prefix where a checkpoint
    was saved without it."""
    out: dict[str, _TensorInfo] = {}
    for key, info in tensors.items():
        if ignored and re.search(ignored, key):
            continue
        if key not in expected and prefix + key in expected:
            key = prefix + key
        out[key] = info
    return out


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


class _SafetensorsWeights:
    """A checkpoint folder's safetensors files as a weight source for load_model."""

    def __init__(self, model_dir: Path, expected: set[str], config: ModelConfig):
        self.where = model_dir
        family = family_of(config)
        found = _scan_headers(weight_files(model_dir))
        self.tensors = _normalize_keys(found, expected, family.checkpoint_prefix, family.ignored_keys)
        if config.tie_word_embeddings:
            self.tensors.pop("lm_head.weight", None)  # tied: the embedding is the output projection
        for key, info in self.tensors.items():
            if key in expected and not info.dtype.is_floating_point:
                raise CheckpointError(f"{info.file}: {key} is stored as {info.dtype}; model weights must be floating point")
        self.shapes = {key: info.shape for key, info in self.tensors.items()}
        self.sizes = {key: info.nbytes for key, info in self.tensors.items()}

    def origin(self, key: str) -> Path:
        return self.tensors[key].file

    def read(self, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[Path, list[str]] = {}
        for key, info in self.tensors.items():
            by_file.setdefault(info.file, []).append(key)
        staging = torch.empty(min(_READ_CHUNK_BYTES, max(self.sizes.values())), dtype=torch.uint8)
        for path, keys in by_file.items():
            with open(path, "rb") as f:
                for key in keys:
                    yield key, _read_tensor(f, self.tensors[key], device, dtype, staging)


class _GGUFWeights:
    """A GGUF file's tensors as a weight source for load_model: mapped to our keys, read one at a time,
    dequantized, or as raw blocks for the keys `keep_blocks` chose."""

    def __init__(self, path: Path, config: ModelConfig):
        self.where = path
        self.tensors = model_tensors(cached_gguf(path), config)
        self.shapes = {key: t.model_shape for key, t in self.tensors.items()}
        self.sizes = {key: t.nbytes for key, t in self.tensors.items()}
        self.kept: dict[str, GGMLQuantizationType] = {}  # keys read as (rows, bytes per row) uint8 blocks

    def origin(self, key: str) -> str:
        return f"{self.where} (tensor {self.tensors[key].gguf_name})"

    def keep_blocks(self, candidates: set[str]) -> None:
        """Read those of `candidates` (weights of Linear/Embedding layers) whose type engine.quant computes
        on as blocks instead of dequantizing them. GPT-2's transposed Conv1D weights are no candidates."""
        self.kept = {key: self.tensors[key].tensor_type for key in candidates
                     if key in self.tensors and self.tensors[key].tensor_type in KERNEL_TYPES}

    def read(self, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            file = open(self.where, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.where}: cannot read ({e.strerror or e})") from None
        with file:
            for key, tensor in self.tensors.items():
                try:
                    yield key, read_blocks(tensor, file) if key in self.kept else dequantize(tensor, file, dtype, device)
                except CheckpointError as e:
                    raise CheckpointError(f"{self.where}: {e}") from None
        release_cached_gguf()  # the weights were the last part read: the parsed header need not stay in memory


# Activations on the blocks: bfloat16 ones decode ~15% faster (SmolLM2 Q4_1) but add their rounding to the
# kernels' 8-bit one, perplexity +1.25% instead of +0.7% against the dequantized float32 model (README).
BLOCKS_COMPUTE_DTYPE = torch.float32


def keeps_gguf_blocks(model_path: Path, dtype: str, device: torch.device) -> bool:
    """Whether loading keeps a GGUF's quantized matrices in their blocks (engine.quant's layers): with
    `--dtype auto` on CPU where the kernels built (computing in BLOCKS_COMPUTE_DTYPE). An explicit
    dtype dequantizes (the exact reference path), and so do other devices (no kernels of ours there yet)."""
    if dtype != "auto" or device.type != "cpu" or not is_gguf_path(model_path):
        return False
    if not quant_kernels_available():
        log.warning("%s: no quantized-weight kernels here; dequantizing the GGUF weights (more memory, slower)",
                    model_path)
        return False
    return True


def _linear_and_embedding_weights(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)}


def _with_tied_names(model: nn.Module, blocks: dict[str, RawWeight]) -> dict[str, RawWeight]:
    """blocks under every name of their parameter too: a tied lm_head then shares the embedding's blocks."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    params = dict(model.named_parameters())
    return {alias: raw for key, raw in blocks.items() for alias in names[id(params[key])]}


def _weight_source(model_path: Path, expected: set[str], config: ModelConfig) -> _SafetensorsWeights | _GGUFWeights:
    return _GGUFWeights(model_path, config) if is_gguf_path(model_path) else _SafetensorsWeights(model_path, expected, config)


@contextmanager
def uninitialised_on_meta() -> Iterator[None]:
    """Build modules on the meta device without initialising their weights (the checkpoint replaces them
    all). nn.Embedding's init would run normal_() on meta, whose first call imports PyTorch's Python meta
    kernels: ~80 MB of resident memory for the rest of the process, more than a small model's weights."""
    initialise = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Embedding.reset_parameters = initialise


def load_model(
    model_path: Path,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressCallback | None = None,
    keep_blocks: bool = False,
) -> nn.Module:
    """The checkpoint's model ready for decoding: load_weights, then engine.inference.prepare_for_inference."""
    model = load_weights(model_path, config, device, dtype, progress, keep_blocks)
    return prepare_for_inference(model, device, dtype)


def load_weights(
    model_path: Path,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressCallback | None = None,
    keep_blocks: bool = False,
) -> nn.Module:
    """Build the model for config and fill it from a checkpoint folder's safetensors or a GGUF file,
    checking every key and shape before reading any weight.

    The model is in Hugging Face's layout (plain layers, nothing fused), in train mode with every parameter
    trainable: what fine-tuning trains, and what an adapter is applied to before prepare_for_inference.
    keep_blocks (CPU, GGUF; see keeps_gguf_blocks): Linear and Embedding weights of a type engine.quant
    has kernels for stay in their blocks as QuantizedLinear / QuantizedEmbedding layers, never dense; the
    rest (norms, F32/F16/BF16 and other types) loads in dtype, which is then the activations' dtype."""
    family = family_of(config)
    with uninitialised_on_meta():
        model = family.build(config)
    expected_params = dict(model.named_parameters())  # tied weights appear once, under their first name
    expected_shapes = {name: tuple(p.shape) for name, p in expected_params.items()}
    weights = _weight_source(Path(model_path), set(expected_shapes), config)
    missing = sorted(set(expected_shapes) - set(weights.shapes))
    unexpected = sorted(set(weights.shapes) - set(expected_shapes))
    if missing:
        raise CheckpointError(f"{weights.where}: missing weights: {_describe(missing)}")
    if unexpected:
        raise CheckpointError(f"{weights.where}: unexpected weights: {_describe(unexpected)}")
    for key, shape in weights.shapes.items():
        if shape != expected_shapes[key]:
            raise CheckpointError(
                f"{weights.origin(key)}: shape mismatch for {key}: checkpoint has {list(shape)}, "
                f"the config expects {list(expected_shapes[key])}"
            )

    kept: dict[str, GGMLQuantizationType] = {}  # keys read as GGUF blocks
    if keep_blocks and isinstance(weights, _GGUFWeights):
        weights.keep_blocks(_linear_and_embedding_weights(model))
        kept = weights.kept
    total = sum(weights.sizes.values())
    done = 0
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, RawWeight] = {}
    for key, tensor in weights.read(device, dtype):
        if key in kept:
            blocks[key] = (kept[key], tensor)
        else:
            state[key] = tensor
        done += weights.sizes[key]
        if progress:
            progress(done, total)
    model.load_state_dict(state, strict=False, assign=True)
    del state  # the model owns the tensors now; fusing (prepare_for_inference) must be free to release them
    model.tie_weights()
    if blocks:  # the layers still on `meta` become quantized layers on the blocks (biases were loaded above)
        replace_with_quantized(model, _with_tied_names(model, blocks), embedding_dtype=dtype)
    model.init_buffers()
    return model
