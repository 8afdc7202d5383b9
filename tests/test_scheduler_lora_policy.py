"""Table-driven tests of adapter placement: which warm instance of the base a request on a LoRA adapter goes
to (`place_adapter`), what the adapter's own load is estimated at from the tier it sits in
(`adapter_estimate`), and the adapter slots counted against a server's memory budget (`ModelConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from warmstart.scheduler import (
    Action,
    ClusterSnapshot,
    Instance,
    LoadInFlight,
    ModelSpec,
    NodeBandwidth,
    RunningRequest,
    ServerState,
    Tier,
    place,
)
from warmstart.scheduler.config import DEFAULT_ADAPTER_BYTES, ModelConfig
from warmstart.scheduler.policy import AdapterSpec, AdapterView, adapter_estimate, place_adapter

GB = 10**9
MB = 10**6
NOW = 1000.0
BW = NodeBandwidth(memory_bps=20e9, disk_bps=2e9, remote_bps=0.5e9)
BASE = ModelSpec("base", "s3://models/base", 2 * GB, "torch", 60.0, 4)
SQL = AdapterSpec("sql", "base", "sql-lora", 100 * MB)  # a node-store name: found in store tiers


def inst(running: int = 0, left: float = 5.0) -> Instance:
    reqs = tuple(RunningRequest(f"r{k}", 100, 10, left) for k in range(running))
    return Instance("base", 2 * GB, NOW - 10.0, reqs)


def server(
    name: str,
    *,
    warm: Instance | None = None,
    tiers: dict[str, Tier] | None = None,
    bw: NodeBandwidth = BW,
    healthy: bool = True,
    loading: tuple[LoadInFlight, ...] = (),
) -> ServerState:
    return ServerState(
        name=name,
        healthy=healthy,
        memory_budget_bytes=16 * GB,
        bandwidth=bw,
        triton_load_overhead_s=0.5,
        instances=(warm,) if warm is not None else (),
        loading=loading,
        store_tiers=tiers or {},
    )


def snap(*servers: ServerState) -> ClusterSnapshot:
    return ClusterSnapshot.of(servers, [BASE], NOW)


SERVED = frozenset({"sql", "chat"})


@dataclass(frozen=True)
class RouteCase:
    servers: tuple[ServerState, ...]
    views: dict[str, AdapterView]
    action: Action
    server: str | None
    total_s: float = field(default=0.0)


ROUTE_CASES = {
    # both warm and idle: the one whose instance has the adapter resident, although the other has fewer
    # requests and sorts first
    "resident_beats_fewer_requests": RouteCase(
        (server("a", warm=inst()), server("b", warm=inst(running=2))),
        {"a": AdapterView((), SERVED), "b": AdapterView(("sql",), SERVED)},
        Action.ROUTE,
        "b",
    ),
    # neither has it resident: the adapter's load is cheapest from a memory tier (100 MB at 20 GB/s)
    "cheapest_tier_to_load_the_adapter_from": RouteCase(
        (
            server("a", warm=inst(), tiers={"sql-lora": Tier.DISK}),
            server("b", warm=inst(), tiers={"sql-lora": Tier.MEMORY}),
            server("c", warm=inst()),
        ),
        {n: AdapterView((), SERVED) for n in "abc"},
        Action.ROUTE,
        "b",
        100 * MB / 20e9,
    ),
    # the store lists it under the adapter's own name
    "tier_found_by_the_adapters_name": RouteCase(
        (server("a", warm=inst()), server("b", warm=inst(), tiers={"sql": Tier.DISK})),
        {n: AdapterView((), SERVED) for n in "ab"},
        Action.ROUTE,
        "b",
        100 * MB / 2e9,
    ),
    # every slot of a's instance is held by running requests on other adapters: it waits for the soonest
    # of them (3 s) there, so b, loading from remote (0.2 s), wins
    "all_slots_held_waits_for_the_soonest_end": RouteCase(
        (server("a", warm=inst(running=2), tiers={"sql-lora": Tier.MEMORY}), server("b", warm=inst())),
        {
            "a": AdapterView(("chat", "fr"), SERVED, {"chat": 3.0, "fr": 7.0}, max_loras=2),
            "b": AdapterView((), SERVED),
        },
        Action.ROUTE,
        "b",
        100 * MB / 0.5e9,
    ),
    # slots full but one holds an idle adapter: the backend evicts it, no wait
    "a_full_slot_table_with_an_idle_adapter_does_not_wait": RouteCase(
        (server("a", warm=inst(), tiers={"sql-lora": Tier.MEMORY}), server("b", warm=inst())),
        {"a": AdapterView(("chat", "fr"), SERVED, {"chat": 3.0}, max_loras=2), "b": AdapterView((), SERVED)},
        Action.ROUTE,
        "a",
        100 * MB / 20e9,
    ),
    # same cost: the instance known to list the adapter in its multi_lora.json first
    "known_to_serve_it_breaks_a_tie": RouteCase(
        (server("a", warm=inst()), server("b", warm=inst())),
        {"a": AdapterView((), None), "b": AdapterView((), SERVED)},
        Action.ROUTE,
        "b",
        100 * MB / 0.5e9,
    ),
    # no warm instance with room anywhere: the base's own decision stands (here: join the load on b),
    # its estimate with the adapter's load from b's tier added
    "no_warm_instance_keeps_the_bases_decision": RouteCase(
        (
            server("a"),
            server("b", loading=(LoadInFlight("base", 2 * GB, NOW + 2.0),), tiers={"sql": Tier.DISK}),
        ),
        {},
        Action.JOIN,
        "b",
        2.0 + 100 * MB / 2e9,
    ),
    # a full instance is not a route target, a down server neither
    "full_or_down_instances_are_skipped": RouteCase(
        (
            server("a", warm=inst(running=4)),
            server("b", warm=inst(), healthy=False),
            server("c", warm=inst()),
        ),
        {n: AdapterView(("sql",), SERVED) for n in "ab"} | {"c": AdapterView((), SERVED)},
        Action.ROUTE,
        "c",
        100 * MB / 0.5e9,
    ),
}


@pytest.mark.parametrize("case", ROUTE_CASES.values(), ids=ROUTE_CASES.keys())
def test_an_adapter_request_goes_where_its_base_is_warm_and_its_adapter_starts_soonest(
    case: RouteCase,
) -> None:
    s = snap(*case.servers)
    placement = place_adapter(s, SQL, case.views, place(s, "base"))
    assert (placement.action, placement.server) == (case.action, case.server)
    assert placement.estimate is not None
    assert placement.estimate.total_s == pytest.approx(case.total_s)


def test_a_cold_base_is_loaded_where_the_base_rule_says_and_the_adapters_load_is_added() -> None:
    s = snap(server("a", tiers={"base": Tier.MEMORY}), server("b", tiers={"sql-lora": Tier.MEMORY}))
    base = place(s, "base")
    placement = place_adapter(s, SQL, {}, base)
    assert (placement.action, placement.server) == (Action.LOAD, "a")
    assert base.estimate is not None and placement.estimate is not None
    assert placement.estimate.total_s == pytest.approx(base.estimate.total_s + 100 * MB / 0.5e9)
    assert placement.evictions == base.evictions


def test_a_request_that_can_only_queue_still_queues() -> None:
    s = snap(server("a", healthy=False))
    assert place_adapter(s, SQL, {}, place(s, "base")).action is Action.QUEUE


ESTIMATES = {
    "resident": (AdapterView(("sql",)), {}, 0.0, Tier.REMOTE),
    "memory_tier": (AdapterView(), {"sql-lora": Tier.MEMORY}, 100 * MB / 20e9, Tier.MEMORY),
    "disk_tier": (AdapterView(), {"sql-lora": Tier.DISK}, 100 * MB / 2e9, Tier.DISK),
    "remote": (AdapterView(), {}, 100 * MB / 0.5e9, Tier.REMOTE),
    "slots_held": (
        AdapterView(("x",), busy_s={"x": 4.0}, max_loras=1),
        {},
        4.0 + 100 * MB / 0.5e9,
        Tier.REMOTE,
    ),
}


@pytest.mark.parametrize("view,tiers,total,tier", ESTIMATES.values(), ids=ESTIMATES.keys())
def test_an_adapters_own_load_is_estimated_from_the_tier_it_sits_in(
    view: AdapterView, tiers: dict[str, Tier], total: float, tier: Tier
) -> None:
    est = adapter_estimate(server("s", warm=inst(), tiers=tiers), SQL, view)
    assert est.total_s == pytest.approx(total)
    assert est.tier is tier


def test_an_adapter_no_source_can_provide_is_never_ready() -> None:
    s = server("s", warm=inst(), bw=NodeBandwidth(20e9, 2e9, None))
    est = adapter_estimate(s, SQL, AdapterView())
    assert est.tier is Tier.NONE and math.isinf(est.total_s)


MEMORY = {
    "no_adapters_no_lora": ({}, 2 * GB),
    "empty_adapters_default_slots": (
        {"adapters": {}},
        2 * GB + 4 * DEFAULT_ADAPTER_BYTES,
    ),
    "max_loras_times_the_largest": (
        {"adapters": {"a": {"checkpoint": "/a", "size_bytes": 10 * MB}, "b": "/b"}, "max_loras": 2},
        2 * GB + 2 * max(10 * MB, DEFAULT_ADAPTER_BYTES),
    ),
    "given_slot_memory": ({"adapters": {"a": "/a"}, "lora_memory_bytes": 123}, 2 * GB + 123),
}


@pytest.mark.parametrize("extra,memory", MEMORY.values(), ids=MEMORY.keys())
def test_adapter_slots_count_against_the_memory_budget(extra: dict[str, object], memory: int) -> None:
    model = ModelConfig.from_dict("base", {"checkpoint": "/base", "size_bytes": 2 * GB, **extra})
    assert model.memory_bytes == memory
    assert model.to_spec().size_bytes == memory  # what placement fits into budgets
    assert model.size_bytes == 2 * GB  # what a load reads from its tier
