"""Node-wide caches of whole checkpoints as directories of files: the host-memory tier and the disk tier.

One :class:`CacheDir` class serves both tiers (:class:`HostCache` under ``/dev/shm``, :class:`DiskCache` on a
local file system). Layout of a cache root::

    <root>/<key>/               a published entry: the checkpoint's files (read-only), index.json written
                                last, and ``.sealed``: what the fill verified (see :class:`Seal`)
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
* Every fill verifies every chunk as it writes it, then seals the entry (:func:`seal_entry`: files made
  read-only, ``.sealed`` records the index's xxh3 and every file's inode, size, mtime and ctime). A lookup
  hands the entry out only while the seal holds (a few ``stat`` calls); when it does not (any process
  wrote, truncated, replaced or re-permissioned a file since), the lookup re-hashes the whole entry under
  the key's fill lock (:func:`verify_entry`), re-seals it when it is sound, and otherwise removes it, even
  while in use (mappings of it stay valid), and reports it absent so that the caller fetches it again from
  the next tier.
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
import json
import logging
import mmap
import os
import shutil
import stat
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from warmstart.errors import CacheFull, ChecksumMismatch, CorruptCheckpoint, EntryInUse, TruncatedPartition
from warmstart.format import spec
from warmstart.format.checksum import xxh3_hex
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

    def __init__(self, cache: CacheDir, key: str, lock: _Lock, dir_ino: int = 0) -> None:
        self.cache = cache
        self.key = key
        self.path = cache.root / key
        self.dir_ino = dir_ino
        """Inode of the entry directory leased (:meth:`CacheDir.drop_corrupt` removes only that one)."""
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


# -- seals: what a fill verified, and whether a copy is still what it verified ---------------------------------

SEAL_FILE = ".sealed"
"""Written into every published entry by the fill (or the re-verification) that hashed all of it."""
_SEAL_FORMAT = "warmstart-seal/1"
_SEAL_MAX_BYTES = 1 << 20
READ_ONLY = 0o400
"""Mode of a sealed entry's files: a process must ``chmod`` one before writing it, which breaks the seal."""
VERIFY_THREADS = 2
VERIFY_PIECE_BYTES = 4 * 1024**2


