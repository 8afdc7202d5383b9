"""The validating checkpoint reader."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from warmstart.errors import (
    CheckpointNotFound,
    ChecksumMismatch,
    TensorNotFound,
    TruncatedPartition,
)
from warmstart.format import spec
from warmstart.format.checksum import xxh3_hex
from warmstart.format.index import Index, TensorInfo
from warmstart.format.sources import LocalSource, TensorStoreSource, open_source

VERIFY_BLOCK = 64 * 1024**2


class Checkpoint:
    """An open checkpoint: its validated index, and reads of tensors, files and raw ranges."""

    def __init__(self, source: LocalSource | TensorStoreSource, index: Index) -> None:
        self.source = source
        self.index = index
        self._tensors = index.tensor_map()

    @property
    def location(self) -> str:
        return self.source.location

    @property
    def names(self) -> list[str]:
        """Tensor names in model order."""
        return [t.name for t in self.index.tensors]

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.index.metadata)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise TensorNotFound(f"checkpoint {self.location} has no tensor {name!r}") from None

    def read(self, name: str) -> np.ndarray:
        """One tensor as a new, writable numpy array (bfloat16 and float8 via ml_dtypes)."""
        t = self.info(name)
        dt = spec.DTYPES[t.dtype].numpy
        out = np.empty(t.shape, dtype=dt)
        if t.nbytes:
            part = self.index.partitions[t.partition]
            self.source.read_into(part.file, t.offset, memoryview(out.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
        return out

    def read_file(self, name: str) -> bytes:
        """A model file stored beside the data (``config.json``, tokenizer files, ...)."""
        for f in self.index.files:
            if f.name == name:
                data = self.source.read(name)
                if xxh3_hex(data) != f.xxh3 or len(data) != f.size:
                    raise ChecksumMismatch(
                        f"{self.location}/{name} does not match its checksum in index.json; re-fetch or "
                        "re-convert the checkpoint",
                        file=name,
                        chunk=0,
                        start=0,
                        end=f.size,
                    )
                return data
        raise FileNotFoundError(f"checkpoint {self.location} has no file {name!r}")

    def has_file(self, name: str) -> bool:
        return any(f.name == name for f in self.index.files)

    def check_sizes(self) -> None:
        """Compare every partition's real size with the index (cheap for local checkpoints)."""
        if not isinstance(self.source, LocalSource):
            return
        for p in self.index.partitions:
            try:
                actual = self.source.size(p.file)
            except FileNotFoundError:
                raise TruncatedPartition(
                    f"partition {p.file} of {self.location} is missing; re-fetch or re-convert the checkpoint"
                ) from None
            if actual != p.size:
                raise TruncatedPartition(
                    f"partition {p.file} of {self.location} has {actual} bytes, the index says {p.size}; "
                    "the copy is truncated or was modified: re-fetch or re-convert the checkpoint"
                )

    def verify(self, progress: Callable[[int], None] | None = None) -> None:
        """Check every chunk checksum and model file; raise :class:`ChecksumMismatch` at the first bad one."""
        self.check_sizes()
        for part in self.index.partitions:
            for chunk, start, data in self._iter_chunks(part.file, part.size):
                if xxh3_hex(data) != part.chunks[chunk]:
                    end = start + len(data)
                    raise ChecksumMismatch(
                        f"checksum mismatch in {part.file} chunk {chunk} (bytes {start}-{end}) of "
                        f"{self.location}; the copy is corrupt: re-fetch or re-convert the checkpoint",
                        file=part.file,
                        chunk=chunk,
                        start=start,
                        end=end,
                    )
                if progress is not None:
                    progress(len(data))
        for f in self.index.files:
            self.read_file(f.name)

    def _iter_chunks(self, file: str, size: int) -> Iterator[tuple[int, int, bytes | memoryview]]:
        cs = self.index.chunk_size
        ranges = [(file, s, min(cs, size - s)) for s in range(0, size, cs)]
        if isinstance(self.source, TensorStoreSource):
            for i, (_, off, data) in enumerate(self.source.read_ranges(ranges)):
                yield i, off, data
            return
        buf = bytearray(cs)
        mv = memoryview(buf)
        for i, (_, off, n) in enumerate(ranges):
            self.source.read_into(file, off, mv[:n])
            yield i, off, mv[:n]


def _local_view(source: LocalSource | TensorStoreSource) -> LocalSource | None:
    """The checkpoint directory behind a source, to check its files before reading (``file://`` too)."""
    if isinstance(source, LocalSource):
        return source
    if source.location.startswith("file://"):
        return LocalSource(source.location[len("file://") :].rstrip("/") or "/")
    return None


def _check_local_files(source: LocalSource | TensorStoreSource, index: Index) -> None:
    """Refuse (before any of their bytes is read) files that are not regular files inside the checkpoint."""
    local = _local_view(source)
    if local is None or local is source:  # LocalSource checks every file it opens itself
        return
    for name in [p.file for p in index.partitions] + [f.name for f in index.files]:
        with contextlib.suppress(FileNotFoundError):  # a missing file is reported where it is read
            local.size(name)


def read_index(source: LocalSource | TensorStoreSource) -> Index:
    """Fetch and validate ``index.json`` from a source."""
    local = _local_view(source)
    try:
        size_hint = local.size(spec.INDEX_FILE) if local is not None else None
    except FileNotFoundError:
        size_hint = -1
    if size_hint == -1:
        raise CheckpointNotFound(
            f"no checkpoint at {source.location}: index.json is missing (an interrupted write leaves no "
            "index; convert or upload the checkpoint again)"
        )
    if size_hint is not None and size_hint > spec.MAX_INDEX_BYTES:
        from warmstart.errors import IndexTooLarge

        raise IndexTooLarge(
            f"{source.location}/index.json is {size_hint} bytes, over the limit of {spec.MAX_INDEX_BYTES}"
        )
    try:
        data = source.read(spec.INDEX_FILE)
    except FileNotFoundError:
        raise CheckpointNotFound(f"no checkpoint at {source.location}: index.json is missing") from None
    index = Index.from_json_bytes(data)
    _check_local_files(source, index)
    return index


def open_checkpoint(location: str | os.PathLike[str], *, direct: bool = False) -> Checkpoint:
    """Open and validate the checkpoint at a local path or URI (``file://``, ``s3://``, ``gs://``, ``http(s)://``)."""
    if not isinstance(location, (str, os.PathLike)):
        raise TypeError(f"checkpoint location must be a path or URI string, not {type(location).__name__}")
    source = open_source(location, direct=direct)
    if isinstance(source, LocalSource) and not source.root.is_dir():
        raise CheckpointNotFound(f"no checkpoint at {location}: not a directory")
    ckpt = Checkpoint(source, read_index(source))
    ckpt.check_sizes()
    return ckpt
