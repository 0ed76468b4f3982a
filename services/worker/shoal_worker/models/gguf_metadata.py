"""Typed access to GGUF files: the header scan, the tensor types, and metadata values.

`mx.load` reads GGUF tensors and metadata, but it cannot tell us a tensor's storage type, and
for some quantizations it silently dequantizes to float16. So the importer first scans the
header itself (a few milliseconds) to reject files it cannot convert faithfully, naming the
offending architecture or tensor type, before handing the file to `mx.load`.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast, final

import mlx.core as mx

GGUF_MAGIC: Final = b"GGUF"

# mlx-lm has a module for many more, but the importer maps tensor names for llama only.
SUPPORTED_ARCHITECTURES: Final = ("llama",)

# ggml_type ids (ggml.h) that `mx.load` converts faithfully: float tensors as they are, the
# 32-element block quantizations as MLX affine triples.
SUPPORTED_TENSOR_TYPES: Final[Mapping[int, str]] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    8: "Q8_0",
}

# Names for the error message when a file uses anything else.
KNOWN_TENSOR_TYPE_NAMES: Final[Mapping[int, str]] = {
    **SUPPORTED_TENSOR_TYPES,
    6: "Q5_0",
    7: "Q5_1",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}

# GGUF metadata value types (gguf.md): fixed-size scalars by struct format.
_SCALAR_FORMATS: Final[Mapping[int, str]] = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING_TYPE: Final = 8
_ARRAY_TYPE: Final = 9


class GgufImportError(ValueError):
    """The GGUF file cannot be turned into an MLX model directory (and why)."""


def tensor_type_name(ggml_type: int) -> str:
    return KNOWN_TENSOR_TYPE_NAMES.get(ggml_type, f"ggml type {ggml_type}")


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int


@final
@dataclass(frozen=True)
class GgufHeader:
    # The string-valued `general.*` metadata (architecture, name, ...): what the importer
    # checks and names a model by before it loads the file.
    general: Mapping[str, str]
    tensors: list[GgufTensorInfo]

    @property
    def architecture(self) -> str | None:
        return self.general.get("general.architecture")

    @property
    def name(self) -> str | None:
        return self.general.get("general.name")


class _HeaderReader:
    """Walks the GGUF header in a memory map, raising GgufImportError on truncation."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self._buffer = buffer
        self._path = path
        self.offset = 0

    def _unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self._buffer):
            raise GgufImportError(f"{self._path}: GGUF header is truncated (incomplete file?)")
        (value,) = struct.unpack_from(fmt, self._buffer, self.offset)
        self.offset += size
        return value

    def u32(self) -> int:
        return cast(int, self._unpack("<I"))

    def u64(self) -> int:
        return cast(int, self._unpack("<Q"))

    def skip_string(self) -> None:
        length = self.u64()
        if self.offset + length > len(self._buffer):
            raise GgufImportError(f"{self._path}: GGUF header is truncated (incomplete file?)")
        self.offset += length

    def string(self) -> str:
        start = self.offset + 8
        self.skip_string()
        return bytes(self._buffer[start : self.offset]).decode("utf-8", errors="replace")

    def skip_value(self, value_type: int) -> None:
        if value_type == _STRING_TYPE:
            self.skip_string()
        elif value_type == _ARRAY_TYPE:
            self._skip_array()
        elif value_type in _SCALAR_FORMATS:
            self.offset += struct.calcsize(_SCALAR_FORMATS[value_type])
        else:
            raise GgufImportError(f"{self._path}: unknown GGUF metadata value type {value_type}")

    def _skip_array(self) -> None:
        element_type = self.u32()
        count = self.u64()
        if element_type in _SCALAR_FORMATS:
            # Fixed-size elements: jump over the whole array at once.
            self.offset += count * struct.calcsize(_SCALAR_FORMATS[element_type])
            return
        for _ in range(count):
            self.skip_value(element_type)


def scan_header(path: Path) -> GgufHeader:
    """Read the architecture and the tensor table of a GGUF file (names, shapes, storage
    types) without the tensor data."""
    try:
        with path.open("rb") as file:
            if path.stat().st_size < len(GGUF_MAGIC) or file.read(4) != GGUF_MAGIC:
                raise GgufImportError(f"{path}: not a GGUF file (missing 'GGUF' magic bytes)")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _scan_header(_HeaderReader(buffer, path))
    except OSError as error:
        raise GgufImportError(f"{path}: cannot read GGUF file: {error}") from error


