"""The in-memory cluster-state store: revisions, compare-and-set, consistent snapshots, thread safety."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from warmstart.scheduler import (
    ClusterStateStore,
    InMemoryClusterState,
    ModelSpec,
    NodeBandwidth,
    RevisionConflictError,
    ServerState,
    Tier,
    UnknownModelError,
    UnknownServerError,
)


def spec(name: str = "m", conc: int = 1) -> ModelSpec:
    return ModelSpec(name, f"s3://models/{name}", 10**9, "torch", 60.0, conc)


def server(name: str = "s1", healthy: bool = True) -> ServerState:
    return ServerState(
        name=name,
        healthy=healthy,
        memory_budget_bytes=8 * 10**9,
        bandwidth=NodeBandwidth(20e9, 2e9, 1e9),
        triton_load_overhead_s=0.4,
        store_tiers={"m": Tier.DISK},
    )


def test_in_memory_state_satisfies_protocol_when_typed_against_it() -> None:
    store: ClusterStateStore = InMemoryClusterState()
    assert store.put_model(spec()) == 1


def test_put_increments_store_wide_revision_when_writing() -> None:
    store = InMemoryClusterState()
    assert store.put_model(spec("a")) == 1
    assert store.put_server(server("s1")) == 2
    assert store.put_model(spec("a", conc=2)) == 3
    assert store.get_model("a").revision == 3 and store.get_model("a").value.max_concurrency == 2
    assert store.get_server("s1").revision == 2


CAS_CASES = {
    "create_only_when_absent": (None, 0, True),
    "create_only_when_present": (1, 0, False),
    "matching_revision": (1, 1, True),
    "stale_revision": (1, 7, False),
    "update_of_missing": (None, 1, False),
}


@pytest.mark.parametrize(("existing", "expected", "ok"), CAS_CASES.values(), ids=CAS_CASES.keys())
def test_compare_and_set_succeeds_only_when_revision_matches(
    existing: int | None, expected: int, ok: bool
) -> None:
    store = InMemoryClusterState()
    if existing is not None:
        store.put_server(server())
    if ok:
        assert store.put_server(server(healthy=False), expected_revision=expected) == store.revision
        assert store.get_server("s1").value.healthy is False
    else:
        with pytest.raises(RevisionConflictError, match="revision"):
            store.put_server(server(healthy=False), expected_revision=expected)


def test_delete_raises_conflict_when_revision_is_stale_and_removes_when_current() -> None:
    store = InMemoryClusterState()
    rev = store.put_server(server())
    with pytest.raises(RevisionConflictError):
        store.delete_server("s1", expected_revision=rev + 5)
    store.delete_server("s1", expected_revision=rev)
    with pytest.raises(UnknownServerError, match="s1"):
        store.get_server("s1")


def test_get_and_delete_raise_unknown_when_missing() -> None:
    store = InMemoryClusterState()
    with pytest.raises(UnknownModelError, match="ghost"):
        store.get_model("ghost")
    with pytest.raises(UnknownModelError):
        store.delete_model("ghost")
    with pytest.raises(UnknownServerError):
        store.delete_server("ghost")


def test_snapshot_holds_every_server_and_model_when_taken() -> None:
    store = InMemoryClusterState()
    store.put_server(server("s2"))
    store.put_server(server("s1"))
    store.put_model(spec("m"))
    snap = store.snapshot(now=12.5)
    assert [s.name for s in snap.servers] == ["s1", "s2"]
    assert set(snap.models) == {"m"} and snap.now == 12.5


def test_snapshot_is_immutable_when_store_changes_later() -> None:
    store = InMemoryClusterState()
    store.put_server(server("s1"))
    snap = store.snapshot(now=0.0)
    store.put_server(server("s1", healthy=False))
    store.put_server(server("s9"))
    assert [(s.name, s.healthy) for s in snap.servers] == [("s1", True)]
    with pytest.raises(TypeError):
        snap.servers[0].store_tiers["m"] = Tier.MEMORY  # type: ignore[index]


def test_compare_and_set_loses_no_update_when_threads_race() -> None:
    store = InMemoryClusterState()
    store.put_model(spec("counter", conc=1))
    threads, per_thread = 8, 200
    conflicts = [0] * threads

    def bump(slot: int) -> None:
        done = 0
        while done < per_thread:
            current = store.get_model("counter")
            updated = replace(current.value, max_concurrency=current.value.max_concurrency + 1)
            try:
                store.put_model(updated, expected_revision=current.revision)
                done += 1
            except RevisionConflictError:
                conflicts[slot] += 1

    workers = [threading.Thread(target=bump, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert store.get_model("counter").value.max_concurrency == 1 + threads * per_thread
    assert store.revision == 1 + threads * per_thread
