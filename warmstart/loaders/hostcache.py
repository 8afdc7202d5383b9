"""Node-wide caches of whole checkpoints as directories of files: the host-memory tier and the disk tier.

One :class:`CacheDir` class serves both tiers (:class:`HostCache` under ``/dev/shm``, :class:`DiskCache` on a
local file system). Layout of a cache root::

    <root>/<key>/               a published entry: the checkpoint's files, index.json written last
    <root>/.tmp/<key>.<id>/     an entry being filled (holds ``reserved``: the bytes it reserves)
    <root>/.trash/<key>.<id>/   an evicted entry being deleted
    <root>/.pool/<id>           page pool (memory tier): big files of evicted entries, reused by fills
    <root>/.locks/<key>.lock    LOCK_SH by every user of the entry while mapped; eviction takes LOCK_EX|LOCK_NB
    <root>/.locks/<key>.fill    LOCK_EX by the one process filling the entry (others wait, then map)
    <root>/.locks/cache.lock    LOCK_EX while reserving room (eviction decisions are serialized)

Rules that make it safe across processes:

* An entry becomes visible only by ``rename(.tmp/<key>.<id>, <key>)`` after all its files are written; a
  crash leaves only a hidden ``.tmp`` directory, which the next reservation deletes once no process holds
  the key's fill lock (the kernel drops ``flock`` locks of dead processes).
* Users hold ``LOCK_SH`` on the key's lock file for as long as any mapping of the entry is alive (the lock
  is tied to the mappings with :func:`weakref.finalize`), so eviction (``LOCK_EX|LOCK_NB``) skips it.
* Last use is the mtime of the entry directory, set on every lookup; eviction takes the oldest first.
* Room is reserved before any byte is written; when nothing can be evicted the fill fails with
  :class:`~warmstart.errors.CacheFull` and writes nothing.
* Page pool (:class:`HostCache` with a capacity): an evicted entry's partition files keep their pages in
  ``.pool`` instead of being deleted, and the next fill takes them (``.spare-<id>`` in its fill directory,
  renamed over its partition files by the loaders: :func:`take_spare`), so it writes into pages the kernel
  and the hypervisor have already backed instead of allocating fresh ones. Entries + reservations + pool
  never exceed the capacity: a reservation trims the pool first. Every byte of a reused file is overwritten
  by the fill (checksum chunks cover whole partitions), and a bigger file is truncated to size.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from warmstart.errors import CacheFull, CorruptCheckpoint, EntryInUse
from warmstart.format import spec
from warmstart.format.index import Index
from warmstart.format.reader import Checkpoint, read_index
from warmstart.format.sources import LocalSource
from warmstart.names import validate_model_name
from warmstart.units import parse_size

log = logging.getLogger(__name__)

_RESERVED = "reserved"
_POOL = ".pool"
SPARE_PREFIX = ".spare-"
POOL_MIN_FILE_BYTES = 1 << 20
"""Smaller files of an evicted entry (index, config, tokenizer) are deleted, not pooled."""

validate_name = (
    validate_model_name  # cache entries are named like models: one allow-list (warmstart/names.py)
)


def default_host_root() -> Path:
    """``/dev/shm/warmstart-<uid>`` (or ``$TMPDIR`` when /dev/shm does not exist)."""
    base = Path("/dev/shm")
    if not base.is_dir():
        base = Path(os.environ.get("TMPDIR", "/tmp"))
    return base / f"warmstart-{os.getuid()}"


@dataclass(frozen=True)
class EntryInfo:
    """One published entry of a cache tier."""

    key: str
    path: Path
    bytes: int
    last_use: float
    in_use: bool


class _Lock:
    """An open lock file holding an ``flock``; closing the descriptor releases the lock."""

    def __init__(self, path: Path, op: int) -> None:
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, op)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.release()


def _try_lock(path: Path, op: int) -> _Lock | None:
    try:
        return _Lock(path, op | fcntl.LOCK_NB)
    except BlockingIOError:
        return None


class Lease:
    """Use of one published entry: holds ``LOCK_SH`` on it until released and until its mappings are gone."""

    def __init__(self, cache: CacheDir, key: str, lock: _Lock) -> None:
        self.cache = cache
        self.key = key
        self.path = cache.root / key
        self._lock: _Lock | None = lock

    def index(self) -> Index:
        return read_index(LocalSource(self.path))

    def checkpoint(self) -> Checkpoint:
        src = LocalSource(self.path)
        return Checkpoint(src, read_index(src))

    def map(self, file: str, *, writable_copy: bool = True) -> mmap.mmap:
        """Map one file of the entry; the entry stays locked in use while the mapping lives.

        ``writable_copy`` maps ``MAP_PRIVATE`` (copy-on-write: zero copy, and frameworks get writable memory
        whose writes never reach the cache); otherwise the mapping is shared and read-only.
        """
        if self._lock is None:
            raise RuntimeError(f"lease on {self.key} was released")
        with open(self.path / file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                m = mmap.mmap(-1, 1)
            else:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY if writable_copy else mmap.ACCESS_READ)
                if self.cache.populate:
                    populate_read(m)
                else:  # disk: start reading the whole file now (a no-op when it is in the page cache)
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        weakref.finalize(m, _keep, self._lock)  # the lock lives as long as its last mapping
        return m

    def release(self) -> None:
        """Drop this lease's own hold (mappings made from it keep the entry in use until collected)."""
        self._lock = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def populate_read(m: mmap.mmap) -> bool:
    """Map every page of ``m`` now, for reading, in one call (``MADV_POPULATE_READ``, Linux 5.14+).

    Measured on a 512 MiB memory-tier file mapped ``MAP_PRIVATE`` and then touched page by page: /dev/shm
    (4 KiB pages) 104 ms without, 75 ms with; a ``huge=within_size`` tmpfs 21 / 11 ms; warm ext4 12 / 10 ms.
    Read population never breaks copy-on-write (``MAP_POPULATE`` on a private writable mapping would copy
    every page). False where the kernel lacks it.
    """
    for _ in range(3):
        try:
            m.madvise(MADV_POPULATE_READ)
            return True
        except InterruptedError:  # a signal arrived while pages were read in: what is mapped stays mapped
            continue
        except OSError as e:
            log.debug("MADV_POPULATE_READ failed: %s", e)
            return False
    return False


