"""Live migration plumbing: the policy's :class:`MigrationSource` / :class:`MigrationDest` over real
Triton servers, driven by :func:`warmstart.scheduler.migration.migrate`.

* The source is the generation's current upstream stream. ``pause`` stops forwarding its tokens to the
  client (they are held back, not dropped); ``resume`` forwards what was held; the switch replaces the
  upstream under the client's stream.
* The destination replays the context in rounds: each round sends the prompt + the tokens so far with
  ``max_tokens`` one more than the tokens already generated (a 1-token prefill round whose token is
  discarded), which checks that the destination serves the model and pays its prefill while the source
  keeps generating. ``start`` opens the real stream there
  from the position the client has reached, and the router switches the client's stream to it: the
  destination's first token is the one after the client's last, so there is no gap and no duplicate.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from warmstart.scheduler.migration import GenerationProgress
from warmstart.scheduler.upstream import UpstreamError

if TYPE_CHECKING:
    from warmstart.scheduler.router import Generation, Router, ServerRuntime

logger = logging.getLogger(__name__)


class GenerationSource:
    """A running generation as a :class:`~warmstart.scheduler.migration.MigrationSource`."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen

    def _progress(self) -> GenerationProgress:
        return GenerationProgress(
            prompt=self.gen.prompt_ids or (), tokens=tuple(self.gen.tokens), finished=self.gen.finished
        )

    async def progress(self) -> GenerationProgress:
        return self._progress()

    async def pause(self) -> GenerationProgress:
        self.gen.paused = True
        return self._progress()

    async def resume(self) -> None:
        self.gen.queue.put_nowait(("resume", self.gen.attempt))

    async def stop(self) -> None:
        """Nothing left to do: the destination's ``start`` already switched the client's stream."""


class ServerDest:
    """A destination server (model loaded there) as a :class:`~warmstart.scheduler.migration.MigrationDest`."""

    def __init__(self, router: Router, gen: Generation, rt: ServerRuntime) -> None:
        self.router = router
        self.gen = gen
        self.rt = rt
        self.replayed: list[int] = []
        self.rounds = 0

    async def replay(self, tokens: Sequence[int]) -> None:
        self.replayed.extend(tokens)
        prompt_len = len(self.gen.prompt_ids or ())
        generated = tuple(self.replayed[prompt_len:])
        self.rounds += 1
        req = replace(
            self.gen.upstream_request(),
            request_id=f"{self.gen.id}.replay{self.rounds}",
            generated=generated,
            sampling={**self.gen.sampling, "max_tokens": len(generated) + 1},
        )
        async with contextlib.aclosing(
            self.rt.upstream.generate(req, idle_timeout_s=self.router.config.request_timeout_s)
        ) as chunks:
            async for _ in chunks:  # the one new token is discarded: the source is still the one streaming
                pass

    async def start(self, progress: GenerationProgress) -> None:
        if tuple(self.gen.tokens) != progress.tokens:
            raise UpstreamError("the client's stream moved on after the pause; refusing to switch")
        self.router.switch_upstream(self.gen, self.rt)

    async def abort(self) -> None:
        """Replays are one-shot requests that already finished; nothing is held on the destination."""
