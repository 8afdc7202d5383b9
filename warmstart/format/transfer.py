"""Move whole checkpoints between a local directory and a URI (``s3://``, ``gs://``, ``file://``, ...).

* :func:`upload` sends every data partition and model file in parallel, verifying chunk checksums as the
  bytes are read, and writes ``index.json`` **last**: until the very end the destination has no index, so a
  half-uploaded checkpoint opens as :class:`~warmstart.errors.CheckpointNotFound`, never as complete.
* :func:`download` fetches a checkpoint with many ranged reads in flight, checks every chunk's checksum as
  it arrives, and publishes the local directory atomically (temporary directory, fsync, rename).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path

from warmstart.errors import CheckpointExists, ChecksumMismatch, SourceError
from warmstart.format import spec
from warmstart.format.checksum import xxh3_hex
from warmstart.format.index import Index, PartitionInfo
from warmstart.format.reader import Checkpoint, open_checkpoint, read_index
from warmstart.format.sources import LocalSource, TensorStoreSource
from warmstart.format.writer import publish_dir

log = logging.getLogger(__name__)

Progress = Callable[[int], None]

DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_INFLIGHT_BYTES = 2 * 1024**3
"""Upload objects are whole files held in memory while in flight; this bounds their sum."""


def remote_checkpoint_exists(uri: str) -> bool:
    """True when ``uri`` already has an ``index.json``."""
    return TensorStoreSource(uri).exists(spec.INDEX_FILE)


def _verified_partition(ckpt: Checkpoint, part: PartitionInfo) -> bytes:
    """A local partition's bytes, each chunk checked against the index (never upload corrupt bytes)."""
    assert isinstance(ckpt.source, LocalSource)
    data = ckpt.source.read(part.file, 0, part.size)
    cs = ckpt.index.chunk_size
    mv = memoryview(data)
    for i, start in enumerate(range(0, part.size, cs)):
        if xxh3_hex(mv[start : start + cs]) != part.chunks[i]:
            end = min(start + cs, part.size)
            raise ChecksumMismatch(
                f"checksum mismatch in {part.file} chunk {i} (bytes {start}-{end}) of {ckpt.location}; "
                "refusing to upload a corrupt checkpoint",
                file=part.file,
                chunk=i,
                start=start,
                end=end,
            )
    return data


