"""The checkpoint index (``index.json``): plain dataclasses, a strict parser and a deterministic writer."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from warmstart.errors import (
    DuplicateKey,
    DuplicateTensorName,
    IndexTooDeep,
    IndexTooLarge,
    InvalidShape,
    InvalidTensorName,
    LimitExceeded,
    MalformedIndex,
    MisalignedOffset,
    NonFiniteNumber,
    OffsetOutOfRange,
    OverlappingTensors,
    SizeMismatch,
    UnknownDtype,
    UnsafeFileName,
    UnsupportedVersion,
)
from warmstart.format import spec


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: ``nbytes`` bytes at ``offset`` of partition number ``partition``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    partition: int
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class PartitionInfo:
    """One data file: its name, exact size and the xxh3-64 of each ``chunk_size`` chunk (hex)."""

    file: str
    size: int
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class FileInfo:
    """A model file stored beside the data (config, tokenizer, ...), with its size and xxh3-64."""

    name: str
    size: int
    xxh3: str


@dataclass(frozen=True)
class Index:
    """The parsed, validated contents of ``index.json``."""

    partitions: tuple[PartitionInfo, ...]
    tensors: tuple[TensorInfo, ...]
    files: tuple[FileInfo, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    alignment: int = spec.ALIGNMENT
    chunk_size: int = spec.DEFAULT_CHUNK_SIZE
    format_version: int = spec.FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        """Bytes of all partitions together."""
        return sum(p.size for p in self.partitions)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def tensor_map(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def chunk_range(self, partition: int, chunk: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of a checksum chunk of a partition."""
        size = self.partitions[partition].size
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, size)

    # -- serialization -----------------------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": spec.FORMAT_NAME,
            "format_version": self.format_version,
            "alignment": self.alignment,
            "chunk_size": self.chunk_size,
            "hash": spec.HASH_ALGORITHM,
            "partitions": [
                {"file": p.file, "size": p.size, "chunks": list(p.chunks)} for p in self.partitions
            ],
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "partition": t.partition,
                    "offset": t.offset,
                    "nbytes": t.nbytes,
                }
                for t in self.tensors
            ],
            "files": [{"name": f.name, "size": f.size, "xxh3": f.xxh3} for f in self.files],
            "metadata": dict(self.metadata),
        }

    def to_json_bytes(self) -> bytes:
        """Deterministic UTF-8 JSON (fixed key order, one tensor per line)."""
        d = self.to_json_dict()
        head = {k: v for k, v in d.items() if k not in ("partitions", "tensors", "files", "metadata")}
        lines = ["{"]
        for k, v in head.items():
            lines.append(f"  {json.dumps(k)}: {json.dumps(v)},")
        for key in ("partitions", "tensors", "files"):
            items = d[key]
            if not items:
                lines.append(f"  {json.dumps(key)}: [],")
                continue
            lines.append(f"  {json.dumps(key)}: [")
            body = [f"    {json.dumps(item, separators=(', ', ': '))}" for item in items]
            lines.append(",\n".join(body))
            lines.append("  ],")
        meta = json.dumps(d["metadata"], sort_keys=True, indent=2, ensure_ascii=False).replace("\n", "\n  ")
        lines.append(f'  "metadata": {meta}')
        lines.append("}")
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def from_json_bytes(cls, data: bytes) -> Index:
        """Parse and fully validate an index. Raises a :class:`CorruptCheckpoint` subclass on any defect."""
        if len(data) > spec.MAX_INDEX_BYTES:
            raise IndexTooLarge(
                f"index.json is {len(data)} bytes, over the format's limit of {spec.MAX_INDEX_BYTES}; "
                "this is not a checkpoint this reader will trust (re-convert the model)"
            )
        try:
            raw = strict_json_loads(data.decode("utf-8"), max_depth=spec.MAX_JSON_DEPTH)
        except JSONDefect as e:
            if e.kind == "syntax":
                raise MalformedIndex(
                    f"index.json is not valid UTF-8 JSON ({e.__cause__}); re-convert the checkpoint"
                ) from e
            defect = {"duplicate": DuplicateKey, "non-finite": NonFiniteNumber}.get(e.kind, IndexTooDeep)
            raise defect(
                f"index.json {e}; no warmstart writer produces this: re-convert the checkpoint"
            ) from e
        except UnicodeDecodeError as e:
            raise MalformedIndex(
                f"index.json is not valid UTF-8 JSON ({e}); re-convert the checkpoint"
            ) from e
        return parse_index(raw)


