"""Calls from the scheduler to one Triton server over gRPC (``grpc.aio``): health, repository, streaming.

Every call has a timeout; unary calls are retried a bounded number of times with exponential backoff when
the server is unreachable. Failures are typed so the router can tell a dead server (fail over, resume by
replay) from a request the model refused (tell the client).

Generation requests follow the warmstart backend's vllm-style I/O: ``text_input``, ``stream``,
``sampling_parameters`` (JSON), ``exclude_input_in_output`` in; ``text_output``, ``token_ids``,
``finish_reason`` out (and, on the last response, ``prompt_tokens`` and ``stop_token_id`` when the backend
sends them). A generation resumed elsewhere sends ``input_ids`` (prompt ids, when known, plus the ids
generated so far) and ``num_generated``; the backend prefills them and, sampling being a function of (seed,
position), continues token-exactly. A prompt given as token ids goes as ``input_ids`` from the start.

A release (:meth:`TritonUpstream.release`) is an inference request with no inputs and the request parameter
``warmstart_release`` = true, sent on the same stream protocol with the server's repository API key as the
request parameter ``warmstart_release_key`` (the backend refuses a release without it): the warmstart backend
closes the model's engine, starts the model's unload itself, and answers one final response with
``finish_reason`` "released" (anything else is a failure). A released model answers every generation with
UNAVAILABLE "... released; it is being unloaded" until it is gone: :class:`UpstreamModelReleased`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from warmstart.names import validate_model_name
from warmstart.scheduler.config import ServerConfig
from warmstart.scheduler.errors import SchedulerError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# the warmstart backend's release request (warmstart.backend.request.RELEASE_PARAMETER and RELEASED)
RELEASE_PARAMETER = "warmstart_release"
RELEASE_KEY_PARAMETER = "warmstart_release_key"  # warmstart.backend.release.RELEASE_KEY_PARAMETER
RELEASED = "released"
# the warmstart backend's adapter reload (warmstart.backend.request.LORA_RELOAD_PARAMETER and friends)
LORA_RELOAD_PARAMETER = "warmstart_lora_reload"
LORA_ADAPTERS_PARAMETER = "warmstart_lora_adapters"
LORA_RELOADED = "adapters_reloaded"
RELEASED_MARKER = "released; it is being unloaded"  # in the backend's answer to a request on a released model
_release_ids = itertools.count(1)

# RPC status codes that mean "this server cannot be reached or went away": fail over to another one.
STREAM_END_TIMEOUT_S = 30.0  # how long a finished stream is held while the server ends it
CLOSE_DRAIN_S = 5.0  # how long close() waits for finished streams to end (they take milliseconds)
_UNREACHABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class UpstreamError(SchedulerError):
    """Base class of failures talking to a Triton server."""


class UpstreamUnavailable(UpstreamError):
    """The server did not answer (connection refused or reset, UNAVAILABLE, timeout): fail over."""


class UpstreamModelMissing(UpstreamError):
    """The server does not have the model loaded (it restarted, or it was unloaded under us)."""


class UpstreamModelReleased(UpstreamModelMissing):
    """The model's engine was released on this server (it serves nothing until it is unloaded and loaded)."""


class UpstreamRequestError(UpstreamError):
    """The model answered the request with an error (bad input, engine failure); not retried."""


class ModelLoadFailed(UpstreamError):
    """Triton refused or failed to load a model; the message carries Triton's reason."""


class ModelUnloadFailed(UpstreamError):
    """Triton refused to unload a model, or it did not reach UNAVAILABLE in time."""


class ModelReleaseFailed(UpstreamError):
    """The model did not release its engine (another backend, generations in flight, an error, a timeout)."""


