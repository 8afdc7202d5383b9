"""Releases and the scheduler: a release needs the server's key and is refused while a generation runs; a
model released under the router leaves routing at once and is loaded afresh; a release whose unload fails
leaves no model READY but dead.

The real cases run one tritonserver with the real ``warmstart`` backend on a tiny random Llama, behind a
scheduler; releases are sent straight to the tritonserver's inference port, as any client there can.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _scheduler_cluster import REPO_KEY, BackgroundScheduler, scheduler_config
from _triton_release import raw_release
from backend_support import make_tiny_checkpoint, write_model

from warmstart.scheduler.config import SchedulerConfig
from warmstart.scheduler.router import Router, _InstanceRT
from warmstart.scheduler.upstream import (
    GenerationRequest,
    ModelUnloadFailed,
    TokenChunk,
    TritonUpstream,
    UpstreamModelReleased,
)
from warmstart.triton import TritonConfig, TritonServer

MIB = 1 << 20
BANDWIDTH = {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8}
KEY = {"warmstart_release_key": REPO_KEY}


# -- the router alone (a server answering as a released warmstart model does) -----------------------------


class _ReleasedUpstream:
    """A server whose model ``m`` was released under the router, and whose unload failed or never came: it
    stays READY and answers every generation "released" until it is unloaded; a load of a READY model is
    a no-op there (as in tritonserver 2.51). Every call is recorded."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.ready = True  # in Triton's index
        self.released = True  # its engine is gone

    async def generate(self, req: GenerationRequest, *, idle_timeout_s: float) -> AsyncIterator[TokenChunk]:
        self.events.append("generate")
        if self.released:
            raise UpstreamModelReleased(f"a: model {req.model!r} released; it is being unloaded")
        yield TokenChunk("x", (7,), "length", True)

    async def unload(self, name: str, *, wait_s: float = 30.0) -> None:
        self.events.append(f"unload {name}")
        self.ready = False

    async def load(self, name: str, config: Any, *, timeout_s: float) -> float:
        self.events.append(f"load {name}")
        if not self.ready:  # a real load: a fresh instance
            self.ready, self.released = True, False
        return 0.1

    async def check_live(self, timeout_s: float | None = None) -> None:
        pass

    async def close(self) -> None:
        pass


def test_a_model_answering_released_leaves_routing_and_is_unloaded_before_it_loads_again() -> None:
    config = SchedulerConfig.from_dict(
        {
            "servers": [{"name": "a", "grpc": "127.0.0.1:1", "bandwidth": BANDWIDTH}],
            "models": {"m": {"checkpoint": "s3://models/m", "size_bytes": MIB}},
        }
    )

    async def scenario() -> list[str]:
        fake = _ReleasedUpstream()
        router = Router(config, renderer=lambda m: {}, upstream_factory=lambda server: fake)
        rt = router.servers["a"]
        rt.healthy = True
        rt.instances["m"] = _InstanceRT("m", MIB, last_used_s=0.0)
        try:
            gen = router.new_generation("m", "hi", {"max_tokens": 1})
            chunks = [c async for c in router.stream(gen)]
            assert [c.token_ids for c in chunks] == [(7,)]
            assert gen.failovers == 1 and rt.unloading == {}
            return fake.events
        finally:
            await router.close()

    # one failover: the unload comes before the load, so the load is a real one
    assert asyncio.run(scenario()) == ["generate", "unload m", "load m", "generate"]


# -- real tritonserver and backend ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("sched-release")
    ckpt = make_tiny_checkpoint(root / "tiny_llama", "llama")
    repo = root / "repo"
    for name in ("solo", "evict_a", "evict_b"):
        write_model(repo, name, str(ckpt), "torch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # 2 shared cores
        server = TritonServer(
            TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY), workdir=root / "t0"
        )
        server.start()
    try:
        yield server
    finally:
        server.stop()


def _scheduler(
    triton: TritonServer, names: tuple[str, ...], *, upstream_factory: Any = None, **server: Any
) -> BackgroundScheduler:
    ckpt = Path(triton.config.model_repositories[0]).parent / "tiny_llama"
    return BackgroundScheduler(
        scheduler_config(
            [
                {
                    "name": "s0",
                    "grpc": triton.grpc_url,
                    "repository_api_key": REPO_KEY,
                    "bandwidth": BANDWIDTH,
                    **server,
                }
            ],
            {n: {"checkpoint": str(ckpt), "engine": "torch", "size_bytes": MIB} for n in names},
        ),
        **({"upstream_factory": upstream_factory} if upstream_factory is not None else {}),
    )


class _FailingUnloads(TritonUpstream):
    """The real upstream, whose unloads of the models in ``failing`` fail (as an unload that times out)."""

    failing: frozenset[str] | set[str] = frozenset()

    async def unload(self, name: str, *, wait_s: float = 30.0) -> None:
        if name in self.failing:
            raise ModelUnloadFailed(f"{self.name}: unloading {name!r} failed: injected by the test")
        await super().unload(name, wait_s=wait_s)