# --- strict JSON -----------------------------------------------------------------------------------------


class JSONDefect(ValueError):
    """What :func:`strict_json_loads` refused; ``kind`` is ``syntax``, ``duplicate``, ``non-finite`` or ``depth``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # then find the first key seen twice
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise JSONDefect("duplicate", f"has the key {k[:100]!r} twice in one object")
            seen.add(k)
    return out


def _no_constant(name: str) -> Any:
    raise JSONDefect("non-finite", f"holds {name}, which is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONDefect("non-finite", f"holds the number {text[:40]}, too large for a float")
    return value


def strict_json_loads(text: str | bytes, *, max_depth: int) -> Any:
    """``json.loads`` that refuses what parsers disagree on or cannot represent.

    Raises :class:`JSONDefect` for invalid JSON (``syntax``), a key repeated in one object (``duplicate``),
    ``NaN``/``Infinity`` or a float overflowing to infinity (``non-finite``), and objects/arrays nested more
    than ``max_depth`` levels (``depth``; ``json.loads`` itself would raise ``RecursionError`` at some
    depth that depends on the caller's stack).
    """
    try:
        value = json.loads(
            text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant, parse_float=_finite_float
        )
    except RecursionError:
        raise JSONDefect("depth", f"nests arrays/objects more than {max_depth} levels deep") from None
    except json.JSONDecodeError as e:
        raise JSONDefect("syntax", f"is not valid JSON ({e})") from e
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        v, depth = stack.pop()
        if depth > max_depth:
            raise JSONDefect("depth", f"nests arrays/objects more than {max_depth} levels deep")
        for c in v.values() if isinstance(v, dict) else v:
            if isinstance(c, (dict, list)):
                stack.append((c, depth + 1))
    return value


# --- parsing ---------------------------------------------------------------------------------------------

_TOP_KEYS = {"format", "format_version", "alignment", "chunk_size", "hash", "partitions", "tensors"}
_OPTIONAL_TOP_KEYS = {"files", "metadata"}
_TENSOR_KEYS = {"name", "dtype", "shape", "partition", "offset", "nbytes"}
_PARTITION_KEYS = {"file", "size", "chunks"}
_FILE_KEYS = {"name", "size", "xxh3"}


def _int(v: object, what: str, *, minimum: int = 0, maximum: int = 1 << 62) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise MalformedIndex(f"{what} must be an integer, got {type(v).__name__}")
    if not minimum <= v <= maximum:
        raise MalformedIndex(f"{what} = {v} is outside [{minimum}, {maximum}]")
    return v


def _obj(v: object, what: str, required: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    if not isinstance(v, dict):
        raise MalformedIndex(f"{what} must be a JSON object")
    missing = required - v.keys()
    if missing:
        raise MalformedIndex(f"{what} lacks the field(s) {sorted(missing)}")
    unknown = v.keys() - required - optional
    if unknown:
        raise MalformedIndex(f"{what} has unknown field(s) {sorted(unknown)}")
    return v


def _hex64(v: object, what: str) -> str:
    if not (isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v)):
        raise MalformedIndex(f"{what} must be 16 lowercase hex digits (xxh3-64)")
    return v


def _file_name(name: object, what: str, seen: set[str]) -> str:
    """A partition or model file name: plain (cannot leave the checkpoint) and not listed before."""
    if not spec.is_safe_file_name(name):
        raise UnsafeFileName(
            f"{what} {name!r} is not a plain file name (letters, digits, '_', '.', '-'; no '/', no '..'); "
            "refusing a checkpoint that could read outside its directory"
        )
    assert isinstance(name, str)  # is_safe_file_name checked it
    if name in seen:
        raise MalformedIndex(f"file {name!r} is listed twice in index.json")
    seen.add(name)
    return name


def parse_index(raw: object) -> Index:
    """Validate a decoded ``index.json`` object against the specification and build an :class:`Index`."""
    top = _obj(raw, "index.json", _TOP_KEYS, _OPTIONAL_TOP_KEYS)
    if top["format"] != spec.FORMAT_NAME:
        raise MalformedIndex(f"index.json names format {top['format']!r}, not {spec.FORMAT_NAME!r}")
    version = top["format_version"]
    if version != spec.FORMAT_VERSION or isinstance(version, bool):
        raise UnsupportedVersion(
            f"checkpoint format version {version!r} is not supported by this reader (it reads version "
            f"{spec.FORMAT_VERSION}); upgrade warmstart or re-convert the model with this version"
        )
    if top["hash"] != spec.HASH_ALGORITHM:
        raise MalformedIndex(f"unknown checksum algorithm {top['hash']!r}; expected {spec.HASH_ALGORITHM!r}")
    alignment = _int(top["alignment"], "alignment", minimum=spec.ALIGNMENT, maximum=1 << 30)
    if alignment & (alignment - 1) or alignment % spec.ALIGNMENT:
        raise MalformedIndex(
            f"alignment {alignment} must be a power of two and a multiple of {spec.ALIGNMENT}"
        )
    chunk_size = _int(
        top["chunk_size"], "chunk_size", minimum=spec.MIN_CHUNK_SIZE, maximum=spec.MAX_CHUNK_SIZE
    )
    if chunk_size % spec.ALIGNMENT:
        raise MalformedIndex(f"chunk_size {chunk_size} must be a multiple of {spec.ALIGNMENT}")

    raw_parts = top["partitions"]
    if not isinstance(raw_parts, list):
        raise MalformedIndex("partitions must be a list")
    if len(raw_parts) > spec.MAX_PARTITIONS:
        raise LimitExceeded(f"{len(raw_parts)} partitions exceed the limit of {spec.MAX_PARTITIONS}")
    partitions: list[PartitionInfo] = []
    seen_files: set[str] = set()
    for i, rp in enumerate(raw_parts):
        p = _obj(rp, f"partitions[{i}]", _PARTITION_KEYS)
        name = _file_name(p["file"], f"partitions[{i}].file", seen_files)
        size = _int(p["size"], f"partitions[{i}].size", maximum=spec.MAX_PARTITION_BYTES)
        chunks = p["chunks"]
        if not isinstance(chunks, list):
            raise MalformedIndex(f"partitions[{i}].chunks must be a list")
        expected = -(-size // chunk_size)
        if len(chunks) != expected:
            raise MalformedIndex(
                f"partitions[{i}] has {len(chunks)} chunk checksums, but {size} bytes in chunks of "
                f"{chunk_size} need {expected}"
            )
        partitions.append(
            PartitionInfo(
                name, size, tuple(_hex64(c, f"partitions[{i}].chunks[{j}]") for j, c in enumerate(chunks))
            )
        )

    raw_files = top.get("files", [])
    if not isinstance(raw_files, list):
        raise MalformedIndex("files must be a list")
    if len(raw_files) > spec.MAX_FILES:
        raise LimitExceeded(f"{len(raw_files)} model files exceed the limit of {spec.MAX_FILES}")
    files: list[FileInfo] = []
    for i, rf in enumerate(raw_files):
        f = _obj(rf, f"files[{i}]", _FILE_KEYS)
        name = _file_name(f["name"], f"files[{i}].name", seen_files)
        files.append(
            FileInfo(name, _int(f["size"], f"files[{i}].size"), _hex64(f["xxh3"], f"files[{i}].xxh3"))
        )

    raw_tensors = top["tensors"]
    if not isinstance(raw_tensors, list):
        raise MalformedIndex("tensors must be a list")
    if len(raw_tensors) > spec.MAX_TENSORS:
        raise LimitExceeded(f"{len(raw_tensors)} tensors exceed the limit of {spec.MAX_TENSORS}")
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for i, rt in enumerate(raw_tensors):
        tensors.append(_parse_tensor(rt, i, partitions, alignment, names))
    _check_overlaps(tensors, partitions)

    metadata = top.get("metadata", {})
    if not isinstance(metadata, dict):
        raise MalformedIndex("metadata must be a JSON object")
    return Index(
        partitions=tuple(partitions),
        tensors=tuple(tensors),
        files=tuple(files),
        metadata=metadata,
        alignment=alignment,
        chunk_size=chunk_size,
        format_version=version,
    )


def _parse_tensor(
    rt: object, i: int, partitions: list[PartitionInfo], alignment: int, names: set[str]
) -> TensorInfo:
    t = _obj(rt, f"tensors[{i}]", _TENSOR_KEYS)
    name = t["name"]
    if not spec.is_valid_tensor_name(name):
        raise InvalidTensorName(
            f"tensors[{i}].name {str(name)[:80]!r} is not a valid tensor name: 1-{spec.MAX_NAME_LENGTH} "
            "characters from letters, digits and _ . : / - [ ], not starting with a punctuation mark"
        )
    if name in names:
        raise DuplicateTensorName(f"tensor {name!r} appears more than once in the index")
    names.add(name)
    dtype = t["dtype"]
    if not isinstance(dtype, str) or dtype not in spec.DTYPES:
        raise UnknownDtype(
            f"tensor {name!r} has dtype {dtype!r}, which is not one of {sorted(spec.DTYPES)}; "
            "the checkpoint was written by a newer or foreign writer"
        )
    shape = t["shape"]
    if not isinstance(shape, list):
        raise InvalidShape(f"tensor {name!r}: shape must be a list of integers")
    if len(shape) > spec.MAX_RANK:
        raise LimitExceeded(f"tensor {name!r} has rank {len(shape)}, over the limit of {spec.MAX_RANK}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0 or d > 1 << 48:
            raise InvalidShape(f"tensor {name!r} has an invalid dimension {d!r} in shape {shape}")
    part = _int(t["partition"], f"tensor {name!r} partition", maximum=1 << 31)
    offset = _int(t["offset"], f"tensor {name!r} offset")
    nbytes = _int(t["nbytes"], f"tensor {name!r} nbytes")
    expected = math.prod(shape) * spec.DTYPES[dtype].itemsize
    if nbytes != expected:
        raise SizeMismatch(
            f"tensor {name!r} declares nbytes={nbytes}, but shape {shape} of {dtype} needs {expected} bytes"
        )
    if offset % alignment:
        raise MisalignedOffset(f"tensor {name!r} starts at offset {offset}, not a multiple of {alignment}")
    if part >= len(partitions):
        raise OffsetOutOfRange(
            f"tensor {name!r} names partition {part}, but there are only {len(partitions)}"
        )
    if offset + nbytes > partitions[part].size:
        raise OffsetOutOfRange(
            f"tensor {name!r} covers bytes [{offset}, {offset + nbytes}) of {partitions[part].file}, "
            f"which has only {partitions[part].size} bytes"
        )
    return TensorInfo(name, dtype, tuple(shape), part, offset, nbytes)


def _check_overlaps(tensors: list[TensorInfo], partitions: list[PartitionInfo]) -> None:
    by_part: dict[int, list[TensorInfo]] = {}
    for t in tensors:
        if t.nbytes:
            by_part.setdefault(t.partition, []).append(t)
    for part, ts in by_part.items():
        ts.sort(key=lambda t: t.offset)
        for a, b in itertools.pairwise(ts):
            if a.offset + a.nbytes > b.offset:
                raise OverlappingTensors(
                    f"tensors {a.name!r} and {b.name!r} overlap in {partitions[part].file} "
                    f"([{a.offset}, {a.offset + a.nbytes}) and [{b.offset}, {b.offset + b.nbytes}))"
                )