def _scan_header(reader: _HeaderReader) -> GgufHeader:
    reader.offset = len(GGUF_MAGIC)
    version = reader.u32()
    if version not in (2, 3):
        raise GgufImportError(f"unsupported GGUF version {version} (expected 2 or 3)")
    tensor_count = reader.u64()
    metadata_count = reader.u64()
    general: dict[str, str] = {}
    for _ in range(metadata_count):
        key = reader.string()
        value_type = reader.u32()
        if key.startswith("general.") and value_type == _STRING_TYPE:
            general[key] = reader.string()
        else:
            reader.skip_value(value_type)
    return GgufHeader(general=general, tensors=_scan_tensor_table(reader, tensor_count))


def _scan_tensor_table(reader: _HeaderReader, tensor_count: int) -> list[GgufTensorInfo]:
    infos: list[GgufTensorInfo] = []
    for _ in range(tensor_count):
        name = reader.string()
        dimension_count = reader.u32()
        shape = tuple(reader.u64() for _ in range(dimension_count))
        ggml_type = reader.u32()
        reader.u64()  # data offset: mx.load checks that the data is really there
        infos.append(GgufTensorInfo(name=name, shape=shape, ggml_type=ggml_type))
    return infos


def reject_unsupported_architecture(path: Path, header: GgufHeader) -> None:
    if header.architecture is None:
        raise GgufImportError(f"{path}: GGUF metadata lacks 'general.architecture'")
    if header.architecture not in SUPPORTED_ARCHITECTURES:
        raise GgufImportError(
            f"{path}: unsupported model architecture '{header.architecture}' "
            f"(only {', '.join(repr(name) for name in SUPPORTED_ARCHITECTURES)} is supported)"
        )


def reject_unsupported_tensor_types(path: Path, infos: list[GgufTensorInfo]) -> None:
    unsupported = [info for info in infos if info.ggml_type not in SUPPORTED_TENSOR_TYPES]
    if not unsupported:
        return
    type_names = sorted({tensor_type_name(info.ggml_type) for info in unsupported})
    supported = ", ".join(SUPPORTED_TENSOR_TYPES.values())
    raise GgufImportError(
        f"{path}: unsupported GGUF tensor type {', '.join(type_names)} "
        f"(first: tensor '{unsupported[0].name}'); supported types are {supported}"
    )


class GgufMetadata:
    """Typed getters over the metadata dictionary that `mx.load(..., return_metadata=True)`
    returns: numbers arrive as 0-d mx.arrays, strings as str, string arrays as list[str],
    number arrays as 1-d mx.arrays."""

    def __init__(self, values: Mapping[str, object], source: Path) -> None:
        self._values = values
        self._source = source

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def _require(self, key: str) -> object:
        if key not in self._values:
            raise GgufImportError(f"{self._source}: GGUF metadata lacks '{key}'")
        return self._values[key]

    def _wrong_type(self, key: str, expected: str) -> GgufImportError:
        actual = type(self._values[key]).__name__
        return GgufImportError(f"{self._source}: GGUF metadata '{key}' is {actual}, not {expected}")

    def string(self, key: str) -> str:
        value = self._require(key)
        if not isinstance(value, str):
            raise self._wrong_type(key, "a string")
        return value

    def optional_string(self, key: str) -> str | None:
        return self.string(key) if key in self._values else None

    def string_list(self, key: str) -> list[str]:
        value = self._require(key)
        if not isinstance(value, list):
            raise self._wrong_type(key, "a list of strings")
        items = cast(list[object], value)
        if not all(isinstance(item, str) for item in items):
            raise self._wrong_type(key, "a list of strings")
        return cast(list[str], items)

    def _scalar(self, key: str) -> int | float | bool:
        value = self._require(key)
        if not isinstance(value, mx.array) or value.ndim != 0:
            raise self._wrong_type(key, "a number")
        return cast(int | float | bool, value.item())

    def integer(self, key: str) -> int:
        return int(self._scalar(key))

    def optional_integer(self, key: str) -> int | None:
        return self.integer(key) if key in self._values else None

    def number(self, key: str) -> float:
        value = self._require(key)
        number = float(self._scalar(key))
        if isinstance(value, mx.array) and value.dtype == mx.float32:
            return _shortest_float32_repr(number)
        return number

    def optional_number(self, key: str) -> float | None:
        return self.number(key) if key in self._values else None

    def optional_boolean(self, key: str) -> bool | None:
        return bool(self._scalar(key)) if key in self._values else None

    def integer_list(self, key: str) -> list[int]:
        value = self._require(key)
        if not isinstance(value, mx.array) or value.ndim != 1:
            raise self._wrong_type(key, "an array of integers")
        return [int(item) for item in cast(list[int], value.tolist())]


def _shortest_float32_repr(value: float) -> float:
    """The shortest decimal that rounds to the same float32, so that config.json says
    1e-05 rather than 9.999999747378752e-06 for a float32 metadata value."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value
