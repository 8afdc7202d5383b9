"""One scheduler replica's side of the allocations it shares with the others (``docs/cluster.md``).

With cluster state on etcd, several ``warmstart scheduler`` replicas route to the same servers. Each takes
its own decisions with the policy, but writes them through the server's shared allocation as
compare-and-sets, so that together they:

* never start two loads of one model on one server: the replica whose claim wins loads it; one that finds
  the claim of another joins that load (waits for it to end, then routes to the model);
* never overcommit a server's memory budget: a claim is refused when the loaded models, the loads in flight
  of every replica and the new model do not fit (``NO_ROOM``: the replica decides again, now seeing the
  others' claims in its snapshot);
* never unload or evict a model another replica's generations use: each replica keeps its in-use counts
  under its own lease, and an unload is a compare-and-set on a view where no other replica uses the model.

A replica's claims and counts are under its lease (kept alive every TTL/3): when it dies they expire and the
others carry on. The store is synchronous; calls run in a worker thread so the event loop never blocks on
etcd.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from warmstart.scheduler.errors import (
    ClusterStateError,
    LeaseNotFoundError,
    RevisionConflictError,
)
from warmstart.scheduler.state import (
    DEFAULT_LEASE_TTL_S,
    Allocation,
    ClusterStateStore,
    Lease,
    LoadClaim,
)

__all__ = [
    "AllocationSync",
    "ClaimResult",
    "CoordinatorStats",
    "ReplicaCoordinator",
    "replica_name",
    "sync_with_allocation",
]

logger = logging.getLogger(__name__)

CAS_ATTEMPTS = 8  # re-reads after a lost compare-and-set before a decision is given up (and taken again)


class ClaimResult(enum.Enum):
    WON = "won"  # this replica loads it
    JOIN = "join"  # another replica's load of it is in flight, or it is loaded already
    NO_ROOM = "no_room"  # with every replica's loads it does not fit: decide again


class CoordinatorStats:
    """How long this replica's shared-allocation calls took, and how its claims ended.

    ``claim`` is one load decision's added cost with other replicas (the compare-and-set, and its reads of
    the allocation where the cached view did not do: retries included), ``claim_cas`` each compare-and-set
    write within it, ``decision_read`` each read of a server's allocation a decision takes before it
    (``Router._others_done``: the servers where other replicas' generations pin models, read again when
    older than ``PINNED_REFRESH_S``), ``may_unload`` an unload or eviction check (read + compare-and-set),
    ``finished`` the write that ends a load. The last ``keep`` durations of each are kept (seconds);
    ``counts`` has every call (calls that raised are not timed). Shown in the admin state
    (``Router.describe()["replicas"]``).
    """

    OPS = ("claim", "claim_cas", "decision_read", "may_unload", "finished")

    def __init__(self, keep: int = 4096) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.durations: dict[str, deque[float]] = {op: deque(maxlen=keep) for op in self.OPS}
        self.counts: dict[str, int] = dict.fromkeys(self.OPS, 0)
        self.outcomes: dict[str, int] = {
            **{r.value: 0 for r in ClaimResult},
            "unload_released": 0,
            "unload_refused": 0,
        }

    def record(self, op: str, seconds: float, outcome: str | None = None) -> None:
        """One call of ``op`` (one of :attr:`OPS`) took ``seconds``; ``outcome`` is counted if given."""
        if op not in self.durations:
            raise ValueError(f"unknown operation {op!r}; known: {', '.join(self.OPS)}")
        self.durations[op].append(seconds)
        self.counts[op] += 1
        if outcome is not None:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    @staticmethod
    def _quantile(sorted_xs: list[float], q: float) -> float:
        k = (len(sorted_xs) - 1) * q
        lo, hi = math.floor(k), math.ceil(k)
        return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)

    def summary(self) -> dict[str, Any]:
        """JSON-able: per operation ``n`` (every call), ``median_ms``/``p99_ms``/``max_ms`` over the kept
        durations (None before the first call) and ``samples_ms``; and the claim/unload ``outcomes``."""
        ops: dict[str, Any] = {}
        for op, xs in self.durations.items():
            s = sorted(xs)
            ops[op] = {
                "n": self.counts[op],
                "median_ms": self._quantile(s, 0.5) * 1e3 if s else None,
                "p99_ms": self._quantile(s, 0.99) * 1e3 if s else None,
                "max_ms": s[-1] * 1e3 if s else None,
                "samples_ms": [round(x * 1e3, 4) for x in xs],
            }
        return {"ops": ops, "outcomes": dict(self.outcomes)}


@dataclass(frozen=True)
class AllocationSync:
    """How one replica's instances on a server follow that server's shared allocation (one round).

    ``adopt``: models other replicas loaded there, to route to (model -> bytes); ``confirm``: instances the
    allocation records (now known shared); ``drop``: instances it recorded once and no longer does (another
    replica unloaded or is unloading them, or is loading them again), out of routing; ``record``: instances
    found in the server's index only (loaded before the allocations knew of them), to record as loaded."""

    adopt: Mapping[str, int]
    confirm: frozenset[str]
    drop: tuple[str, ...]
    record: Mapping[str, int]


