"""Placement policy: pure functions over a :class:`~warmstart.scheduler.state.ClusterSnapshot`.

No I/O, no clocks, no randomness except an injected ``random.Random``. The scheduler's loops take a
snapshot, call these functions and apply what they return (load, route, unload, migrate).

Startup estimate for model m on server s (see ``docs/scheduler.md``)::

    wait_s     = Σ min(remaining, load_s + overhead_s) over loads in flight on s (they run concurrently and
                 share the node) + expected time of loads queued on s
    load_s     = size(m) / bandwidth(s, best tier holding m on s)   (memory > disk > remote)
    overhead_s = Triton model-load overhead measured on s
    total_s    = wait_s + load_s + overhead_s

Decision order of :func:`place`: a warm instance with room; else the load of m already in flight (never
a second load); else a new load where ``total_s + eviction penalty`` is least (evicting idle models, least
recently used first, to fit s's memory budget; the penalty is the startup time those evictions will cost
later requests: :func:`eviction_penalty_s`), or waiting for a slot on a busy warm instance if that is
sooner; else queue. Ties go to the server whose name sorts first.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from warmstart.scheduler.errors import CannotFitError
from warmstart.scheduler.state import ClusterSnapshot, Instance, ModelSpec, NodeBandwidth, ServerState, Tier

# ServerlessLLM's fixed figures (sllm/schedulers/storage_aware_scheduler.py): PCIe is hard-coded to 25 GB/s;
# its disk figure comes from a buffered 100 MB probe that mostly measures the page cache.
SLLM_PCIE_BPS = 25e9
SLLM_DISK_BPS = 5e9


class Action(enum.Enum):
    """What the scheduler should do with a request."""

    ROUTE = "route"  # a warm instance has a free slot: send it there now
    WAIT = "wait"  # every warm instance is busy and waiting for a slot is sooner than any load
    JOIN = "join"  # a load of this model is in flight or queued: wait for that one
    LOAD = "load"  # load the model on ``server`` (after evicting ``evictions``) and route there
    QUEUE = "queue"  # no server can take it now: hold it in the cold-start queue


@dataclass(frozen=True, slots=True)
class Estimate:
    """Expected seconds until model m can serve a first request on one server, by component."""

    wait_s: float
    load_s: float
    overhead_s: float
    tier: Tier
    total_s: float

    @classmethod
    def of(cls, *, wait_s: float, load_s: float, overhead_s: float, tier: Tier) -> Estimate:
        """An estimate whose ``total_s`` is the sum of its parts."""
        return cls(wait_s, load_s, overhead_s, tier, wait_s + load_s + overhead_s)


@dataclass(frozen=True, slots=True)
class Placement:
    """The decision for one request: the action, where, the estimate behind it, and what to evict first."""

    action: Action
    model: str
    server: str | None
    estimate: Estimate | None
    evictions: tuple[str, ...] = ()
    penalty_s: float = 0.0  # startup time the evictions are expected to cost later requests


@dataclass(frozen=True, slots=True)
class MigrationMove:
    """Move every running request of ``model`` from ``source`` to ``destination`` by token replay."""

    model: str
    source: str
    destination: str
    request_ids: tuple[str, ...]
    destination_estimate: Estimate
    destination_evictions: tuple[str, ...]
    replay_s: float
    cost_s: float


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """Free ``server`` for ``model`` by moving the generations in ``moves`` elsewhere.

    ``estimate_s`` is when ``model`` would be ready on ``server`` with the migration, ``baseline_s``
    without it (best non-migration placement, ``inf`` if that was to queue), ``gain_s`` the difference.
    """

    model: str
    server: str
    moves: tuple[MigrationMove, ...]
    evictions: tuple[str, ...]
    estimate_s: float
    baseline_s: float
    gain_s: float
    baseline: Placement


# ------------------------------------------------------------------------------------------ estimates


def _tier_on(server: ServerState, model: str) -> Tier:
    tier = server.store_tiers.get(model)
    if tier is Tier.MEMORY or tier is Tier.DISK:
        return tier
    return Tier.REMOTE if server.bandwidth.remote_bps is not None else Tier.NONE


def _has_room(instance: Instance, spec: ModelSpec, slots: int = 1) -> bool:
    return len(instance.requests) + slots <= spec.max_concurrency


def estimate_startup(snapshot: ClusterSnapshot, server: str, model: str) -> Estimate:
    """Expected time until ``model`` can start a request on ``server``, ignoring its memory budget.

    A warm instance with room costs nothing; a busy one costs the soonest expected end of one of its
    requests; a load of ``model`` in flight or queued there costs its remaining time. Otherwise it is a
    cold load: ``wait_s + size / bandwidth(tier) + overhead_s`` with the node's measured figures, where
    ``wait_s`` also holds the node's measured eviction time when models must be evicted first (the
    evictions are released, or unloaded, together before the load). ``load_s`` is ``inf`` (tier ``NONE``) when the
    node can neither read it locally nor reach the remote.
    """
    spec = snapshot.model(model)
    s = snapshot.server(server)
    tier = _tier_on(s, model)
    inst = s.instance(model)
    if inst is not None:
        wait = 0.0 if _has_room(inst, spec) else min(r.expected_remaining_s for r in inst.requests)
        return Estimate.of(wait_s=wait, load_s=0.0, overhead_s=0.0, tier=tier)
    for pos, ready_s in snapshot.index.in_flight.get(model, ()):
        if snapshot.servers[pos].name == server:
            return Estimate.of(wait_s=max(0.0, ready_s - snapshot.now), load_s=0.0, overhead_s=0.0, tier=tier)
    bandwidth = s.bandwidth.of(tier)
    load = spec.size_bytes / bandwidth if bandwidth is not None else math.inf
    evict = s.eviction_s if s.free_bytes < spec.size_bytes else 0.0
    return Estimate.of(
        wait_s=s.load_wait_s(snapshot.now, load + s.triton_load_overhead_s) + evict,
        load_s=load,
        overhead_s=s.triton_load_overhead_s,
        tier=tier,
    )


def _cold_totals(snapshot: ClusterSnapshot, spec: ModelSpec) -> npt.NDArray[np.float64]:
    """Vectorized cold-load ``total_s`` of ``spec`` on every server (memory budget not applied)."""
    idx = snapshot.index
    size = float(spec.size_bytes)
    load = idx.inv_remote_bw * size
    holders = idx.holders.get(spec.name)
    if holders is not None:
        load[holders.positions] = holders.inv_bw * size
    evict = np.where(idx.free_bytes < size, idx.eviction_s, 0.0)
    own = load + idx.overhead_s
    sharing = np.minimum(own[:, None], idx.in_flight_left).sum(axis=1)  # ServerState.load_wait_s
    totals: npt.NDArray[np.float64] = idx.queued_s + sharing + evict + own
    totals[~idx.healthy] = math.inf
    totals[idx.lacking(spec.name)] = math.inf  # its repository has no directory for the model
    for pos, _ in idx.warm.get(spec.name, ()):
        totals[pos] = math.inf
    return totals


# ------------------------------------------------------------------------------------------- eviction


def choose_evictions(server: ServerState, need_bytes: int, now: float) -> tuple[str, ...]:
    """Idle models to unload so ``need_bytes`` fit in ``server``'s budget: longest idle first.

    Never names a model with running requests. Returns ``()`` when it fits already; raises
    :class:`CannotFitError` when even evicting every idle model is not enough.
    """
    free = server.free_bytes
    if free >= need_bytes:
        return ()
    idle = sorted((i for i in server.instances if i.idle), key=lambda i: (-(now - i.last_used_s), i.model))
    chosen: list[str] = []
    for inst in idle:
        chosen.append(inst.model)
        free += inst.size_bytes
        if free >= need_bytes:
            return tuple(chosen)
    raise CannotFitError(
        f"server {server.name!r} cannot free {need_bytes} bytes: {free} free after evicting every idle model"
    )


def expired_models(snapshot: ClusterSnapshot) -> list[tuple[str, str]]:
    """``(server, model)`` pairs idle for at least the model's keep-alive, to unload; sorted.

    An instance of a model that is no longer in the snapshot's specs counts as expired when idle.
    Unhealthy servers are left out (nothing can be unloaded there).
    """
    out: list[tuple[str, str]] = []
    for s in snapshot.servers:
        if not s.healthy:
            continue
        for inst in s.instances:
            if not inst.idle:
                continue
            spec = snapshot.models.get(inst.model)
            if spec is None or snapshot.now - inst.last_used_s >= spec.keep_alive_s:
                out.append((s.name, inst.model))
    out.sort()
    return out


# ------------------------------------------------------------------------------------------ placement


def _warm_or_join(snapshot: ClusterSnapshot, spec: ModelSpec) -> Placement | None:
    """A warm instance with room (fewest running requests, then name), else a load already under way."""
    idx = snapshot.index
    best: tuple[int, int, Instance] | None = None
    for pos, inst in idx.warm.get(spec.name, ()):
        if idx.healthy[pos] and _has_room(inst, spec):
            key = (len(inst.requests), pos, inst)
            if best is None or key[:2] < best[:2]:
                best = key
    if best is not None:
        server = snapshot.servers[best[1]]
        return Placement(
            Action.ROUTE, spec.name, server.name, estimate_startup(snapshot, server.name, spec.name)
        )
    joinable = [(ready, pos) for pos, ready in idx.in_flight.get(spec.name, ()) if idx.healthy[pos]]
    if joinable:
        _, pos = min(joinable)
        server = snapshot.servers[pos]
        return Placement(
            Action.JOIN, spec.name, server.name, estimate_startup(snapshot, server.name, spec.name)
        )
    return None


def _soonest_busy_instance(snapshot: ClusterSnapshot, spec: ModelSpec) -> Placement | None:
    best: tuple[float, int] | None = None
    for pos, inst in snapshot.index.warm.get(spec.name, ()):
        if snapshot.index.healthy[pos] and inst.requests:
            key = (min(r.expected_remaining_s for r in inst.requests), pos)
            best = key if best is None or key < best else best
    if best is None:
        return None
    name = snapshot.servers[best[1]].name
    return Placement(Action.WAIT, spec.name, name, estimate_startup(snapshot, name, spec.name))


PENALTY_CANDIDATES = 8
"""Servers (least ``total_s`` first) whose evictions :func:`place` prices before choosing: O(1) per decision."""


_VictimMemo = dict[str, tuple[int, float, float]]


def _restart_best(snapshot: ClusterSnapshot, spec: ModelSpec, memo: _VictimMemo) -> tuple[int, float, float]:
    """Where a victim would restart soonest: ``(position, least cold-load total, second least)`` over the
    servers with room for it (memoized per decision: one vectorized pass per victim)."""
    best = memo.get(spec.name)
    if best is None:
        totals = _cold_totals(snapshot, spec)
        totals[snapshot.index.room_bytes < spec.size_bytes] = math.inf
        if totals.size == 0:
            best = (-1, math.inf, math.inf)
        else:
            first = int(np.argmin(totals))
            least = float(totals[first])
            totals[first] = math.inf
            best = (first, least, float(totals.min()))
        memo[spec.name] = best
    return best


DEMAND_HALF_LIFE_S = 60.0
"""Half-life of the request rates the router counts per model (:func:`record_arrival`)."""


def decayed_rate(rate: float, elapsed_s: float, half_life_s: float = DEMAND_HALF_LIFE_S) -> float:
    """An exponentially weighted request rate ``elapsed_s`` after it was ``rate``."""
    return rate * 0.5 ** (max(0.0, elapsed_s) / half_life_s)


def decayed_rates(
    counts: Mapping[str, tuple[float, float]], now: float, half_life_s: float = DEMAND_HALF_LIFE_S
) -> dict[str, float]:
    """:func:`decayed_rate` of every model at ``now``, from ``{model: (rate, when it was that rate)}``: the
    demand a snapshot carries (the same arithmetic, in one loop: a snapshot is taken many times a second)."""
    return {m: rate * 0.5 ** (max(0.0, now - t) / half_life_s) for m, (rate, t) in counts.items()}


def record_arrival(rate: float, elapsed_s: float, half_life_s: float = DEMAND_HALF_LIFE_S) -> float:
    """The rate after one more request, ``elapsed_s`` after the rate was ``rate``: each request adds
    ``ln 2 / half_life_s``, so requests arriving at a steady λ per second hold the rate near λ."""
    return decayed_rate(rate, elapsed_s, half_life_s) + math.log(2) / half_life_s


def victim_weight(demand: Mapping[str, float], victim: str, model: str, mean_rate: float = 0.0) -> float:
    """How much of a victim's restart an eviction for ``model`` is charged: ``2 λv / (λv + λref)``, at most
    1, where ``λref`` is the greater of ``model``'s rate and ``mean_rate`` (the mean over all models).

    A victim at least as popular as the model taking its room, or as an average model, is charged in full;
    one requested far less often is charged in proportion: its next request is that much less likely to
    come while the new model still holds the room. The mean keeps the weights apart when the model being
    loaded is itself rarely asked for (else every victim would be charged in full and the load could evict
    the most popular model as readily as the least). No counts at all (a fresh router): in full.
    """
    lv = demand.get(victim, 0.0)
    ref = max(demand.get(model, 0.0), mean_rate)
    if lv + ref <= 0.0:
        return 1.0
    return min(1.0, 2.0 * lv / (lv + ref))


def eviction_penalty_s(
    snapshot: ClusterSnapshot,
    pos: int,
    evictions: tuple[str, ...],
    memo: _VictimMemo | None = None,
    model: str | None = None,
) -> float:
    """Startup time that evicting ``evictions`` from server ``pos`` (its position in ``snapshot.servers``)
    is expected to cost later requests.

    A victim costs nothing when another healthy server has it warm (its requests go there) or when its
    keep-alive has run out (it would be unloaded anyway). Otherwise its next request restarts it, at the
    cheaper of: another server (its least cold-load total there), or this server again, where the model
    now being loaded holds the room: loading the victim back from the tier holding it here, plus evicting
    the new model and, later, its own restart (one more eviction and Triton load overhead). A victim that
    can be restarted nowhere costs ``inf``. With ``model`` (the one being loaded) each victim's cost is
    weighted by :func:`victim_weight`, so that between two servers a load evicts the less requested model.

    Why: without a penalty a release-cheap eviction looks free, and a load that evicts a model still in
    use wins over one that does not by a few milliseconds; that model's next request loads it back
    somewhere else, and so on. Pricing only the reload here (as if the room came back for free) sent a
    popular model's restarts to other servers' disks in the workload benchmark, evicting theirs in turn.
    """
    idx = snapshot.index
    server = snapshot.servers[pos]
    memo = {} if memo is None else memo
    total = 0.0
    for victim in evictions:
        spec = snapshot.models.get(victim)
        inst = server.instance(victim)
        if spec is None or inst is None or snapshot.now - inst.last_used_s >= spec.keep_alive_s:
            continue
        if any(idx.healthy[p] and p != pos for p, _ in idx.warm.get(victim, ())):
            continue
        weight = 1.0 if model is None else victim_weight(snapshot.demand, victim, model, snapshot.mean_demand)
        if weight <= 0.0:
            continue  # never asked for while the new model is (and 0 x inf must not make a NaN)
        bw = server.bandwidth.of(_tier_on(server, victim))
        here = (spec.size_bytes / bw if bw else math.inf) + server.triton_load_overhead_s
        back_here = here + server.eviction_s + server.triton_load_overhead_s
        first, least, second = _restart_best(snapshot, spec, memo)
        total += weight * min(back_here, second if first == pos else least)
    return total


def _load_at(
    snapshot: ClusterSnapshot,
    spec: ModelSpec,
    pos: int,
    estimate: Estimate | None,
    *,
    priced: bool = True,
    memo: _VictimMemo | None = None,
) -> Placement:
    """A load of ``spec`` on server ``pos``; ``priced``: with its evictions' penalty (the baselines' rules
    know nothing of it)."""
    server = snapshot.servers[pos]
    evictions = choose_evictions(server, spec.size_bytes, snapshot.now)
    if estimate is None:
        estimate = estimate_startup(snapshot, server.name, spec.name)
    penalty = eviction_penalty_s(snapshot, pos, evictions, memo, spec.name) if priced else 0.0
    return Placement(Action.LOAD, spec.name, server.name, estimate, evictions, penalty)


def _best_load(
    snapshot: ClusterSnapshot, spec: ModelSpec, totals: npt.NDArray[np.float64]
) -> Placement | None:
    """The load with the least ``total_s`` + eviction penalty among the :data:`PENALTY_CANDIDATES` servers
    of least ``total_s`` (a penalty only ever adds, so a server further down cannot win by much)."""
    k = min(PENALTY_CANDIDATES, totals.size)
    near = np.argpartition(totals, k - 1)[:k] if k < totals.size else np.arange(totals.size)
    best: Placement | None = None
    memo: _VictimMemo = {}
    for pos in sorted(near.tolist(), key=lambda p: (totals[p], p)):
        if not math.isfinite(totals[pos]):
            break
        if best is not None and totals[pos] >= _total(best):
            break  # the penalty only adds: no later server can beat the best found
        load = _load_at(snapshot, spec, pos, None, memo=memo)
        if best is None or _total(load) < _total(best):
            best = load
    return best


def _total(placement: Placement) -> float:
    return placement.estimate.total_s + placement.penalty_s if placement.estimate is not None else math.inf


def _finish(snapshot: ClusterSnapshot, spec: ModelSpec, load: Placement | None) -> Placement:
    """Pick between a new load and waiting on a busy warm instance (sooner wins); queue if neither."""
    wait = _soonest_busy_instance(snapshot, spec)
    if wait is not None and (load is None or _total(wait) <= _total(load)):
        return wait
    if load is not None:
        return load
    return Placement(Action.QUEUE, spec.name, None, None)


def place(snapshot: ClusterSnapshot, model: str) -> Placement:
    """Where a request for ``model`` should go (see the module docstring for the order of decisions)."""
    spec = snapshot.model(model)
    decided = _warm_or_join(snapshot, spec)
    if decided is not None:
        return decided
    totals = _cold_totals(snapshot, spec)
    totals[snapshot.index.room_bytes < spec.size_bytes] = math.inf
    load = _best_load(snapshot, spec, totals) if totals.size else None
    return _finish(snapshot, spec, load)


def serverlessllm_place(
    snapshot: ClusterSnapshot,
    model: str,
    *,
    disk_bw: float = SLLM_DISK_BPS,
    pcie_bw: float = SLLM_PCIE_BPS,
) -> Placement:
    """ServerlessLLM's storage-aware rule, as a baseline for benchmarks.

    Same warm-route and join steps as :func:`place`; for a new load: checkpoint in host memory →
    ``size / pcie_bw`` (load queue ignored); on disk → ``queue + size / disk_bw``; servers without a
    local copy are skipped unless none has one (then all count as disk). Fixed bandwidths, no remote
    tier, no Triton overhead. The returned estimate is the one this rule believed.
    """
    spec = snapshot.model(model)
    decided = _warm_or_join(snapshot, spec)
    if decided is not None:
        return decided
    idx = snapshot.index
    warm_positions = {pos for pos, _ in idx.warm.get(spec.name, ())}
    warm_positions.update(idx.lacking(spec.name).tolist())  # skipped like warm ones: cannot load it
    candidates: list[tuple[float, int, Estimate]] = []
    for local_only in (True, False):
        for pos, s in enumerate(snapshot.servers):
            if not s.healthy or pos in warm_positions or idx.room_bytes[pos] < spec.size_bytes:
                continue
            tier = s.store_tiers.get(spec.name)
            if tier is Tier.MEMORY:
                est = Estimate.of(wait_s=0.0, load_s=spec.size_bytes / pcie_bw, overhead_s=0.0, tier=tier)
            elif tier is Tier.DISK or not local_only:
                est = Estimate.of(
                    wait_s=float(idx.wait_s[pos]),
                    load_s=spec.size_bytes / disk_bw,
                    overhead_s=0.0,
                    tier=Tier.DISK,
                )
            else:
                continue
            candidates.append((est.total_s, pos, est))
        if candidates:
            break
    load = None
    if candidates:
        _, pos, est = min(candidates, key=lambda c: (c[0], c[1]))
        load = _load_at(snapshot, spec, pos, est, priced=False)
    return _finish(snapshot, spec, load)


def random_place(snapshot: ClusterSnapshot, model: str, rng: random.Random) -> Placement:
    """Random placement baseline: warm route or join as :func:`place`, else load on any server that fits."""
    spec = snapshot.model(model)
    decided = _warm_or_join(snapshot, spec)
    if decided is not None:
        return decided
    idx = snapshot.index
    warm_positions = {pos for pos, _ in idx.warm.get(spec.name, ())}
    warm_positions.update(idx.lacking(spec.name).tolist())  # skipped like warm ones: cannot load it
    fits = [
        pos
        for pos, s in enumerate(snapshot.servers)
        if s.healthy and pos not in warm_positions and idx.room_bytes[pos] >= spec.size_bytes
    ]
    load = _load_at(snapshot, spec, rng.choice(fits), None, priced=False) if fits else None
    return _finish(snapshot, spec, load)


def describe_placement(placement: Placement) -> str:
    """One line for the log: the action, where, the estimate by component and the evictions, e.g.
    ``load on node-a from remote: 2.31 s (wait 0.00 + load 1.30 + overhead 1.01), evicting ['m1'] (penalty
    0.40 s)``."""
    est = placement.estimate
    if placement.action is Action.QUEUE or placement.server is None or est is None:
        return placement.action.value
    where = {
        Action.ROUTE: f"route to {placement.server}",
        Action.WAIT: f"wait for a slot on {placement.server}",
        Action.JOIN: f"join the load on {placement.server}",
        Action.LOAD: f"load on {placement.server} from {est.tier.value}",
    }[placement.action]
    line = (
        f"{where}: {est.total_s:.2f} s (wait {est.wait_s:.2f} + load {est.load_s:.2f} "
        f"+ overhead {est.overhead_s:.2f})"
    )
    if placement.action is Action.LOAD:
        evicting = f"evicting {list(placement.evictions)}" if placement.evictions else "evicting nothing"
        line += f", {evicting} (penalty {placement.penalty_s:.2f} s)"
    return line


# ------------------------------------------------------------------------------------- placeability


class Blocker(enum.Enum):
    """Why one server cannot take a model. All but ``UNHEALTHY`` last until the configuration changes."""

    NOT_IN_REPOSITORY = "not_in_repository"  # its Triton repository has no directory for the model
    TOO_LARGE = "too_large"  # the model is larger than the server's whole memory budget
    NO_SOURCE = "no_source"  # no copy in its store's memory or disk tier, and no remote to fetch from
    UNHEALTHY = "unhealthy"  # down, or its node store has not reported yet: it may come back


@dataclass(frozen=True, slots=True)
class ServerBlock:
    """One server that cannot take a model, and why (``detail`` is for people)."""

    server: str
    blocker: Blocker
    detail: str

    @property
    def lasting(self) -> bool:
        """True when waiting cannot help: only a configuration change (or a new server) would."""
        return self.blocker is not Blocker.UNHEALTHY


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """No server can take ``model``: one :class:`ServerBlock` per server, in the snapshot's order."""

    model: str
    blocks: tuple[ServerBlock, ...]

    @property
    def final(self) -> bool:
        """True when every server's block lasts (or there is no server): the request can never be placed."""
        return all(b.lasting for b in self.blocks)

    @property
    def in_no_repository(self) -> bool:
        """True when the only thing missing is the model itself: no server's repository has it."""
        return bool(self.blocks) and all(b.blocker is Blocker.NOT_IN_REPOSITORY for b in self.blocks)

    def reason(self) -> str:
        """Which server lacks what, e.g. ``"node-a: not in its model repository; node-b: down"``."""
        if not self.blocks:
            return "no servers are registered"
        return "; ".join(f"{b.server}: {b.detail}" for b in self.blocks)


