"""Prometheus metrics of the scheduler (``GET /metrics`` on its HTTP port).

One :class:`SchedulerMetrics` per router, each with its own ``CollectorRegistry`` (several schedulers can
run in one process). The router calls a method where each event happens; gauges of live state (queue
depth, healthy servers, loads in flight) are read from the router when scraped.

Counters and histograms (names as exposed; counters end in ``_total``):

* ``warmstart_scheduler_requests_total{model, outcome}``: generation requests by how they ended (outcome:
  ``ok``, ``bad_request``, ``unknown_model``, ``queue_full``, ``cold_start_timeout``, ``load_failed``,
  ``failed``, ``not_found``, ``unavailable``, ``cancelled``, ``error``). ``model`` is empty for a name that
  is not deployed.
* ``warmstart_scheduler_time_to_first_token_seconds{model, tier}`` (histogram): request arrival at the
  router to its first token. ``tier`` is where the weights of the load the request waited for came from
  (``memory``, ``disk``, ``remote``), or ``warm`` when the model was already loaded when it arrived.
* ``warmstart_scheduler_loads_total{server, tier, result}``: loads started by the router, ``result`` ``ok``
  or ``failed``.
* ``warmstart_scheduler_load_seconds{server, tier}`` and ``warmstart_scheduler_load_estimate_seconds{server,
  tier}`` (histograms): how long each successful load took, from the decision (evictions included) to the
  model being ready, and what the policy estimated for it when it decided. ``…_last_load_seconds{server}``
  and ``…_last_load_estimate_seconds{server}`` (gauges) hold the latest pair.
* ``warmstart_scheduler_evictions_total{server}``, ``warmstart_scheduler_releases_total{server, result}``,
  ``warmstart_scheduler_unloads_total{server, result}``, ``warmstart_scheduler_failovers_total{server}``
  (the server the generation lost), ``warmstart_scheduler_migrations_total{outcome}``.
* ``warmstart_scheduler_http_responses_total{route, code}``: every answer of the HTTP front end, by route
  template (``unmatched`` for paths no route takes), so a 5xx shows whatever its cause.

Gauges read at scrape time: ``warmstart_scheduler_cold_start_queue_depth``,
``warmstart_scheduler_cold_start_queue_capacity``, ``warmstart_scheduler_generations_running``,
``warmstart_scheduler_server_healthy{server}``, ``warmstart_scheduler_models_loaded{server}``,
``warmstart_scheduler_loads_in_flight{server}``.

Label values are bounded: model names only of deployed models, server names from the config, routes
from the route table.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

__all__ = [
    "LOAD_BUCKETS",
    "TTFT_BUCKETS",
    "RouterView",
    "SchedulerMetrics",
    "counts_rejections",
    "metrics_endpoint",
    "outcome_of",
    "response_counter",
    "ttft_tier",
]

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
WARM = "warm"

P = ParamSpec("P")
R = TypeVar("R")


class _ServerView(Protocol):
    @property
    def healthy(self) -> bool: ...
    @property
    def instances(self) -> Mapping[str, object]: ...
    @property
    def loads(self) -> Mapping[str, object]: ...


class RouterView(Protocol):
    """What the scrape-time gauges read from the router."""

    @property
    def servers(self) -> Mapping[str, _ServerView]: ...
    @property
    def generations(self) -> Mapping[str, object]: ...
    @property
    def models(self) -> Mapping[str, object]: ...
    @property
    def cold_start_waiting(self) -> int: ...


def outcome_of(error: BaseException | None) -> str:
    """The ``outcome`` label of a request that ended with ``error`` (None: it completed)."""
    if error is None:
        return "ok"
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"  # the client went away (or the scheduler stopped) before the last token
    # imported here: the router imports this module
    from warmstart.scheduler.errors import UnknownModelError
    from warmstart.scheduler.protocol import status_of
    from warmstart.scheduler.router import ColdStartQueueFull, ColdStartTimeout, GenerationFailed
    from warmstart.scheduler.upstream import ModelLoadFailed

    named: tuple[tuple[type[BaseException], str], ...] = (
        (ColdStartQueueFull, "queue_full"),
        (ColdStartTimeout, "cold_start_timeout"),
        (GenerationFailed, "failed"),
        (ModelLoadFailed, "load_failed"),
        (UnknownModelError, "unknown_model"),
    )
    for cls, outcome in named:
        if isinstance(error, cls):
            return outcome
    http = status_of(error).http
    if http == 404:
        return "not_found"  # a deployed model no server can serve (e.g. in no server's repository)
    if 400 <= http < 500:
        return "bad_request"
    if http == 503:
        return "unavailable"
    return "error"


def ttft_tier(last_load: tuple[str, float] | None, arrived_s: float) -> str:
    """The tier a request's first token waited for: that of the load of its instance that finished after
    the request arrived, else ``warm`` (``last_load`` is (tier, finished at) of the instance's load)."""
    if last_load is None or last_load[1] < arrived_s:
        return WARM
    return last_load[0]


def counts_rejections(
    fn: Callable[Concatenate[Any, str, P], R],
) -> Callable[Concatenate[Any, str, P], R]:
    """Decorates ``Router.new_generation``: a request refused there (unknown model, bad sampling values)
    is counted in ``requests_total`` by its outcome before the error goes to the front end."""

    @functools.wraps(fn)
    def wrapper(self: Any, model: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(self, model, *args, **kwargs)
        except Exception as e:
            self.metrics.request_done(model, e)
            raise

    return wrapper


class _LiveGauges:
    """A collector of the router's live state, read when scraped."""

    def __init__(self, view: RouterView, queue_capacity: int) -> None:
        self._view = view
        self._capacity = queue_capacity

    def collect(self) -> Iterator[Metric]:
        view = self._view
        yield GaugeMetricFamily(
            "warmstart_scheduler_cold_start_queue_depth",
            "Requests waiting for a model to be loaded (or for a slot) right now",
            value=view.cold_start_waiting,
        )
        yield GaugeMetricFamily(
            "warmstart_scheduler_cold_start_queue_capacity",
            "Most requests the cold-start queue holds (cold_start_queue); more are refused with 503",
            value=self._capacity,
        )
        yield GaugeMetricFamily(
            "warmstart_scheduler_generations_running",
            "Generations the scheduler is serving (waiting or streaming)",
            value=len(view.generations),
        )
        servers = dict(view.servers)
        healthy = GaugeMetricFamily(
            "warmstart_scheduler_server_healthy", "1 if the server takes traffic, else 0", labels=["server"]
        )
        loaded = GaugeMetricFamily(
            "warmstart_scheduler_models_loaded", "Models loaded and routable on the server", labels=["server"]
        )
        loading = GaugeMetricFamily(
            "warmstart_scheduler_loads_in_flight", "Loads running on the server", labels=["server"]
        )
        for name, rt in servers.items():
            healthy.add_metric([name], 1.0 if rt.healthy else 0.0)
            loaded.add_metric([name], len(rt.instances))
            loading.add_metric([name], len(rt.loads))
        yield healthy
        yield loaded
        yield loading


class SchedulerMetrics:
    """The scheduler's metric objects, in a registry of their own; the router reports events here."""

    def __init__(self, view: RouterView, *, queue_capacity: int) -> None:
        self._view = view
        self.registry = CollectorRegistry()
        reg = self.registry
        self._requests = Counter(
            "warmstart_scheduler_requests",
            "Generation requests by model and how they ended",
            ["model", "outcome"],
            registry=reg,
        )
        self._ttft = Histogram(
            "warmstart_scheduler_time_to_first_token_seconds",
            "Request arrival at the router to its first token, by the tier its load came from (warm: none)",
            ["model", "tier"],
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self._loads = Counter(
            "warmstart_scheduler_loads",
            "Loads started by the router",
            ["server", "tier", "result"],
            registry=reg,
        )
        self._load_s = Histogram(
            "warmstart_scheduler_load_seconds",
            "Seconds from the decision to load (evictions included) to the model being ready",
            ["server", "tier"],
            buckets=LOAD_BUCKETS,
            registry=reg,
        )
        self._estimate_s = Histogram(
            "warmstart_scheduler_load_estimate_seconds",
            "Seconds the policy estimated for each successful load when it decided it",
            ["server", "tier"],
            buckets=LOAD_BUCKETS,
            registry=reg,
        )
        self._last_load = Gauge(
            "warmstart_scheduler_last_load_seconds", "Seconds the latest load took", ["server"], registry=reg
        )
        self._last_estimate = Gauge(
            "warmstart_scheduler_last_load_estimate_seconds",
            "Seconds the policy estimated for the latest load",
            ["server"],
            registry=reg,
        )
        self._evictions = Counter(
            "warmstart_scheduler_evictions",
            "Models evicted to make room for a load",
            ["server"],
            registry=reg,
        )
        self._releases = Counter(
            "warmstart_scheduler_releases",
            "Engine releases before an unload (failed: the unload was waited for instead)",
            ["server", "result"],
            registry=reg,
        )
        self._unloads = Counter(
            "warmstart_scheduler_unloads", "Triton unloads", ["server", "result"], registry=reg
        )
        self._failovers = Counter(
            "warmstart_scheduler_failovers",
            "Generations resumed elsewhere, by the server they lost",
            ["server"],
            registry=reg,
        )
        self._migrations = Counter(
            "warmstart_scheduler_migrations", "Live migrations by outcome", ["outcome"], registry=reg
        )
        self._http = Counter(
            "warmstart_scheduler_http_responses",
            "HTTP front-end answers by route template and status code",
            ["route", "code"],
            registry=reg,
        )
        reg.register(_LiveGauges(view, queue_capacity))
        self._pending: dict[tuple[str, str], tuple[str, float, float]] = {}  # (tier, estimate, started)
        self._last: dict[tuple[str, str], tuple[str, float]] = {}  # (server, model) -> (tier, finished)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return bytes(generate_latest(self.registry))

    # -- requests ---------------------------------------------------------------------------------------
    def request_done(self, model: str, error: BaseException | None) -> None:
        """A request ended (``error`` None: completed)."""
        label = model if model in self._view.models else ""
        self._requests.labels(label, outcome_of(error)).inc()

    def first_token(self, model: str, server: str | None, arrived_s: float, now: float) -> None:
        """A request's first token reached the router."""
        tier = ttft_tier(self._last.get((server, model)) if server is not None else None, arrived_s)
        self._ttft.labels(model, tier).observe(max(0.0, now - arrived_s))

    def http_response(self, route: str, code: int) -> None:
        self._http.labels(route, str(code)).inc()

    # -- loads and unloads ------------------------------------------------------------------------------
    def load_started(self, server: str, model: str, tier: str, estimate_s: float, now: float) -> None:
        self._pending[(server, model)] = (tier, estimate_s, now)

    def load_finished(self, server: str, model: str, tier: str, now: float) -> None:
        """The load of ``model`` on ``server`` succeeded, its weights coming from ``tier``."""
        _, estimate, started = self._pending.pop((server, model), (tier, 0.0, now))
        actual = max(0.0, now - started)
        self._loads.labels(server, tier, "ok").inc()
        self._load_s.labels(server, tier).observe(actual)
        self._estimate_s.labels(server, tier).observe(estimate)
        self._last_load.labels(server).set(actual)
        self._last_estimate.labels(server).set(estimate)
        self._last[(server, model)] = (tier, now)

    def load_ended(self, server: str, model: str) -> None:
        """The load's task ended; if :meth:`load_finished` was not called, the load failed."""
        pending = self._pending.pop((server, model), None)
        if pending is not None:
            self._loads.labels(server, pending[0], "failed").inc()

    def evicted(self, server: str) -> None:
        self._evictions.labels(server).inc()

    def released(self, server: str, ok: bool) -> None:
        self._releases.labels(server, "ok" if ok else "failed").inc()

    def unloaded(self, server: str, ok: bool) -> None:
        self._unloads.labels(server, "ok" if ok else "failed").inc()

    def failover(self, server: str | None) -> None:
        self._failovers.labels(server or "").inc()

    def migrated(self, outcome: str) -> None:
        self._migrations.labels(outcome).inc()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def response_counter(metrics: SchedulerMetrics) -> Middleware:
    """An aiohttp middleware (put it first, outermost) counting every answer in ``http_responses_total``."""

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            metrics.http_response(route, e.status)
            raise
        except asyncio.CancelledError:
            raise  # the client went away: no answer was sent
        except Exception:
            metrics.http_response(route, 500)  # aiohttp answers an escaped exception with a 500
            raise
        metrics.http_response(route, resp.status)
        return resp

    return count


async def metrics_endpoint(metrics: SchedulerMetrics) -> web.Response:
    """The ``GET /metrics`` answer."""
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
