"""`BatchedGenerator`: one thread that owns an engine and decodes all live requests together.

Each loop iteration admits queued requests (prefill + first token), drops cancelled ones, then
runs one batched `Engine.step` for every live request. Callbacks run on that thread: keep them
short (put into a queue, write to a socket).

Resume: ``generated_ids`` are tokens already produced elsewhere. The engine prefills
prompt + generated, they count toward ``max_tokens``, and the next token is sampled at position
``len(prompt) + len(generated)``: with the same seed the output continues token-exactly.

EOS: a generation that samples one of the engine's EOS ids finishes with "stop" without emitting it; the id is
reported (``RequestHandle.stop_token_id``, the ``on_eos`` callback) so a client can tell "the model ended its
answer" from a stop string. ``SamplingParams.min_tokens`` masks the EOS ids out of the logits until that many
tokens were generated (resumed tokens count), so the draw stays a function of (logits, params, position).

LoRA: with an `AdapterRegistry` (``adapters=``), a request submitted with an adapter lease waits in the queue
until its adapter is resident (others are admitted past it), is prefilled and decoded on that adapter's slot
in the same batches as everyone else, and gives the lease back when it finishes. The registry installs
adapters it loaded on its own thread here, between two decode steps (`AdapterRegistry.service`).
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from warmstart.engines.adapters import AdapterLease, AdapterRegistry
from warmstart.engines.base import (
    Engine,
    GeneratorClosed,
    InvalidSamplingParams,
    SeqState,
    check_prompt,
    check_token_ids,
)
from warmstart.engines.sampling import SamplingParams, sample_token
from warmstart.engines.streaming import Detokenize, TextStreamer

log = logging.getLogger(__name__)

OnToken = Callable[[int], None]
OnFinish = Callable[[str | None, BaseException | None], None]
OnEos = Callable[[int], None]


class RequestHandle:
    """The caller's side of one request: cancel it, wait for it, read its outcome."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params  # with the seed actually used, so a migration can replay it
        self.finish_reason: str | None = None  # "length" | "stop" | "cancelled"; None on error
        self.stop_token_id: int | None = None  # the EOS id that ended it ("stop"); None for a stop string
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Ask the generator to stop this request; it finishes with "cancelled" at the next step."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request finished; False on timeout."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


@dataclass(eq=False)
class _Request:
    ids: list[int]  # prompt + generated so far
    n_generated: int
    params: SamplingParams
    on_token: OnToken
    on_finish: OnFinish
    is_cancelled: Callable[[], bool]
    handle: RequestHandle
    streamer: TextStreamer | None
    on_eos: OnEos | None = None
    lease: AdapterLease | None = None  # the LoRA adapter it runs with
    state: SeqState | None = None
    pending: int = -1  # sampled, emitted, not yet fed to the engine
    finished: bool = field(default=False)