def _block(snapshot: ClusterSnapshot, pos: int, spec: ModelSpec) -> ServerBlock | None:
    s = snapshot.servers[pos]
    if s.repository is not None and spec.name not in s.repository:
        return ServerBlock(
            s.name,
            Blocker.NOT_IN_REPOSITORY,
            f"no {spec.name!r} in its model repository (its index lists {len(s.repository)} models)",
        )
    budget = s.memory_budget_bytes + s.freeing_bytes
    if budget < spec.size_bytes:
        return ServerBlock(
            s.name,
            Blocker.TOO_LARGE,
            f"memory budget {budget} bytes is smaller than the model's size_bytes {spec.size_bytes}",
        )
    if not s.healthy:
        return ServerBlock(s.name, Blocker.UNHEALTHY, "down, or its node store has not reported yet")
    if _tier_on(s, spec.name) is Tier.NONE:
        return ServerBlock(
            s.name,
            Blocker.NO_SOURCE,
            "no copy in its node's memory or disk tier and no remote bandwidth (no node store, and the "
            "server's bandwidth config gives no remote_bps)",
        )
    return None


def why_unplaceable(snapshot: ClusterSnapshot, model: str) -> Unplaceable | None:
    """Why no server can take a request for ``model``, or ``None`` when one can, now or after waiting.

    ``None`` as soon as a healthy server has ``model`` warm or loading, or one server could load it: its
    repository has the model (or was not read yet), its whole memory budget holds it, it is healthy, and
    it can read the model from its store's memory or disk tier or from the remote. Lack of room now
    (memory held by running requests, loads in flight) is not a block: the request waits for it. An
    :class:`Unplaceable` whose :attr:`~Unplaceable.final` is true can never be placed as configured, so
    the router answers at once instead of holding the request for the whole cold-start timeout.
    """
    spec = snapshot.model(model)
    idx = snapshot.index
    if any(idx.healthy[p] for p, _ in idx.warm.get(spec.name, ())) or any(
        idx.healthy[p] for p, _ in idx.in_flight.get(spec.name, ())
    ):
        return None
    blocks: list[ServerBlock] = []
    for pos in range(len(snapshot.servers)):
        block = _block(snapshot, pos, spec)
        if block is None:
            return None
        blocks.append(block)
    return Unplaceable(spec.name, tuple(blocks))


