"""One conformance suite of ``ClusterStateStore`` on both stores: in memory, and on a real etcd.

Every test of the ``backend`` fixture runs twice: against :class:`InMemoryClusterState` (leases expire by a
clock the test drives) and :class:`EtcdClusterState` on the session's etcd (``conftest.etcd``; each test
under its own key prefix; real time, 1-s leases). Tests that need bytes in the store (corrupt values) or a
network (unavailable etcd) run on etcd only.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from warmstart.etcd import Etcd
from warmstart.scheduler.errors import (
    ClusterStateUnavailable,
    CorruptClusterStateError,
    InvalidLeaseError,
    InvalidSnapshotError,
    LeaseNotFoundError,
    RevisionConflictError,
    StaleEpochError,
    UnknownModelError,
    UnknownServerError,
)
from warmstart.scheduler.etcd_state import EtcdClusterState, InvalidEtcdConfig
from warmstart.scheduler.state import (
    ClusterStateStore,
    InMemoryClusterState,
    Instance,
    Lease,
    LoadClaim,
    LoadInFlight,
    ModelSpec,
    NodeBandwidth,
    NodeRecord,
    PendingLoad,
    RunningRequest,
    ServerState,
    Tier,
)
from warmstart.scheduler.state_json import decode_server, encode_model, encode_server

LEASE_TTL_S = 1  # etcd's minimum with the fixture's raft timings (EtcdConfig.min_lease_ttl_s)
EXPIRY_BOUND_S = 10.0  # how long a real etcd may take to delete an expired lease's keys before we fail


def spec(name: str = "m", conc: int = 1) -> ModelSpec:
    return ModelSpec(name, f"s3://models/{name}", 10**9, "torch", 60.0, conc)


def server(name: str = "s1", healthy: bool = True, budget: int = 8 * 10**9) -> ServerState:
    return ServerState(
        name=name,
        healthy=healthy,
        memory_budget_bytes=budget,
        bandwidth=NodeBandwidth(20e9, 2e9, 1e9),
        triton_load_overhead_s=0.4,
        store_tiers={"m": Tier.DISK},
    )


def busy_server(name: str = "s1") -> ServerState:
    """A report with every field set (requests, loads, queue, tiers, repository, no remote)."""
    return ServerState(
        name=name,
        healthy=True,
        memory_budget_bytes=80 * 2**30,
        bandwidth=NodeBandwidth(12.5e9, 1.5e9, None),
        triton_load_overhead_s=0.25,
        instances=(
            Instance(
                "a", 3 * 2**30, 101.5, (RunningRequest("r1", 12, 3, 0.75), RunningRequest("r2", 1, 0, 2))
            ),
            Instance("b", 2**30, 99.0),
        ),
        loading=(LoadInFlight("c", 2**30, 130.25),),
        load_queue=(PendingLoad("d", 2**29, 4.5),),
        store_tiers={"a": Tier.MEMORY, "c": Tier.DISK, "d": Tier.REMOTE, "e": Tier.NONE},
        eviction_s=0.125,
        repository=frozenset({"a", "b", "c", "d"}),
        freeing_bytes=2**28,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """A store under test and how to let time pass for its leases."""

    name: str
    store: InMemoryClusterState | EtcdClusterState
    clock: FakeClock | None = None

    def pass_time(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
        else:
            time.sleep(seconds)

    def wait_gone(self, name: str, lease: Lease) -> float:
        """Let ``lease`` run out; returns the seconds until server ``name`` was gone (fails past the bound)."""
        if self.clock is not None:
            self.clock.now += lease.ttl_s
            with pytest.raises(UnknownServerError):
                self.store.get_server(name)
            return float(lease.ttl_s)
        t0 = time.monotonic()
        while time.monotonic() - t0 < lease.ttl_s + EXPIRY_BOUND_S:
            try:
                self.store.get_server(name)
            except UnknownServerError:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"{name} still stored {lease.ttl_s + EXPIRY_BOUND_S} s after its lease began")


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.etcd)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()
        yield Backend("memory", InMemoryClusterState(clock=clock), clock)
        return
    etcd: Etcd = request.getfixturevalue("etcd")
    store = EtcdClusterState(etcd.url, prefix=f"/test-{uuid.uuid4().hex}/")
    try:
        yield Backend("etcd", store)
    finally:
        store.close()


@pytest.fixture
def etcd_store(etcd: Etcd) -> Iterator[EtcdClusterState]:
    store = EtcdClusterState(etcd.url, prefix=f"/test-{uuid.uuid4().hex}/")
    try:
        yield store
    finally:
        store.close()


# --- revisions and compare-and-set ---------------------------------------------------------------------


def test_store_satisfies_protocol_when_typed_against_it(backend: Backend) -> None:
    store: ClusterStateStore = backend.store
    assert store.put_model(spec()) > 0


def test_revisions_increase_store_wide_and_name_the_last_write_when_writing(backend: Backend) -> None:
    store = backend.store
    r1 = store.put_model(spec("a"))
    r2 = store.put_server(server("s1"))
    r3 = store.put_model(spec("a", conc=2))
    assert r1 < r2 < r3 == store.revision
    assert store.get_model("a").revision == r3 and store.get_model("a").value.max_concurrency == 2
    assert store.get_server("s1").revision == r2


def test_server_report_reads_back_equal_when_every_field_is_set(backend: Backend) -> None:
    state = busy_server()
    backend.store.put_server(state)
    assert backend.store.get_server("s1").value == state


CAS_CASES = {
    "create_only_when_absent": (False, "zero", True),
    "create_only_when_present": (True, "zero", False),
    "matching_revision": (True, "current", True),
    "stale_revision": (True, "stale", False),
    "update_of_missing": (False, "stale", False),
}


@pytest.mark.parametrize(("exists", "expected", "ok"), CAS_CASES.values(), ids=CAS_CASES.keys())
@pytest.mark.parametrize("kind", ["server", "model"])
def test_compare_and_set_succeeds_only_when_revision_matches(
    backend: Backend, kind: str, exists: bool, expected: str, ok: bool
) -> None:
    store = backend.store
    other = store.put_model(spec("unrelated"))  # a revision that is not this key's
    current = 0
    if exists:
        current = store.put_server(server()) if kind == "server" else store.put_model(spec())
    rev = {"zero": 0, "current": current, "stale": other}[expected]

    def write() -> int:
        if kind == "server":
            return store.put_server(server(healthy=False), expected_revision=rev)
        return store.put_model(spec(conc=5), expected_revision=rev)

    def read() -> object:
        if kind == "server":
            return store.get_server("s1").value.healthy
        return store.get_model("m").value.max_concurrency

    if ok:
        assert write() == store.revision
        assert read() == (False if kind == "server" else 5)
    else:
        before = store.revision
        with pytest.raises(RevisionConflictError, match="revision"):
            write()
        assert store.revision == before  # a lost compare writes nothing
        if exists:
            assert read() == (True if kind == "server" else 1)


def test_only_one_of_two_racing_creates_wins_when_both_expect_absent(backend: Backend) -> None:
    store = backend.store
    store.put_server(server("s1", budget=1), expected_revision=0)
    with pytest.raises(RevisionConflictError):
        store.put_server(server("s1", budget=2), expected_revision=0)
    assert store.get_server("s1").value.memory_budget_bytes == 1


def test_delete_with_revision_removes_only_when_current(backend: Backend) -> None:
    store = backend.store
    rev = store.put_server(server())
    later = store.put_model(spec())
    with pytest.raises(RevisionConflictError):
        store.delete_server("s1", expected_revision=later)
    with pytest.raises(RevisionConflictError):
        store.delete_server("s1", expected_revision=0)
    assert store.get_server("s1").revision == rev
    store.delete_server("s1", expected_revision=rev)
    with pytest.raises(UnknownServerError):
        store.get_server("s1")
    store.delete_model("m", expected_revision=later)
    with pytest.raises(UnknownModelError):
        store.get_model("m")


def test_get_and_delete_raise_unknown_when_missing(backend: Backend) -> None:
    store = backend.store
    with pytest.raises(UnknownServerError):
        store.get_server("nope")
    with pytest.raises(UnknownModelError):
        store.get_model("nope")
    with pytest.raises(UnknownServerError):
        store.delete_server("nope")
    with pytest.raises(UnknownModelError):
        store.delete_model("nope", expected_revision=3)


# --- snapshots -----------------------------------------------------------------------------------------


def test_snapshot_holds_every_server_and_model_at_one_revision_when_quiet(backend: Backend) -> None:
    store = backend.store
    store.put_server(server("s2"))
    store.put_server(server("s1"))
    rev = store.put_model(spec("a"))
    view = store.read()
    assert view.revision == rev
    assert sorted(view.servers) == ["s1", "s2"] and sorted(view.models) == ["a"]
    assert all(v.revision <= view.revision for v in [*view.servers.values(), *view.models.values()])
    snap = store.snapshot(now=5.0, demand={"a": 0.5})
    assert [s.name for s in snap.servers] == ["s1", "s2"]
    assert snap.models["a"] == spec("a") and snap.now == 5.0 and snap.demand == {"a": 0.5}


def test_snapshot_is_the_state_at_its_revision_when_a_writer_races_it(backend: Backend) -> None:
    """A writer stores budget k in s1, then k in s2, for k = 1, 2, ..., and logs each write's revision.
    Every view read meanwhile must hold, for each server, exactly the last logged write at or before the
    view's revision (a read assembled from several reads would hold values of different revisions)."""
    store = backend.store
    log = {"s1": [(store.put_server(server("s1", budget=0)), 0)]}
    log["s2"] = [(store.put_server(server("s2", budget=0)), 0)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        k = 0
        try:
            while not stop.is_set() and k < 5000:
                k += 1
                for name in ("s1", "s2"):
                    log[name].append((store.put_server(server(name, budget=k)), k))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    writer = threading.Thread(target=write)
    writer.start()
    views = []
    deadline = time.monotonic() + 20.0
    try:
        while len(views) < 200 and time.monotonic() < deadline and writer.is_alive():
            views.append(store.read())
            time.sleep(0)  # let the writer in between reads
    finally:
        stop.set()
        writer.join()
    assert not errors
    for view in views:
        for name in ("s1", "s2"):
            rev, budget = [(r, k) for r, k in log[name] if r <= view.revision][-1]
            got = view.servers[name]
            assert (got.revision, got.value.memory_budget_bytes) == (rev, budget), (name, view.revision)
    assert len({v.revision for v in views}) >= 10, "the writer hardly ran during the reads"


def test_read_keeps_the_objects_of_unchanged_records_and_decodes_changed_ones(backend: Backend) -> None:
    """Unchanged servers come back as the same objects, so the snapshot index only redoes changed ones."""
    store = backend.store
    store.put_server(server("s1"))
    store.put_server(server("s2"))
    first = store.read()
    store.put_server(server("s2", healthy=False))
    second = store.read()
    assert second.servers["s1"].value is first.servers["s1"].value
    assert second.servers["s2"].value.healthy is False


# --- leases --------------------------------------------------------------------------------------------


def test_lease_expiry_removes_the_key_written_under_it(backend: Backend) -> None:
    store = backend.store
    lease = store.grant_lease(LEASE_TTL_S)
    assert lease.ttl_s == LEASE_TTL_S
    store.put_server(server("leased"), lease=lease)
    store.put_server(server("kept"))
    before = store.revision
    assert store.get_server("leased").value.name == "leased"
    backend.wait_gone("leased", lease)
    assert store.get_server("kept").value.name == "kept"
    assert "leased" not in store.read().servers
    assert store.revision > before  # the expiry's delete is a write, as any other
    with pytest.raises(LeaseNotFoundError):
        store.keep_alive(lease)
    with pytest.raises(LeaseNotFoundError):
        store.put_server(server("leased"), lease=lease)


def test_keep_alive_keeps_the_key_past_its_ttl(backend: Backend) -> None:
    store = backend.store
    lease = store.grant_lease(2)
    store.put_server(server("leased"), lease=lease)
    for _ in range(8):  # 2.4 s in all, more than the TTL, renewed every 0.3 s
        backend.pass_time(0.3)
        assert store.keep_alive(lease) == 2
    assert store.get_server("leased").value.name == "leased"
    store.revoke_lease(lease)


def test_revoke_removes_the_keys_at_once_and_ends_the_lease(backend: Backend) -> None:
    store = backend.store
    lease = store.grant_lease(30)
    store.put_server(server("a"), lease=lease)
    store.put_server(server("b"), lease=lease)
    store.revoke_lease(lease)
    assert store.read().servers == {}
    for call in (store.revoke_lease, store.keep_alive):
        with pytest.raises(LeaseNotFoundError):
            call(lease)
    with pytest.raises(LeaseNotFoundError, match="grant a new one"):
        store.put_server(server("a"), lease=lease)
    with pytest.raises(UnknownServerError):
        store.get_server("a")


def test_put_without_lease_detaches_the_key_from_its_lease(backend: Backend) -> None:
    store = backend.store
    lease = store.grant_lease(30)
    store.put_server(server("a"), lease=lease)
    store.put_server(server("a", healthy=False))
    store.revoke_lease(lease)
    assert store.get_server("a").value.healthy is False


@pytest.mark.parametrize("ttl", [0, -1, 1.5, True, "10"])
def test_grant_refuses_a_ttl_that_is_not_whole_positive_seconds(backend: Backend, ttl: object) -> None:
    with pytest.raises(InvalidLeaseError, match="whole number of seconds"):
        backend.store.grant_lease(ttl)  # type: ignore[arg-type]


# --- incarnation epochs (fencing) ----------------------------------------------------------------------


def test_write_from_an_older_epoch_is_refused_when_the_node_restarted(backend: Backend) -> None:
    store = backend.store
    assert store.epoch("s1") is None
    old = store.begin_incarnation("s1")
    store.put_server(server("s1", budget=1), epoch=old)
    new = store.begin_incarnation("s1")
    assert new > old and store.epoch("s1") == new
    current = store.get_server("s1").revision
    with pytest.raises(StaleEpochError, match=f"epoch {old}.*incarnation is {new}"):
        store.put_server(server("s1", budget=2), epoch=old)
    # fencing wins even when the revision compare would pass
    with pytest.raises(StaleEpochError):
        store.put_server(server("s1", budget=2), epoch=old, expected_revision=current)
    with pytest.raises(StaleEpochError):
        store.delete_server("s1", epoch=old)
    assert store.get_server("s1").value.memory_budget_bytes == 1
    store.put_server(server("s1", budget=3), epoch=new, expected_revision=current)
    assert store.get_server("s1").value.memory_budget_bytes == 3


def test_write_with_an_epoch_is_refused_when_the_node_never_began_one(backend: Backend) -> None:
    with pytest.raises(StaleEpochError, match="none"):
        backend.store.put_server(server("s9"), epoch=1)


def test_epoch_outlives_the_lease_so_the_same_incarnation_can_re_register(backend: Backend) -> None:
    store = backend.store
    epoch = store.begin_incarnation("n1")
    lease = store.grant_lease(LEASE_TTL_S)
    store.put_server(server("n1"), lease=lease, epoch=epoch)
    backend.wait_gone("n1", lease)
    assert store.epoch("n1") == epoch
    lease2 = store.grant_lease(30)
    store.put_server(server("n1"), lease=lease2, epoch=epoch, expected_revision=0)
    assert store.get_server("n1").value.name == "n1"
    store.revoke_lease(lease2)


# --- node registrations ---------------------------------------------------------------------------------


def node(name: str = "n1", epoch: int = 1, **extra: Any) -> NodeRecord:
    fields: dict[str, Any] = {
        "grpc": "127.0.0.1:8001",
        "memory_budget_bytes": 8 * 10**9,
        "node_store": "http://127.0.0.1:9000",
        "repository_key_env": "WARMSTART_REPOSITORY_KEY",
        "bandwidth": NodeBandwidth(2e10, 3e9, None),
        "store_tiers": {"a": Tier.MEMORY, "b": Tier.DISK},
        **extra,
    }
    return NodeRecord(name, epoch=epoch, **fields)


def test_node_registration_reads_back_equal_and_goes_with_its_lease(backend: Backend) -> None:
    store = backend.store
    epoch = store.begin_incarnation("n1")
    lease = store.grant_lease(LEASE_TTL_S)
    rev = store.put_node(node("n1", epoch), lease=lease)
    got = store.get_node("n1")
    assert got.value == node("n1", epoch) and got.revision == rev
    assert store.read().nodes["n1"].value == node("n1", epoch)
    t0 = time.monotonic()
    if backend.clock is not None:
        backend.clock.now += lease.ttl_s
    else:
        while "n1" in store.read().nodes and time.monotonic() - t0 < lease.ttl_s + EXPIRY_BOUND_S:
            time.sleep(0.05)
    assert "n1" not in store.read().nodes  # the node's lease ended: it left with it
    with pytest.raises(UnknownServerError, match="no node named 'n1'"):
        store.get_node("n1")


def test_node_registration_from_an_older_incarnation_is_refused(backend: Backend) -> None:
    store = backend.store
    old = store.begin_incarnation("n1")
    store.put_node(node("n1", old, memory_budget_bytes=1))
    new = store.begin_incarnation("n1")
    with pytest.raises(StaleEpochError, match=f"epoch {old}.*incarnation is {new}"):
        store.put_node(node("n1", old, memory_budget_bytes=2))
    with pytest.raises(StaleEpochError):
        store.delete_node("n1", epoch=old)
    assert store.get_node("n1").value.memory_budget_bytes == 1
    store.put_node(node("n1", new, memory_budget_bytes=3))
    assert store.get_node("n1").value.memory_budget_bytes == 3
    store.delete_node("n1", epoch=new)
    assert store.read().nodes == {}


def test_node_and_server_records_of_one_name_are_separate_keys(backend: Backend) -> None:
    store = backend.store
    epoch = store.begin_incarnation("s1")
    lease = store.grant_lease(30)
    store.put_node(node("s1", epoch), lease=lease)
    store.put_server(server("s1"))
    store.revoke_lease(lease)  # the node's registration goes; the scheduler's report of it stays
    view = store.read()
    assert "s1" not in view.nodes and view.servers["s1"].value.name == "s1"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"grpc": "localhost"}, "host:port"),
        ({"grpc": "127.0.0.1:0"}, "host:port"),
        ({"memory_budget_bytes": 0}, "memory_budget_bytes"),
        ({"node_store": "ftp://x"}, "http"),
        ({"epoch": 0}, "epoch"),
    ],
)
def test_node_record_refuses_bad_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSnapshotError, match=message):
        node("n1", **{"epoch": 1, **fields})


