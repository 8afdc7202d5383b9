"""The router: a thin asyncio loop around the pure policy.

For each generation it snapshots cluster state, asks :func:`~warmstart.scheduler.policy.place` what to do,
and applies the answer: route to a warm instance, join a load in flight (never a second load of the same
model), start a load (after evicting: each victim releases its engine, and its Triton unload goes on in the
background; where a release fails, the load waits for the unload as the index reports it), or wait in the
bounded cold-start queue. Tokens stream back through one queue per generation, so the
upstream under a generation can change (failure recovery, live migration) without the client noticing:
the router resumes on another server with the prompt plus every token the client already has.

Background loops: health checks (dead servers leave routing, recovered ones come back with their index
re-read), node-store polls (inventory tiers and measured bandwidths), and the keep-alive reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from warmstart.names import validate_model_name
from warmstart.scheduler.config import (
    AdapterConfig,
    BandwidthConfig,
    ModelConfig,
    SchedulerConfig,
    SchedulerConfigError,
    ServerConfig,
)
from warmstart.scheduler.errors import (
    BadRequest,
    ClusterStateError,
    ClusterStateUnavailable,
    InvalidSamplingValue,
    MigrationDestinationError,
    MigrationError,
    ModelNotInRepositoryError,
    SchedulerError,
    UnknownAdapterError,
    UnknownModelError,
    UnknownServerError,
    UnplaceableModelError,
)
from warmstart.scheduler.metrics import SchedulerMetrics, counts_rejections
from warmstart.scheduler.migration import MigrationOutcome, MigrationResult, migrate
from warmstart.scheduler.nodestore import NodeStoreClient, NodeStoreError
from warmstart.scheduler.policy import (
    UNMEASURED_REMOTE_BPS,
    Action,
    AdapterSpec,
    AdapterView,
    Blocker,
    LoadCosts,
    MigrationPlan,
    Placement,
    Unplaceable,
    assumed_remote_bps,
    choose_evictions,
    decayed_rates,
    describe_placement,
    effective_bandwidth,
    eviction_s,
    expired_models,
    learn_load,
    learn_release,
    learn_unload,
    place,
    place_adapter,
    plan_migration,
    random_place,
    recall,
    record_arrival,
    serverlessllm_place,
    why_unplaceable,
)
from warmstart.scheduler.replicas import ClaimResult, ReplicaCoordinator, sync_with_allocation
from warmstart.scheduler.state import (
    ClusterSnapshot,
    ClusterStateStore,
    InMemoryClusterState,
    Instance,
    LoadInFlight,
    ModelSpec,
    NodeBandwidth,
    NodeRecord,
    RunningRequest,
    ServerState,
    Tier,
)
from warmstart.scheduler.streams import (
    Generation,
    GenerationSource,
    ServerDest,
    Switch,
    UpstreamFailed,
    run_stream,
    start_pump,
)
from warmstart.scheduler.upstream import (
    AdapterReloadFailed,
    ModelLoadFailed,
    TokenChunk,
    TritonUpstream,
    Upstream,
    UpstreamError,
    UpstreamModelMissing,
    UpstreamModelReleased,
    UpstreamUnavailable,
)
from warmstart.tritonconfig import model_config

logger = logging.getLogger(__name__)

_DEFAULT_TOKEN_S = 0.05  # per-token time assumed for a model until one generation measured it
PINNED_REFRESH_S = 0.05  # a pinned server's allocation older than this is read again before a load decision
_PLACEHOLDER_BANDWIDTH = NodeBandwidth(1.0, 1.0, None)  # never used for a decision: server marked unhealthy


class ColdStartQueueFull(SchedulerError):
    """The cold-start queue holds as many waiting requests as it may (HTTP 503)."""


class ColdStartTimeout(SchedulerError):
    """The model did not become ready for this request within the cold-start timeout (HTTP 503)."""


class GenerationFailed(SchedulerError):
    """A generation could not be completed: every failover attempt failed too (HTTP 502)."""


class UnknownGenerationError(SchedulerError, LookupError):
    """No running generation has this id (it finished, or never existed)."""


class DuplicateServerError(SchedulerError, ValueError):
    """A server with this name is already registered."""


class DuplicateModelError(SchedulerError, ValueError):
    """A model with this name is already registered."""


class DuplicateAdapterError(DuplicateModelError):
    """The base model already has an adapter with this name."""


MULTI_LORA_FILE = "multi_lora.json"  # warmstart.backend.adapters.MULTI_LORA_FILE


def load_files(model: ModelConfig) -> dict[str, bytes] | None:
    """The files a load of ``model`` carries (Triton's file override), or None: a LoRA model's
    ``multi_lora.json`` (its adapters as the scheduler knows them) and an empty version directory."""
    if not model.lora:
        return None
    return {
        f"file:{MULTI_LORA_FILE}": json.dumps(model.multi_lora(), sort_keys=True).encode(),
        "file:1/.warmstart": b"",
    }


# ------------------------------------------------------------------------------------------- runtime state


class _Tracked(dict[Any, Any]):
    """A dict of a server's runtime state that tells its server when it changes (so the server's rendered
    state is redone only then: :meth:`Router.snapshot`)."""

    def __init__(self, owner: ServerRuntime, *args: Any) -> None:
        super().__init__(*args)
        self._owner = owner

    def _adopt(self, value: Any) -> Any:
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, self._adopt(value))
        self._owner.bump()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._owner.bump()

    def pop(self, *args: Any) -> Any:
        out = super().pop(*args)
        self._owner.bump()
        return out

    def popitem(self) -> Any:
        out = super().popitem()
        self._owner.bump()
        return out

    def clear(self) -> None:
        super().clear()
        self._owner.bump()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v


class _Instances(_Tracked):
    """A server's instances: each one tells the server when it (or its requests) changes."""

    def _adopt(self, value: Any) -> Any:
        object.__setattr__(value, "_owner", self._owner)
        if not isinstance(value.requests, _Tracked):
            object.__setattr__(value, "requests", _Tracked(self._owner, value.requests))
        return value


@dataclass(eq=False)
class _InstanceRT:
    model: str
    size_bytes: int
    last_used_s: float
    requests: dict[str, Generation] = field(default_factory=dict)
    # LoRA: the adapters its multi_lora.json lists (what this scheduler sent it; None: not known), and those
    # its requests used, least recently used first (at most the model's max_loras: what the backend keeps)
    adapters_served: frozenset[str] | None = None
    adapters_sent: frozenset[tuple[str, str]] | None = None  # the (name, reference) pairs behind it
    adapters_used: dict[str, float] = field(default_factory=dict)
    # with other scheduler replicas: True once the server's shared allocation records it loaded (this
    # replica's own load or join, or adopted from the allocation); one that leaves the allocation later was
    # unloaded by another replica. False: found in the server's index only (loaded before the allocations
    # knew of it), recorded by the next replica round
    shared: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        owner = self.__dict__.get("_owner")
        if owner is not None:
            if name == "requests" and not isinstance(value, _Tracked):
                object.__setattr__(self, name, _Tracked(owner, value))
            owner.bump()


@dataclass(eq=False)
class _LoadRT:
    model: str
    size_bytes: int
    expected_finish_s: float
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class OthersView:
    """What other scheduler replicas hold on one server, from its shared allocation as last read.

    ``loading``: their loads in flight (model, bytes): joined, and counted against the budget;
    ``held_bytes``: models recorded loaded there that this replica does not route to yet (they shrink the
    budget); ``freeing_bytes``: their unloads not finished (memory being freed); ``using``: models their
    generations use (pinned: not evicted here, nor freed by moving this replica's requests)."""

    loading: tuple[tuple[str, int], ...] = ()
    held_bytes: int = 0
    freeing_bytes: int = 0
    using: frozenset[str] = frozenset()


_NO_OTHERS = OthersView()