UNMEASURED_REMOTE_BPS = 100e6
"""Remote bandwidth assumed for a node whose store has not measured its remote tier yet (no fill since it
started) when no other node has measured one either and its config gives none: 100 MB/s, a little below a
1 Gbit/s link, so a local copy still wins. The node's first fill from the remote measures the real figure."""


def assumed_remote_bps(measured: Iterable[float]) -> float:
    """The remote bandwidth to place by on a node whose store has not measured its remote tier yet: the
    median of the figures other nodes measured (the nodes of a cluster read one object store), else
    :data:`UNMEASURED_REMOTE_BPS`. Without it such a node's models could never be placed (``inf``), so a
    fresh cluster held every request for a model that only the remote has until the cold-start timeout."""
    values = sorted(v for v in measured if v > 0 and math.isfinite(v))
    if not values:
        return UNMEASURED_REMOTE_BPS
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


# ------------------------------------------------------------------------------------ migration plans


_DestinationMemo = dict[str, npt.NDArray[np.float64]]


def _destination_totals(
    snapshot: ClusterSnapshot, spec: ModelSpec, memo: _DestinationMemo
) -> npt.NDArray[np.float64]:
    """Cold-load totals of ``spec`` on servers that could take it as a new load (fit, none in flight)."""
    totals = memo.get(spec.name)
    if totals is None:
        totals = _cold_totals(snapshot, spec)
        totals[snapshot.index.room_bytes < spec.size_bytes] = math.inf
        for pos, _ in snapshot.index.in_flight.get(spec.name, ()):
            totals[pos] = math.inf
        memo[spec.name] = totals
    return totals