# --- allocations: the replicas' shared view of a server ---------------------------------------------------


def test_two_replicas_racing_to_load_on_one_server_make_exactly_one_claim(backend: Backend) -> None:
    store = backend.store
    lease_a, lease_b = store.grant_lease(30), store.grant_lease(30)
    view = store.allocation("s1")
    assert view.revision == 0 and view.committed_bytes == 0
    # both decided on the same view; the second compare-and-set loses and must re-read
    rev = store.claim_load("s1", "m", 100, "replica-a", lease=lease_a, expected_revision=view.revision)
    with pytest.raises(RevisionConflictError):
        store.claim_load("s1", "m2", 200, "replica-b", lease=lease_b, expected_revision=view.revision)
    again = store.allocation("s1")
    assert again.revision == rev and dict(again.loads) == {"m": LoadClaim("replica-a", 100)}
    assert again.committed_bytes == 100  # replica b now decides knowing a's 100 bytes are taken
    store.claim_load("s1", "m2", 200, "replica-b", lease=lease_b, expected_revision=again.revision)
    assert store.allocation("s1").committed_bytes == 300
    store.revoke_lease(lease_a)
    store.revoke_lease(lease_b)


def test_a_finished_load_stays_loaded_and_a_dead_replicas_claims_and_counts_expire(backend: Backend) -> None:
    store = backend.store
    keep = store.grant_lease(30)
    dying = store.grant_lease(LEASE_TTL_S)
    view = store.allocation("s1")
    rev = store.claim_load("s1", "m", 100, "a", lease=keep, expected_revision=view.revision)
    store.claim_load("s1", "n", 50, "b", lease=dying, expected_revision=rev)
    store.finish_load("s1", "m", "a", size_bytes=100)
    store.set_in_use("s1", "m", "a", 2, lease=keep)
    store.set_in_use("s1", "m", "b", 1, lease=dying)
    now = store.allocation("s1")
    assert dict(now.loaded) == {"m": 100} and set(now.loads) == {"n"}
    assert now.users("m") == 3 and now.users("m", besides="a") == 1
    if backend.clock is not None:
        backend.clock.now += dying.ttl_s
    else:
        t0 = time.monotonic()
        while store.allocation("s1").users("m") != 2 and time.monotonic() - t0 < LEASE_TTL_S + EXPIRY_BOUND_S:
            time.sleep(0.05)
    after = store.allocation("s1")  # replica b died: its claim and its count went with its lease
    assert (
        dict(after.loaded) == {"m": 100} and dict(after.loads) == {} and dict(after.in_use) == {"m": {"a": 2}}
    )
    store.set_in_use("s1", "m", "a", 0, lease=keep)
    assert store.allocation("s1").users("m") == 0
    store.revoke_lease(keep)


