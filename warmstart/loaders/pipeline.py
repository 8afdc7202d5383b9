"""Byte movers between tiers: remote → memory (or disk), memory → disk, and disk → memory.

* remote: ranged GETs of runs of whole checksum chunks, several in flight (:mod:`warmstart.loaders.remote`:
  direct HTTP where it can sign the request, else TensorStore). Each thread streams its response a few MiB
  at a time straight into the destination: a pooled anonymous buffer (embedded mode) or the shared mappings
  of the memory-tier files, whose pages it allocates in bulk (``MADV_POPULATE_WRITE``) while the body
  arrives; a disk-tier-only fill goes through a reused staging buffer and ``pwrite``. Every chunk's xxh3 is
  checked as it arrives. No Python object ever holds a chunk; the kernel does the copies, GIL released.
* memory → disk: ``os.sendfile`` from the published memory-tier files (a background copy, see ``tiers``).
* disk → memory: 2 threads ``preadv`` into a staging buffer, hash, ``pwrite`` into the tmpfs files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from warmstart.errors import ChecksumMismatch, StorageFull, TruncatedPartition
from warmstart.format import spec
from warmstart.format.checksum import xxh3_hex
from warmstart.format.index import Index
from warmstart.format.sources import LocalSource, TensorStoreSource
from warmstart.loaders.hostcache import madvise, take_spare
from warmstart.loaders.remote import HttpReader
from warmstart.units import parse_size

log = logging.getLogger(__name__)

DISK_READ_BYTES = 64 * 1024**2
DISK_THREADS = 2
REMOTE_THREADS = 8
"""Ranged GETs in flight (the raw limit in benchmarks/load.py is measured with 8 HTTP threads)."""
REMOTE_GET_BYTES = 64 * 1024**2
"""Bytes per GET (whole checksum chunks; 64 MiB as the raw limit's GETs)."""
PIECE_BYTES = 4 * 1024**2
"""Bytes received, hashed and written per step: a staging buffer this small stays in cache."""


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


def anonymous_partitions(index: Index, pool: BufferPool | None = None) -> list[memoryview]:
    """One private buffer holding every partition at 4096-aligned starts, from ``pool`` (default: the
    process's :data:`BUFFERS`). The buffer goes back to the pool once every view of it is gone."""
    starts = []
    total = 0
    for p in index.partitions:
        starts.append(total)
        total += spec.align_up(p.size)
    return (BUFFERS if pool is None else pool).views(
        total, [(s, p.size) for s, p in zip(starts, index.partitions, strict=True)]
    )


class BufferPool:
    """Anonymous buffers reused across loads within a process (bounded by ``capacity`` idle bytes).

    A fresh buffer's pages are faulted in by the first load that fills it (4 KiB faults overlapping the
    network reads: measured faster here than ``MADV_POPULATE_WRITE`` or ``MADV_HUGEPAGE`` up front, which
    stall on THP compaction); every later load into it runs on faulted memory (machine.md: a reused,
    pre-faulted pool is 1.5-5x faster than fresh memory). A buffer is handed out as per-partition ctypes
    arrays over it; when the last of them (and so the last tensor viewing it) is collected, the buffer
    returns to the pool. Idle buffers beyond ``capacity`` bytes are unmapped, largest first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._idle: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.reused = 0
        self.created = 0

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(len(m) for m in self._idle)

    def _acquire(self, nbytes: int) -> mmap.mmap:
        with self._lock:
            fits = [m for m in self._idle if nbytes <= len(m) <= 2 * nbytes + (64 << 20)]
            if fits:
                m = min(fits, key=len)
                self._idle.remove(m)
                self.reused += 1
                return m
            self.created += 1
        m = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if os.environ.get("WARMSTART_BUFFER_HUGEPAGE") == "1":
            # Off by default. Measured on this VM (1 GiB from SeaweedFS): MADV_POPULATE_WRITE up front took
            # 5.9 s (THP compaction stalls, serialized before the first read); MADV_HUGEPAGE alone made the
            # load 1.65x slower than 4 KiB pages, whose faults during the copies overlap the network reads.
            m.madvise(mmap.MADV_HUGEPAGE)
        return m

    def _release(self, m: mmap.mmap) -> None:
        with self._lock:
            self._idle.append(m)
            drop = []
            while self._idle and sum(len(x) for x in self._idle) > self.capacity:
                big = max(self._idle, key=len)
                self._idle.remove(big)
                drop.append(big)
        for x in drop:
            with contextlib.suppress(BufferError):
                x.close()

    def views(self, total: int, spans: Sequence[tuple[int, int]]) -> list[memoryview]:
        """Writable views ``[start, start + size)`` of one pooled buffer of at least ``total`` bytes."""
        m = self._acquire(max(total, 1))
        arrays = [(ctypes.c_ubyte * n).from_buffer(m, s) for s, n in spans]
        guard = _Guard(len(arrays), self, m)
        for a in arrays:
            weakref.finalize(a, guard.done)
        return [memoryview(a).cast("B") for a in arrays]

    def clear(self) -> None:
        """Unmap every idle buffer."""
        with self._lock:
            idle, self._idle = self._idle, []
        for m in idle:
            with contextlib.suppress(BufferError):
                m.close()


class _Guard:
    """Returns a buffer to its pool when all of its partition arrays have been collected."""

    def __init__(self, n: int, pool: BufferPool, m: mmap.mmap) -> None:
        self.left = n
        self.pool = pool
        self.m: mmap.mmap | None = m
        self.lock = threading.Lock()
        if n == 0:
            self.left = 1
            self.done()

    def done(self) -> None:
        with self.lock:
            self.left -= 1
            m, last = self.m, self.left == 0
            if last:
                self.m = None
        if last and m is not None:
            self.pool._release(m)


BUFFERS = BufferPool(parse_size(os.environ.get("WARMSTART_BUFFER_POOL", "4GiB")))
"""The process's pool of remote-read buffers; ``WARMSTART_BUFFER_POOL`` bounds its idle bytes (0 disables)."""


_MADV_POPULATE_WRITE = 23


def populate_write(view: memoryview) -> bool:
    """Fault in the whole pages of a writable buffer now, in one call (``MADV_POPULATE_WRITE``, Linux 5.14+).

    Measured here on 512 MiB of fresh anonymous memory: 0.35 s against 0.55-0.69 s for the same pages
    faulted one at a time by the copies that fill them; already-present pages cost only a page-table walk
    (a reused pool buffer). False where the kernel lacks it (the copies then fault the pages in).
    """
    return _populate_write(view) == 0


def _populate_write(view: memoryview) -> int:
    """0, or the errno of ``madvise(MADV_POPULATE_WRITE)`` over the whole pages of ``view``."""
    n = len(view)
    if view.readonly:
        return errno.EINVAL
    if n < mmap.PAGESIZE:
        return 0
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    lo = -(-addr // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (addr + n) // mmap.PAGESIZE * mmap.PAGESIZE
    return 0 if hi <= lo else madvise(lo, hi - lo, _MADV_POPULATE_WRITE)


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


class _TierFiles:
    """The partition files of the tiers being filled from remote, written with ``pwrite`` (no mappings).

    ``pwrite`` into tmpfs allocates pages in the kernel: no 4 KiB page faults, unlike filling a shared
    mapping. A disk-tier range is handed to writeback (``POSIX_FADV_DONTNEED`` starts it, and drops the
    pages once clean: the memory tier, not the page cache, holds the hot copy) right after it is written,
    so the final ``fsync`` finds little left to do.
    """

    def __init__(self, index: Index, mem_dir: Path | None, disk_dir: Path | None) -> None:
        self.fds: list[list[int]] = [[] for _ in index.partitions]
        self.disk_fds: list[int | None] = [None for _ in index.partitions]
        try:
            for d, is_disk in ((mem_dir, False), (disk_dir, True)):
                if d is None:
                    continue
                for pi, p in enumerate(index.partitions):
                    reused = 0 if is_disk else take_spare(d, p.file, p.size)  # pages from the pool
                    trunc = 0 if reused else os.O_TRUNC
                    fd = os.open(d / p.file, os.O_WRONLY | os.O_CREAT | trunc | os.O_CLOEXEC, 0o600)
                    self.fds[pi].append(fd)
                    if is_disk:  # blocks reserved up front: a full disk fails before any byte moves
                        self.disk_fds[pi] = fd
                        _allocate(fd, p.size, d)
                    else:  # tmpfs: fallocate would zero every page serially first; pwrite allocates them
                        os.ftruncate(fd, p.size)
        except BaseException:
            self.close()
            raise

    def write(self, pi: int, off: int, data: memoryview) -> None:
        for fd in self.fds[pi]:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], off + done)

    def written(self, pi: int, off: int, n: int) -> None:
        fd = self.disk_fds[pi]
        if fd is not None:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)

    def sync(self) -> None:
        for fd in self.disk_fds:
            if fd is not None:
                os.fsync(fd)

    def close(self) -> None:
        for fds in self.fds:
            for fd in fds:
                os.close(fd)
        self.fds = []
        self.disk_fds = []