def _best_destination(
    snapshot: ClusterSnapshot,
    inst: Instance,
    source: ServerState,
    *,
    used: set[str],
    replay_s: float,
    memo: _DestinationMemo,
) -> MigrationMove | None:
    """Where ``inst``'s requests start soonest: a warm instance with room for all, else the best new load."""
    spec = snapshot.models.get(inst.model)
    if spec is None:
        return None
    idx = snapshot.index
    excluded = {idx.position[source.name], *(idx.position[name] for name in used)}
    warm = [
        pos
        for pos, w in idx.warm.get(spec.name, ())
        if idx.healthy[pos] and pos not in excluded and _has_room(w, spec, len(inst.requests))
    ]
    evictions: tuple[str, ...] = ()
    if warm:  # costs only the replay, which beats any load
        dest = snapshot.servers[min(warm)]
        est = Estimate.of(wait_s=0.0, load_s=0.0, overhead_s=0.0, tier=_tier_on(dest, spec.name))
    else:
        totals = _destination_totals(snapshot, spec, memo)
        saved = [(pos, totals[pos]) for pos in excluded]
        totals[list(excluded)] = math.inf
        pos = int(np.argmin(totals)) if totals.size else -1
        found = pos >= 0 and math.isfinite(totals[pos])
        for p, value in saved:
            totals[p] = value
        if not found:
            return None
        dest = snapshot.servers[pos]
        est = estimate_startup(snapshot, dest.name, spec.name)
        evictions = choose_evictions(dest, spec.size_bytes, snapshot.now)
    return MigrationMove(
        model=spec.name,
        source=source.name,
        destination=dest.name,
        request_ids=tuple(r.request_id for r in inst.requests),
        destination_estimate=est,
        destination_evictions=evictions,
        replay_s=replay_s,
        cost_s=est.total_s + replay_s,
    )


