"""Byte movers between tiers: remote → (memory + disk) in one overlapped pass, and disk → memory.

Destinations are writable buffers, one per partition: shared mappings of the memory-tier files being filled
(``/dev/shm``), or one aligned anonymous buffer when no cache is configured. The tensors will later be views
of exactly these bytes, so each byte is copied once on its way up.

* remote: TensorStore ranged reads of every checksum chunk, several in flight; each chunk's xxh3 is checked
  as it arrives, then it is copied into its place; a background thread writes the same bytes (from the
  destination buffer, so nothing extra is held) to the disk tier, so the disk never slows the memory fill.
* disk: 2 threads each ``preadv`` 64 MiB (a whole number of checksum chunks) straight into the destination
  mapping, verifying the chunk checksums from the buffer (xxh3 runs at ~20 GB/s, well above the disk).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from warmstart.errors import ChecksumMismatch
from warmstart.format import spec
from warmstart.format.checksum import xxh3_hex
from warmstart.format.index import Index
from warmstart.format.sources import LocalSource, TensorStoreSource

log = logging.getLogger(__name__)

DISK_READ_BYTES = 64 * 1024**2
DISK_THREADS = 2


@dataclass
class Transfer:
    """One measured movement of a checkpoint's bytes from a tier into others."""

    source: str
    targets: tuple[str, ...]
    nbytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Partitions:
    """Writable destination buffers, one per partition, plus what keeps them alive."""

    buffers: list[memoryview]
    keep: list[object] = field(default_factory=list)

    def close(self) -> None:
        for b in self.buffers:
            b.release()
        self.buffers = []
        for k in self.keep:
            if isinstance(k, mmap.mmap):
                with contextlib.suppress(BufferError):  # a traceback may still hold a slice: GC unmaps it
                    k.close()
        self.keep = []


def create_partition_files(directory: Path, index: Index) -> Partitions:
    """Create every partition file at its final size in ``directory`` and map it shared and writable."""
    bufs: list[memoryview] = []
    keep: list[object] = []
    for p in index.partitions:
        fd = os.open(directory / p.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, p.size)
            m = mmap.mmap(fd, p.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) if p.size else None
        finally:
            os.close(fd)
        if m is None:
            bufs.append(memoryview(bytearray(0)))
        else:
            keep.append(m)
            bufs.append(memoryview(m))
    return Partitions(bufs, keep)


def anonymous_partitions(index: Index) -> tuple[mmap.mmap, list[memoryview]]:
    """One anonymous buffer holding every partition at 4096-aligned starts (faulted in while being filled)."""
    starts = []
    total = 0
    for p in index.partitions:
        starts.append(total)
        total += spec.align_up(p.size)
    m = mmap.mmap(-1, max(total, 1), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if total and os.environ.get("WARMSTART_BUFFER_HUGEPAGE") == "1":
        # Off by default. Measured on this VM (1 GiB from SeaweedFS): MADV_POPULATE_WRITE up front took 5.9 s
        # (THP compaction stalls, serialized before the first read); MADV_HUGEPAGE alone made the load 1.65x
        # slower than 4 KiB pages, whose faults during the copies overlap the network reads (1.10x raw GETs).
        m.madvise(mmap.MADV_HUGEPAGE)
    mv = memoryview(m)
    return m, [mv[s : s + p.size] for s, p in zip(starts, index.partitions, strict=True)]


def _bad_chunk(index: Index, pi: int, ci: int, where: str) -> ChecksumMismatch:
    part = index.partitions[pi]
    start, end = index.chunk_range(pi, ci)
    return ChecksumMismatch(
        f"checksum mismatch in {part.file} chunk {ci} (bytes {start}-{end}) read from {where}; the copy is "
        "corrupt or changed while being read (it is re-fetched on the next load)",
        file=part.file,
        chunk=ci,
        start=start,
        end=end,
    )


class _DiskWriter:
    """A background thread writing ``(partition, offset, bytes)`` into files of a disk-tier fill directory."""

    def __init__(self, directory: Path, index: Index, *, max_pending: int | None) -> None:
        self.fds = []
        for p in index.partitions:
            fd = os.open(directory / p.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, p.size)
            self.fds.append(fd)
        self.q: queue.Queue[tuple[int, int, bytes | memoryview] | None] = queue.Queue(max_pending or 0)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="warmstart-disk-writer", daemon=True)
        self.thread.start()

    def put(self, pi: int, off: int, data: bytes | memoryview) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((pi, off, data))

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            pi, off, data = item
            try:
                mv = memoryview(data)
                done = 0
                while done < len(mv):
                    done += os.pwrite(self.fds[pi], mv[done:], off + done)
            except BaseException as e:
                self.error = e

    def finish(self, ok: bool) -> None:
        self.q.put(None)
        self.thread.join()
        try:
            if ok and self.error is None:
                for fd in self.fds:
                    os.fsync(fd)
        finally:
            for fd in self.fds:
                os.close(fd)
        if ok and self.error is not None:
            raise self.error