class BatchedGenerator:
    """Continuous batching over one `Engine`, driven by a background thread."""

    def __init__(
        self, engine: Engine, *, max_batch: int = 8, adapters: AdapterRegistry | None = None
    ) -> None:
        self.engine = engine
        self.adapters = adapters
        if adapters is not None:
            adapters.on_change = self.wake
        self.max_batch = min(max_batch, engine.max_batch)
        self.decode_steps = 0  # engine.step calls, for tests and metrics
        self.prefills = 0
        self._queue: collections.deque[_Request] = collections.deque()
        self._active: list[_Request] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="warmstart-generator", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        generated_ids: Sequence[int] = (),
        on_token: OnToken,
        on_finish: OnFinish,
        is_cancelled: Callable[[], bool] = lambda: False,
        detokenize: Detokenize | None = None,
        on_eos: OnEos | None = None,
        adapter: AdapterLease | None = None,
    ) -> RequestHandle:
        """Queue a generation. Raises `EmptyPrompt`, `PromptTooLong`, `InvalidTokenId`,
        `InvalidSamplingParams` (stop strings without ``detokenize``) or `GeneratorClosed`.

        ``on_token(id)`` is called for each new token (never for EOS); ``on_finish(reason, error)``
        exactly once, with reason "length", "stop" or "cancelled", or ``(None, exc)`` on failure.
        ``on_eos(id)``, when given, is called with the EOS id just before ``on_finish("stop", None)`` when
        the generation ended at an EOS token (not for a stop string).

        ``adapter``: a lease from this generator's `AdapterRegistry`; the generator gives it back when the
        request finishes (also when it fails). If submit raises, the caller still holds it.
        """
        eng = self.engine
        check_prompt(prompt_ids, vocab_size=eng.vocab_size, max_context=eng.max_context)
        check_token_ids(generated_ids, vocab_size=eng.vocab_size)
        if not isinstance(params, SamplingParams):
            raise InvalidSamplingParams(f"params must be SamplingParams, got {type(params).__name__}")
        if params.stop and detokenize is None:
            raise InvalidSamplingParams("stop strings need detokenize=<ids -> str> to be passed to submit()")
        if params.temperature > 0 and params.seed is None:
            params = replace(params, seed=secrets.randbits(63))
        streamer = None
        if params.stop and detokenize is not None:
            streamer = TextStreamer(detokenize, params.stop, prefix_ids=generated_ids)
        handle = RequestHandle(params)
        req = _Request(
            ids=[*prompt_ids, *generated_ids],
            n_generated=len(generated_ids),
            params=params,
            on_token=on_token,
            on_finish=on_finish,
            is_cancelled=is_cancelled,
            handle=handle,
            streamer=streamer,
            on_eos=on_eos,
            lease=adapter,
        )
        if adapter is not None and self.adapters is None:
            raise InvalidSamplingParams("an adapter lease needs a generator built with adapters=<registry>")
        with self._cv:
            if self._closed:
                raise GeneratorClosed("generator is closed; create a new BatchedGenerator")
            self._queue.append(req)
            self._cv.notify()
        return handle

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        generated_ids: Sequence[int] = (),
        detokenize: Detokenize | None = None,
    ) -> tuple[list[int], str]:
        """Blocking convenience: the new token ids and the finish reason. Raises the request's error."""
        out: list[int] = []
        handle = self.submit(
            prompt_ids,
            params,
            generated_ids=generated_ids,
            on_token=out.append,
            on_finish=lambda r, e: None,
            detokenize=detokenize,
        )
        handle.wait()
        if handle.error is not None:
            raise handle.error
        assert handle.finish_reason is not None
        return out, handle.finish_reason

    def wake(self) -> None:
        """Let the worker look at its queue again (an adapter load settled)."""
        with self._cv:
            self._cv.notify()

    def _ready(self, r: _Request) -> bool:
        """Whether a queued request can be admitted now (its adapter is resident, failed, or it has none)."""
        return r.lease is None or r.lease.settled or r.handle._cancel.is_set()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; unfinished requests finish with `GeneratorClosed`. Idempotent."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> BatchedGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ worker thread

    def _run(self) -> None:
        try:
            while True:
                if self.adapters is not None:  # between two steps: adapters loaded meanwhile go in
                    self.adapters.service()
                with self._cv:
                    if self.adapters is None:
                        while not self._closed and not self._queue and not self._active:
                            self._cv.wait()
                    elif not self._closed and not self._active and not any(map(self._ready, self._queue)):
                        self._cv.wait(0.05 if self._queue else None)  # woken by submit or a settled load
                        continue
                    if self._closed:
                        break
                    room = self.max_batch - len(self._active)
                    if self.adapters is None:
                        new = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
                    else:  # requests whose adapter is still loading stay queued, in order
                        new = [r for r in self._queue if self._ready(r)][:room]
                        for r in new:
                            self._queue.remove(r)
                for r in new:
                    self._admit(r)
                for r in list(self._active):
                    self._poll_cancel(r)
                if self._active:
                    self._decode()
        except BaseException as e:  # a bug here must not leave callers waiting forever
            log.exception("generator thread crashed")
            self._fail_all(e)
            raise
        self._fail_all(GeneratorClosed("generator closed before the request finished"))

    def _fail_all(self, err: BaseException) -> None:
        with self._cv:
            self._closed = True
            pending = [*self._active, *self._queue]
            self._queue.clear()
        for r in pending:
            self._finish(r, None, err)

    def _admit(self, r: _Request) -> None:
        if self._poll_cancel(r):
            return
        if r.n_generated >= r.params.max_tokens or len(r.ids) >= self.engine.max_context:
            self._finish(r, "length")  # a resumed request that was already complete
            return
        try:
            if r.lease is None:
                r.state = self.engine.new_sequence(r.ids)
            else:
                if r.lease.error is not None:
                    raise r.lease.error
                r.state = self.engine.new_sequence(r.ids, adapter=r.lease.slot)  # type: ignore[call-arg]
        except Exception as e:
            self._finish(r, None, e)
            return
        self.prefills += 1
        self._active.append(r)
        self._emit(r)

    def _poll_cancel(self, r: _Request) -> bool:
        try:
            cancelled = r.handle._cancel.is_set() or r.is_cancelled()
        except Exception as e:
            self._finish(r, None, e)
            return True
        if cancelled:
            self._finish(r, "cancelled")
        return cancelled

    def _decode(self) -> None:
        batch = list(self._active)
        try:
            self.engine.step([r.state for r in batch], [r.pending for r in batch])  # type: ignore[misc]
        except Exception as e:
            log.exception("decode step failed for %d request(s)", len(batch))
            for r in batch:
                self._finish(r, None, e)
            return
        self.decode_steps += 1
        for r in batch:
            self._emit(r)

    def _emit(self, r: _Request) -> None:
        """Sample the next token of ``r`` from its state's logits and deliver it."""
        state = r.state
        assert state is not None
        position = state.length
        try:
            eos = self.engine.eos_token_ids
            logits = state.logits
            if eos and r.n_generated < r.params.min_tokens:
                logits = np.array(logits, copy=True)
                logits[[t for t in eos if 0 <= t < len(logits)]] = -np.inf
            tok = sample_token(logits, r.params, position)
            if tok in eos:
                r.handle.stop_token_id = tok
                if r.on_eos is not None:
                    r.on_eos(tok)
                self._finish(r, "stop")
                return
            r.ids.append(tok)
            r.n_generated += 1
            r.on_token(tok)
            if r.streamer is not None:
                r.streamer.push(tok)
                if r.streamer.stopped:
                    self._finish(r, "stop")
                    return
        except Exception as e:
            self._finish(r, None, e)
            return
        if r.n_generated >= r.params.max_tokens or position + 1 >= self.engine.max_context:
            self._finish(r, "length")
        else:
            r.pending = tok

    def _finish(self, r: _Request, reason: str | None, err: BaseException | None = None) -> None:
        if r.finished:
            return
        r.finished = True
        if r in self._active:
            self._active.remove(r)
        if r.state is not None:
            try:
                self.engine.release(r.state)
            except Exception:
                log.exception("engine.release failed")
        if r.lease is not None and self.adapters is not None:
            self.adapters.release(r.lease)
        r.handle.finish_reason, r.handle.error = reason, err
        try:
            r.on_finish(reason, err)
        except Exception:
            log.exception("on_finish callback raised")
        finally:
            r.handle._done.set()