def _plan_for_server(
    snapshot: ClusterSnapshot,
    spec: ModelSpec,
    server: ServerState,
    memo: _DestinationMemo,
    *,
    replay_s_per_token: float,
    threshold_tokens: int,
) -> tuple[tuple[MigrationMove, ...], tuple[str, ...]] | None:
    """The cheapest set of busy instances on ``server`` to move so ``spec`` fits, or ``None``."""
    # moving this replica's requests frees nothing while another replica's generations use the model
    busy = {i.model: i for i in server.instances if i.requests and not i.pinned}
    room = float(snapshot.index.room_bytes[snapshot.index.position[server.name]])
    options: list[MigrationMove] = []
    for inst in busy.values():
        replay_s = replay_s_per_token * (sum(r.context_tokens for r in inst.requests) + threshold_tokens)
        first = _best_destination(snapshot, inst, server, used=set(), replay_s=replay_s, memo=memo)
        if first is not None:
            options.append(first)
    options.sort(key=lambda m: (m.cost_s, m.model))
    chosen: list[MigrationMove] = []
    used: set[str] = set()
    moved = 0
    for option in options:
        if room + moved >= spec.size_bytes:
            break
        move: MigrationMove | None = option
        if option.destination in used:  # each destination takes one move; pick the next best one
            move = _best_destination(
                snapshot, busy[option.model], server, used=used, replay_s=option.replay_s, memo=memo
            )
        if move is None:
            continue
        chosen.append(move)
        used.add(move.destination)
        moved += busy[move.model].size_bytes
    if room + moved < spec.size_bytes or not chosen:
        return None
    evictions = choose_evictions(server, spec.size_bytes - moved, snapshot.now)
    return tuple(chosen), evictions


