"""A snapshot of cluster state as plain frozen data, and the store it is read from.

Everything the policy (:mod:`warmstart.scheduler.policy`) decides on is in a :class:`ClusterSnapshot`:
servers (what each has loaded, is loading, has queued, what its node store holds in which tier, and the
bandwidths and Triton load overhead that node measured), the model specs, and the time ``now``. Times are
seconds on the scheduler's monotonic clock; sizes are bytes; bandwidths are bytes per second.

:class:`ClusterStateStore` is the one interface the scheduler's loops read and write that state through.
:class:`InMemoryClusterState` is the single-process default;
:class:`~warmstart.scheduler.etcd_state.EtcdClusterState` implements the same protocol on etcd for several
scheduler replicas (``docs/cluster.md``: key layout, leases, fencing, revisions).
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import operator
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from warmstart.scheduler.errors import (
    InvalidLeaseError,
    InvalidSnapshotError,
    LeaseNotFoundError,
    RevisionConflictError,
    StaleEpochError,
    UnknownModelError,
    UnknownServerError,
)


class Tier(enum.Enum):
    """Where a node store holds a checkpoint; ``NONE``: not held and not fetchable from that node."""

    MEMORY = "memory"
    DISK = "disk"
    REMOTE = "remote"
    NONE = "none"


def _check_non_negative(owner: str, **values: float) -> None:
    for key, value in values.items():
        if not (value >= 0 and math.isfinite(value)):
            raise InvalidSnapshotError(f"{owner}: {key} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A deployable model: its checkpoint, size in memory, engine and serving limits."""

    name: str
    checkpoint_uri: str
    size_bytes: int
    engine: str
    keep_alive_s: float
    max_concurrency: int

    def __post_init__(self) -> None:
        _check_non_negative(
            f"model {self.name!r}", size_bytes=self.size_bytes, keep_alive_s=self.keep_alive_s
        )
        if self.size_bytes <= 0:
            raise InvalidSnapshotError(f"model {self.name!r}: size_bytes must be > 0")
        if self.max_concurrency < 1:
            raise InvalidSnapshotError(f"model {self.name!r}: max_concurrency must be >= 1")


@dataclass(frozen=True, slots=True)
class NodeBandwidth:
    """Bytes per second from each tier into a loaded model, as measured and reported by the node's store.

    ``remote_bps`` is ``None`` when the node cannot reach the remote object store. There are no defaults:
    the policy only ever uses what the node measured.
    """

    memory_bps: float
    disk_bps: float
    remote_bps: float | None

    def __post_init__(self) -> None:
        for key in ("memory_bps", "disk_bps", "remote_bps"):
            value = getattr(self, key)
            if value is None and key == "remote_bps":
                continue
            if value is None or not (value > 0 and math.isfinite(value)):
                raise InvalidSnapshotError(f"bandwidth {key} must be a finite number > 0, got {value!r}")

    def of(self, tier: Tier) -> float | None:
        """Bandwidth of ``tier`` in bytes/s, or ``None`` if that tier cannot be read on this node."""
        if tier is Tier.MEMORY:
            return self.memory_bps
        if tier is Tier.DISK:
            return self.disk_bps
        if tier is Tier.REMOTE:
            return self.remote_bps
        return None


