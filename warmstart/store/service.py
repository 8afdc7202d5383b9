"""The node store: one daemon per node owning its disk tier and host-memory tier, over a small HTTP API.

Endpoints (JSON unless noted; model names must match ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``, else 400):

* ``GET  /v1/models`` → ``{"models": [{"name", "tier", "tiers", "bytes", "last_use", "in_use", "promoting"}, ...]}``
  (``tier`` is the best one holding the model: ``memory`` before ``disk``; ``promoting``: a copy from disk to
  memory is scheduled or running, see ``locate``).
* ``POST /v1/models/{name}/ensure?tier=memory|disk`` → when the model is there: ``{"name", "tier", "path",
  "memory_root", "hit", "seconds", "transfers": [{"source", "targets", "bytes", "seconds", "bytes_per_s"}]}``.
  Concurrent requests for one model share one transfer.
* ``POST /v1/models/{name}/locate`` → where a process on this node should map the model right now: the
  memory tier when it is there; else the disk tier when it is there (mapped straight from the page cache, no
  copy; the memory tier is filled from it in the background :data:`PROMOTE_DELAY_S` later, off the load's
  critical path); else it is fetched into the memory tier as ``ensure?tier=memory`` would. Same answer as
  ``ensure`` plus ``root``, the cache directory holding ``path``.
* ``POST /v1/models/{name}/evict?tier=memory|disk|all`` → ``{"evicted": [tiers]}``; 409 when in use. It
  waits for an ensure of the model in progress and for its background disk copy (cancelled when the disk
  tier is evicted), so nothing of the model reappears afterwards.
* ``GET  /v1/bandwidth`` → ``{"memory_bps", "disk_bps", "remote_bps"}``: measured by this store (the local
  tiers by a startup probe that reads them as a start does; ``remote_bps`` by every fill from the remote,
  null until one: the scheduler then places on this node at an assumed figure, see docs/scheduler.md).
* ``GET  /metrics`` Prometheus text; ``GET /healthz`` → ``{"ok": true}``.

Errors are ``{"error": {"type", "message"}}`` with 400 (bad name or tier), 404 (no such model at the
remote), 409 (in use), 507 (capacity exhausted), 504 (a remote read missed its deadline,
``WARMSTART_REMOTE_TIMEOUT_S``), 502 (other remote failure), 500 (anything else).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from warmstart.errors import (
    CacheFull,
    CheckpointNotFound,
    EntryInUse,
    InvalidModelName,
    RemoteTimeout,
    SourceError,
    WarmstartError,
)
from warmstart.loaders.hostcache import DiskCache, HostCache, default_host_root, prefault, validate_name
from warmstart.loaders.pipeline import Transfer
from warmstart.loaders.tiers import DiskCopy, Tiers, ensure_disk, ensure_memory
from warmstart.units import parse_size

log = logging.getLogger(__name__)

TIERS = ("memory", "disk")
PROBE_BYTES = 64 * 1024**2
# A model located in the disk tier is copied into the memory tier this long afterwards: by then the process
# that mapped it has built its engine and answered its first token, so the copy does not compete with them.
PROMOTE_DELAY_S = 2.0
# Likewise, the background memory -> disk copy after a remote fill starts this long after the fill.
DISK_COPY_DELAY_S = 2.0


@dataclass(frozen=True)
class StoreConfig:
    """Configuration of one store daemon (validated on construction)."""

    root: Path
    remote: str
    memory_capacity: int
    disk_capacity: int
    memory_root: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8073
    probe: bool = True

    def __post_init__(self) -> None:
        if self.memory_capacity <= 0 or self.disk_capacity <= 0:
            raise ValueError("memory and disk capacities must be positive sizes (e.g. 8GiB)")
        if "://" not in self.remote:
            raise ValueError(f"--remote must be a URI prefix such as s3://models/ckpts, got {self.remote!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")

    @classmethod
    def from_args(
        cls,
        *,
        root: str,
        remote: str,
        memory_capacity: str,
        disk_capacity: str,
        listen: str,
        memory_root: str | None,
    ) -> StoreConfig:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
        return cls(
            root=Path(root),
            remote=remote,
            memory_capacity=parse_size(memory_capacity),
            disk_capacity=parse_size(disk_capacity),
            memory_root=Path(memory_root) if memory_root else None,
            host=host,
            port=int(port),
        )

    def resolved_memory_root(self) -> Path:
        """The memory tier's directory (default: ``/dev/shm/warmstart-<uid>/store-<hash of root>``)."""
        if self.memory_root is not None:
            return self.memory_root
        tag = xxhash.xxh3_64_hexdigest(str(self.root.resolve()).encode())[:12]
        return default_host_root() / f"store-{tag}"