class AdapterReloadFailed(UpstreamError):
    """The model did not take the adapters sent (refused, not a warmstart LoRA model, no answer in time)."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One upstream generation: the prompt, sampling parameters, and what was generated already.

    ``generated`` non-empty means resume: the backend gets ``input_ids`` (``prompt_ids`` + ``generated``
    when the prompt ids are known, else ``generated`` alone beside ``text_input``) and ``num_generated``.
    ``prompt_ids`` known from the start (a token-id prompt) go as ``input_ids`` even before anything was
    generated; ``text_input`` is then left out when ``prompt`` is empty. ``messages`` (a chat: the JSON
    array of its messages) goes as the ``messages`` input in place of ``text_input``: the backend renders it
    with the model's chat template, and a resume sends ``generated`` beside it as for a text prompt.
    """

    model: str
    request_id: str
    prompt: str
    sampling: Mapping[str, Any]
    prompt_ids: tuple[int, ...] | None = None
    generated: tuple[int, ...] = ()
    messages: str | None = None
    lora_name: str | None = None  # the LoRA adapter to generate with (sent as sampling_parameters' lora_name)


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """One upstream response: new text, new token ids, and the finish reason on the last one.

    ``prompt_tokens`` (the prompt's token count) and ``stop_token_id`` (the EOS id that ended the generation)
    come with the last response of a warmstart backend; None when not sent.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    final: bool
    prompt_tokens: int | None = None
    stop_token_id: int | None = None


def _bytes_tensor(values: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _decode_bytes_tensor(raw: bytes) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    while pos + 4 <= len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        out.append(raw[pos : pos + n])
        pos += n
    return out


def build_infer_request(req: GenerationRequest) -> pb.ModelInferRequest:
    """The ModelInferRequest for ``req`` (streaming, prompt excluded from the output, empty final allowed)."""
    r = pb.ModelInferRequest(model_name=req.model, id=req.request_id)

    def add(name: str, datatype: str, shape: list[int], raw: bytes) -> None:
        t = r.inputs.add()
        t.name = name
        t.datatype = datatype
        t.shape.extend(shape)
        r.raw_input_contents.append(raw)

    if req.messages is not None:
        add("messages", "BYTES", [1], _bytes_tensor([req.messages.encode()]))
    elif req.prompt or req.prompt_ids is None:
        add("text_input", "BYTES", [1], _bytes_tensor([req.prompt.encode()]))
    add("stream", "BOOL", [1], np.array([True]).tobytes())
    add("exclude_input_in_output", "BOOL", [1], np.array([True]).tobytes())
    sampling = dict(req.sampling)
    if req.lora_name is not None:
        sampling["lora_name"] = req.lora_name
    add("sampling_parameters", "BYTES", [1], _bytes_tensor([json.dumps(sampling).encode()]))
    if req.generated or req.prompt_ids is not None:
        ids = (req.prompt_ids or ()) + req.generated
        add("input_ids", "INT64", [len(ids)], np.asarray(ids, dtype=np.int64).tobytes())
        add("num_generated", "INT64", [1], np.asarray([len(req.generated)], dtype=np.int64).tobytes())
    r.parameters["triton_enable_empty_final_response"].bool_param = True
    return r


def parse_infer_response(resp: pb.ModelInferResponse) -> TokenChunk:
    """Text, token ids, finish reason and the final flag of one streamed response."""
    text = ""
    ids: tuple[int, ...] = ()
    finish: str | None = None
    counts: dict[str, int] = {}
    raw = list(resp.raw_output_contents)
    for i, out in enumerate(resp.outputs):
        data = raw[i] if i < len(raw) else b""
        if out.name == "text_output":
            parts = _decode_bytes_tensor(data) if data else [bytes(b) for b in out.contents.bytes_contents]
            text = b"".join(parts).decode("utf-8", errors="replace")
        elif out.name == "token_ids":
            if data:
                ids = tuple(int(x) for x in np.frombuffer(data, dtype=np.int64))
            else:
                ids = tuple(int(x) for x in out.contents.int64_contents)
        elif out.name == "finish_reason":
            parts = _decode_bytes_tensor(data) if data else [bytes(b) for b in out.contents.bytes_contents]
            value = b"".join(parts).decode("utf-8", errors="replace")
            finish = value or None
        elif out.name in ("prompt_tokens", "stop_token_id"):
            values = np.frombuffer(data, dtype=np.int64) if data else list(out.contents.int64_contents)
            if len(values) == 1 and int(values[0]) >= 0:
                counts[out.name] = int(values[0])
    final = (
        resp.parameters["triton_final_response"].bool_param
        if "triton_final_response" in resp.parameters
        else False
    )
    return TokenChunk(
        text=text,
        token_ids=ids,
        finish_reason=finish,
        final=final,
        prompt_tokens=counts.get("prompt_tokens"),
        stop_token_id=counts.get("stop_token_id"),
    )


def build_release_request(model: str, request_id: str, key: str | None = None) -> pb.ModelInferRequest:
    """The ModelInferRequest that asks ``model``'s instance to release its engine (no inputs), carrying the
    server's repository API ``key`` (without one the backend refuses it)."""
    r = pb.ModelInferRequest(model_name=model, id=request_id)
    r.parameters[RELEASE_PARAMETER].bool_param = True
    if key is not None:
        r.parameters[RELEASE_KEY_PARAMETER].string_param = key
    return r


