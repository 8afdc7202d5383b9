"""Discrete-event replay of a cluster driven by the scheduler's own policy code.

Time, loads and decoding come from a cost model (:class:`ServerProfile`); every decision comes from the
functions the router calls: :func:`~warmstart.scheduler.router.placement_rule` (``place``,
``random_place``, ``serverlessllm_place``), :func:`~warmstart.scheduler.policy.plan_migration`,
:func:`~warmstart.scheduler.policy.choose_evictions` (through the placement), the keep-alive reaper's
:func:`~warmstart.scheduler.policy.expired_models`, the demand counter
(:func:`~warmstart.scheduler.policy.record_arrival` / ``decayed_rate``) and the cost learning
(``learn_load``, ``learn_release``, ``learn_unload``, ``effective_bandwidth``, ``eviction_s``). What the
router does around them (register a load so later requests join it, evict before loading, hold a request
in the cold-start queue and re-place it on every change and at least once a second, refuse it when the
queue is full or its cold-start timeout passes) is mirrored step by step in :class:`Simulator`.

No I/O, no wall clock (except the optional decision timing), no randomness but a seeded
``random.Random``: the same input gives the same :class:`SimResult`.

The cost model (``docs/simulate.md``):

* a load from tier ``t`` takes ``size / bandwidth(t) + triton_load_overhead_s`` of solo time; loads in
  flight on one server share it (each runs at ``1/n`` speed while ``n`` run); a remote transfer gets
  ``min(remote_bps, remote_egress_bps / k)`` with ``k`` the remote transfers running when it starts;
* evictions first release the victims' engines (``release_s``, concurrently; their memory is free
  then), the unload runs in the background (``unload_s``);
* a generation needs ``prefill_s + max_tokens * token_s`` of solo compute, with
  ``prefill_s = prefill_fixed_s + prompt_tokens * size_GB * prefill_s_per_token_gb`` and
  ``token_s = token_fixed_s + size_GB * token_s_per_gb``; the first token comes after ``prefill_s +
  token_s``; ``n`` generations sharing a compute domain (one instance, or the whole machine) each run at
  ``1 / (1 + batch_slowdown * (n - 1))`` speed;
* a live migration replays the context on the destination at its prefill rate, then switches.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from warmstart.scheduler.policy import (
    Action,
    LoadCosts,
    MigrationPlan,
    Placement,
    decayed_rates,
    effective_bandwidth,
    eviction_s,
    expired_models,
    learn_load,
    learn_release,
    learn_unload,
    plan_migration,
    record_arrival,
)
from warmstart.scheduler.state import (
    ClusterSnapshot,
    Instance,
    LoadInFlight,
    ModelSpec,
    NodeBandwidth,
    RunningRequest,
    ServerState,
    Tier,
)

GB = 1e9
DEFAULT_TOKEN_S = 0.05  # the router's per-token time for a model until one generation measured it
PROMOTE_ON_DISK_LOAD = True  # the node store copies a model read from its disk tier into its memory tier


class SimulationInputError(ValueError):
    """A profile, catalogue, workload or setting the simulator cannot use; the message says which."""


# ================================================================================================ inputs


@dataclass(frozen=True)
class ServerProfile:
    """One kind of server: memory, tiers, bandwidths, Triton's costs and the compute cost model."""

    memory_budget_bytes: int  # accelerator memory the scheduler may fill with models
    host_memory_bytes: int  # the node store's memory tier
    disk_bytes: int  # the node store's disk tier
    memory_bps: float  # memory tier -> a loaded model
    disk_bps: float  # disk tier -> a loaded model
    remote_bps: float | None  # remote store -> this server (its network), None: unreachable
    triton_load_overhead_s: float
    release_s: float
    unload_s: float
    prefill_fixed_s: float
    prefill_s_per_token_gb: float
    token_fixed_s: float
    token_s_per_gb: float
    batch_slowdown: float
    compute_scope: str = "instance"  # "instance": each model its own accelerators; "machine": all share
    machine_share: float = 0.0  # compute scope "machine": slowdown added by each other busy engine or load
    load_scope: str = "server"  # "server": a server's loads share it; "machine": every load shares one pipe

    def __post_init__(self) -> None:
        for key in (
            "memory_budget_bytes",
            "host_memory_bytes",
            "disk_bytes",
            "triton_load_overhead_s",
            "release_s",
            "unload_s",
            "prefill_fixed_s",
            "prefill_s_per_token_gb",
            "token_fixed_s",
            "token_s_per_gb",
            "batch_slowdown",
            "machine_share",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SimulationInputError(f"server profile: {key} must be a finite number, got {value!r}")
            if value < 0:
                raise SimulationInputError(f"server profile: {key} must be >= 0, got {value!r}")
        for key in ("memory_bps", "disk_bps", "remote_bps"):
            value = getattr(self, key)
            if value is None and key == "remote_bps":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise SimulationInputError(f"server profile: {key} must be a number > 0, got {value!r}")
        if self.compute_scope not in ("instance", "machine"):
            raise SimulationInputError(
                f"compute_scope must be 'instance' or 'machine', got {self.compute_scope!r}"
            )
        if self.load_scope not in ("server", "machine"):
            raise SimulationInputError(f"load_scope must be 'server' or 'machine', got {self.load_scope!r}")

    def bandwidth(self) -> NodeBandwidth:
        """What the node store would report (its measured figures)."""
        return NodeBandwidth(self.memory_bps, self.disk_bps, self.remote_bps)

    def prefill_s(self, size_bytes: int, tokens: int) -> float:
        """Solo seconds to prefill ``tokens`` on a model of ``size_bytes``."""
        return self.prefill_fixed_s + tokens * size_bytes / GB * self.prefill_s_per_token_gb

    def token_s(self, size_bytes: int) -> float:
        """Solo seconds per generated token."""
        return self.token_fixed_s + size_bytes / GB * self.token_s_per_gb

    def slowdown(self, n: int) -> float:
        """How much slower each of ``n`` generations sharing a compute domain runs than one alone."""
        return 1.0 + self.batch_slowdown * max(0, n - 1)


@dataclass(frozen=True)
class SimServer:
    """A server of the simulated cluster and what its node store holds at the start."""

    name: str
    profile: ServerProfile
    memory_tier: tuple[str, ...] = ()
    disk_tier: tuple[str, ...] = ()
    bandwidth: NodeBandwidth | None = None  # what its store reports; default: the profile's figures
    overhead_s: float | None = None  # the router's starting guess of Triton's load overhead here
    remote_until_measured_bps: float | None = None
    """What the router assumes for this node's remote tier until its store downloaded something (a fresh
    store reports no remote figure before its first download; the scheduler config's figure stands in)."""


@dataclass(frozen=True)
class SimRequest:
    """One arrival: when, which model, prompt and output lengths (tokens)."""

    idx: int
    at_s: float
    model: str
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class SimSettings:
    """The scheduler settings that shape decisions, as in :class:`~warmstart.scheduler.config.SchedulerConfig`."""

    policy: str = "warmstart"  # warmstart | no_migration | random | serverlessllm | ray | kserve | oracle
    seed: int = 0
    cold_start_queue: int = 256
    cold_start_timeout_s: float = 600.0
    reaper_interval_s: float = 0.5
    recheck_s: float = 1.0  # a queued request is re-placed at least this often (the router's wait)
    migration_threshold_tokens: int = 4
    migration_min_gain_s: float = 1.0
    replay_s_per_token: float = 0.002
    initial_load_overhead_s: float = 1.0
    initial_release_s: float | None = 0.05
    remote_egress_bps: float | None = None  # the remote store's total egress, shared by its transfers
    ray_max_models: int = 3  # Ray Serve multiplexing: models per replica (LRU)
    time_decisions: bool = False  # wall-clock time of every policy call (not deterministic: kept apart)
    learn: bool = True  # learn load costs from simulated loads as the router does


POLICY_NAMES = ("warmstart", "no_migration", "random", "serverlessllm", "ray", "kserve", "oracle")


# ============================================================================================ baselines


def ray_serve_place(snapshot: ClusterSnapshot, model: str, max_models: int) -> Placement:
    """Ray Serve model multiplexing: a replica holding the model (fewest running requests), else the one
    with the fewest models; each replica keeps at most ``max_models`` (least recently used goes)."""
    from warmstart.scheduler.policy import Estimate

    spec = snapshot.model(model)
    idx = snapshot.index
    holding = [
        (len(inst.requests), pos)
        for pos, inst in idx.warm.get(model, ())
        if idx.healthy[pos] and len(inst.requests) < spec.max_concurrency
    ]
    if holding:
        _, pos = min(holding)
        est = Estimate.of(wait_s=0.0, load_s=0.0, overhead_s=0.0, tier=Tier.MEMORY)
        return Placement(Action.ROUTE, model, snapshot.servers[pos].name, est)
    for pos, ready in sorted(idx.in_flight.get(model, ()), key=lambda x: (x[1], x[0])):
        if idx.healthy[pos]:
            est = Estimate.of(
                wait_s=max(0.0, ready - snapshot.now), load_s=0.0, overhead_s=0.0, tier=Tier.MEMORY
            )
            return Placement(Action.JOIN, model, snapshot.servers[pos].name, est)
    if any(idx.healthy[pos] for pos, _ in idx.warm.get(model, ())):
        return Placement(Action.QUEUE, model, None, None)  # every replica holding it is full: wait there
    best: tuple[int, int, tuple[str, ...]] | None = None
    for pos, s in enumerate(snapshot.servers):
        if not s.healthy:
            continue
        count = len(s.instances) + len(s.loading)
        lru = sorted((i for i in s.instances if i.idle), key=lambda i: (i.last_used_s, i.model))
        evict: list[str] = []
        free = s.free_bytes
        for inst in lru:
            if free >= spec.size_bytes and count - len(evict) < max_models:
                break
            evict.append(inst.model)
            free += inst.size_bytes
        if free < spec.size_bytes or count - len(evict) >= max_models:
            continue
        key = (count, pos, tuple(evict))
        if best is None or key[:2] < best[:2]:
            best = key
    if best is None:
        return Placement(Action.QUEUE, model, None, None)
    s = snapshot.servers[best[1]]
    tier = s.store_tiers.get(model, Tier.REMOTE)
    bw = s.bandwidth.of(tier) or math.inf
    est = Estimate.of(wait_s=0.0, load_s=spec.size_bytes / bw, overhead_s=s.triton_load_overhead_s, tier=tier)
    return Placement(Action.LOAD, model, s.name, est, best[2])


def kserve_place(snapshot: ClusterSnapshot, model: str) -> Placement:
    """KServe-style scale from zero: a ready replica with room, else join a starting one, else a new
    replica on the server with the most free memory (Kubernetes' least-allocated scoring), evicting idle
    models least recently used first; the simulator runs every KServe load from the remote store."""
    from warmstart.scheduler.errors import CannotFitError
    from warmstart.scheduler.policy import Estimate, choose_evictions

    spec = snapshot.model(model)
    idx = snapshot.index
    ready = [
        (len(inst.requests), pos)
        for pos, inst in idx.warm.get(model, ())
        if idx.healthy[pos] and len(inst.requests) < spec.max_concurrency
    ]
    if ready:
        _, pos = min(ready)
        est = Estimate.of(wait_s=0.0, load_s=0.0, overhead_s=0.0, tier=Tier.REMOTE)
        return Placement(Action.ROUTE, model, snapshot.servers[pos].name, est)
    for pos, when in sorted(idx.in_flight.get(model, ()), key=lambda x: (x[1], x[0])):
        if idx.healthy[pos]:
            est = Estimate.of(
                wait_s=max(0.0, when - snapshot.now), load_s=0.0, overhead_s=0.0, tier=Tier.REMOTE
            )
            return Placement(Action.JOIN, model, snapshot.servers[pos].name, est)
    warm = {pos for pos, _ in idx.warm.get(model, ())}
    best: tuple[float, int] | None = None
    for pos, s in enumerate(snapshot.servers):
        if not s.healthy or pos in warm or idx.room_bytes[pos] < spec.size_bytes:
            continue
        key = (-float(idx.free_bytes[pos]), pos)
        best = key if best is None or key < best else best
    if best is None:
        return Placement(Action.QUEUE, model, None, None)
    s = snapshot.servers[best[1]]
    try:
        evictions = choose_evictions(s, spec.size_bytes, snapshot.now)
    except CannotFitError:
        return Placement(Action.QUEUE, model, None, None)
    bw = s.bandwidth.remote_bps or math.inf
    est = Estimate.of(
        wait_s=0.0, load_s=spec.size_bytes / bw, overhead_s=s.triton_load_overhead_s, tier=Tier.REMOTE
    )
    return Placement(Action.LOAD, model, s.name, est, evictions)


PlaceFn = Callable[[ClusterSnapshot, str], Placement]


def placement_for(settings: SimSettings) -> PlaceFn:
    """The placement function of ``settings.policy``: for the project's policies the one the router's
    :func:`~warmstart.scheduler.router.placement_rule` returns for the same configuration."""
    from warmstart.scheduler.config import SchedulerConfig
    from warmstart.scheduler.router import placement_rule

    if settings.policy in ("warmstart", "no_migration", "random", "serverlessllm"):
        name = "warmstart" if settings.policy == "no_migration" else settings.policy
        return placement_rule(SchedulerConfig(policy=name, policy_seed=settings.seed))
    if settings.policy == "ray":
        limit = settings.ray_max_models
        return lambda snapshot, model: ray_serve_place(snapshot, model, limit)
    if settings.policy == "kserve":
        return kserve_place
    raise SimulationInputError(f"policy must be one of {', '.join(POLICY_NAMES)}, got {settings.policy!r}")


# ======================================================================================== runtime state


@dataclass(eq=False)
class _Gen:
    req: SimRequest
    size_bytes: int
    prefill_s: float
    token_s: float
    work_s: float  # solo seconds: prefill + every token
    server: str | None = None
    done_s: float = 0.0  # solo seconds of work done
    first_token_s: float | None = None
    end_s: float | None = None
    rejected: str | None = None
    queued: bool = False
    migrating: bool = False
    started_s: float = 0.0  # when it got its slot
    migrations: int = 0

    @property
    def first_at(self) -> float:
        return self.prefill_s + self.token_s

    def generated(self) -> int:
        if self.done_s < self.prefill_s:
            return 0
        return min(self.req.max_tokens, int((self.done_s - self.prefill_s) / self.token_s + 1e-9))


@dataclass(eq=False)
class _Inst:
    model: str
    size_bytes: int
    last_used_s: float
    gens: dict[int, _Gen] = field(default_factory=dict)


@dataclass(eq=False)
class _Load:
    model: str
    size_bytes: int
    expected_finish_s: float
    tier: Tier = Tier.REMOTE
    started_s: float | None = None  # transfer start (after evictions)
    left_s: float = 0.0  # solo seconds of transfer + overhead left
    waiting_release: int = 0


@dataclass(eq=False)
class _Server:
    cfg: SimServer
    costs: LoadCosts
    reported: NodeBandwidth
    instances: dict[str, _Inst] = field(default_factory=dict)
    loads: dict[str, _Load] = field(default_factory=dict)
    unloading: dict[str, int] = field(default_factory=dict)
    mem_tier: OrderedDict[str, int] = field(default_factory=OrderedDict)
    disk_tier: OrderedDict[str, int] = field(default_factory=OrderedDict)
    state: ServerState | None = None
    state_at: float = -1.0
    progress: tuple[tuple[int, int, float], ...] = ()  # (request, tokens, s/token) at the last rendering
    version: int = 0  # bumped on every change of its load fluid
    measured_remote: float | None = None  # reported once the store's first download measured it

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def profile(self) -> ServerProfile:
        return self.cfg.profile


# ================================================================================================ result


@dataclass
class SimResult:
    """What a replay produced: one record per arrival, the loads, counters and (optionally) decision times."""

    policy: str
    requests: list[dict[str, Any]]
    loads: list[dict[str, Any]]
    counters: dict[str, int]
    end_s: float
    decision_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """TTFT and end-to-end percentiles, loads per tier, evictions, migrations, rejections."""
        ttft = sorted(r["ttft_s"] for r in self.requests if r["ttft_s"] is not None)
        e2e = sorted(r["e2e_s"] for r in self.requests if r["e2e_s"] is not None)
        tiers: dict[str, int] = {"memory": 0, "disk": 0, "remote": 0}
        for ld in self.loads:
            tiers[ld["tier"]] = tiers.get(ld["tier"], 0) + 1
        return {
            "policy": self.policy,
            "requests": len(self.requests),
            "served": len(ttft),
            "ttft": stats(ttft),
            "e2e": stats(e2e),
            "loads_per_tier": tiers,
            **self.counters,
        }

    def to_json(self) -> dict[str, Any]:
        """Everything deterministic (decision wall-clock times are left out)."""
        return {
            "summary": self.summary(),
            "requests": self.requests,
            "loads": self.loads,
            "end_s": self.end_s,
        }


def percentile(sorted_xs: Sequence[float], p: float) -> float | None:
    """Linear-interpolated percentile ``p`` (0-100) of sorted values (numpy's default), None if empty."""
    if not sorted_xs:
        return None
    k = (len(sorted_xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def stats(sorted_xs: Sequence[float]) -> dict[str, Any]:
    """n, mean, p50, p90, p99, max of sorted values."""
    if not sorted_xs:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "n": len(sorted_xs),
        "mean": sum(sorted_xs) / len(sorted_xs),
        "p50": percentile(sorted_xs, 50),
        "p90": percentile(sorted_xs, 90),
        "p99": percentile(sorted_xs, 99),
        "max": sorted_xs[-1],
    }


# ============================================================================================ simulator


class Simulator:
    """One replay of ``requests`` on ``servers`` with ``models`` under ``settings`` (run once: :meth:`run`)."""

    def __init__(
        self,
        servers: Iterable[SimServer],
        models: Iterable[ModelSpec],
        requests: Iterable[SimRequest],
        settings: SimSettings,
    ) -> None:
        self.settings = settings
        self.models = {m.name: m for m in models}
        self.requests = sorted(requests, key=lambda r: (r.at_s, r.idx))
        self._check_inputs(list(servers))
        self.servers: dict[str, _Server] = {}
        self.local_tiers = settings.policy != "kserve"
        for cfg in sorted(self._servers_in, key=lambda s: s.name):
            reported = cfg.bandwidth or cfg.profile.bandwidth()
            overhead = settings.initial_load_overhead_s if cfg.overhead_s is None else cfg.overhead_s
            srv = _Server(cfg, LoadCosts(overhead, release_s=settings.initial_release_s), reported)
            if cfg.remote_until_measured_bps is not None:
                srv.measured_remote = reported.remote_bps
                srv.reported = NodeBandwidth(
                    reported.memory_bps, reported.disk_bps, cfg.remote_until_measured_bps
                )
            if self.local_tiers:
                for m in cfg.memory_tier:
                    srv.mem_tier[m] = self.models[m].size_bytes
                for m in cfg.disk_tier:
                    srv.disk_tier[m] = self.models[m].size_bytes
            self.servers[cfg.name] = srv
        self._profile0 = self.servers[min(self.servers)].profile
        self.place: PlaceFn | None = None if settings.policy == "oracle" else placement_for(settings)
        self.migration = settings.policy == "warmstart"
        self.now = 0.0
        self._events: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._gens: dict[int, _Gen] = {}
        self._waiting: list[_Gen] = []  # in the cold-start queue, in arrival order
        self._waiting_count = 0
        self._demand: dict[str, tuple[float, float]] = {}
        self._token_s: dict[str, float] = {}
        self._migrating_for: set[str] = set()
        self._loads_log: list[dict[str, Any]] = []
        self._remote_active = 0
        self._machine_version = 0
        self._compute_version: dict[str, int] = {}
        self._reap_at: set[float] = set()
        self._domain_since: dict[str, float] = {}
        self._version = 0  # bumped on every change a snapshot shows
        self._snapshot: ClusterSnapshot | None = None
        self._snapshot_key: tuple[float, int] = (-1.0, -1)
        self._states: list[ServerState] | None = None  # by server name, as snapshots order them
        self._order: list[str] = []
        self._state_pos: dict[str, int] = {}
        self._touched: set[str] = set()  # servers changed since the last snapshot
        self._arrivals = 0
        self._demand_key: tuple[float, int] = (-1.0, -1)
        self._demand_now: dict[str, float] = {}
        self._memo_key: tuple[float, int] = (-1.0, -1)
        self._memo_table: dict[tuple[str, str], Any] = {}
        self._pure = settings.policy != "random"  # random draws from its generator on every call
        self._busy: set[str] = set()  # servers running generations (their state moves with time)
        self._load_since: dict[str, float] = {}
        self._load_version: dict[str, int] = {}
        self._load_waiters: dict[tuple[str, str], list[tuple[_Gen, dict[str, Any]]]] = {}
        self.counters = {
            "evictions": 0,
            "releases": 0,
            "unloads": 0,
            "migrations": 0,
            "rejected_queue_full": 0,
            "rejected_timeout": 0,
            "decisions": 0,
        }
        self.decision_s: list[float] = []
        self.max_used_fraction = 0.0
        self.time_went_back = 0
        self._last_event_s = 0.0

    def _check_inputs(self, servers: list[SimServer]) -> None:
        if not servers:
            raise SimulationInputError("the cluster has no servers")
        names = [s.name for s in servers]
        if len(set(names)) != len(names):
            raise SimulationInputError("server names must be unique")
        for s in servers:
            for m in (*s.memory_tier, *s.disk_tier):
                if m not in self.models:
                    raise SimulationInputError(f"server {s.name!r} holds unknown model {m!r}")
        for r in self.requests:
            if r.model not in self.models:
                raise SimulationInputError(f"request {r.idx} asks for unknown model {r.model!r}")
            if not (math.isfinite(r.at_s) and r.at_s >= 0):
                raise SimulationInputError(
                    f"request {r.idx}: arrival must be a finite time >= 0, got {r.at_s!r}"
                )
            if r.prompt_tokens < 0 or r.max_tokens < 1:
                raise SimulationInputError(f"request {r.idx}: prompt_tokens >= 0 and max_tokens >= 1 needed")
        if self.settings.policy not in POLICY_NAMES:
            raise SimulationInputError(
                f"policy must be one of {', '.join(POLICY_NAMES)}, got {self.settings.policy!r}"
            )
        self._servers_in = servers

    # -- events --------------------------------------------------------------------------------------------
    def _at(self, t: float, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, payload))

    def run(self) -> SimResult:
        """Replay every request; returns the result."""
        for r in self.requests:
            self._at(r.at_s, "arrive", r)
        handlers: dict[str, Callable[[Any], None]] = {
            "arrive": self._on_arrive,
            "recheck": self._on_recheck,
            "compute": self._on_compute,
            "released": self._on_released,
            "unloaded": self._on_unloaded,
            "load_tick": self._on_load_tick,
            "reap": self._on_reap,
            "migrated": self._on_migrated,
        }
        while self._events:
            t, _, kind, payload = heapq.heappop(self._events)
            if t < self.now:
                self.time_went_back += 1  # a bug if ever non-zero: the conservation test checks it
                t = self.now
            self.now = t
            handlers[kind](payload)
        records = []
        for r in self.requests:
            g = self._gens[r.idx]
            records.append(
                {
                    "idx": r.idx,
                    "model": r.model,
                    "at_s": r.at_s,
                    "server": g.server,
                    "ttft_s": None if g.first_token_s is None else g.first_token_s - r.at_s,
                    "e2e_s": None if g.end_s is None else g.end_s - r.at_s,
                    "tokens": r.max_tokens if g.end_s is not None else 0,
                    "migrations": g.migrations,
                    "rejected": g.rejected,
                }
            )
        return SimResult(
            self.settings.policy, records, self._loads_log, dict(self.counters), self.now, self.decision_s
        )

    # -- snapshots -------------------------------------------------------------------------------------------
    def _server_state(self, srv: _Server) -> ServerState:
        if srv.state is not None and (
            srv.state_at == self.now or not any(i.gens for i in srv.instances.values())
        ):
            return srv.state
        self._advance_compute_all(srv)
        progress = tuple(
            (g.req.idx, g.generated(), self._token_s.get(g.req.model, DEFAULT_TOKEN_S))
            for i in srv.instances.values()
            for g in i.gens.values()
        )
        if srv.state is not None and progress == srv.progress:
            srv.state_at = self.now  # no token since the last rendering: the same state, the same object
            return srv.state
        srv.progress = progress
        instances = tuple(
            Instance(
                model=i.model,
                size_bytes=i.size_bytes,
                last_used_s=i.last_used_s,
                requests=tuple(
                    RunningRequest(
                        request_id=str(g.req.idx),
                        prompt_tokens=g.req.prompt_tokens,
                        generated_tokens=g.generated(),
                        expected_remaining_s=max(0, g.req.max_tokens - g.generated())
                        * self._token_s.get(g.req.model, DEFAULT_TOKEN_S),
                    )
                    for g in i.gens.values()
                ),
            )
            for i in srv.instances.values()
        )
        tiers: dict[str, Tier] = {}
        for m in srv.disk_tier:
            tiers[m] = Tier.DISK
        for m in srv.mem_tier:
            tiers[m] = Tier.MEMORY
        srv.state = ServerState(
            name=srv.name,
            healthy=True,
            memory_budget_bytes=max(0, srv.profile.memory_budget_bytes - sum(srv.unloading.values())),
            bandwidth=effective_bandwidth(srv.reported, srv.costs),
            triton_load_overhead_s=srv.costs.overhead_s,
            instances=instances,
            loading=tuple(
                LoadInFlight(ld.model, ld.size_bytes, ld.expected_finish_s) for ld in srv.loads.values()
            ),
            store_tiers=tiers,
            eviction_s=eviction_s(srv.costs),
        )
        srv.state_at = self.now
        return srv.state

    def _dirty(self, srv: _Server) -> None:
        """``srv`` changed: its state is rendered again; track the most memory it ever held (loaded models,
        loads whose transfer started, and evicted models not yet released)."""
        srv.state = None
        self._touched.add(srv.name)
        self._version += 1
        used = sum(i.size_bytes for i in srv.instances.values()) + sum(srv.unloading.values())
        used += sum(ld.size_bytes for ld in srv.loads.values() if ld.started_s is not None)
        budget = srv.profile.memory_budget_bytes
        if budget > 0:
            self.max_used_fraction = max(self.max_used_fraction, used / budget)

    def snapshot(self) -> ClusterSnapshot:
        """The cluster as the router would render it now (the same frozen types the policy reads)."""
        key = (self.now, self._version)
        if self._snapshot is not None and self._snapshot_key == key:
            return self._snapshot  # nothing changed since: the same snapshot (and its index) again
        if self._demand_key != (self.now, self._arrivals):  # the same until time moves or a request comes
            self._demand_key = (self.now, self._arrivals)
            self._demand_now = decayed_rates(self._demand, self.now)
        demand = self._demand_now
        if self._states is None:
            self._order = sorted(self.servers)
            self._states = [self._server_state(self.servers[n]) for n in self._order]
            self._state_pos = {n: p for p, n in enumerate(self._order)}
        else:
            # only servers that changed, or whose running generations advanced, are rendered again
            for name in self._touched:
                srv = self.servers[name]
                if any(i.gens for i in srv.instances.values()):
                    self._busy.add(name)
                else:
                    self._busy.discard(name)
            for name in self._touched | self._busy:
                self._states[self._state_pos[name]] = self._server_state(self.servers[name])
        self._touched.clear()
        snap = ClusterSnapshot.of(
            self._states,
            self.models.values(),
            self.now,
            demand,
            previous=self._snapshot,
        )
        self._snapshot, self._snapshot_key = snap, key
        return snap

    def _memo(self) -> dict[tuple[str, str], Any]:
        """Answers of pure policy calls on the current snapshot, by (call, model): every waiter woken by one
        change asks the same question of the same snapshot, and a pure function answers it the same way."""
        if self._memo_key != self._snapshot_key:
            self._memo_key, self._memo_table = self._snapshot_key, {}
        return self._memo_table

    def _decide(self, model: str) -> Placement:
        assert self.place is not None
        snap = self.snapshot()
        self.counters["decisions"] += 1
        memo = self._memo() if self._pure else None
        if memo is not None and ("place", model) in memo:
            placement: Placement = memo["place", model]
            return placement
        if self.settings.time_decisions:
            t0 = time.perf_counter()
            placement = self.place(snap, model)
            self.decision_s.append(time.perf_counter() - t0)
        else:
            placement = self.place(snap, model)
        if memo is not None:
            memo["place", model] = placement
        return placement

    # -- arrivals and the cold-start queue -------------------------------------------------------------------
    def _on_arrive(self, req: SimRequest) -> None:
        spec = self.models[req.model]
        srv0 = next(iter(self.servers.values())).profile
        prefill = srv0.prefill_s(spec.size_bytes, req.prompt_tokens)
        token = srv0.token_s(spec.size_bytes)
        gen = _Gen(req, spec.size_bytes, prefill, token, prefill + req.max_tokens * token)
        self._gens[req.idx] = gen
        rate, t = self._demand.get(req.model, (0.0, self.now))
        self._demand[req.model] = (record_arrival(rate, self.now - t), self.now)
        self._arrivals += 1
        self._version += 1
        if self.place is None:  # oracle: always warm, never shares
            gen.server = "oracle"
            gen.first_token_s = self.now + gen.first_at
            gen.end_s = self.now + gen.work_s
            return
        self._acquire(gen)

    def _acquire(self, gen: _Gen) -> bool:
        """The router's ``_acquire`` loop for one pass: True when ``gen`` got a slot or was refused."""
        model = gen.req.model
        for _ in range(4):  # LOAD registers the load, then the next pass joins it
            placement = self._decide(model)
            if placement.action is Action.ROUTE and placement.server is not None:
                self._leave_queue(gen)
                self._start_gen(gen, self.servers[placement.server])
                return True
            if placement.action in (Action.LOAD, Action.WAIT, Action.QUEUE) and self._try_migration(model):
                placement = Placement(Action.QUEUE, model, None, None)
            if not gen.queued:
                if self._waiting_count >= self.settings.cold_start_queue:
                    gen.rejected = "queue_full"
                    self.counters["rejected_queue_full"] += 1
                    return True
                gen.queued = True
                self._waiting_count += 1
                self._waiting.append(gen)
                self._at(self.now + self.settings.cold_start_timeout_s, "recheck", (gen, "deadline"))
            if placement.action is Action.LOAD and placement.server is not None:
                self._start_load(self.servers[placement.server], model, placement.evictions)
                continue
            break
        if self.now - gen.req.at_s >= self.settings.cold_start_timeout_s:
            self._leave_queue(gen)
            gen.rejected = "timeout"
            self.counters["rejected_timeout"] += 1
            return True
        if placement.action is not Action.JOIN:
            # A JOIN stays a JOIN until that load ends (every rule joins a load in flight before anything
            # else, and only its end or another change, which wakes every waiter, can alter that).
            self._at(self.now + self.settings.recheck_s, "recheck", (gen, "tick"))
        return False

    def _leave_queue(self, gen: _Gen) -> None:
        if gen.queued:
            gen.queued = False
            self._waiting_count -= 1
            self._waiting.remove(gen)

    def _on_recheck(self, payload: tuple[_Gen, str]) -> None:
        gen, _ = payload
        if gen.queued and gen.server is None and gen.rejected is None:
            self._acquire(gen)

    def _notify(self) -> None:
        """Something changed: every queued request is placed again (in arrival order)."""
        for gen in list(self._waiting):
            if gen.queued:
                self._acquire(gen)

    # -- generations -------------------------------------------------------------------------------------------
    def _domain(self, srv: _Server, model: str) -> list[_Gen]:
        if srv.profile.compute_scope == "machine":
            return [g for s in self.servers.values() for i in s.instances.values() for g in i.gens.values()]
        inst = srv.instances.get(model)
        return list(inst.gens.values()) if inst is not None else []

    def _domain_key(self, srv: _Server, model: str) -> str:
        return "*" if srv.profile.compute_scope == "machine" else f"{srv.name}/{model}"

    def _advance(self, gens: list[_Gen], since: float) -> None:
        if not gens or self.now <= since:
            return
        for g, slow in zip(gens, self._slowdowns(gens), strict=True):
            g.done_s = min(g.work_s, g.done_s + (self.now - since) / slow)

    def _slowdowns(self, gens: list[_Gen]) -> list[float]:
        """How much slower than alone each generation runs: the others batched on its instance, and (compute
        scope ``machine``) every other busy instance and running load on the machine."""
        per: dict[tuple[str | None, str], int] = {}
        for g in gens:
            key = (g.server, g.req.model)
            per[key] = per.get(key, 0) + 1
        profile = self._profile0
        others = 0.0
        if profile.compute_scope == "machine" and profile.machine_share > 0:
            loads = sum(
                1 for s in self.servers.values() for ld in s.loads.values() if ld.started_s is not None
            )
            others = profile.machine_share * (len(per) - 1 + loads)
        return [profile.slowdown(per[(g.server, g.req.model)]) + others for g in gens]

    def _advance_compute_all(self, srv: _Server) -> None:
        for inst in srv.instances.values():
            self._sync_domain(srv, inst.model, reschedule=False)

    def _sync_domain(self, srv: _Server, model: str, reschedule: bool = True) -> None:
        """Bring every generation of one compute domain up to ``now``; reschedule its next milestone."""
        key = self._domain_key(srv, model)
        gens = self._domain(srv, model)
        self._advance(gens, self._domain_since.get(key, self.now))
        self._domain_since[key] = self.now
        if reschedule:
            version = self._compute_version.get(key, 0) + 1
            self._compute_version[key] = version
            if gens:
                nxt = math.inf
                for g, slow in zip(gens, self._slowdowns(gens), strict=True):
                    target = g.first_at if g.first_token_s is None else g.work_s
                    nxt = min(nxt, (target - g.done_s) * slow)
                self._at(self.now + max(0.0, nxt), "compute", (srv.name, model, key, version))

    def _sync_machine(self, reschedule: bool = True) -> None:
        """Compute scope ``machine`` with a share: loads starting or ending change every generation's speed."""
        if self._profile0.compute_scope == "machine" and self._profile0.machine_share > 0:
            self._sync_domain(self.servers[min(self.servers)], "", reschedule)

    def _on_compute(self, payload: tuple[str, str, str, int]) -> None:
        name, model, key, version = payload
        if self._compute_version.get(key) != version:
            return
        srv = self.servers[name]
        self._sync_domain(srv, model, reschedule=False)
        finished: list[tuple[_Server, _Gen]] = []
        servers = self.servers.values() if key == "*" else [srv]
        for s in servers:
            for inst in list(s.instances.values()):
                if key != "*" and inst.model != model:
                    continue
                for g in list(inst.gens.values()):
                    if g.first_token_s is None and g.done_s >= g.first_at - 1e-9:
                        g.first_token_s = self.now
                        inst.last_used_s = self.now
                        self._dirty(s)
                    if g.done_s >= g.work_s - 1e-9:
                        finished.append((s, g))
        for s, g in finished:
            self._finish_gen(s, g)
        self._sync_domain(srv, model)
        if finished:
            self._notify()

    def _start_gen(self, gen: _Gen, srv: _Server) -> None:
        self._sync_domain(srv, gen.req.model, reschedule=False)
        inst = srv.instances[gen.req.model]
        p = srv.profile
        gen.prefill_s = p.prefill_s(gen.size_bytes, gen.req.prompt_tokens)
        gen.token_s = p.token_s(gen.size_bytes)
        gen.work_s = gen.prefill_s + gen.req.max_tokens * gen.token_s
        inst.gens[gen.req.idx] = gen
        inst.last_used_s = self.now
        gen.server = srv.name
        gen.started_s = self.now
        self._dirty(srv)
        self._sync_domain(srv, gen.req.model)

    def _finish_gen(self, srv: _Server, gen: _Gen) -> None:
        inst = srv.instances[gen.req.model]
        del inst.gens[gen.req.idx]
        inst.last_used_s = self.now
        gen.end_s = self.now
        per = (gen.end_s - (gen.first_token_s or gen.end_s)) / max(1, gen.req.max_tokens - 1)
        n = max(1, gen.req.max_tokens - 1)
        prev = self._token_s.get(gen.req.model, per)
        self._token_s[gen.req.model] = prev * 0.9**n + per * (1 - 0.9**n)
        self._dirty(srv)
        if not inst.gens:
            self._schedule_reap(self.now + self.models[inst.model].keep_alive_s)

    # -- loads, evictions, unloads -----------------------------------------------------------------------------
    def _start_load(self, srv: _Server, model: str, evictions: tuple[str, ...]) -> None:
        """The router's ``_start_load``: register the load (later requests join it), evict, then load."""
        spec = self.models[model]
        evicted = []
        for m in evictions:
            inst = srv.instances.pop(m, None)
            if inst is not None:
                srv.unloading[m] = inst.size_bytes
                evicted.append(m)
                self.counters["evictions"] += 1
        effective = effective_bandwidth(srv.reported, srv.costs)
        tier = self._tier(srv, model)
        bw = effective.of(tier)
        expected = (
            (eviction_s(srv.costs) if evicted else 0.0)
            + (spec.size_bytes / bw if bw else 0.0)
            + srv.costs.overhead_s
        )
        load = _Load(model, spec.size_bytes, self.now + expected)
        srv.loads[model] = load
        self._dirty(srv)
        load.waiting_release = len(evicted)
        for m in evicted:
            self._evict(srv, m, load)
        if not evicted:
            self._begin_transfer(srv, load)

    def _tier(self, srv: _Server, model: str) -> Tier:
        if model in srv.mem_tier:
            return Tier.MEMORY
        if model in srv.disk_tier:
            return Tier.DISK
        return Tier.REMOTE

    def _evict(self, srv: _Server, model: str, load: _Load | None) -> None:
        release = srv.profile.release_s
        self._at(self.now + release, "released", (srv.name, model, load, release))

    def _on_released(self, payload: tuple[str, str, _Load | None, float]) -> None:
        name, model, load, elapsed = payload
        srv = self.servers[name]
        if self.settings.learn:
            srv.costs = learn_release(srv.costs, elapsed)
        self.counters["releases"] += 1
        if model in srv.unloading:
            srv.unloading[model] = 0
        self._dirty(srv)
        self._at(self.now + srv.profile.unload_s, "unloaded", (name, model, srv.profile.unload_s))
        if load is not None:
            load.waiting_release -= 1
            if load.waiting_release == 0:
                self._begin_transfer(srv, load)
        self._notify()

    def _on_unloaded(self, payload: tuple[str, str, float]) -> None:
        name, model, elapsed = payload
        srv = self.servers[name]
        if self.settings.learn:
            srv.costs = learn_unload(srv.costs, elapsed)
        self.counters["unloads"] += 1
        srv.unloading.pop(model, None)
        self._dirty(srv)
        pending = srv.loads.get(model)
        if pending is not None and pending.started_s is None and pending.waiting_release == 0:
            self._begin_transfer(srv, pending)
        self._notify()

    def _load_domain(self, srv: _Server) -> list[tuple[_Server, _Load]]:
        servers = self.servers.values() if srv.profile.load_scope == "machine" else [srv]
        return [
            (s, ld) for s in servers for ld in s.loads.values() if ld.started_s is not None and ld.left_s > 0
        ]

    def _begin_transfer(self, srv: _Server, load: _Load) -> None:
        if load.model in srv.unloading:
            return  # an unload of this very model is still running here: the load waits for it (router)
        self._sync_loads(srv, reschedule=False)
        self._sync_machine(reschedule=False)
        load.tier = self._tier(srv, load.model)
        p = srv.profile
        if load.tier is Tier.MEMORY:
            move = load.size_bytes / p.memory_bps
        elif load.tier is Tier.DISK:
            move = load.size_bytes / p.disk_bps
        else:
            bw = p.remote_bps or 0.0
            egress = self.settings.remote_egress_bps
            if egress is not None:
                bw = min(bw, egress / (self._remote_active + 1))
            if bw <= 0:
                raise SimulationInputError(f"server {srv.name!r} must fetch {load.model!r} but has no remote")
            move = load.size_bytes / bw
            self._remote_active += 1
        load.started_s = self.now
        load.left_s = move + p.triton_load_overhead_s
        self._dirty(srv)
        self._sync_loads(srv)
        self._sync_machine()

    def _load_key(self, srv: _Server) -> str:
        return "*" if srv.profile.load_scope == "machine" else srv.name

    def _sync_loads(self, srv: _Server, reschedule: bool = True) -> None:
        key = self._load_key(srv)
        active = self._load_domain(srv)
        since = self._load_since.get(key, self.now)
        if active and self.now > since:
            step = (self.now - since) / len(active)
            for _, ld in active:
                ld.left_s = max(0.0, ld.left_s - step)
        self._load_since[key] = self.now
        if reschedule:
            version = self._load_version.get(key, 0) + 1
            self._load_version[key] = version
            active = self._load_domain(srv)
            if active:
                nxt = min(ld.left_s for _, ld in active) * len(active)
                self._at(self.now + nxt, "load_tick", (srv.name, key, version))

    def _on_load_tick(self, payload: tuple[str, str, int]) -> None:
        name, key, version = payload
        if self._load_version.get(key) != version:
            return
        srv = self.servers[name]
        self._sync_loads(srv, reschedule=False)
        servers = self.servers.values() if key == "*" else [srv]
        done = [
            (s, ld)
            for s in servers
            for ld in s.loads.values()
            if ld.started_s is not None and ld.left_s <= 1e-9
        ]
        self._sync_machine(reschedule=False)
        for s, ld in done:
            self._finish_load(s, ld)
        self._sync_loads(srv)
        self._sync_machine()
        self._notify()

    def _finish_load(self, srv: _Server, load: _Load) -> None:
        assert load.started_s is not None
        del srv.loads[load.model]
        if load.tier is Tier.REMOTE:
            self._remote_active -= 1
        elapsed = self.now - load.started_s
        if load.tier is Tier.REMOTE and srv.measured_remote is not None:
            r = srv.reported
            srv.reported = NodeBandwidth(r.memory_bps, r.disk_bps, srv.measured_remote)
            srv.measured_remote = None
        if self.settings.learn:
            srv.costs = learn_load(srv.costs, srv.reported, load.tier, load.size_bytes, elapsed)
        srv.instances[load.model] = _Inst(load.model, load.size_bytes, self.now)
        self._loads_log.append(
            {
                "model": load.model,
                "server": srv.name,
                "tier": load.tier.value,
                "at_s": load.started_s,
                "s": elapsed,
            }
        )
        if self.local_tiers:
            if load.tier is Tier.REMOTE:
                self._put_tier(srv, srv.disk_tier, srv.profile.disk_bytes, load.model, load.size_bytes)
                self._put_tier(srv, srv.mem_tier, srv.profile.host_memory_bytes, load.model, load.size_bytes)
            elif load.tier is Tier.DISK and PROMOTE_ON_DISK_LOAD:
                self._put_tier(srv, srv.mem_tier, srv.profile.host_memory_bytes, load.model, load.size_bytes)
            else:
                tier = srv.mem_tier if load.tier is Tier.MEMORY else srv.disk_tier
                tier.move_to_end(load.model)
        self._dirty(srv)
        self._schedule_reap(self.now + self.models[load.model].keep_alive_s)
        for gen, state in self._load_waiters.pop((srv.name, load.model), []):
            self._replay(gen, srv, state)

    def _put_tier(
        self, srv: _Server, tier: OrderedDict[str, int], capacity: int, model: str, size: int
    ) -> None:
        """Add ``model`` to a node store tier, least recently used entries not loaded anywhere here going
        first; when nothing more can go, it is not added."""
        if model in tier:
            tier.move_to_end(model)
            return
        used = sum(tier.values())
        if used + size > capacity:
            for victim in list(tier):
                if used + size <= capacity:
                    break
                if victim in srv.instances or victim in srv.loads:
                    continue
                used -= tier.pop(victim)
        if used + size <= capacity:
            tier[model] = size

    # -- keep-alive -------------------------------------------------------------------------------------------
    def _schedule_reap(self, at: float) -> None:
        step = self.settings.reaper_interval_s
        when = math.ceil(at / step - 1e-9) * step if step > 0 else at
        if when not in self._reap_at:
            self._reap_at.add(when)
            self._at(when, "reap", when)

    def _on_reap(self, when: float) -> None:
        self._reap_at.discard(when)
        for server, model in expired_models(self.snapshot()):
            srv = self.servers[server]
            if model not in srv.instances or model in srv.unloading:
                continue
            inst = srv.instances.pop(model)
            srv.unloading[model] = inst.size_bytes
            self._dirty(srv)
            self._evict(srv, model, None)

    # -- live migration ---------------------------------------------------------------------------------------
    def _try_migration(self, model: str) -> bool:
        if model in self._migrating_for:
            return True
        if not self.migration:
            return False
        snap = self.snapshot()
        memo = self._memo()
        if ("no_migration", model) in memo:
            return False
        plan = plan_migration(
            snap,
            model,
            replay_s_per_token=self.settings.replay_s_per_token,
            threshold_tokens=self.settings.migration_threshold_tokens,
            min_gain_s=self.settings.migration_min_gain_s,
        )
        if plan is None:
            memo["no_migration", model] = True
            return False
        self._migrating_for.add(model)
        self._execute_plan(plan)
        return True

    def _execute_plan(self, plan: MigrationPlan) -> None:
        jobs: list[tuple[_Gen, str]] = []
        for move in plan.moves:
            for rid in move.request_ids:
                gen = self._gens.get(int(rid))
                if gen is not None and gen.end_s is None and gen.server == move.source:
                    jobs.append((gen, move.destination))
        state = {"left": len(jobs), "model": plan.model}
        if not jobs:
            self._migrating_for.discard(plan.model)
            return
        for gen, dest in jobs:
            self._migrate(gen, self.servers[dest], state)

    def _migrate(self, gen: _Gen, dest: _Server, state: dict[str, Any]) -> None:
        """The router's ``migrate_generation``: load the model on the destination if needed and wait for it
        (``_ensure_loaded``), then replay and switch."""
        model = gen.req.model
        if model not in dest.instances and model not in dest.loads:
            from warmstart.scheduler.policy import choose_evictions

            evictions = choose_evictions(self._server_state(dest), self.models[model].size_bytes, self.now)
            self._start_load(dest, model, evictions)
        gen.migrating = True
        if model in dest.loads:
            self._load_waiters.setdefault((dest.name, model), []).append((gen, state))
        else:
            self._replay(gen, dest, state)

    def _replay(self, gen: _Gen, dest: _Server, state: dict[str, Any]) -> None:
        """Round 1 prefills the context on the destination while the source goes on; the final round the
        tokens the source generated meanwhile (one prefill call each, at the destination's prefill rate)."""
        model = gen.req.model
        if model not in dest.instances or gen.end_s is not None or gen.server is None:
            self._migration_done(gen, state)
            return
        src = self.servers[gen.server]
        self._sync_domain(src, model, reschedule=False)
        p = dest.profile
        round1 = p.prefill_s(gen.size_bytes, gen.req.prompt_tokens + gen.generated())
        meanwhile = math.ceil(
            round1 * 1.0 / (gen.token_s * src.profile.slowdown(len(self._domain(src, model))))
        )
        replay = round1 + p.prefill_s(gen.size_bytes, meanwhile)
        self._at(self.now + replay, "migrated", (gen, dest.name, state))

    def _on_migrated(self, payload: tuple[_Gen, str, dict[str, Any]]) -> None:
        gen, dest_name, state = payload
        dest = self.servers[dest_name]
        model = gen.req.model
        if (
            gen.end_s is None
            and gen.server is not None
            and model in dest.instances
            and gen.server != dest_name
        ):
            src = self.servers[gen.server]
            self._sync_domain(src, model, reschedule=False)
            self._sync_domain(dest, model, reschedule=False)
            inst = src.instances[model]
            del inst.gens[gen.req.idx]
            inst.last_used_s = self.now
            self._dirty(src)
            dest.instances[model].gens[gen.req.idx] = gen
            dest.instances[model].last_used_s = self.now
            gen.server = dest_name
            gen.migrations += 1
            self.counters["migrations"] += 1
            self._dirty(dest)
            self._sync_domain(src, model)
            self._sync_domain(dest, model)
            if not inst.gens:
                self._schedule_reap(self.now + self.models[model].keep_alive_s)
        self._migration_done(gen, state)

    def _migration_done(self, gen: _Gen, state: dict[str, Any]) -> None:
        gen.migrating = False
        state["left"] -= 1
        if state["left"] == 0:
            self._migrating_for.discard(state["model"])
            self._notify()


def simulate(
    servers: Iterable[SimServer],
    models: Iterable[ModelSpec],
    requests: Iterable[SimRequest],
    settings: SimSettings,
) -> SimResult:
    """Replay ``requests`` on a fresh cluster (see :class:`Simulator`)."""
    return Simulator(servers, models, requests, settings).run()


def model_spec(
    name: str, size_bytes: int, keep_alive_s: float = 120.0, max_concurrency: int = 8
) -> ModelSpec:
    """A :class:`ModelSpec` for the simulator (checkpoint URI and engine are not used)."""
    return ModelSpec(name, f"sim://{name}", int(size_bytes), "sim", keep_alive_s, max_concurrency)


def layout_servers(
    profile: ServerProfile,
    n: int,
    models: Sequence[ModelSpec],
    *,
    prefix: str = "s",
    layout: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
) -> list[SimServer]:
    """``n`` identical servers named ``{prefix}0000..``; ``layout[name]`` gives each store's initial
    memory and disk tiers (default: each model on the disk tier of two servers, round robin)."""
    width = max(4, len(str(n - 1)))
    names = [f"{prefix}{i:0{width}d}" for i in range(n)]
    out = []
    if layout is None:
        disk: dict[str, list[str]] = {name: [] for name in names}
        used = dict.fromkeys(names, 0)
        for j, m in enumerate(models):
            for k in range(2 if n > 1 else 1):
                name = names[(2 * j + k) % n]
                if used[name] + m.size_bytes <= profile.disk_bytes:
                    disk[name].append(m.name)
                    used[name] += m.size_bytes
        layout = {name: {"memory": [], "disk": disk[name]} for name in names}
    for name in names:
        tiers = layout.get(name, {})
        out.append(SimServer(name, profile, tuple(tiers.get("memory", ())), tuple(tiers.get("disk", ()))))
    return out


def seeded(seed: int) -> random.Random:
    """The one source of randomness a replay's inputs should use."""
    return random.Random(seed)