_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-]+:[0-9]{1,5}$")


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node's own registration, written by its agent under the node's lease and fenced by its epoch
    (``docs/cluster.md``): how to reach the node, what it may hold, and what its store has and measured.

    Schedulers read these to know the servers (a new node is routable with no admin call; a node whose
    lease ended is gone). ``repository_key_env`` names the environment variable (a Kubernetes Secret's key)
    that holds the Triton repository API key; the key itself is never stored.
    """

    name: str
    grpc: str  # host:port of the node's Triton gRPC endpoint
    memory_budget_bytes: int
    epoch: int  # the incarnation that wrote it
    node_store: str | None = None  # http://host:port of the node's store
    repository_key_env: str | None = None
    bandwidth: NodeBandwidth | None = None  # measured by its store; None until it measured
    store_tiers: Mapping[str, Tier] = field(default_factory=dict)  # its store's inventory

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 128 or "/" in self.name or not self.name.isprintable():
            raise InvalidSnapshotError(f"node name {self.name!r}: 1-128 printable characters, no '/'")
        if not _ENDPOINT.match(self.grpc) or not 0 < int(self.grpc.rsplit(":", 1)[1]) < 65536:
            raise InvalidSnapshotError(f"node {self.name!r}: grpc must be host:port, got {self.grpc!r}")
        if self.memory_budget_bytes <= 0:
            raise InvalidSnapshotError(f"node {self.name!r}: memory_budget_bytes must be > 0")
        if self.epoch < 1:
            raise InvalidSnapshotError(f"node {self.name!r}: epoch must be >= 1 (from begin_incarnation)")
        if self.node_store is not None and not self.node_store.startswith(("http://", "https://")):
            raise InvalidSnapshotError(f"node {self.name!r}: node_store must be an http(s) URL")


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """One in-flight generation on an instance (all of them are tracked, not just the first)."""

    request_id: str
    prompt_tokens: int
    generated_tokens: int
    expected_remaining_s: float

    def __post_init__(self) -> None:
        _check_non_negative(
            f"request {self.request_id!r}",
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            expected_remaining_s=self.expected_remaining_s,
        )

    @property
    def context_tokens(self) -> int:
        """Tokens a destination must replay to continue this generation: prompt + generated so far."""
        return self.prompt_tokens + self.generated_tokens


@dataclass(frozen=True, slots=True)
class Instance:
    """A model loaded on a server, its running requests and the time it was last used.

    ``pinned``: generations of other scheduler replicas use it (their in-use counts in the server's shared
    allocation): this replica may route to it but neither evict it nor free it by moving its own requests.
    A replica's own view, never stored (replicas do not publish server states)."""

    model: str
    size_bytes: int
    last_used_s: float
    requests: tuple[RunningRequest, ...] = ()
    pinned: bool = False

    def __post_init__(self) -> None:
        _check_non_negative(f"instance {self.model!r}", size_bytes=self.size_bytes)

    @property
    def idle(self) -> bool:
        """True when no request runs on it, here or through another replica: only idle instances may be
        evicted."""
        return not self.requests and not self.pinned


@dataclass(frozen=True, slots=True)
class LoadInFlight:
    """A model a server is loading now, expected to be ready at ``expected_finish_s``."""

    model: str
    size_bytes: int
    expected_finish_s: float


@dataclass(frozen=True, slots=True)
class PendingLoad:
    """A load queued on a server behind the ones in flight, expected to take ``expected_load_s``."""

    model: str
    size_bytes: int
    expected_load_s: float


@dataclass(frozen=True)
class ServerState:
    """One Triton server as the scheduler last saw it (reported by the server and its node store)."""

    name: str
    healthy: bool
    memory_budget_bytes: int
    bandwidth: NodeBandwidth
    triton_load_overhead_s: float
    instances: tuple[Instance, ...] = ()
    loading: tuple[LoadInFlight, ...] = ()
    load_queue: tuple[PendingLoad, ...] = ()
    store_tiers: Mapping[str, Tier] = field(default_factory=dict)
    eviction_s: float = 0.0
    """Seconds evicting idle models adds before a load on this server, as measured: the release of their
    engines where the backend releases, else their unload (``policy.eviction_s``)."""
    repository: frozenset[str] | None = None
    """Model names in the server's Triton repository (its repository index), or ``None`` when not read
    yet: a server can only load a model whose directory its repository holds."""
    freeing_bytes: int = 0
    """Memory that unloads in progress still hold, already taken off ``memory_budget_bytes``: it comes back
    when they end, so the full budget is ``memory_budget_bytes + freeing_bytes``."""

    def __post_init__(self) -> None:
        _check_non_negative(
            f"server {self.name!r}",
            memory_budget_bytes=self.memory_budget_bytes,
            triton_load_overhead_s=self.triton_load_overhead_s,
            eviction_s=self.eviction_s,
            freeing_bytes=self.freeing_bytes,
        )
        if self.repository is not None:
            object.__setattr__(self, "repository", frozenset(self.repository))
        for key in ("instances", "loading", "load_queue"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        object.__setattr__(self, "store_tiers", MappingProxyType(dict(self.store_tiers)))
        seen: set[str] = set()
        for name in [i.model for i in self.instances] + [ld.model for ld in self.loading]:
            if name in seen:
                raise InvalidSnapshotError(f"server {self.name!r}: model {name!r} loaded or loading twice")
            seen.add(name)

    @property
    def used_bytes(self) -> int:
        """Memory taken by loaded models plus loads in flight and queued (they will take it)."""
        return (
            sum(i.size_bytes for i in self.instances)
            + sum(ld.size_bytes for ld in self.loading)
            + sum(p.size_bytes for p in self.load_queue)
        )

    @property
    def free_bytes(self) -> int:
        """Budget left without evicting anything (negative if over-committed)."""
        return self.memory_budget_bytes - self.used_bytes

    def load_wait_s(self, now: float, own_s: float = math.inf) -> float:
        """Seconds the loads already on this server add to a new load that alone would take ``own_s``.

        tritonserver runs loads concurrently (4 load threads by default) and they share the node's CPUs
        and disk, so a load in flight with ``R`` seconds left delays the new one by ``min(R, own_s)``
        (two jobs sharing one resource: each runs at half speed while both run). Queued loads (not
        started) come first, in full. ``own_s`` = inf gives the serial bound: every load in flight first.
        """
        sharing = sum(min(own_s, max(0.0, ld.expected_finish_s - now)) for ld in self.loading)
        return sharing + sum(p.expected_load_s for p in self.load_queue)

    def instance(self, model: str) -> Instance | None:
        """The loaded instance of ``model`` on this server, if any."""
        for inst in self.instances:
            if inst.model == model:
                return inst
        return None


_BIG = math.inf


@dataclass(frozen=True, slots=True)
class _Holders:
    """The servers whose node store holds a model in memory or disk, as index and 1/bandwidth arrays."""

    positions: npt.NDArray[np.intp]
    inv_bw: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class _Row:
    """What one server contributes to a :class:`SnapshotIndex`: computed once per :class:`ServerState`
    object (they are frozen), so an index built from the previous one only redoes the servers that changed."""

    healthy: bool
    queued_s: float
    finishes: tuple[float, ...]  # expected_finish_s of each load in flight
    overhead_s: float
    inv_remote_bw: float
    free_bytes: float
    idle_bytes: float
    eviction_s: float
    warm: Mapping[str, Instance]
    loading: Mapping[str, float]  # model -> expected_finish_s
    queue: tuple[tuple[str, float], ...]  # (model, expected_load_s), in queue order
    holders: Mapping[str, float]  # model -> 1 / bandwidth of the tier its node store holds it in
    repository: frozenset[str] | None


def _row_of(s: ServerState) -> _Row:
    row: _Row | None = s.__dict__.get("_index_row")
    if row is not None:
        return row
    holders: dict[str, float] = {}
    for model, tier in s.store_tiers.items():
        if tier is Tier.MEMORY or tier is Tier.DISK:
            bw = s.bandwidth.memory_bps if tier is Tier.MEMORY else s.bandwidth.disk_bps
            holders[model] = 1.0 / bw
    row = _Row(
        healthy=s.healthy,
        queued_s=float(sum(p.expected_load_s for p in s.load_queue)),
        finishes=tuple(ld.expected_finish_s for ld in s.loading),
        overhead_s=s.triton_load_overhead_s,
        inv_remote_bw=1.0 / s.bandwidth.remote_bps if s.bandwidth.remote_bps is not None else _BIG,
        free_bytes=float(s.free_bytes),
        idle_bytes=float(sum(i.size_bytes for i in s.instances if i.idle)),
        eviction_s=s.eviction_s,
        warm={i.model: i for i in s.instances},
        loading={ld.model: ld.expected_finish_s for ld in s.loading},
        queue=tuple((p.model, p.expected_load_s) for p in s.load_queue),
        holders=holders,
        repository=s.repository,
    )
    s.__dict__["_index_row"] = row  # a cache on a frozen object: not a field, not compared
    return row


def _queued_ready(row: _Row, now: float) -> list[tuple[str, float]]:
    """When each queued load of a server is expected ready: after its loads in flight, in queue order."""
    out = []
    wait = sum(max(0.0, f - now) for f in row.finishes)
    for model, load_s in row.queue:
        wait += load_s
        out.append((model, now + wait))
    return out


_E = TypeVar("_E")


def _by_pos(entries: list[tuple[int, _E]]) -> list[tuple[int, _E]]:
    entries.sort(key=lambda e: e[0])  # stable: one server's entries keep their order
    return entries


class SnapshotIndex:
    """Per-snapshot precomputation so :func:`~warmstart.scheduler.policy.place` is O(servers) in numpy.

    Built once per snapshot (lazily, on first use) and read-only afterwards. Given the index of an earlier
    snapshot of the same servers (``previous``), it copies that one and redoes only the servers whose
    :class:`ServerState` is a different object (plus, when ``now`` moved, those with queued loads, whose
    ready times count from ``now``): the result equals a fresh build, at a cost proportional to what changed.
    """

    _ids: npt.NDArray[np.int64]  # id() of each server's state, to find the ones that changed

    def __init__(
        self,
        servers: tuple[ServerState, ...],
        now: float,
        previous: SnapshotIndex | None = None,
        diff: tuple[npt.NDArray[np.int64], list[int]] | None = None,
    ) -> None:
        self.size = len(servers)
        self.now = now
        self._servers = servers
        if previous is not None:
            diff = diff if diff is not None else SnapshotIndex.diff(previous, servers)
            if diff is not None:
                self._ids, changed = diff
                if now != previous.now:
                    changed = sorted(set(changed) | set(previous._queued))
                self._update(previous, {p: _row_of(servers[p]) for p in changed}, changed)
                return
        self._ids = np.fromiter(map(id, servers), dtype=np.int64, count=self.size)
        self._build(servers, [_row_of(s) for s in servers])

    @staticmethod
    def diff(
        previous: SnapshotIndex, servers: tuple[ServerState, ...]
    ) -> tuple[npt.NDArray[np.int64], list[int]] | None:
        """The id of each server state and the positions whose state is not ``previous``'s, when
        ``servers`` are the same names in the same order as ``previous``'s; else ``None``."""
        n = len(servers)
        if n != previous.size:
            return None
        ids = np.fromiter(map(id, servers), dtype=np.int64, count=n)
        # the previous index holds its servers, so an id equal to one of theirs is the same object
        changed: list[int] = np.flatnonzero(ids != previous._ids).tolist()
        old = previous._servers
        if any(servers[p].name != old[p].name for p in changed):
            return None
        return ids, changed

    # -- a fresh build -----------------------------------------------------------------------------------
    def _build(self, servers: tuple[ServerState, ...], rows: list[_Row]) -> None:
        now = self.now
        self.position: dict[str, int] = {s.name: i for i, s in enumerate(servers)}
        self.healthy = np.array([r.healthy for r in rows], dtype=bool)
        self.queued_s = np.array([r.queued_s for r in rows], dtype=np.float64)
        self.overhead_s = np.array([r.overhead_s for r in rows], dtype=np.float64)
        self.inv_remote_bw = np.array([r.inv_remote_bw for r in rows], dtype=np.float64)
        self.free_bytes = np.array([r.free_bytes for r in rows], dtype=np.float64)
        self.idle_bytes = np.array([r.idle_bytes for r in rows], dtype=np.float64)
        self.eviction_s = np.array([r.eviction_s for r in rows], dtype=np.float64)
        width = max((len(r.finishes) for r in rows), default=0)
        self._finish = np.full((self.size, width), -math.inf, dtype=np.float64)
        for pos, r in enumerate(rows):
            self._finish[pos, : len(r.finishes)] = r.finishes
        self.warm: dict[str, list[tuple[int, Instance]]] = {}
        self.in_flight: dict[str, list[tuple[int, float]]] = {}
        self._held: dict[str, dict[int, float]] = {}
        for pos, r in enumerate(rows):
            for model, inst in r.warm.items():
                self.warm.setdefault(model, []).append((pos, inst))
            for model, finish in r.loading.items():
                self.in_flight.setdefault(model, []).append((pos, finish))
            for model, ready in _queued_ready(r, now):
                self.in_flight.setdefault(model, []).append((pos, ready))
            for model, inv in r.holders.items():
                self._held.setdefault(model, {})[pos] = inv
        self.holders: dict[str, _Holders] = {m: self._holders_of(h) for m, h in self._held.items()}
        self._repositories = [r.repository for r in rows]
        self._lacking: dict[str, npt.NDArray[np.intp]] = {}
        self._queued = frozenset(p for p, r in enumerate(rows) if r.queue)
        self._any_repository = any(r is not None for r in self._repositories)
        self._finish_times()

    # -- an update of the previous index ---------------------------------------------------------------------
    def _update(self, prev: SnapshotIndex, rows: Mapping[int, _Row], changed: list[int]) -> None:
        now = self.now
        self.position = prev.position  # same names at the same positions: read-only, shared
        arrays = (
            "healthy",
            "queued_s",
            "overhead_s",
            "inv_remote_bw",
            "free_bytes",
            "idle_bytes",
            "eviction_s",
        )
        for name in arrays:
            setattr(self, name, getattr(prev, name).copy() if changed else getattr(prev, name))
        self.warm, self.in_flight = dict(prev.warm), dict(prev.in_flight)
        self._held, self.holders = dict(prev._held), dict(prev.holders)
        self._repositories = prev._repositories
        self._lacking = prev._lacking
        self._any_repository = prev._any_repository
        width = max([prev._finish.shape[1]] + [len(rows[p].finishes) for p in changed])
        if width > prev._finish.shape[1]:
            self._finish = np.full((self.size, width), -math.inf, dtype=np.float64)
            self._finish[:, : prev._finish.shape[1]] = prev._finish
        else:
            self._finish = prev._finish.copy() if changed else prev._finish
        old_rows = [_row_of(s) for s in (prev._servers[p] for p in changed)]
        warm_touched: set[str] = set()
        flight_touched: set[str] = set()
        held_touched: set[str] = set()
        for pos, old in zip(changed, old_rows, strict=True):
            new = rows[pos]
            self.healthy[pos], self.queued_s[pos] = new.healthy, new.queued_s
            self.overhead_s[pos], self.inv_remote_bw[pos] = new.overhead_s, new.inv_remote_bw
            self.free_bytes[pos], self.idle_bytes[pos] = new.free_bytes, new.idle_bytes
            self.eviction_s[pos] = new.eviction_s
            self._finish[pos] = -math.inf
            self._finish[pos, : len(new.finishes)] = new.finishes
            warm_touched |= {
                m for m in old.warm.keys() | new.warm.keys() if old.warm.get(m) is not new.warm.get(m)
            }
            if old.loading != new.loading or old.queue or new.queue:
                flight_touched |= old.loading.keys() | new.loading.keys()
                flight_touched |= {m for m, _ in old.queue} | {m for m, _ in new.queue}
            for m in old.holders.keys() | new.holders.keys():
                if old.holders.get(m) != new.holders.get(m):
                    if m not in held_touched:  # copy on first write: the previous index keeps its own
                        held_touched.add(m)
                        self._held[m] = dict(self._held.get(m, {}))
                    held = self._held[m]
                    held.pop(pos, None)
                    if m in new.holders:
                        held[pos] = new.holders[m]
            if new.repository is not old.repository and new.repository != old.repository:
                if self._repositories is prev._repositories:  # copy on first write
                    self._repositories = list(prev._repositories)
                    self._lacking = {}
                self._repositories[pos] = new.repository
                self._any_repository = any(r is not None for r in self._repositories)
        changed_set = set(changed)
        self._queued = (prev._queued - changed_set) | {p for p in changed if rows[p].queue}
        for m in warm_touched:
            kept = [e for e in prev.warm.get(m, ()) if e[0] not in changed_set]
            kept += [(p, rows[p].warm[m]) for p in changed if m in rows[p].warm]
            self._set(self.warm, m, _by_pos(kept))
        for m in flight_touched:
            kept_f = [e for e in prev.in_flight.get(m, ()) if e[0] not in changed_set]
            for p in changed:
                if m in rows[p].loading:
                    kept_f.append((p, rows[p].loading[m]))
                kept_f += [(p, ready) for model, ready in _queued_ready(rows[p], now) if model == m]
            self._set(self.in_flight, m, _by_pos(kept_f))
        for m in held_touched:
            if self._held[m]:
                self.holders[m] = self._holders_of(self._held[m])
            else:
                del self._held[m]
                self.holders.pop(m, None)
        self._finish_times()

    @staticmethod
    def _set(table: dict[str, list[tuple[int, _E]]], model: str, entries: list[tuple[int, _E]]) -> None:
        if entries:
            table[model] = entries
        else:
            table.pop(model, None)

    @staticmethod
    def _holders_of(held: Mapping[int, float]) -> _Holders:
        positions = sorted(held)
        return _Holders(
            np.array(positions, dtype=np.intp), np.array([held[p] for p in positions], dtype=np.float64)
        )

    def _finish_times(self) -> None:
        # seconds left of each load in flight, one row per server (0-padded): see ServerState.load_wait_s
        self.in_flight_left = np.maximum(self._finish - self.now, 0.0)
        self.wait_s = self.in_flight_left.sum(axis=1) + self.queued_s  # the serial bound
        self.room_bytes = self.free_bytes + self.idle_bytes

    def lacking(self, model: str) -> npt.NDArray[np.intp]:
        """Positions of the servers whose repository is known and has no ``model`` (they cannot load it)."""
        if not self._any_repository:
            return _NONE_LACKING
        found = self._lacking.get(model)
        if found is None:
            found = np.array(
                [p for p, r in enumerate(self._repositories) if r is not None and model not in r],
                dtype=np.intp,
            )
            self._lacking[model] = found
        return found


_NONE_LACKING = np.zeros(0, dtype=np.intp)
_name_of = operator.attrgetter("name")


@dataclass(frozen=True)
class ClusterSnapshot:
    """Servers (kept sorted by name, which is the tie-break order), model specs by name, and ``now``."""

    servers: tuple[ServerState, ...]
    models: Mapping[str, ModelSpec]
    now: float
    demand: Mapping[str, float] = field(default_factory=dict)
    """Recent requests per second by model, as the router counted them (``policy.record_arrival``); a
    model without an entry has had none."""
    basis: SnapshotIndex | None = field(default=None, repr=False, compare=False)
    """The index of an earlier snapshot of the same servers, if any: this snapshot's index is then built by
    updating that one (:class:`SnapshotIndex`); dropped once the index is built."""

    def __post_init__(self) -> None:
        rates = list(self.demand.values())
        # one pass in C for the common case (NaN fails both tests); the loop only to name the culprit
        if rates and not (min(rates) >= 0 and math.isfinite(sum(rates))):
            for key, rate in self.demand.items():
                if not (math.isfinite(rate) and rate >= 0):
                    raise InvalidSnapshotError(f"demand[{key!r}] must be a finite rate >= 0, got {rate!r}")
        object.__setattr__(self, "demand", MappingProxyType(dict(self.demand)))
        servers = tuple(self.servers)
        diff = SnapshotIndex.diff(self.basis, servers) if self.basis is not None else None
        if diff is None:
            names = list(map(_name_of, servers))
            if names != sorted(names):  # (already in order: the common case costs one C pass)
                servers = tuple(sorted(servers, key=lambda s: s.name))
            if len(set(names)) != len(names):
                raise InvalidSnapshotError("server names must be unique")
            object.__setattr__(self, "basis", None)
        else:  # the basis's names, in its (sorted, unique) order: nothing to sort or check
            self.__dict__["_diff"] = diff
        models = dict(self.models)
        for key, spec in models.items():
            if key != spec.name:
                raise InvalidSnapshotError(f"models[{key!r}] holds the spec of {spec.name!r}")
        object.__setattr__(self, "servers", servers)
        object.__setattr__(self, "models", MappingProxyType(models))

    @classmethod
    def of(
        cls,
        servers: Iterable[ServerState],
        models: Iterable[ModelSpec],
        now: float,
        demand: Mapping[str, float] | None = None,
        previous: ClusterSnapshot | None = None,
    ) -> ClusterSnapshot:
        """Build a snapshot from iterables (models keyed by their name). With ``previous`` (an earlier
        snapshot of the same cluster, typically sharing most :class:`ServerState` objects), the index is
        updated from that snapshot's instead of built afresh; the result is the same."""
        basis = None
        if previous is not None:
            basis = previous.__dict__.get("index") or previous.basis
        return cls(
            servers=tuple(servers),
            models={m.name: m for m in models},
            now=now,
            demand=demand or {},
            basis=basis,
        )

    @cached_property
    def mean_demand(self) -> float:
        """Mean recent request rate over the snapshot's models (0 for a model without counts)."""
        if not self.models:
            return 0.0
        return sum(self.demand.get(name, 0.0) for name in self.models) / len(self.models)

    @cached_property
    def index(self) -> SnapshotIndex:
        """Precomputed per-server arrays and per-model lookups (built on first use)."""
        index = SnapshotIndex(
            self.servers, self.now, previous=self.basis, diff=self.__dict__.pop("_diff", None)
        )
        object.__setattr__(self, "basis", None)  # no chain of old indexes kept alive
        return index

    def server(self, name: str) -> ServerState:
        """The server called ``name``; :class:`UnknownServerError` if there is none."""
        try:
            return self.servers[self.index.position[name]]
        except KeyError:
            raise UnknownServerError(f"no server named {name!r} in the snapshot") from None

    def model(self, name: str) -> ModelSpec:
        """The spec of model ``name``; :class:`UnknownModelError` if there is none."""
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(f"no model named {name!r} in the snapshot") from None


# --------------------------------------------------------------------------------------- the state store

T = TypeVar("T")

DEFAULT_LEASE_TTL_S = 10
"""TTL of a node's or replica's lease when none is configured (``docs/cluster.md``)."""
MAX_LEASE_TTL_S = 9_000_000_000
"""etcd's largest lease TTL (``MaxLeaseTTL``); the in-memory store refuses the same."""


@dataclass(frozen=True, slots=True)
class Versioned(Generic[T]):
    """A stored value with the store-wide revision at which it was last written (etcd's mod_revision)."""

    value: T
    revision: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease granted by the store: keys written under it are deleted when it expires (no
    :meth:`~ClusterStateStore.keep_alive` within ``ttl_s``) or is revoked. ``ttl_s`` is what the store
    granted, which may be more than asked (etcd raises a TTL to its minimum, ``docs/cluster.md``)."""

    id: int
    ttl_s: int


@dataclass(frozen=True)
class StateView:
    """Every stored server, model and node with its revision, read at the one store revision ``revision``."""

    revision: int
    servers: Mapping[str, Versioned[ServerState]]
    models: Mapping[str, Versioned[ModelSpec]]
    nodes: Mapping[str, Versioned[NodeRecord]] = field(default_factory=dict)
    deployments: Mapping[str, Versioned[Mapping[str, Any]]] = field(default_factory=dict)

    def snapshot(self, now: float, demand: Mapping[str, float] | None = None) -> ClusterSnapshot:
        """The policy's :class:`ClusterSnapshot` of this view."""
        return ClusterSnapshot.of(
            (v.value for v in self.servers.values()), (v.value for v in self.models.values()), now, demand
        )


@dataclass(frozen=True, slots=True)
class LoadClaim:
    """A load of a model on a server that one scheduler replica decided and is carrying out."""

    replica: str
    size_bytes: int


@dataclass(frozen=True)
class Allocation:
    """What the scheduler replicas together hold on one server, read at one store revision.

    ``revision`` is the server's allocation version (0: never written): every write of its claims, loaded
    and unloading records bumps it, so a decision taken on this view is a compare-and-set on it
    (``expected_revision``). ``use_revision`` is its in-use version (0: never written), bumped by every
    in-use count write only (they change with every generation's start and end but commit no bytes, so a
    load claim does not compare it; a release, which must not take a model another replica's generations
    use, compares both). ``loads``: loads in flight, each under its replica's lease; ``loaded``: models
    loaded there (bytes), kept until released; ``in_use``: per model, how many of each replica's
    generations use it (under that replica's lease); ``unloading``: models released for an unload whose
    memory is not free yet (under the releasing replica's lease), bytes.
    """

    server: str
    revision: int
    loads: Mapping[str, LoadClaim] = field(default_factory=dict)
    loaded: Mapping[str, int] = field(default_factory=dict)
    in_use: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    unloading: Mapping[str, LoadClaim] = field(default_factory=dict)
    use_revision: int = 0

    @property
    def committed_bytes(self) -> int:
        """Memory the loaded models, the loads in flight and the unloads not finished take together."""
        loads = sum(c.size_bytes for c in self.loads.values())
        return sum(self.loaded.values()) + loads + sum(c.size_bytes for c in self.unloading.values())

    def users(self, model: str, *, besides: str | None = None) -> int:
        """Generations using ``model`` here, over every replica (but ``besides``)."""
        return sum(n for r, n in self.in_use.get(model, {}).items() if r != besides)


def check_allocation_names(*names: str) -> None:
    """Server, model and replica names in allocation keys: non-empty, printable, no '/'."""
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or not name.isprintable() or len(name) > 256:
            raise InvalidSnapshotError(f"allocation name {name!r}: 1-256 printable characters, no '/'")


def check_lease_ttl(ttl_s: int) -> int:
    """``ttl_s`` if it is a whole number of seconds in 1..:data:`MAX_LEASE_TTL_S`, else
    :class:`InvalidLeaseError`."""
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= MAX_LEASE_TTL_S:
        raise InvalidLeaseError(
            f"a lease TTL must be a whole number of seconds in 1..{MAX_LEASE_TTL_S}, got {ttl_s!r}"
        )
    return ttl_s


class ClusterStateStore(Protocol):
    """Where server reports and model specs live; read as one consistent snapshot. Watch-free.

    Revisions are store-wide and strictly increasing. ``expected_revision`` makes a write a
    compare-and-set: ``0`` means "must not exist yet", ``n > 0`` means "must still be at revision n";
    a lost race raises :class:`RevisionConflictError`. Missing keys raise :class:`UnknownServerError` /
    :class:`UnknownModelError`.

    Leases and fencing (``docs/cluster.md``): a server report written with ``lease`` is deleted by the store
    when that lease expires or is revoked (:class:`LeaseNotFoundError` for a lease that is gone). A node
    incarnation takes an epoch with :meth:`begin_incarnation`; a write or delete that carries ``epoch`` is
    refused with :class:`StaleEpochError` unless it is still that server's current epoch. The compares are
    checked in this order: epoch, then revision, then the lease; a store that cannot be reached raises
    :class:`ClusterStateUnavailable`.
    """

    @property
    def revision(self) -> int:
        """The store-wide revision of the last write."""
        ...

    def get_server(self, name: str) -> Versioned[ServerState]:
        """The stored state of server ``name``."""
        ...

    def put_server(
        self,
        state: ServerState,
        *,
        expected_revision: int | None = None,
        lease: Lease | None = None,
        epoch: int | None = None,
    ) -> int:
        """Store ``state`` under its name (under ``lease``, fenced by ``epoch``); returns the new revision."""
        ...

    def delete_server(
        self, name: str, *, expected_revision: int | None = None, epoch: int | None = None
    ) -> None:
        """Remove server ``name``."""
        ...

    def get_model(self, name: str) -> Versioned[ModelSpec]:
        """The stored spec of model ``name``."""
        ...

    def put_model(self, spec: ModelSpec, *, expected_revision: int | None = None) -> int:
        """Store ``spec`` under its name; returns the new revision."""
        ...

    def delete_model(self, name: str, *, expected_revision: int | None = None) -> None:
        """Remove model ``name``."""
        ...

    def get_node(self, name: str) -> Versioned[NodeRecord]:
        """The registration of node ``name`` (:class:`UnknownServerError` if none)."""
        ...

    def put_node(
        self, record: NodeRecord, *, lease: Lease | None = None, expected_revision: int | None = None
    ) -> int:
        """Register ``record`` under ``lease``, fenced by ``record.epoch`` (:class:`StaleEpochError` once a
        newer incarnation of the node began); returns the new revision."""
        ...

    def delete_node(self, name: str, *, epoch: int | None = None) -> None:
        """Remove node ``name``'s registration (fenced by ``epoch`` when given)."""
        ...

    def put_deployment(self, name: str, config: Mapping[str, Any]) -> int:
        """Deploy model ``name`` with its scheduler config (a JSON object, as in the scheduler's YAML), for
        every replica to serve. Returns the new revision."""
        ...

    def delete_deployment(self, name: str) -> None:
        """Withdraw model ``name`` from every replica (:class:`UnknownModelError` if not deployed)."""
        ...

    def read(self) -> StateView:
        """Every server, model and node with its revision, as of one store revision."""
        ...

    def allocation(self, server: str) -> Allocation:
        """What the replicas together hold on ``server`` (one read, one revision: its allocation and in-use
        revisions and every record)."""
        ...

    def claim_load(
        self, server: str, model: str, size_bytes: int, replica: str, *, lease: Lease, expected_revision: int
    ) -> int:
        """Record that ``replica`` loads ``model`` on ``server``, if the server's allocation is still at
        ``expected_revision`` (:class:`RevisionConflictError` otherwise: re-read and decide again; in-use
        count writes since do not make it conflict); the claim ends with ``lease``. Returns the new
        allocation revision."""
        ...

    def finish_load(self, server: str, model: str, replica: str, *, size_bytes: int | None) -> int:
        """End ``replica``'s claim; ``size_bytes`` not None: the model is loaded there (kept until
        :meth:`release_loaded`). Returns the new allocation revision."""
        ...

    def set_in_use(self, server: str, model: str, replica: str, count: int, *, lease: Lease) -> int:
        """``replica`` has ``count`` generations on ``model`` at ``server`` (0 removes the count); under
        ``lease``, so a dead replica's counts expire with it. Bumps the in-use revision only (not the
        allocation revision); returns the new in-use revision."""
        ...

    def release_loaded(
        self,
        server: str,
        model: str,
        replica: str,
        *,
        expected_revision: int,
        expected_use_revision: int,
        lease: Lease,
    ) -> int:
        """``model`` on ``server`` is being unloaded by ``replica`` (an unload or eviction decided on the view at
        ``expected_revision`` and ``expected_use_revision``: :class:`RevisionConflictError` if any claim,
        record or in-use count changed since): no longer loaded, but its bytes stay committed, under
        ``lease``, until :meth:`unloaded`. New allocation revision."""
        ...

    def unloaded(self, server: str, model: str, replica: str) -> int:
        """``replica``'s unload of ``model`` on ``server`` freed its memory (another replica's unloading
        record is left alone). New revision."""
        ...

    def snapshot(self, now: float, demand: Mapping[str, float] | None = None) -> ClusterSnapshot:
        """Every server and model as of one revision, stamped with ``now`` and the caller's ``demand``
        (request rates are each router's own count, not stored state)."""
        ...

    def grant_lease(self, ttl_s: int = DEFAULT_LEASE_TTL_S) -> Lease:
        """A new lease of ``ttl_s`` whole seconds (:class:`InvalidLeaseError` otherwise)."""
        ...

    def keep_alive(self, lease: Lease) -> int:
        """Restart ``lease``'s TTL; returns the TTL granted. :class:`LeaseNotFoundError` once it is gone."""
        ...

    def revoke_lease(self, lease: Lease) -> None:
        """End ``lease`` now, deleting every key under it. :class:`LeaseNotFoundError` if already gone."""
        ...

    def begin_incarnation(self, server: str) -> int:
        """Start a new incarnation of node ``server``: returns its epoch, greater than every earlier one,
        which fences off every write that carries an older epoch."""
        ...

    def epoch(self, server: str) -> int | None:
        """The current incarnation epoch of ``server``, or None if it never began one."""
        ...


@dataclass(slots=True)
class _LeaseRecord:
    ttl_s: int
    expires_at: float
    keys: set[tuple[str, str]] = field(default_factory=set)  # (kind, name) written under it


class InMemoryClusterState:
    """The single-process :class:`ClusterStateStore`: dicts and a revision counter under one lock.

    Leases expire by ``clock`` (seconds, monotonic; tests pass one they drive): an expired lease's keys are
    deleted, in one revision, by the first call that finds it expired, as etcd's lessor does it.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._revision = 0
        self._servers: dict[str, Versioned[ServerState]] = {}
        self._models: dict[str, Versioned[ModelSpec]] = {}
        self._nodes: dict[str, Versioned[NodeRecord]] = {}
        self._deployments: dict[str, Versioned[Mapping[str, Any]]] = {}
        self._epochs: dict[str, int] = {}
        self._leases: dict[int, _LeaseRecord] = {}
        self._key_lease: dict[tuple[str, str], int] = {}  # (kind, name) -> the lease it was written under
        self._alloc_rev: dict[str, int] = {}  # server -> allocation revision
        self._use_rev: dict[str, int] = {}  # server -> in-use revision (in-use count writes only)
        self._claims: dict[str, dict[str, LoadClaim]] = {}  # server -> model -> claim
        self._loaded: dict[str, dict[str, int]] = {}
        self._unloading: dict[str, dict[str, LoadClaim]] = {}  # server -> model -> (releasing replica, bytes)
        self._in_use: dict[str, dict[str, dict[str, int]]] = {}  # server -> model -> replica -> count
        self._lease_ids = itertools.count(1)

    @property
    def revision(self) -> int:
        """The store-wide revision of the last write."""
        with self._lock:
            self._expire()
            return self._revision

    # -- under the lock ----------------------------------------------------------------------------------
    def _expire(self) -> None:
        if not self._leases:
            return
        now = self._clock()
        for lease_id in [i for i, rec in self._leases.items() if now >= rec.expires_at]:
            self._end_lease(lease_id)

    def _end_lease(self, lease_id: int) -> None:
        rec = self._leases.pop(lease_id)
        if rec.keys:
            self._revision += 1
        for kind, name in rec.keys:
            del self._key_lease[(kind, name)]
            # a lease's end removes its claims and counts without changing the allocation revision (as
            # etcd's lessor deletes keys): it only frees room, so a decision taken before it stays safe
            if kind == "claim":
                server, model = name.split("/")
                self._claims[server].pop(model, None)
            elif kind == "inuse":
                server, model, replica = name.split("/")
                self._in_use[server].get(model, {}).pop(replica, None)
            elif kind == "unloading":
                server, model = name.split("/")
                self._unloading[server].pop(model, None)
            else:
                table: dict[str, Any] = self._servers if kind == "server" else self._nodes
                del table[name]

    def _detach(self, name: str, kind: str = "server") -> None:
        lease_id = self._key_lease.pop((kind, name), None)
        if lease_id is not None:
            self._leases[lease_id].keys.discard((kind, name))

    def _attach(self, name: str, kind: str, lease: Lease | None) -> None:
        self._detach(name, kind)
        if lease is not None:
            self._leases[lease.id].keys.add((kind, name))
            self._key_lease[(kind, name)] = lease.id

    def _check_epoch(self, name: str, epoch: int | None) -> None:
        if epoch is None:
            return
        current = self._epochs.get(name)
        if current != epoch:
            raise StaleEpochError(
                f"server {name!r}: the write carries epoch {epoch}, but its current incarnation is "
                f"{'none' if current is None else current}; this writer was superseded and must stop"
            )

    def _check(self, table: Mapping[str, Versioned[T]], key: str, expected: int | None) -> None:
        if expected is None:
            return
        current = table[key].revision if key in table else 0
        if current != expected:
            raise RevisionConflictError(f"{key!r} is at revision {current}, the write expected {expected}")

    def _put(self, table: dict[str, Versioned[T]], key: str, value: T, expected: int | None) -> int:
        with self._lock:
            self._expire()
            self._check(table, key, expected)
            self._revision += 1
            table[key] = Versioned(value, self._revision)
            return self._revision

    def _delete(
        self, table: dict[str, Versioned[T]], key: str, expected: int | None, missing: type[LookupError]
    ) -> None:
        with self._lock:
            self._expire()
            if key not in table:
                raise missing(f"nothing stored under {key!r}")
            self._check(table, key, expected)
            self._revision += 1
            del table[key]

    # -- servers -----------------------------------------------------------------------------------------
    def get_server(self, name: str) -> Versioned[ServerState]:
        """The stored state of server ``name``."""
        with self._lock:
            self._expire()
            try:
                return self._servers[name]
            except KeyError:
                raise UnknownServerError(f"no server named {name!r} is stored") from None

    def put_server(
        self,
        state: ServerState,
        *,
        expected_revision: int | None = None,
        lease: Lease | None = None,
        epoch: int | None = None,
    ) -> int:
        """Store ``state`` under its name (under ``lease``, fenced by ``epoch``); returns the new revision."""
        name = state.name
        with self._lock:
            self._expire()
            self._check_epoch(name, epoch)
            self._check(self._servers, name, expected_revision)
            if lease is not None and lease.id not in self._leases:
                raise LeaseNotFoundError(f"lease {lease.id} has expired or was revoked; grant a new one")
            self._revision += 1
            self._servers[name] = Versioned(state, self._revision)
            self._attach(name, "server", lease)
            return self._revision

    def delete_server(
        self, name: str, *, expected_revision: int | None = None, epoch: int | None = None
    ) -> None:
        """Remove server ``name``."""
        with self._lock:
            self._expire()
            if name not in self._servers:
                raise UnknownServerError(f"nothing stored under {name!r}")
            self._check_epoch(name, epoch)
            self._check(self._servers, name, expected_revision)
            self._revision += 1
            del self._servers[name]
            self._detach(name, "server")

    # -- models ------------------------------------------------------------------------------------------
    def get_model(self, name: str) -> Versioned[ModelSpec]:
        """The stored spec of model ``name``."""
        with self._lock:
            self._expire()
            try:
                return self._models[name]
            except KeyError:
                raise UnknownModelError(f"no model named {name!r} is stored") from None

    def put_model(self, spec: ModelSpec, *, expected_revision: int | None = None) -> int:
        """Store ``spec`` under its name; returns the new revision."""
        return self._put(self._models, spec.name, spec, expected_revision)

    def delete_model(self, name: str, *, expected_revision: int | None = None) -> None:
        """Remove model ``name``."""
        self._delete(self._models, name, expected_revision, UnknownModelError)

    # -- nodes -------------------------------------------------------------------------------------------
    def get_node(self, name: str) -> Versioned[NodeRecord]:
        """The registration of node ``name``."""
        with self._lock:
            self._expire()
            try:
                return self._nodes[name]
            except KeyError:
                raise UnknownServerError(f"no node named {name!r} is registered") from None

    def put_node(
        self, record: NodeRecord, *, lease: Lease | None = None, expected_revision: int | None = None
    ) -> int:
        """Register ``record`` under ``lease``, fenced by its epoch; returns the new revision."""
        name = record.name
        with self._lock:
            self._expire()
            self._check_epoch(name, record.epoch)
            self._check(self._nodes, name, expected_revision)
            if lease is not None and lease.id not in self._leases:
                raise LeaseNotFoundError(f"lease {lease.id} has expired or was revoked; grant a new one")
            self._revision += 1
            self._nodes[name] = Versioned(record, self._revision)
            self._attach(name, "node", lease)
            return self._revision

    def delete_node(self, name: str, *, epoch: int | None = None) -> None:
        """Remove node ``name``'s registration."""
        with self._lock:
            self._expire()
            if name not in self._nodes:
                raise UnknownServerError(f"no node named {name!r} is registered")
            self._check_epoch(name, epoch)
            self._revision += 1
            del self._nodes[name]
            self._detach(name, "node")

    # -- reads -------------------------------------------------------------------------------------------
    def read(self) -> StateView:
        """Every server, model and node with its revision, as of one store revision."""
        with self._lock:
            self._expire()
            return StateView(
                self._revision,
                dict(self._servers),
                dict(self._models),
                dict(self._nodes),
                dict(self._deployments),
            )

    # -- deployments ------------------------------------------------------------------------------------
    def put_deployment(self, name: str, config: Mapping[str, Any]) -> int:
        """Deploy model ``name`` with ``config`` (stored as its JSON, so what reads back is plain data)."""
        check_allocation_names(name)
        frozen = json.loads(json.dumps(dict(config), allow_nan=False))
        return self._put(self._deployments, name, MappingProxyType(frozen), None)

    def delete_deployment(self, name: str) -> None:
        """Withdraw model ``name``."""
        self._delete(self._deployments, name, None, UnknownModelError)

    def snapshot(self, now: float, demand: Mapping[str, float] | None = None) -> ClusterSnapshot:
        """Every server and model as of one revision, stamped with ``now`` and the caller's ``demand``."""
        with self._lock:
            self._expire()
            servers = [v.value for v in self._servers.values()]
            models = [v.value for v in self._models.values()]
        return ClusterSnapshot.of(servers, models, now, demand)

    # -- allocations -------------------------------------------------------------------------------------
    def _bump(self, server: str) -> int:
        self._revision += 1
        self._alloc_rev[server] = self._revision
        return self._revision

    def _live_lease(self, lease: Lease) -> None:
        if lease.id not in self._leases:
            raise LeaseNotFoundError(f"lease {lease.id} has expired or was revoked; grant a new one")

    def allocation(self, server: str) -> Allocation:
        """What the replicas together hold on ``server``."""
        check_allocation_names(server)
        with self._lock:
            self._expire()
            in_use = {m: dict(r) for m, r in self._in_use.get(server, {}).items() if r}
            return Allocation(
                server,
                self._alloc_rev.get(server, 0),
                dict(self._claims.get(server, {})),
                dict(self._loaded.get(server, {})),
                in_use,
                dict(self._unloading.get(server, {})),
                self._use_rev.get(server, 0),
            )

    def claim_load(
        self, server: str, model: str, size_bytes: int, replica: str, *, lease: Lease, expected_revision: int
    ) -> int:
        """Claim the load of ``model`` on ``server`` for ``replica``, compare-and-set on the allocation."""
        check_allocation_names(server, model, replica)
        with self._lock:
            self._expire()
            current = self._alloc_rev.get(server, 0)
            if current != expected_revision:
                raise RevisionConflictError(
                    f"allocation of {server!r} is at revision {current}, the claim expected {expected_revision}"
                )
            self._live_lease(lease)
            self._claims.setdefault(server, {})[model] = LoadClaim(replica, size_bytes)
            self._attach(f"{server}/{model}", "claim", lease)
            return self._bump(server)

    def finish_load(self, server: str, model: str, replica: str, *, size_bytes: int | None) -> int:
        """End ``replica``'s claim on ``model``; record it loaded when ``size_bytes`` is given."""
        check_allocation_names(server, model, replica)
        with self._lock:
            self._expire()
            claim = self._claims.get(server, {}).get(model)
            if claim is not None and claim.replica == replica:
                del self._claims[server][model]
                self._detach(f"{server}/{model}", "claim")
            if size_bytes is not None:
                self._loaded.setdefault(server, {})[model] = size_bytes
            return self._bump(server)

    def set_in_use(self, server: str, model: str, replica: str, count: int, *, lease: Lease) -> int:
        """Set ``replica``'s count of generations on ``model`` at ``server`` (0 removes it)."""
        check_allocation_names(server, model, replica)
        with self._lock:
            self._expire()
            key = f"{server}/{model}/{replica}"
            users = self._in_use.setdefault(server, {}).setdefault(model, {})
            if count > 0:
                self._live_lease(lease)
                users[replica] = count
                self._attach(key, "inuse", lease)
            else:
                users.pop(replica, None)
                self._detach(key, "inuse")
            self._revision += 1  # the in-use revision only: a claim decided before this write still holds
            self._use_rev[server] = self._revision
            return self._revision

    def release_loaded(
        self,
        server: str,
        model: str,
        replica: str,
        *,
        expected_revision: int,
        expected_use_revision: int,
        lease: Lease,
    ) -> int:
        """Move ``model`` on ``server`` from loaded to unloading by ``replica`` (bytes kept), compare-and-set on
        both the allocation and the in-use revision."""
        check_allocation_names(server, model, replica)
        with self._lock:
            self._expire()
            current = self._alloc_rev.get(server, 0)
            if current != expected_revision:
                raise RevisionConflictError(
                    f"allocation of {server!r} is at revision {current}, the release expected {expected_revision}"
                )
            use = self._use_rev.get(server, 0)
            if use != expected_use_revision:
                raise RevisionConflictError(
                    f"in-use counts of {server!r} are at revision {use}, the release expected "
                    f"{expected_use_revision}"
                )
            self._live_lease(lease)
            size = self._loaded.get(server, {}).pop(model, None)
            if size is not None:
                self._unloading.setdefault(server, {})[model] = LoadClaim(replica, size)
                self._attach(f"{server}/{model}", "unloading", lease)
            return self._bump(server)

    def unloaded(self, server: str, model: str, replica: str) -> int:
        """``replica``'s unload of ``model`` on ``server`` freed its memory."""
        check_allocation_names(server, model, replica)
        with self._lock:
            self._expire()
            record = self._unloading.get(server, {}).get(model)
            if record is not None and record.replica == replica:
                del self._unloading[server][model]
                self._detach(f"{server}/{model}", "unloading")
            return self._bump(server)

    # -- leases and epochs -------------------------------------------------------------------------------
    def grant_lease(self, ttl_s: int = DEFAULT_LEASE_TTL_S) -> Lease:
        """A new lease of ``ttl_s`` whole seconds, counted on the store's clock."""
        ttl_s = check_lease_ttl(ttl_s)
        with self._lock:
            self._expire()
            lease_id = next(self._lease_ids)
            self._leases[lease_id] = _LeaseRecord(ttl_s, self._clock() + ttl_s)
            return Lease(lease_id, ttl_s)

    def keep_alive(self, lease: Lease) -> int:
        """Restart ``lease``'s TTL from now; returns the TTL. :class:`LeaseNotFoundError` once it is gone."""
        with self._lock:
            self._expire()
            rec = self._leases.get(lease.id)
            if rec is None:
                raise LeaseNotFoundError(f"lease {lease.id} has expired or was revoked; grant a new one")
            rec.expires_at = self._clock() + rec.ttl_s
            return rec.ttl_s

    def revoke_lease(self, lease: Lease) -> None:
        """End ``lease`` now, deleting every key under it (in one revision)."""
        with self._lock:
            self._expire()
            if lease.id not in self._leases:
                raise LeaseNotFoundError(f"lease {lease.id} has expired or was revoked already")
            self._end_lease(lease.id)

    def begin_incarnation(self, server: str) -> int:
        """Start a new incarnation of ``server``; its epoch is the revision of this write."""
        with self._lock:
            self._expire()
            self._revision += 1
            self._epochs[server] = self._revision
            return self._revision

    def epoch(self, server: str) -> int | None:
        """The current incarnation epoch of ``server``, or None if it never began one."""
        with self._lock:
            return self._epochs.get(server)