def test_a_release_decided_on_a_stale_view_is_refused(backend: Backend) -> None:
    store = backend.store
    lease = store.grant_lease(30)
    rev = store.claim_load("s1", "m", 100, "a", lease=lease, expected_revision=0)
    store.finish_load("s1", "m", "a", size_bytes=100)
    view = store.allocation("s1")  # replica a sees m idle and decides to unload it ...
    store.set_in_use("s1", "m", "b", 1, lease=lease)  # ... while replica b starts a generation on it
    with pytest.raises(RevisionConflictError):
        store.release_loaded(
            "s1",
            "m",
            "a",
            expected_revision=view.revision,
            expected_use_revision=view.use_revision,
            lease=lease,
        )
    assert dict(store.allocation("s1").loaded) == {"m": 100}
    store.set_in_use("s1", "m", "b", 0, lease=lease)
    idle = store.allocation("s1")
    assert idle.revision > rev
    store.release_loaded(
        "s1",
        "m",
        "a",
        expected_revision=idle.revision,
        expected_use_revision=idle.use_revision,
        lease=lease,
    )
    unloading = store.allocation("s1")
    assert dict(unloading.loaded) == {} and dict(unloading.unloading) == {"m": LoadClaim("a", 100)}
    assert unloading.committed_bytes == 100  # its memory is not free until the unload says so
    store.unloaded("s1", "m", "b")  # another replica's "unloaded" does not free a's unload
    assert store.allocation("s1").committed_bytes == 100
    store.unloaded("s1", "m", "a")
    assert store.allocation("s1").committed_bytes == 0
    store.revoke_lease(lease)


