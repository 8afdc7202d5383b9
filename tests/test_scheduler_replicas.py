"""Replicated schedulers: two routers sharing one cluster state take their load and unload decisions as
compare-and-sets on each server's allocation. Never two loads of one model on one server, never a server's
memory budget overcommitted by the two together, never a model unloaded under another replica's generation;
a dead replica's claims expire with its lease and the other carries on.

Both replicas run in one event loop against the in-memory store (the etcd store passes the same
allocation tests, tests/test_cluster_state_conformance.py) and one fake Triton server shared by their
scripted upstreams, which records every load and unload and fails the test on an overcommit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from test_scheduler_streams import WORDS, ScriptedUpstream

from warmstart.node import NodeAgent
from warmstart.scheduler.config import ModelConfig, SchedulerConfig
from warmstart.scheduler.router import Router
from warmstart.scheduler.state import InMemoryClusterState, NodeBandwidth, NodeRecord
from warmstart.scheduler.upstream import GenerationRequest, TokenChunk

MIB = 1 << 20


class FakeTriton:
    """One Triton server's repository as both replicas see it: what is loaded, and every call."""

    def __init__(self, budget_models: int) -> None:
        self.budget_models = budget_models
        self.loaded: set[str] = set()
        self.events: list[str] = []
        self.max_loaded = 0
        self.load_delay_s = 0.2


class SharedUpstream(ScriptedUpstream):
    """One replica's connection to the shared fake server."""

    def __init__(self, server: FakeTriton, gate: asyncio.Event | None = None) -> None:
        super().__init__("s1", gate=gate)
        self.server = server
        self.repository = ("m1", "m2")

    async def load(self, name: str, config: Any, *, timeout_s: float) -> float:
        s = self.server
        s.events.append(f"load {name}")
        await asyncio.sleep(s.load_delay_s)
        s.loaded.add(name)
        s.max_loaded = max(s.max_loaded, len(s.loaded))
        assert len(s.loaded) <= s.budget_models, f"overcommitted: {sorted(s.loaded)} loaded together"
        return s.load_delay_s

    async def release(self, name: str, *, timeout_s: float) -> float:
        self.server.events.append(f"release {name}")
        self.server.loaded.discard(name)
        return 0.0

    async def unload(self, name: str, *, wait_s: float = 30.0) -> None:
        self.server.events.append(f"unload {name}")
        self.server.loaded.discard(name)

    async def index(self) -> list[dict[str, str]]:
        return [
            {
                "name": n,
                "version": "1",
                "state": "READY" if n in self.server.loaded else "UNAVAILABLE",
                "reason": "",
            }
            for n in self.repository
        ]

    async def generate(
        self, req: GenerationRequest, *, idle_timeout_s: float
    ) -> AsyncGenerator[TokenChunk, None]:
        assert req.model in self.server.loaded, f"generation on {req.model}, which is not loaded"
        async for chunk in super().generate(req, idle_timeout_s=idle_timeout_s):
            yield chunk


def _replica(store: InMemoryClusterState, upstream: SharedUpstream, **extra: Any) -> Router:
    models = {
        m: {"checkpoint": f"s3://models/{m}", "size_bytes": MIB, "keep_alive_s": 60} for m in ("m1", "m2")
    }
    config = SchedulerConfig.from_dict(
        {
            "models": models,
            "etcd": "http://127.0.0.1:2379",  # replicated mode; the shared store is injected
            "node_poll_interval_s": 0.05,
            "health_interval_s": 0.05,
            "replica_lease_ttl_s": 1,
            "initial_load_overhead_s": 0.2,
            **extra,
        }
    )
    return Router(config, store=store, renderer=lambda m: {}, upstream_factory=lambda server: upstream)


async def _up(store: InMemoryClusterState, *routers: Router) -> NodeAgent:
    agent = NodeAgent(
        store,
        NodeRecord(
            "s1",
            grpc="127.0.0.1:8001",
            memory_budget_bytes=MIB,
            epoch=1,
            bandwidth=NodeBandwidth(1e10, 1e9, 1e8),
        ),
        ttl_s=30,
    )
    agent.step()
    for r in routers:
        await r.start()
    for _ in range(200):
        if all("s1" in r.servers and r.servers["s1"].healthy for r in routers):
            return agent
        await asyncio.sleep(0.02)
    raise AssertionError("the replicas did not find the node")


async def _tokens(router: Router, model: str, n: int) -> list[int]:
    return [
        t
        async for c in router.stream(router.new_generation(model, "hi", {"max_tokens": n}))
        for t in c.token_ids
    ]


def test_two_replicas_asked_for_one_cold_model_at_once_load_it_once() -> None:
    store = InMemoryClusterState()
    server = FakeTriton(budget_models=1)

    async def scenario() -> tuple[list[int], list[int]]:
        a, b = _replica(store, SharedUpstream(server)), _replica(store, SharedUpstream(server))
        await _up(store, a, b)
        try:
            got_a, got_b = await asyncio.gather(_tokens(a, "m1", 4), _tokens(b, "m1", 4))
            return got_a, got_b
        finally:
            await a.close()
            await b.close()

    got_a, got_b = asyncio.run(scenario())
    assert got_a == got_b == WORDS[:4]
    assert server.events.count("load m1") == 1, server.events  # the replica that lost the race joined