class _Metrics:
    def __init__(self, store: NodeStore) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.bytes = Gauge("warmstart_store_bytes", "Bytes held per tier", ["tier"], registry=self.registry)
        self.capacity = Gauge(
            "warmstart_store_capacity_bytes", "Capacity per tier", ["tier"], registry=self.registry
        )
        for tier, cache in (("memory", store.memory), ("disk", store.disk)):
            self.bytes.labels(tier).set_function(cache.used_bytes)
            self.capacity.labels(tier).set(cache.capacity or 0)
        self.pool = Gauge(
            "warmstart_store_page_pool_bytes",
            "Bytes of the memory tier's page pool (evicted entries' pages kept for the next fills)",
            registry=self.registry,
        )
        self.pool.set_function(store.memory.pool_bytes)
        self.load_seconds = Histogram(
            "warmstart_store_load_seconds",
            "Duration of transfers into the store's tiers",
            ["source"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.transferred = Counter(
            "warmstart_store_transferred_bytes",
            "Bytes moved, by source tier",
            ["source"],
            registry=self.registry,
        )
        self.transfers = Counter(
            "warmstart_store_transfers", "Transfers, by source tier", ["source"], registry=self.registry
        )
        self.hits = Counter(
            "warmstart_store_hits", "Ensure requests already satisfied", ["tier"], registry=self.registry
        )
        self.misses = Counter(
            "warmstart_store_misses", "Ensure requests that moved bytes", ["tier"], registry=self.registry
        )
        self.evictions = Counter(
            "warmstart_store_evictions", "Entries evicted", ["tier"], registry=self.registry
        )
        self.corrupt = Counter(
            "warmstart_store_corrupt_copies",
            "Cached copies that failed verification and were removed (then fetched again from the next tier)",
            ["tier"],
            registry=self.registry,
        )
        self.bandwidth = Gauge(
            "warmstart_store_bandwidth_bytes_per_second", "Measured", ["tier"], registry=self.registry
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


class NodeStore:
    """The store's logic, independent of HTTP: ensure, evict, inventory and bandwidths."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        # the store hands out only copies it verified itself (a seal file another process wrote is re-checked)
        self.memory = HostCache(config.resolved_memory_root(), config.memory_capacity, trust_seal_files=False)
        self.disk = DiskCache(config.root / "disk", config.disk_capacity, trust_seal_files=False)
        self._bw: dict[str, float | None] = {"memory": None, "disk": None, "remote": None}
        self._bw_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._promotions: dict[str, threading.Event] = {}  # model -> cancel event of its pending promotion
        self._quiet = threading.local()  # set while promoting: its page-cache reads say nothing of the disk
        self.metrics = _Metrics(self)
        for tname, cache in (("memory", self.memory), ("disk", self.disk)):
            cache.on_corrupt = self._corrupt_counter(tname)
        self.tiers = Tiers(
            memory=self.memory,
            disk=self.disk,
            remote=config.remote,
            on_transfer=self._on_transfer,
            on_evict=self._on_evict,
            disk_copy_delay_s=DISK_COPY_DELAY_S,
        )
        if config.probe:
            self.probe()

    # -- bandwidth -------------------------------------------------------------------------------------------

    def _record_bw(self, tier: str, bps: float) -> None:
        with self._bw_lock:
            old = self._bw[tier]
            self._bw[tier] = bps if old is None else 0.5 * old + 0.5 * bps
            self.metrics.bandwidth.labels(tier).set(self._bw[tier] or 0.0)

    def probe(self) -> None:
        """Measure both local tiers with a small real transfer (64 MiB), so bandwidths exist from the start.

        The disk figure is only ever this probe: a start from the disk tier maps the disk copy and reads it
        in with :func:`~warmstart.loaders.hostcache.prefault`, so the probe reads a cold file the same way.
        Disk → memory copies are not disk reads alone (they hash and allocate tmpfs pages: 0.5-0.7 GB/s
        against 1.5-2 GB/s for the mapped read here), and counting them made a scheduler prefer a remote
        load over a local disk copy.
        """
        data = np.random.default_rng(0).integers(0, 255, PROBE_BYTES, dtype=np.uint8)
        probe_disk = self.disk.root / ".tmp" / f".probe-{os.getpid()}"
        probe_mem = self.memory.root / ".tmp" / f".probe-{os.getpid()}"
        try:
            with open(probe_disk, "wb") as f:
                f.write(data.data)
                f.flush()
                os.fsync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            with open(probe_disk, "rb") as f:
                t0 = time.perf_counter()
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                prefault([m])
                self._record_bw("disk", PROBE_BYTES / max(time.perf_counter() - t0, 1e-9))
                m.close()
            probe_mem.write_bytes(data.data)
            with open(probe_mem, "rb") as f:
                t0 = time.perf_counter()
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                int(np.frombuffer(m, np.uint8)[::4096].sum())  # touch every page, as a loader's user would
                self._record_bw("memory", PROBE_BYTES / max(time.perf_counter() - t0, 1e-9))
                m.close()
        except OSError as e:
            log.warning("bandwidth probe failed: %s", e)
        finally:
            probe_disk.unlink(missing_ok=True)
            probe_mem.unlink(missing_ok=True)

    def bandwidth(self) -> dict[str, float | None]:
        with self._bw_lock:
            return {f"{k}_bps": v for k, v in self._bw.items()}

    def _on_transfer(self, tr: Transfer) -> None:
        self.metrics.load_seconds.labels(tr.source).observe(tr.seconds)
        self.metrics.transferred.labels(tr.source).inc(tr.nbytes)
        self.metrics.transfers.labels(tr.source).inc()
        if getattr(self._quiet, "on", False):
            return
        if tr.seconds > 0 and tr.nbytes > 0 and tr.source == "remote":  # disk: see probe(); memory: writes
            self._record_bw(tr.source, tr.bytes_per_s)

    def _on_evict(self, tier: str, key: str) -> None:
        self.metrics.evictions.labels(tier).inc()

    def _corrupt_counter(self, tier: str) -> Callable[[str, BaseException], None]:
        return lambda key, error: self.metrics.corrupt.labels(tier).inc()

    # -- operations ------------------------------------------------------------------------------------------

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())

    def uri(self, name: str) -> str:
        return self.config.remote.rstrip("/") + "/" + validate_name(name) + "/"

    def ensure(self, name: str, tier: str) -> dict[str, Any]:
        """Make ``name`` present in ``tier`` (``memory`` also fills ``disk`` on the way from remote)."""
        validate_name(name)
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
        t0 = time.perf_counter()
        with self._lock(name):  # threads of this daemon share one transfer; other processes wait on flocks
            if tier == "memory":
                lease, transfers = ensure_memory(self.uri(name), name, self.tiers)
            else:
                lease, transfers = ensure_disk(self.uri(name), name, self.tiers)
            lease.release()
        return self._answer(name, tier, lease.path, transfers, t0)

    def locate(self, name: str) -> dict[str, Any]:
        """Where to map ``name`` now: memory if there, else disk if there (promoted later), else fetched."""
        validate_name(name)
        t0 = time.perf_counter()
        with self._lock(name):
            if not self.memory.contains(name):
                lease = self.disk.lookup(name)
                if lease is not None:
                    lease.release()
                    self._schedule_promotion(name)
                    return self._answer(name, "disk", lease.path, [], t0)
            lease, transfers = ensure_memory(self.uri(name), name, self.tiers)
            lease.release()
        return self._answer(name, "memory", lease.path, transfers, t0)

    def _schedule_promotion(self, name: str) -> None:
        """Copy ``name`` from disk to memory :data:`PROMOTE_DELAY_S` from now, unless evicted meanwhile.
        Called with the model's lock held."""
        if name in self._promotions:
            return
        cancel = self._promotions[name] = threading.Event()

        def promote() -> None:
            try:
                if cancel.wait(PROMOTE_DELAY_S):
                    return
                with self._lock(name):
                    if cancel.is_set() or self.memory.contains(name) or not self.disk.contains(name):
                        return
                    self._quiet.on = True
                    try:
                        lease, _ = ensure_memory(self.uri(name), name, self.tiers)
                        lease.release()
                    finally:
                        self._quiet.on = False
            except Exception as e:  # the disk tier still serves the model
                log.info("promoting %s to the memory tier failed: %s", name, e)
            finally:
                with self._lock(name):
                    if self._promotions.get(name) is cancel:
                        del self._promotions[name]

        threading.Thread(target=promote, name=f"warmstart-promote-{name}", daemon=True).start()

    def _answer(
        self, name: str, tier: str, path: Path, transfers: list[Transfer], t0: float
    ) -> dict[str, Any]:
        (self.metrics.misses if transfers else self.metrics.hits).labels(tier).inc()
        return {
            "name": name,
            "tier": tier,
            "path": str(path),
            "root": str((self.memory if tier == "memory" else self.disk).root),
            "memory_root": str(self.memory.root),
            "hit": not transfers,
            "seconds": time.perf_counter() - t0,
            "transfers": [
                {
                    "source": x.source,
                    "targets": list(x.targets),
                    "bytes": x.nbytes,
                    "seconds": x.seconds,
                    "bytes_per_s": x.bytes_per_s,
                }
                for x in transfers
            ],
        }

    def evict(self, name: str, tier: str) -> list[str]:
        """Remove ``name`` from ``tier`` (``memory``, ``disk`` or ``all``); returns the tiers it left.

        An ensure of ``name`` in progress finishes first. Its background disk copy (which holds the memory
        entry and would publish the disk entry after this returned) is waited for; when the disk tier is
        evicted it is cancelled first, so it publishes nothing and leaves no temporary files.
        """
        validate_name(name)
        if tier not in (*TIERS, "all"):
            raise ValueError(f"tier must be memory, disk or all, got {tier!r}")
        with self._lock(name):
            pending = self._promotions.pop(name, None)
            if (
                pending is not None
            ):  # a promotion waiting for its delay never starts; a running one holds the lock
                pending.set()
            for copy in DiskCopy.running(name, self.tiers):
                if tier != "memory":
                    copy.cancel()
                copy.join()
            done = []
            for tname, cache in (("memory", self.memory), ("disk", self.disk)):
                if tier in (tname, "all") and cache.evict(name):
                    self.metrics.evictions.labels(tname).inc()
                    done.append(tname)
        return done

    def inventory(self) -> list[dict[str, Any]]:
        models: dict[str, dict[str, Any]] = {}
        for tname, cache in (("disk", self.disk), ("memory", self.memory)):
            for e in cache.entries():
                m = models.setdefault(
                    e.key,
                    {
                        "name": e.key,
                        "tier": tname,
                        "tiers": [],
                        "bytes": e.bytes,
                        "last_use": 0.0,
                        "in_use": False,
                        "promoting": e.key in self._promotions,
                    },
                )
                m["tiers"].insert(0, tname)
                m["tier"] = tname  # memory is visited last: the best tier wins
                m["last_use"] = max(m["last_use"], e.last_use)
                m["in_use"] = m["in_use"] or e.in_use
        return sorted(models.values(), key=lambda m: m["name"])


# --- HTTP --------------------------------------------------------------------------------------------------

_STATUS: list[tuple[type[BaseException], int]] = [
    (InvalidModelName, 400),
    (ValueError, 400),
    (CheckpointNotFound, 404),
    (FileNotFoundError, 404),
    (EntryInUse, 409),
    (CacheFull, 507),
    (RemoteTimeout, 504),  # the remote missed its deadline (WARMSTART_REMOTE_TIMEOUT_S)
    (SourceError, 502),
    (WarmstartError, 500),
]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, e: BaseException | str) -> None:
        kind = type(e).__name__ if isinstance(e, BaseException) else "BadRequest"
        self._json(status, {"error": {"type": kind, "message": " ".join(str(e).split())}})

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        store = self.server.store
        try:
            if method == "GET" and parts == ["healthz"]:
                self._json(200, {"ok": True})
            elif method == "GET" and parts == ["metrics"]:
                self._send(200, store.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
            elif method == "GET" and parts == ["v1", "models"]:
                self._json(200, {"models": store.inventory()})
            elif method == "GET" and parts == ["v1", "bandwidth"]:
                self._json(200, store.bandwidth())
            elif (
                method == "POST"
                and len(parts) == 4
                and parts[:2] == ["v1", "models"]
                and parts[3] == "ensure"
            ):
                self._json(200, store.ensure(parts[2], query.get("tier", ["memory"])[0]))
            elif (
                method == "POST"
                and len(parts) == 4
                and parts[:2] == ["v1", "models"]
                and parts[3] == "locate"
            ):
                self._json(200, store.locate(parts[2]))
            elif (
                method == "POST" and len(parts) == 4 and parts[:2] == ["v1", "models"] and parts[3] == "evict"
            ):
                self._json(200, {"evicted": store.evict(parts[2], query.get("tier", ["all"])[0])})
            elif len(parts) >= 3 and parts[:2] == ["v1", "models"]:
                validate_name(parts[2])  # a bad name is a 400 even on an unknown route
                self._error(404, f"no route {method} {url.path}")
            else:
                self._error(404, f"no route {method} {url.path}")
        except BaseException as e:
            for cls, status in _STATUS:
                if isinstance(e, cls):
                    if status >= 500:
                        log.warning("%s %s failed: %s", method, url.path, e)
                    self._error(status, e)
                    return
            log.exception("%s %s failed", method, url.path)
            self._error(500, e)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._dispatch("POST")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: NodeStore) -> None:
        self.store = store
        super().__init__((store.config.host, store.config.port), _Handler)


def serve(config: StoreConfig, *, ready: threading.Event | None = None) -> None:
    """Run the store until interrupted (SIGINT / SIGTERM → KeyboardInterrupt / SystemExit)."""
    import signal

    store = NodeStore(config)
    if not store.memory.huge_pages:
        log.info(
            "memory tier %s uses 4 KiB pages; a tmpfs mounted with huge=within_size maps ~5x faster "
            "(see docs/loaders.md, then pass --memory-root)",
            store.memory.root,
        )
    server = _Server(store)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
    log.info(
        "warmstart store listening on %s:%d (remote %s)", config.host, server.server_address[1], config.remote
    )
    print(f"warmstart store listening on http://{config.host}:{server.server_address[1]}", flush=True)  # noqa: T201
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