async def _generate(
    sched: BackgroundScheduler, model: str, max_tokens: int, *, at: int | None = None, hook: Any = None
) -> tuple[list[int], str | None, Any]:
    """Token ids and finish reason of one scheduler generate_stream; ``hook()`` runs (in a thread) once
    ``at`` tokens arrived, and its result comes back third."""
    body = {"text_input": "Once upon a time", "parameters": {"stream": True, "max_tokens": max_tokens}}
    tokens: list[int] = []
    finish = None
    task: asyncio.Future[Any] | None = None
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sched.http}/v2/models/{model}/generate_stream", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                tokens.extend(event["token_ids"])
                finish = event.get("finish_reason") or finish
                if at is not None and task is None and len(tokens) >= at:
                    task = asyncio.get_running_loop().run_in_executor(None, hook)
    return tokens, finish, (await task if task is not None else None)


def _state(triton: TritonServer, model: str) -> str | None:
    return {m["name"]: m.get("state") for m in triton.repository_index()}.get(model)


def _wait_state(triton: TritonServer, model: str, state: str) -> None:
    deadline = time.monotonic() + 30
    while (now := _state(triton, model)) != state:
        assert time.monotonic() < deadline, f"{model} stayed {now}, never {state}"
        time.sleep(0.05)


@pytest.mark.triton
@pytest.mark.slow
def test_a_release_sent_during_a_scheduler_generation_is_refused_and_the_generation_completes(
    triton: TritonServer,
) -> None:
    """The release packet of the report: no inputs, ``warmstart_release`` = true, sent to the inference
    port while the scheduler streams from that model. Without the key it is refused; with it, it is refused
    because a generation runs; the generation gets every token it asked for."""
    sched = _scheduler(triton, ("solo",))
    try:

        def intrude() -> tuple[str, str]:
            flag = {"warmstart_release": True}
            return raw_release(triton.grpc_url, "solo", flag), raw_release(
                triton.grpc_url, "solo", {**flag, **KEY}
            )

        tokens, finish, (keyless, keyed) = asyncio.run(_generate(sched, "solo", 400, at=3, hook=intrude))
        assert "release refused (no key)" in keyless, keyless
        assert "cannot release with 1 generation(s) in flight" in keyed, keyed
        assert (len(tokens), finish) == (400, "length")
        assert _state(triton, "solo") == "READY"
        assert sched.state()["stats"]["failovers"] == 0
        again, finish, _ = asyncio.run(_generate(sched, "solo", 8))
        assert (again, finish) == (tokens[:8], "length")  # greedy: the same engine, the same tokens
    finally:
        sched.close()
        triton.unload_model("solo")


@pytest.mark.triton
@pytest.mark.slow
def test_a_model_released_under_the_router_is_loaded_again_by_the_next_request(triton: TritonServer) -> None:
    """A keyed release from outside the scheduler (an operator, or a second scheduler) while the model is
    idle: the next requests all succeed (the model is loaded afresh), where before every request got
    502 "failed after 3 failovers" while Triton said READY."""
    sched = _scheduler(triton, ("solo",))
    try:
        reference, _, _ = asyncio.run(_generate(sched, "solo", 8))
        assert (
            raw_release(triton.grpc_url, "solo", {"warmstart_release": True, **KEY})
            == "finish_reason: released"
        )
        for _ in range(3):
            tokens, finish, _ = asyncio.run(_generate(sched, "solo", 8))
            assert (tokens, finish) == (reference, "length")
        state = sched.state()
        assert state["stats"]["loads"] == {"s0/solo": 2}, state
        assert state["stats"]["failovers"] <= 1, state
        assert _state(triton, "solo") == "READY"
    finally:
        sched.close()
        triton.unload_model("solo")


@pytest.mark.triton
@pytest.mark.slow
def test_a_release_whose_unload_fails_leaves_no_ready_but_dead_model(triton: TritonServer) -> None:
    """Room for one model: loading evict_b evicts evict_a (released), and the scheduler's unload of evict_a
    fails. evict_a still leaves READY (its backend unloads a released model itself), and the next request for
    it loads it again and gets the right tokens."""
    failing: set[str] = set()

    def upstream(server: Any) -> TritonUpstream:
        up = _FailingUnloads(server, timeout_s=5.0, retries=3)
        up.failing = failing
        return up

    sched = _scheduler(triton, ("evict_a", "evict_b"), upstream_factory=upstream, memory_budget_bytes=MIB)
    try:
        reference, _, _ = asyncio.run(_generate(sched, "evict_a", 8))
        failing.add("evict_a")
        tokens, _, _ = asyncio.run(_generate(sched, "evict_b", 8))
        assert tokens == reference  # same checkpoint
        assert sched.state()["stats"]["releases"] == 1
        _wait_state(triton, "evict_a", "UNAVAILABLE")  # no unload of it succeeded
        failing.clear()
        tokens, finish, _ = asyncio.run(_generate(sched, "evict_a", 8))
        assert (tokens, finish) == (reference, "length")
        assert sched.state()["stats"]["loads"]["s0/evict_a"] == 2
    finally:
        sched.close()
        for name in ("evict_a", "evict_b"):
            triton.unload_model(name)
