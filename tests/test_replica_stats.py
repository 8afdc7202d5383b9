"""ReplicaCoordinator's timing of its shared-allocation calls (CoordinatorStats), on the in-memory store."""

from __future__ import annotations

import asyncio

import pytest

from warmstart.scheduler.replicas import ClaimResult, CoordinatorStats, ReplicaCoordinator
from warmstart.scheduler.state import InMemoryClusterState

MB = 10**6


def test_summary_gives_median_p99_and_max_in_ms_over_the_kept_durations() -> None:
    stats = CoordinatorStats(keep=100)
    for i in range(1, 101):  # 1 .. 100 ms
        stats.record("claim", i / 1000, "won")
    ops = stats.summary()["ops"]
    assert ops["claim"]["n"] == 100
    assert ops["claim"]["median_ms"] == pytest.approx(50.5)
    assert ops["claim"]["p99_ms"] == pytest.approx(99.01)
    assert ops["claim"]["max_ms"] == pytest.approx(100.0)
    assert ops["may_unload"] == {"n": 0, "median_ms": None, "p99_ms": None, "max_ms": None, "samples_ms": []}
    assert stats.summary()["outcomes"]["won"] == 100


def test_only_the_last_durations_are_kept_but_every_call_is_counted() -> None:
    stats = CoordinatorStats(keep=3)
    for x in (9.0, 1.0, 2.0, 3.0):
        stats.record("finished", x)
    op = stats.summary()["ops"]["finished"]
    assert op["n"] == 4
    assert op["samples_ms"] == [1000.0, 2000.0, 3000.0]
    assert op["max_ms"] == pytest.approx(3000.0)


def test_unknown_operation_and_bad_keep_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown operation 'load'"):
        CoordinatorStats().record("load", 0.1)
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        CoordinatorStats(keep=0)


def test_two_replicas_claims_are_timed_with_their_outcomes() -> None:
    async def scenario() -> tuple[ReplicaCoordinator, ReplicaCoordinator]:
        store = InMemoryClusterState()
        a = ReplicaCoordinator(store, name="a")
        b = ReplicaCoordinator(store, name="b")
        assert await a.claim("s", "m1", 100 * MB, 250 * MB) is ClaimResult.WON
        assert await b.claim("s", "m1", 100 * MB, 250 * MB) is ClaimResult.JOIN  # a's load in flight
        assert await b.claim("s", "m2", 200 * MB, 250 * MB) is ClaimResult.NO_ROOM  # 100 + 200 > 250
        await a.finished("s", "m1", loaded_bytes=100 * MB)
        assert await b.may_unload("s", "m1") is True  # nobody streams from it
        await a.close()
        await b.close()
        return a, b

    a, b = asyncio.run(scenario())
    sa, sb = a.stats.summary(), b.stats.summary()
    assert sa["ops"]["claim"]["n"] == 1 and sa["outcomes"]["won"] == 1
    assert sa["ops"]["finished"]["n"] == 1
    assert sb["ops"]["claim"]["n"] == 2
    assert sb["outcomes"]["join"] == 1 and sb["outcomes"]["no_room"] == 1 and sb["outcomes"]["won"] == 0
    assert sb["ops"]["may_unload"]["n"] == 1 and sb["outcomes"]["unload_released"] == 1
    # only the winning claim wrote: a join and a NO_ROOM are decided on the read alone
    assert sa["ops"]["claim_cas"]["n"] == 1 and sb["ops"]["claim_cas"]["n"] == 0
    for s in (sa, sb):
        for op in s["ops"].values():
            assert len(op["samples_ms"]) == op["n"]
            assert all(x >= 0 for x in op["samples_ms"])