def test_an_in_use_write_between_a_read_and_a_claim_does_not_make_the_claim_conflict(
    backend: Backend,
) -> None:
    store = backend.store
    lease = store.grant_lease(30)
    store.claim_load("s1", "m", 100, "a", lease=lease, expected_revision=0)
    store.finish_load("s1", "m", "a", size_bytes=100)
    view = store.allocation("s1")  # replica a decides to load n here ...
    store.set_in_use("s1", "m", "b", 1, lease=lease)  # ... while replica b starts a generation on m
    store.set_in_use("s1", "m", "b", 0, lease=lease)  # ... and ends it
    rev = store.claim_load("s1", "n", 50, "a", lease=lease, expected_revision=view.revision)
    after = store.allocation("s1")
    assert after.revision == rev and dict(after.loads) == {"n": LoadClaim("a", 50)}
    assert after.committed_bytes == 150
    store.revoke_lease(lease)


def test_an_in_use_write_between_a_read_and_a_release_makes_the_release_conflict(backend: Backend) -> None:
    store = backend.store
    lease = store.grant_lease(30)
    store.claim_load("s1", "m", 100, "a", lease=lease, expected_revision=0)
    store.finish_load("s1", "m", "a", size_bytes=100)
    store.set_in_use("s1", "m", "a", 1, lease=lease)  # the in-use revision exists before the read
    view = store.allocation("s1")  # replica a sees no other replica on m and decides to evict it ...
    store.set_in_use("s1", "m", "b", 1, lease=lease)  # ... while replica b starts a generation on it
    assert store.allocation("s1").revision == view.revision  # the allocation revision did not move
    with pytest.raises(RevisionConflictError, match="in-use"):
        store.release_loaded(
            "s1",
            "m",
            "a",
            expected_revision=view.revision,
            expected_use_revision=view.use_revision,
            lease=lease,
        )
    now = store.allocation("s1")
    assert dict(now.loaded) == {"m": 100} and dict(now.unloading) == {}
    assert now.users("m", besides="a") == 1  # the fresh read shows b's generation: a keeps m loaded
    store.revoke_lease(lease)