@dataclass(frozen=True)
class FileStamp:
    """What ``stat`` says of one file of an entry. A write, truncation, replacement or ``chmod`` changes it:
    the ctime moves (and no process can set it back); a file that is not regular gets ``ino`` -1."""

    name: str
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class Seal:
    """The record a fill leaves in its entry (``.sealed``) once every byte was verified: the xxh3 of the
    ``index.json`` whose chunk checksums it checked the bytes against, and the stamp of every file as it
    left them. While the stamps are unchanged, the copy is the bytes that were verified."""

    index_xxh3: str
    files: tuple[FileStamp, ...]

    def to_json(self) -> bytes:
        files = [[f.name, f.ino, f.size, f.mtime_ns, f.ctime_ns] for f in self.files]
        return json.dumps({"format": _SEAL_FORMAT, "index_xxh3": self.index_xxh3, "files": files}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Seal | None:
        """The seal in ``raw``, or None when it is not one (torn, foreign or malformed)."""
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.get("format") != _SEAL_FORMAT or not isinstance(d["files"], list):
                return None
            files = tuple(FileStamp(str(n), int(i), int(s), int(m), int(c)) for n, i, s, m, c in d["files"])
            return cls(str(d["index_xxh3"]), files)
        except (ValueError, TypeError, KeyError, RecursionError):
            return None


def seal_verdict(
    recorded: Seal | None,
    current: tuple[FileStamp, ...],
    remembered: Seal | None,
    *,
    trust_recorded: bool,
) -> bool:
    """Whether an entry may be handed out without re-hashing it: its ``recorded`` seal exists and every file
    still has the stamp it recorded. ``trust_recorded`` False (the node store) also requires the seal to be
    one this process made or re-verified itself (``remembered``): a process that rewrote a file and then
    the seal file beside it does not get its bytes trusted."""
    if recorded is None or recorded.files != current:
        return False
    return trust_recorded or remembered == recorded


def _read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of ``path`` when it is a regular file (not a link, FIFO or device) of at most ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(limit + 1)
        return raw if len(raw) <= limit else None
    finally:
        os.close(fd)


def read_seal(entry: Path) -> Seal | None:
    """The seal recorded in ``entry``, or None (never sealed, removed, or not a valid seal)."""
    raw = _read_regular(entry / SEAL_FILE, _SEAL_MAX_BYTES)
    return None if raw is None else Seal.from_json(raw)


def current_stamps(entry: Path) -> tuple[FileStamp, ...]:
    """The stamp of every file of ``entry`` except its seal, by name (one ``lstat`` each)."""
    out = []
    with os.scandir(entry) as it:
        for e in it:
            if e.name.startswith(SEAL_FILE):
                continue
            st = e.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                out.append(FileStamp(e.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            else:
                out.append(FileStamp(e.name, -1, -1, -1, -1))
    out.sort(key=lambda f: f.name)
    return tuple(out)


def seal_entry(entry: Path) -> Seal:
    """Make every file of ``entry`` read-only and record its seal. Only for bytes that were just verified."""
    index_bytes = _read_regular(entry / spec.INDEX_FILE, spec.MAX_INDEX_BYTES)
    if index_bytes is None:
        raise CorruptCheckpoint(f"{entry / spec.INDEX_FILE} is not a regular file")
    with os.scandir(entry) as it:
        for e in it:
            if (
                not e.name.startswith(SEAL_FILE)
                and e.is_file(follow_symlinks=False)
                and stat.S_IMODE(e.stat(follow_symlinks=False).st_mode) != READ_ONLY
            ):
                os.chmod(e.path, READ_ONLY)
    seal = Seal(xxh3_hex(index_bytes), current_stamps(entry))  # after the chmods: they move the ctimes
    tmp = entry / f"{SEAL_FILE}.tmp-{uuid.uuid4().hex[:12]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, READ_ONLY)
    try:
        os.write(fd, seal.to_json())
    finally:
        os.close(fd)
    os.rename(tmp, entry / SEAL_FILE)
    return seal


def verify_entry(entry: Path, recorded: Seal | None, *, threads: int = VERIFY_THREADS) -> None:
    """Re-hash every chunk and model file of ``entry``; raise a :class:`~warmstart.errors.CorruptCheckpoint`
    (:class:`~warmstart.errors.ChecksumMismatch` naming the chunk) at the first bad one.

    With a ``recorded`` seal, ``index.json`` must also be the one it recorded (else a process could have
    rewritten a chunk and its checksum together). ``threads`` threads read ``VERIFY_PIECE_BYTES`` at a time
    with ``preadv`` into one reused buffer each and hash it (xxh3 releases the GIL); reads, not a mapping,
    so a file truncated meanwhile is an error here, not a SIGBUS in the store.
    """
    index_bytes = _read_regular(entry / spec.INDEX_FILE, spec.MAX_INDEX_BYTES)
    if index_bytes is None:
        raise CorruptCheckpoint(f"{entry / spec.INDEX_FILE} is missing or not a regular file")
    if recorded is not None and xxh3_hex(index_bytes) != recorded.index_xxh3:
        raise ChecksumMismatch(
            f"{entry / spec.INDEX_FILE} changed since the copy was verified",
            file=spec.INDEX_FILE,
            chunk=0,
            start=0,
            end=len(index_bytes),
        )
    index = Index.from_json_bytes(index_bytes)
    Checkpoint(LocalSource(entry), index).check_sizes()
    fds: list[int] = []
    try:
        for p in index.partitions:
            try:
                fds.append(os.open(entry / p.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ELOOP):
                    raise
                raise TruncatedPartition(f"{entry / p.file} is missing or not a regular file") from None
            os.posix_fadvise(fds[-1], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        jobs = [(pi, ci) for pi, p in enumerate(index.partitions) for ci in range(len(p.chunks))]
        jobs.reverse()
        lock = threading.Lock()
        errors: list[BaseException] = []

        def work() -> None:
            buf = mmap.mmap(-1, VERIFY_PIECE_BYTES)
            view = memoryview(buf)
            try:
                while True:
                    with lock:
                        if errors or not jobs:
                            return
                        pi, ci = jobs.pop()
                    part = index.partitions[pi]
                    start, end = index.chunk_range(pi, ci)
                    h = xxhash.xxh3_64()
                    pos = start
                    while pos < end:
                        n = os.preadv(fds[pi], [view[: min(VERIFY_PIECE_BYTES, end - pos)]], pos)
                        if n <= 0:
                            raise TruncatedPartition(
                                f"{entry / part.file} ended at byte {pos}, expected {part.size}"
                            )
                        h.update(view[:n])
                        pos += n
                    if h.hexdigest() != part.chunks[ci]:
                        raise ChecksumMismatch(
                            f"checksum mismatch in {part.file} chunk {ci} (bytes {start}-{end}) of the cached "
                            f"copy {entry}",
                            file=part.file,
                            chunk=ci,
                            start=start,
                            end=end,
                        )
            except BaseException as e:
                with lock:
                    errors.append(e)
            finally:
                view.release()
                buf.close()

        ts = [
            threading.Thread(target=work, name="warmstart-verify")
            for _ in range(max(1, min(threads, len(jobs))))
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]
    finally:
        for fd in fds:
            os.close(fd)
    for f in index.files:
        data = _read_regular(entry / f.name, max(f.size, 0))
        if data is None or len(data) != f.size or xxh3_hex(data) != f.xxh3:
            raise ChecksumMismatch(
                f"model file {f.name} of the cached copy {entry} does not match its index",
                file=f.name,
                chunk=0,
                start=0,
                end=f.size,
            )


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
        trust_seal_files: bool = True,
    ) -> None:
        self.root = Path(root)
        self.capacity = None if capacity is None else parse_size(capacity)
        self.trust_seal_files = trust_seal_files
        """False: hand out only entries whose seal this object made or re-verified (the node store)."""
        self.on_corrupt: Callable[[str, BaseException], None] | None = None
        """Called with the key and the error when a copy failed verification and was removed."""
        self._seals: dict[str, Seal] = {}  # key -> the seal this object made or checked by re-hashing
        self._fill_holders: dict[str, int] = {}  # key -> thread holding this object's fill lock of it
        self._held_lock = threading.Lock()
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

    def lookup(self, key: str, *, verify: bool = False, repair: bool = True) -> Lease | None:
        """A lease on the published entry ``key``, or None when absent.

        The entry is handed out when its seal holds (:func:`seal_verdict`: a few ``stat`` calls); ``verify``
        re-hashes it on every lookup instead. A copy whose seal is broken is re-hashed under the key's fill
        lock: re-sealed when sound, else removed (:meth:`drop_corrupt`) and reported absent, so the caller
        fetches it again. ``repair`` False leaves that to another process (the node store) and reports such a
        copy absent.
        """
        validate_name(key)
        lock = _Lock(self._lockfile(key), fcntl.LOCK_SH)  # waits only while an eviction of key runs
        path = self.root / key
        if not (path / spec.INDEX_FILE).is_file():
            lock.release()
            return None
        if not verify:
            try:
                trusted = self._sealed(key, path)
                dir_ino = os.stat(path).st_ino
            except FileNotFoundError:  # removed meanwhile (dropped as corrupt by another process)
                trusted, dir_ino = False, 0
            if trusted:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(path)
                return Lease(self, key, lock, dir_ino)
        lock.release()
        if not repair:
            return None
        return self._recheck(key, force=verify)

    def _sealed(self, key: str, path: Path) -> bool:
        with self._held_lock:
            remembered = self._seals.get(key)
        return seal_verdict(
            read_seal(path), current_stamps(path), remembered, trust_recorded=self.trust_seal_files
        )

    def seal_holds(self, lease: Lease) -> bool:
        """Whether the entry ``lease`` was taken on is still there, unchanged since it was verified."""
        try:
            return os.stat(lease.path).st_ino == lease.dir_ino and self._sealed(lease.key, lease.path)
        except FileNotFoundError:
            return False

    def _remember(self, key: str, seal: Seal | None) -> None:
        with self._held_lock:
            if seal is None:
                self._seals.pop(key, None)
            else:
                self._seals[key] = seal

    def _recheck(self, key: str, *, force: bool) -> Lease | None:
        """Re-hash entry ``key`` under its fill lock (see :meth:`lookup`); a lease, or None once removed."""
        with self.fill_lock(key):
            lock = _Lock(self._lockfile(key), fcntl.LOCK_SH)
            path = self.root / key
            try:
                if not (path / spec.INDEX_FILE).is_file():
                    lock.release()
                    return None
                dir_ino = os.stat(path).st_ino
                if not force and self._sealed(key, path):  # re-verified by another thread meanwhile
                    return Lease(self, key, lock, dir_ino)
                try:
                    verify_entry(path, read_seal(path))
                except (CorruptCheckpoint, FileNotFoundError) as e:
                    self._drop(key, dir_ino, e)
                    lock.release()
                    return None
                self._remember(key, seal_entry(path))
                log.info("%s copy of %s at %s re-verified and sealed", self.tier, key, self.root)
            except FileNotFoundError:  # removed meanwhile by an eviction
                lock.release()
                return None
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
            return Lease(self, key, lock, dir_ino)

    def drop_corrupt(self, key: str, error: BaseException, *, lease: Lease | None = None) -> bool:
        """Remove entry ``key``, found corrupt (``error``), even while processes use it: their mappings stay
        valid (the files are unlinked, not truncated), new lookups no longer find it. With ``lease``, only
        the entry directory that lease was taken on. False when it is gone already."""
        with self.fill_lock(key):
            path = self.root / key
            try:
                dir_ino = os.stat(path).st_ino
            except FileNotFoundError:
                return False
            if lease is not None and lease.dir_ino and lease.dir_ino != dir_ino:
                return False  # that copy went already; this one was filled since
            return self._drop(key, dir_ino, error)

    def _drop(self, key: str, dir_ino: int, error: BaseException) -> bool:
        """Move the entry away and delete it (the caller holds the key's fill lock). Its files are not pooled:
        a process may still map them."""
        path = self.root / key
        trash = self.root / ".trash" / f"{key}.{uuid.uuid4().hex[:12]}"
        try:
            if os.stat(path).st_ino != dir_ino:
                return False
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        self._remember(key, None)
        shutil.rmtree(trash, ignore_errors=True)
        log.warning(
            "%s copy of %s at %s failed verification and was removed (%s); it is fetched again from the "
            "next tier",
            self.tier,
            key,
            self.root,
            " ".join(str(error).split()),
        )
        if self.on_corrupt is not None:
            self.on_corrupt(key, error)
        return True

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
        self._remember(key, None)
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
        """Exclusive right to fill ``key`` (a second filler waits here, then usually finds it published).

        Re-entrant in the thread that holds it through this object (a lookup inside a fill may re-verify).
        """
        validate_name(key)
        me = threading.get_ident()
        with self._held_lock:
            held = self._fill_holders.get(key) == me
        if held:
            yield
            return
        lock = _Lock(self._lockfile(key, "fill"), fcntl.LOCK_EX)
        with self._held_lock:
            self._fill_holders[key] = me
        try:
            yield
        finally:
            with self._held_lock:
                self._fill_holders.pop(key, None)
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
        last, having verified every byte against the index's checksums as it wrote it. The entry is then
        sealed (:func:`seal_entry`) and published. On an exception the directory is removed and nothing
        becomes visible. After the block, ``fill.lease`` holds the published entry in use.
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
            seal = seal_entry(tmp)  # renaming the directory leaves its files' stamps as they are
            lock = _Lock(self._lockfile(key), fcntl.LOCK_SH)  # in use from the moment it is visible
            try:
                os.rename(tmp, self.root / key)
            except OSError as e:
                lock.release()
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise EntryInUse(f"{key} reappeared in {self.root} during the fill") from e
                raise
            _fsync_dir(self.root)
            self._remember(key, seal)
            fill.lease = Lease(self, key, lock, os.stat(self.root / key).st_ino)
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
    os.chmod(path, 0o600)  # a sealed entry's file is read-only
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
        trust_seal_files: bool = True,
    ) -> None:
        super().__init__(
            default_host_root() if root is None else root,
            capacity,
            page_pool=page_pool,
            trust_seal_files=trust_seal_files,
        )
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