def remote_to(
    src: TensorStoreSource,
    index: Index,
    *,
    buffers: Sequence[memoryview] | None,
    disk_dir: Path | None,
) -> float:
    """Fetch every partition chunk from ``src`` into ``buffers`` and/or the files of ``disk_dir``.

    Every chunk is verified against its xxh3 before use. Returns the seconds spent.
    """
    t0 = time.perf_counter()
    plan: list[tuple[int, int]] = []
    ranges: list[tuple[str, int, int]] = []
    for pi, p in enumerate(index.partitions):
        for ci in range(len(p.chunks)):
            start, end = index.chunk_range(pi, ci)
            plan.append((pi, ci))
            ranges.append((p.file, start, end - start))
    writer = _DiskWriter(disk_dir, index, max_pending=None if buffers else 8) if disk_dir else None
    ok = False
    try:
        for (pi, ci), (_, off, data) in zip(plan, src.read_ranges(ranges), strict=True):
            if xxh3_hex(data) != index.partitions[pi].chunks[ci]:
                raise _bad_chunk(index, pi, ci, src.location)
            if buffers is not None:
                dst = buffers[pi][off : off + len(data)]
                np.frombuffer(dst, np.uint8)[:] = np.frombuffer(data, np.uint8)  # releases the GIL
                if writer is not None:
                    writer.put(pi, off, dst)
            elif writer is not None:
                writer.put(pi, off, data)
        ok = True
    finally:
        if writer is not None:
            writer.finish(ok)
    return time.perf_counter() - t0


def disk_to(
    root: Path,
    index: Index,
    buffers: Sequence[memoryview],
    *,
    verify: bool = True,
    direct: bool = False,
    threads: int = DISK_THREADS,
    read_bytes: int = DISK_READ_BYTES,
) -> float:
    """Read every partition of the checkpoint at ``root`` into ``buffers`` (checking checksums if ``verify``)."""
    t0 = time.perf_counter()
    cs = index.chunk_size
    step = max(cs, read_bytes // cs * cs)
    jobs: list[tuple[int, int, int]] = []
    for pi, p in enumerate(index.partitions):
        jobs.extend((pi, off, min(step, p.size - off)) for off in range(0, p.size, step))
    src = LocalSource(root, direct=direct)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if errors or not jobs:
                    return
                pi, off, n = jobs.pop(0)
            try:
                part = index.partitions[pi]
                dst = buffers[pi][off : off + n]
                src.read_into(part.file, off, dst)
                if verify:
                    for s in range(0, n, cs):
                        ci = (off + s) // cs
                        if xxh3_hex(dst[s : s + cs]) != part.chunks[ci]:
                            raise _bad_chunk(index, pi, ci, str(root))
            except BaseException as e:
                with lock:
                    errors.append(e)
                return

    ts = [threading.Thread(target=work, name=f"warmstart-disk-read-{i}") for i in range(max(1, threads))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    src.close()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def copy_model_files(
    src: LocalSource | TensorStoreSource, index: Index, index_bytes: bytes, dirs: Sequence[Path]
) -> None:
    """Copy the model files (verified) and then ``index.json`` (the validated bytes) into every directory."""
    for f in index.files:
        data = src.read(f.name)
        if len(data) != f.size or xxh3_hex(data) != f.xxh3:
            raise ChecksumMismatch(
                f"model file {f.name} from {src.location} does not match index.json; re-upload the checkpoint",
                file=f.name,
                chunk=0,
                start=0,
                end=f.size,
            )
        for d in dirs:
            _write(d / f.name, data)
    for d in dirs:
        _write(d / spec.INDEX_FILE, index_bytes)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
