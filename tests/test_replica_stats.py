"""ReplicaCoordinator's timing of its shared-allocation calls (CoordinatorStats), on the in-memory store; and
its optimistic claim (decided on the cached view, one compare-and-set) on both stores, counting the calls
that reach the real store."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import pytest

from warmstart.etcd import Etcd
from warmstart.scheduler.etcd_state import EtcdClusterState
from warmstart.scheduler.replicas import ClaimResult, CoordinatorStats, ReplicaCoordinator
from warmstart.scheduler.state import ClusterStateStore, InMemoryClusterState, LoadClaim

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


# --- the optimistic claim: decided on the cached view, one compare-and-set -------------------------------


class CountingStore:
    """The real store under test, with a count of every call made through it (nothing else changed)."""

    def __init__(self, inner: ClusterStateStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.order: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            self.order.append(name)
            return attr(*args, **kwargs)

        return counted


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.etcd)])
def store(request: pytest.FixtureRequest) -> Iterator[ClusterStateStore]:
    if request.param == "memory":
        yield InMemoryClusterState()
        return
    etcd: Etcd = request.getfixturevalue("etcd")
    real = EtcdClusterState(etcd.url, prefix=f"/test-{uuid.uuid4().hex}/")
    try:
        yield real
    finally:
        real.close()


def _coordinator(store: ClusterStateStore, name: str) -> tuple[ReplicaCoordinator, CountingStore]:
    counting = CountingStore(store)
    return ReplicaCoordinator(cast(ClusterStateStore, counting), name=name, optimistic=True), counting


def test_a_claim_on_a_fresh_cached_view_is_one_write_and_no_read(store: ClusterStateStore) -> None:
    async def scenario() -> tuple[list[ClaimResult], list[str], ReplicaCoordinator]:
        a, counting = _coordinator(store, "a")
        await a.keep_alive()  # its lease, taken by its first round
        await a.refresh("s")  # the round's read: the cached view
        other = store.grant_lease(30)
        store.set_in_use("s", "m0", "b", 1, lease=other)  # b's generations start and end meanwhile
        store.set_in_use("s", "m0", "b", 0, lease=other)
        counting.order.clear()
        results = []
        for model in ("m1", "m2"):  # the second on the view the first left (or its background read)
            results.append(await a.claim("s", model, 100 * MB, 1000 * MB))
            await a.settle()  # the read a won claim starts in the background, off the decision's path
        order = list(counting.order)
        await a.close()
        store.revoke_lease(other)
        return results, order, a

    results, order, a = asyncio.run(scenario())
    assert results == [ClaimResult.WON, ClaimResult.WON]
    # each decision is one compare-and-set with no read before it; the view is read again after it
    assert order == ["claim_load", "allocation", "claim_load", "allocation"]
    ops = a.stats.summary()["ops"]
    assert ops["claim"]["n"] == 2 and ops["claim_cas"]["n"] == 2


def test_by_default_a_claim_reads_the_allocation_before_its_compare_and_set(store: ClusterStateStore) -> None:
    async def scenario() -> tuple[ClaimResult, list[str]]:
        counting = CountingStore(store)
        a = ReplicaCoordinator(cast(ClusterStateStore, counting), name="a")
        await a.keep_alive()
        await a.refresh("s")  # a cached view, not used for the decision
        counting.order.clear()
        result = await a.claim("s", "m1", 100 * MB, 1000 * MB)
        await a.settle()
        order = list(counting.order)
        await a.close()
        return result, order

    result, order = asyncio.run(scenario())
    assert result is ClaimResult.WON
    assert order == ["allocation", "claim_load", "allocation"]  # read, compare-and-set, background read


def test_a_claim_on_a_stale_view_joins_the_load_another_replica_claimed_since(
    store: ClusterStateStore,
) -> None:
    async def scenario() -> tuple[ClaimResult, Counter[str], dict[str, Any]]:
        a, counting = _coordinator(store, "a")
        b = ReplicaCoordinator(store, name="b")
        await a.keep_alive()
        await a.refresh("s")  # a's view: nothing on s
        assert await b.claim("s", "m1", 100 * MB, 1000 * MB) is ClaimResult.WON  # b wrote since
        counting.calls.clear()
        result = await a.claim("s", "m1", 100 * MB, 1000 * MB)
        calls = Counter(counting.calls)
        loads = dict(store.allocation("s").loads)
        await a.close()
        await b.close()
        return result, calls, loads

    result, calls, loads = asyncio.run(scenario())
    assert result is ClaimResult.JOIN  # never a second load of m1
    assert loads == {"m1": LoadClaim("b", 100 * MB)}
    assert calls == Counter({"claim_load": 1, "allocation": 1})  # the stale compare-and-set lost, then read


def test_a_claim_on_a_stale_view_wins_when_another_replica_claimed_another_model_since(
    store: ClusterStateStore,
) -> None:
    async def scenario() -> tuple[ClaimResult, ClaimResult, dict[str, Any]]:
        a = ReplicaCoordinator(store, name="a", optimistic=True)
        b = ReplicaCoordinator(store, name="b")
        await a.refresh("s")
        assert await b.claim("s", "m2", 100 * MB, 250 * MB) is ClaimResult.WON
        won = await a.claim("s", "m1", 100 * MB, 250 * MB)  # 200 of 250: fits with b's claim
        await a.refresh("s")
        assert await b.claim("s", "m3", 10 * MB, 250 * MB) is ClaimResult.WON  # b writes again
        full = await a.claim("s", "m4", 100 * MB, 250 * MB)  # a's view: 200 committed; now 210 + 100 > 250
        loads = dict(store.allocation("s").loads)
        await a.close()
        await b.close()
        return won, full, loads

    won, full, loads = asyncio.run(scenario())
    assert won is ClaimResult.WON and full is ClaimResult.NO_ROOM
    assert loads == {
        "m1": LoadClaim("a", 100 * MB),
        "m2": LoadClaim("b", 100 * MB),
        "m3": LoadClaim("b", 10 * MB),
    }


def test_a_cached_view_that_answers_join_or_no_room_is_read_again_first(store: ClusterStateStore) -> None:
    async def scenario() -> tuple[ClaimResult, ClaimResult, Counter[str]]:
        a, counting = _coordinator(store, "a")
        b = ReplicaCoordinator(store, name="b")
        await a.keep_alive()
        for server in ("s", "t"):
            assert await b.claim(server, "m1", 200 * MB, 250 * MB) is ClaimResult.WON
            await a.refresh(server)  # a's view: b loads m1 there (200 of 250 MB)
            await b.finished(server, "m1", loaded_bytes=None)  # b's load failed: nothing there now
        counting.calls.clear()
        joined = await a.claim("s", "m1", 200 * MB, 250 * MB)  # the cached view says JOIN
        await a.settle()
        no_room = await a.claim("t", "m2", 100 * MB, 250 * MB)  # the cached view says 200 + 100 > 250
        await a.settle()
        calls = Counter(counting.calls)
        await a.close()
        await b.close()
        return joined, no_room, calls

    joined, no_room, calls = asyncio.run(scenario())
    assert joined is ClaimResult.WON  # read again: b's claim is gone, a loads m1 itself
    assert no_room is ClaimResult.WON  # read again: the room b's claim took is free
    # one read and one write each, and the background read after each won claim
    assert calls == Counter({"allocation": 4, "claim_load": 2})
