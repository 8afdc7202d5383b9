"""Table-driven tests of plan_migration: planned only when moving running generations is worth it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from warmstart.scheduler import (
    ClusterSnapshot,
    Instance,
    ModelSpec,
    NodeBandwidth,
    RunningRequest,
    ServerState,
    Tier,
    plan_migration,
)
from warmstart.scheduler.policy import drain_estimate

GB = 10**9
NOW = 500.0
REPLAY = 0.001  # seconds per replayed token
K = 20
BW = NodeBandwidth(memory_bps=20e9, disk_bps=2e9, remote_bps=0.1e9)


def spec(name: str, size: int = 2 * GB, conc: int = 4) -> ModelSpec:
    return ModelSpec(name, f"s3://models/{name}", size, "torch", 60.0, conc)


MODELS = [spec("a"), spec("b"), spec("c", size=GB), spec("d", size=3 * GB)]


def busy(model: str, *tokens: int, size: int = 2 * GB, idle_for: float = 1.0) -> Instance:
    reqs = tuple(RunningRequest(f"{model}-r{k}", 100, t, 10.0) for k, t in enumerate(tokens))
    return Instance(model, size, NOW - idle_for, reqs)


def server(
    name: str,
    *,
    budget: int = 8 * GB,
    tiers: dict[str, Tier] | None = None,
    instances: tuple[Instance, ...] = (),
    bw: NodeBandwidth = BW,
) -> ServerState:
    return ServerState(
        name=name,
        healthy=True,
        memory_budget_bytes=budget,
        bandwidth=bw,
        triton_load_overhead_s=0.5,
        instances=instances,
        store_tiers=tiers or {},
    )


# s1 holds b in memory but is full with a running generation of a; b elsewhere is a 20 s remote load.
S1_FULL = server("s1", budget=2 * GB, tiers={"b": Tier.MEMORY}, instances=(busy("a", 50),))


@dataclass(frozen=True)
class PlanCase:
    servers: tuple[ServerState, ...]
    expect_plan: bool
    destination: str | None = None
    request_ids: tuple[str, ...] = ()


PLAN_CASES = {
    "worth_it_when_destination_loads_fast": PlanCase(
        (S1_FULL, server("s2", tiers={"a": Tier.DISK})), True, "s2", ("a-r0",)
    ),
    "not_when_destination_load_too_slow": PlanCase((S1_FULL, server("s2")), False),
    "moves_every_running_request_of_the_instance": PlanCase(
        (
            server("s1", budget=2 * GB, tiers={"b": Tier.MEMORY}, instances=(busy("a", 5, 80, 300),)),
            server("s2", tiers={"a": Tier.DISK}),
        ),
        True,
        "s2",
        ("a-r0", "a-r1", "a-r2"),
    ),
    "prefers_destination_with_warm_instance_with_room": PlanCase(
        (S1_FULL, server("s2", tiers={"a": Tier.DISK}), server("s3", instances=(busy("a", 10),))),
        True,
        "s3",
        ("a-r0",),
    ),
    "skips_warm_destination_without_room_for_all": PlanCase(
        (
            server("s1", budget=2 * GB, tiers={"b": Tier.MEMORY}, instances=(busy("a", 1, 2),)),
            server("s3", instances=(busy("a", 1, 2, 3),)),
            server("s4"),
        ),
        False,
    ),
    "not_when_idle_eviction_suffices": PlanCase(
        (
            server(
                "s1", budget=2 * GB, tiers={"b": Tier.MEMORY}, instances=(Instance("a", 2 * GB, NOW - 5),)
            ),
            server("s2", tiers={"a": Tier.DISK}),
        ),
        False,
    ),
    "not_when_model_already_warm": PlanCase(
        (S1_FULL, server("s2", tiers={"a": Tier.DISK}, instances=(Instance("b", 2 * GB, NOW - 1),))), False
    ),
    "not_when_replay_of_long_context_too_slow": PlanCase(
        (
            server("s1", budget=2 * GB, tiers={"b": Tier.MEMORY}, instances=(busy("a", 30_000),)),
            server("s2", tiers={"a": Tier.DISK}),
        ),
        False,
    ),
}


@pytest.mark.parametrize("case", PLAN_CASES.values(), ids=PLAN_CASES.keys())
def test_plan_migration_plans_only_when_worth_it_when_target_is_full_of_running_work(case: PlanCase) -> None:
    snap = ClusterSnapshot.of(case.servers, MODELS, NOW)
    plan = plan_migration(snap, "b", replay_s_per_token=REPLAY, threshold_tokens=K)
    if not case.expect_plan:
        assert plan is None
        return
    assert plan is not None
    assert plan.server == "s1" and plan.model == "b"
    assert [(m.model, m.source, m.destination, m.request_ids) for m in plan.moves] == [
        ("a", "s1", case.destination, case.request_ids)
    ]
    assert plan.gain_s > 0 and plan.estimate_s < plan.baseline_s


def test_plan_migration_gain_matches_formula_when_destination_loads_from_disk() -> None:
    snap = ClusterSnapshot.of((S1_FULL, server("s2", tiers={"a": Tier.DISK})), MODELS, NOW)
    plan = plan_migration(snap, "b", replay_s_per_token=REPLAY, threshold_tokens=K)
    assert plan is not None
    move = plan.moves[0]
    assert move.replay_s == pytest.approx(REPLAY * (100 + 50 + K))
    assert move.cost_s == pytest.approx(1.0 + 0.5 + move.replay_s)  # 2 GB from disk at 2 GB/s + overhead
    assert plan.estimate_s == pytest.approx(move.cost_s + 0.1 + 0.5)  # then b from memory + overhead
    assert plan.baseline_s == pytest.approx(20.0 + 0.5)  # b from remote on s2
    assert plan.gain_s == pytest.approx(plan.baseline_s - plan.estimate_s)


def test_plan_migration_baseline_is_the_drain_time_when_placement_can_only_queue() -> None:
    no_remote = NodeBandwidth(memory_bps=20e9, disk_bps=2e9, remote_bps=None)
    snap = ClusterSnapshot.of((S1_FULL, server("s2", tiers={"a": Tier.DISK}, bw=no_remote)), MODELS, NOW)
    plan = plan_migration(snap, "b", replay_s_per_token=REPLAY, threshold_tokens=K)
    assert plan is not None and plan.moves[0].destination == "s2"
    assert plan.baseline_s == pytest.approx(10.0 + 0.1 + 0.5)  # a's request ends, then b from memory on s1
    assert drain_estimate(snap, "b") == plan.baseline_s


def test_plan_migration_waits_instead_when_the_running_generation_ends_before_a_move_would() -> None:
    no_remote = NodeBandwidth(memory_bps=20e9, disk_bps=2e9, remote_bps=None)
    ending = Instance("a", 2 * GB, NOW - 1.0, (RunningRequest("a-r0", 100, 50, 0.2),))
    s1 = server("s1", budget=2 * GB, tiers={"b": Tier.MEMORY}, instances=(ending,))
    snap = ClusterSnapshot.of((s1, server("s2", tiers={"a": Tier.DISK}, bw=no_remote)), MODELS, NOW)
    assert drain_estimate(snap, "b") == pytest.approx(0.2 + 0.1 + 0.5)
    assert plan_migration(snap, "b", replay_s_per_token=REPLAY, threshold_tokens=K) is None


def test_drain_estimate_is_infinite_when_no_budget_can_hold_the_model() -> None:
    snap = ClusterSnapshot.of((server("s1", budget=GB),), MODELS, NOW)
    assert math.isinf(drain_estimate(snap, "b"))


def test_plan_migration_respects_min_gain_when_gain_is_small() -> None:
    snap = ClusterSnapshot.of((S1_FULL, server("s2", tiers={"a": Tier.DISK})), MODELS, NOW)
    assert plan_migration(snap, "b", replay_s_per_token=REPLAY, threshold_tokens=K, min_gain_s=100.0) is None


def test_plan_migration_uses_distinct_destinations_when_several_instances_move() -> None:
    s1 = server(
        "s1",
        budget=3 * GB,
        tiers={"d": Tier.MEMORY},
        instances=(busy("a", 5, size=2 * GB), busy("c", 5, size=GB)),
    )
    s2 = server("s2", budget=2 * GB, tiers={"a": Tier.MEMORY, "c": Tier.MEMORY})
    s3 = server("s3", budget=2 * GB, tiers={"a": Tier.DISK, "c": Tier.DISK})
    snap = ClusterSnapshot.of((s1, s2, s3), MODELS, NOW)
    plan = plan_migration(snap, "d", replay_s_per_token=REPLAY, threshold_tokens=K)
    assert plan is not None
    assert sorted(m.model for m in plan.moves) == ["a", "c"]
    assert len({m.destination for m in plan.moves}) == 2


def test_an_instance_another_replica_also_uses_is_neither_moved_nor_counted_as_draining() -> None:
    # a's request here is this replica's, but another replica's generations use a too (pinned): moving this
    # replica's request would free nothing, and when a's memory frees is the other replica's to know
    pinned = Instance("a", 2 * GB, NOW - 1.0, busy("a", 50).requests, pinned=True)
    full = server("s1", budget=3 * GB, tiers={"b": Tier.MEMORY}, instances=(pinned,))
    snap = ClusterSnapshot.of((full, server("s2", tiers={"a": Tier.DISK})), MODELS, NOW)
    assert plan_migration(snap, "b", replay_s_per_token=REPLAY, threshold_tokens=K) is None
    no_remote = NodeBandwidth(memory_bps=20e9, disk_bps=2e9, remote_bps=None)
    alone = ClusterSnapshot.of((full, server("s2", tiers={"a": Tier.DISK}, bw=no_remote)), MODELS, NOW)
    assert drain_estimate(alone, "b") == math.inf
    unpinned = ClusterSnapshot.of(
        (server("s1", budget=3 * GB, tiers={"b": Tier.MEMORY}, instances=(busy("a", 50),)),), MODELS, NOW
    )
    assert drain_estimate(unpinned, "b") < math.inf  # the same instance unpinned drains
