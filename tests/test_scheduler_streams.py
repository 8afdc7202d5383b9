"""The generation stream without processes: failover, switch (also after the final token), pause/resume and
stale attempts, driven through the router with scripted upstreams injected by ``upstream_factory``.

Each scripted upstream answers every generation from a list of token ids: it streams them one per
response and either ends (final response) or fails after ``fail_after`` tokens, like a server that dies.
Assertions are on what the client received and what each server was asked to continue from.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from warmstart.scheduler.config import SchedulerConfig
from warmstart.scheduler.errors import SchedulerError
from warmstart.scheduler.router import GenerationFailed, Router, _InstanceRT
from warmstart.scheduler.streams import ChunkArrived, Generation, GenerationSource, ServerDest
from warmstart.scheduler.upstream import GenerationRequest, TokenChunk, UpstreamUnavailable

MIB = 1 << 20
BANDWIDTH = {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8}
WORDS = list(range(100, 120))  # the "model": token i of every generation is WORDS[i]


class ScriptedUpstream:
    """A server that continues any generation deterministically (token i is ``WORDS[i]``), like greedy
    decoding; ``fail_after`` tokens into a stream it fails as a dead server does, and stays dead."""

    def __init__(
        self, name: str, *, fail_after: int | None = None, gate: asyncio.Event | None = None
    ) -> None:
        self.name = name
        self.fail_after = fail_after
        self.gate = gate  # when set: each token waits for the test to open it
        self.requests: list[GenerationRequest] = []
        self.dead = False
        self.repository: tuple[str, ...] = ()  # model directories its repository index lists (not loaded)

    async def generate(
        self, req: GenerationRequest, *, idle_timeout_s: float
    ) -> AsyncGenerator[TokenChunk, None]:
        self.requests.append(req)
        if self.dead:
            raise UpstreamUnavailable(f"{self.name}: connection refused")
        n = int(req.sampling["max_tokens"])
        for i in range(len(req.generated), n):
            if self.fail_after is not None and i - len(req.generated) >= self.fail_after:
                self.dead = True
                raise UpstreamUnavailable(f"{self.name}: stream broken")
            if self.gate is not None:
                await self.gate.wait()
                self.gate.clear()
            final = i == n - 1
            yield TokenChunk(f"<{WORDS[i]}>", (WORDS[i],), "length" if final else None, final)
            await asyncio.sleep(0)

    async def check_live(self, timeout_s: float | None = None) -> None:
        if self.dead:
            raise UpstreamUnavailable(f"{self.name}: not live")

    async def index(self) -> list[dict[str, str]]:
        return [{"name": n, "version": "1", "state": "UNAVAILABLE", "reason": ""} for n in self.repository]

    async def load(self, name: str, config: Any, *, timeout_s: float) -> float:
        return 0.0

    async def unload(self, name: str, *, wait_s: float = 30.0) -> None:
        pass

    async def release(self, name: str, *, timeout_s: float) -> float:
        return 0.0

    async def close(self) -> None:
        pass


def _router(upstreams: dict[str, ScriptedUpstream], warm: tuple[str, ...], **extra: Any) -> Router:
    servers = [
        {"name": n, "grpc": f"127.0.0.1:{1 + i}", "bandwidth": BANDWIDTH} for i, n in enumerate(upstreams)
    ]
    config = SchedulerConfig.from_dict(
        {"servers": servers, "models": {"m": {"checkpoint": "s3://models/m", "size_bytes": MIB}}, **extra}
    )
    router = Router(config, renderer=lambda m: {}, upstream_factory=lambda server: upstreams[server.name])
    for name in upstreams:
        router.servers[name].healthy = True
    for name in warm:
        router.servers[name].instances["m"] = _InstanceRT("m", MIB, last_used_s=0.0)
    return router


def test_a_stream_that_breaks_resumes_on_another_server_from_the_tokens_the_client_has() -> None:
    a, b = ScriptedUpstream("a", fail_after=3), ScriptedUpstream("b")

    async def scenario() -> Generation:
        router = _router({"a": a, "b": b}, warm=("a",))
        router.servers["b"].instances["m"] = _InstanceRT("m", MIB, last_used_s=-1.0)
        try:
            gen = router.new_generation("m", "hi", {"max_tokens": 8})
            chunks = [c async for c in router.stream(gen)]
            assert [t for c in chunks for t in c.token_ids] == WORDS[:8]  # no gap, no repeat
            assert chunks[-1].final and gen.finish_reason == "length"
            return gen
        finally:
            await router.close()

    gen = asyncio.run(scenario())
    assert gen.failovers == 1
    assert [r.generated for r in a.requests] == [()]
    assert [r.generated for r in b.requests] == [tuple(WORDS[:3])]  # continued from the client's position
    assert a.requests[0].request_id != b.requests[0].request_id  # a new attempt


def test_a_generation_fails_with_a_clear_error_once_its_failovers_are_spent() -> None:
    a, b = ScriptedUpstream("a", fail_after=1), ScriptedUpstream("b", fail_after=1)

    async def scenario() -> tuple[list[int], BaseException | None]:
        router = _router({"a": a, "b": b}, warm=("a", "b"), max_failovers=1, cold_start_timeout_s=0.5)
        got: list[int] = []
        try:
            gen = router.new_generation("m", "hi", {"max_tokens": 8})
            try:
                async for c in router.stream(gen):
                    got.extend(c.token_ids)
            except SchedulerError as e:
                return got, e
            return got, None
        finally:
            await router.close()

    got, error = asyncio.run(scenario())
    assert got == WORDS[:2]  # one token from each server before it died
    assert isinstance(error, GenerationFailed), error
    assert "failed after 1 failovers" in str(error) and "stream broken" in str(error)


def test_chunks_held_while_paused_reach_the_client_in_order_when_the_migration_resumes() -> None:
    gate = asyncio.Event()
    a = ScriptedUpstream("a", gate=gate)

    async def scenario() -> list[int]:
        router = _router({"a": a}, warm=("a",))
        got: list[int] = []
        try:
            gen = router.new_generation("m", "hi", {"max_tokens": 6})
            source = GenerationSource(gen)

            async def client() -> None:
                async for c in router.stream(gen):
                    got.extend(c.token_ids)

            task = asyncio.create_task(client())
            for _ in range(2):  # two tokens through
                gate.set()
                for _ in range(20):
                    await asyncio.sleep(0)
            assert got == WORDS[:2]
            progress = await source.pause()
            assert progress.tokens == tuple(WORDS[:2])  # what the client has received
            for _ in range(2):  # two more arrive while paused: held, not delivered, not lost
                gate.set()
                for _ in range(20):
                    await asyncio.sleep(0)
            assert got == WORDS[:2] and gen.paused
            await source.resume()
            for _ in range(2):
                gate.set()
                for _ in range(20):
                    await asyncio.sleep(0)
            await asyncio.wait_for(task, 5)
            return got
        finally:
            await router.close()

    assert asyncio.run(scenario()) == WORDS[:6]


def test_a_switch_moves_the_stream_to_the_destination_without_a_gap_or_a_repeat() -> None:
    gate = asyncio.Event()
    a, b = ScriptedUpstream("a", gate=gate), ScriptedUpstream("b")

    async def scenario() -> tuple[list[int], Generation]:
        router = _router({"a": a, "b": b}, warm=("a", "b"))
        router.servers["b"].instances["m"].last_used_s = -1.0  # a is the warmer choice
        got: list[int] = []
        try:
            gen = router.new_generation("m", "hi", {"max_tokens": 7})

            async def client() -> None:
                async for c in router.stream(gen):
                    got.extend(c.token_ids)

            task = asyncio.create_task(client())
            for _ in range(3):
                gate.set()
                for _ in range(20):
                    await asyncio.sleep(0)
            assert gen.server == "a" and got == WORDS[:3]
            dest = ServerDest(
                gen, b, lambda: router.switch_upstream(gen, router.servers["b"]), idle_timeout_s=5.0
            )
            source = GenerationSource(gen)
            progress = await source.pause()
            await dest.replay([*(gen.prompt_ids or ()), *progress.tokens])
            await dest.start(progress)
            await asyncio.wait_for(task, 5)
            return got, gen
        finally:
            await router.close()

    got, gen = asyncio.run(scenario())
    assert got == WORDS[:7]
    assert gen.migrations == 1 and len(b.requests) == 2  # one replay round, then the stream
    assert b.requests[-1].generated == tuple(WORDS[:3])  # the real stream started from the client's position


def test_a_switch_that_arrives_after_the_final_token_is_dropped_and_its_slot_given_back() -> None:
    a, b = ScriptedUpstream("a"), ScriptedUpstream("b")

    async def scenario() -> tuple[list[int], Router, Generation]:
        router = _router({"a": a, "b": b}, warm=("a", "b"))
        router.servers["b"].instances["m"].last_used_s = -1.0
        gen = router.new_generation("m", "hi", {"max_tokens": 3})
        got: list[int] = []
        stream = router.stream(gen)
        try:
            async for c in stream:
                got.extend(c.token_ids)
                if c.final:
                    # the migration's switch lands in the queue after the last token was delivered
                    router.switch_upstream(gen, router.servers["b"])
            return got, router, gen
        finally:
            await stream.aclose()
            await router.close()

    got, router, gen = asyncio.run(scenario())
    assert got == WORDS[:3] and gen.migrations == 0
    assert gen.id not in router.servers["b"].instances["m"].requests  # the reserved slot was released
    assert gen.id not in router.servers["a"].instances["m"].requests


def test_chunks_from_a_replaced_attempt_are_dropped() -> None:
    a = ScriptedUpstream("a")

    async def scenario() -> list[int]:
        router = _router({"a": a}, warm=("a",))
        gen = router.new_generation("m", "hi", {"max_tokens": 2})
        gen.queue.put_nowait(ChunkArrived(-5, TokenChunk("<stale>", (999,), "length", True)))
        try:
            return [t async for c in router.stream(gen) for t in c.token_ids]
        finally:
            await router.close()

    assert asyncio.run(scenario()) == WORDS[:2]