def drain_estimate(snapshot: ClusterSnapshot, model: str) -> float:
    """Seconds until ``model`` could start with no migration when no server has room for it now: on each
    healthy server whose budget can hold it, let the busy instances finish, soonest first, until enough
    memory is free, then evict them and load ``model``; the soonest server's time (``inf`` if none).

    An instance is done when its last running request is expected to end. This is the baseline a
    migration must beat when :func:`place` can only queue the request.
    """
    spec = snapshot.model(model)
    best = math.inf
    lacking = set(snapshot.index.lacking(spec.name).tolist())
    for pos, s in enumerate(snapshot.servers):
        if not s.healthy or s.memory_budget_bytes < spec.size_bytes or pos in lacking:
            continue
        room = float(snapshot.index.room_bytes[pos])
        ends = sorted(  # a pinned instance's end is another replica's to know: it does not drain here
            (max(r.expected_remaining_s for r in i.requests), i.size_bytes)
            for i in s.instances
            if i.requests and not i.pinned
        )
        drained = 0.0
        for end_s, size in ends:
            if room >= spec.size_bytes:
                break
            room += size
            drained = end_s
        if room < spec.size_bytes:
            continue
        est = estimate_startup(snapshot, s.name, model)
        evict = s.eviction_s if drained > 0.0 and est.wait_s < s.eviction_s else 0.0
        best = min(best, max(drained, est.wait_s) + evict + est.load_s + est.overhead_s)
    return best