def test_use_revision_moves_on_in_use_writes_only(backend: Backend) -> None:
    store = backend.store
    lease = store.grant_lease(30)
    fresh = store.allocation("s1")
    assert fresh.revision == 0 and fresh.use_revision == 0
    claimed = store.claim_load("s1", "m", 100, "a", lease=lease, expected_revision=0)
    view = store.allocation("s1")
    assert (view.revision, view.use_revision) == (claimed, 0)  # a claim moves the allocation revision only
    finished = store.finish_load("s1", "m", "a", size_bytes=100)
    view = store.allocation("s1")
    assert (view.revision, view.use_revision) == (finished, 0)
    used = store.set_in_use("s1", "m", "a", 2, lease=lease)
    view = store.allocation("s1")
    assert (view.revision, view.use_revision) == (finished, used)  # an in-use write moves its own only
    assert used > finished
    done = store.set_in_use("s1", "m", "a", 0, lease=lease)
    view = store.allocation("s1")
    assert (view.revision, view.use_revision) == (finished, done) and done > used
    released = store.release_loaded(
        "s1", "m", "a", expected_revision=finished, expected_use_revision=done, lease=lease
    )
    unloaded = store.unloaded("s1", "m", "a")
    view = store.allocation("s1")
    assert released > done and (view.revision, view.use_revision) == (unloaded, done)
    assert store.allocation("s2").use_revision == 0  # per server
    store.revoke_lease(lease)