def upload(
    local_dir: str | os.PathLike[str],
    uri: str,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
) -> Index:
    """Upload the local checkpoint ``local_dir`` to ``uri``; ``index.json`` is written last.

    With ``overwrite``, an existing checkpoint at ``uri`` is first made invisible (its ``index.json`` is
    deleted), and its objects that the new checkpoint does not reuse are deleted after the new index lands.
    """
    ckpt = open_checkpoint(local_dir)
    assert isinstance(ckpt.source, LocalSource), "upload() takes a local checkpoint directory"
    index_bytes = ckpt.source.read(spec.INDEX_FILE)
    largest = max([p.size for p in ckpt.index.partitions] + [f.size for f in ckpt.index.files] + [1])
    workers = max(1, min(concurrency, max_inflight_bytes // largest))
    dst = TensorStoreSource(uri, concurrency=workers)

    stale: set[str] = set()
    if dst.exists(spec.INDEX_FILE):
        if not overwrite:
            raise CheckpointExists(
                f"{uri} already holds a checkpoint; pass overwrite=True (CLI: --overwrite)"
            )
        try:
            old = read_index(dst)
            stale = {p.file for p in old.partitions} | {f.name for f in old.files}
        except Exception as e:  # a corrupt old index is replaced all the same
            log.warning("existing index at %s unreadable (%s); replacing it", uri, e)
        dst.delete(spec.INDEX_FILE)  # from here on the old checkpoint is not visible as complete

    def send_partition(part: PartitionInfo) -> None:
        data = _verified_partition(ckpt, part)
        dst.write(part.file, data)
        if progress is not None:
            progress(len(data))

    def send_file(name: str) -> None:
        data = ckpt.read_file(name)  # checked against its xxh3
        dst.write(name, data)
        if progress is not None:
            progress(len(data))

    jobs: list[Callable[[], None]] = [functools.partial(send_partition, p) for p in ckpt.index.partitions]
    jobs += [functools.partial(send_file, f.name) for f in ckpt.index.files]
    _run_all(jobs, workers)
    dst.write(spec.INDEX_FILE, index_bytes)  # the commit point
    for name in sorted(stale - {p.file for p in ckpt.index.partitions} - {f.name for f in ckpt.index.files}):
        try:
            dst.delete(name)
        except Exception as e:  # leftover objects are harmless; report and go on
            log.warning("could not delete stale object %s%s: %s", dst.location, name, e)
    log.info("uploaded %s to %s (%d bytes)", local_dir, uri, ckpt.index.total_bytes)
    return ckpt.index


def _run_all(jobs: list[Callable[[], None]], workers: int) -> None:
    """Run jobs on ``workers`` threads; the first failure cancels what has not started and is raised."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="warmstart-upload") as ex:
        futures: list[Future[None]] = [ex.submit(job) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                for g in futures:
                    g.cancel()
                raise f.exception()  # type: ignore[misc]
        for f in futures:
            f.result()


def download(
    uri: str | os.PathLike[str],
    local_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Checkpoint:
    """Fetch the checkpoint at ``uri`` into ``local_dir``, verifying every chunk as it arrives.

    The directory appears atomically (complete or not at all). Returns the opened local checkpoint.
    """
    src = open_checkpoint(uri)
    dest = Path(local_dir)
    if dest.exists() and not overwrite:
        raise CheckpointExists(f"{dest} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    index_bytes = src.source.read(spec.INDEX_FILE)
    if Index.from_json_bytes(index_bytes) != src.index:  # the index changed while we opened it
        raise SourceError(f"index.json at {src.location} changed during the download; retry")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        _download_into(src, tmp, progress)
        with open(tmp / spec.INDEX_FILE, "wb") as f:
            f.write(index_bytes)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_checkpoint(dest)


def _download_into(src: Checkpoint, tmp: Path, progress: Progress | None) -> None:
    index = src.index
    cs = index.chunk_size
    ranges = [(p.file, s, min(cs, p.size - s)) for p in index.partitions for s in range(0, p.size, cs)]
    by_file = {p.file: p for p in index.partitions}
    handles = {p.file: open(tmp / p.file, "wb") for p in index.partitions}  # noqa: SIM115 - closed below
    try:
        for name, off, data in _read_ranges(src, ranges):
            part = by_file[name]
            chunk = off // cs
            if xxh3_hex(data) != part.chunks[chunk]:
                raise ChecksumMismatch(
                    f"checksum mismatch in {name} chunk {chunk} (bytes {off}-{off + len(data)}) downloading "
                    f"{src.location}; the remote copy is corrupt: re-upload it",
                    file=name,
                    chunk=chunk,
                    start=off,
                    end=off + len(data),
                )
            f = handles[name]
            if f.tell() != off:  # ranges arrive in order per file; anything else is a bug
                raise SourceError(f"{name}: expected bytes at {f.tell()}, got {off}")
            f.write(data)
            if progress is not None:
                progress(len(data))
        for f in handles.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in handles.values():
            f.close()
    for fi in index.files:
        data = src.read_file(fi.name)  # checked against its xxh3
        with open(tmp / fi.name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if progress is not None:
            progress(len(data))


def _read_ranges(src: Checkpoint, ranges: Iterable[tuple[str, int, int]]) -> Iterator[tuple[str, int, bytes]]:
    if isinstance(src.source, TensorStoreSource):
        yield from src.source.read_ranges(ranges)
        return
    for name, off, n in ranges:
        yield name, off, src.source.read(name, off, n)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
