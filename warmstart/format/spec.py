"""Constants of the warmstart checkpoint format, version 1 (normative text: docs/format.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np

FORMAT_NAME = "warmstart"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"

ALIGNMENT = 4096
"""Every tensor starts at a multiple of this many bytes from the start of its partition."""

DEFAULT_PARTITION_SIZE = 512 * 1024**2
"""A partition closes before a tensor that would make it larger (a bigger tensor gets one of its own)."""

MIN_PARTITION_SIZE = ALIGNMENT
DEFAULT_CHUNK_SIZE = 16 * 1024**2
"""Checksums cover fixed-size chunks of each partition (the last one may be shorter)."""

MIN_CHUNK_SIZE = ALIGNMENT
MAX_CHUNK_SIZE = 1024**3
HASH_ALGORITHM = "xxh3_64"

# Limits (a reader MUST reject a checkpoint beyond any of them).
MAX_INDEX_BYTES = 64 * 1024**2
MAX_TENSORS = 1_000_000
MAX_PARTITIONS = 100_000
MAX_FILES = 1_000
MAX_NAME_LENGTH = 512
MAX_FILE_NAME_LENGTH = 128
MAX_RANK = 16
MAX_PARTITION_BYTES = 1 << 50
MAX_JSON_DEPTH = 64  # nesting of arrays/objects in index.json

TENSOR_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/\-\[\]]*$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
PARTITION_FILE_FORMAT = "data-{:05d}.bin"


@dataclass(frozen=True)
class DType:
    """A framework-neutral dtype name and its numpy representation."""

    name: str
    numpy: np.dtype
    itemsize: int


def _d(name: str, dt: object) -> DType:
    npd = np.dtype(dt)  # type: ignore[call-overload]
    return DType(name, npd, npd.itemsize)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        _d("float64", np.float64),
        _d("float32", np.float32),
        _d("float16", np.float16),
        _d("bfloat16", ml_dtypes.bfloat16),
        _d("float8_e4m3fn", ml_dtypes.float8_e4m3fn),
        _d("float8_e5m2", ml_dtypes.float8_e5m2),
        _d("int64", np.int64),
        _d("int32", np.int32),
        _d("int16", np.int16),
        _d("int8", np.int8),
        _d("uint64", np.uint64),
        _d("uint32", np.uint32),
        _d("uint16", np.uint16),
        _d("uint8", np.uint8),
        _d("bool", np.bool_),
    )
}

_BY_NUMPY: dict[np.dtype, str] = {d.numpy: d.name for d in DTYPES.values()}


def dtype_name_of_numpy(dt: np.dtype) -> str | None:
    """The format's name for a numpy dtype (native byte order), or None if it has none."""
    if dt.byteorder == ">":
        return None
    return _BY_NUMPY.get(np.dtype(dt).newbyteorder("="))


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """Round ``n`` up to a multiple of ``alignment`` (a power of two)."""
    return (n + alignment - 1) & ~(alignment - 1)


def is_safe_file_name(name: object) -> bool:
    """True when ``name`` is a plain file name that cannot leave the checkpoint directory."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_FILE_NAME_LENGTH
        and ".." not in name
        and FILE_NAME_RE.match(name) is not None
        and name != INDEX_FILE
    )


def is_valid_tensor_name(name: object) -> bool:
    """True when ``name`` obeys the tensor-name rules of the specification."""
    return (
        isinstance(name, str) and 0 < len(name) <= MAX_NAME_LENGTH and TENSOR_NAME_RE.match(name) is not None
    )