def test_a_dead_replicas_unfinished_unload_frees_its_bytes_with_its_lease(backend: Backend) -> None:
    store = backend.store
    dying = store.grant_lease(LEASE_TTL_S)
    store.claim_load("s1", "m", 100, "a", lease=dying, expected_revision=0)
    store.finish_load("s1", "m", "a", size_bytes=100)
    view = store.allocation("s1")
    store.release_loaded(
        "s1",
        "m",
        "a",
        expected_revision=view.revision,
        expected_use_revision=view.use_revision,
        lease=dying,
    )
    assert store.allocation("s1").committed_bytes == 100
    if backend.clock is not None:
        backend.clock.now += dying.ttl_s
    else:
        t0 = time.monotonic()
        while store.allocation("s1").committed_bytes and time.monotonic() - t0 < LEASE_TTL_S + EXPIRY_BOUND_S:
            time.sleep(0.05)
    assert store.allocation("s1").committed_bytes == 0


def test_allocation_names_with_a_slash_are_refused(backend: Backend) -> None:
    with pytest.raises(InvalidSnapshotError, match="no '/'"):
        backend.store.allocation("a/b")
    lease = backend.store.grant_lease(30)
    with pytest.raises(InvalidSnapshotError, match="no '/'"):
        backend.store.claim_load("s1", "m/x", 1, "r", lease=lease, expected_revision=0)
    backend.store.revoke_lease(lease)