def build_adapters_request(
    model: str, request_id: str, adapters: Mapping[str, str], key: str | None = None
) -> pb.ModelInferRequest:
    """The ModelInferRequest that makes ``model``'s instance serve ``adapters`` (name -> checkpoint
    reference): its ``multi_lora.json`` is rewritten and re-read, the base staying loaded. Carries the server's
    repository API ``key`` (the backend refuses the write without it)."""
    r = pb.ModelInferRequest(model_name=model, id=request_id)
    r.parameters[LORA_RELOAD_PARAMETER].bool_param = True
    r.parameters[LORA_ADAPTERS_PARAMETER].string_param = json.dumps(dict(sorted(adapters.items())))
    if key is not None:
        r.parameters[RELEASE_KEY_PARAMETER].string_param = key
    return r


def _is_model_missing(message: str) -> bool:
    lowered = message.lower()
    return (
        "unknown model" in lowered
        or "is not found" in lowered
        or "is not ready" in lowered
        or "is being unloaded" in lowered  # the warmstart backend, once released or finalizing
    )


class Upstream(Protocol):
    """What the router needs of one inference server; `TritonUpstream` is the real one, and tests inject
    their own (``Router(upstream_factory=...)``) to drive failover, switch and resume paths without a
    process. Errors are the `UpstreamError` family, as `TritonUpstream` documents them."""

    async def close(self) -> None: ...

    async def check_live(self, timeout_s: float | None = None) -> None: ...

    async def index(self) -> list[dict[str, str]]: ...

    async def load(
        self,
        name: str,
        config: Mapping[str, Any],
        *,
        timeout_s: float,
        files: Mapping[str, bytes] | None = None,
    ) -> float: ...

    async def unload(self, name: str, *, wait_s: float = 30.0) -> None: ...

    async def release(self, name: str, *, timeout_s: float) -> float: ...

    async def set_adapters(
        self, name: str, adapters: Mapping[str, str], *, timeout_s: float
    ) -> dict[str, Any]: ...

    def generate(
        self, req: GenerationRequest, *, idle_timeout_s: float
    ) -> AsyncGenerator[TokenChunk, None]: ...