@dataclass(eq=False)
class ServerRuntime:
    """One server's live state as the router tracks it; rendered to a frozen ServerState for the policy."""

    config: ServerConfig
    upstream: Upstream
    healthy: bool = False
    bandwidth: NodeBandwidth | None = None
    store_tiers: dict[str, Tier] = field(default_factory=dict)
    costs: LoadCosts = field(default_factory=lambda: LoadCosts(1.0))  # learned from this server's loads
    instances: dict[str, _InstanceRT] = field(default_factory=dict)
    loads: dict[str, _LoadRT] = field(default_factory=dict)
    unloading: dict[str, int] = field(default_factory=dict)  # model -> bytes still held (0 once released)
    probe: asyncio.Task[bool] | None = None
    removed: bool = False
    repository: frozenset[str] | None = None  # model names in its repository index, once read
    version: int = 0  # bumped by every change of what to_state() renders (the snapshot's cache key)
    sink: set[str] | None = None  # the router's set of servers changed since its last snapshot
    synced: bool = False  # with other replicas: a replica round has followed this server's allocation

    _TRACKED: ClassVar[dict[str, type[_Tracked]]] = {
        "instances": _Instances,
        "loads": _Tracked,
        "unloading": _Tracked,
        "store_tiers": _Tracked,
    }
    _UNRENDERED: ClassVar[frozenset[str]] = frozenset({"version", "probe", "upstream", "sink", "synced"})

    def __setattr__(self, name: str, value: Any) -> None:
        kind = self._TRACKED.get(name)
        if kind is not None and not isinstance(value, kind):
            value = kind(self, value)
        object.__setattr__(self, name, value)
        if name not in self._UNRENDERED and "version" in self.__dict__:
            self.bump()

    def bump(self) -> None:
        """What this server renders changed: its state is redone at the next snapshot."""
        object.__setattr__(self, "version", self.version + 1)
        if self.sink is not None:
            self.sink.add(self.config.name)

    def remote_assumed(self) -> bool:
        """True while this server's node store has not measured its remote tier (no fill yet), nor did its
        config give a figure or its own loads teach one: placement then uses ``assumed_remote_bps``."""
        return (
            self.config.node_store is not None
            and self.bandwidth is not None
            and self.bandwidth.remote_bps is None
            and Tier.REMOTE not in self.costs.bps
        )

    @property
    def overhead_s(self) -> float:
        return self.costs.overhead_s

    def effective_bandwidth(self) -> NodeBandwidth | None:
        """The node store's bandwidths, with the disk and remote figures this server's loads reached."""
        return effective_bandwidth(self.bandwidth, self.costs) if self.bandwidth is not None else None

    @property
    def name(self) -> str:
        return self.config.name

    def to_state(
        self,
        now: float,
        token_s: Mapping[str, float],
        assumed_remote_bps: float | None = None,
        others: OthersView | None = None,
    ) -> ServerState:
        """The frozen view the policy decides on. Memory still being freed shrinks the budget. A node store
        that has not measured its remote tier yet gets its own loads' figure, else ``assumed_remote_bps``.
        ``others``: what other scheduler replicas hold here (`OthersView`)."""
        others = others or _NO_OTHERS
        instances = tuple(
            Instance(
                model=i.model,
                size_bytes=i.size_bytes,
                last_used_s=i.last_used_s,
                requests=tuple(
                    RunningRequest(
                        request_id=g.id,
                        prompt_tokens=len(g.prompt_ids)
                        if g.prompt_ids is not None
                        else len(g.prompt or g.messages or "") // 4,
                        generated_tokens=len(g.tokens),
                        expected_remaining_s=max(0, g.max_tokens - len(g.tokens))
                        * token_s.get(g.model, _DEFAULT_TOKEN_S),
                    )
                    for g in i.requests.values()
                ),
                pinned=i.model in others.using,
            )
            for i in self.instances.values()
        )
        bandwidth = self.effective_bandwidth() or _PLACEHOLDER_BANDWIDTH
        if self.config.node_store is not None and self.bandwidth is not None and bandwidth.remote_bps is None:
            remote = self.costs.bps.get(Tier.REMOTE, assumed_remote_bps)
            if remote is not None:
                bandwidth = replace(bandwidth, remote_bps=remote)
        budget = max(0, self.config.memory_budget_bytes - others.held_bytes)
        freeing = sum(self.unloading.values()) + others.freeing_bytes
        return ServerState(
            name=self.name,
            healthy=self.healthy and self.bandwidth is not None and not self.removed,
            memory_budget_bytes=max(0, budget - freeing),
            freeing_bytes=min(freeing, budget),
            repository=self.repository,
            bandwidth=bandwidth,
            triton_load_overhead_s=self.overhead_s,
            instances=instances,
            loading=tuple(
                LoadInFlight(ld.model, ld.size_bytes, ld.expected_finish_s) for ld in self.loads.values()
            )
            + tuple(  # other scheduler replicas' loads here: joined, and counted against the budget
                LoadInFlight(m, size, now + 1.0)
                for m, size in others.loading
                if m not in self.loads and m not in self.instances
            ),
            store_tiers=dict(self.store_tiers),
            eviction_s=eviction_s(self.costs),
        )


@dataclass
class RouterStats:
    """Counters the admin API and the tests read."""

    loads: dict[str, int] = field(default_factory=dict)  # "server/model" -> successful loads
    load_failures: int = 0
    unloads: int = 0
    evictions: int = 0
    releases: int = 0  # evicted or expired models whose engine was released (memory free before the unload)
    failovers: int = 0
    migrations: int = 0
    rejected_queue_full: int = 0
    rejected_timeout: int = 0
    generations: int = 0


ConfigRenderer = Callable[[ModelConfig], Mapping[str, Any]]
PlaceFn = Callable[[ClusterSnapshot, str], Placement]


def placement_rule(config: SchedulerConfig) -> PlaceFn:
    """The placement function ``config.policy`` names: ``warmstart`` (:func:`place`), or the benchmark
    baselines ``random`` (:func:`random_place`, seeded by ``policy_seed``) and ``serverlessllm``."""
    if config.policy == "random":
        rng = random.Random(config.policy_seed)
        return lambda snapshot, model: random_place(snapshot, model, rng)
    if config.policy == "serverlessllm":
        return serverlessllm_place
    return place


def default_renderer(model: ModelConfig) -> Mapping[str, Any]:
    """The Triton config for ``model``: its explicit ``triton_config``, else the warmstart backend's."""
    if model.triton_config is not None:
        config = dict(model.triton_config)
        config["name"] = model.name
        return config
    try:
        rendered: Mapping[str, Any] = model_config(
            model.name,
            model.checkpoint,
            model.engine,
            enable_lora=model.lora,
            max_loras=model.max_loras,
            max_lora_rank=model.max_lora_rank,
        )
    except ValueError as e:
        raise ModelLoadFailed(f"model {model.name!r}: {e}") from e
    return rendered


# ------------------------------------------------------------------------------------------------ router