def test_a_deployment_reads_back_as_the_same_plain_config_and_can_be_withdrawn(backend: Backend) -> None:
    store = backend.store
    config = {
        "checkpoint": "s3://models/m",
        "size_bytes": 1024,
        "triton_config": {"backend": "python", "x": [1, 2]},
    }
    rev = store.put_deployment("m", config)
    got = store.read().deployments["m"]
    assert got.revision == rev and dict(got.value) == config
    store.delete_deployment("m")
    assert store.read().deployments == {}
    with pytest.raises(UnknownModelError):
        store.delete_deployment("m")


# --- records --------------------------------------------------------------------------------------------


def test_record_encoding_refuses_values_json_cannot_hold() -> None:
    with pytest.raises(InvalidSnapshotError, match="finite"):
        encode_server(replace(server(), loading=(LoadInFlight("c", 1, float("inf")),)))
    with pytest.raises(InvalidSnapshotError, match="integer"):
        encode_model(replace(spec(), size_bytes=1.5))


def test_record_is_versioned_json_when_encoded() -> None:
    doc = json.loads(encode_server(busy_server()))
    assert doc["schema"] == 1 and doc["kind"] == "server" and doc["value"]["name"] == "s1"
    assert decode_server(encode_server(busy_server()), "k") == busy_server()