def plan_migration(
    snapshot: ClusterSnapshot,
    model: str,
    *,
    replay_s_per_token: float,
    threshold_tokens: int,
    min_gain_s: float = 0.0,
) -> MigrationPlan | None:
    """A live migration that lets ``model`` start sooner than its best placement without one, or ``None``.

    For each server s where ``model`` does not fit only because models with running requests hold the
    memory: move those generations (all of each instance's requests) to other servers, each to a
    different destination. The cost of one move is the destination's startup estimate for that model
    (zero for a warm instance with room for all its requests) plus replaying every request's prompt and
    tokens so far, plus the final round of ``threshold_tokens``, at ``replay_s_per_token``. Moves run in
    parallel, and ``model`` loads on s once they are done and s's own queue has drained:
    ``max(moves, wait_s) + load_s + overhead_s``. Returned only if that beats the baseline (the best
    placement without migration; when that can only queue, :func:`drain_estimate`) by more than
    ``min_gain_s``; the soonest server wins, ties by name.
    """
    spec = snapshot.model(model)
    baseline = place(snapshot, model)
    if baseline.action in (Action.ROUTE, Action.JOIN):
        return None
    baseline_s = (
        baseline.estimate.total_s if baseline.estimate is not None else drain_estimate(snapshot, model)
    )
    idx = snapshot.index
    bound = _cold_totals(snapshot, spec)  # a lower bound of the migration estimate on every server
    candidates = np.nonzero((bound < baseline_s - min_gain_s) & (idx.room_bytes < spec.size_bytes))[0]
    memo: _DestinationMemo = {}
    best: MigrationPlan | None = None
    for pos in sorted(candidates.tolist(), key=lambda p: (bound[p], p)):
        if best is not None and bound[pos] >= best.estimate_s:
            break  # branch and bound: no later server can beat the plan found
        server = snapshot.servers[pos]
        found = _plan_for_server(
            snapshot,
            spec,
            server,
            memo,
            replay_s_per_token=replay_s_per_token,
            threshold_tokens=threshold_tokens,
        )
        if found is None:
            continue
        moves, evictions = found
        est = estimate_startup(snapshot, server.name, model)
        ready_s = max(*(m.cost_s for m in moves), est.wait_s) + est.load_s + est.overhead_s
        gain = baseline_s - ready_s
        if gain > min_gain_s and (best is None or ready_s < best.estimate_s):
            best = MigrationPlan(
                model=model,
                server=server.name,
                moves=moves,
                evictions=evictions,
                estimate_s=ready_s,
                baseline_s=baseline_s,
                gain_s=gain,
                baseline=baseline,
            )
    return best


# ------------------------------------------------------------------------------------- learning from loads

LEARN_WEIGHT = 0.3
"""Weight of the newest observation in the moving averages below."""
RECALL_WEIGHT = 0.1
"""Pull of each node-store report on a learned bandwidth (so one slow load is forgotten in time)."""


@dataclass(frozen=True, slots=True)
class LoadCosts:
    """What a server's loads have cost, learned by the router from its own loads.

    ``overhead_s`` is Triton's fixed cost of a load (stub start, engine build), learned from loads whose
    bytes cost little to move (memory tier). ``bps`` holds, per tier, the bandwidth loads from that tier
    reached end to end (the fill or read, page faults, contention with whatever else ran): on a busy node
    a remote fill takes 2-3x longer than the store's uncontended figure. ``unload_s`` is what an unload
    takes (tritonserver 2.51's Python backend sleeps 1 s in every instance finalize, a health check).
    ``release_s`` is what releasing an evicted model's engine takes (the warmstart backend frees its memory
    on a release request, ahead of the unload); ``None`` until a release succeeded, and again after one
    failed (then evictions wait for the unload). :func:`eviction_s` picks the one on a load's path.
    """

    overhead_s: float
    bps: Mapping[Tier, float] = field(default_factory=dict)
    unload_s: float = 1.0
    release_s: float | None = None


def learn_load(
    costs: LoadCosts, reported: NodeBandwidth, tier: Tier, size_bytes: int, elapsed_s: float
) -> LoadCosts:
    """``costs`` after a load of ``size_bytes`` from ``tier`` that took ``elapsed_s`` end to end.

    A memory-tier load updates the overhead (its bytes move at the reported memory bandwidth). A disk or
    remote load updates that tier's bandwidth from the time left after the overhead (at least 5 % of the
    load, so a load faster than the overhead does not imply an infinite bandwidth).
    """
    if tier is Tier.MEMORY or tier is Tier.NONE:
        overhead = max(0.0, elapsed_s - size_bytes / reported.memory_bps)
        return replace(costs, overhead_s=(1 - LEARN_WEIGHT) * costs.overhead_s + LEARN_WEIGHT * overhead)
    moving_s = max(elapsed_s - costs.overhead_s, 0.05 * elapsed_s, 1e-3)
    observed = size_bytes / moving_s
    old = costs.bps.get(tier)
    bps = dict(costs.bps)
    bps[tier] = observed if old is None else (1 - LEARN_WEIGHT) * old + LEARN_WEIGHT * observed
    return replace(costs, bps=bps)


def learn_unload(costs: LoadCosts, elapsed_s: float) -> LoadCosts:
    """``costs`` after an unload that took ``elapsed_s``."""
    return replace(costs, unload_s=(1 - LEARN_WEIGHT) * costs.unload_s + LEARN_WEIGHT * elapsed_s)


def learn_release(costs: LoadCosts, elapsed_s: float | None) -> LoadCosts:
    """``costs`` after an eviction's release that took ``elapsed_s``, or failed (``None``: the eviction
    then waited for the unload, and so will the next ones until a release succeeds again)."""
    if elapsed_s is None:
        return replace(costs, release_s=None)
    old = costs.release_s
    release = elapsed_s if old is None else (1 - LEARN_WEIGHT) * old + LEARN_WEIGHT * elapsed_s
    return replace(costs, release_s=release)


def eviction_s(costs: LoadCosts) -> float:
    """Seconds evicting idle models puts before a load (evictions run concurrently, so several cost this
    once): the release time when the server's releases work, else the unload time."""
    return costs.unload_s if costs.release_s is None else costs.release_s