def sync_with_allocation(
    view: Allocation,
    instances: Mapping[str, tuple[int, bool]],
    *,
    in_flight: Collection[str],
    busy: Collection[str],
    models: Collection[str],
    first: bool = True,
) -> AllocationSync:
    """Pure: the round's changes for one server. ``instances``: model -> (bytes, shared) of what this replica
    routes to there; ``in_flight``: models it is loading or unloading there itself (left alone); ``busy``:
    instances with running generations (never dropped: a release checks every replica's in-use counts, so a
    busy one leaving the allocation is a race that the generations' failover settles); ``models``: the
    models this replica knows (only those are adopted). ``first``: this replica's first round with this
    server: instances found only in its index (loaded before the allocations knew of them) are recorded;
    in a later round such an instance is one another replica unloaded between this replica's read of the
    index and the round, and is dropped (recording it would keep a model that is gone in the allocation)."""
    adopt = {
        m: size
        for m, size in view.loaded.items()
        if m in models and m not in instances and m not in in_flight
    }
    confirm: set[str] = set()
    drop: list[str] = []
    record: dict[str, int] = {}
    for m, (size, shared) in instances.items():
        if m in in_flight:
            continue
        if m in view.loaded:
            if not shared:
                confirm.add(m)
        elif shared or m in view.unloading or m in view.loads or not first:
            if m not in busy:
                drop.append(m)
        else:
            record[m] = size
    return AllocationSync(adopt, frozenset(confirm), tuple(sorted(drop)), record)