def _raw_put(etcd: Etcd, key: str, value: bytes) -> None:
    body = json.dumps(
        {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()}
    )
    req = urllib.request.Request(f"{etcd.url}/v3/kv/put", data=body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def _good() -> dict[str, object]:
    return json.loads(encode_server(server("s1")))


def _with(path: list[str], value: object) -> bytes:
    doc = _good()
    node: dict[str, object] = doc
    for p in path[:-1]:
        node = node[p]  # type: ignore[assignment]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return json.dumps(doc).encode()


CORRUPT = {
    "not_json": (b"\x80\x03pickle", "not a JSON document"),
    "truncated": (encode_server(server("s1"))[:-5], "not a JSON document"),
    "newer_schema": (_with(["schema"], 2), "schema version 2"),
    "wrong_kind": (encode_model(spec("s1")), "kind 'model'"),
    "missing_field": (_with(["value", "healthy"], KeyError), "missing fields \\['healthy'\\]"),
    "unknown_field": (_with(["value", "extra"], 1), "unknown fields \\['extra'\\]"),
    "wrong_type": (_with(["value", "memory_budget_bytes"], "8GB"), "expected an integer"),
    "bad_tier": (_with(["value", "store_tiers"], {"m": "tape"}), "'tape' is not one of"),
    "negative_size": (_with(["value", "memory_budget_bytes"], -1), "must be a finite number >= 0"),
    "other_name": (encode_server(server("s2")), "the key holds server 's1'"),
}


@pytest.mark.etcd
@pytest.mark.parametrize(("raw", "message"), CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_value_is_refused_with_the_key_when_read_back(
    etcd: Etcd, etcd_store: EtcdClusterState, raw: bytes, message: str
) -> None:
    key = etcd_store.server_key("s1")
    _raw_put(etcd, key, raw)
    with pytest.raises(CorruptClusterStateError, match=message) as e:
        etcd_store.get_server("s1")
    assert key in str(e.value)
    with pytest.raises(CorruptClusterStateError, match=message):
        etcd_store.read()


@pytest.mark.etcd
def test_corrupt_epoch_record_is_refused_when_read_back(etcd: Etcd, etcd_store: EtcdClusterState) -> None:
    _raw_put(etcd, etcd_store.epoch_key("s1"), b"7")
    with pytest.raises(CorruptClusterStateError, match="schema version None"):
        etcd_store.epoch("s1")


# --- etcd unavailable, bad configuration ---------------------------------------------------------------


def test_store_calls_raise_unavailable_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    store = EtcdClusterState(f"http://127.0.0.1:{port}", timeout_s=0.5)
    for call in (
        lambda: store.get_server("s1"),
        store.read,
        lambda: store.put_model(spec()),
        store.grant_lease,
    ):
        with pytest.raises(ClusterStateUnavailable, match=f"127.0.0.1:{port}.*check that etcd runs"):
            call()


def test_store_calls_raise_unavailable_within_the_timeout_when_etcd_hangs() -> None:
    """A listener that accepts connections and never answers (a stopped etcd): bounded, never a hang."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        store = EtcdClusterState(f"http://127.0.0.1:{s.getsockname()[1]}", timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(ClusterStateUnavailable, match=r"within 0\.3 s"):
            store.snapshot(now=0.0)
        assert time.monotonic() - t0 < 5.0, "the call was not bounded by its timeout"


@pytest.mark.etcd
def test_store_recovers_by_itself_when_etcd_returns(etcd: Etcd, etcd_store: EtcdClusterState) -> None:
    rev = etcd_store.put_model(spec())
    etcd.restart()
    assert etcd_store.get_model("m").revision == rev  # data kept, stale keep-alive connection replaced
    assert etcd_store.put_model(spec("n")) > rev


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        ("127.0.0.1:2379", {}),
        ("ftp://127.0.0.1:2379", {}),
        ("http://127.0.0.1:2379/v3", {}),
        ("http://user@127.0.0.1:2379", {}),
        ("http://127.0.0.1:99999", {}),
        ("http://127.0.0.1:2379", {"prefix": "warmstart"}),
        ("http://127.0.0.1:2379", {"timeout_s": 0}),
        ("http://127.0.0.1:2379", {"timeout_s": float("inf")}),
    ],
)
def test_etcd_store_refuses_a_malformed_configuration(url: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidEtcdConfig):
        EtcdClusterState(url, **kwargs)  # type: ignore[arg-type]
