"""Node agents join and leave by themselves: registration under a lease, renewal, re-registration after a
lapse, fencing of an older incarnation, a clean stop; and the scheduler following the registrations (a new
node routable with no admin call, a node whose registration ends leaving routing while its generation
resumes elsewhere token-exactly).

The agent's rounds run against the in-memory store on a clock the test drives, and against a real etcd;
``warmstart node`` runs as a real process that is SIGKILLed. The router side uses scripted upstreams
(tests/test_scheduler_streams.py) so no Triton process is needed to see routing follow cluster state.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from test_scheduler_streams import WORDS, ScriptedUpstream

from warmstart.etcd import Etcd
from warmstart.node import NodeAgent, NodeAgentError
from warmstart.scheduler.config import ModelConfig, SchedulerConfig
from warmstart.scheduler.errors import ClusterStateUnavailable, StaleEpochError
from warmstart.scheduler.etcd_state import EtcdClusterState
from warmstart.scheduler.protocol import status_of
from warmstart.scheduler.router import Router, _InstanceRT
from warmstart.scheduler.state import InMemoryClusterState, NodeBandwidth, NodeRecord, Tier

MIB = 1 << 20
BW = NodeBandwidth(1e10, 1e9, 1e8)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(name: str = "n1", grpc: str = "127.0.0.1:8001") -> NodeRecord:
    return NodeRecord(name, grpc=grpc, memory_budget_bytes=8 << 30, epoch=1, bandwidth=BW)


def test_an_agent_registers_under_a_lease_and_renewing_keeps_it_past_the_ttl() -> None:
    clock = Clock()
    store = InMemoryClusterState(clock=clock)
    agent = NodeAgent(store, record(), ttl_s=3)
    assert agent.step()
    got = store.get_node("n1").value
    assert got.epoch == agent.epoch == store.epoch("n1") and got.grpc == "127.0.0.1:8001"
    for _ in range(5):  # 10 s in all, renewed every 2 s
        clock.now += 2
        assert agent.step()
    assert "n1" in store.read().nodes and agent.registrations == 1  # nothing changed: no rewrite


def test_a_lapsed_lease_is_replaced_and_the_node_registered_again() -> None:
    clock = Clock()
    store = InMemoryClusterState(clock=clock)
    agent = NodeAgent(store, record(), ttl_s=3)
    agent.step()
    first = agent.lease
    clock.now += 5  # the agent was stopped (a pause, a cut link) longer than its TTL
    assert "n1" not in store.read().nodes
    assert agent.step()
    assert agent.lease != first and store.get_node("n1").value.epoch == agent.epoch
    assert agent.registrations == 2


def test_an_older_incarnation_is_fenced_off_once_the_node_restarted() -> None:
    store = InMemoryClusterState()
    old = NodeAgent(store, record(grpc="127.0.0.1:8001"), ttl_s=30)
    old.step()
    new = NodeAgent(store, record(grpc="127.0.0.1:9001"), ttl_s=30)  # the restarted node
    new.step()
    assert new.epoch is not None and old.epoch is not None and new.epoch > old.epoch
    # the old incarnation's next write is refused, and it stops for good
    assert old.step() is True  # renewal only: its record did not change, nothing written
    changed = NodeRecord("n1", grpc="127.0.0.1:8001", memory_budget_bytes=1 << 30, epoch=old.epoch)
    with pytest.raises(StaleEpochError):
        store.put_node(changed)
    old._base = changed  # its next round would write a changed record
    assert old.step() is False and old.superseded
    assert store.get_node("n1").value.grpc == "127.0.0.1:9001"
    old.stop()  # a superseded agent does not revoke: the lease it holds is not the node's any more
    assert store.get_node("n1").value.epoch == new.epoch


def test_an_inventory_change_rewrites_the_record() -> None:
    store = InMemoryClusterState()
    tiers: dict[str, Tier] = {"a": Tier.DISK}
    agent = NodeAgent(store, record(), ttl_s=30, inventory=lambda: (BW, dict(tiers)))
    agent.step()
    assert store.get_node("n1").value.store_tiers == {"a": Tier.DISK}
    tiers["a"] = Tier.MEMORY
    tiers["b"] = Tier.DISK
    agent.step()
    assert store.get_node("n1").value.store_tiers == {"a": Tier.MEMORY, "b": Tier.DISK}
    assert agent.registrations == 2


def test_a_clean_stop_revokes_the_lease_so_the_node_leaves_at_once() -> None:
    store = InMemoryClusterState()
    agent = NodeAgent(store, record(), ttl_s=30)
    agent.start()
    assert "n1" in store.read().nodes
    agent.stop()
    assert "n1" not in store.read().nodes


def test_cluster_state_away_is_retried_and_a_bad_ttl_refused() -> None:
    class Away(InMemoryClusterState):
        def begin_incarnation(self, server: str) -> int:
            raise ClusterStateUnavailable("etcd at http://127.0.0.1:1: connection refused")

    agent = NodeAgent(Away(), record(), ttl_s=30)
    assert agent.step() is True and agent.record is None  # logged, tried again next round
    with pytest.raises(NodeAgentError, match="whole number of seconds"):
        NodeAgent(InMemoryClusterState(), record(), ttl_s=0)


# --- the scheduler follows the registrations -----------------------------------------------------------


def _discovering_router(store: InMemoryClusterState, upstreams: dict[str, ScriptedUpstream]) -> Router:
    config = SchedulerConfig.from_dict(
        {
            "models": {"m": {"checkpoint": "s3://models/m", "size_bytes": MIB}},
            "etcd": "http://127.0.0.1:2379",  # discovery on; the store itself is injected
            "node_poll_interval_s": 0.05,
            "health_interval_s": 0.05,
        }
    )
    return Router(
        config, store=store, renderer=lambda m: {}, upstream_factory=lambda server: upstreams[server.name]
    )


async def _joined(router: Router, name: str) -> None:
    for _ in range(200):
        if name in router.servers and router.servers[name].healthy:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"node {name} did not join routing within 4 s")


def test_a_registered_node_becomes_routable_and_a_dead_one_leaves_with_its_generation_resumed() -> None:
    store = InMemoryClusterState()
    gate = asyncio.Event()
    a, b = ScriptedUpstream("a", gate=gate), ScriptedUpstream("b")

    async def scenario() -> tuple[list[int], list[str]]:
        router = _discovering_router(store, {"a": a, "b": b})
        await router.start()
        try:
            assert router.servers == {}
            agent_a = NodeAgent(store, record("a", "127.0.0.1:8001"), ttl_s=30)
            agent_a.step()  # no admin call, no restart: the next discovery round adds it
            await _joined(router, "a")
            router.servers["a"].instances["m"] = _InstanceRT("m", MIB, last_used_s=0.0)
            agent_b = NodeAgent(store, record("b", "127.0.0.1:8002"), ttl_s=30)
            agent_b.step()
            gen = router.new_generation("m", "hi", {"max_tokens": 6})
            got: list[int] = []

            async def client() -> None:
                async for c in router.stream(gen):
                    got.extend(c.token_ids)

            task = asyncio.create_task(client())
            for _ in range(2):
                gate.set()
                for _ in range(20):
                    await asyncio.sleep(0)
            assert got == WORDS[:2]
            await _joined(router, "b")
            router.servers["b"].instances["m"] = _InstanceRT("m", MIB, last_used_s=0.0)
            assert agent_a.lease is not None
            store.revoke_lease(agent_a.lease)  # node a's registration ends (as a lease expiry does)
            await asyncio.wait_for(task, 5)
            return got, sorted(router.servers)
        finally:
            await router.close()

    got, servers = asyncio.run(scenario())
    assert got == WORDS[:6]  # one continuous stream, token-exact across the failover
    assert servers == ["b"]
    assert b.requests[-1].generated == tuple(WORDS[:2])


# --- a real etcd, a real agent process ---------------------------------------------------------------


@pytest.fixture
def etcd_prefix(etcd: Etcd) -> Iterator[tuple[Etcd, str]]:
    yield etcd, f"/test-{uuid.uuid4().hex}/"


@pytest.mark.etcd
def test_a_sigkilled_node_agent_drops_out_within_its_lease_ttl(etcd_prefix: tuple[Etcd, str]) -> None:
    etcd, prefix = etcd_prefix
    store = EtcdClusterState(etcd.url, prefix=prefix)
    cmd = [
        sys.executable,
        "-m",
        "warmstart.cli",
        "node",
        "--etcd",
        etcd.url,
        "--name",
        "n1",
        "--grpc",
        "127.0.0.1:8001",
    ]
    cmd += ["--memory-budget", "8GiB", "--lease-ttl", "2", "--prefix", prefix]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("node n1 registered=True epoch="), (
            line + proc.stderr.read() if proc.stderr else ""
        )
        epoch = int(line.rsplit("=", 1)[1])
        assert store.get_node("n1").value.epoch == epoch
        time.sleep(3)  # longer than the TTL: renewals keep it
        assert "n1" in store.read().nodes
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        while "n1" in store.read().nodes and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        gone_after = time.monotonic() - t0
        assert "n1" not in store.read().nodes
        assert gone_after <= 2 + 1.5, f"registration outlived its 2 s lease by {gone_after - 2:.1f} s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        store.close()


@pytest.mark.etcd
def test_a_node_agent_stopped_by_sigterm_leaves_at_once(etcd_prefix: tuple[Etcd, str]) -> None:
    etcd, prefix = etcd_prefix
    store = EtcdClusterState(etcd.url, prefix=prefix)
    cmd = [
        sys.executable,
        "-m",
        "warmstart.cli",
        "node",
        "--etcd",
        etcd.url,
        "--name",
        "n2",
        "--grpc",
        "127.0.0.1:8002",
    ]
    cmd += ["--memory-budget", "1GiB", "--lease-ttl", "30", "--prefix", prefix]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("node n2 registered=True")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "n2" not in store.read().nodes  # revoked, not left to its 30 s TTL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        store.close()


def test_node_command_refuses_a_bad_endpoint_with_a_message() -> None:
    cmd = [sys.executable, "-m", "warmstart.cli", "node", "--etcd", "http://127.0.0.1:1", "--name", "n1"]
    cmd += ["--grpc", "nohost", "--memory-budget", "1GiB"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "grpc must be host:port" in done.stderr


# --- cluster state unreachable -------------------------------------------------------------------------


class SwitchableStore(InMemoryClusterState):
    """The in-memory store, made unreachable at will (as etcd is when it is down or partitioned): every
    call then raises ClusterStateUnavailable, as EtcdClusterState's do."""

    down = False
    _GATED = frozenset(
        {"put_server", "snapshot", "read", "keep_alive", "grant_lease", "allocation", "claim_load",
         "finish_load", "set_in_use", "release_loaded", "unloaded", "put_model", "put_deployment"}
    )  # fmt: skip

    def __getattribute__(self, name: str) -> Any:
        if name in type(self)._GATED and object.__getattribute__(self, "down"):

            def unreachable(*a: Any, **k: Any) -> Any:
                raise ClusterStateUnavailable("etcd at http://127.0.0.1:2379: connection refused")

            return unreachable
        return object.__getattribute__(self, name)


