"""Open a GGUF file and read its header.

Our own reader of the format (the `gguf` package's GGUFReader keeps a numpy array per item of every
metadata array: ~170 MB and seconds for a 49k-token vocabulary, 20 s for Gemma's 262k): values are
plain Python values, strings kept as bytes until asked for, tensor data memory-mapped and never read
here, so a header summary of a multi-gigabyte file costs milliseconds. Every read is checked against
the file's end. This module does not import torch; the model picker and `chattui models` use it.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

from engine.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
# "model.gguf.part00": one of the byte chunks a large file was cut into to fit a size limit (split -d, or
# packages that ship a model in parts); unlike llama-gguf-split's parts, only the joined file is GGUF.
_BYTE_CHUNK = re.compile(r"(.+)\.part\d+")
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt2", "gemma3")

_INTEGER_TYPES = {
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
# What a metadata value must be stored as, by the kind callers ask for (ints are fine where floats are).
_KINDS = {
    int: (_INTEGER_TYPES, "an integer"),
    float: (_INTEGER_TYPES | _FLOAT_TYPES, "a number"),
    bool: ({GGUFValueType.BOOL}, "a boolean"),
    str: ({GGUFValueType.STRING}, "a string"),
}
_REQUIRED = object()


class _TruncationError(Exception):
    def __init__(self, begin: int, end: int):
        self.begin, self.end = begin, end


_SCALARS = {  # struct formats, little-endian
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}
_ARRAY_DTYPES = {  # numeric array items, read in one go
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.FLOAT64: "<f8", GGUFValueType.BOOL: "?",
}
# Tensor data as numpy reads it, as GGUFReader gives it: these types as their values, others as raw bytes.
_VALUE_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                 GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                 GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class GGUFField:
    """One metadata value: its types ([type], or [ARRAY, item type]; an empty array records no item
    type) and its value, strings as bytes (decoded by contents(), so a bad string fails where it is read)."""

    types: list[GGUFValueType]
    raw: Any

    def contents(self) -> Any:
        """The value as Python: str, int, float, bool, or a list of them; UnicodeDecodeError for bad text."""
        return _decoded(self.raw)


def _decoded(raw: Any) -> Any:
    if isinstance(raw, bytes):
        return raw.decode("utf-8")
    if isinstance(raw, list):
        return [_decoded(v) for v in raw] if raw and isinstance(raw[0], (bytes, list)) else raw
    return raw


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's description; `data` is its memory-mapped bytes (or values), never read here."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    n_elements: int
    n_bytes: int
    data_offset: int  # from the file's start
    data: np.ndarray  # numpy order (shape reversed); raw bytes (rows, bytes per row) for block types


class _Cursor:
    """Little-endian reads from the mapped file, each checked against its end."""

    def __init__(self, data: np.ndarray, offset: int = 0):
        self.data, self.offset, self.size = data, offset, data.size

    def _need(self, n: int) -> int:
        begin = self.offset
        if begin + n > self.size:
            raise _TruncationError(begin, begin + n)
        self.offset += n
        return begin

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.data, self._need(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        n = self.scalar("<Q")
        begin = self._need(n)
        return self.data[begin : begin + n].tobytes()

    def value(self, kind: GGUFValueType) -> tuple[list[GGUFValueType], Any]:
        if kind == GGUFValueType.STRING:
            return [kind], self.string()
        if kind in _SCALARS:
            return [kind], self.scalar(_SCALARS[kind])
        if kind != GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata value type {int(kind)}")
        item = GGUFValueType(self.scalar("<I"))
        count = self.scalar("<Q")
        if count == 0:
            return [kind], []  # as llama.cpp's reader: no item type recorded
        if item in _ARRAY_DTYPES:
            dtype = np.dtype(_ARRAY_DTYPES[item])
            begin = self._need(count * dtype.itemsize)
            return [kind, item], np.frombuffer(self.data, dtype, count, begin).tolist()
        if item == GGUFValueType.STRING:
            return [kind, item], [self.string() for _ in range(count)]
        items = [self.value(item) for _ in range(count)]  # arrays of arrays
        return [kind, *items[0][0]], [v for _, v in items]


def _read_header(path: Path) -> tuple[dict[str, GGUFField], list[GGUFTensorInfo]]:
    """The metadata and tensor descriptions of a GGUF file whose magic and version were checked.
    _TruncationError where a read passes the end; ValueError for other malformed contents."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(data, 8)
    n_tensors, n_fields = cursor.scalar("<Q"), cursor.scalar("<Q")
    fields: dict[str, GGUFField] = {}
    for _ in range(n_fields):
        key = cursor.string().decode("utf-8")
        types, raw = cursor.value(GGUFValueType(cursor.scalar("<I")))
        if key in fields:
            raise ValueError(f"metadata key {key!r} appears twice")
        fields[key] = GGUFField(types, raw)
    infos = []
    for _ in range(n_tensors):
        name = cursor.string().decode("utf-8")
        shape = tuple(cursor.scalar("<Q") for _ in range(cursor.scalar("<I")))
        infos.append((name, shape, GGMLQuantizationType(cursor.scalar("<I")), cursor.scalar("<Q")))
    alignment = fields.get("general.alignment")
    alignment = alignment.raw if alignment is not None and alignment.types == [GGUFValueType.UINT32] else 32
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment} is not a power of two")
    start = -(-cursor.offset // alignment) * alignment
    tensors, names = [], set()
    for name, shape, kind, offset in infos:
        if name in names:
            raise ValueError(f"tensor {name!r} appears twice")
        names.add(name)
        n_elements = math.prod(shape)  # Python ints: a corrupt size cannot overflow, the bounds check refuses it
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if shape and shape[0] % block:
            raise ValueError(f"tensor {name!r}: {shape[0]} values per row is not a whole number of {kind.name} blocks")
        n_bytes = n_elements // block * block_bytes
        begin = start + offset
        _Cursor(data, begin)._need(n_bytes)
        numpy_shape = tuple(reversed(shape))
        if kind in _VALUE_DTYPES:
            array = np.frombuffer(data, _VALUE_DTYPES[kind], n_elements, begin).reshape(numpy_shape)
        else:
            array = data[begin : begin + n_bytes].reshape(*numpy_shape[:-1], shape[0] // block * block_bytes)
        tensors.append(GGUFTensorInfo(name, kind, shape, n_elements, n_bytes, begin, array))
    return fields, tensors


class GGUFFile:
    """An open GGUF file: typed access to its metadata and its tensor descriptions (data mapped, not read)."""

    def __init__(self, path: Path, fields: dict[str, GGUFField], tensors: list[GGUFTensorInfo]):
        self.path = path
        self.fields = fields
        self.tensors = tensors
        self.architecture: str = self.value("general.architecture", str)

    def has(self, key: str) -> bool:
        return key in self.fields

    def _field(self, key: str, default: Any):
        """The key's field, or None when it is absent and has a default."""
        field = self.fields.get(key)
        if field is None and default is _REQUIRED:
            raise CheckpointError(f"{self.path}: missing required metadata key {key!r}")
        return field

    def _contents(self, key: str, field) -> Any:
        try:
            return field.contents()
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: metadata key {key!r} holds text that is not valid UTF-8") from None

    def value(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
        """A scalar metadata value of the kind int, float, bool or str; CheckpointError names the key otherwise."""
        field = self._field(key, default)
        if field is None:
            return default
        allowed, described = _KINDS[kind]
        if len(field.types) != 1 or field.types[0] not in allowed:
            raise CheckpointError(f"{self.path}: metadata key {key!r} must be {described}, found {_type_name(field)}")
        return kind(self._contents(key, field))

    def array(self, key: str, kind: type, default: Any = _REQUIRED) -> list:
        """An array metadata value whose items are of the kind int, float, bool or str."""
        field = self._field(key, default)
        if field is None:
            return default
        allowed, described = _KINDS[kind]
        is_array = field.types[0] == GGUFValueType.ARRAY
        # An empty array has no item type recorded; it is valid for any kind.
        if not is_array or (len(field.types) > 1 and (len(field.types) != 2 or field.types[1] not in allowed)):
            raise CheckpointError(
                f"{self.path}: metadata key {key!r} must be an array of {described.split(' ', 1)[1]}s, "
                f"found {_type_name(field)}"
            )
        contents = self._contents(key, field)
        return contents if kind is str else [kind(v) for v in contents]

    def arch_value(self, suffix: str, kind: type, default: Any = _REQUIRED) -> Any:
        """`{architecture}.{suffix}`, e.g. arch_value("block_count", int) reads llama.block_count."""
        return self.value(f"{self.architecture}.{suffix}", kind, default)


def _type_name(field: Any) -> str:
    names = [t.name.lower() for t in field.types]
    return names[0] if len(names) == 1 else f"an array of {names[-1]}" if len(names) > 1 else "an empty array"


def byte_chunk_hint(path: Path) -> str:
    """What to do when a model path names a byte chunk of a file ("" for other names), for error messages."""
    m = _BYTE_CHUNK.fullmatch(path.name)
    if m is None:
        return ""
    whole = m.group(1)
    return (f"; it looks like one chunk of a file cut into parts: join them in order first, "
            f"e.g. cat {whole}.part* > {whole}")


def is_gguf_path(path: str | Path) -> bool:
    """Whether a model path names a GGUF file: by its suffix (the file may not exist yet), or a regular
    file that starts with GGUF's magic (Ollama's blobs have no suffix). FIFOs and devices are never opened."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".gguf":
        return True
    try:
        if not path.is_file():
            return False
        with path.open("rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf(path: str | Path) -> GGUFFile:
    """Open and check a GGUF header; every problem is a one-line CheckpointError naming the file."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if head[:4] != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 8:
        raise CheckpointError(f"{path}: truncated GGUF file ({size} bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version not in READER_SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
        supported = ", ".join(str(v) for v in READER_SUPPORTED_VERSIONS)
        raise CheckpointError(f"{path}: unsupported GGUF version {version} (supported: {supported})")
    try:
        fields, tensors = _read_header(path)
    except _TruncationError as e:
        raise CheckpointError(
            f"{path}: truncated GGUF file (needs bytes up to {e.end}, the file has {size}){byte_chunk_hint(path)}"
        ) from None
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        # unknown value or tensor types, bad names, counts too large for memory
        raise CheckpointError(f"{path}: corrupt GGUF file ({_one_line(e)})") from None
    return GGUFFile(path, fields, tensors)


def cached_gguf(path: str | Path) -> GGUFFile:
    """open_gguf, parsed once while the file is unchanged: loading takes the config, the tokenizer and the
    weights from one parse (parsing a large vocabulary takes seconds)."""
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    return _open_unchanged(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_unchanged(path: Path, mtime_ns: int, size: int) -> GGUFFile:
    return open_gguf(path)


def release_cached_gguf() -> None:
    """Drop the parsed headers cached_gguf keeps (and their memory maps), e.g. once a model is loaded."""
    _open_unchanged.cache_clear()


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


@dataclass
class GGUFSummary:
    """What the model picker shows for a GGUF file, from its header alone."""

    path: Path
    architecture: str  # general.architecture, e.g. "llama"
    name: str  # general.name, or the file name without .gguf
    parameters: int  # sum of every tensor's element count
    weight_type: str  # the file type llama.cpp names it by ("Q4_K_M"), else the most common tensor type
    size_bytes: int  # the file's size on disk
    context_length: int | None  # {arch}.context_length, when the file says

    @property
    def supported(self) -> bool:
        """Whether chattui can build this architecture (other checks happen at load)."""
        return self.architecture in SUPPORTED_GGUF_ARCHITECTURES


def weight_type_name(gguf_file: GGUFFile) -> str:
    """general.file_type as llama.cpp calls it (MOSTLY_Q4_K_M -> "Q4_K_M"); without it, or for an unknown
    value, the tensor type holding the most elements."""
    file_type = gguf_file.value("general.file_type", int, None)
    if file_type is not None and file_type in LlamaFileType._value2member_map_ and file_type != LlamaFileType.GUESSED:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    elements: Counter[str] = Counter()
    for tensor in gguf_file.tensors:
        elements[tensor.tensor_type.name] += int(tensor.n_elements)
    return elements.most_common(1)[0][0] if elements else "none"


def summarize_gguf(path: str | Path) -> GGUFSummary:
    """The header summary of a GGUF file; raises CheckpointError (one line: file and problem) for a bad file."""
    gguf_file = open_gguf(path)
    name = gguf_file.value("general.name", str, "").strip() or gguf_file.path.name.removesuffix(".gguf")
    return GGUFSummary(
        path=gguf_file.path,
        architecture=gguf_file.architecture,
        name=name,
        parameters=sum(int(t.n_elements) for t in gguf_file.tensors),
        weight_type=weight_type_name(gguf_file),
        size_bytes=gguf_file.path.stat().st_size,
        context_length=gguf_file.arch_value("context_length", int, None),
    )
