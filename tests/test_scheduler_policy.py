"""Table-driven tests of the pure policy: estimates, placement, eviction, keep-alive, baselines."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from warmstart.scheduler import (
    Action,
    CannotFitError,
    ClusterSnapshot,
    Instance,
    InvalidSnapshotError,
    LoadInFlight,
    ModelSpec,
    NodeBandwidth,
    PendingLoad,
    RunningRequest,
    ServerState,
    Tier,
    UnknownModelError,
    UnknownServerError,
    choose_evictions,
    estimate_startup,
    expired_models,
    place,
    random_place,
    serverlessllm_place,
)
from warmstart.scheduler.policy import (
    DEMAND_HALF_LIFE_S,
    LoadCosts,
    decayed_rate,
    effective_bandwidth,
    eviction_penalty_s,
    eviction_s,
    learn_load,
    learn_release,
    learn_unload,
    recall,
    record_arrival,
    victim_weight,
)
from warmstart.scheduler.synthetic import synthetic_cluster

GB = 10**9
NOW = 1000.0
BW = NodeBandwidth(memory_bps=20e9, disk_bps=2e9, remote_bps=0.5e9)


def spec(name: str = "m", size: int = 2 * GB, keep_alive: float = 60.0, conc: int = 4) -> ModelSpec:
    return ModelSpec(name, f"s3://models/{name}", size, "torch", keep_alive, conc)


MODELS = [spec("m"), spec("a"), spec("b"), spec("c"), spec("big", size=10 * GB), spec("solo", conc=1)]


def inst(
    model: str, *, size: int = 2 * GB, idle_for: float = 10.0, running: int = 0, left: float = 5.0
) -> Instance:
    reqs = tuple(RunningRequest(f"{model}-r{k}", 100, 50, left) for k in range(running))
    return Instance(model, size, NOW - idle_for, reqs)


def server(
    name: str,
    *,
    tiers: dict[str, Tier] | None = None,
    bw: NodeBandwidth = BW,
    budget: int = 16 * GB,
    overhead: float = 0.5,
    instances: tuple[Instance, ...] = (),
    loading: tuple[LoadInFlight, ...] = (),
    queue: tuple[PendingLoad, ...] = (),
    healthy: bool = True,
    eviction_s: float = 0.0,
) -> ServerState:
    return ServerState(
        name=name,
        healthy=healthy,
        memory_budget_bytes=budget,
        bandwidth=bw,
        triton_load_overhead_s=overhead,
        instances=instances,
        loading=loading,
        load_queue=queue,
        store_tiers=tiers or {},
        eviction_s=eviction_s,
    )


def snap(*servers: ServerState) -> ClusterSnapshot:
    return ClusterSnapshot.of(servers, MODELS, NOW)


# ------------------------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class EstimateCase:
    server: ServerState
    wait_s: float
    load_s: float
    overhead_s: float
    tier: Tier


ESTIMATE_CASES = {
    "memory_tier": EstimateCase(server("s", tiers={"m": Tier.MEMORY}), 0.0, 2 * GB / 20e9, 0.5, Tier.MEMORY),
    "disk_tier": EstimateCase(server("s", tiers={"m": Tier.DISK}), 0.0, 1.0, 0.5, Tier.DISK),
    "remote_when_not_stored": EstimateCase(server("s"), 0.0, 4.0, 0.5, Tier.REMOTE),
    "remote_tier_entry_uses_remote_bw": EstimateCase(
        server("s", tiers={"m": Tier.REMOTE}), 0.0, 4.0, 0.5, Tier.REMOTE
    ),
    "unreachable_when_no_remote": EstimateCase(
        server("s", bw=NodeBandwidth(20e9, 2e9, None)), 0.0, math.inf, 0.5, Tier.NONE
    ),
    "wait_shares_with_inflight_loads_and_sums_the_queue": EstimateCase(
        # m alone: 1.0 + 0.5 s; a (3 s left) shares the node for those 1.5 s; b and c queued: 4 s
        server(
            "s",
            tiers={"m": Tier.DISK},
            loading=(LoadInFlight("a", GB, NOW + 3.0),),
            queue=(PendingLoad("b", GB, 2.5), PendingLoad("c", GB, 1.5)),
        ),
        5.5,
        1.0,
        0.5,
        Tier.DISK,
    ),
    "an_inflight_load_ending_sooner_delays_by_what_it_has_left": EstimateCase(
        server(
            "s",
            tiers={"m": Tier.DISK},
            loading=(LoadInFlight("a", GB, NOW + 0.25), LoadInFlight("b", GB, NOW + 9.0)),
        ),
        0.25 + 1.5,
        1.0,
        0.5,
        Tier.DISK,
    ),
    "overdue_inflight_counts_zero": EstimateCase(
        server("s", tiers={"m": Tier.DISK}, loading=(LoadInFlight("a", GB, NOW - 5.0),)),
        0.0,
        1.0,
        0.5,
        Tier.DISK,
    ),
    "measured_overhead_used": EstimateCase(
        server("s", tiers={"m": Tier.DISK}, overhead=2.25), 0.0, 1.0, 2.25, Tier.DISK
    ),
    "eviction_adds_measured_eviction_time": EstimateCase(
        server("s", tiers={"m": Tier.DISK}, budget=3 * GB, instances=(inst("a"),), eviction_s=1.25),
        1.25,
        1.0,
        0.5,
        Tier.DISK,
    ),
    "eviction_time_not_counted_when_it_fits": EstimateCase(
        server("s", tiers={"m": Tier.DISK}, budget=4 * GB, instances=(inst("a"),), eviction_s=1.25),
        0.0,
        1.0,
        0.5,
        Tier.DISK,
    ),
    "warm_with_room_is_free": EstimateCase(
        server("s", instances=(inst("m", running=3),)), 0.0, 0.0, 0.0, Tier.REMOTE
    ),
    "warm_full_waits_for_soonest_slot": EstimateCase(
        server("s", instances=(inst("m", running=4, left=7.5),)), 7.5, 0.0, 0.0, Tier.REMOTE
    ),
    "own_load_in_flight_waits_its_remaining": EstimateCase(
        server("s", tiers={"m": Tier.DISK}, loading=(LoadInFlight("m", 2 * GB, NOW + 1.25),)),
        1.25,
        0.0,
        0.0,
        Tier.DISK,
    ),
}


@pytest.mark.parametrize("case", ESTIMATE_CASES.values(), ids=ESTIMATE_CASES.keys())
def test_estimate_startup_sums_measured_components_when_server_state_given(case: EstimateCase) -> None:
    est = estimate_startup(snap(case.server), "s", "m")
    assert (est.wait_s, est.load_s, est.overhead_s, est.tier) == pytest.approx(
        (case.wait_s, case.load_s, case.overhead_s, case.tier)
    )
    assert est.total_s == pytest.approx(case.wait_s + case.load_s + case.overhead_s)


def test_estimate_startup_raises_unknown_when_server_or_model_missing() -> None:
    s = snap(server("s"))
    with pytest.raises(UnknownServerError, match="nope"):
        estimate_startup(s, "nope", "m")
    with pytest.raises(UnknownModelError, match="ghost"):
        estimate_startup(s, "s", "ghost")


# ------------------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class PlaceCase:
    servers: tuple[ServerState, ...]
    action: Action
    server: str | None
    evictions: tuple[str, ...] = ()
    model: str = "m"


SLOW_DISK = NodeBandwidth(memory_bps=20e9, disk_bps=0.2e9, remote_bps=2e9)

PLACE_CASES = {
    "memory_tier_holder_wins": PlaceCase(
        (server("s1"), server("s2", tiers={"m": Tier.MEMORY}), server("s3", tiers={"m": Tier.DISK})),
        Action.LOAD,
        "s2",
    ),
    "warm_instance_beats_memory_holder": PlaceCase(
        (server("s1", instances=(inst("m", running=1),)), server("s2", tiers={"m": Tier.MEMORY})),
        Action.ROUTE,
        "s1",
    ),
    "least_busy_warm_instance_wins": PlaceCase(
        (server("s1", instances=(inst("m", running=3),)), server("s2", instances=(inst("m", running=1),))),
        Action.ROUTE,
        "s2",
    ),
    "fast_remote_beats_slow_measured_disk": PlaceCase(
        (server("s1", tiers={"m": Tier.DISK}, bw=SLOW_DISK), server("s2", bw=SLOW_DISK)), Action.LOAD, "s2"
    ),
    "idle_disk_beats_memory_holder_with_long_queue": PlaceCase(
        (
            server("s1", tiers={"m": Tier.MEMORY}, queue=(PendingLoad("a", GB, 30.0),)),
            server("s2", tiers={"m": Tier.DISK}),
        ),
        Action.LOAD,
        "s2",
    ),
    "memory_holder_wins_when_its_queue_is_short": PlaceCase(
        (
            server("s1", tiers={"m": Tier.MEMORY}, queue=(PendingLoad("a", GB, 0.2),)),
            server("s2", tiers={"m": Tier.DISK}),
        ),
        Action.LOAD,
        "s1",
    ),
    "lower_measured_overhead_breaks_equal_bandwidth": PlaceCase(
        (
            server("s1", tiers={"m": Tier.DISK}, overhead=2.0),
            server("s2", tiers={"m": Tier.DISK}, overhead=0.3),
        ),
        Action.LOAD,
        "s2",
    ),
    "exact_tie_goes_to_first_name": PlaceCase(
        (server("s2", tiers={"m": Tier.DISK}), server("s1", tiers={"m": Tier.DISK})), Action.LOAD, "s1"
    ),
    "unhealthy_memory_holder_skipped": PlaceCase(
        (server("s1", tiers={"m": Tier.MEMORY}, healthy=False), server("s2")), Action.LOAD, "s2"
    ),
    "unhealthy_warm_instance_skipped": PlaceCase(
        (server("s1", instances=(inst("m"),), healthy=False), server("s2")), Action.LOAD, "s2"
    ),
    "joins_load_in_flight_instead_of_faster_new_load": PlaceCase(
        (
            server("s1", loading=(LoadInFlight("m", 2 * GB, NOW + 9.0),)),
            server("s2", tiers={"m": Tier.MEMORY}),
        ),
        Action.JOIN,
        "s1",
    ),
    "joins_queued_load": PlaceCase(
        (server("s1", queue=(PendingLoad("m", 2 * GB, 4.0),)), server("s2", tiers={"m": Tier.MEMORY})),
        Action.JOIN,
        "s1",
    ),
    "evicts_idle_lru_to_fit_memory_holder": PlaceCase(
        (
            server(
                "s1",
                tiers={"m": Tier.MEMORY},
                budget=6 * GB,
                instances=(inst("a", idle_for=5), inst("b", idle_for=500), inst("c", idle_for=50)),
            ),
            server("s2"),
        ),
        Action.LOAD,
        "s1",
        ("b",),
    ),
    "disk_with_room_beats_memory_holder_that_must_unload_first": PlaceCase(
        (
            server("s1", tiers={"m": Tier.MEMORY}, budget=2 * GB, instances=(inst("a"),), eviction_s=1.0),
            server("s2", tiers={"m": Tier.DISK}, bw=NodeBandwidth(20e9, 4e9, 2e9)),
        ),
        Action.LOAD,
        "s2",
    ),
    "memory_holder_that_must_unload_beats_slow_disk_with_room": PlaceCase(
        (
            server(
                "s1",
                tiers={"m": Tier.MEMORY},
                budget=2 * GB,
                instances=(inst("a", idle_for=90),),  # past its keep-alive: evicting it costs nothing later
                eviction_s=1.0,
            ),
            server("s2", tiers={"m": Tier.DISK}, bw=NodeBandwidth(20e9, 1e9, 0.5e9)),
        ),
        Action.LOAD,
        "s1",
        ("a",),
    ),
    "evicting_a_model_still_in_use_costs_its_reload_so_room_elsewhere_wins": PlaceCase(
        (
            # s1: m from memory (0.1 + 0.5 s) but a (idle 10 s of a 60 s keep-alive, no other replica) must go;
            # its next start: back on s1 from disk (1 + 0.5 s) plus evicting m again and m's restart (0.5 s),
            # or on s2 from the remote (4 + 0.5 s). s2 has room and m on disk: 1 + 0.5 s
            server("s1", tiers={"m": Tier.MEMORY, "a": Tier.DISK}, budget=2 * GB, instances=(inst("a"),)),
            server("s2", tiers={"m": Tier.DISK}),
        ),
        Action.LOAD,
        "s2",
    ),
    "a_victim_restarting_here_must_evict_the_new_model_so_room_elsewhere_wins": PlaceCase(
        (
            # a's reload on s1 is cheap (memory: 0.1 + 0.5 s) but m would hold its room: + m's restart 0.5 s;
            # s1 totals 0.6 + 1.1 s against m from s2's disk with room, 1.5 s
            server("s1", tiers={"m": Tier.MEMORY, "a": Tier.MEMORY}, budget=2 * GB, instances=(inst("a"),)),
            server("s2", tiers={"m": Tier.DISK}),
        ),
        Action.LOAD,
        "s2",
    ),
    "a_victim_that_restarts_from_memory_elsewhere_costs_only_that": PlaceCase(
        (
            # as above, but a's next start can be on s3 from its memory tier (0.6 s): s1 totals 1.2 s
            server("s1", tiers={"m": Tier.MEMORY, "a": Tier.DISK}, budget=2 * GB, instances=(inst("a"),)),
            server("s2", tiers={"m": Tier.DISK}),
            server("s3", tiers={"a": Tier.MEMORY}),
        ),
        Action.LOAD,
        "s1",
        ("a",),
    ),
    "evicting_a_model_warm_elsewhere_costs_nothing_later": PlaceCase(
        (
            server("s1", tiers={"m": Tier.MEMORY, "a": Tier.DISK}, budget=2 * GB, instances=(inst("a"),)),
            server("s2", tiers={"m": Tier.DISK}),
            server("s3", budget=2 * GB, instances=(inst("a"),)),
        ),
        Action.LOAD,
        "s1",
        ("a",),
    ),
    "never_evicts_busy_model_goes_elsewhere": PlaceCase(
        (
            server(
                "s1", tiers={"m": Tier.MEMORY}, budget=2 * GB, instances=(inst("a", running=1, idle_for=900),)
            ),
            server("s2"),
        ),
        Action.LOAD,
        "s2",
    ),
    "queues_when_nothing_fits": PlaceCase(
        (server("s1", budget=2 * GB, instances=(inst("a", running=1),)), server("s2", budget=GB)),
        Action.QUEUE,
        None,
    ),
    "queues_when_all_unhealthy": PlaceCase((server("s1", healthy=False),), Action.QUEUE, None),
    "model_larger_than_every_budget_queues": PlaceCase(
        (server("s1", budget=8 * GB),), Action.QUEUE, None, model="big"
    ),
    "unreachable_remote_not_chosen": PlaceCase(
        (server("s1", bw=NodeBandwidth(20e9, 2e9, None)), server("s2", budget=3 * GB)), Action.LOAD, "s2"
    ),
    "busy_instance_wait_beats_slow_load": PlaceCase(
        (server("s1", instances=(inst("solo", running=1, left=0.5),)), server("s2")),
        Action.WAIT,
        "s1",
        model="solo",
    ),
    "slow_busy_instance_loses_to_new_load": PlaceCase(
        (server("s1", instances=(inst("solo", running=1, left=60.0),)), server("s2")),
        Action.LOAD,
        "s2",
        model="solo",
    ),
}


@pytest.mark.parametrize("case", PLACE_CASES.values(), ids=PLACE_CASES.keys())
def test_place_picks_expected_server_when_cluster_in_state(case: PlaceCase) -> None:
    decision = place(snap(*case.servers), case.model)
    assert (decision.action, decision.server, decision.evictions) == (
        case.action,
        case.server,
        case.evictions,
    )
    assert decision.model == case.model


def test_a_load_evicts_the_less_requested_of_two_idle_models() -> None:
    """Two holders of m in memory, each with one idle model that would restart from its disk at the same
    cost: with request counts the load evicts the model requested less; without them it is a tie (name)."""
    servers = (
        server("s1", tiers={"m": Tier.MEMORY, "a": Tier.DISK}, budget=2 * GB, instances=(inst("a"),)),
        server("s2", tiers={"m": Tier.MEMORY, "b": Tier.DISK}, budget=2 * GB, instances=(inst("b"),)),
    )
    assert place(ClusterSnapshot.of(servers, MODELS, NOW), "m").server == "s1"
    demand = {"m": 0.1, "a": 0.5, "b": 0.01}
    decision = place(ClusterSnapshot.of(servers, MODELS, NOW, demand), "m")
    assert (decision.server, decision.evictions) == ("s2", ("b",))
    assert decision.penalty_s < place(ClusterSnapshot.of(servers, MODELS, NOW), "m").penalty_s
    # m asked for for the first time: the mean rate over the models keeps a and b apart
    first = place(ClusterSnapshot.of(servers, MODELS, NOW, {"a": 0.5, "b": 0.01}), "m")
    assert (first.server, first.evictions) == ("s2", ("b",))


def test_evicting_a_model_that_can_restart_nowhere_costs_inf_unless_never_asked_for() -> None:
    offline = NodeBandwidth(memory_bps=20e9, disk_bps=2e9, remote_bps=None)  # no remote, a not stored
    s1 = server("s1", bw=offline, budget=2 * GB, instances=(inst("a"),))
    s2 = server("s2", bw=offline)
    assert eviction_penalty_s(ClusterSnapshot.of((s1, s2), MODELS, NOW), 0, ("a",)) == math.inf
    never = ClusterSnapshot.of((s1, s2), MODELS, NOW, {"m": 0.2})  # a: no requests counted
    assert eviction_penalty_s(never, 0, ("a",), model="m") == 0.0


@pytest.mark.parametrize(
    ("lv", "lm", "mean", "weight"),
    [
        (0.0, 0.0, 0.0, 1.0),
        (0.5, 0.1, 0.1, 1.0),
        (0.1, 0.1, 0.0, 1.0),
        (0.01, 0.1, 0.0, 2 * 0.01 / 0.11),
        (0.0, 0.1, 0.0, 0.0),
        (0.01, 0.0, 0.1, 2 * 0.01 / 0.11),  # a first request: the mean is the reference
        (0.2, 0.0, 0.1, 1.0),
    ],
)
def test_victim_weight_charges_a_victim_by_how_often_it_is_requested(
    lv: float, lm: float, mean: float, weight: float
) -> None:
    assert victim_weight({"v": lv, "m": lm}, "v", "m", mean) == pytest.approx(weight)


def test_recorded_arrivals_at_a_steady_rate_hold_the_rate_near_it_and_decay_after() -> None:
    rate = 0.0
    for _ in range(2000):  # 0.5 requests/s for 4000 s
        rate = record_arrival(rate, 2.0)
    assert rate == pytest.approx(0.5, rel=0.05)
    assert decayed_rate(rate, DEMAND_HALF_LIFE_S) == pytest.approx(rate / 2)
    assert decayed_rate(rate, -1.0) == rate  # a clock step backwards never raises it


def test_place_estimate_matches_estimate_startup_when_loading() -> None:
    s = snap(server("s1", tiers={"m": Tier.DISK}, queue=(PendingLoad("a", GB, 1.0),)), server("s2"))
    decision = place(s, "m")
    assert decision.estimate == estimate_startup(s, "s1", "m")


def test_place_joins_one_load_when_twenty_first_requests_arrive() -> None:
    servers = [server(f"s{i}", tiers={"m": Tier.DISK} if i == 2 else {}) for i in range(3)]
    first = place(snap(*servers), "m")
    assert (first.action, first.server) == (Action.LOAD, "s2")
    # The loop records the load it started; every later request in the same burst sees it.
    servers[2] = server("s2", tiers={"m": Tier.DISK}, loading=(LoadInFlight("m", 2 * GB, NOW + 1.5),))
    after = snap(*servers)
    decisions = [place(after, "m") for _ in range(20)]
    assert {(d.action, d.server) for d in decisions} == {(Action.JOIN, "s2")}
    assert decisions[0].estimate is not None and decisions[0].estimate.total_s == pytest.approx(1.5)


def test_place_raises_unknown_model_when_model_not_in_snapshot() -> None:
    with pytest.raises(UnknownModelError, match="ghost"):
        place(snap(server("s1")), "ghost")


# -------------------------------------------------------------------------------------------- eviction


EVICTION_CASES = {
    "fits_without_eviction": (8 * GB, (inst("a", idle_for=1),), 2 * GB, ()),
    "oldest_idle_first": (
        6 * GB,
        (inst("a", idle_for=5), inst("b", idle_for=500), inst("c", idle_for=50)),
        2 * GB,
        ("b",),
    ),
    "several_in_lru_order": (
        6 * GB,
        (inst("a", idle_for=5), inst("b", idle_for=500), inst("c", idle_for=50)),
        6 * GB,
        ("b", "c", "a"),
    ),
    "skips_busy_even_if_oldest": (
        6 * GB,
        (inst("a", idle_for=5), inst("b", idle_for=900, running=1), inst("c", idle_for=50)),
        4 * GB,
        ("c", "a"),
    ),
    "equal_idle_time_by_name": (4 * GB, (inst("b", idle_for=9), inst("a", idle_for=9)), 2 * GB, ("a",)),
}


@pytest.mark.parametrize(
    ("budget", "instances", "need", "expected"), EVICTION_CASES.values(), ids=EVICTION_CASES.keys()
)
def test_choose_evictions_returns_lru_idle_models_when_memory_short(
    budget: int, instances: tuple[Instance, ...], need: int, expected: tuple[str, ...]
) -> None:
    assert choose_evictions(server("s", budget=budget, instances=instances), need, NOW) == expected


def test_choose_evictions_raises_cannot_fit_when_only_busy_models_hold_memory() -> None:
    s = server("s", budget=4 * GB, instances=(inst("a", running=1), inst("b", idle_for=1)))
    with pytest.raises(CannotFitError, match="cannot free"):
        choose_evictions(s, 3 * GB, NOW)


def test_choose_evictions_counts_loads_in_flight_and_queued_when_computing_free_memory() -> None:
    s = server(
        "s",
        budget=8 * GB,
        instances=(inst("a", idle_for=100),),
        loading=(LoadInFlight("b", 2 * GB, NOW + 1),),
        queue=(PendingLoad("c", 2 * GB, 1.0),),
    )
    assert choose_evictions(s, 3 * GB, NOW) == ("a",)


# ------------------------------------------------------------------------------------------ keep-alive


KEEP_ALIVE_CASES = {
    "idle_past_keep_alive": (server("s", instances=(inst("m", idle_for=61),)), [("s", "m")]),
    "idle_exactly_keep_alive": (server("s", instances=(inst("m", idle_for=60),)), [("s", "m")]),
    "idle_within_keep_alive": (server("s", instances=(inst("m", idle_for=59),)), []),
    "busy_past_keep_alive": (server("s", instances=(inst("m", idle_for=600, running=1),)), []),
    "unknown_model_idle": (server("s", instances=(inst("gone", idle_for=1),)), [("s", "gone")]),
    "unhealthy_server_left_alone": (server("s", instances=(inst("m", idle_for=600),), healthy=False), []),
    "several_sorted": (
        server("s", instances=(inst("b", idle_for=600), inst("a", idle_for=600), inst("c", idle_for=1))),
        [("s", "a"), ("s", "b")],
    ),
}


@pytest.mark.parametrize(("srv", "expected"), KEEP_ALIVE_CASES.values(), ids=KEEP_ALIVE_CASES.keys())
def test_expired_models_lists_idle_instances_when_keep_alive_passed(
    srv: ServerState, expected: list[tuple[str, str]]
) -> None:
    assert expired_models(snap(srv)) == expected


# ------------------------------------------------------------------------------------------- baselines

BASELINE_CASES = {
    # ServerlessLLM skips a server without a local copy and believes its fixed disk figure.
    "remote_tier_matters": (
        (server("s1", tiers={"m": Tier.DISK}, bw=SLOW_DISK), server("s2", bw=SLOW_DISK)),
        "s2",
        "s1",
    ),
    # ServerlessLLM ignores the load queue when the checkpoint is in host memory.
    "queue_matters_for_memory_holder": (
        (
            server("s1", tiers={"m": Tier.MEMORY}, queue=(PendingLoad("a", GB, 30.0),)),
            server("s2", tiers={"m": Tier.DISK}),
        ),
        "s2",
        "s1",
    ),
    "agree_on_plain_memory_holder": (
        (server("s1", tiers={"m": Tier.DISK}), server("s2", tiers={"m": Tier.MEMORY})),
        "s2",
        "s2",
    ),
}


@pytest.mark.parametrize(("servers", "ours", "theirs"), BASELINE_CASES.values(), ids=BASELINE_CASES.keys())
def test_serverlessllm_place_differs_from_place_when_remote_or_queue_matter(
    servers: tuple[ServerState, ...], ours: str, theirs: str
) -> None:
    s = snap(*servers)
    assert place(s, "m").server == ours
    assert serverlessllm_place(s, "m").server == theirs


def test_serverlessllm_place_uses_fixed_bandwidths_when_estimating() -> None:
    s = snap(server("s1", tiers={"m": Tier.MEMORY}, queue=(PendingLoad("a", GB, 30.0),)))
    est = serverlessllm_place(s, "m", pcie_bw=10e9).estimate
    assert est is not None and (est.wait_s, est.load_s, est.overhead_s) == pytest.approx((0.0, 0.2, 0.0))


def test_serverlessllm_place_loads_anywhere_when_no_server_has_local_copy() -> None:
    s = snap(server("s1", queue=(PendingLoad("a", GB, 5.0),)), server("s2"))
    assert (serverlessllm_place(s, "m").action, serverlessllm_place(s, "m").server) == (Action.LOAD, "s2")


@pytest.mark.parametrize("seed", range(5), ids=lambda s: f"seed{s}")
def test_random_place_loads_on_a_fitting_healthy_server_when_cold(seed: int) -> None:
    s = snap(server("s1", healthy=False), server("s2"), server("s3"), server("s4", budget=GB))
    decision = random_place(s, "m", random.Random(seed))
    assert decision.action is Action.LOAD and decision.server in {"s2", "s3"}


def test_random_place_routes_to_warm_instance_when_one_has_room() -> None:
    s = snap(server("s1"), server("s2", instances=(inst("m"),)))
    assert random_place(s, "m", random.Random(0)).server == "s2"


# ------------------------------------------------------------------------------------ snapshot checks


@pytest.mark.parametrize(
    "build",
    [
        lambda: snap(server("s"), server("s")),
        lambda: NodeBandwidth(0.0, 1e9, 1e9),
        lambda: NodeBandwidth(1e9, math.nan, 1e9),
        lambda: spec("x", size=0),
        lambda: spec("x", conc=0),
        lambda: ClusterSnapshot(servers=(), models={"a": spec("b")}, now=NOW),
        lambda: server("s", instances=(inst("a"), inst("a"))),
        lambda: RunningRequest("r", -1, 0, 0.0),
    ],
    ids=[
        "duplicate_server",
        "zero_bandwidth",
        "nan_bandwidth",
        "zero_size",
        "zero_concurrency",
        "model_key_mismatch",
        "model_loaded_twice",
        "negative_tokens",
    ],
)
def test_snapshot_raises_invalid_when_inconsistent(build: object) -> None:
    assert callable(build)
    with pytest.raises(InvalidSnapshotError):
        build()


# ------------------------------------------------------------------------------------- 1000 x 1000


def _reference_place(s: ClusterSnapshot, model: str) -> tuple[float, str] | None:
    """Brute force over estimate_startup, for cold models only: least total among fitting servers."""
    size = s.model(model).size_bytes
    best: tuple[float, str] | None = None
    for srv in s.servers:
        if not srv.healthy or srv.instance(model) is not None:
            continue
        if srv.free_bytes + sum(i.size_bytes for i in srv.instances if i.idle) < size:
            continue
        key = (estimate_startup(s, srv.name, model).total_s, srv.name)
        best = key if best is None or key < best else best
    return best


def test_place_matches_brute_force_when_cluster_has_1000_servers_and_1000_models() -> None:
    s = synthetic_cluster(1000, 1000, seed=7, loaded_per_server=1)  # leaves many models cold
    warm = set(s.index.warm) | set(s.index.in_flight)
    cold = [m for m in s.models if m not in warm][:25]
    assert len(cold) == 25
    for model in cold:
        decision = place(s, model)
        ref = _reference_place(s, model)
        assert ref is not None
        assert (decision.action, decision.server) == (Action.LOAD, ref[1]), model
        assert decision.estimate is not None and decision.estimate.total_s == pytest.approx(ref[0])


def test_place_finds_single_memory_holder_when_cluster_has_1000_servers() -> None:
    base = synthetic_cluster(1000, 1000, seed=3)
    target = "s-00777"
    fresh = spec("fresh", size=4 * GB)
    servers = [
        ServerState(
            name=srv.name,
            healthy=True,
            memory_budget_bytes=srv.memory_budget_bytes,
            bandwidth=srv.bandwidth,
            triton_load_overhead_s=0.5,  # equal overheads: the tier decides
            instances=(),
            store_tiers={**srv.store_tiers, "fresh": Tier.MEMORY if srv.name == target else Tier.DISK},
        )
        for srv in base.servers
    ]
    big = ClusterSnapshot.of(servers, [*base.models.values(), fresh], NOW)
    decision = place(big, "fresh")
    assert (decision.action, decision.server) == (Action.LOAD, target)
    assert decision.estimate is not None and decision.estimate.tier is Tier.MEMORY


def test_place_routes_to_least_busy_instance_when_cluster_has_1000_servers_and_1000_models() -> None:
    s = synthetic_cluster(1000, 1000, seed=11)
    checked = 0
    for model in sorted(s.index.warm):
        conc = s.model(model).max_concurrency
        open_slots = [
            (len(i.requests), srv.name)
            for srv in s.servers
            if srv.healthy and (i := srv.instance(model)) is not None and len(i.requests) < conc
        ]
        if not open_slots:
            continue
        decision = place(s, model)
        assert (decision.action, decision.server) == (Action.ROUTE, min(open_slots)[1]), model
        checked += 1
    assert checked > 100


# ------------------------------------------------------------------------------------- learning from loads


def test_learn_load_updates_overhead_from_memory_loads_and_bandwidth_from_remote_loads() -> None:
    costs = LoadCosts(1.0)
    costs = learn_load(costs, BW, Tier.MEMORY, 2 * GB, 0.1 + 0.4)  # 2 GB at 20 GB/s + 0.4 s overhead
    assert costs.overhead_s == pytest.approx(0.7 * 1.0 + 0.3 * 0.4)
    assert costs.bps == {}
    slow = learn_load(costs, BW, Tier.REMOTE, 2 * GB, costs.overhead_s + 8.0)  # 0.25 GB/s, not 0.5
    assert slow.bps == {Tier.REMOTE: pytest.approx(2 * GB / 8.0)}
    assert slow.overhead_s == costs.overhead_s
    again = learn_load(slow, BW, Tier.REMOTE, 2 * GB, costs.overhead_s + 4.0)
    assert again.bps[Tier.REMOTE] == pytest.approx(0.7 * (2 * GB / 8.0) + 0.3 * (2 * GB / 4.0))


def test_learned_remote_bandwidth_steers_placement_to_a_local_holder_and_fades_toward_the_report() -> None:
    holder = server("s1", tiers={"m": Tier.DISK}, queue=(PendingLoad("a", GB, 4.0),))  # 4 + 1 + 0.5 s
    remote = server("s2")  # 2 GB at the reported 0.5 GB/s + 0.5 s: 4.5 s
    assert place(snap(holder, remote), "m").server == "s2"
    slow = LoadCosts(0.5, {Tier.REMOTE: 0.2e9})  # this server's remote loads ran at 0.2 GB/s: 10.5 s
    learned = server("s2", bw=effective_bandwidth(BW, slow))
    assert place(snap(holder, learned), "m").server == "s1"
    faded = recall(slow, BW)
    assert faded.bps[Tier.REMOTE] == pytest.approx(0.9 * 0.2e9 + 0.1 * 0.5e9)
    assert effective_bandwidth(BW, LoadCosts(0.5)) == BW


def test_learn_unload_moves_the_unload_time_toward_what_unloads_took() -> None:
    costs = learn_unload(LoadCosts(0.5), 2.0)
    assert costs.unload_s == pytest.approx(0.7 * 1.0 + 0.3 * 2.0)
    assert (costs.overhead_s, costs.bps) == (0.5, {})


RELEASE_CASES = {
    # (costs before, releases observed in order (None = failed), release_s after, eviction_s after)
    "no_release_yet_evictions_cost_the_unload": (LoadCosts(0.5, unload_s=1.2), (), None, 1.2),
    "first_release_is_taken_as_measured": (LoadCosts(0.5, unload_s=1.2), (0.04,), 0.04, 0.04),
    "later_releases_move_the_average": (
        LoadCosts(0.5, unload_s=1.2),
        (0.04, 0.14),
        0.7 * 0.04 + 0.3 * 0.14,
        0.7 * 0.04 + 0.3 * 0.14,
    ),
    "a_failed_release_falls_back_to_the_unload": (LoadCosts(0.5, unload_s=1.2), (0.04, None), None, 1.2),
    "a_release_after_a_failure_starts_afresh": (LoadCosts(0.5, unload_s=1.2), (0.04, None, 0.1), 0.1, 0.1),
}


@pytest.mark.parametrize(
    ("costs", "observed", "release_s", "evict_s"), RELEASE_CASES.values(), ids=RELEASE_CASES.keys()
)
def test_learn_release_sets_the_eviction_cost_to_the_release_time_while_releases_work(
    costs: LoadCosts, observed: tuple[float | None, ...], release_s: float | None, evict_s: float
) -> None:
    for elapsed in observed:
        costs = learn_release(costs, elapsed)
    assert costs.release_s == (pytest.approx(release_s) if release_s is not None else None)
    assert eviction_s(costs) == pytest.approx(evict_s)
    assert (costs.overhead_s, costs.unload_s) == (0.5, 1.2)  # a release never changes the other costs


def test_released_evictions_make_a_memory_holder_beat_a_disk_server_with_room() -> None:
    """With a 1 s unload the disk server wins (see PLACE_CASES); once the holder's releases take 50 ms,
    evicting there is cheaper than reading from disk. (``a`` is past its keep-alive: no eviction penalty.)"""
    disk = server("s2", tiers={"m": Tier.DISK}, bw=NodeBandwidth(20e9, 4e9, 2e9))  # 0.5 + 0.5 s
    released = eviction_s(learn_release(LoadCosts(0.5), 0.05))
    expired = (inst("a", idle_for=90),)
    holder = server("s1", tiers={"m": Tier.MEMORY}, budget=2 * GB, instances=expired, eviction_s=released)
    assert place(snap(holder, disk), "m").server == "s1"
    unloading = server("s1", tiers={"m": Tier.MEMORY}, budget=2 * GB, instances=expired, eviction_s=1.0)
    assert place(snap(unloading, disk), "m").server == "s2"


def test_choose_evictions_never_names_an_instance_another_replica_uses() -> None:
    pinned = Instance("a", 2 * GB, NOW - 100, (), pinned=True)  # idle here, used through another replica
    s = server("s", budget=4 * GB, instances=(pinned, inst("b", idle_for=1)))
    assert choose_evictions(s, 2 * GB, NOW) == ("b",)
    with pytest.raises(CannotFitError, match="cannot free"):
        choose_evictions(s, 3 * GB, NOW)
    expired = server("t", instances=(Instance("a", 2 * GB, NOW - 1e6, (), pinned=True),))
    assert expired_models(snap(expired)) == []
