"""Table-driven tests of placeability: when no server can ever take a model (and why), the remote bandwidth
assumed for a node store that has not measured its remote tier, repositories in placement, and the
placement log line."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

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
    random_place,
    serverlessllm_place,
)
from warmstart.scheduler.policy import (
    UNMEASURED_REMOTE_BPS,
    Blocker,
    Estimate,
    Placement,
    assumed_remote_bps,
    describe_placement,
    drain_estimate,
    why_unplaceable,
)

GB = 10**9
NOW = 500.0
BW = NodeBandwidth(memory_bps=20e9, disk_bps=2e9, remote_bps=0.5e9)
NO_REMOTE = NodeBandwidth(memory_bps=20e9, disk_bps=2e9, remote_bps=None)
MODELS = [
    ModelSpec("m", "s3://models/m", 2 * GB, "torch", 60.0, 1),
    ModelSpec("x", "s3://x", GB, "torch", 60.0, 1),
]


def server(
    name: str,
    *,
    repository: set[str] | None = None,
    budget: int = 8 * GB,
    freeing: int = 0,
    healthy: bool = True,
    bw: NodeBandwidth = BW,
    tiers: dict[str, Tier] | None = None,
    instances: tuple[Instance, ...] = (),
    loading: tuple[LoadInFlight, ...] = (),
) -> ServerState:
    return ServerState(
        name=name,
        healthy=healthy,
        memory_budget_bytes=budget,
        bandwidth=bw,
        triton_load_overhead_s=0.5,
        instances=instances,
        loading=loading,
        store_tiers=tiers or {},
        repository=frozenset(repository) if repository is not None else None,
        freeing_bytes=freeing,
    )


def snap(*servers: ServerState) -> ClusterSnapshot:
    return ClusterSnapshot.of(servers, MODELS, NOW)


def busy(model: str, size: int) -> Instance:
    return Instance(model, size, NOW, (RunningRequest(f"{model}-r", 10, 5, 3.0),))


# --------------------------------------------------------------------------------------- why_unplaceable


@dataclass(frozen=True)
class Case:
    servers: tuple[ServerState, ...]
    blockers: tuple[Blocker, ...] | None  # None: placeable (now or after waiting)
    final: bool = False
    in_no_repository: bool = False


CASES = {
    "healthy_server_with_the_model_in_its_repository": Case((server("a", repository={"m"}),), None),
    "repository_not_read_yet_does_not_block": Case((server("a"),), None),
    "one_server_lacks_it_another_has_it": Case(
        (server("a", repository={"x"}), server("b", repository={"m"})), None
    ),
    "no_repository_has_it": Case(
        (server("a", repository={"x"}), server("b", repository=set())),
        (Blocker.NOT_IN_REPOSITORY, Blocker.NOT_IN_REPOSITORY),
        final=True,
        in_no_repository=True,
    ),
    "larger_than_every_budget": Case(
        (server("a", budget=GB), server("b", budget=GB)),
        (Blocker.TOO_LARGE, Blocker.TOO_LARGE),
        final=True,
    ),
    "memory_still_being_freed_counts_in_the_budget": Case((server("a", budget=GB, freeing=2 * GB),), None),
    "down_server_may_come_back": Case((server("a", healthy=False),), (Blocker.UNHEALTHY,)),
    "lacking_one_and_down_one_waits": Case(
        (server("a", repository=set()), server("b", healthy=False)),
        (Blocker.NOT_IN_REPOSITORY, Blocker.UNHEALTHY),
    ),
    "no_copy_and_no_remote": Case((server("a", bw=NO_REMOTE),), (Blocker.NO_SOURCE,), final=True),
    "no_remote_but_a_disk_copy": Case((server("a", bw=NO_REMOTE, tiers={"m": Tier.DISK}),), None),
    "mixed_lasting_reasons": Case(
        (server("a", repository=set()), server("b", budget=GB), server("c", bw=NO_REMOTE)),
        (Blocker.NOT_IN_REPOSITORY, Blocker.TOO_LARGE, Blocker.NO_SOURCE),
        final=True,
    ),
    "no_room_now_is_not_a_block": Case((server("a", budget=3 * GB, instances=(busy("x", 2 * GB),)),), None),
    "warm_on_a_healthy_server": Case(
        (server("a", instances=(busy("m", 2 * GB),)), server("b", budget=GB)), None
    ),
    "loading_on_a_healthy_server": Case(
        (server("a", loading=(LoadInFlight("m", 2 * GB, NOW + 1),)), server("b", budget=GB)), None
    ),
    "no_servers_at_all": Case((), (), final=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_why_unplaceable(case: Case) -> None:
    found = why_unplaceable(snap(*case.servers), "m")
    if case.blockers is None:
        assert found is None
        return
    assert found is not None
    assert tuple(b.blocker for b in found.blocks) == case.blockers
    assert [b.server for b in found.blocks] == sorted(s.name for s in case.servers)
    assert found.final is case.final
    assert found.in_no_repository is case.in_no_repository


def test_unplaceable_reason_names_each_server_and_what_it_lacks() -> None:
    found = why_unplaceable(snap(server("a", repository={"x"}), server("b", budget=GB)), "m")
    assert found is not None
    reason = found.reason()
    assert reason.startswith("a: no 'm' in its model repository")
    assert "b: memory budget 1000000000 bytes is smaller than the model's size_bytes 2000000000" in reason
    assert why_unplaceable(snap(), "m") is not None
    assert why_unplaceable(snap(), "m").reason() == "no servers are registered"  # type: ignore[union-attr]


# ------------------------------------------------------------------------------ repositories in placement


def test_place_skips_a_server_whose_repository_lacks_the_model() -> None:
    # a holds m in memory (the cheapest load by far) but its repository has no directory for it
    s = snap(server("a", repository={"x"}, tiers={"m": Tier.MEMORY}), server("b", repository={"m", "x"}))
    for decide in (place, serverlessllm_place, lambda sn, m: random_place(sn, m, random.Random(0))):
        decision = decide(s, "m")
        assert decision.action is Action.LOAD and decision.server == "b", decide


def test_place_queues_when_no_repository_has_the_model() -> None:
    s = snap(server("a", repository={"x"}), server("b", repository=set()))
    assert place(s, "m").action is Action.QUEUE
    assert drain_estimate(s, "m") == math.inf


# ------------------------------------------------------------------------------------ assumed remote figure


@pytest.mark.parametrize(
    ("measured", "expected"),
    [
        ([], UNMEASURED_REMOTE_BPS),
        ([2e8], 2e8),
        ([1e8, 3e8], 2e8),
        ([3e8, 1e8, 2e8], 2e8),
        ([math.nan, 0.0, -1.0, math.inf], UNMEASURED_REMOTE_BPS),
        ([math.nan, 4e8], 4e8),
    ],
)
def test_assumed_remote_bps_is_the_median_of_measured_peers_else_the_prior(
    measured: list[float], expected: float
) -> None:
    assert assumed_remote_bps(measured) == pytest.approx(expected)


def test_a_local_copy_beats_the_assumed_remote_figure() -> None:
    assumed = NodeBandwidth(20e9, 2e9, assumed_remote_bps([]))
    s = snap(server("a", bw=assumed), server("b", bw=assumed, tiers={"m": Tier.DISK}))
    decision = place(s, "m")
    assert decision.server == "b" and decision.estimate is not None and decision.estimate.tier is Tier.DISK


# ------------------------------------------------------------------------------------------- the log line


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        (
            Placement(Action.LOAD, "m", "a", Estimate.of(wait_s=0.25, load_s=1.3, overhead_s=1.0, tier=Tier.REMOTE),
                      ("x", "y"), 0.4),
            "load on a from remote: 2.55 s (wait 0.25 + load 1.30 + overhead 1.00), evicting ['x', 'y'] "
            "(penalty 0.40 s)",
        ),
        (
            Placement(Action.LOAD, "m", "b", Estimate.of(wait_s=0.0, load_s=0.1, overhead_s=0.5, tier=Tier.MEMORY)),
            "load on b from memory: 0.60 s (wait 0.00 + load 0.10 + overhead 0.50), evicting nothing "
            "(penalty 0.00 s)",
        ),
        (
            Placement(Action.ROUTE, "m", "a", Estimate.of(wait_s=0.0, load_s=0.0, overhead_s=0.0, tier=Tier.DISK)),
            "route to a: 0.00 s (wait 0.00 + load 0.00 + overhead 0.00)",
        ),
        (
            Placement(Action.JOIN, "m", "a", Estimate.of(wait_s=0.7, load_s=0.0, overhead_s=0.0, tier=Tier.DISK)),
            "join the load on a: 0.70 s (wait 0.70 + load 0.00 + overhead 0.00)",
        ),
        (Placement(Action.QUEUE, "m", None, None), "queue"),
    ],
)  # fmt: skip
def test_describe_placement(placement: Placement, expected: str) -> None:
    assert describe_placement(placement) == expected
