"""A generation's stream under a changing upstream: the record, its control messages, the pump, and the
live-migration adapters.

The client reads one stream (`Router.stream`); under it the upstream may change without a gap or a
repeat, because every upstream stream is read by a *pump* task into the generation's queue, and each
message carries the *attempt* it belongs to:

* `ChunkArrived` / `UpstreamFailed`: what the pump of attempt ``n`` read; messages of an attempt that was
  replaced are dropped.
* `Switch`: live migration's destination stream (already reserved and started from the client's position)
  takes over; the old pump is cancelled.
* `Resume`: a migration that was paused and did not switch forwards the chunks held meanwhile.

`GenerationSource` and `ServerDest` are the policy's `MigrationSource` / `MigrationDest` (see
`warmstart.scheduler.migration.migrate`) over a `Generation` and a destination `Upstream`:

* the source is the generation's current stream: ``pause`` holds its tokens back (not dropped),
  ``resume`` forwards what was held, the switch replaces the upstream under the client's stream;
* the destination replays the context in rounds: each round sends the prompt + the tokens so far with
  ``max_tokens`` one more than the tokens already generated (a 1-token prefill round whose token is
  discarded), which checks that the destination serves the model and pays its prefill while the source
  keeps generating. ``start`` opens the real stream there from the position the client has reached (the
  destination's first token is the one after the client's last), through the ``switch`` callback the
  router gives it.

Nothing here imports the router: it depends on the upstream protocol and the migration policy only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

from warmstart.scheduler.migration import GenerationProgress
from warmstart.scheduler.upstream import GenerationRequest, TokenChunk, Upstream, UpstreamError

__all__ = [
    "ChunkArrived",
    "Control",
    "Generation",
    "GenerationSource",
    "Resume",
    "ServerDest",
    "StreamHost",
    "Switch",
    "UpstreamFailed",
    "run_stream",
    "start_pump",
]

S = TypeVar("S")


# ------------------------------------------------------------------------------------- control messages


@dataclass(frozen=True, slots=True)
class ChunkArrived:
    """One response read from attempt ``attempt``'s upstream stream."""

    attempt: int
    chunk: TokenChunk


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """Attempt ``attempt``'s upstream stream ended with ``error`` before its final response."""

    attempt: int
    error: Exception


@dataclass(frozen=True, slots=True)
class Resume:
    """Forward the chunks held since the pause (a migration that did not switch)."""

    attempt: int


@dataclass(frozen=True, slots=True)
class Switch(Generic[S]):
    """Live migration: ``pump`` (attempt ``attempt``, on ``server``, slot reserved) takes over the stream."""

    attempt: int
    server: S
    pump: asyncio.Task[None]


Control = ChunkArrived | UpstreamFailed | Resume | Switch[Any]


# ------------------------------------------------------------------------------------------ the record