def test_a_model_another_replica_is_using_is_not_evicted_and_the_budget_is_never_overcommitted() -> None:
    store = InMemoryClusterState()
    server = FakeTriton(budget_models=1)  # room for one model only
    gate = asyncio.Event()
    refused: list[int] = []
    reads: list[int] = []

    async def scenario() -> tuple[list[int], list[int], list[str]]:
        a = _replica(store, SharedUpstream(server, gate=gate))
        b = _replica(store, SharedUpstream(server), cold_start_timeout_s=20)
        await _up(store, a, b)
        try:
            long_a = asyncio.create_task(_tokens(a, "m1", 4))  # a's generation holds m1 (gated)
            for _ in range(200):
                if "m1" in server.loaded and a.servers["s1"].instances["m1"].requests:
                    break
                await asyncio.sleep(0.02)
            for _ in range(2):
                gate.set()
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a's in-use count reaches the store; b's snapshot shows m1 loaded
            want_b = asyncio.create_task(_tokens(b, "m2", 2))
            await asyncio.sleep(1.0)
            during = list(server.events)  # b must not evict m1 while a streams from it
            for _ in range(4):
                gate.set()
                await asyncio.sleep(0.05)
            got_a = await asyncio.wait_for(long_a, 10)
            got_b = await asyncio.wait_for(want_b, 15)  # then b evicts m1 and loads m2
            assert b.coordinator is not None
            refused.append(b.coordinator.stats.outcomes["unload_refused"])
            reads.append(b.coordinator.stats.summary()["ops"]["decision_read"]["n"])
            return got_a, got_b, during
        finally:
            await a.close()
            await b.close()

    got_a, got_b, during = asyncio.run(scenario())
    assert got_a == WORDS[:4] and got_b == WORDS[:2]
    assert "release m1" not in during and "unload m1" not in during and "load m2" not in during, during
    assert server.max_loaded == 1  # never two models on a server with room for one
    assert server.events.index("load m2") > server.events.index("release m1"), server.events
    # b saw m1 pinned by a's generation (a's in-use count) and waited, instead of asking to evict it over
    # and over while a streamed
    assert refused == [0], refused
    # while queued it read s1's allocation again before deciding, and those reads are in its stats
    assert reads[0] >= 1, reads


def test_a_dead_replicas_claim_expires_and_the_other_loads_the_model() -> None:
    store = InMemoryClusterState()
    server = FakeTriton(budget_models=1)

    async def scenario() -> list[int]:
        b = _replica(store, SharedUpstream(server))
        await _up(store, b)
        try:
            lease = store.grant_lease(1)  # replica "a" claimed m1 on s1, then died before loading it
            view = store.allocation("s1")
            store.claim_load("s1", "m1", MIB, "replica-a", lease=lease, expected_revision=view.revision)
            return await asyncio.wait_for(_tokens(b, "m1", 3), 15)  # joins, then a's lease ends: b loads it
        finally:
            await b.close()

    assert asyncio.run(scenario()) == WORDS[:3]
    assert server.events.count("load m1") == 1


def test_a_model_added_through_one_replica_is_served_by_the_other_and_withdrawn_from_both() -> None:
    store = InMemoryClusterState()
    server = FakeTriton(budget_models=1)

    async def scenario() -> tuple[list[int], bool, bool]:
        a, b = _replica(store, SharedUpstream(server)), _replica(store, SharedUpstream(server))
        await _up(store, a, b)
        try:
            extra = ModelConfig.from_dict("m3", {"checkpoint": "s3://models/m3", "size_bytes": MIB})
            await a.add_model(extra)  # the admin API's call, on replica a
            for _ in range(100):
                if "m3" in b.models:
                    break
                await asyncio.sleep(0.02)
            for u in (a, b):
                u.servers["s1"].upstream.repository = ("m1", "m2", "m3")  # type: ignore[attr-defined]
                u.servers["s1"].repository = frozenset({"m1", "m2", "m3"})
            got = await _tokens(b, "m3", 2)
            await a.remove_model("m3")
            for _ in range(100):
                if "m3" not in b.models:
                    break
                await asyncio.sleep(0.02)
            return got, "m3" in b.models, b.models.get("m3") is None
        finally:
            await a.close()
            await b.close()

    got, still, gone = asyncio.run(scenario())
    assert got == WORDS[:2]  # replica b served a model only replica a was given
    assert not still and gone  # withdrawn through a, withdrawn from b


def test_a_model_another_replica_evicted_leaves_routing_and_is_loaded_again_when_asked_for() -> None:
    store = InMemoryClusterState()
    server = FakeTriton(budget_models=1)

    async def scenario() -> tuple[list[int], list[int], list[int]]:
        a, b = _replica(store, SharedUpstream(server)), _replica(store, SharedUpstream(server))
        await _up(store, a, b)
        try:
            first = await _tokens(a, "m1", 2)  # a loads m1
            for _ in range(200):  # b's replica round adopts it
                if "m1" in b.servers["s1"].instances:
                    break
                await asyncio.sleep(0.02)
            assert "m1" in b.servers["s1"].instances
            other = await _tokens(a, "m2", 2)  # a evicts m1 for m2
            for _ in range(200):  # b's round sees m1 gone from the allocation
                if "m1" not in b.servers["s1"].instances:
                    break
                await asyncio.sleep(0.02)
            again = await asyncio.wait_for(_tokens(b, "m1", 3), 15)  # b loads it again, no stale route
            await asyncio.sleep(1.0)  # a few replica rounds: nothing records a model that is not loaded
            return first, other, again
        finally:
            await a.close()
            await b.close()

    first, other, again = asyncio.run(scenario())
    assert first == other == WORDS[:2] and again == WORDS[:3]
    assert server.max_loaded == 1
    assert server.events.count("load m1") == 2, server.events
    assert set(store.allocation("s1").loaded) == server.loaded, (store.allocation("s1"), server.loaded)
