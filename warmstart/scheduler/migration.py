"""Live migration of one running generation by multi-round prompt + token replay.

:func:`migrate` is the protocol only; the I/O sits behind two small Protocols the scheduler implements
over Triton streams (and tests implement in memory):

1. Round 1 replays the prompt and every token generated so far on the destination while the source keeps
   generating. Each further round replays the tokens that appeared meanwhile.
2. Once fewer than ``threshold_tokens`` new tokens are outstanding, the source is paused (it stops emitting;
   the client has exactly the tokens it reports), the last few tokens are replayed, the destination starts
   generating from that position, and the source is stopped. No token is lost or repeated.
3. A destination failure at any point aborts the destination; the source keeps running (it is resumed if it
   had been paused) and :class:`MigrationDestinationError` is raised.
4. The source finishing during migration aborts the destination and ends cleanly
   (:attr:`MigrationOutcome.SOURCE_FINISHED`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from warmstart.scheduler.errors import MigrationDestinationError, MigrationNotConvergingError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class GenerationProgress:
    """A generation as the client has seen it: prompt token ids, generated token ids, and whether done."""

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    finished: bool

    @property
    def context(self) -> tuple[int, ...]:
        """What a destination needs in its context to continue: prompt followed by generated tokens."""
        return self.prompt + self.tokens


class MigrationSource(Protocol):
    """The running generation being moved."""

    async def progress(self) -> GenerationProgress:
        """The tokens emitted to the client so far; the source keeps generating."""
        ...

    async def pause(self) -> GenerationProgress:
        """Stop emitting; returns exactly what the client has received."""
        ...

    async def resume(self) -> None:
        """Continue after :meth:`pause` (the switch failed)."""
        ...

    async def stop(self) -> None:
        """End this generation on the source for good (the destination has taken over)."""
        ...


class MigrationDest(Protocol):
    """The server the generation moves to (its model already loaded)."""

    async def replay(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to the destination's context (prefill only, no output)."""
        ...

    async def start(self, progress: GenerationProgress) -> None:
        """Generate from position ``len(progress.tokens)``, streaming to the client from there."""
        ...

    async def abort(self) -> None:
        """Drop whatever the destination holds for this generation."""
        ...


class MigrationOutcome(enum.Enum):
    """How a migration that did not raise ended."""

    SWITCHED = "switched"  # the destination generates now, the source is stopped
    SOURCE_FINISHED = "source_finished"  # the source completed first; the destination was aborted


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """Outcome, replay rounds run, and how many generated tokens the source had emitted at the end."""

    outcome: MigrationOutcome
    rounds: int
    source_tokens: int


async def _on_dest(step: str, call: Awaitable[T]) -> T:
    try:
        return await call
    except Exception as exc:
        raise MigrationDestinationError(f"destination failed during {step}: {exc!r}") from exc


async def _abort_quietly(dest: MigrationDest) -> None:
    """Abort the destination after a failure; a second failure there must not mask the first."""
    try:
        await dest.abort()
    except Exception:
        logger.warning("aborting the migration destination failed too", exc_info=True)


async def migrate(
    source: MigrationSource, dest: MigrationDest, *, threshold_tokens: int, max_rounds: int = 32
) -> MigrationResult:
    """Move a running generation from ``source`` to ``dest`` (see the module docstring)."""
    if threshold_tokens < 1 or max_rounds < 1:
        raise ValueError("threshold_tokens and max_rounds must be >= 1")
    replayed = 0
    rounds = 0
    try:
        while True:
            progress = await source.progress()
            if progress.finished:
                await dest.abort()
                logger.info("migration ended: source finished after %d rounds", rounds)
                return MigrationResult(MigrationOutcome.SOURCE_FINISHED, rounds, len(progress.tokens))
            context = progress.context
            if rounds > 0 and len(context) - replayed < threshold_tokens:
                break
            if rounds >= max_rounds:
                raise MigrationNotConvergingError(
                    f"{len(context) - replayed} tokens still outstanding after {rounds} rounds "
                    f"(threshold {threshold_tokens}): destination slower than source"
                )
            await _on_dest(f"replay round {rounds + 1}", dest.replay(context[replayed:]))
            replayed = len(context)
            rounds += 1
            logger.debug("migration round %d: %d context tokens replayed", rounds, replayed)
    except BaseException:
        await _abort_quietly(dest)
        raise

    try:
        final = await source.pause()
    except BaseException:
        await _abort_quietly(dest)
        raise
    if final.finished:
        await dest.abort()
        return MigrationResult(MigrationOutcome.SOURCE_FINISHED, rounds, len(final.tokens))
    try:
        await _on_dest("final replay", dest.replay(final.context[replayed:]))
        await _on_dest("start", dest.start(final))
    except BaseException:
        await _abort_quietly(dest)
        await source.resume()
        raise
    await source.stop()
    logger.info("migration switched after %d rounds at token %d", rounds + 1, len(final.tokens))
    return MigrationResult(MigrationOutcome.SWITCHED, rounds + 1, len(final.tokens))