class TritonUpstream:
    """One Triton server as seen from the scheduler: a gRPC channel plus typed calls with timeouts."""

    def __init__(self, config: ServerConfig, *, timeout_s: float, retries: int) -> None:
        self.config = config
        self.name = config.name
        self._timeout = timeout_s
        self._retries = retries
        self._channel = grpc.aio.insecure_channel(config.grpc, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._repo_metadata = tuple(config.grpc_metadata.items())
        self._draining: set[asyncio.Task[None]] = set()  # finished streams waiting for their OK status

    async def close(self) -> None:
        """Close the channel (cancels open streams), once the finished streams have ended on their own (at most
        :data:`CLOSE_DRAIN_S`): closing cancels them, and a cancelled finished stream leaks its model's
        reference in tritonserver 2.51 (:func:`_drain`), seen as a model stuck UNLOADING after a scheduler
        stopped right after a generation's last token."""
        if self._draining:
            await asyncio.wait(set(self._draining), timeout=CLOSE_DRAIN_S)
        await self._channel.close(grace=None)

    async def _unary(self, what: str, call: Callable[[], Awaitable[T]], *, retries: int | None = None) -> T:
        attempts = (self._retries if retries is None else retries) + 1
        delay = 0.05
        for attempt in range(attempts):
            try:
                return await call()
            except grpc.aio.AioRpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                if attempt + 1 >= attempts:
                    raise UpstreamUnavailable(
                        f"{self.name}: {what} failed after {attempts} attempts: {e.code().name} {e.details()}"
                    ) from e
                logger.debug(
                    "%s: %s attempt %d failed (%s), retrying", self.name, what, attempt + 1, e.code()
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- health -------------------------------------------------------------------------------------------
    async def check_live(self, timeout_s: float | None = None) -> None:
        """Raise :class:`UpstreamUnavailable` unless the server answers ServerLive with live=true."""
        t = timeout_s if timeout_s is not None else self._timeout
        try:
            resp = await self._stub.ServerLive(pb.ServerLiveRequest(), timeout=t)
        except grpc.aio.AioRpcError as e:
            raise UpstreamUnavailable(f"{self.name}: not live ({e.code().name})") from e
        if not resp.live:
            raise UpstreamUnavailable(f"{self.name}: ServerLive answered live=false")

    # -- repository ---------------------------------------------------------------------------------------
    async def index(self) -> list[dict[str, str]]:
        """The repository index: ``[{"name", "version", "state", "reason"}]``."""
        try:
            resp = await self._unary(
                "repository index",
                lambda: self._stub.RepositoryIndex(
                    pb.RepositoryIndexRequest(), metadata=self._repo_metadata, timeout=self._timeout
                ),
            )
        except grpc.aio.AioRpcError as e:
            raise UpstreamError(
                f"{self.name}: repository index refused: {e.code().name} {e.details()}"
            ) from e
        return [
            {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in resp.models
        ]

    async def load(
        self,
        name: str,
        config: Mapping[str, Any],
        *,
        timeout_s: float,
        files: Mapping[str, bytes] | None = None,
    ) -> float:
        """Load ``name`` with the full ``config``; returns the seconds it took. Never issued twice here.

        ``files`` (``"file:<path>"`` -> bytes, Triton's file override) are the model directory's files for this
        load: Triton then loads the model from a directory of its own holding them and the config, not from
        its repository (a LoRA model's ``multi_lora.json``, plus an empty version directory)."""
        validate_model_name(name)
        request = pb.RepositoryModelLoadRequest(model_name=name)
        request.parameters["config"].string_param = json.dumps(dict(config))
        for key, content in (files or {}).items():
            if not key.startswith("file:"):
                raise ValueError(f"a load's file override must be named 'file:<path>', got {key!r}")
            request.parameters[key].bytes_param = bytes(content)
        t0 = time.monotonic()
        try:
            await self._unary(
                f"load {name}",
                lambda: self._stub.RepositoryModelLoad(
                    request, metadata=self._repo_metadata, timeout=timeout_s
                ),
                retries=0,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() in _UNREACHABLE and e.code() != grpc.StatusCode.INTERNAL:
                raise UpstreamUnavailable(f"{self.name}: load {name}: {e.code().name} {e.details()}") from e
            raise ModelLoadFailed(f"{self.name}: loading {name!r} failed: {e.details()}") from e
        return time.monotonic() - t0

    async def unload(self, name: str, *, wait_s: float = 30.0) -> None:
        """Unload ``name`` and poll the index until it is UNAVAILABLE (memory freed), at most ``wait_s``."""
        validate_model_name(name)
        try:
            await self._unary(
                f"unload {name}",
                lambda: self._stub.RepositoryModelUnload(
                    pb.RepositoryModelUnloadRequest(model_name=name),
                    metadata=self._repo_metadata,
                    timeout=self._timeout,
                ),
            )
        except grpc.aio.AioRpcError as e:
            raise ModelUnloadFailed(f"{self.name}: unloading {name!r} failed: {e.details()}") from e
        deadline = time.monotonic() + wait_s
        while True:
            states = [m["state"] for m in await self.index() if m["name"] == name]
            if all(s == "UNAVAILABLE" for s in states):
                return
            if time.monotonic() >= deadline:
                raise ModelUnloadFailed(f"{self.name}: {name!r} still {states} {wait_s:.0f} s after unload")
            await asyncio.sleep(0.05)

    async def release(self, name: str, *, timeout_s: float) -> float:
        """Ask ``name``'s instance to drop its engine now (its memory is free when this returns), ahead of
        :meth:`unload`; returns the seconds it took. Raises :class:`UpstreamUnavailable` when the server
        cannot be reached, :class:`ModelReleaseFailed` for any other failure (a model of another backend,
        generations in flight, a refused key, no answer within ``timeout_s``)."""
        validate_model_name(name)
        request = build_release_request(
            name, f"warmstart-release-{next(_release_ids)}", self.config.repository_api_key
        )

        t0 = time.monotonic()
        await self._control(request, f"release {name}", ModelReleaseFailed, RELEASED, timeout_s)
        return time.monotonic() - t0

    async def set_adapters(
        self, name: str, adapters: Mapping[str, str], *, timeout_s: float
    ) -> dict[str, Any]:
        """Make ``name``'s instance serve ``adapters`` (name -> checkpoint reference) without reloading the base:
        the warmstart backend rewrites its ``multi_lora.json`` and re-reads it. Returns the backend's answer
        (``adapters``, ``added``, ``removed``, ``changed``, ``resident``). Raises :class:`UpstreamUnavailable`
        when the server cannot be reached, :class:`AdapterReloadFailed` otherwise."""
        validate_model_name(name)
        request = build_adapters_request(
            name, f"warmstart-adapters-{next(_release_ids)}", adapters, self.config.repository_api_key
        )

        chunk = await self._control(
            request, f"adapters of {name}", AdapterReloadFailed, LORA_RELOADED, timeout_s
        )
        try:
            answer = json.loads(chunk.text)
        except ValueError:
            answer = {}
        return answer if isinstance(answer, dict) else {}

    async def _control(
        self,
        request: pb.ModelInferRequest,
        what: str,
        failure: type[UpstreamError],
        expect: str,
        timeout_s: float,
    ) -> TokenChunk:
        """Send one control request (release, adapters) on its own stream and return its final answer,
        whose ``finish_reason`` must be ``expect``. :class:`UpstreamUnavailable` when the server cannot be
        reached; ``failure`` for everything else (no answer in ``timeout_s``, an error, another answer)."""

        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            yield request

        call = self._stub.ModelStreamInfer(requests())
        finished = False
        try:
            try:
                resp = await asyncio.wait_for(call.read(), timeout_s)
            except TimeoutError as e:
                raise failure(f"{self.name}: {what}: no answer in {timeout_s:.1f} s") from e
            except grpc.aio.AioRpcError as e:
                if e.code() in _UNREACHABLE:
                    raise UpstreamUnavailable(f"{self.name}: {what}: {e.code().name} {e.details()}") from e
                raise failure(f"{self.name}: {what}: {e.code().name} {e.details()}") from e
            if resp is grpc.aio.EOF:
                raise failure(f"{self.name}: {what}: the stream ended without an answer")
            if resp.error_message:
                finished = True  # an error response is final
                raise failure(f"{self.name}: {what}: {resp.error_message}")
            chunk = parse_infer_response(resp.infer_response)
            finished = chunk.final
            if not chunk.final or chunk.finish_reason != expect:
                raise failure(
                    f"{self.name}: {what}: answered {chunk.finish_reason!r}, not {expect!r} "
                    "(not a warmstart model?)"
                )
            return chunk
        finally:
            self._end(call, finished)

    def _end(self, call: Any, finished: bool) -> None:
        """Let a finished stream end on its own (see :func:`_drain`); cancel an unfinished one."""
        if finished:
            # A finished call is never cancelled (see _drain); the drain runs in its own task so that
            # cancelling the reader (the router does, right after the final response) cannot cancel the
            # call through a pending read.
            drain = asyncio.get_running_loop().create_task(_drain(call, self.name))
            self._draining.add(drain)
            drain.add_done_callback(self._draining.discard)
        else:
            call.cancel()

    # -- inference ----------------------------------------------------------------------------------------
    async def generate(
        self, req: GenerationRequest, *, idle_timeout_s: float
    ) -> AsyncGenerator[TokenChunk, None]:
        """Stream the responses of one generation; the stream is cancelled when the caller stops reading.

        Raises :class:`UpstreamUnavailable` when the server goes away or goes silent for ``idle_timeout_s``,
        :class:`UpstreamModelMissing` when it no longer has the model (:class:`UpstreamModelReleased` when its
        engine was released), :class:`UpstreamRequestError` when the model answered with an error.
        """
        validate_model_name(req.model)
        request = build_infer_request(req)

        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            yield request

        call = self._stub.ModelStreamInfer(requests())
        finished = False
        try:
            while True:
                try:
                    resp = await asyncio.wait_for(call.read(), idle_timeout_s)
                except TimeoutError as e:
                    raise UpstreamUnavailable(f"{self.name}: no response for {idle_timeout_s:.1f} s") from e
                except grpc.aio.AioRpcError as e:
                    if e.code() in _UNREACHABLE:
                        raise UpstreamUnavailable(
                            f"{self.name}: stream broke: {e.code().name} {e.details()}"
                        ) from e
                    raise UpstreamRequestError(f"{self.name}: {e.code().name} {e.details()}") from e
                if resp is grpc.aio.EOF:
                    raise UpstreamUnavailable(f"{self.name}: stream ended before the final response")
                if resp.error_message:
                    # an error ends its request (the warmstart backend sends errors with the FINAL flag; a
                    # request Triton refuses never started): drain the stream, never cancel it (_drain)
                    finished = True
                    if RELEASED_MARKER in resp.error_message:
                        raise UpstreamModelReleased(f"{self.name}: {resp.error_message}")
                    if _is_model_missing(resp.error_message):
                        raise UpstreamModelMissing(f"{self.name}: {resp.error_message}")
                    raise UpstreamRequestError(resp.error_message)
                chunk = parse_infer_response(resp.infer_response)
                if chunk.final:
                    finished = True
                yield chunk
                if chunk.final:
                    return
        finally:
            self._end(call, finished)


async def _drain(call: Any, server: str) -> None:
    """Wait for a finished ModelStreamInfer call to end with its status, without ever cancelling it.

    tritonserver 2.51 leaks a request's reference to its model when the client cancels a stream whose request
    has just completed; the model then stays UNLOADING (seen in benchmarks/workload.py as unloads timing out
    after 30 s while holding the server's memory budget). grpc.aio cancels a call whose pending read is
    cancelled, or that is garbage-collected before it is done, so the call is held here until the server has
    ended the (half-closed) stream.
    """
    try:
        await asyncio.wait_for(call.code(), STREAM_END_TIMEOUT_S)
    except (TimeoutError, grpc.aio.AioRpcError) as e:
        logger.warning(
            "%s: a finished stream did not end within %.0f s (%s)", server, STREAM_END_TIMEOUT_S, e
        )
