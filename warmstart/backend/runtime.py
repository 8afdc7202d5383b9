"""The serving side of one model instance: checkpoint → tokenizer + engine + batched generator.

:class:`Runtime` knows nothing about Triton: the backend's ``model.py`` hands each parsed request in with a
:class:`ResponseSink` (its adapter over a Triton response sender). Callbacks run on the generator's thread;
every request ends with exactly one final response (result, error or cancellation). The final response of a
result also carries the prompt's token count and, when the model ended the answer with an EOS token, that
token's id (``stop_token_id``; never part of ``token_ids``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from warmstart.backend.adapters import MultiLoraConfigError, open_adapter, read_multi_lora
from warmstart.backend.metrics import Metrics, NullMetrics
from warmstart.backend.request import LORA_RELOADED, GenerateRequest, error_code
from warmstart.backend.weights import LoadedCheckpoint, load_checkpoint, resolve_reference
from warmstart.chat import (
    ChatError,
    ChatTemplate,
    NoChatTemplate,
    check_control_tokens,
    control_tokens,
    end_of_turn_ids,
)
from warmstart.devices import check_engine_device, parse_device
from warmstart.engines import BatchedGenerator, Engine, TextStreamer, build_engine
from warmstart.engines.adapters import AdapterLease, AdapterRegistry, LoraNotEnabled
from warmstart.errors import WarmstartError
from warmstart.tritonconfig import ModelSettings

logger = logging.getLogger(__name__)

__all__ = ["CANCEL_POLL_SECONDS", "ModelLoadFailed", "ResponseSink", "Runtime"]

CANCEL_POLL_SECONDS = 0.1
"""How often each live request's Triton sender is asked whether it was cancelled. Each ask is an IPC round trip
with tritonserver (stub and server both wake): at 0.02 s, 8 streams made 400 asks a second against about 50
tokens a second (docs/architecture.md, "Per-token path"); a cancellation still stops within 0.1 s + one step."""


class ModelLoadFailed(WarmstartError, RuntimeError):
    """A model could not be loaded; the message names the model, the checkpoint and the cause."""


class ResponseSink(Protocol):
    """Where the responses of one request go (a Triton response sender in the backend)."""

    def is_cancelled(self) -> bool: ...

    def send(
        self,
        text: str,
        token_ids: Sequence[int],
        finish_reason: str | None,
        *,
        final: bool,
        prompt_tokens: int | None = None,
        stop_token_id: int | None = None,
    ) -> None:
        """One response; ``prompt_tokens`` and ``stop_token_id`` come (when known) with the final one."""
        ...

    def send_error(self, message: str, code: str) -> None:
        """Send an error response with the FINAL flag; ``code`` is a TritonError code name."""
        ...


def _cancel_check(sink: ResponseSink) -> Callable[[], bool]:
    """The generator's per-step cancellation check for ``sink``: asked at most every `CANCEL_POLL_SECONDS`
    (a Triton response sender's answer is an IPC round trip), or every step where the sink says its answer is a
    flag read (``cancel_check_is_cheap``: the engine process's wire sink, whose stub already polls Triton)."""
    if getattr(sink, "cancel_check_is_cheap", False):
        return sink.is_cancelled
    return _throttled(sink.is_cancelled, CANCEL_POLL_SECONDS)


def _throttled(check: Callable[[], bool], interval: float) -> Callable[[], bool]:
    last = 0.0
    seen = False

    def poll() -> bool:
        nonlocal last, seen
        now = time.monotonic()
        if not seen and now - last >= interval:
            last = now
            seen = bool(check())
        return seen

    return poll


@dataclass(eq=False)
class _Stream:
    """One request in flight: its sink, its text streamer, and what non-streaming output accumulates."""

    request: GenerateRequest
    sink: ResponseSink
    streamer: TextStreamer
    prompt_text: str
    arrived: float
    metrics: Metrics
    prompt_tokens: int = 0
    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    stop_token_id: int | None = None

    def on_eos(self, token: int) -> None:
        self.stop_token_id = token

    def on_token(self, token: int) -> None:
        if not self.ids:
            self.metrics.first_token(time.monotonic() - self.arrived)
        self.ids.append(token)
        delta = self.streamer.push(token)
        if self.request.stream:
            self.sink.send(delta, (token,), None, final=False)
        else:
            self.text.append(delta)

    def on_finish(self, reason: str | None, error: BaseException | None) -> None:
        self.metrics.tokens_generated(len(self.ids))
        if error is not None:
            self.sink.send_error(f"generation failed: {error}", error_code(error))
        elif reason == "cancelled":
            self.sink.send_error("request cancelled", "CANCELLED")
        elif self.request.stream:
            self.sink.send(
                self.streamer.flush(),
                (),
                reason,
                final=True,
                prompt_tokens=self.prompt_tokens,
                stop_token_id=self.stop_token_id,
            )
        else:
            body = "".join(self.text) + self.streamer.flush()
            if not self.request.exclude_input_in_output:
                body = self.prompt_text + body
            self.sink.send(
                body,
                self.ids,
                reason,
                final=True,
                prompt_tokens=self.prompt_tokens,
                stop_token_id=self.stop_token_id,
            )


def warm_engine(engine: Engine, max_batch: int) -> None:
    """Make ``engine`` ready for its first requests: its own ``warm_up(max_batch)`` when it has one
    (JAX compiles its shape buckets; torch has nothing to do), else prefill and step batches of
    1, 2, 4, ... ``max_batch`` short sequences. Runs before the generator thread owns the engine.
    """
    warm_up = getattr(engine, "warm_up", None)
    if callable(warm_up):
        warm_up(max_batch)
        return
    sizes = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
    for n in sizes:
        states = [engine.new_sequence([0]) for _ in range(n)]
        try:
            engine.step(states, [0] * n)
        finally:
            for state in states:
                engine.release(state)


class Runtime:
    """A loaded model: tokenizer, engine and the generator thread that batches its requests."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        *,
        max_batch: int,
        metrics: Metrics | None = None,
        add_special_tokens: bool = True,
        chat: ChatTemplate | None = None,
        model_name: str = "model",
        chat_unavailable: str = "",
        adapters: AdapterRegistry | None = None,
        model_dir: Path | str | None = None,
    ) -> None:
        self.engine = engine
        self.adapters = adapters  # LoRA (enable_lora): the adapters of multi_lora.json, None without it
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.metrics: Metrics = metrics or NullMetrics()
        self.add_special_tokens = add_special_tokens
        self.chat = chat  # the checkpoint's chat template (warmstart.chat), None without one
        self.model_name = model_name
        self._chat_unavailable = chat_unavailable  # why a checkpoint's template cannot be used, if it cannot
        self._control_tokens: tuple[str, ...] | None = None
        self.generator = BatchedGenerator(engine, max_batch=max_batch, adapters=adapters)
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        settings: ModelSettings,
        *,
        model_name: str = "model",
        model_dir: Path | str | None = None,
        metrics: Metrics | None = None,
        warmup: bool = True,
        parse_tokenizer: Callable[[str], Any] | None = None,
    ) -> Runtime:
        """Load the checkpoint named by ``settings`` and build the engine; raise :class:`ModelLoadFailed`.

        ``parse_tokenizer`` turns ``tokenizer.json`` text into a ``tokenizers.Tokenizer`` (default:
        ``Tokenizer.from_str``; the engine host passes one that reuses tokenizers it parsed before).
        """
        t0 = time.perf_counter()
        ref = settings.checkpoint
        try:  # before any weight is read: no CUDA device (or no such GPU) is a clear, early failure
            check_engine_device(parse_device(settings.device), settings.engine, what=f"model {model_name!r}")
        except WarmstartError as e:
            raise ModelLoadFailed(str(e)) from e
        try:
            ref = resolve_reference(settings.checkpoint, model_dir)
            loaded = load_checkpoint(ref, settings.engine, dtype=settings.dtype, device=settings.device)
            runtime = cls.from_loaded(
                loaded,
                settings,
                metrics=metrics,
                warmup=warmup,
                parse_tokenizer=parse_tokenizer,
                model_name=model_name,
                model_dir=model_dir,
            )
        except (WarmstartError, OSError, ValueError, KeyError, ImportError) as e:
            raise ModelLoadFailed(
                f"model {model_name!r}: cannot load checkpoint {ref!r} with the {settings.engine} engine: "
                f"{type(e).__name__}: {e}"
            ) from e
        seconds = time.perf_counter() - t0
        runtime.metrics.model_loaded(loaded.tier, seconds)
        logger.info(
            "model %s ready in %.3f s (weights %.3f s from the %s tier)",
            model_name,
            seconds,
            loaded.seconds,
            loaded.tier,
        )
        return runtime

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedCheckpoint,
        settings: ModelSettings,
        *,
        metrics: Metrics | None = None,
        warmup: bool = True,
        parse_tokenizer: Callable[[str], Any] | None = None,
        model_name: str = "model",
        model_dir: Path | str | None = None,
    ) -> Runtime:
        """Build the engine and tokenizer from an already loaded checkpoint.

        With ``settings.enable_lora`` the engine gets ``max_loras`` adapter slots and the runtime an
        :class:`~warmstart.engines.adapters.AdapterRegistry` of ``model_dir``'s ``multi_lora.json``.

        The chat template (``warmstart.chat``) is read here and compiled on the first chat request. The
        generation stops at ``generation_config.json``'s EOS ids and the tokenizer's ``eos_token`` as well
        as ``config.json``'s (the end-of-turn tokens of chat models: ``warmstart.chat.end_of_turn_ids``).

        The tokenizer is parsed on a thread while the engine is built: the parse holds the GIL, but the
        JAX engine's weight stacking and XLA work release it (measured ~10% off the JAX build).
        """
        if parse_tokenizer is None:
            from tokenizers import Tokenizer

            parse_tokenizer = Tokenizer.from_str
        with ThreadPoolExecutor(1, thread_name_prefix="warmstart-tokenizer") as pool:
            tokenizer_future = pool.submit(parse_tokenizer, loaded.tokenizer_json)
            engine = build_engine(
                settings.engine,  # type: ignore[arg-type]  # validated by ModelSettings
                loaded.config,
                loaded.weights,
                dtype=settings.dtype,
                max_batch=settings.max_batch,
                device=settings.device,
            )
            if settings.enable_lora:
                enable = getattr(engine, "enable_lora", None)
                if not callable(enable):
                    raise LoraNotEnabled(
                        f"model {model_name!r}: enable_lora needs a compact engine (torch or JAX) for this "
                        f"model_type ({loaded.config.get('model_type')!r} runs through transformers, which "
                        "serves no adapters); set enable_lora to false"
                    )
                sources = read_multi_lora(model_dir)  # MultiLoraConfigError: the load fails
                enable(settings.max_loras, settings.max_lora_rank)
            if warmup:
                warm_engine(engine, settings.max_batch)
            tokenizer = tokenizer_future.result()
        extra_eos = end_of_turn_ids(loaded.generation_config, loaded.tokenizer_config, tokenizer.token_to_id)
        if not extra_eos <= engine.eos_token_ids:
            engine.eos_token_ids = frozenset(engine.eos_token_ids) | extra_eos
        chat, unavailable = None, ""
        try:
            chat = ChatTemplate.from_files(loaded.tokenizer_config, loaded.chat_template)
        except ChatError as e:  # the model still serves prompts; chat requests get this reason
            unavailable = f"{e}; fix the checkpoint's chat template"
            logger.warning("model %s: %s", model_name, unavailable)
        adapters = None
        if settings.enable_lora:
            adapters = AdapterRegistry(
                engine,  # type: ignore[arg-type]  # enable_lora checked above
                loaded.config,
                sources,
                open_adapter=lambda ref: open_adapter(ref, model_dir),
            )
        return cls(
            engine,
            tokenizer,
            max_batch=settings.max_batch,
            metrics=metrics,
            chat=chat,
            model_name=model_name,
            chat_unavailable=unavailable,
            adapters=adapters,
            model_dir=model_dir,
        )

    # -- text ------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """``messages`` (validated) rendered with the checkpoint's chat template, the assistant's turn
        opened. Raises the ``warmstart.chat`` errors: no template, a control token in a message, the
        template refusing the messages."""
        if self.chat is None:
            raise NoChatTemplate(
                self._chat_unavailable
                or f"model {self.model_name!r} has no chat template (its checkpoint has no chat_template.jinja "
                "and no chat_template in tokenizer_config.json); use /v1/completions (or text_input) with a "
                "prompt of your own"
            )
        if self._control_tokens is None:
            added = self.tokenizer.get_added_tokens_decoder().values()
            self._control_tokens = control_tokens(((t.content, t.special) for t in added), self.chat.source)
        check_control_tokens(messages, self._control_tokens)
        return self.chat.render(messages)

    # -- requests --------------------------------------------------------------------------------------

    def submit(self, request: GenerateRequest, sink: ResponseSink, *, arrived: float | None = None) -> None:
        """Start generating for ``request``; responses go to ``sink``.

        Raises (before anything is sent) the engines' `EmptyPrompt`, `PromptTooLong`, `InvalidTokenId`,
        `InvalidSamplingParams` or `GeneratorClosed`, or for a chat the ``warmstart.chat`` errors, or for a
        ``lora_name`` `LoraNotEnabled` / `UnknownAdapter`; the caller answers with an error response. An
        adapter that fails to load fails this request through ``sink`` (`AdapterLoadFailed`).
        """
        lease = None
        if request.lora_name is not None:
            if self.adapters is None:
                raise LoraNotEnabled(
                    f"model {self.model_name!r} serves no LoRA adapters (lora_name {request.lora_name!r}); "
                    'set its parameter enable_lora to "true" and list the adapters in multi_lora.json'
                )
            lease = self.adapters.acquire(request.lora_name)  # UnknownAdapter
        try:
            self._submit(request, sink, arrived, lease)
        except BaseException:
            if lease is not None and self.adapters is not None:
                self.adapters.release(lease)
            raise

    def _submit(
        self, request: GenerateRequest, sink: ResponseSink, arrived: float | None, lease: AdapterLease | None
    ) -> None:
        if request.prompt_ids is not None:
            prompt_ids = list(request.prompt_ids)
            prompt_text = request.text if request.text is not None else self.decode(prompt_ids)
        elif request.messages is not None:
            prompt_text = self.chat_prompt(request.messages)
            # the rendered text holds the special tokens the template writes: none are added (as transformers)
            prompt_ids = list(self.tokenizer.encode(prompt_text, add_special_tokens=False).ids)
        else:
            assert request.text is not None
            prompt_ids = self.encode(request.text)
            prompt_text = request.text
        stream = _Stream(
            request=request,
            sink=sink,
            streamer=TextStreamer(self.decode, request.params.stop, prefix_ids=request.generated_ids),
            prompt_text=prompt_text,
            arrived=time.monotonic() if arrived is None else arrived,
            metrics=self.metrics,
            prompt_tokens=len(prompt_ids),
        )
        self.generator.submit(
            prompt_ids,
            request.params,
            generated_ids=request.generated_ids,
            on_token=stream.on_token,
            on_finish=stream.on_finish,
            is_cancelled=_cancel_check(sink),
            detokenize=self.decode if request.params.stop else None,
            on_eos=stream.on_eos,
            adapter=lease,
        )
        self.metrics.prompt_tokens(len(prompt_ids) + len(request.generated_ids))

    # -- control requests ------------------------------------------------------------------------------
    def reload_adapters(self) -> dict[str, list[str]]:
        """Re-read ``multi_lora.json``: new names are served from now on, removed ones refused (requests on
        them finish first); the base stays loaded. Returns ``adapters`` (all names now), ``added``,
        ``removed``, ``changed`` (a new reference), ``resident``. Raises `LoraNotEnabled`, and
        `MultiLoraConfigError` for a file that cannot be used (nothing changes then)."""
        if self.adapters is None:
            raise LoraNotEnabled(
                f'model {self.model_name!r} serves no LoRA adapters; set its parameter enable_lora to "true"'
            )
        diff = self.adapters.set_sources(read_multi_lora(self.model_dir))
        return {"adapters": self.adapters.names(), **diff, "resident": sorted(self.adapters.resident())}

    def control(self, op: str, sink: ResponseSink) -> None:
        """Answer a control request on ``sink``: one FINAL response (``op`` ``"reload_adapters"``: the JSON of
        :meth:`reload_adapters` as its text, finish reason ``adapters_reloaded``) or an error."""
        if op != "reload_adapters":
            sink.send_error(f"unknown control request {op!r}", "INVALID_ARG")
            return
        try:
            result = self.reload_adapters()
        except (LoraNotEnabled, MultiLoraConfigError) as e:
            sink.send_error(str(e), "INVALID_ARG")
            return
        logger.info("model %s: adapters reloaded: %s", self.model_name, result)
        sink.send(json.dumps(result), (), LORA_RELOADED, final=True)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the generator thread; requests still running end with an UNAVAILABLE error."""
        self.generator.close(timeout)
        if self.adapters is not None:
            self.adapters.close()
