"""The crash-safe, deterministic checkpoint writer.

A checkpoint is written into a hidden temporary directory beside the destination, every file is fsynced,
``index.json`` is written last, the directory is fsynced, and only then renamed into place. A crash at any
moment leaves either the old state or the complete new checkpoint: never a directory that opens as complete.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from warmstart.errors import CheckpointExists, InvalidTensorName, UnsupportedTensor
from warmstart.format import spec
from warmstart.format.checksum import ChunkHasher, xxh3_hex
from warmstart.format.index import FileInfo, Index, PartitionInfo, TensorInfo

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
"""Called with the number of bytes just written."""

_PAD = bytes(spec.ALIGNMENT)


def to_numpy(obj: Any, name: str = "<tensor>") -> np.ndarray:
    """A C-contiguous numpy view (or copy, if needed) of a numpy array, torch tensor or jax array."""
    mod = type(obj).__module__
    if isinstance(obj, np.ndarray):
        arr = obj
    elif mod.startswith("torch"):
        arr = _torch_to_numpy(obj, name)
    elif mod.startswith(("jax", "jaxlib")) or isinstance(obj, np.generic):
        arr = np.asarray(obj)
    else:
        raise UnsupportedTensor(
            f"tensor {name!r} is a {type(obj).__module__}.{type(obj).__name__}; save() takes numpy arrays, "
            "torch tensors and jax arrays"
        )
    if spec.dtype_name_of_numpy(arr.dtype) is None:
        raise UnsupportedTensor(
            f"tensor {name!r} has dtype {arr.dtype}, which the format does not support; supported: "
            f"{', '.join(spec.DTYPES)}"
        )
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # np.ascontiguousarray would turn 0-d into 1-d
    return arr


def _torch_to_numpy(t: Any, name: str) -> np.ndarray:
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_sparse or t.layout != torch.strided:
        raise UnsupportedTensor(f"tensor {name!r} is sparse; densify it before saving")
    special = {
        torch.bfloat16: spec.DTYPES["bfloat16"].numpy,
        torch.float8_e4m3fn: spec.DTYPES["float8_e4m3fn"].numpy,
        torch.float8_e5m2: spec.DTYPES["float8_e5m2"].numpy,
    }
    t = t.contiguous()
    if t.dtype in special:
        as_int = torch.int16 if t.element_size() == 2 else torch.int8
        return t.view(as_int).numpy().view(special[t.dtype])
    try:
        return t.numpy()
    except TypeError as e:
        raise UnsupportedTensor(
            f"tensor {name!r} has torch dtype {t.dtype}, which the format does not support"
        ) from e


def _iter_items(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
    if isinstance(tensors, Mapping):
        return tensors.items()
    return tensors


class _PartitionWriter:
    def __init__(self, path: Path, chunk_size: int) -> None:
        self.path = path
        self.f = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self.hasher = ChunkHasher(chunk_size)
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        view = mv
        while len(view):
            n = self.f.write(view)
            if n is None:  # pragma: no cover - blocking file
                continue
            view = view[n:]
        self.hasher.update(mv)
        self.size += len(mv)

    def pad_to(self, offset: int) -> None:
        while self.size < offset:
            self.write(_PAD[: min(len(_PAD), offset - self.size)])

    def close(self) -> PartitionInfo:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return PartitionInfo(self.path.name, self.size, tuple(self.hasher.finish()))


def write_checkpoint_dir(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    directory: Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    files: Mapping[str, bytes | os.PathLike[str]] | None = None,
    partition_size: int = spec.DEFAULT_PARTITION_SIZE,
    chunk_size: int = spec.DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> Index:
    """Write all files of a checkpoint into an existing empty directory (no atomicity; see :func:`save`)."""
    if partition_size < spec.MIN_PARTITION_SIZE:
        raise ValueError(f"partition_size must be at least {spec.MIN_PARTITION_SIZE} bytes")
    if chunk_size % spec.ALIGNMENT or not spec.MIN_CHUNK_SIZE <= chunk_size <= spec.MAX_CHUNK_SIZE:
        raise ValueError(
            f"chunk_size must be a multiple of {spec.ALIGNMENT} in [{spec.MIN_CHUNK_SIZE}, {spec.MAX_CHUNK_SIZE}]"
        )
    partitions: list[PartitionInfo] = []
    infos: list[TensorInfo] = []
    seen: set[str] = set()
    current: _PartitionWriter | None = None
    for name, obj in _iter_items(tensors):
        if not spec.is_valid_tensor_name(name):
            raise InvalidTensorName(
                f"cannot save tensor {str(name)[:80]!r}: names are 1-{spec.MAX_NAME_LENGTH} characters from "
                "letters, digits and _ . : / - [ ], starting with a letter, digit or _"
            )
        if name in seen:
            raise InvalidTensorName(f"tensor name {name!r} is given twice")
        seen.add(name)
        arr = to_numpy(obj, name)
        nbytes = arr.nbytes
        if current is not None:
            offset = spec.align_up(current.size)
            if offset + nbytes > partition_size and current.size > 0:
                partitions.append(current.close())
                current = None
        if current is None:
            current = _PartitionWriter(
                directory / spec.PARTITION_FILE_FORMAT.format(len(partitions)), chunk_size
            )
        if nbytes:
            offset = spec.align_up(current.size)
            current.pad_to(offset)
            current.write(arr.reshape(-1).view(np.uint8).data)
        else:
            offset = 0  # an empty tensor occupies no bytes; offset 0 is always aligned and in range
        dtype = spec.dtype_name_of_numpy(arr.dtype)
        assert dtype is not None  # checked by to_numpy
        infos.append(
            TensorInfo(name, dtype, tuple(int(d) for d in arr.shape), len(partitions), offset, nbytes)
        )
        if progress is not None:
            progress(nbytes)
    if current is not None:
        partitions.append(current.close())

    file_infos: list[FileInfo] = []
    for fname, content in sorted((files or {}).items()):
        if not spec.is_safe_file_name(fname) or fname.startswith("data-"):
            raise ValueError(f"model file name {fname!r} is not allowed (plain names only, not data-*)")
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        _write_file(directory / fname, data)
        file_infos.append(FileInfo(fname, len(data), xxh3_hex(data)))

    index = Index(
        partitions=tuple(partitions),
        tensors=tuple(infos),
        files=tuple(file_infos),
        metadata=dict(metadata or {}),
        chunk_size=chunk_size,
    )
    _write_file(directory / spec.INDEX_FILE, index.to_json_bytes())
    _fsync_dir(directory)
    return index


def save(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    files: Mapping[str, bytes | os.PathLike[str]] | None = None,
    partition_size: int = spec.DEFAULT_PARTITION_SIZE,
    chunk_size: int = spec.DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Index:
    """Write ``tensors`` as a warmstart checkpoint directory at ``path``, atomically.

    ``tensors`` is a mapping or an iterable of ``(name, tensor)`` pairs (numpy arrays, torch tensors or
    jax arrays; consumed one at a time, so a generator converts a model larger than memory). Tensors are
    stored in the order given. ``files`` are model files stored beside the data (``config.json``, ...).
    The same input always produces the same bytes.
    """
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise CheckpointExists(f"{dest} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        index = write_checkpoint_dir(
            tensors,
            tmp,
            metadata=metadata,
            files=files,
            partition_size=partition_size,
            chunk_size=chunk_size,
            progress=progress,
        )
        publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def publish_dir(tmp: Path, dest: Path) -> None:
    """Move a fully written and fsynced directory to ``dest`` atomically (exchanging an existing one)."""
    if dest.exists():
        if not _rename_exchange(tmp, dest):
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(dest, old)
            os.rename(tmp, dest)
            tmp = old
        _fsync_dir(dest.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
    else:
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_file_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file via temp + fsync + rename (+ fsync of the directory)."""
    p = Path(path)
    tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        _write_file(tmp, data)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        log.debug("renameat2(RENAME_EXCHANGE) failed: errno %s", ctypes.get_errno())
        return False
    return True
