"""The pure parts of how a scheduler replica follows the servers' shared allocations: which instances it
adopts, confirms, drops and records each replica round, and the bytes other replicas hold that shrink its
view of a server's budget."""

from __future__ import annotations

import pytest

from warmstart.scheduler.errors import InvalidSnapshotError
from warmstart.scheduler.replicas import ReplicaCoordinator, sync_with_allocation
from warmstart.scheduler.state import (
    Allocation,
    InMemoryClusterState,
    Instance,
    LoadClaim,
    NodeBandwidth,
    ServerState,
)
from warmstart.scheduler.state_json import encode_server

MIB = 1 << 20


def _view(**kw: object) -> Allocation:
    return Allocation(server="s1", revision=3, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "view", "instances", "in_flight", "busy", "want"),
    [
        ("another replica's load is adopted", _view(loaded={"m1": MIB}), {}, (), (), ({"m1": MIB}, (), (), {})),
        ("an unknown model is not adopted", _view(loaded={"zz": MIB}), {}, (), (), ({}, (), (), {})),
        ("a model it unloads itself is not adopted", _view(loaded={"m1": MIB}), {}, ("m1",), (), ({}, (), (), {})),
        ("a shared instance still loaded stays", _view(loaded={"m1": MIB}), {"m1": (MIB, True)}, (), (),
         ({}, (), (), {})),
        ("an index-found instance the allocation has is confirmed", _view(loaded={"m1": MIB}),
         {"m1": (MIB, False)}, (), (), ({}, ("m1",), (), {})),
        ("a shared instance gone from the allocation is dropped", _view(), {"m1": (MIB, True)}, (), (),
         ({}, (), ("m1",), {})),
        ("one another replica is unloading is dropped", _view(unloading={"m1": LoadClaim("r2", MIB)}),
         {"m1": (MIB, False)}, (), (), ({}, (), ("m1",), {})),
        ("one another replica is loading again is dropped", _view(loads={"m1": LoadClaim("r2", MIB)}),
         {"m1": (MIB, True)}, (), (), ({}, (), ("m1",), {})),
        ("a busy one is never dropped", _view(), {"m1": (MIB, True)}, (), ("m1",), ({}, (), (), {})),
        ("an index-found instance unknown to the allocation is recorded", _view(), {"m1": (MIB, False)}, (),
         (), ({}, (), (), {"m1": MIB})),
        ("its own load in flight is left alone", _view(), {"m1": (MIB, True)}, ("m1",), (), ({}, (), (), {})),
        ("later, an index-found instance unknown to the allocation is dropped", _view(),
         {"m1": (MIB, False), "first": False}, (), (), ({}, (), ("m1",), {})),
    ],
)  # fmt: skip
def test_a_replica_round_follows_the_allocation(
    case: str,
    view: Allocation,
    instances: dict[str, tuple[int, bool]],
    in_flight: tuple[str, ...],
    busy: tuple[str, ...],
    want: tuple[dict[str, int], tuple[str, ...], tuple[str, ...], dict[str, int]],
) -> None:
    instances = dict(instances)
    first = bool(instances.pop("first", True))  # type: ignore[arg-type]
    sync = sync_with_allocation(
        view, instances, in_flight=in_flight, busy=busy, models={"m1", "m2"}, first=first
    )
    assert (dict(sync.adopt), tuple(sorted(sync.confirm)), sync.drop, dict(sync.record)) == want, case


def test_bytes_other_replicas_hold_beyond_what_this_one_tracks_are_counted() -> None:
    coord = ReplicaCoordinator(InMemoryClusterState(), name="me")
    coord.views["s1"] = _view(
        loaded={"m1": 2 * MIB, "m2": 3 * MIB},
        unloading={"m3": LoadClaim("other", 5 * MIB), "m4": LoadClaim("me", 7 * MIB)},
        loads={"m5": LoadClaim("other", 11 * MIB)},
    )
    # m1 is routed to here; m2 is held by another replica's load it has not adopted; m3 is being freed by
    # another replica; m4 is its own unload (already counted as freeing); m5 is counted as a load in flight
    assert coord.others_holding("s1", {"m1", "m4"}) == (3 * MIB, 5 * MIB)
    assert coord.others_holding("s1", {"m1", "m2", "m3", "m4"}) == (0, 0)
    assert coord.others_holding("s2", set()) == (0, 0)
    assert coord.others_loads("s1") == {"m5": 11 * MIB}


def test_models_other_replicas_generations_use_are_pinned_and_a_pinned_state_is_never_stored() -> None:
    coord = ReplicaCoordinator(InMemoryClusterState(), name="me")
    coord.views["s1"] = _view(
        loaded={"m1": MIB, "m2": MIB, "m3": MIB}, in_use={"m1": {"other": 2}, "m2": {"me": 1}, "m3": {}}
    )
    assert coord.others_using("s1") == frozenset({"m1"})  # its own count does not pin m2 for itself
    assert coord.others_using("s2") == frozenset()
    state = ServerState(
        name="s1",
        healthy=True,
        memory_budget_bytes=4 * MIB,
        bandwidth=NodeBandwidth(1e9, 1e8, 1e7),
        triton_load_overhead_s=0.1,
        instances=(Instance("m1", MIB, 0.0, (), pinned=True),),
    )
    assert not state.instances[0].idle
    with pytest.raises(InvalidSnapshotError, match="pinned"):
        encode_server(state)


def test_a_record_of_a_model_the_server_does_not_have_is_taken_out_unless_in_use_or_loading() -> None:
    import asyncio

    store = InMemoryClusterState()

    async def scenario() -> tuple[bool, bool, bool, dict[str, int]]:
        me = ReplicaCoordinator(store, name="me")
        other = store.grant_lease(30)
        for m in ("m1", "m2", "m3"):
            store.finish_load("s1", m, "gone", size_bytes=MIB)  # recorded loaded by a replica now gone
        store.set_in_use("s1", "m2", "other", 1, lease=other)  # another replica streams from m2
        view = store.allocation("s1")
        store.claim_load("s1", "m4", MIB, "other", lease=other, expected_revision=view.revision)
        await me.refresh("s1")
        m1 = await me.forget_loaded("s1", "m1")
        m2 = await me.forget_loaded("s1", "m2")
        m4 = await me.forget_loaded("s1", "m4")  # not recorded loaded: being loaded
        await me.close()
        return m1, m2, m4, dict(store.allocation("s1").loaded)

    m1, m2, m4, loaded = asyncio.run(scenario())
    assert (m1, m2, m4) == (True, False, False)
    assert loaded == {"m2": MIB, "m3": MIB}
    assert store.allocation("s1").unloading == {}  # its unload is recorded as done at once
