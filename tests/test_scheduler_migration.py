"""The live-migration protocol over an in-memory fake backend (asyncio, zero-delay yields only).

The fake source generates one token per event-loop turn, concurrently with the migration; the fake
destination replays ``replay_per_turn`` tokens per turn. Tokens are a deterministic function of
(prompt, position), so a correct switch yields exactly the sequence an unmigrated run would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from warmstart.scheduler import (
    GenerationProgress,
    MigrationDestinationError,
    MigrationNotConvergingError,
    MigrationOutcome,
    migrate,
)

PROMPT = (11, 22, 33, 44, 55)


def token_at(prompt: Sequence[int], position: int) -> int:
    return (sum(prompt) * 31 + position * 17 + 7) % 997


def expected(max_tokens: int) -> list[int]:
    return [token_at(PROMPT, i) for i in range(max_tokens)]


@dataclass
class Client:
    """What the client receives, tagged with which server sent it."""

    received: list[tuple[str, int]] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [t for _, t in self.received]


class FakeSource:
    def __init__(self, client: Client, max_tokens: int, *, tokens_per_turn: int = 1) -> None:
        self.client, self.max_tokens, self.tokens_per_turn = client, max_tokens, tokens_per_turn
        self.generated: list[int] = []
        self.paused = False
        self.stopped = False
        self._running = asyncio.Event()
        self._running.set()

    @property
    def finished(self) -> bool:
        return len(self.generated) >= self.max_tokens

    async def run(self) -> None:
        while not self.finished and not self.stopped:
            await self._running.wait()
            if self.stopped:
                break
            for _ in range(self.tokens_per_turn):
                if self.finished:
                    break
                tok = token_at(PROMPT, len(self.generated))
                self.generated.append(tok)
                self.client.received.append(("source", tok))
            await asyncio.sleep(0)

    def _progress(self) -> GenerationProgress:
        return GenerationProgress(PROMPT, tuple(self.generated), self.finished)

    async def progress(self) -> GenerationProgress:
        return self._progress()

    async def pause(self) -> GenerationProgress:
        self.paused = True
        self._running.clear()
        return self._progress()

    async def resume(self) -> None:
        self.paused = False
        self._running.set()

    async def stop(self) -> None:
        self.stopped = True
        self._running.set()


class DestinationDown(ConnectionError):
    pass


class FakeDest:
    def __init__(
        self,
        client: Client,
        max_tokens: int,
        *,
        replay_per_turn: int = 8,
        fail_on_replay: int | None = None,
        fail_on_start: bool = False,
    ) -> None:
        self.client, self.max_tokens, self.replay_per_turn = client, max_tokens, replay_per_turn
        self.fail_on_replay, self.fail_on_start = fail_on_replay, fail_on_start
        self.context: list[int] = []
        self.replays = 0
        self.aborted = False
        self.task: asyncio.Task[None] | None = None

    async def replay(self, tokens: Sequence[int]) -> None:
        self.replays += 1
        if self.fail_on_replay == self.replays:
            raise DestinationDown("destination went away")
        for start in range(0, len(tokens), self.replay_per_turn):
            self.context.extend(tokens[start : start + self.replay_per_turn])
            await asyncio.sleep(0)

    async def start(self, progress: GenerationProgress) -> None:
        if self.fail_on_start:
            raise DestinationDown("destination failed to start")
        if self.context != list(progress.context):
            raise AssertionError("destination context differs from the source's")
        self.task = asyncio.create_task(self._generate(len(progress.tokens)))

    async def _generate(self, position: int) -> None:
        for i in range(position, self.max_tokens):
            self.client.received.append(("dest", token_at(PROMPT, i)))
            await asyncio.sleep(0)

    async def abort(self) -> None:
        self.aborted = True


async def run_migration(
    source: FakeSource, dest: FakeDest, *, head_start: int, threshold: int = 4, max_rounds: int = 32
) -> tuple[object, BaseException | None]:
    gen = asyncio.create_task(source.run())
    for _ in range(head_start):
        await asyncio.sleep(0)
    outcome: object = None
    error: BaseException | None = None
    try:
        outcome = await migrate(source, dest, threshold_tokens=threshold, max_rounds=max_rounds)
    except Exception as exc:
        error = exc
    await gen
    if dest.task is not None:
        await dest.task
    return outcome, error


@pytest.mark.parametrize(
    ("max_tokens", "head_start", "replay_per_turn", "threshold"),
    [(200, 10, 8, 4), (200, 0, 64, 2), (500, 100, 4, 8), (60, 30, 16, 20)],
    ids=["typical", "from_first_token", "slow_replay_long_run", "large_threshold"],
)
def test_migrate_switches_token_exact_when_destination_keeps_up(
    max_tokens: int, head_start: int, replay_per_turn: int, threshold: int
) -> None:
    client = Client()
    source = FakeSource(client, max_tokens)
    dest = FakeDest(client, max_tokens, replay_per_turn=replay_per_turn)
    result, error = asyncio.run(run_migration(source, dest, head_start=head_start, threshold=threshold))
    assert error is None
    assert getattr(result, "outcome", None) is MigrationOutcome.SWITCHED
    assert client.tokens == expected(max_tokens)  # token-exact, no gap, no duplicate
    origins = [o for o, _ in client.received]
    switch = origins.index("dest")
    assert set(origins[:switch]) == {"source"} and set(origins[switch:]) == {"dest"}
    assert getattr(result, "source_tokens", None) == switch
    assert getattr(result, "rounds", 0) >= 2  # at least one catch-up round plus the final one
    assert source.stopped and not dest.aborted


def test_migrate_leaves_source_running_when_destination_fails_mid_replay() -> None:
    client = Client()
    source = FakeSource(client, 150)
    dest = FakeDest(client, 150, replay_per_turn=2, fail_on_replay=2)
    _, error = asyncio.run(run_migration(source, dest, head_start=5))
    assert isinstance(error, MigrationDestinationError) and isinstance(error.__cause__, DestinationDown)
    assert client.tokens == expected(150)
    assert {o for o, _ in client.received} == {"source"}
    assert dest.aborted and not source.stopped and not source.paused


def test_migrate_resumes_source_when_destination_fails_to_start() -> None:
    client = Client()
    source = FakeSource(client, 150)
    dest = FakeDest(client, 150, replay_per_turn=32, fail_on_start=True)
    _, error = asyncio.run(run_migration(source, dest, head_start=5))
    assert isinstance(error, MigrationDestinationError)
    assert "start" in str(error)
    assert client.tokens == expected(150)
    assert {o for o, _ in client.received} == {"source"}
    assert dest.aborted and not source.paused


@pytest.mark.parametrize(
    ("max_tokens", "head_start", "tokens_per_turn"),
    [(40, 38, 1), (100, 0, 10), (30, 30, 1)],
    ids=["finishes_during_replay", "fast_source_outruns_replay", "already_finished"],
)
def test_migrate_aborts_cleanly_when_source_finishes_mid_migration(
    max_tokens: int, head_start: int, tokens_per_turn: int
) -> None:
    client = Client()
    source = FakeSource(client, max_tokens, tokens_per_turn=tokens_per_turn)
    dest = FakeDest(client, max_tokens, replay_per_turn=1)
    result, error = asyncio.run(run_migration(source, dest, head_start=head_start, max_rounds=1000))
    assert error is None
    assert getattr(result, "outcome", None) is MigrationOutcome.SOURCE_FINISHED
    assert client.tokens == expected(max_tokens)
    assert {o for o, _ in client.received} == {"source"}
    assert dest.aborted and dest.task is None


def test_migrate_raises_not_converging_when_destination_replays_slower_than_source() -> None:
    client = Client()
    source = FakeSource(client, 2000, tokens_per_turn=4)
    dest = FakeDest(client, 2000, replay_per_turn=1)
    _, error = asyncio.run(run_migration(source, dest, head_start=3, max_rounds=3))
    assert isinstance(error, MigrationNotConvergingError)
    assert client.tokens == expected(2000)
    assert dest.aborted and not source.stopped


@pytest.mark.parametrize(("threshold", "max_rounds"), [(0, 4), (4, 0)], ids=["zero_threshold", "zero_rounds"])
def test_migrate_raises_value_error_when_limits_invalid(threshold: int, max_rounds: int) -> None:
    client = Client()
    with pytest.raises(ValueError, match=">= 1"):
        asyncio.run(
            migrate(
                FakeSource(client, 1), FakeDest(client, 1), threshold_tokens=threshold, max_rounds=max_rounds
            )
        )
