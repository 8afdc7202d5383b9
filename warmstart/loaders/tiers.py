"""The tier chain: resolve a checkpoint reference to host memory, filling the tiers above it on the way.

``open_host(ckpt)`` returns a :class:`HostCheckpoint`: the validated index plus one buffer per partition
(a mapping of the memory-tier files, of the local files, or an anonymous buffer) from which framework
tensors are made as views. Where the bytes come from:

========================  ==================================================================================
configuration             local path                         URI                        bare model name
========================  ==================================================================================
node store                (as embedded)                      (as embedded)              store ensures it in
                                                                                        memory; map its files
memory (+disk) tier       disk → memory tier, then map       memory ← disk ← remote     ``<remote>/<name>/``
disk tier only            map the files                      disk ← remote, then map    ``<remote>/<name>/``
nothing (embedded)        map the files (zero copy)          remote → aligned buffer    :class:`ModelNotFound`
========================  ==================================================================================

A fill from remote writes the memory tier and the disk tier in one overlapped pass (see ``pipeline``).

Every fill checks every chunk against its xxh3 as it writes it and seals the copy; a copy whose seal broke
is re-hashed before it is used again, and one that fails is removed and fetched from the next tier (see
``hostcache`` and docs/loaders.md, "Verified copies").
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import xxhash

from warmstart.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    InvalidModelName,
    ModelNotFound,
    SealBroken,
)
from warmstart.format import spec
from warmstart.format.index import Index
from warmstart.format.reader import read_index
from warmstart.format.sources import LocalSource, TensorStoreSource, is_uri
from warmstart.loaders import pipeline
from warmstart.loaders.host import HostCheckpoint, from_lease, local_reader, map_partitions
from warmstart.loaders.hostcache import DiskCache, HostCache, Lease, default_host_root, validate_name
from warmstart.loaders.pipeline import Transfer
from warmstart.loaders.remote import HttpReader, http_reader_for
from warmstart.loaders.storeclient import StoreClient
from warmstart.units import parse_size

log = logging.getLogger(__name__)

ENV_STORE = "WARMSTART_STORE"
ENV_MEMORY_CACHE = "WARMSTART_MEMORY_CACHE"
ENV_MEMORY_CAPACITY = "WARMSTART_MEMORY_CAPACITY"
ENV_DISK_CACHE = "WARMSTART_DISK_CACHE"
ENV_DISK_CAPACITY = "WARMSTART_DISK_CAPACITY"
ENV_REMOTE = "WARMSTART_REMOTE"

Ref = str | os.PathLike[str]


@dataclass(frozen=True)
class Tiers:
    """Which tiers a loader uses. The default (all None) is the embedded mode: straight from path or URI.

    ``store`` is a node-store URL (``http://127.0.0.1:PORT``); when set, bare model names are resolved by the
    store. ``remote`` is the URI prefix under which bare model names live (``<remote>/<name>/``).
    """

    memory: HostCache | None = None
    disk: DiskCache | None = None
    remote: str | None = None
    store: str | None = None
    verify: bool = False
    direct: bool = False
    disk_copy_delay_s: float = 0.0
    """How long a background memory -> disk copy waits before it starts (the node store waits until the
    process that asked for the checkpoint has built its engine and answered, so the copy does not compete)."""
    on_transfer: Callable[[Transfer], None] | None = field(default=None, compare=False)
    on_evict: Callable[[str, str], None] | None = field(default=None, compare=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Tiers:
        """Tiers named by ``WARMSTART_STORE``, ``WARMSTART_MEMORY_CACHE`` (a directory, or ``1`` for
        ``/dev/shm/warmstart-<uid>``), ``WARMSTART_MEMORY_CAPACITY``, ``WARMSTART_DISK_CACHE``,
        ``WARMSTART_DISK_CAPACITY`` and ``WARMSTART_REMOTE``; unset means embedded."""
        e = dict(os.environ) if env is None else env
        mem_dir = e.get(ENV_MEMORY_CACHE) or None
        memory = None
        if mem_dir is not None:
            root = (
                default_host_root() if mem_dir.lower() in ("1", "true", "yes", "default") else Path(mem_dir)
            )
            memory = HostCache(root, _size(e.get(ENV_MEMORY_CAPACITY)))
        disk_dir = e.get(ENV_DISK_CACHE) or None
        disk = DiskCache(disk_dir, _size(e.get(ENV_DISK_CAPACITY))) if disk_dir else None
        return cls(memory=memory, disk=disk, remote=e.get(ENV_REMOTE) or None, store=e.get(ENV_STORE) or None)


def _size(text: str | None) -> int | None:
    return None if not text else parse_size(text)


def cache_key(location: str) -> str:
    """A cache-entry name for a URI or path: a readable tail plus a hash of the whole location."""
    tail = location.rstrip("/").rsplit("/", 1)[-1]
    tail = "".join(c if c.isalnum() or c in "._-" else "_" for c in tail)[:60].lstrip("._-") or "ckpt"
    return f"{tail}-{xxhash.xxh3_64_hexdigest(location.encode())[:16]}"


def open_host(ckpt: Ref, *, tiers: Tiers | None = None) -> HostCheckpoint:
    """Bring the checkpoint ``ckpt`` (path, URI, or model name) into host memory through the configured tiers."""
    t = Tiers.from_env() if tiers is None else tiers
    ref = os.fspath(ckpt)
    if is_uri(ref):
        if ref.startswith("file://") and t.memory is None and t.disk is None:
            return _open_local(Path(ref[len("file://") :]), t)
        return _open_remote(ref, cache_key(ref.rstrip("/") + "/"), t)
    if Path(ref).is_dir() or "/" in ref or ref.startswith("."):
        return _open_local(Path(ref), t)
    try:
        name = validate_name(ref)
    except InvalidModelName:
        raise CheckpointNotFound(f"no checkpoint at {ref!r}: not a directory, URI or model name") from None
    if t.store is not None:
        return StoreClient(t.store).open_host(name)
    if t.remote is not None:
        return _open_remote(t.remote.rstrip("/") + "/" + name + "/", name, t)
    raise ModelNotFound(
        f"{ref!r} is neither a local directory nor a URI, and no node store or remote is configured to "
        f"resolve model names: set {ENV_STORE}=http://HOST:PORT or {ENV_REMOTE}=s3://bucket/prefix, or pass a path"
    )


def _open_local(root: Path, t: Tiers) -> HostCheckpoint:
    src = LocalSource(root, direct=t.direct)
    if not root.is_dir():
        raise CheckpointNotFound(f"no checkpoint at {root}: not a directory")
    index_bytes = src.read(spec.INDEX_FILE) if src.exists(spec.INDEX_FILE) else b""
    if not index_bytes:
        read_index(src)  # raises the precise error
    index = Index.from_json_bytes(index_bytes)
    if t.memory is None:
        ckpt_sizes(root, index)
        return HostCheckpoint(
            index,
            map_partitions(root, index, None),
            tier="disk",
            location=str(root),
            path=root,
            read_file=local_reader(root),
        )
    key = cache_key(str(root.resolve()))
    transfers: list[Transfer] = []

    def fill(tmp: Path) -> None:
        secs = pipeline.disk_to(root, index, tmp, verify=True, direct=t.direct)
        pipeline.copy_model_files(src, index, index_bytes, [tmp])
        transfers.append(Transfer("disk", ("memory",), index.total_bytes, secs))

    lease, _ = t.memory.get_or_fill(
        key, index.total_bytes, fill, verify=t.verify, on_evict=_evict_cb(t, "memory")
    )
    _report(t, transfers)
    return from_lease(lease, str(root), transfers)


def ckpt_sizes(root: Path, index: Index) -> None:
    from warmstart.format.reader import Checkpoint

    Checkpoint(LocalSource(root), index).check_sizes()


def _evict_cb(t: Tiers, tier: str) -> Callable[[str], None] | None:
    cb = t.on_evict
    if cb is None:
        return None
    return lambda key: cb(tier, key)


def _report(t: Tiers, transfers: list[Transfer]) -> None:
    if t.on_transfer is not None:
        for tr in transfers:
            t.on_transfer(tr)


def _fetch_index(uri: str) -> tuple[TensorStoreSource | HttpReader, Index, bytes]:
    """The remote source of ``uri`` (direct HTTP where possible, else TensorStore) and its validated index."""
    src: TensorStoreSource | HttpReader = http_reader_for(uri) or TensorStoreSource(uri)
    try:
        raw = src.read(spec.INDEX_FILE)
    except FileNotFoundError:
        raise CheckpointNotFound(f"no checkpoint at {uri}: index.json is missing") from None
    return src, Index.from_json_bytes(raw), raw


def ensure_disk(uri: str, key: str, t: Tiers) -> tuple[Lease, list[Transfer]]:
    """Ensure ``key`` (from ``uri``) is in the disk tier; returns a lease on it and the transfers made."""
    assert t.disk is not None
    transfers: list[Transfer] = []
    lease = t.disk.lookup(key, verify=t.verify)
    if lease is not None:
        return lease, transfers
    with t.disk.fill_lock(key):
        lease = t.disk.lookup(key, verify=t.verify)
        if lease is not None:
            return lease, transfers
        src, index, raw = _fetch_index(uri)
        with t.disk.filling(key, index.total_bytes, on_evict=_evict_cb(t, "disk")) as f:
            secs = pipeline.remote_to(src, index, disk_dir=f.path)
            pipeline.copy_model_files(src, index, raw, [f.path])
        transfers.append(Transfer("remote", ("disk",), index.total_bytes, secs))
        assert f.lease is not None
        _report(t, transfers)
        return f.lease, transfers


def ensure_memory(uri: str, key: str, t: Tiers) -> tuple[Lease, list[Transfer]]:
    """Ensure ``key`` is in the memory tier: from the disk tier if there, else from remote (filling disk too).

    A disk copy that fails its checksums is evicted and the checkpoint is fetched from remote instead.
    """
    assert t.memory is not None
    transfers: list[Transfer] = []
    lease = t.memory.lookup(key, verify=t.verify)
    if lease is not None:
        return lease, transfers
    with t.memory.fill_lock(key):
        lease = t.memory.lookup(key, verify=t.verify)
        if lease is not None:
            return lease, transfers
        filled = _disk_to_memory(key, t, transfers) or _remote_to_memory(uri, key, t, transfers)
    _report(t, transfers)
    return filled, transfers


def _disk_to_memory(key: str, t: Tiers, transfers: list[Transfer]) -> Lease | None:
    """Fill the memory tier from the disk tier's copy (every chunk re-hashed on the way); None when the disk
    tier has no sound copy (a corrupt one is removed from it, even while in use)."""
    assert t.memory is not None
    disk_lease = t.disk.lookup(key) if t.disk is not None else None
    if disk_lease is None:
        return None
    assert t.disk is not None
    try:
        index_bytes = (disk_lease.path / spec.INDEX_FILE).read_bytes()
        index = Index.from_json_bytes(index_bytes)
        with t.memory.filling(key, index.total_bytes, on_evict=_evict_cb(t, "memory")) as f:
            secs = pipeline.disk_to(disk_lease.path, index, f.path, direct=t.direct)
            pipeline.copy_model_files(LocalSource(disk_lease.path), index, index_bytes, [f.path])
    except (CorruptCheckpoint, FileNotFoundError) as e:
        t.disk.drop_corrupt(key, e, lease=disk_lease)
        disk_lease.release()
        return None
    disk_lease.release()
    transfers.append(Transfer("disk", ("memory",), index.total_bytes, secs))
    return f.lease


def _remote_to_memory(uri: str, key: str, t: Tiers, transfers: list[Transfer]) -> Lease:
    """Fill the memory tier from remote; then copy it to the disk tier in the background.

    The disk copy is not needed to use the checkpoint, so it never delays it: the memory tier is published
    as soon as its bytes are verified, and a background thread (:class:`DiskCopy`) copies the published files
    to the disk tier with ``os.sendfile`` (a kernel copy: no Python, no GIL). The disk tier's fill lock is
    taken before the remote read starts, so another process wanting the disk copy waits for this one
    instead of fetching again.
    """
    assert t.memory is not None
    src, index, raw = _fetch_index(uri)
    disk_lock = contextlib.ExitStack()
    copy_to_disk = False
    if t.disk is not None and not t.disk.contains(key):
        held = t.disk.try_fill_lock(key)  # None: another process is filling the disk tier with it already
        if held is not None:
            disk_lock.callback(held.release)
            copy_to_disk = not t.disk.contains(key)
    try:
        with t.memory.filling(key, index.total_bytes, on_evict=_evict_cb(t, "memory")) as f:
            secs = pipeline.remote_to(src, index, mem_dir=f.path)
            pipeline.copy_model_files(src, index, raw, [f.path])
        transfers.append(Transfer("remote", ("memory",), index.total_bytes, secs))
        assert f.lease is not None
        if copy_to_disk:
            DiskCopy.start(key, t, index, disk_lock)
        else:
            disk_lock.close()
    except BaseException:
        disk_lock.close()
        raise
    return f.lease


class _Cancelled(Exception):
    """A background disk copy was cancelled (its checkpoint is being evicted)."""


class DiskCopy:
    """A background copy of a memory-tier entry into the disk tier (see :func:`_remote_to_memory`).

    The thread is not a daemon: a process that loaded a checkpoint finishes writing its disk copy before
    the interpreter exits. A failure (a full disk, say) is logged and kept in :attr:`error`; the memory
    tier already serves the checkpoint. :func:`wait_disk_copies` waits for every copy of this process.
    Evicting the checkpoint (see the node store) cancels its copy with :meth:`cancel` and waits with
    :meth:`join`: a cancelled copy publishes nothing and leaves no temporary files.
    """

    _running: ClassVar[list[DiskCopy]] = []
    _failed: ClassVar[list[BaseException]] = []  # errors not yet collected by wait_disk_copies()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, key: str, t: Tiers, index: Index, disk_lock: contextlib.ExitStack) -> None:
        assert t.memory is not None
        self.key = key
        self.error: BaseException | None = None
        self.transfer: Transfer | None = None
        self._t = t
        self._index = index
        self._disk_lock = disk_lock
        self._hold = t.memory.lookup(key)  # keeps the memory entry from being evicted while it is copied
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"warmstart-disk-copy-{key}", daemon=False)

    @classmethod
    def start(cls, key: str, t: Tiers, index: Index, disk_lock: contextlib.ExitStack) -> DiskCopy:
        c = cls(key, t, index, disk_lock)
        with cls._lock:
            cls._running.append(c)
        c._thread.start()
        return c

    @classmethod
    def running(cls, key: str, t: Tiers) -> list[DiskCopy]:
        """The copies of ``key`` started through ``t`` (the same object) that have not finished."""
        with cls._lock:
            return [c for c in cls._running if c.key == key and c._t is t]

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the copy to publish nothing. It stops at its next check (before reserving room, or once its
        bytes are written) and removes its temporary directory; :meth:`join` waits for that."""
        self._cancel.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the copy to end (without raising its error); True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled

    def _check_source(self) -> None:
        """The disk copy is not re-hashed: it is a kernel copy of the memory-tier files, whose seal stands for
        their verification. It is published only if that seal held before and after the copy."""
        assert self._hold is not None and self._t.memory is not None
        if not self._t.memory.seal_holds(self._hold):
            raise SealBroken(
                f"the memory-tier copy of {self.key} changed after it was verified; not copying it to the disk "
                "tier (its next load re-verifies it)"
            )

    def _run(self) -> None:
        t = self._t
        assert t.disk is not None
        try:
            if self._hold is None:
                log.warning("memory copy of %s vanished before its disk copy; skipping it", self.key)
                return
            if t.disk_copy_delay_s > 0:
                self._cancel.wait(t.disk_copy_delay_s)
            self._check_cancel()
            on_evict = _evict_cb(t, "disk")
            with self._disk_lock, t.disk.filling(self.key, self._index.total_bytes, on_evict=on_evict) as df:
                self._check_source()
                secs = pipeline.local_copy(self._hold.path, self._index, df.path)
                self._check_cancel()  # inside the fill: its temporary directory is removed, nothing published
                self._check_source()  # the kernel copied the verified bytes only if they did not change
            assert df.lease is not None
            df.lease.release()
            self.transfer = Transfer("memory", ("disk",), self._index.total_bytes, secs)
            _report(t, [self.transfer])
        except _Cancelled:
            log.info(
                "disk copy of %s cancelled (evicted while copying); nothing written to %s",
                self.key,
                t.disk.root,
            )
        except BaseException as e:
            self.error = e
            with DiskCopy._lock:
                DiskCopy._failed.append(e)
            log.warning("could not copy %s to the disk tier at %s: %s", self.key, t.disk.root, e)
        finally:
            self._disk_lock.close()
            if self._hold is not None:
                self._hold.release()
            with DiskCopy._lock:
                DiskCopy._running.remove(self)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the copy; raise its error, if any."""
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error


def wait_disk_copies(timeout: float | None = None) -> list[BaseException]:
    """Wait for every background disk-tier copy of this process; returns the errors of the copies that
    failed since the last call (they were logged when they happened)."""
    with DiskCopy._lock:
        running = list(DiskCopy._running)
    for c in running:
        c._thread.join(timeout)
    with DiskCopy._lock:
        errors, DiskCopy._failed[:] = list(DiskCopy._failed), []
    return errors


def _open_remote(uri: str, key: str, t: Tiers) -> HostCheckpoint:
    if t.memory is not None:
        lease, transfers = ensure_memory(uri, key, t)
        return from_lease(lease, uri, transfers)
    if t.disk is not None:
        lease, transfers = ensure_disk(uri, key, t)
        return from_lease(lease, uri, transfers)
    src, index, _ = _fetch_index(uri)
    views = pipeline.anonymous_partitions(index)  # the views keep the buffer out of the pool
    secs = pipeline.remote_to(src, index, buffers=views)
    transfers = [Transfer("remote", ("buffer",), index.total_bytes, secs)]
    _report(t, transfers)
    return HostCheckpoint(index, views, tier="remote", location=uri, read_file=src.read, transfers=transfers)