@dataclass(eq=False)
class Generation:
    """The scheduler's record of one client generation: what the client has received so far."""

    id: str
    model: str
    prompt: str
    sampling: dict[str, Any]
    max_tokens: int
    prompt_ids: tuple[int, ...] | None = None
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # as the backend counted them (its last response), or len(prompt_ids)
    stop_token_id: int | None = None  # the EOS id that ended it, when the backend said so
    messages: str | None = None  # a chat (JSON array), rendered by the backend's chat template; prompt is ""
    adapter: str | None = None  # the LoRA adapter of ``model`` it generates with (every upstream attempt)
    finished: bool = False
    server: str | None = None
    failovers: int = 0
    migrations: int = 0
    arrived_s: float = 0.0  # when the router took it (time to first token)
    # the stream's control plane: what the pumps and a migration send to the client's loop
    queue: asyncio.Queue[Control] = field(default_factory=asyncio.Queue)
    attempt: int = 0
    pump: asyncio.Task[None] | None = None
    _paused: bool = False
    _held: list[TokenChunk] = field(default_factory=list)

    def upstream_request(self, request_id: str | None = None) -> GenerationRequest:
        """The upstream request that continues this generation from what the client has."""
        return GenerationRequest(
            model=self.model,
            request_id=request_id or f"{self.id}.{self.attempt}",
            prompt=self.prompt,
            sampling=self.sampling,
            prompt_ids=self.prompt_ids,
            generated=tuple(self.tokens),
            messages=self.messages,
            lora_name=self.adapter,
        )

    def progress(self) -> GenerationProgress:
        return GenerationProgress(
            prompt=self.prompt_ids or (), tokens=tuple(self.tokens), finished=self.finished
        )

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> GenerationProgress:
        """Hold back the chunks that arrive from now on (a migration is deciding); returns the position."""
        self._paused = True
        return self.progress()

    def resume(self) -> None:
        """Ask the client's loop to forward what was held and carry on (the migration did not switch)."""
        self.queue.put_nowait(Resume(self.attempt))

    def hold(self, chunk: TokenChunk) -> bool:
        """Keep ``chunk`` back if paused (True), else let it through (False)."""
        if self._paused:
            self._held.append(chunk)
        return self._paused

    def release_held(self) -> list[TokenChunk]:
        """Unpause; the chunks held since the pause, in order."""
        held, self._held = self._held, []
        self._paused = False
        return held

    def restart(self, attempt: int, pump: asyncio.Task[None] | None = None) -> None:
        """A new upstream stream (attempt ``attempt``) replaces the current one: the old pump is cancelled,
        anything held from it is dropped (the new stream starts from the client's position)."""
        if self.pump is not None:
            self.pump.cancel()
        self.attempt = attempt
        self.pump = pump
        self._paused = False
        self._held.clear()


# ------------------------------------------------------------------------------------------- the loop


class StreamHost(Protocol[S]):
    """What the stream loop needs from the router: servers (``S``) with a slot for a generation."""

    async def acquire(self, gen: Generation) -> S:
        """A server for ``gen`` with its slot reserved and its upstream stream (pump) started."""
        ...

    def release(self, server: S, gen: Generation) -> None:
        """Give ``gen``'s slot on ``server`` back."""
        ...

    async def fail_over(self, gen: Generation, server: S | None, error: Exception) -> S:
        """``gen``'s upstream failed with ``error``: the server it resumes on (raises to end it)."""
        ...

    def delivered(self, gen: Generation, server: S | None, chunk: TokenChunk) -> None:
        """``chunk`` goes to the client now."""
        ...

    def switched(self, gen: Generation, server: S) -> None:
        """``gen`` streams from ``server`` now (a live migration's switch)."""
        ...


async def run_stream(gen: Generation, host: StreamHost[S]) -> AsyncGenerator[TokenChunk, None]:
    """The client's side of ``gen``: its chunks in order, whatever upstream they come from.

    Handles the control messages (see the module doc); on the way out the generation is finished, its pump
    cancelled, its slot given back, and a `Switch` that arrived too late has its stream and slot dropped.
    """
    server: S | None = None
    try:
        server = await host.acquire(gen)
        while True:
            match await gen.queue.get():
                case Switch(attempt=attempt, server=new_server, pump=pump):
                    # live migration: a new upstream (already reserved) takes over
                    old, server = server, new_server
                    gen.restart(attempt, pump)
                    host.switched(gen, new_server)
                    if old is not None:
                        host.release(old, gen)
                    gen.migrations += 1
                case Resume():
                    for chunk in gen.release_held():
                        host.delivered(gen, server, chunk)
                        yield chunk
                        if chunk.final:
                            return
                case ChunkArrived(attempt=attempt) | UpstreamFailed(attempt=attempt) if (
                    attempt != gen.attempt
                ):
                    continue  # from an upstream that was replaced
                case ChunkArrived(chunk=chunk):
                    if gen.hold(chunk):
                        continue
                    host.delivered(gen, server, chunk)
                    yield chunk
                    if chunk.final:
                        return
                case UpstreamFailed(error=failure):
                    server = await host.fail_over(gen, server, failure)
    finally:
        gen.finished = True
        if gen.pump is not None:
            gen.pump.cancel()
        if server is not None:
            host.release(server, gen)
        while not gen.queue.empty():  # a switch that arrived too late: drop its stream and its slot
            match gen.queue.get_nowait():
                case Switch(server=late, pump=late_pump):
                    late_pump.cancel()
                    host.release(late, gen)
                case _:
                    pass