def replica_name() -> str:
    """A name unique to this process: host, pid and a random tail (no '/')."""
    host = socket.gethostname().replace("/", "_")[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class ReplicaCoordinator:
    """Claims, in-use counts and unload checks of one replica, under its lease."""

    def __init__(
        self,
        store: ClusterStateStore,
        *,
        name: str | None = None,
        ttl_s: int = DEFAULT_LEASE_TTL_S,
        optimistic: bool = False,
    ):
        self.store = store
        # claims decided on the cached view with no read first (off by default: docs/cluster.md, "Claims")
        self.optimistic = optimistic
        self.name = name or replica_name()
        self.ttl_s = ttl_s
        self.lease: Lease | None = None
        self.views: dict[str, Allocation] = {}  # last allocation read per server
        self.read_at: dict[str, float] = {}  # when (time.monotonic) each view was read
        self._counts: dict[tuple[str, str], int] = {}  # what this replica last wrote
        self._dirty: dict[tuple[str, str], int] = {}
        self._flushing: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # reads of allocations after a won claim
        self.stats = CoordinatorStats()
        self.unreachable: str | None = None  # why the last call to cluster state failed, until one succeeds

    # -- the lease ---------------------------------------------------------------------------------------
    async def _lease(self) -> Lease:
        if self.lease is None:
            self.lease = await asyncio.to_thread(self.store.grant_lease, self.ttl_s)
            logger.info("replica %s: lease %d (%d s)", self.name, self.lease.id, self.lease.ttl_s)
            self._dirty.update(self._counts)  # a new lease: write the counts again under it
        return self.lease

    async def keep_alive(self) -> None:
        """Renew the lease (a lapsed one is replaced, and this replica's counts written again)."""
        try:
            if self.lease is None:
                await self._lease()
            else:
                await asyncio.to_thread(self.store.keep_alive, self.lease)
        except LeaseNotFoundError:
            logger.warning("replica %s: its lease lapsed; taking a new one", self.name)
            self.lease = None
            await self._lease()
        self._kick()

    async def close(self) -> None:
        """End the lease now: this replica's claims and counts go with it."""
        if self._flushing is not None:
            self._flushing.cancel()
        for task in list(self._background):
            task.cancel()
        if self.lease is not None:
            try:
                await asyncio.to_thread(self.store.revoke_lease, self.lease)
            except ClusterStateError as e:
                logger.warning(
                    "replica %s: could not revoke its lease (%s); it ends by its TTL", self.name, e
                )
            self.lease = None

    # -- reads -------------------------------------------------------------------------------------------
    async def refresh(self, server: str) -> Allocation:
        at = time.monotonic()
        view = await asyncio.to_thread(self.store.allocation, server)
        self.views[server] = view
        self.read_at[server] = at
        return view

    async def decision_read(self, server: str) -> Allocation:
        """:meth:`refresh` for a load decision about to be taken (timed in ``stats`` as ``decision_read``)."""
        t0 = time.perf_counter()
        view = await self.refresh(server)
        self.stats.record("decision_read", time.perf_counter() - t0)
        return view

    async def settle(self) -> None:
        """Wait for the background reads started after won claims (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _refresh_later(self, server: str) -> None:
        async def read() -> None:
            try:
                await self.refresh(server)
            except ClusterStateError as e:
                logger.debug("replica %s: background read of %s failed: %s", self.name, server, e)

        task = asyncio.get_running_loop().create_task(read(), name=f"read allocation {server}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def refresh_all(self, servers: Iterable[str]) -> None:
        for server in servers:
            try:
                await self.refresh(server)
            except ClusterStateError as e:
                logger.warning("replica %s: cannot read the allocation of %s: %s", self.name, server, e)

    def others_loads(self, server: str) -> dict[str, int]:
        """Loads in flight on ``server`` that other replicas carry out: model -> bytes."""
        view = self.views.get(server)
        if view is None:
            return {}
        return {m: c.size_bytes for m, c in view.loads.items() if c.replica != self.name}

    def others_holding(self, server: str, known: Collection[str]) -> tuple[int, int]:
        """Bytes ``server``'s allocation (as last read) commits beyond what this replica tracks (``known``:
        the models it routes to, loads or unloads there): (models recorded loaded, others' unloads not
        finished). Its budget shrinks by the first; the second is memory being freed."""
        view = self.views.get(server)
        if view is None:
            return 0, 0
        loaded = sum(size for m, size in view.loaded.items() if m not in known)
        freeing = sum(
            c.size_bytes for m, c in view.unloading.items() if c.replica != self.name and m not in known
        )
        return loaded, freeing

    def others_using(self, server: str) -> frozenset[str]:
        """Models on ``server`` that other replicas' generations use (their in-use counts, as last read)."""
        view = self.views.get(server)
        if view is None:
            return frozenset()
        return frozenset(m for m in view.in_use if view.users(m, besides=self.name) > 0)

    # -- decisions ---------------------------------------------------------------------------------------
    async def claim(
        self, server: str, model: str, size_bytes: int, budget_bytes: int, *, freeing: Iterable[str] = ()
    ) -> ClaimResult:
        """Claim the load of ``model`` on ``server`` (compare-and-set), or say why not (timed in ``stats``).

        By default a claim reads ``server``'s allocation, decides on it and compare-and-sets on its
        revision (two etcd round trips). With ``optimistic`` and a view of ``server`` cached (the last
        read, or this replica's own last claim there), the claim is decided on it and, when that decision
        is to claim, its compare-and-set is the
        only etcd round trip; a stale view's compare-and-set fails, and the claim reads the allocation and
        decides again. JOIN and NO_ROOM are never answered from a cached view (they are not guarded by a
        compare-and-set): the allocation is read and the decision taken again on it first. Measured with
        ``benchmarks/workload.py --schedulers 2``, the optimistic claim halved the claim's median but the
        two replicas then loaded 2-4x as often from the remote tier (p99 TTFT 2.7-3.7x one scheduler's,
        against 1.45x reading first; benchmarks/README.md, "Two scheduler replicas"), so it is off.

        ``freeing``: the models this replica evicts for this load (released already): their bytes are free
        by the time it loads (it waits for their release or unload first), so they do not count."""
        t0 = time.perf_counter()
        result = await self._claim(server, model, size_bytes, budget_bytes, frozenset(freeing))
        self.stats.record("claim", time.perf_counter() - t0, result.value)
        return result

    def _decide(
        self,
        view: Allocation,
        model: str,
        size_bytes: int,
        budget_bytes: int,
        freeing: frozenset[str],
        *,
        log: bool,
    ) -> ClaimResult | None:
        """The claim's decision on ``view``: JOIN, NO_ROOM, or None (claim it: the compare-and-set)."""
        claim = view.loads.get(model)
        if claim is not None and claim.replica != self.name:
            if log:
                logger.info(
                    "replica %s: %s on %s is being loaded by %s; joining",
                    self.name, model, view.server, claim.replica,
                )  # fmt: skip
            return ClaimResult.JOIN
        if model in view.loaded:
            return ClaimResult.JOIN
        mine = sum(c.size_bytes for m, c in view.unloading.items() if m in freeing and c.replica == self.name)
        committed = view.committed_bytes - mine
        if committed + size_bytes > budget_bytes:
            if log:
                logger.info(
                    "replica %s: %s (%d B) does not fit on %s with every replica's loads (%d of %d B committed)",
                    self.name, model, size_bytes, view.server, committed, budget_bytes,
                )  # fmt: skip
            return ClaimResult.NO_ROOM
        return None

    async def _claim(
        self, server: str, model: str, size_bytes: int, budget_bytes: int, freeing: frozenset[str]
    ) -> ClaimResult:
        # optimistic: decided on first, with no read; None: read before deciding
        cached = self.views.get(server) if self.optimistic else None
        for _ in range(CAS_ATTEMPTS):
            if cached is not None:
                view, cached = cached, None
                answer = self._decide(view, model, size_bytes, budget_bytes, freeing, log=False)
                if answer is not None:  # a JOIN or NO_ROOM is never answered from a view that may be stale
                    view = await self.refresh(server)
                    answer = self._decide(view, model, size_bytes, budget_bytes, freeing, log=True)
            else:
                view = await self.refresh(server)
                answer = self._decide(view, model, size_bytes, budget_bytes, freeing, log=True)
            if answer is not None:
                return answer
            lease = await self._lease()
            t0 = time.perf_counter()
            try:
                revision = await asyncio.to_thread(
                    self.store.claim_load, server, model, size_bytes, self.name, lease=lease,
                    expected_revision=view.revision,
                )  # fmt: skip
            except RevisionConflictError:
                continue  # another replica wrote this server's allocation since: read and decide again
            except LeaseNotFoundError:
                self.lease = None
                cached = view  # nothing was written: the same view, under a new lease
                continue
            finally:
                self.stats.record("claim_cas", time.perf_counter() - t0)
            # no read back: the allocation at ``revision`` is ``view`` plus this claim (the compare-and-set
            # held, so nothing else was written there since, but for lease ends, which only free room), so
            # the next claim here is decided on it with no read (unless a read replaced the view while the
            # write was in flight: that one stays). ``read_at`` stays the time of the read, as its in-use
            # counts are that old; this replica's own claim never counts among the others' (``others_loads``)
            if self.views.get(server) is view:
                self.views[server] = replace(
                    view, revision=revision, loads={**view.loads, model: LoadClaim(self.name, size_bytes)}
                )
            # placement decides on the views too (other replicas' in-use counts, their loads): read this
            # one again in the background, off the decision's path, so the next decisions see it fresh
            self._refresh_later(server)
            return ClaimResult.WON
        logger.warning(
            "replica %s: the allocation of %s kept changing; deciding %s again", self.name, server, model
        )
        return ClaimResult.NO_ROOM

    async def finished(self, server: str, model: str, *, loaded_bytes: int | None) -> None:
        """This replica's load of ``model`` on ``server`` ended (``loaded_bytes`` None: it failed)."""
        t0 = time.perf_counter()
        await asyncio.to_thread(self.store.finish_load, server, model, self.name, size_bytes=loaded_bytes)
        await self.refresh(server)
        self.stats.record("finished", time.perf_counter() - t0)

    async def wait_for_load(self, server: str, model: str, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Wait until no replica's load of ``model`` on ``server`` is in flight; True if it is loaded then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            view = await self.refresh(server)
            if model not in view.loads:
                return model in view.loaded
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(poll_s)

    async def may_unload(self, server: str, model: str) -> bool:
        """Take ``model`` out of ``server``'s allocation for an unload or eviction, unless another replica's
        generations use it (compare-and-set on a view where none does). False: keep it loaded."""
        t0 = time.perf_counter()
        released = await self._may_unload(server, model)
        outcome = "unload_released" if released else "unload_refused"
        self.stats.record("may_unload", time.perf_counter() - t0, outcome)
        return released

    async def _may_unload(self, server: str, model: str) -> bool:
        for _ in range(CAS_ATTEMPTS):
            view = await self.refresh(server)
            users = view.users(model, besides=self.name)
            if users:
                logger.info(
                    "replica %s: not unloading %s on %s: %d generation(s) of other replicas use it",
                    self.name, model, server, users,
                )  # fmt: skip
                return False
            try:
                lease = await self._lease()
                await asyncio.to_thread(
                    self.store.release_loaded,
                    server,
                    model,
                    self.name,
                    expected_revision=view.revision,
                    expected_use_revision=view.use_revision,
                    lease=lease,
                )
            except RevisionConflictError:
                continue
            except LeaseNotFoundError:
                self.lease = None
                continue
            await self.refresh(server)
            return True
        return False

    async def forget_loaded(self, server: str, model: str) -> bool:
        """``server`` answered that it does not have ``model`` while its allocation records it loaded: take
        the record out (a compare-and-set on a view that still has it and where no other replica uses it,
        then its unload is recorded as done). True if the record was taken out."""
        view = self.views.get(server) or await self.refresh(server)
        if model not in view.loaded or model in view.loads:
            return False
        if not await self.may_unload(server, model):
            return False
        await self.unloaded(server, model)
        logger.warning(
            "replica %s: %s was recorded loaded on %s, which does not have it: record removed",
            self.name, model, server,
        )  # fmt: skip
        return True

    async def unloaded(self, server: str, model: str) -> None:
        """This replica's unload (or successful release) of ``model`` on ``server`` freed its memory."""
        await asyncio.to_thread(self.store.unloaded, server, model, self.name)
        await self.refresh(server)

    # -- in-use counts -----------------------------------------------------------------------------------
    def in_use(self, server: str, model: str, count: int) -> None:
        """This replica now has ``count`` generations on ``model`` at ``server`` (written in the background,
        in order, the latest count winning)."""
        key = (server, model)
        if self._counts.get(key, 0) == count and key not in self._dirty:
            return
        self._counts[key] = count
        self._dirty[key] = count
        self._kick()

    def _kick(self) -> None:
        if self._dirty and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().create_task(self._flush(), name="in-use counts")

    async def _flush(self) -> None:
        while self._dirty:
            key, count = next(iter(self._dirty.items()))
            try:
                lease = await self._lease()
                await asyncio.to_thread(self.store.set_in_use, *key, self.name, count, lease=lease)
            except LeaseNotFoundError:
                self.lease = None
                continue
            except ClusterStateError as e:
                logger.warning("replica %s: cannot write its in-use count of %s/%s: %s", self.name, *key, e)
                return  # kept dirty: the next keep-alive round tries again
            if self._dirty.get(key) == count:
                del self._dirty[key]
            if count == 0:
                self._counts.pop(key, None)
