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
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from engine.errors import CheckpointError
from engine.inference import prepare_for_inference
from engine.sampling import SamplingParams
from models import IGNORED_CHECKPOINT_KEYS, ModelConfig, build_model, checkpoint_prefix, config_from_hf
from models.config import ConfigError

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


def read_model_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    try:
        return config_from_hf(read_json(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


@dataclass
class GenerationDefaults:
    """Sampling defaults and stop ids from generation_config.json (absent values: our defaults)."""

    temperature: float = 0.7  # 0 means greedy
    top_k: int = 50  # 0 disables
    top_p: float = 0.9  # 1.0 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1.0 disables
    max_new_tokens: int = 512
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


def _normalize_keys(tensors: dict[str, _TensorInfo], expected: set[str], prefix: str) -> dict[str, _TensorInfo]:
    """Drop non-weight keys and add the base-model prefix where a checkpoint was saved without it."""
    out: dict[str, _TensorInfo] = {}
    for key, info in tensors.items():
        if IGNORED_CHECKPOINT_KEYS.search(key):
            continue
        if key not in expected and prefix + key in expected:
            key = prefix + key
        out[key] = info
    return out


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def load_model(
    model_dir: Path,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressCallback | None = None,
) -> nn.Module:
    """Build the model for config and fill it from the folder's safetensors, checking every key and shape."""
    with torch.device("meta"):
        model = build_model(config)
    expected_params = dict(model.named_parameters())  # tied weights appear once, under their first name
    expected_shapes = {name: tuple(p.shape) for name, p in expected_params.items()}
    tensors = _normalize_keys(_scan_headers(weight_files(model_dir)), set(expected_shapes), checkpoint_prefix(config))
    if getattr(config, "tie_word_embeddings", True):
        tensors.pop("lm_head.weight", None)  # tied: the embedding is the output projection
    missing = sorted(set(expected_shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected_shapes))
    if missing:
        raise CheckpointError(f"{model_dir}: missing weights: {_describe(missing)}")
    if unexpected:
        raise CheckpointError(f"{model_dir}: unexpected weights: {_describe(unexpected)}")
    for key, info in tensors.items():
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: {key} is stored as {info.dtype}; model weights must be floating point")
        if info.shape != expected_shapes[key]:
            raise CheckpointError(
                f"{info.file}: shape mismatch for {key}: checkpoint has {list(info.shape)}, "
                f"the config expects {list(expected_shapes[key])}"
            )

    total = sum(info.nbytes for info in tensors.values())
    done = 0
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key, info in tensors.items():
        by_file.setdefault(info.file, []).append(key)
    staging = torch.empty(min(_READ_CHUNK_BYTES, max(i.nbytes for i in tensors.values())), dtype=torch.uint8)
    for path, keys in by_file.items():
        with open(path, "rb") as f:
            for key in keys:
                state[key] = _read_tensor(f, tensors[key], device, dtype, staging)
                done += tensors[key].nbytes
                if progress:
                    progress(done, total)
    model.load_state_dict(state, strict=False, assign=True)
    del state  # the model owns the tensors now; fusing below must be free to release the originals
    model.tie_weights()
    model.init_buffers()
    return prepare_for_inference(model, device, dtype)