class Router:
    """Places, loads, routes and streams; owns the background loops. Single asyncio loop, no locks."""

    def __init__(
        self,
        config: SchedulerConfig,
        *,
        store: ClusterStateStore | None = None,
        renderer: ConfigRenderer = default_renderer,
        clock: Callable[[], float] = time.monotonic,
        upstream_factory: Callable[[ServerConfig], Upstream] | None = None,
    ) -> None:
        """``upstream_factory(server)`` makes each server's `Upstream` (default: a `TritonUpstream` with the
        config's timeouts and retries); ``store`` holds cluster state (default: in memory)."""
        self.config = config
        self._upstream_factory = upstream_factory or self._triton_upstream
        self.store: ClusterStateStore = store if store is not None else InMemoryClusterState()
        self._render = renderer
        self._clock = clock
        self._place = placement_rule(config)
        self.models: dict[str, ModelConfig] = {}
        self.servers: dict[str, ServerRuntime] = {}
        self.generations: dict[str, Generation] = {}
        self.stats = RouterStats()
        self._token_s: dict[str, float] = {}
        self._load_errors: dict[str, tuple[float, ModelLoadFailed]] = {}
        self._demand: dict[str, tuple[float, float]] = {}  # model -> (request rate, when counted)
        self._changed = asyncio.Event()
        self._waiting = 0
        self._ids = itertools.count(1)
        self._attempts = itertools.count(1)
        self._migrating_for: set[str] = set()
        self._adapter_pushes: dict[tuple[str, str], asyncio.Task[None]] = {}  # (server, model) -> push
        self._deployed_raw: dict[str, Mapping[str, Any]] = {}  # deployments as last read (their adapters)
        self._discovered: dict[str, int] = {}  # servers added from node registrations -> their epoch
        self._seen_deployed: set[str] = set()  # models deployed in cluster state at the last read
        self._state_unavailable: str | None = None  # why cluster state could not be reached, while it cannot
        self.coordinator: ReplicaCoordinator | None = None  # with cluster state on etcd: shared allocations
        self._rendered: dict[str, tuple[Any, ServerState]] = {}  # server -> (cache key, its last state)
        self._published: dict[str, ServerState] = {}  # server -> the state last written to the store
        self._last_snapshot: ClusterSnapshot | None = None
        self._spec_cache: tuple[int, dict[str, ModelSpec]] | None = None
        self._models_version = 0  # bumped whenever self.models changes
        self._states: list[ServerState] = []  # the last snapshot's states, in name order
        self._position: dict[str, int] = {}
        self._order: list[ServerRuntime] | None = None
        self._dirty: set[str] = set()  # servers changed since the last snapshot (ServerRuntime.bump)
        self._dirty_all = True  # the next snapshot looks at every server
        self._busy: set[str] = set()  # servers with generations running (looked at in every snapshot)
        self._measured_cache: dict[str, tuple[int, float | None]] = {}
        self._verify_snapshots = os.environ.get("WARMSTART_VERIFY_SNAPSHOTS") == "1"
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._stores: dict[str, NodeStoreClient] = {}
        self._assumed_remote_bps = UNMEASURED_REMOTE_BPS
        self.metrics = SchedulerMetrics(self, queue_capacity=config.cold_start_queue)
        for m in config.models:
            self._add_model(m)
        for s in config.servers:
            self._add_server(s)

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Check every server once, read the node stores, then start the background loops."""
        await asyncio.gather(*(self._check_server(s) for s in list(self.servers.values())))
        await asyncio.gather(*(self._poll_store(s) for s in list(self.servers.values())))
        self._loops = [
            asyncio.create_task(
                self._every(self.config.health_interval_s, self._health_round), name="health"
            ),
            asyncio.create_task(
                self._every(self.config.store_poll_interval_s, self._store_round), name="stores"
            ),
            asyncio.create_task(self._every(self.config.reaper_interval_s, self._reap_round), name="reaper"),
        ]
        if self.config.etcd is not None:
            self.coordinator = ReplicaCoordinator(self.store, ttl_s=self.config.replica_lease_ttl_s)
            await self._replica_round()
            await self._discovery_round()
            self._loops.append(
                asyncio.create_task(
                    self._every(max(0.2, self.config.replica_lease_ttl_s / 3), self._replica_round),
                    name="replica",
                )
            )
            self._loops.append(
                asyncio.create_task(
                    self._every(self.config.node_poll_interval_s, self._discovery_round), name="nodes"
                )
            )

    async def close(self) -> None:
        """Stop the loops and in-flight work; close every upstream channel."""
        for t in [*self._loops, *self._tasks]:
            t.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        for g in list(self.generations.values()):
            if g.pump is not None:
                g.pump.cancel()
        for s in self.servers.values():
            await s.upstream.close()
        for c in self._stores.values():
            await c.close()
        if self.coordinator is not None:
            await self.coordinator.close()

    async def _every(self, interval: float, round_: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await round_()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("background round %s failed", getattr(round_, "__name__", round_))

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    # -- membership (config and admin API) ----------------------------------------------------------
    def _add_model(self, model: ModelConfig) -> None:
        if model.name in self.models:
            raise DuplicateModelError(f"model {model.name!r} already exists")
        for adapter in model.adapters or {}:
            self._check_adapter_name(model.name, adapter)
        self.models[model.name] = model
        self._models_version += 1
        self.store.put_model(model.to_spec())
        if self.config.etcd is not None:  # deployed for every replica, which add it by themselves
            self.store.put_deployment(model.name, model.to_dict())

    def _add_server(self, server: ServerConfig) -> ServerRuntime:
        if server.name in self.servers:
            raise DuplicateServerError(f"server {server.name!r} already exists")
        rt = ServerRuntime(
            config=server,
            upstream=self._upstream_factory(server),
            costs=LoadCosts(self.config.initial_load_overhead_s, release_s=self.config.initial_release_s),
        )
        if server.node_store is None and server.bandwidth is not None:
            rt.bandwidth = server.bandwidth.to_node_bandwidth()
        if server.node_store is not None:
            self._stores[server.name] = NodeStoreClient(
                server.node_store, timeout_s=self.config.upstream_timeout_s
            )
        self.servers[server.name] = rt
        rt.sink = self._dirty
        self._order = None  # membership changed
        return rt

    def _triton_upstream(self, server: ServerConfig) -> Upstream:
        return TritonUpstream(
            server, timeout_s=self.config.upstream_timeout_s, retries=self.config.upstream_retries
        )

    # -- nodes that register themselves (cluster state on etcd) -------------------------------------------
    @staticmethod
    def node_server_config(record: NodeRecord) -> ServerConfig:
        """The server a node registration describes. Its repository API key is read from the environment
        variable the record names (the key itself is never in cluster state)."""
        key = os.environ.get(record.repository_key_env) if record.repository_key_env else None
        if record.repository_key_env and key is None:
            logger.warning(
                "node %s: its repository key variable %s is not set here; loads on it will be refused",
                record.name,
                record.repository_key_env,
            )
        bandwidth = None
        if record.node_store is None and record.bandwidth is not None:
            bw = record.bandwidth
            bandwidth = BandwidthConfig(bw.memory_bps, bw.disk_bps, bw.remote_bps)
        return ServerConfig(
            name=record.name,
            grpc=record.grpc,
            node_store=record.node_store,
            memory_budget_bytes=record.memory_budget_bytes,
            repository_api_key=key,
            bandwidth=bandwidth,
        )

    def _sync_deployments(self, deployed: Mapping[str, Mapping[str, Any]]) -> None:
        """Models follow the deployments in cluster state: one deployed through another replica's admin API is
        served here too, and one withdrawn there is withdrawn here (its idle instances are unloaded by the
        reaper, as for a model removed here)."""
        for name, config in deployed.items():
            if name in self.models:
                self._follow_deployment(name, config)
                continue
            try:
                model = ModelConfig.from_dict(name, config)
            except SchedulerConfigError as e:
                logger.error(
                    "model %s deployed in cluster state with a config this scheduler refuses: %s", name, e
                )
                continue
            self.models[name] = model
            self._models_version += 1
            logger.info("model %s deployed by another replica; serving it", name)
            self._notify()
        for name in [n for n in self.models if n in self._seen_deployed and n not in deployed]:
            del self.models[name]
            self._models_version += 1
            self._demand.pop(name, None)
            logger.info("model %s withdrawn by another replica", name)
            self._notify()
        self._seen_deployed = set(deployed)

    async def _discovery_round(self) -> None:
        """Servers follow the node registrations: a new node joins routing, a node whose registration is gone
        (its lease ended: it died, was cut off, or stopped) leaves it and its generations resume elsewhere,
        and a node that came back under a new incarnation is taken as a new server (its models are gone)."""
        try:
            view = await asyncio.to_thread(self.store.read)
        except ClusterStateError as e:
            logger.warning("cannot read node registrations (%s); keeping the servers known", e)
            return
        self._sync_deployments({name: v.value for name, v in view.deployments.items()})
        nodes = {name: v.value for name, v in view.nodes.items()}
        for name in [n for n, epoch in self._discovered.items() if n not in nodes or nodes[n].epoch != epoch]:
            why = (
                "its registration ended" if name not in nodes else f"it restarted (epoch {nodes[name].epoch})"
            )
            logger.warning("node %s leaves routing: %s", name, why)
            del self._discovered[name]
            with contextlib.suppress(UnknownServerError):
                await self.remove_server(name)
        for name, record in nodes.items():
            if name in self._discovered:
                continue
            if name in self.servers:  # listed in the config as well: the config's entry wins
                continue
            try:
                config = self.node_server_config(record)
            except SchedulerConfigError as e:
                logger.error("node %s registered a record this scheduler cannot use: %s", name, e)
                continue
            rt = self._add_server(config)
            self._discovered[name] = record.epoch
            logger.info("node %s joins routing (%s, epoch %d)", name, record.grpc, record.epoch)
            await self._check_server(rt)
            await self._poll_store(rt)
            self._notify()

    async def add_model(self, model: ModelConfig) -> None:
        """Register a model at run time."""
        self._add_model(model)
        self._notify()

    async def remove_model(self, name: str) -> None:
        """Forget a model; idle instances of it are unloaded by the reaper, busy ones when they finish."""
        validate_model_name(name)
        if name not in self.models:
            raise UnknownModelError(f"no model named {name!r}")
        del self.models[name]
        self._models_version += 1
        self._demand.pop(name, None)
        self.store.delete_model(name)
        if self.config.etcd is not None:
            with contextlib.suppress(UnknownModelError):
                self.store.delete_deployment(name)
        self._notify()

    # -- LoRA adapters ---------------------------------------------------------------------------------
    def _check_adapter_name(self, model: str, adapter: str) -> None:
        try:
            validate_model_name(f"{model}{self.config.lora_separator}{adapter}")
        except ValueError as e:
            raise SchedulerConfigError(
                f"adapter {adapter!r} of {model!r}: its OpenAI model name is not a valid model name: {e}"
            ) from e

    def resolve_model(self, name: str) -> tuple[str, str | None]:
        """``(base model, adapter or None)`` an OpenAI ``model`` names: a model, ``<model><lora_separator>
        <adapter>``, or an adapter's own name when one model only serves an adapter of that name.
        :class:`UnknownAdapterError` names the adapters the base serves; :class:`UnknownModelError` else."""
        validate_model_name(name)
        if name in self.models:
            return name, None
        sep = self.config.lora_separator
        start = name.find(sep)
        while start > 0:
            base, adapter = name[:start], name[start + len(sep) :]
            model = self.models.get(base)
            if model is not None:
                self._check_adapter(model, adapter)
                return base, adapter
            start = name.find(sep, start + 1)
        owners = sorted(m.name for m in self.models.values() if m.adapters and name in m.adapters)
        if len(owners) == 1:
            return owners[0], name
        if owners:
            raise BadRequest(
                f"adapter {name!r} is served by several models ({', '.join(owners)}): name one as "
                + ", ".join(f"{o}{sep}{name}" for o in owners)
            )
        raise UnknownModelError(f"no model named {name!r} is deployed")

    def _check_adapter(self, model: ModelConfig, adapter: str) -> None:
        if model.adapters is None:
            raise BadRequest(
                f"model {model.name!r} serves no LoRA adapters (lora_name {adapter[:60]!r}); its scheduler "
                "config lists none (adapters:)"
            )
        if adapter not in model.adapters:
            served = ", ".join(sorted(model.adapters)) or "none yet"
            raise UnknownAdapterError(
                f"model {model.name!r} has no adapter {adapter[:60]!r}; it serves: {served}"
            )

    def adapter_spec(self, model: str, adapter: str) -> AdapterSpec:
        """The policy's view of ``model``'s adapter ``adapter``."""
        a = (self.models[model].adapters or {})[adapter]
        return AdapterSpec(adapter, model, a.checkpoint, a.size_bytes)

    def adapter_views(self, model: str) -> dict[str, AdapterView]:
        """Per server with an instance of ``model``: what it holds of its adapters (`place_adapter`)."""
        cfg = self.models[model]
        views: dict[str, AdapterView] = {}
        for rt in self.servers.values():
            inst = rt.instances.get(model)
            if inst is None:
                continue
            busy: dict[str, float] = {}
            for g in inst.requests.values():
                if g.adapter is not None:
                    left = max(0, g.max_tokens - len(g.tokens)) * self._token_s.get(model, _DEFAULT_TOKEN_S)
                    busy[g.adapter] = min(busy.get(g.adapter, left), left)
            views[rt.name] = AdapterView(tuple(inst.adapters_used), inst.adapters_served, busy, cfg.max_loras)
        return views

    def _used_adapter(self, inst: _InstanceRT, gen: Generation) -> None:
        """``gen`` runs on ``inst`` with its adapter: that adapter is resident there (most recently used)."""
        if gen.adapter is None:
            return
        used = inst.adapters_used
        used.pop(gen.adapter, None)
        used[gen.adapter] = self._clock()
        cfg = self.models.get(gen.model)
        while cfg is not None and len(used) > cfg.max_loras:
            used.pop(next(iter(used)))

    async def add_adapter(self, model: str, adapter: AdapterConfig) -> dict[str, str]:
        """Serve ``adapter`` on base ``model`` from now on, without reloading the base: every instance of it
        gets the new adapter list (`_push_adapters`); returns per server ``"ok"`` or why not."""
        cfg = self.model_config(model)
        if cfg.adapters is not None and adapter.name in cfg.adapters:
            raise DuplicateAdapterError(f"model {model!r} already has an adapter {adapter.name!r}")
        self._check_adapter_name(model, adapter.name)
        return await self._set_adapters(cfg, {**(cfg.adapters or {}), adapter.name: adapter})

    async def remove_adapter(self, model: str, adapter: str) -> dict[str, str]:
        """Stop serving ``adapter`` of ``model`` (requests running on it finish on it)."""
        cfg = self.model_config(model)
        self._check_adapter(cfg, adapter)
        return await self._set_adapters(cfg, {n: a for n, a in (cfg.adapters or {}).items() if n != adapter})

    async def _set_adapters(self, cfg: ModelConfig, adapters: Mapping[str, AdapterConfig]) -> dict[str, str]:
        new = cfg.with_adapters(adapters)
        self.models[cfg.name] = new
        self._models_version += 1
        self.store.put_model(new.to_spec())
        if self.config.etcd is not None:  # every replica follows (`_follow_deployment`)
            self.store.put_deployment(new.name, new.to_dict())
        self._notify()
        return await self._push_everywhere(new.name)

    def _follow_deployment(self, name: str, config: Mapping[str, Any]) -> None:
        """A deployed model's adapters changed in cluster state (another replica's admin API): serve them here
        too, and push them to the instances loaded here. Only the adapters are followed (a deployment parsed
        only when it changed since the last round)."""
        if self._deployed_raw.get(name) == config:
            return
        self._deployed_raw[name] = config
        try:
            model = ModelConfig.from_dict(name, config)
        except SchedulerConfigError as e:
            logger.error("model %s redeployed with a config this scheduler refuses: %s", name, e)
            return
        current = self.models[name]
        if model.adapters is None or current.adapters is None or model.adapters == current.adapters:
            return
        self.models[name] = current.with_adapters(model.adapters)
        self._models_version += 1
        logger.info("model %s: adapters changed by another replica: %s", name, sorted(model.adapters))
        self._spawn(self._push_everywhere(name), name=f"adapters of {name}")
        self._notify()

    async def _push_everywhere(self, model: str) -> dict[str, str]:
        servers = [rt for rt in self.servers.values() if rt.healthy and model in rt.instances]
        outcomes = await asyncio.gather(
            *(self._push_adapters(rt, model) for rt in servers), return_exceptions=True
        )
        return {
            rt.name: "ok" if outcome is None else str(outcome)
            for rt, outcome in zip(servers, outcomes, strict=True)
        }

    async def _push_adapters(self, rt: ServerRuntime, model: str) -> None:
        """Make ``rt``'s instance of ``model`` serve the model's adapters as configured now (its
        ``multi_lora.json`` rewritten and re-read through a ``warmstart_lora_reload`` request; the base stays
        loaded). One push per instance at a time; a change while it runs is pushed right after it."""
        key = (rt.name, model)
        task = self._adapter_pushes.get(key)
        if task is None or task.done():
            task = self._spawn(self._push_loop(rt, model), name=f"adapters {rt.name}/{model}")
            self._adapter_pushes[key] = task
        await asyncio.shield(task)

    async def _push_loop(self, rt: ServerRuntime, model: str) -> None:
        try:
            while True:
                cfg = self.models.get(model)
                inst = rt.instances.get(model)
                if cfg is None or not cfg.lora or inst is None:
                    return
                mapping = cfg.multi_lora()
                if inst.adapters_sent == frozenset(mapping.items()):
                    return
                try:
                    answer = await rt.upstream.set_adapters(
                        model, mapping, timeout_s=self.config.upstream_timeout_s
                    )
                except UpstreamUnavailable:
                    await self._server_suspect(rt)
                    raise
                except AdapterReloadFailed as e:
                    logger.error("adapters of %s on %s not updated: %s", model, rt.name, e)
                    raise
                served = frozenset(mapping)
                inst.adapters_served, inst.adapters_sent = served, frozenset(mapping.items())
                for gone in [a for a in inst.adapters_used if a not in served]:
                    del inst.adapters_used[gone]
                logger.info(
                    "adapters of %s on %s: %s (added %s, removed %s)",
                    model,
                    rt.name,
                    sorted(mapping),
                    answer.get("added"),
                    answer.get("removed"),
                )
                self._notify()
        finally:
            self._adapter_pushes.pop((rt.name, model), None)

    async def _adapter_ready(self, rt: ServerRuntime, gen: Generation) -> bool:
        """True when ``rt``'s instance of ``gen.model`` serves ``gen.adapter``; otherwise push the model's
        adapters there (False: decide again, the instance may have changed meanwhile)."""
        inst = rt.instances.get(gen.model)
        if inst is None:
            return False
        if inst.adapters_served is not None and gen.adapter in inst.adapters_served:
            return True
        try:
            await self._push_adapters(rt, gen.model)
        except UpstreamUnavailable as e:
            if rt.healthy:  # it answers its health check but not this: not a server to wait for
                raise ModelLoadFailed(f"adapters of {gen.model!r} cannot be sent to {rt.name}: {e}") from e
            # out of routing now: the next decision goes elsewhere
        except AdapterReloadFailed as e:
            raise ModelLoadFailed(f"adapter {gen.adapter!r} of {gen.model!r} cannot be served: {e}") from e
        return False

    async def add_server(self, server: ServerConfig) -> None:
        """Register a server at run time; it takes traffic once it answers a health check."""
        rt = self._add_server(server)
        await self._check_server(rt)
        await self._poll_store(rt)
        self._notify()

    async def remove_server(self, name: str) -> None:
        """Take a server out of routing; its running generations resume elsewhere."""
        rt = self.servers.get(name)
        if rt is None:
            raise UnknownServerError(f"no server named {name!r}")
        rt.removed = True
        del self.servers[name]
        self._order = None  # membership changed
        with contextlib.suppress(UnknownServerError):
            self.store.delete_server(name)
        for inst in rt.instances.values():
            for g in list(inst.requests.values()):
                g.queue.put_nowait(UpstreamFailed(g.attempt, UpstreamUnavailable(f"server {name} removed")))
        self._notify()
        await rt.upstream.close()
        client = self._stores.pop(name, None)
        if client is not None:
            await client.close()

    # -- snapshot ----------------------------------------------------------------------------------------
    def snapshot(self) -> ClusterSnapshot:
        """Every server's state as the policy sees it, at one time; what changed is published to the store.

        Incremental: a server's state is rendered again only when something it renders changed
        (`_state_of`), and the snapshot's index is updated from the previous snapshot's for those servers
        only (`ClusterSnapshot.of(previous=)`), so a decision at 1000 servers costs what changed, not the
        cluster. With other replicas (cluster state on etcd) the server reports are this replica's own view
        (what the replicas share is each server's allocation, merged in as the others' loads), and cluster
        state counts as unreachable while the replica's last call to it failed."""
        now = self._clock()
        order = self._in_order()
        coord = self.coordinator
        # which servers to look at again: what changed, and what is busy (its per-token times move); every
        # server with other replicas (their loads there move), or when the assumed remote figure moved
        dirty = set(self._dirty)
        self._dirty.clear()  # in place: every server holds this very set
        everything = coord is not None or self._dirty_all
        self._dirty_all = False
        look = (
            order
            if everything
            else [self.servers[n] for n in sorted(dirty | self._busy) if n in self.servers]
        )
        moved = [self._measured_remote(rt) for rt in look]  # every one of them updated (no short cut)
        if any(moved) or everything:  # a measured figure moved
            measured = [bps for _, bps in self._measured_cache.values() if bps is not None]
            assumed = assumed_remote_bps(measured)
            if assumed != self._assumed_remote_bps:
                self._assumed_remote_bps = assumed
                look = order
        if len(self._states) != len(order) or look is order:
            self._states = [None] * len(order)  # type: ignore[list-item]
            self._position = {rt.name: i for i, rt in enumerate(order)}
            look = order
        states = self._states
        for rt in look:
            states[self._position[rt.name]] = self._state_of(rt, now, self._others(rt))
            if any(inst.requests for inst in rt.instances.values()):
                self._busy.add(rt.name)
            else:
                self._busy.discard(rt.name)
        if self._verify_snapshots:  # tests: every state reused is what a fresh render gives
            for rt, state in zip(order, states, strict=True):
                fresh = rt.to_state(now, self._token_s, self._assumed_remote_bps, self._others(rt))
                if fresh != state:
                    raise AssertionError(f"stale state of {rt.name} in the snapshot: {state} != {fresh}")
        demand = decayed_rates(self._demand, now)
        if coord is not None:
            self._cluster_state(coord.unreachable)
        else:
            try:
                for rt in look:  # the store mirrors what changed
                    state = states[self._position[rt.name]]
                    if self._published.get(state.name) is not state:
                        self.store.put_server(state)
                        self._published[state.name] = state
                self._cluster_state(None)
            except ClusterStateUnavailable as e:
                self._published.clear()
                self._dirty_all = True  # publish everything once it answers again
                self._cluster_state(str(e))
        previous = self._last_snapshot
        basis = None if previous is None else (previous.__dict__.get("index") or previous.basis)
        snapshot = ClusterSnapshot(
            servers=tuple(states), models=self._specs(), now=now, demand=demand, basis=basis
        )
        self._last_snapshot = snapshot
        return snapshot

    def _in_order(self) -> list[ServerRuntime]:
        """The servers sorted by name (the snapshot's order; redone when the membership changes)."""
        if self._order is None or len(self._order) != len(self.servers):
            self._order = [self.servers[n] for n in sorted(self.servers)]
            self._dirty_all = True
            for name in list(self._rendered):
                if name not in self.servers:
                    del self._rendered[name]
                    self._measured_cache.pop(name, None)
        return self._order

    def _measured_remote(self, rt: ServerRuntime) -> bool:
        """Keep the remote bandwidth ``rt`` measured itself (None while assumed), per server version; True
        if it changed."""
        hit = self._measured_cache.get(rt.name)
        if hit is not None and hit[0] == rt.version:
            return False
        bw = rt.effective_bandwidth()
        value = bw.remote_bps if not rt.remote_assumed() and bw is not None and bw.remote_bps else None
        self._measured_cache[rt.name] = (rt.version, value)
        return hit is None or hit[1] != value

    def _others(self, rt: ServerRuntime) -> OthersView | None:
        """What other scheduler replicas hold on ``rt`` (its shared allocation as last read): their loads in
        flight, and the bytes committed there that this replica does not track (see `ServerRuntime.to_state`)."""
        coord = self.coordinator
        if coord is None:
            return None
        known = rt.instances.keys() | rt.loads.keys() | rt.unloading.keys()
        held, freeing = coord.others_holding(rt.name, known)
        return OthersView(
            loading=tuple(sorted(coord.others_loads(rt.name).items())),
            held_bytes=held,
            freeing_bytes=freeing,
            using=coord.others_using(rt.name),
        )

    def _state_of(
        self,
        rt: ServerRuntime,
        now: float,
        others: OthersView | None,
    ) -> ServerState:
        """``rt``'s rendered state: the one rendered last time unless something it renders changed (the
        server's version, the learned per-token times of its busy models, the assumed remote bandwidth, other
        replicas' loads and holdings there). ``WARMSTART_VERIFY_SNAPSHOTS=1`` checks every reuse against a
        fresh render."""
        busy = tuple((m, self._token_s.get(m)) for m, inst in rt.instances.items() if inst.requests)
        key: tuple[Any, ...] = (
            rt.version,
            self._assumed_remote_bps,
            busy,
            others,
        )
        if others is not None and others.loading:  # their loads' expected ends move with the clock
            key = (*key, now)
        cached = self._rendered.get(rt.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        state = rt.to_state(now, self._token_s, self._assumed_remote_bps, others)
        self._rendered[rt.name] = (key, state)
        return state

    def _specs(self) -> dict[str, ModelSpec]:
        """Every model's policy view, by name (rebuilt, never changed in place, when the models change)."""
        if self._spec_cache is None or self._spec_cache[0] != self._models_version:
            self._spec_cache = (self._models_version, {n: m.to_spec() for n, m in self.models.items()})
        return self._spec_cache[1]

    async def _cluster_state_back(self) -> bool:
        """One try (bounded by the store's timeout) whether cluster state answers again."""
        coord = self.coordinator
        if coord is None:
            return False  # the next snapshot tries the store itself
        try:
            await coord.keep_alive()
        except ClusterStateError as e:
            coord.unreachable = str(e)
            return False
        coord.unreachable = None
        return True

    def _cluster_state(self, unreachable: str | None) -> None:
        """Record whether cluster state can be reached (``unreachable``: why not), logging each change."""
        if unreachable is not None and self._state_unavailable is None:
            logger.error(
                "cluster state unreachable (%s): serving the models loaded now from this scheduler's own "
                "view; requests that need a new load are refused until it is back",
                unreachable,
            )
        elif unreachable is None and self._state_unavailable is not None:
            logger.warning("cluster state reachable again; decisions resume")
        self._state_unavailable = unreachable

    def _count_request(self, model: str) -> None:
        """Count a client's request for ``model`` in its recent request rate (``ClusterSnapshot.demand``)."""
        now = self._clock()
        rate, t = self._demand.get(model, (0.0, now))
        self._demand[model] = (record_arrival(rate, now - t), now)

    # -- placement -----------------------------------------------------------------------------------
    def model_config(self, name: str) -> ModelConfig:
        """The config of a registered model (name validated first)."""
        validate_model_name(name)
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(f"no model named {name!r} is deployed") from None

    async def _acquire(self, gen: Generation) -> ServerRuntime:
        """A server with ``gen.model`` loaded and a slot reserved for ``gen`` (loads it if needed)."""
        started = self._clock()
        deadline = started + self.config.cold_start_timeout_s
        queued = False
        refreshed = False
        logged: tuple[Action, str | None] | None = None
        try:
            while True:
                if gen.model not in self.models:
                    raise UnknownModelError(f"model {gen.model!r} was removed")
                if gen.adapter is not None:
                    self._check_adapter(self.models[gen.model], gen.adapter)
                failed = self._load_errors.get(gen.model)
                if failed is not None and failed[0] >= started:
                    raise failed[1]
                snapshot = self.snapshot()
                placement = self._place(snapshot, gen.model)
                if gen.adapter is not None:
                    placement = place_adapter(
                        snapshot,
                        self.adapter_spec(gen.model, gen.adapter),
                        self.adapter_views(gen.model),
                        placement,
                    )
                blocked = why_unplaceable(snapshot, gen.model) if placement.action is Action.QUEUE else None
                if blocked is not None and blocked.final:
                    if not refreshed and any(b.blocker is Blocker.NOT_IN_REPOSITORY for b in blocked.blocks):
                        refreshed = True  # a directory may have been added since the index was read
                        await self._refresh_repositories()
                        continue
                    self._refuse_unplaceable(gen, blocked)
                if logged != (placement.action, placement.server):
                    logged = (placement.action, placement.server)
                    self._log_decision(gen, placement, blocked)
                if placement.action is Action.ROUTE and placement.server is not None:
                    rt = self.servers[placement.server]
                    if gen.adapter is not None and not await self._adapter_ready(rt, gen):
                        continue  # its adapters were pushed there: decide again
                    inst = rt.instances[gen.model]
                    inst.requests[gen.id] = gen
                    inst.last_used_s = self._clock()
                    self._used_adapter(inst, gen)
                    gen.server = rt.name
                    self._count_in_use(rt, gen.model)
                    return rt
                if self._state_unavailable is not None and placement.action is not Action.WAIT:
                    if await self._cluster_state_back():
                        continue  # reachable again: decide again on a fresh snapshot
                    raise ClusterStateUnavailable(
                        f"cannot decide where to load {gen.model!r} now: cluster state is unreachable "
                        f"({self._state_unavailable}); models already loaded are still served, retry when it is back"
                    )
                if placement.action in (Action.LOAD, Action.WAIT, Action.QUEUE) and self._try_migration(
                    gen.model
                ):
                    placement = replace(placement, action=Action.QUEUE)  # wait for the moves, then load
                if not queued:
                    if self._waiting >= self.config.cold_start_queue:
                        self.stats.rejected_queue_full += 1
                        raise ColdStartQueueFull(
                            f"cold-start queue full ({self.config.cold_start_queue} waiting); retry later"
                        )
                    self._waiting += 1
                    queued = True
                if placement.action in (Action.LOAD, Action.QUEUE) and await self._others_done():
                    continue  # another replica's generations let go of a model somewhere: decide again
                if placement.action is Action.LOAD and placement.server is not None:
                    self._start_load(self.servers[placement.server], gen.model, placement.evictions)
                    continue
                remaining = deadline - self._clock()
                if remaining <= 0:
                    self.stats.rejected_timeout += 1
                    why = f": {blocked.reason()}" if blocked is not None else ""
                    raise ColdStartTimeout(
                        f"model {gen.model!r} not ready within {self.config.cold_start_timeout_s:.0f} s "
                        f"(last decision: {placement.action.value}{why})"
                    )
                await self._wait_change(min(remaining, 1.0))
        finally:
            if queued:
                self._waiting -= 1

    async def _others_done(self) -> bool:
        """With other replicas, before a load or while queued for room: read again the allocations of the
        servers where other replicas' generations use models (the instances pinned in this replica's
        snapshot) if read more than `PINNED_REFRESH_S` ago, so room they freed is seen now, not at the next
        replica round (a stale pin sends a load to a server without a local copy). True if one of them is no
        longer used there: the request decides again. Each read is in the coordinator's stats
        (``decision_read``)."""
        coord = self.coordinator
        if coord is None:
            return False
        stale = time.monotonic() - PINNED_REFRESH_S
        freed = False
        for name in [n for n in self.servers if coord.others_using(n) and coord.read_at.get(n, 0.0) < stale]:
            before = coord.others_using(name)
            try:
                await coord.decision_read(name)  # timed: a round trip this decision adds
            except ClusterStateError as e:
                logger.warning("cannot read the allocation of %s: %s", name, e)
                continue
            if before - coord.others_using(name):
                freed = True
        return freed

    def _log_decision(self, gen: Generation, placement: Placement, blocked: Unplaceable | None) -> None:
        """One INFO line per decision (a request's loop logs again only when the decision changes)."""
        line = describe_placement(placement)
        rt = self.servers.get(placement.server) if placement.server is not None else None
        if placement.action is Action.LOAD and rt is not None and rt.remote_assumed():
            est = placement.estimate
            if est is not None and est.tier is Tier.REMOTE:
                line += f"; remote not measured yet there, assumed {self._assumed_remote_bps / 1e6:.0f} MB/s"
        if placement.action is Action.QUEUE:
            line += f" ({blocked.reason()})" if blocked is not None else " (no server has room for it now)"
        logger.info(
            "placement of %s for %s: %s; cold-start queue %d/%d",
            gen.model if gen.adapter is None else f"{gen.model} (adapter {gen.adapter})",
            gen.id,
            line,
            self._waiting,
            self.config.cold_start_queue,
        )

    def _refuse_unplaceable(self, gen: Generation, blocked: Unplaceable) -> None:
        """Answer a request that no server can ever take, with which server lacks what."""
        if blocked.in_no_repository:
            message = (
                f"model {gen.model!r} is deployed but no server's model repository has it "
                f"({blocked.reason()}); add its directory (config.pbtxt and 1/) to a server's repository"
            )
            logger.warning("placement of %s for %s: refused: %s", gen.model, gen.id, message)
            raise ModelNotInRepositoryError(message)
        message = f"model {gen.model!r} cannot be placed on any server: {blocked.reason()}"
        logger.warning("placement of %s for %s: refused: %s", gen.model, gen.id, message)
        raise UnplaceableModelError(message)

    async def _refresh_repositories(self) -> None:
        """Re-read every healthy server's repository index (which models it could load)."""

        async def one(rt: ServerRuntime) -> None:
            try:
                index = await rt.upstream.index()
            except UpstreamError as e:
                logger.warning("repository index of %s: %s", rt.name, e)
                return
            rt.repository = frozenset(m["name"] for m in index)

        await asyncio.gather(*(one(rt) for rt in list(self.servers.values()) if rt.healthy))

    def _count_in_use(self, rt: ServerRuntime, model: str) -> None:
        if self.coordinator is not None:
            inst = rt.instances.get(model)
            self.coordinator.in_use(rt.name, model, len(inst.requests) if inst is not None else 0)

    def _release(self, rt: ServerRuntime, gen: Generation) -> None:
        inst = rt.instances.get(gen.model)
        if inst is not None and inst.requests.pop(gen.id, None) is not None:
            inst.last_used_s = self._clock()
            self._count_in_use(rt, gen.model)
        if gen.server == rt.name:
            gen.server = None
        self._notify()

    # -- loads and unloads --------------------------------------------------------------------------------
    def _start_load(self, rt: ServerRuntime, model: str, evictions: tuple[str, ...]) -> None:
        """Register the load (so every later placement joins it) and run it in the background."""
        spec = self.models[model]
        now = self._clock()
        evicted = []
        for m in evictions:
            inst = rt.instances.pop(m, None)
            if inst is not None:
                rt.unloading[m] = inst.size_bytes
                evicted.append(m)
                self.stats.evictions += 1
                self.metrics.evicted(rt.name)
        effective = rt.effective_bandwidth()
        tier = rt.store_tiers.get(model, Tier.REMOTE)
        bw = effective.of(tier) if effective else None
        if bw is None and tier is Tier.REMOTE and rt.remote_assumed():
            bw = self._assumed_remote_bps
        expected = (
            (eviction_s(rt.costs) if evicted else 0.0) + (spec.size_bytes / bw if bw else 0.0) + rt.overhead_s
        )
        load = _LoadRT(model, spec.memory_bytes, now + expected)
        rt.loads[model] = load
        self.metrics.load_started(rt.name, model, rt.store_tiers.get(model, Tier.REMOTE).value, expected, now)
        load.task = self._spawn(self._load(rt, spec, tuple(evicted)), name=f"load {rt.name}/{model}")

    async def _decide_shared(self, rt: ServerRuntime, spec: ModelConfig, evictions: tuple[str, ...]) -> bool:
        """With other scheduler replicas: take this load decision through the server's shared allocation.
        True: this replica loads it now. False: it was joined (another replica's load, now ended), or there
        is no room with the others' loads, or another replica uses a model it would evict: the evicted
        instances are put back and the requests decide again with what the snapshot now shows."""
        coord = self.coordinator
        assert coord is not None
        released: list[str] = []
        for m in evictions:
            if not await coord.may_unload(rt.name, m):
                for back in evictions:  # keep every victim loaded (those released are recorded again)
                    rt.unloading.pop(back, None)
                    size = self.models[back].memory_bytes if back in self.models else 0
                    rt.instances[back] = _InstanceRT(back, size, self._clock(), shared=True)
                    if back in released:  # its release is undone: loaded again, not unloading
                        await coord.unloaded(rt.name, back)
                        await coord.finished(rt.name, back, loaded_bytes=size)
                return False
            released.append(m)
        result = await coord.claim(
            rt.name, spec.name, spec.memory_bytes, rt.config.memory_budget_bytes, freeing=released
        )
        if result is ClaimResult.WON:
            return True
        if result is ClaimResult.JOIN and await coord.wait_for_load(
            rt.name, spec.name, self.config.cold_start_timeout_s
        ):
            rt.loads.pop(
                spec.name, None
            )  # joined, not loading: a snapshot must not see it loaded and loading
            rt.instances.setdefault(
                spec.name, _InstanceRT(spec.name, spec.memory_bytes, self._clock(), shared=True)
            )
            logger.info("%s on %s was loaded by another replica; routing to it", spec.name, rt.name)
        for m in released:  # not loading after all: the victims stay
            rt.unloading.pop(m, None)
            size = self.models[m].memory_bytes if m in self.models else 0
            rt.instances[m] = _InstanceRT(m, size, self._clock(), shared=True)
            await coord.unloaded(rt.name, m)
            await coord.finished(rt.name, m, loaded_bytes=size)
        return False

    async def _load(self, rt: ServerRuntime, spec: ModelConfig, evictions: tuple[str, ...]) -> None:
        claimed = False
        loaded_bytes: int | None = None
        try:
            if self.coordinator is not None:
                try:
                    claimed = await self._decide_shared(rt, spec, evictions)
                except ClusterStateError as e:
                    logger.warning("load of %s on %s not started: cluster state: %s", spec.name, rt.name, e)
                    if isinstance(e, ClusterStateUnavailable):
                        self.coordinator.unreachable = str(e)
                    claimed = False
                if not claimed:
                    return
            # concurrently: releases take tens of ms, and tritonserver runs unloads at once
            await asyncio.gather(*(self._evict(rt, m) for m in evictions))
            while spec.name in rt.unloading:
                # an unload of this very model is still running here (its keep-alive ran out, or it was
                # evicted): loading now would make tritonserver reload it under the unload, which then
                # waits in vain for UNAVAILABLE and holds the server's memory budget until it times out
                await self._wait_change(1.0)
            tier = rt.store_tiers.get(spec.name, Tier.REMOTE)
            logger.info("loading %s on %s (tier %s)", spec.name, rt.name, tier.value)
            files = load_files(spec)
            if files is None:
                elapsed = await rt.upstream.load(
                    spec.name, self._render(spec), timeout_s=self.config.cold_start_timeout_s
                )
            else:  # a LoRA model: its multi_lora.json goes with the load
                elapsed = await rt.upstream.load(
                    spec.name, self._render(spec), timeout_s=self.config.cold_start_timeout_s, files=files
                )
            if rt.bandwidth is not None:
                rt.costs = learn_load(rt.costs, rt.bandwidth, tier, spec.size_bytes, elapsed)
            rt.instances[spec.name] = _InstanceRT(spec.name, spec.size_bytes, self._clock(), shared=claimed)
            loaded_bytes = spec.size_bytes
            if spec.lora:
                loaded = rt.instances[spec.name]
                loaded.size_bytes = loaded_bytes = spec.memory_bytes  # the adapter slots too
                loaded.adapters_served = frozenset(spec.multi_lora())
                loaded.adapters_sent = frozenset(spec.multi_lora().items())
                current = self.models.get(spec.name)
                if current is not None and current.multi_lora() != spec.multi_lora():  # changed meanwhile
                    self._spawn(self._push_adapters(rt, spec.name), name=f"adapters {rt.name}/{spec.name}")
            key = f"{rt.name}/{spec.name}"
            self.stats.loads[key] = self.stats.loads.get(key, 0) + 1
            self.metrics.load_finished(rt.name, spec.name, tier.value, self._clock())
            logger.info("loaded %s on %s in %.2f s", spec.name, rt.name, elapsed)
        except UpstreamUnavailable as e:
            logger.warning("load of %s on %s failed, server unreachable: %s", spec.name, rt.name, e)
            await self._server_suspect(rt)
        except ModelLoadFailed as e:
            logger.error("load of %s on %s failed: %s", spec.name, rt.name, e)
            self.stats.load_failures += 1
            self._load_errors[spec.name] = (self._clock(), e)
        except UpstreamError as e:
            logger.error("load of %s on %s failed: %s", spec.name, rt.name, e)
            self.stats.load_failures += 1
            self._load_errors[spec.name] = (self._clock(), ModelLoadFailed(str(e)))
        finally:
            self.metrics.load_ended(rt.name, spec.name)
            rt.loads.pop(spec.name, None)
            if claimed and self.coordinator is not None:
                try:
                    await self.coordinator.finished(rt.name, spec.name, loaded_bytes=loaded_bytes)
                except ClusterStateError as e:
                    logger.warning("cannot record the end of the load of %s on %s: %s", spec.name, rt.name, e)
            self._notify()

    async def _evict(self, rt: ServerRuntime, model: str) -> None:
        """Free ``model``'s memory for a load: release its engine, count its memory free and leave its unload
        running in the background; if the release fails (another backend, an error, a timeout), wait for
        the unload as before. ``model`` stays in ``rt.unloading`` until the unload ends either way."""
        if rt.healthy:
            t0 = self._clock()
            try:
                await rt.upstream.release(model, timeout_s=self.config.upstream_timeout_s)
            except UpstreamError as e:
                rt.costs = learn_release(rt.costs, None)
                self.metrics.released(rt.name, ok=False)
                logger.info("release of %s on %s failed (%s); waiting for its unload", model, rt.name, e)
            else:
                elapsed = self._clock() - t0
                rt.costs = learn_release(rt.costs, elapsed)
                self.stats.releases += 1
                self.metrics.released(rt.name, ok=True)
                logger.info(
                    "released %s on %s in %.3f s; unloading it in the background", model, rt.name, elapsed
                )
                if model in rt.unloading:
                    rt.unloading[model] = 0
                await self._freed(rt, model)
                self._spawn(self._unload(rt, model), name=f"unload {rt.name}/{model}")
                self._notify()
                return
        await self._unload(rt, model)

    async def _unload(self, rt: ServerRuntime, model: str) -> None:
        """Unload ``model`` (already out of routing) and count its memory free once the index says so."""
        try:
            if rt.healthy:
                t0 = self._clock()
                await rt.upstream.unload(model)
                elapsed = self._clock() - t0
                rt.costs = learn_unload(rt.costs, elapsed)
                self.stats.unloads += 1
                self.metrics.unloaded(rt.name, ok=True)
                logger.info("unloaded %s on %s in %.2f s", model, rt.name, elapsed)
        except UpstreamError as e:
            logger.warning("unload of %s on %s failed: %s", model, rt.name, e)
            self.metrics.unloaded(rt.name, ok=False)
        finally:
            rt.unloading.pop(model, None)
            await self._freed(rt, model)
            self._notify()

    async def _freed(self, rt: ServerRuntime, model: str) -> None:
        """With other replicas: ``model``'s memory on ``rt`` is free (released, or unloaded)."""
        if self.coordinator is not None:
            try:
                await self.coordinator.unloaded(rt.name, model)
            except ClusterStateError as e:
                logger.warning("cannot record %s unloaded on %s: %s", model, rt.name, e)

    def _drop_released(self, rt: ServerRuntime, model: str) -> None:
        """``model``'s engine on ``rt`` was released under the router (by another holder of the key, or a
        release whose unload failed, where the backend could not start its own): out of routing at once, and
        unloaded in the background. Such a model stays READY in Triton, and tritonserver 2.51 takes a load of
        a READY model with the same config as done, so a load of it there waits for this unload
        (:meth:`_load`): the next request loads it afresh, or goes elsewhere."""
        rt.instances.pop(model, None)
        if model in rt.unloading or model in rt.loads:
            return  # its unload, or a load that replaces it, is under way
        logger.warning("%s on %s was released under the router: out of routing, unloading it", model, rt.name)
        rt.unloading[model] = 0  # the release freed its memory
        self._spawn(self._unload(rt, model), name=f"unload {rt.name}/{model}")
        self._notify()

    async def _reap_round(self) -> None:
        """Unload models idle longer than their keep-alive (and instances of removed models), releasing
        their engines first as evictions do."""
        for server, model in expired_models(self.snapshot()):
            rt = self.servers.get(server)
            if rt is None or model not in rt.instances or model in rt.unloading:
                continue
            inst = rt.instances.pop(model)
            rt.unloading[model] = inst.size_bytes
            self._spawn(self._expire(rt, model, inst), name=f"unload {server}/{model}")

    async def _expire(self, rt: ServerRuntime, model: str, inst: _InstanceRT) -> None:
        """Unload an instance whose keep-alive ran out, unless another replica's generations use it (then
        it counts as used now, and its keep-alive starts again)."""
        if self.coordinator is not None:
            try:
                keep = not await self.coordinator.may_unload(rt.name, model)
            except ClusterStateError as e:
                logger.warning("not unloading %s on %s: cluster state: %s", model, rt.name, e)
                keep = True
            if keep:
                rt.unloading.pop(model, None)
                inst.last_used_s = self._clock()
                rt.instances.setdefault(model, inst)
                return
        await self._evict(rt, model)

    # -- health and node stores -------------------------------------------------------------------------
    async def _check_server(self, rt: ServerRuntime) -> bool:
        """One health probe; on a state change update routing (and re-read the index on recovery)."""
        try:
            await rt.upstream.check_live(timeout_s=min(1.0, self.config.upstream_timeout_s))
        except UpstreamUnavailable:
            if rt.healthy:
                self._mark_dead(rt)
            return False
        if not rt.healthy:
            try:
                await self._resync(rt)
            except UpstreamError as e:
                logger.warning("server %s is live but its index is unreadable: %s", rt.name, e)
                return False
            rt.healthy = True
            logger.info("server %s is healthy", rt.name)
            self._notify()
        return True

    async def _replica_round(self) -> None:
        """Keep this replica's lease, read every server's shared allocation, and route to what other
        replicas loaded (models recorded loaded there that this replica did not know of)."""
        coord = self.coordinator
        if coord is None:
            return
        try:
            await coord.keep_alive()
        except ClusterStateUnavailable as e:
            coord.unreachable = str(e)
            return
        except ClusterStateError as e:
            logger.warning("replica %s: cannot renew its lease: %s", coord.name, e)
            return
        coord.unreachable = None
        await coord.refresh_all(list(self.servers))
        for rt in list(self.servers.values()):
            view = coord.views.get(rt.name)
            if view is None or not rt.healthy:
                continue
            sync = sync_with_allocation(
                view,
                {m: (i.size_bytes, i.shared) for m, i in rt.instances.items()},
                in_flight=rt.loads.keys() | rt.unloading.keys(),
                busy=[m for m, i in rt.instances.items() if i.requests],
                models=self.models.keys(),
                first=not rt.synced,
            )
            rt.synced = True
            for model, size in sync.adopt.items():
                logger.info("%s on %s was loaded by another replica: routing to it", model, rt.name)
                rt.instances[model] = _InstanceRT(model, size, self._clock(), shared=True)
            for model in sync.confirm:
                rt.instances[model].shared = True
            for model in sync.drop:
                logger.info("%s on %s was unloaded by another replica: out of routing", model, rt.name)
                del rt.instances[model]
            if sync.adopt or sync.drop:
                self._notify()
            for model, size in sync.record.items():  # loaded before the allocations knew: record it
                try:
                    await coord.finished(rt.name, model, loaded_bytes=size)
                except ClusterStateError as e:
                    logger.warning("cannot record %s loaded on %s: %s", model, rt.name, e)
                    continue
                inst = rt.instances.get(model)
                if inst is not None:
                    inst.shared = True

    async def _forget_loaded(self, rt: ServerRuntime, model: str) -> None:
        coord = self.coordinator
        if coord is None or model in rt.loads or model in rt.unloading:
            return
        try:
            await coord.forget_loaded(rt.name, model)
        except ClusterStateError as e:
            logger.warning("cannot correct the allocation of %s on %s: %s", model, rt.name, e)

    async def _resync(self, rt: ServerRuntime) -> None:
        """Rebuild the instances of ``rt`` from its repository index (models READY there)."""
        index = await rt.upstream.index()
        rt.repository = frozenset(m["name"] for m in index)
        ready = {m["name"] for m in index if m["state"] == "READY"}
        for name in list(rt.instances):
            if name not in ready:
                del rt.instances[name]
        for name in ready:
            if name in self.models and name not in rt.instances and name not in rt.unloading:
                rt.instances[name] = _InstanceRT(name, self.models[name].memory_bytes, self._clock())

    def _mark_dead(self, rt: ServerRuntime) -> None:
        logger.warning("server %s is down: out of routing", rt.name)
        rt.healthy = False
        for inst in rt.instances.values():
            for g in list(inst.requests.values()):
                g.queue.put_nowait(
                    UpstreamFailed(g.attempt, UpstreamUnavailable(f"server {rt.name} is down"))
                )
        rt.instances.clear()
        self._notify()

    async def _server_suspect(self, rt: ServerRuntime) -> None:
        """A call to ``rt`` failed: probe it once (deduplicated across callers)."""
        if rt.removed:  # its channel is closed: a probe would raise, and it takes no traffic anyway
            return
        if rt.probe is None or rt.probe.done():
            rt.probe = asyncio.create_task(self._check_server(rt))
        await asyncio.shield(rt.probe)

    async def _health_round(self) -> None:
        await asyncio.gather(*(self._check_server(rt) for rt in list(self.servers.values())))

    async def _poll_store(self, rt: ServerRuntime) -> None:
        client = self._stores.get(rt.name)
        if client is None:
            return
        try:
            report = await client.report()
        except NodeStoreError as e:
            logger.warning("node store of %s: %s", rt.name, e)
            return
        try:
            bandwidth = report.bandwidth.to_node_bandwidth(rt.config.bandwidth)  # a partial fallback is fine
        except NodeStoreError as e:
            logger.warning("node store of %s: %s", rt.name, e)
            return
        changed = rt.bandwidth != bandwidth or rt.store_tiers != report.tiers
        rt.bandwidth = bandwidth
        rt.costs = recall(rt.costs, bandwidth)
        rt.store_tiers = dict(report.tiers)
        if changed:
            self._notify()

    async def _store_round(self) -> None:
        await asyncio.gather(*(self._poll_store(rt) for rt in list(self.servers.values())))

    # -- generations -------------------------------------------------------------------------------------
    @property
    def cold_start_waiting(self) -> int:
        """Requests waiting in the cold-start queue now."""
        return self._waiting

    @counts_rejections
    def new_generation(
        self,
        model: str,
        prompt: str,
        sampling: Mapping[str, Any],
        *,
        request_id: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        generated: Sequence[int] | None = None,
        adapter: str | None = None,
    ) -> Generation:
        """A generation record for ``model`` (validated, known). Temperature > 0 gets a seed so a
        resumed generation continues exactly. ``prompt_ids`` (a token-id prompt; ``prompt`` may then be
        empty) go to the backend as they are, and so do a chat's ``messages`` (checked already; the backend
        renders them with the model's chat template). ``generated``: the tokens a client already received
        of this generation (from a scheduler that went away); it continues after them, as a failover does,
        and ``max_tokens`` still counts them. Resuming sampled output token-exactly needs the same ``seed``."""
        spec = self.model_config(model)
        params = dict(sampling)
        lora_name = params.pop("lora_name", None)  # KServe requests: lora_name in their sampling parameters
        if lora_name is not None and adapter is not None and lora_name != adapter:
            raise BadRequest(f"the model name selects adapter {adapter!r} but lora_name is {lora_name!r}")
        adapter = adapter if adapter is not None else lora_name
        if adapter is not None:
            self._check_adapter(spec, adapter)
        max_tokens = int(params.get("max_tokens", 16))
        if max_tokens < 0 or max_tokens > spec.max_tokens:
            raise InvalidSamplingValue(f"max_tokens must be in 0..{spec.max_tokens}, got {max_tokens}")
        params["max_tokens"] = max_tokens
        min_tokens = int(params.get("min_tokens", 0) or 0)
        if not 0 <= min_tokens <= max_tokens:
            raise InvalidSamplingValue(
                f"min_tokens must be in 0..max_tokens ({max_tokens}), got {min_tokens}"
            )
        ids = tuple(int(t) for t in prompt_ids) if prompt_ids is not None else None
        if ids is not None and (not ids or min(ids) < 0):
            raise InvalidSamplingValue("a token-id prompt must hold at least one id, each >= 0")
        done = tuple(int(t) for t in generated) if generated else ()
        if done and (len(done) >= max_tokens or min(done) < 0):
            raise InvalidSamplingValue(
                f"generated_ids holds {len(done)} tokens but max_tokens is {max_tokens}: nothing is left to "
                "generate (the generation was complete)"
                if len(done) >= max_tokens
                else "generated_ids must be token ids >= 0"
            )
        if float(params.get("temperature", 0.0) or 0.0) > 0 and params.get("seed") is None:
            if done:
                logger.warning(
                    "resuming a sampled generation without its seed: the continuation is not exact"
                )
            params["seed"] = secrets.randbits(31)
        gid = request_id or f"g{next(self._ids)}"
        return Generation(
            id=f"{gid}-{secrets.token_hex(4)}",
            model=spec.name,
            prompt=prompt,
            sampling=params,
            max_tokens=max_tokens,
            prompt_ids=ids,
            prompt_tokens=len(ids) if ids is not None else None,
            messages=json.dumps(list(messages), ensure_ascii=False) if messages is not None else None,
            tokens=list(done),
            adapter=adapter,
        )

    async def stream(self, gen: Generation) -> AsyncGenerator[TokenChunk, None]:
        """Run ``gen`` and yield its chunks; the upstream may change under it without a gap or a repeat
        (the loop is `warmstart.scheduler.streams.run_stream`, this router its `StreamHost`)."""
        self.generations[gen.id] = gen
        self.stats.generations += 1
        gen.arrived_s = self._clock()
        self._count_request(gen.model)
        error: BaseException | None = None
        try:
            async with contextlib.aclosing(run_stream(gen, self)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except BaseException as e:
            error = e
            raise
        finally:
            self.metrics.request_done(gen.model, None if gen.finish_reason is not None else error)
            self.generations.pop(gen.id, None)

    # -- StreamHost: what the stream loop asks of the router ------------------------------------------
    async def acquire(self, gen: Generation) -> ServerRuntime:
        """A server with the model loaded and a slot reserved for ``gen``; its upstream stream started."""
        rt = await self._acquire(gen)
        self._start_pump(gen, rt)
        return rt

    def release(self, server: ServerRuntime, gen: Generation) -> None:
        self._release(server, gen)

    async def fail_over(
        self, gen: Generation, server: ServerRuntime | None, error: Exception
    ) -> ServerRuntime:
        return await self._fail_over(gen, server, error)

    def switched(self, gen: Generation, server: ServerRuntime) -> None:
        gen.server = server.name

    def delivered(self, gen: Generation, server: ServerRuntime | None, chunk: TokenChunk) -> None:
        """``chunk`` goes to the client now: record it, and that the instance was used."""
        self._account(gen, chunk)
        if server is not None:
            server.bump()  # its generation's token count is part of its rendered state
        if server is not None and (inst := server.instances.get(gen.model)) is not None:
            inst.last_used_s = self._clock()

    def _account(self, gen: Generation, chunk: TokenChunk) -> None:
        if not gen.tokens and chunk.token_ids:
            self.metrics.first_token(gen.model, gen.server, gen.arrived_s, self._clock())
        gen.tokens.extend(chunk.token_ids)
        gen.text.append(chunk.text)
        if chunk.finish_reason:
            gen.finish_reason = chunk.finish_reason
        if chunk.prompt_tokens is not None:
            gen.prompt_tokens = chunk.prompt_tokens
        if chunk.stop_token_id is not None:
            gen.stop_token_id = chunk.stop_token_id

    async def _fail_over(self, gen: Generation, rt: ServerRuntime | None, error: Exception) -> ServerRuntime:
        """The upstream of ``gen`` failed: give its slot back, mark what failed, and resume the generation
        elsewhere (or on the same server once it answers) from the tokens the client has. Errors that are
        not about the server (a bad request the model refused) end the generation."""
        if not isinstance(error, (UpstreamUnavailable, UpstreamModelMissing)):
            raise error
        gen.failovers += 1
        self.stats.failovers += 1
        self.metrics.failover(rt.name if rt is not None else None)
        if gen.failovers > self.config.max_failovers:
            raise GenerationFailed(
                f"generation {gen.id} failed after {gen.failovers - 1} failovers: {error}"
            ) from error
        logger.warning(
            "generation %s lost its upstream (%s); resuming at token %d", gen.id, error, len(gen.tokens)
        )
        gen.restart(gen.attempt)
        if rt is not None:
            self._release(rt, gen)
            if isinstance(error, UpstreamModelReleased):
                self._drop_released(rt, gen.model)
            elif isinstance(error, UpstreamModelMissing):
                rt.instances.pop(gen.model, None)
                if self.coordinator is not None:  # a record of it loaded there is wrong: take it out
                    self._spawn(self._forget_loaded(rt, gen.model), name=f"forget {rt.name}/{gen.model}")
            else:
                await self._server_suspect(rt)
        await asyncio.sleep(min(0.05 * 2**gen.failovers, 1.0))
        gen.restart(next(self._attempts))
        new_rt = await self._acquire(gen)
        self._start_pump(gen, new_rt)
        return new_rt

    def _start_pump(self, gen: Generation, rt: ServerRuntime) -> None:
        gen.server = rt.name
        gen.pump = self._pump(gen, rt, gen.attempt)

    def _pump(self, gen: Generation, rt: ServerRuntime, attempt: int) -> asyncio.Task[None]:
        """Read attempt ``attempt``'s upstream stream of ``gen`` on ``rt`` into the generation's queue."""

        def learn(n: int, seconds: float) -> None:
            per = seconds / n
            prev = self._token_s.get(gen.model, per)
            self._token_s[gen.model] = 0.9 * prev + 0.1 * per

        return start_pump(
            gen,
            rt.upstream,
            attempt,
            gen.upstream_request(f"{gen.id}.{attempt}"),
            idle_timeout_s=self.config.request_timeout_s,
            spawn=self._spawn,
            on_tokens=learn,
            clock=self._clock,
        )

    # -- live migration ------------------------------------------------------------------------------------
    def _try_migration(self, model: str) -> bool:
        """Start a planned migration that makes room for ``model`` sooner; True while one is under way."""
        if model in self._migrating_for:
            return True
        if not self.config.migration:
            return False
        plan = plan_migration(
            self.snapshot(),
            model,
            replay_s_per_token=self.config.replay_s_per_token,
            threshold_tokens=self.config.migration_threshold_tokens,
            min_gain_s=self.config.migration_min_gain_s,
        )
        if plan is None:
            return False
        logger.info(
            "migrating %s off %s to make room for %s (gain %.2f s)",
            [m.model for m in plan.moves],
            plan.server,
            model,
            plan.gain_s,
        )
        self._migrating_for.add(model)
        self._spawn(self._execute_plan(plan), name=f"migrate for {model}")
        return True

    async def _execute_plan(self, plan: MigrationPlan) -> None:
        try:
            jobs = [
                self.migrate_generation(rid, move.destination)
                for move in plan.moves
                for rid in move.request_ids
                if rid in self.generations
            ]
            for outcome in await asyncio.gather(*jobs, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    logger.warning("planned migration for %s: %s", plan.model, outcome)
        finally:
            self._migrating_for.discard(plan.model)
            self._notify()

    async def _ensure_loaded(self, rt: ServerRuntime, model: str) -> None:
        """Load ``model`` on ``rt`` (evicting idle models if needed) unless it is there; wait for it."""
        if model not in rt.instances and model not in rt.loads:
            state = rt.to_state(self._clock(), self._token_s)
            evictions = choose_evictions(state, self.models[model].memory_bytes, self._clock())
            self._start_load(rt, model, evictions)
        load = rt.loads.get(model)
        if load is not None and load.task is not None:
            await asyncio.shield(load.task)
        if model not in rt.instances:
            raise MigrationDestinationError(f"{model!r} could not be loaded on {rt.name}")

    async def preload(self, server: str, model: str) -> None:
        """Load ``model`` on ``server`` now (admin pre-warming); raises ModelLoadFailed if it fails."""
        self.model_config(model)
        rt = self.servers.get(server)
        if rt is None:
            raise UnknownServerError(f"no server named {server!r}")
        try:
            await self._ensure_loaded(rt, model)
        except MigrationDestinationError as e:
            failed = self._load_errors.get(model)
            raise ModelLoadFailed(str(failed[1]) if failed else str(e)) from e

    async def migrate_generation(self, gen_id: str, destination: str) -> MigrationResult:
        """Move running generation ``gen_id`` to ``destination`` by multi-round replay, then switch."""
        gen = self.generations.get(gen_id)
        if gen is None:
            raise UnknownGenerationError(f"no running generation {gen_id!r}")
        rt = self.servers.get(destination)
        if rt is None:
            raise UnknownServerError(f"no server named {destination!r}")
        if gen.server == destination:
            raise MigrationError(f"generation {gen_id} already runs on {destination}")
        if not rt.healthy:
            raise MigrationDestinationError(f"server {destination} is not healthy")
        await self._ensure_loaded(rt, gen.model)
        if gen.adapter is not None:
            try:
                await self._push_adapters(rt, gen.model)
            except UpstreamError as e:
                raise MigrationDestinationError(
                    f"{destination} cannot serve adapter {gen.adapter!r}: {e}"
                ) from e
        result = await migrate(
            GenerationSource(gen),
            ServerDest(
                gen,
                rt.upstream,
                lambda: self.switch_upstream(gen, rt),
                idle_timeout_s=self.config.request_timeout_s,
            ),
            threshold_tokens=self.config.migration_threshold_tokens,
        )
        self.metrics.migrated(result.outcome.value)
        if result.outcome is MigrationOutcome.SWITCHED:
            self.stats.migrations += 1
        logger.info(
            "migration of %s to %s: %s after %d rounds",
            gen_id,
            destination,
            result.outcome.value,
            result.rounds,
        )
        return result

    def switch_upstream(self, gen: Generation, rt: ServerRuntime) -> None:
        """Reserve a slot for ``gen`` on ``rt``, start its stream there from the client's position, and
        hand it to the generation's loop, which drops the old upstream."""
        inst = rt.instances.get(gen.model)
        if inst is None or not rt.healthy:
            raise MigrationDestinationError(f"{gen.model!r} is not loaded on healthy server {rt.name}")
        inst.requests[gen.id] = gen
        inst.last_used_s = self._clock()
        self._used_adapter(inst, gen)
        self._count_in_use(rt, gen.model)
        attempt = next(self._attempts)
        gen.queue.put_nowait(Switch(attempt, rt, self._pump(gen, rt, attempt)))

    def rendered_config(self, model: ModelConfig) -> Mapping[str, Any]:
        """The Triton config a load of ``model`` sends."""
        return self._render(model)

    def repository_index(self) -> list[dict[str, str]]:
        """A Triton-style index over the deployed models: READY when loaded on a healthy server."""
        out = []
        for name in sorted(self.models):
            state = ""
            if any(rt.healthy and name in rt.instances for rt in self.servers.values()):
                state = "READY"
            elif any(name in rt.loads for rt in self.servers.values()):
                state = "LOADING"
            out.append({"name": name, "version": "1", "state": state, "reason": ""})
        return out

    # -- admin view -----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """A JSON-able view of servers, models, generations and counters (admin API)."""
        return {
            "servers": {
                rt.name: {
                    "healthy": rt.healthy,
                    "reported": rt.bandwidth is not None,
                    "instances": {
                        m: {"requests": len(i.requests), "last_used_s": i.last_used_s}
                        | (
                            {
                                "adapters_served": sorted(i.adapters_served)
                                if i.adapters_served is not None
                                else None,
                                "adapters_resident": list(i.adapters_used),
                            }
                            if m in self.models and self.models[m].lora
                            else {}
                        )
                        for m, i in rt.instances.items()
                    },
                    "loading": sorted(rt.loads),
                    "unloading": sorted(rt.unloading),
                    "store_tiers": {m: t.value for m, t in rt.store_tiers.items()},
                    "load_overhead_s": rt.overhead_s,
                    "learned_bps": {t.value: v for t, v in rt.costs.bps.items()},
                    "unload_s": rt.costs.unload_s,
                    "release_s": rt.costs.release_s,
                }
                for rt in self.servers.values()
            },
            "models": sorted(self.models),
            "adapters": {
                n: sorted(m.adapters) for n, m in sorted(self.models.items()) if m.adapters is not None
            },
            "generations": {
                g.id: {"model": g.model, "adapter": g.adapter, "server": g.server, "tokens": len(g.tokens)}
                for g in self.generations.values()
            },
            "cold_start_waiting": self._waiting,
            "stats": {
                "loads": dict(self.stats.loads),
                "load_failures": self.stats.load_failures,
                "unloads": self.stats.unloads,
                "evictions": self.stats.evictions,
                "releases": self.stats.releases,
                "failovers": self.stats.failovers,
                "migrations": self.stats.migrations,
                "rejected_queue_full": self.stats.rejected_queue_full,
                "rejected_timeout": self.stats.rejected_timeout,
                "generations": self.stats.generations,
            },
            # with other replicas (etcd): this one's shared-allocation call times and claim outcomes
            "replicas": None if self.coordinator is None else self.coordinator.stats.summary(),
        }