PREFAULT_CHUNK_BYTES = 16 * 1024**2
PREFAULT_THREADS = 2
_libc: ctypes.CDLL | None = None


def madvise(addr: int, length: int, advice: int) -> int:
    """``madvise(addr, length, advice)`` through ctypes, the GIL released while the kernel works: 0 or the
    errno. For advice Python's ``mmap.madvise`` lacks or runs under the GIL (``MADV_POPULATE_*``)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = lib
    return 0 if _libc.madvise(addr, length, advice) == 0 else ctypes.get_errno()


def prefault(maps: Sequence[mmap.mmap], *, threads: int = PREFAULT_THREADS,
             chunk_bytes: int = PREFAULT_CHUNK_BYTES) -> bool:  # fmt: skip
    """Make every page of ``maps`` resident, mapped and touched by this CPU now, reading through them in
    ``chunk_bytes`` pieces on ``threads`` threads: each piece is read in (``MADV_POPULATE_READ``), then one
    byte of each of its pages is read.

    Why the touch: on a VM whose balloon reports free pages to the host (this project's machines), a page
    the disk just filled by DMA costs a host fault at its first CPU access: 0.7-0.8 s per GiB, which an
    engine would otherwise pay inside its first forward pass. Two threads overlap one piece's touches with
    the next piece's disk reads. Measured on a 1 GiB checkpoint file evicted 4 s earlier (medians of 3):
    one ``MADV_POPULATE_READ`` then touches 1.6-2.4 s; 2 threads x 16 MiB 0.56-0.62 s; a single reader
    feeding touch threads 1.2 s; 3-4 threads or 32-128 MiB pieces 0.9-1.5 s. On pages already resident
    and touched it costs a page-table walk (8 ms per GiB). Reading never breaks copy-on-write.
    Returns False when the kernel could not populate some piece (its pages were then faulted by the touches).
    """
    import numpy as np

    arrays = [np.frombuffer(m, dtype=np.uint8) for m in maps if len(m)]
    jobs = [(a, off, min(chunk_bytes, a.size - off)) for a in arrays for off in range(0, a.size, chunk_bytes)]
    nxt = iter(jobs)
    lock = threading.Lock()
    failed: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                with lock:
                    job = next(nxt, None)
                if job is None:
                    return
                a, off, n = job
                addr = a.ctypes.data + off
                lo = addr // mmap.PAGESIZE * mmap.PAGESIZE
                for _ in range(3):
                    err = madvise(lo, addr + n - lo, MADV_POPULATE_READ)
                    if err != errno.EINTR:
                        break
                if err:
                    failed.append(err)
                int(a[off : off + n : mmap.PAGESIZE].sum())  # numpy runs the loop without the GIL
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=work, name="warmstart-prefault") for _ in range(max(1, threads))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    del arrays
    if errors:
        raise errors[0]
    if failed:
        log.debug("MADV_POPULATE_READ failed on %d pieces (errno %s)", len(failed), failed[0])
    return not failed


def huge_tmpfs(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies on a tmpfs mounted with ``huge=always`` or ``huge=within_size`` (2 MiB pages)."""
    p = os.path.realpath(path)
    best = ("", "")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 4:
                    continue
                mnt = fields[1].replace("\\040", " ")
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                    best = (mnt, fields[2] + " " + fields[3])
    except OSError:
        return False
    kind, _, opts = best[1].partition(" ")
    return kind == "tmpfs" and any(o in ("huge=always", "huge=within_size") for o in opts.split(","))


def _keep(_obj: object) -> None:
    """Finalizer whose only job is to hold a reference to its argument until it runs."""


class CacheDir:
    """A bounded, LRU-evicted, cross-process-safe directory of whole checkpoints (one cache tier)."""

    tier = "cache"
    populate = False
    """Whether :meth:`Lease.map` populates mappings up front (memory tier: its pages are always resident)."""
    pools_pages = False
    """Whether evicted entries' big files are kept as a page pool for later fills (memory tier)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity: int | str | None = None,
        *,
        page_pool: bool | None = None,
    ) -> None:
        self.root = Path(root)
        self.capacity = None if capacity is None else parse_size(capacity)
        # bounded by the capacity, so only a bounded cache keeps one
        self.page_pool = (self.pools_pages if page_pool is None else page_pool) and self.capacity is not None
        for sub in (".tmp", ".trash", ".locks", _POOL):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, capacity={self.capacity})"

    # -- lookups ---------------------------------------------------------------------------------------------

    def _lockfile(self, key: str, kind: str = "lock") -> Path:
        return self.root / ".locks" / f"{key}.{kind}"

    def contains(self, key: str) -> bool:
        return (self.root / validate_name(key) / spec.INDEX_FILE).is_file()

    def lookup(self, key: str, *, verify: bool = False) -> Lease | None:
        """A lease on the published entry ``key``, or None when absent.

        Sizes are always checked against the index (cheap); ``verify`` also checks every chunk checksum. A
        corrupt entry is evicted (if no one else uses it) and reported as absent, so the caller re-fetches.
        """
        validate_name(key)
        lock = _Lock(self._lockfile(key), fcntl.LOCK_SH)  # waits only while an eviction of key runs
        path = self.root / key
        if not (path / spec.INDEX_FILE).is_file():
            lock.release()
            return None
        try:
            ckpt = Checkpoint(LocalSource(path), read_index(LocalSource(path)))
            ckpt.check_sizes()
            if verify:
                ckpt.verify()
        except (CorruptCheckpoint, FileNotFoundError) as e:
            log.warning("cached copy %s in %s is corrupt (%s); evicting it", key, self.root, e)
            lock.release()
            self.evict(key)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
        return Lease(self, key, lock)

    def entries(self) -> list[EntryInfo]:
        """Every published entry, least recently used first."""
        out = []
        for d in self.root.iterdir():
            if d.name.startswith(".") or not (d / spec.INDEX_FILE).is_file():
                continue
            try:
                st = d.stat()
                nbytes = _dir_bytes(d)
            except FileNotFoundError:
                continue
            probe = _try_lock(self._lockfile(d.name), fcntl.LOCK_EX)
            in_use = probe is None
            if probe is not None:
                probe.release()
            out.append(EntryInfo(d.name, d, nbytes, st.st_mtime, in_use))
        out.sort(key=lambda e: e.last_use)
        return out

    def used_bytes(self) -> int:
        """Bytes of published entries plus bytes reserved by fills in progress."""
        return sum(e.bytes for e in self.entries()) + sum(r for _, r in self._reservations())

    def _reservations(self) -> list[tuple[Path, int]]:
        """Fill directories and the bytes each holds: its reservation, else (no ``reserved`` file: a fill
        being published, or a dead fill's leftover) the bytes written. A fill published or removed while it is
        looked at (other threads and processes do not take ``cache.lock`` for that) is skipped."""
        out = []
        for d in (self.root / ".tmp").iterdir():
            try:
                out.append((d, int((d / _RESERVED).read_text())))
            except (OSError, ValueError):
                with contextlib.suppress(OSError):
                    out.append((d, _dir_bytes(d)))
        return out

    # -- eviction --------------------------------------------------------------------------------------------

    def evict(self, key: str, *, wait: bool = False) -> bool:
        """Remove entry ``key``. False when absent; :class:`EntryInUse` when a process is using it."""
        validate_name(key)
        op = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            lock = _Lock(self._lockfile(key), op)
        except BlockingIOError:
            raise EntryInUse(f"{self.tier} cache entry {key} is in use by a process; stop it first") from None
        try:
            return self._remove(key)
        finally:
            lock.release()

    def _remove(self, key: str) -> bool:
        path = self.root / key
        if not path.exists():
            return False
        trash = self.root / ".trash" / f"{key}.{uuid.uuid4().hex[:12]}"
        os.rename(path, trash)  # invisible at once; deletion may take a while for big entries
        if self.page_pool:
            self._pool_files(trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("evicted %s from %s", key, self.root)
        return True

    # -- page pool -------------------------------------------------------------------------------------------

    def _pool_files(self, d: Path) -> None:
        """Move the big files of ``d`` (an evicted entry) into the page pool."""
        with os.scandir(d) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    if e.is_file(follow_symlinks=False) and e.stat().st_size >= POOL_MIN_FILE_BYTES:
                        os.rename(e.path, self.root / _POOL / uuid.uuid4().hex)

    def pool(self) -> list[tuple[Path, int]]:
        """The page pool's files and their sizes, biggest first."""
        out = []
        with os.scandir(self.root / _POOL) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    out.append((Path(e.path), e.stat(follow_symlinks=False).st_size))
        out.sort(key=lambda f: -f[1])
        return out

    def pool_bytes(self) -> int:
        """Bytes the page pool holds (pages kept from evicted entries for the next fills)."""
        return sum(n for _, n in self.pool())

    def trim_pool(self, keep_bytes: int = 0) -> int:
        """Delete pool files (smallest first) until at most ``keep_bytes`` remain; returns the bytes freed."""
        files = self.pool()
        held = sum(n for _, n in files)
        freed = 0
        for path, n in reversed(files):
            if held - freed <= keep_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                freed += n
        return freed

    def _claim_pool(self, tmp: Path, nbytes: int, room: int) -> None:
        """Move pool files covering up to ``nbytes`` into the fill directory ``tmp`` as spares (each time the
        smallest file that covers what is still needed, else the biggest), then trim the rest of the pool to
        ``room`` bytes: what the capacity leaves beside entries and reservations."""
        files = self.pool()
        taken = 0
        while files and taken < nbytes:
            need = nbytes - taken
            covering = [f for f in files if f[1] >= need]
            pick = min(covering, key=lambda f: f[1]) if covering else files[0]
            files.remove(pick)
            with contextlib.suppress(FileNotFoundError):
                os.rename(pick[0], tmp / f"{SPARE_PREFIX}{pick[0].name}")
                taken += pick[1]
        self.trim_pool(max(0, room))

    def _cleanup_stale(self, filling: str) -> None:
        """Delete fill directories no live process owns (``filling``: the key whose fill lock we hold)."""
        for d in (self.root / ".tmp").iterdir():
            key = d.name.rsplit(".", 1)[0]
            if key == filling:  # we hold its fill lock, so this one is a dead process's leftover
                shutil.rmtree(d, ignore_errors=True)
                continue
            probe = _try_lock(self._lockfile(key, "fill"), fcntl.LOCK_EX)
            if probe is not None:  # nobody fills this key: a crashed fill left it
                log.info("removing the leftovers of an interrupted fill: %s", d)
                shutil.rmtree(d, ignore_errors=True)
                probe.release()
        for d in (self.root / ".trash").iterdir():
            shutil.rmtree(d, ignore_errors=True)

    def _reserve(self, key: str, nbytes: int, on_evict: Callable[[str], None] | None) -> Path:
        """Evict LRU entries not in use until ``nbytes`` fit, then create the hidden fill directory."""
        with contextlib.closing(_LockCtx(self.root / ".locks" / "cache.lock")):
            self._cleanup_stale(key)
            if self.capacity is not None:
                if nbytes > self.capacity:
                    raise CacheFull(
                        f"{key} needs {nbytes} bytes, more than the whole {self.tier} cache capacity of "
                        f"{self.capacity} bytes at {self.root}; raise the capacity",
                        tier=self.tier,
                        needed=nbytes,
                        capacity=self.capacity,
                    )
                entries = self.entries()
                used = sum(e.bytes for e in entries) + sum(r for _, r in self._reservations())
                for e in entries:
                    if used + nbytes <= self.capacity:
                        break
                    if e.key == key or e.in_use:
                        continue
                    try:
                        if self.evict(e.key):
                            used -= e.bytes
                            if on_evict is not None:
                                on_evict(e.key)
                    except EntryInUse:
                        continue
                if used + nbytes > self.capacity:
                    raise CacheFull(
                        f"no room for {key} ({nbytes} bytes) in the {self.tier} cache at {self.root}: "
                        f"{used} of {self.capacity} bytes are held by checkpoints in use or being filled; "
                        "free some (stop the processes using them) or raise the capacity",
                        tier=self.tier,
                        needed=nbytes,
                        capacity=self.capacity,
                    )
            tmp = self.root / ".tmp" / f"{key}.{uuid.uuid4().hex[:12]}"
            tmp.mkdir(mode=0o700)
            (tmp / _RESERVED).write_text(str(nbytes))
            if self.page_pool:
                assert self.capacity is not None
                self._claim_pool(tmp, nbytes, self.capacity - used - nbytes)
            else:
                self.trim_pool(0)  # a pool left by an earlier run with the pool on
            return tmp

    # -- filling ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def fill_lock(self, key: str) -> Iterator[None]:
        """Exclusive right to fill ``key`` (a second filler waits here, then usually finds it published)."""
        lock = _Lock(self._lockfile(validate_name(key), "fill"), fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock.release()

    def try_fill_lock(self, key: str) -> _Lock | None:
        """The fill lock of ``key`` if no one holds it (release it with ``.release()``), else None."""
        return _try_lock(self._lockfile(validate_name(key), "fill"), fcntl.LOCK_EX)

    @contextlib.contextmanager
    def filling(
        self, key: str, nbytes: int, *, on_evict: Callable[[str], None] | None = None
    ) -> Iterator[Fill]:
        """Reserve room and a hidden directory for ``key``; publish it atomically when the block succeeds.

        The caller holds :meth:`fill_lock` for ``key`` and writes every file into ``fill.path``, ``index.json``
        last. On an exception the directory is removed and nothing becomes visible. After the block,
        ``fill.lease`` holds the published entry in use.
        """
        tmp = self._reserve(key, nbytes, on_evict)
        fill = Fill(tmp)
        try:
            yield fill
            for spare in tmp.glob(f"{SPARE_PREFIX}*"):  # pool files the loaders did not need
                spare.unlink()
            (tmp / _RESERVED).unlink()
            if not (tmp / spec.INDEX_FILE).is_file():
                raise RuntimeError(f"fill of {key} wrote no index.json")
            lock = _Lock(self._lockfile(key), fcntl.LOCK_SH)  # in use from the moment it is visible
            try:
                os.rename(tmp, self.root / key)
            except OSError as e:
                lock.release()
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise EntryInUse(f"{key} reappeared in {self.root} during the fill") from e
                raise
            _fsync_dir(self.root)
            fill.lease = Lease(self, key, lock)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_or_fill(
        self,
        key: str,
        nbytes: int,
        fill: Callable[[Path], None],
        *,
        verify: bool = False,
        on_evict: Callable[[str], None] | None = None,
    ) -> tuple[Lease, bool]:
        """A lease on ``key``, filling it with ``fill(tmpdir)`` first when absent. Returns ``(lease, filled)``.

        Concurrent callers (threads or processes) share one fill: the others wait and then map the result.
        """
        lease = self.lookup(key, verify=verify)
        if lease is not None:
            return lease, False
        with self.fill_lock(key):
            lease = self.lookup(key, verify=verify)
            if lease is not None:
                return lease, False
            with self.filling(key, nbytes, on_evict=on_evict) as f:
                fill(f.path)
            assert f.lease is not None
            return f.lease, True


class Fill:
    """A fill in progress: the hidden directory to write into, and the lease once published."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lease: Lease | None = None


class _LockCtx:
    def __init__(self, path: Path) -> None:
        self._lock = _Lock(path, fcntl.LOCK_EX)

    def close(self) -> None:
        self._lock.release()


def _dir_bytes(d: Path) -> int:
    total = 0
    with os.scandir(d) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                total += e.stat(follow_symlinks=False).st_size
    return total


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take_spare(fill_dir: Path, name: str, size: int) -> int:
    """Rename the best pool file claimed by the fill in ``fill_dir`` (a ``.spare-*``) to ``name``, truncated
    or extended to ``size``: the smallest one at least ``size`` long, else the biggest. Returns the bytes
    whose pages it brings (0 when there was none: the caller creates the file as usual)."""
    spares = []
    for p in fill_dir.glob(f"{SPARE_PREFIX}*"):
        with contextlib.suppress(OSError):
            spares.append((p.stat().st_size, p))
    if not spares or size <= 0:
        return 0
    big = [s for s in spares if s[0] >= size]
    n, path = min(big) if big else max(spares)
    dest = fill_dir / name
    os.rename(path, dest)
    os.truncate(dest, size)
    return min(n, size)


class HostCache(CacheDir):
    """The host-memory tier: checkpoints as files in shared memory (``/dev/shm``), mapped without copying.

    ``/dev/shm`` is a tmpfs of 4 KiB pages: mapping a 512 MiB entry costs ~5x a warm ext4 file. A tmpfs
    mounted with ``huge=within_size`` (``mount -t tmpfs -o size=64g,huge=within_size tmpfs /mnt/ws-mem``, as
    root; see docs/loaders.md) maps as fast as ext4; point the root there. :attr:`huge_pages` tells which.
    """

    tier = "memory"
    populate = True
    pools_pages = True

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        capacity: int | str | None = None,
        *,
        page_pool: bool | None = None,
    ) -> None:
        super().__init__(default_host_root() if root is None else root, capacity, page_pool=page_pool)
        self.huge_pages = huge_tmpfs(self.root)


class DiskCache(CacheDir):
    """The local-disk tier: checkpoints in a directory on a local file system."""

    tier = "disk"


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``pred`` until true or ``timeout`` seconds pass (for tests and the owner classes)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