def test_with_cluster_state_unreachable_loaded_models_are_served_and_new_loads_refused_at_once() -> None:
    store = SwitchableStore()
    a = ScriptedUpstream("a")
    a.repository = ("m", "cold")

    async def scenario() -> tuple[list[int], str, float, list[int]]:
        router = _discovering_router(store, {"a": a})
        router._add_model(
            ModelConfig.from_dict("cold", {"checkpoint": "s3://models/cold", "size_bytes": MIB})
        )
        await router.start()
        try:
            NodeAgent(store, record("a", "127.0.0.1:8001"), ttl_s=30).step()
            await _joined(router, "a")
            router.servers["a"].instances["m"] = _InstanceRT("m", MIB, last_used_s=0.0)
            store.down = True
            warm = [
                t
                async for c in router.stream(router.new_generation("m", "hi", {"max_tokens": 3}))
                for t in c.token_ids
            ]
            t0 = time.monotonic()
            try:
                async for _ in router.stream(router.new_generation("cold", "hi", {"max_tokens": 3})):
                    pass
                refused = "served"
            except ClusterStateUnavailable as e:
                refused = str(e)
            waited = time.monotonic() - t0
            assert status_of(ClusterStateUnavailable("x")).http == 503
            assert "a" in router.servers  # the servers known stay while their registrations cannot be read
            store.down = False  # etcd is back: decisions resume by themselves
            cold = [
                t
                async for c in router.stream(router.new_generation("cold", "hi", {"max_tokens": 3}))
                for t in c.token_ids
            ]
            return warm, refused, waited, cold
        finally:
            await router.close()

    warm, refused, waited, cold = asyncio.run(scenario())
    assert warm == WORDS[:3]
    assert "cluster state is unreachable" in refused and "already loaded are still served" in refused
    assert waited < 1.0  # said at once, not after the cold-start timeout
    assert cold == WORDS[:3]