# ------------------------------------------------------------------------------------------- the pump


def start_pump(
    gen: Generation,
    upstream: Upstream,
    attempt: int,
    req: GenerationRequest,
    *,
    idle_timeout_s: float,
    spawn: Callable[[Any, str], asyncio.Task[Any]],
    on_tokens: Callable[[int, float], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> asyncio.Task[None]:
    """Read one upstream stream into ``gen.queue`` as ``ChunkArrived`` / ``UpstreamFailed`` of ``attempt``.

    ``on_tokens(n, seconds)`` is told how long each response of ``n`` new tokens took (the router learns its
    per-token time from it); ``spawn(coro, name)`` starts the task (the router tracks its tasks).
    """

    async def run() -> None:
        t_last = clock() if clock is not None else 0.0
        try:
            async with contextlib.aclosing(upstream.generate(req, idle_timeout_s=idle_timeout_s)) as chunks:
                async for chunk in chunks:
                    if clock is not None:
                        now = clock()
                        if chunk.token_ids and on_tokens is not None:
                            on_tokens(len(chunk.token_ids), now - t_last)
                        t_last = now
                    gen.queue.put_nowait(ChunkArrived(attempt, chunk))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            gen.queue.put_nowait(UpstreamFailed(attempt, e))

    return spawn(run(), f"pump {gen.id}.{attempt}")


# --------------------------------------------------------------------------- live-migration adapters


class GenerationSource:
    """A running generation as a :class:`~warmstart.scheduler.migration.MigrationSource`."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen

    async def progress(self) -> GenerationProgress:
        return self.gen.progress()

    async def pause(self) -> GenerationProgress:
        return self.gen.pause()

    async def resume(self) -> None:
        self.gen.resume()

    async def stop(self) -> None:
        """Nothing left to do: the destination's ``start`` already switched the client's stream."""


class ServerDest:
    """A destination (model loaded there) as a :class:`~warmstart.scheduler.migration.MigrationDest`.

    ``switch()`` reserves the slot there and hands the new stream to the generation's loop (the router's
    `Router.switch_upstream`).
    """

    def __init__(
        self, gen: Generation, upstream: Upstream, switch: Callable[[], None], *, idle_timeout_s: float
    ) -> None:
        self.gen = gen
        self.upstream = upstream
        self._switch = switch
        self.idle_timeout_s = idle_timeout_s
        self.replayed: list[int] = []
        self.rounds = 0

    async def replay(self, tokens: Sequence[int]) -> None:
        self.replayed.extend(tokens)
        prompt_len = len(self.gen.prompt_ids or ())
        generated = tuple(self.replayed[prompt_len:])
        self.rounds += 1
        req = replace(
            self.gen.upstream_request(f"{self.gen.id}.replay{self.rounds}"),
            generated=generated,
            sampling={**self.gen.sampling, "max_tokens": len(generated) + 1},
        )
        async with contextlib.aclosing(
            self.upstream.generate(req, idle_timeout_s=self.idle_timeout_s)
        ) as chunks:
            async for _ in chunks:  # the one new token is discarded: the source is still the one streaming
                pass

    async def start(self, progress: GenerationProgress) -> None:
        if tuple(self.gen.tokens) != progress.tokens:
            raise UpstreamError("the client's stream moved on after the pause; refusing to switch")
        self._switch()

    async def abort(self) -> None:
        """Replays are one-shot requests that already finished; nothing is held on the destination."""