def _allocate(fd: int, size: int, where: Path) -> None:
    """Give the file its final size, reserving the blocks where the file system can (ENOSPC now, not later)."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StorageFull(
                f"no space left in {where} for {size} bytes; free space or lower the tier's capacity",
                tier=str(where),
                needed=size,
            ) from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def _write_error(e: OSError, where: str) -> BaseException:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left while writing {where}: {e}", tier=where)
    return e


def _jobs(index: Index, get_bytes: int) -> list[tuple[int, int, int]]:
    """``(partition, first chunk, end chunk)``: runs of whole chunks of about ``get_bytes`` each."""
    out: list[tuple[int, int, int]] = []
    for pi, p in enumerate(index.partitions):
        per = max(1, get_bytes // index.chunk_size)
        out.extend((pi, c, min(c + per, len(p.chunks))) for c in range(0, len(p.chunks), per))
    return out


def remote_to(
    src: TensorStoreSource | HttpReader,
    index: Index,
    *,
    buffers: Sequence[memoryview] | None = None,
    mem_dir: Path | None = None,
    disk_dir: Path | None = None,
    threads: int = REMOTE_THREADS,
    get_bytes: int = REMOTE_GET_BYTES,
) -> float:
    """Fetch every partition chunk into ``buffers`` and/or the partition files of ``mem_dir`` and ``disk_dir``.

    Every chunk is verified against its xxh3 as it arrives. From an :class:`HttpReader`, ``threads``
    threads each GET ``get_bytes`` runs of chunks and stream them, ``PIECE_BYTES`` at a time, into the
    destination buffer (``buffers``, or the shared mappings of ``mem_dir``'s files), or for ``disk_dir`` a
    small reused staging buffer that is hashed and ``pwrite``-n: one kernel copy per byte and destination.
    From a :class:`TensorStoreSource`, TensorStore reads the chunks (8 in flight). Returns the seconds spent.
    """
    t0 = time.perf_counter()
    maps = None
    if isinstance(src, HttpReader) and mem_dir is not None and buffers is None:
        maps = _SharedMaps(mem_dir, index)  # receive straight into the memory-tier files
        buffers, mem_dir = maps.views, None
    files = None
    try:
        files = _TierFiles(index, mem_dir, disk_dir) if mem_dir or disk_dir else None
        if isinstance(src, HttpReader):
            _http_fill(
                src,
                index,
                buffers=buffers,
                files=files,
                threads=threads,
                get_bytes=get_bytes,
                shared=None if maps is None else maps.directory,
            )
        else:
            _tensorstore_fill(src, index, buffers, files)
        if files is not None:
            try:
                files.sync()
            except OSError as e:
                raise _write_error(e, str(disk_dir)) from e
    finally:
        if files is not None:
            files.close()
        if maps is not None:
            maps.close()
        if isinstance(src, HttpReader):
            src.close()  # the threads are done (and after a failure, connections may hold half-read bodies)
    return time.perf_counter() - t0


class _SharedMaps:
    """The partition files of a memory-tier fill directory at their final size, mapped shared and writable.

    Receiving straight into these mappings is one kernel copy per byte (socket → tmpfs page). Their pages
    are allocated in bulk, a GET's range at a time, by ``MADV_POPULATE_WRITE`` while the body arrives (fewer
    and cheaper faults than page by page); a full tmpfs then fails that call (:class:`StorageFull`) instead
    of raising SIGBUS in a copy. Measured against ``pwrite`` from a staging buffer on /dev/shm, 512 MiB
    from SeaweedFS, 5 interleaved runs: 1.01x vs 1.15x the raw GETs into a pre-faulted buffer. A file the
    memory tier's page pool lent the fill (``hostcache.take_spare``) already has its pages: no allocation.
    """

    def __init__(self, directory: Path, index: Index) -> None:
        self.directory = directory
        reused = [take_spare(directory, p.file, p.size) for p in index.partitions]  # pages from the pool
        needed = index.total_bytes - sum(reused)
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        if free < needed:
            raise StorageFull(
                f"no space left in {directory}: {needed} bytes needed, {free} free; free memory or "
                "lower the memory tier's capacity",
                tier=str(directory),
                needed=needed,
            )
        self.views: list[memoryview] = []
        self._maps: list[mmap.mmap] = []
        try:
            for p, n in zip(index.partitions, reused, strict=True):
                trunc = 0 if n else os.O_TRUNC
                fd = os.open(directory / p.file, os.O_RDWR | os.O_CREAT | trunc | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(fd, p.size)
                    if p.size:
                        m = mmap.mmap(fd, p.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                        self._maps.append(m)
                        self.views.append(memoryview(m))
                    else:
                        self.views.append(memoryview(bytearray(0)))
                finally:
                    os.close(fd)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for v in self.views:
            v.release()
        self.views = []
        for m in self._maps:
            with contextlib.suppress(BufferError):  # a traceback may still hold a slice: GC unmaps it
                m.close()
        self._maps = []


def _tensorstore_fill(
    src: TensorStoreSource, index: Index, buffers: Sequence[memoryview] | None, files: _TierFiles | None
) -> None:
    plan: list[tuple[int, int]] = []
    ranges: list[tuple[str, int, int]] = []
    for pi, p in enumerate(index.partitions):
        for ci in range(len(p.chunks)):
            start, end = index.chunk_range(pi, ci)
            plan.append((pi, ci))
            ranges.append((p.file, start, end - start))
    for (pi, ci), (_, off, data) in zip(plan, src.read_ranges(ranges), strict=True):
        if xxh3_hex(data) != index.partitions[pi].chunks[ci]:
            raise _bad_chunk(index, pi, ci, src.location)
        mv = memoryview(data)
        if buffers is not None:
            buffers[pi][off : off + len(mv)] = mv
        if files is not None:
            try:
                files.write(pi, off, mv)
            except OSError as e:
                raise _write_error(e, index.partitions[pi].file) from e
            files.written(pi, off, len(mv))


def _http_fill(
    reader: HttpReader,
    index: Index,
    *,
    buffers: Sequence[memoryview] | None,
    files: _TierFiles | None,
    threads: int,
    get_bytes: int,
    shared: Path | None = None,
) -> None:
    """``shared``: the directory whose tmpfs files ``buffers`` map (their pages must be allocated first)."""
    jobs = _jobs(index, get_bytes)
    jobs.reverse()  # pop() from the end takes them in file order
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        staging = None if buffers is not None else memoryview(bytearray(PIECE_BYTES))
        while True:
            with lock:
                if errors or not jobs:
                    return
                pi, c0, c1 = jobs.pop()
            try:
                part = index.partitions[pi]
                start = index.chunk_range(pi, c0)[0]
                end = index.chunk_range(pi, c1 - 1)[1]
                body = reader.get(part.file, start, end - start)
                if buffers is not None:  # fault the range in bulk while the response body arrives
                    err = _populate_write(buffers[pi][start:end])
                    if err and shared is not None and err != errno.EINVAL:  # EINVAL: kernel < 5.14
                        raise StorageFull(
                            f"cannot allocate {end - start} bytes of {shared / part.file} (memory tier full?): "
                            f"{os.strerror(err)}",
                            tier=str(shared),
                            needed=end - start,
                        )
                for ci in range(c0, c1):
                    s, e = index.chunk_range(pi, ci)
                    h = xxhash.xxh3_64()
                    pos = s
                    while pos < e:
                        n = min(PIECE_BYTES, e - pos)
                        view = buffers[pi][pos : pos + n] if buffers is not None else staging[:n]  # type: ignore[index]
                        body.readinto(view)
                        h.update(view)
                        if files is not None:
                            try:
                                files.write(pi, pos, view)
                            except OSError as err:
                                raise _write_error(err, part.file) from err
                        pos += n
                    if h.hexdigest() != part.chunks[ci]:
                        raise _bad_chunk(index, pi, ci, reader.location)
                if files is not None:
                    files.written(pi, start, end - start)
            except BaseException as e:
                with lock:
                    errors.append(e)
                return

    ts = [
        threading.Thread(target=work, name=f"warmstart-remote-{i}")
        for i in range(max(1, min(threads, len(jobs))))
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def disk_to(
    root: Path,
    index: Index,
    dest_dir: Path,
    *,
    verify: bool = True,
    direct: bool = False,
    threads: int = DISK_THREADS,
    read_bytes: int = DISK_READ_BYTES,
) -> float:
    """Copy every partition of the checkpoint at ``root`` into files of ``dest_dir`` (the memory tier).

    ``threads`` threads each take ``read_bytes`` of whole chunks at a time and move them ``PIECE_BYTES``
    at a time: ``preadv`` into a reused page-aligned staging buffer (``O_DIRECT`` when ``direct``), xxh3
    of each chunk when ``verify``, ``pwrite`` into the tmpfs file. Writing through ``pwrite`` rather than a
    shared mapping avoids a page fault per 4 KiB and turns a full tmpfs into :class:`StorageFull` (ENOSPC)
    instead of SIGBUS. Returns the seconds spent.
    """
    t0 = time.perf_counter()
    jobs = _jobs(index, read_bytes)
    jobs.reverse()
    src = LocalSource(root, direct=direct)
    files = _TierFiles(index, dest_dir, None)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        staging = mmap.mmap(-1, PIECE_BYTES)
        try:
            while True:
                with lock:
                    if errors or not jobs:
                        return
                    pi, c0, c1 = jobs.pop()
                part = index.partitions[pi]
                for ci in range(c0, c1):
                    s, e = index.chunk_range(pi, ci)
                    h = xxhash.xxh3_64()
                    pos = s
                    while pos < e:
                        n = min(PIECE_BYTES, e - pos)
                        with memoryview(staging)[:n] as view:
                            src.read_into(part.file, pos, view)
                            if verify:
                                h.update(view)
                            try:
                                files.write(pi, pos, view)
                            except OSError as err:
                                raise _write_error(err, str(dest_dir / part.file)) from err
                        pos += n
                    if verify and h.hexdigest() != part.chunks[ci]:
                        raise _bad_chunk(index, pi, ci, str(root))
        except BaseException as e:
            with lock:
                errors.append(e)
        finally:
            staging.close()

    ts = [
        threading.Thread(target=work, name=f"warmstart-disk-read-{i}")
        for i in range(max(1, min(threads, len(jobs))))
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    src.close()
    files.close()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def local_copy(src_dir: Path, index: Index, dst_dir: Path, *, step: int = DISK_READ_BYTES) -> float:
    """Copy a verified checkpoint directory (a memory-tier entry) into ``dst_dir`` with ``os.sendfile``.

    The kernel copies page to page (no Python buffer, the GIL released); each written range is handed to
    writeback at once and everything is fsynced before returning; ``index.json`` is written last.
    Returns the seconds spent.
    """
    t0 = time.perf_counter()
    for p in index.partitions:
        with open(src_dir / p.file, "rb") as fin:
            fd = os.open(dst_dir / p.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _allocate(fd, p.size, dst_dir)
                off = 0
                while off < p.size:
                    n = min(step, p.size - off)
                    done = 0
                    while done < n:
                        try:
                            k = os.sendfile(fd, fin.fileno(), off + done, n - done)
                        except OSError as e:
                            raise _write_error(e, str(dst_dir / p.file)) from e
                        if k == 0:
                            raise TruncatedPartition(
                                f"{src_dir / p.file} ended at {off + done}, expected {p.size}"
                            )
                        done += k
                    os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)  # start writeback now
                    off += n
                try:
                    os.fsync(fd)
                except OSError as e:
                    raise _write_error(e, str(dst_dir / p.file)) from e
            finally:
                os.close(fd)
    for f in index.files:
        _write(dst_dir / f.name, (src_dir / f.name).read_bytes())
    _write(dst_dir / spec.INDEX_FILE, (src_dir / spec.INDEX_FILE).read_bytes())
    return time.perf_counter() - t0


def copy_model_files(
    src: LocalSource | TensorStoreSource | HttpReader, index: Index, index_bytes: bytes, dirs: Sequence[Path]
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
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _write_error(e, str(path)) from e
