"""The scheduler metrics' pure parts: outcome labels, the time-to-first-token tier, and the load bookkeeping
(what the router reports, read back through the exposition parser). No servers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from warmstart.errors import InvalidModelName
from warmstart.scheduler.config import SchedulerConfig
from warmstart.scheduler.errors import UnknownModelError
from warmstart.scheduler.metrics import outcome_of, ttft_tier
from warmstart.scheduler.protocol import BadRequest
from warmstart.scheduler.router import ColdStartQueueFull, ColdStartTimeout, GenerationFailed, Router
from warmstart.scheduler.upstream import ModelLoadFailed, UpstreamUnavailable


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (None, "ok"),
        (asyncio.CancelledError(), "cancelled"),
        (GeneratorExit(), "cancelled"),
        (ColdStartQueueFull("full"), "queue_full"),
        (ColdStartTimeout("slow"), "cold_start_timeout"),
        (GenerationFailed("lost"), "failed"),
        (ModelLoadFailed("no"), "load_failed"),
        (UnknownModelError("who"), "unknown_model"),
        (BadRequest("bad"), "bad_request"),
        (InvalidModelName("../x"), "bad_request"),
        (ValueError("max_tokens"), "bad_request"),
        (UpstreamUnavailable("down"), "error"),
        (RuntimeError("bug"), "error"),
    ],
)
def test_outcome_label_of_each_way_a_request_ends(error: BaseException | None, outcome: str) -> None:
    assert outcome_of(error) == outcome


def test_first_token_tier_is_the_load_that_finished_after_the_request_arrived() -> None:
    assert ttft_tier(None, 10.0) == "warm"  # never loaded by this router (found READY at start)
    assert ttft_tier(("disk", 9.0), 10.0) == "warm"  # loaded before the request came
    assert ttft_tier(("disk", 12.0), 10.0) == "disk"  # the request waited for it
    assert ttft_tier(("remote", 10.0), 10.0) == "remote"


def _router() -> Router:
    return Router(
        SchedulerConfig.from_dict(
            {
                "servers": [
                    {"name": "s0", "grpc": "127.0.0.1:1", "bandwidth": {"memory_bps": 1e10, "disk_bps": 1e9}}
                ],
                "models": {"m": {"checkpoint": "s3://models/m", "size_bytes": 1}},
            }
        )
    )


def _samples(router: Router) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = router.metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _with_router(check: Callable[[Router], None]) -> None:
    """Run ``check`` on a router built and closed inside a running event loop (its gRPC channels need one;
    an earlier test's ``asyncio.run`` leaves the main thread without a current loop)."""

    async def scenario() -> None:
        router = _router()
        try:
            check(router)
        finally:
            await router.close()

    asyncio.run(scenario())


def test_a_load_that_ends_without_finishing_counts_as_failed_with_its_planned_tier() -> None:
    _with_router(_load_that_ends_without_finishing)


def _load_that_ends_without_finishing(router: Router) -> None:
    metrics = router.metrics
    metrics.load_started("s0", "m", "disk", 2.0, now=100.0)
    metrics.load_ended("s0", "m")
    metrics.load_started("s0", "m", "remote", 3.0, now=200.0)
    metrics.load_finished("s0", "m", "memory", now=204.5)  # the tier the load really read from counts
    metrics.load_ended("s0", "m")
    m = _samples(router)
    loads = {k[1]: v for k, v in m.items() if k[0] == "warmstart_scheduler_loads_total"}
    assert loads == {
        (("result", "failed"), ("server", "s0"), ("tier", "disk")): 1,
        (("result", "ok"), ("server", "s0"), ("tier", "memory")): 1,
    }
    assert m[("warmstart_scheduler_last_load_seconds", (("server", "s0"),))] == 4.5
    assert m[("warmstart_scheduler_last_load_estimate_seconds", (("server", "s0"),))] == 3.0
    assert m[("warmstart_scheduler_load_seconds_sum", (("server", "s0"), ("tier", "memory")))] == 4.5


def test_requests_refused_by_new_generation_are_counted_and_undeployed_names_get_no_label() -> None:
    _with_router(_requests_refused_by_new_generation)


def _requests_refused_by_new_generation(router: Router) -> None:
    with pytest.raises(ValueError):
        router.new_generation("m", "x", {"max_tokens": -1})
    with pytest.raises(UnknownModelError):
        router.new_generation("not-deployed", "x", {})
    router.new_generation("m", "x", {"max_tokens": 2})  # accepted: counted when its stream ends, not here
    requests = {k[1]: v for k, v in _samples(router).items() if k[0] == "warmstart_scheduler_requests_total"}
    assert requests == {
        (("model", "m"), ("outcome", "bad_request")): 1,
        (("model", ""), ("outcome", "unknown_model")): 1,
    }