def recall(costs: LoadCosts, reported: NodeBandwidth) -> LoadCosts:
    """``costs`` with each learned bandwidth pulled toward the node store's newest report."""
    bps = {}
    for tier, value in costs.bps.items():
        fresh = reported.of(tier)
        bps[tier] = value if fresh is None else (1 - RECALL_WEIGHT) * value + RECALL_WEIGHT * fresh
    return replace(costs, bps=bps)


def effective_bandwidth(reported: NodeBandwidth, costs: LoadCosts) -> NodeBandwidth:
    """The bandwidths placement uses: learned disk and remote figures where there are some, else reported."""
    remote = reported.remote_bps
    if remote is not None:
        remote = costs.bps.get(Tier.REMOTE, remote)
    return NodeBandwidth(reported.memory_bps, costs.bps.get(Tier.DISK, reported.disk_bps), remote)


# ------------------------------------------------------------------------------------------ LoRA adapters


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """One LoRA adapter of base model ``base``: its checkpoint reference and the bytes a load of it reads.

    A ``checkpoint`` that a node store lists (by that name, or the adapter's ``name``) is read from the tier
    it sits in there; anything else is fetched from the remote."""

    name: str
    base: str
    checkpoint: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class AdapterView:
    """What one server's instance of the base holds of its adapters, as the router accounts for it.

    ``served``: the names in that instance's ``multi_lora.json`` (what the scheduler last sent it; None: not
    known, e.g. an instance found loaded). ``resident``: adapters its requests used, least recently used first,
    at most ``max_loras`` (the backend keeps as many loaded, least recently used evicted). ``busy_s``: for each
    adapter that running requests hold there, the soonest expected end of one of them.
    """

    resident: tuple[str, ...] = ()
    served: frozenset[str] | None = None
    busy_s: Mapping[str, float] = field(default_factory=dict)
    max_loras: int = 4


_NO_VIEW = AdapterView()


def adapter_tier(server: ServerState, adapter: AdapterSpec) -> Tier:
    """Where ``server``'s node store holds ``adapter``'s checkpoint (memory or disk), else remote (or none)."""
    for key in (adapter.checkpoint, adapter.name):
        tier = server.store_tiers.get(key)
        if tier is Tier.MEMORY or tier is Tier.DISK:
            return tier
    return Tier.REMOTE if server.bandwidth.remote_bps is not None else Tier.NONE


def adapter_estimate(server: ServerState, adapter: AdapterSpec, view: AdapterView = _NO_VIEW) -> Estimate:
    """Expected seconds before a request on ``adapter`` starts on ``server``'s warm instance of its base.

    Resident there: nothing. Otherwise its load, ``size / bandwidth(tier it sits in on that node)`` (inf with
    no source), after waiting for a slot when all ``max_loras`` are held by running requests (the soonest of
    their ends: the backend frees a slot only once its requests finished)."""
    tier = adapter_tier(server, adapter)
    if adapter.name in view.resident:
        return Estimate.of(wait_s=0.0, load_s=0.0, overhead_s=0.0, tier=tier)
    bandwidth = server.bandwidth.of(tier)
    load = adapter.size_bytes / bandwidth if bandwidth is not None else math.inf
    wait = 0.0
    if len(view.resident) >= view.max_loras and all(r in view.busy_s for r in view.resident):
        wait = min(view.busy_s[r] for r in view.resident)
    return Estimate.of(wait_s=wait, load_s=load, overhead_s=0.0, tier=tier)


def _plus(base: Estimate | None, extra: Estimate) -> Estimate:
    if base is None:
        return extra
    return Estimate(
        base.wait_s + extra.wait_s,
        base.load_s + extra.load_s,
        base.overhead_s,
        base.tier,
        base.total_s + extra.total_s,
    )


def place_adapter(
    snapshot: ClusterSnapshot,
    adapter: AdapterSpec,
    views: Mapping[str, AdapterView],
    base: Placement,
) -> Placement:
    """Where a request on ``adapter`` goes, given ``base``: the placement of its base model by the rule in
    use (:func:`place` or a baseline).

    When the base routes (a warm instance has a free slot), the warm instance with a free slot where the
    adapter starts soonest wins (:func:`adapter_estimate`: resident first, then the cheapest tier to load it
    from), then one whose ``multi_lora.json`` is known to list it, then fewest running requests, then name.
    Otherwise the base's decision stands (join, load, wait or queue: a warm base is worth far more than where
    the adapter sits), its estimate with the adapter's load on that server added."""
    if base.action is not Action.ROUTE:
        if base.server is None or base.action is Action.QUEUE:
            return base
        server = snapshot.server(base.server)
        extra = adapter_estimate(server, adapter, views.get(server.name, _NO_VIEW))
        return replace(base, estimate=_plus(base.estimate, extra))
    spec = snapshot.model(adapter.base)
    best: tuple[float, bool, int, int] | None = None
    best_est: Estimate | None = None
    for pos, inst in snapshot.index.warm.get(spec.name, ()):
        if not snapshot.index.healthy[pos] or not _has_room(inst, spec):
            continue
        server = snapshot.servers[pos]
        view = views.get(server.name, _NO_VIEW)
        est = adapter_estimate(server, adapter, view)
        unknown = view.served is None or adapter.name not in view.served
        key = (est.total_s, unknown, len(inst.requests), pos)
        if best is None or key < best:
            best, best_est = key, est
    if best is None or best_est is None:
        return base
    return Placement(Action.ROUTE, spec.name, snapshot.servers[best[3]].name, best_est)
