"""The snapshot index built from the previous snapshot's equals one built afresh, whatever changed."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from warmstart.scheduler import (
    ClusterSnapshot,
    Instance,
    LoadInFlight,
    ModelSpec,
    NodeBandwidth,
    PendingLoad,
    RunningRequest,
    ServerState,
    Tier,
)
from warmstart.scheduler.errors import InvalidSnapshotError
from warmstart.scheduler.policy import place
from warmstart.scheduler.state import SnapshotIndex

GB = 10**9
MODELS = [ModelSpec(f"m{i}", f"s3://b/m{i}", (1 + i % 3) * GB, "torch", 30.0, 2) for i in range(6)]


def random_server(rng: random.Random, name: str, now: float) -> ServerState:
    names = rng.sample([m.name for m in MODELS], k=rng.randint(0, 4))
    loaded, loading, queued = names[:2], names[2:3], names[3:]
    instances = tuple(
        Instance(
            m,
            GB,
            now - rng.uniform(0, 60),
            tuple(RunningRequest(f"{m}-{k}", 8, k, rng.uniform(0, 5)) for k in range(rng.randint(0, 2))),
        )
        for m in loaded
    )
    tiers = {m.name: rng.choice([Tier.MEMORY, Tier.DISK]) for m in MODELS if rng.random() < 0.4}
    return ServerState(
        name=name,
        healthy=rng.random() < 0.9,
        memory_budget_bytes=rng.choice([4, 8, 16]) * GB,
        bandwidth=NodeBandwidth(20e9, 2e9, rng.choice([None, 1e9])),
        triton_load_overhead_s=rng.uniform(0.1, 1.0),
        instances=instances,
        loading=tuple(LoadInFlight(m, GB, now + rng.uniform(-1, 10)) for m in loading),
        load_queue=tuple(PendingLoad(m, GB, rng.uniform(1, 5)) for m in queued),
        store_tiers=tiers,
        eviction_s=rng.uniform(0, 1),
        repository=None if rng.random() < 0.5 else frozenset(rng.sample([m.name for m in MODELS], k=4)),
    )


def assert_same_index(a: SnapshotIndex, b: SnapshotIndex) -> None:
    assert a.position == b.position
    for name in ("healthy", "queued_s", "overhead_s", "inv_remote_bw", "free_bytes", "room_bytes", "wait_s"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.eviction_s, b.eviction_s)
    # loads in flight: the padding width may differ, what the policy sums may not
    np.testing.assert_array_equal(
        np.sort(a.in_flight_left, axis=1).sum(1), np.sort(b.in_flight_left, axis=1).sum(1)
    )
    assert a.warm == b.warm
    assert a.in_flight == b.in_flight
    assert a.holders.keys() == b.holders.keys()
    for m in a.holders:
        np.testing.assert_array_equal(a.holders[m].positions, b.holders[m].positions)
        np.testing.assert_array_equal(a.holders[m].inv_bw, b.holders[m].inv_bw)
    for m in MODELS:
        np.testing.assert_array_equal(a.lacking(m.name), b.lacking(m.name))


@pytest.mark.parametrize("seed", range(6))
def test_an_index_updated_from_the_previous_snapshot_equals_a_fresh_build(seed: int) -> None:
    rng = random.Random(seed)
    now = 100.0
    servers = [random_server(rng, f"s{i:02d}", now) for i in range(12)]
    previous = ClusterSnapshot.of(servers, MODELS, now)
    _ = previous.index
    for _step in range(40):
        if rng.random() < 0.5:
            now += rng.uniform(0, 3)  # time moves: loads in flight and queued ready times move with it
        for _ in range(rng.randint(0, 3)):
            servers[rng.randrange(len(servers))] = random_server(rng, f"s{rng.randrange(12):02d}", now)
        if len({s.name for s in servers}) != len(servers):  # a name drawn twice: keep the names unique
            servers = [replace(s, name=f"s{i:02d}") for i, s in enumerate(servers)]
        snap = ClusterSnapshot.of(servers, MODELS, now, previous=previous)
        fresh = ClusterSnapshot.of(servers, MODELS, now)
        assert_same_index(snap.index, fresh.index)
        for m in MODELS:
            assert place(snap, m.name) == place(fresh, m.name)
        # the update copied what it changed: the previous snapshot's index still describes that snapshot,
        # and a second snapshot built from it (another branch) is right too
        assert_same_index(previous.index, ClusterSnapshot.of(previous.servers, MODELS, previous.now).index)
        branch = list(previous.servers)
        pos = rng.randrange(len(branch))
        branch[pos] = random_server(rng, branch[pos].name, previous.now)
        other = ClusterSnapshot.of(branch, MODELS, previous.now, previous=previous)
        assert_same_index(other.index, ClusterSnapshot.of(branch, MODELS, previous.now).index)
        previous = snap


def test_a_snapshot_of_other_servers_builds_its_index_afresh() -> None:
    rng = random.Random(7)
    first = ClusterSnapshot.of([random_server(rng, f"a{i}", 0.0) for i in range(3)], MODELS, 0.0)
    _ = first.index
    servers = [random_server(rng, f"b{i}", 0.0) for i in range(4)]
    second = ClusterSnapshot.of(servers, MODELS, 0.0, previous=first)
    assert_same_index(second.index, ClusterSnapshot.of(servers, MODELS, 0.0).index)
    assert second.basis is None  # dropped once used: no chain of old indexes stays alive


def test_servers_given_out_of_order_are_sorted_and_duplicates_refused() -> None:
    rng = random.Random(3)
    a, b = random_server(rng, "a", 0.0), random_server(rng, "b", 0.0)
    assert [s.name for s in ClusterSnapshot.of([b, a], MODELS, 0.0).servers] == ["a", "b"]
    with pytest.raises(InvalidSnapshotError, match="unique"):
        ClusterSnapshot.of([a, b, a], MODELS, 0.0)
    with pytest.raises(InvalidSnapshotError, match="finite"):
        ClusterSnapshot.of([a], MODELS, 0.0, demand={"m0": 1.0, "m1": float("nan")})
    with pytest.raises(InvalidSnapshotError, match="finite"):
        ClusterSnapshot.of([a], MODELS, 0.0, demand={"m0": -1.0})
