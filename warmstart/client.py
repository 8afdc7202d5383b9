"""A small streaming client for warmstart models on Triton (or the scheduler, which speaks the same protocol).

It is a thin layer over ``tritonclient.grpc`` streaming with the backend's vllm-style inputs; any KServe v2
client works the same way. Given several scheduler replicas it resumes a stream through another one when
the replica serving it goes away (``generated_ids``: see :func:`generate_stream`).
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from warmstart.errors import WarmstartError

logger = logging.getLogger(__name__)


class GenerationError(WarmstartError):
    """The server answered a generation with an error (the message carries Triton's status and text)."""


@dataclass(frozen=True)
class Delta:
    """One streamed response: the new text and token ids, seconds since the request was sent, on the last
    response the finish reason, and the endpoint that sent it."""

    text: str
    token_ids: tuple[int, ...]
    seconds: float
    finish_reason: str | None = None
    endpoint: str | None = None  # which endpoint sent it (another one after a resume)


def _inputs(prompt: str, sampling: dict[str, Any], generated: Sequence[int] = ()) -> list[Any]:
    import tritonclient.grpc as grpcclient

    def tensor(name: str, dtype: str, value: np.ndarray) -> Any:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    inputs = [
        tensor("text_input", "BYTES", np.array([prompt.encode()], dtype=np.object_)),
        tensor("stream", "BOOL", np.array([True])),
        tensor("sampling_parameters", "BYTES", np.array([json.dumps(sampling).encode()], dtype=np.object_)),
    ]
    if generated:  # a resume through another scheduler replica: the tokens this client already has
        inputs.append(tensor("generated_ids", "INT64", np.asarray(generated, dtype=np.int64)))
    return inputs


class _EndpointLost(Exception):
    """The endpoint serving the stream went away (connection lost, unavailable, silent)."""


_LOST_MARKERS = (
    "unavailable",
    "socket closed",
    "connection reset",
    "connection refused",
    "failed to connect",
)


def _is_lost(error: Any) -> bool:
    status = str(getattr(error, "status", lambda: "")() or "")
    text = f"{status} {error}".lower()
    return "unavailable" in status.lower() or any(m in text for m in _LOST_MARKERS)


def generate_stream(
    grpc_url: str | Sequence[str], model: str, prompt: str, *, timeout: float = 300.0, **sampling: Any
) -> Iterator[Delta]:
    """Stream a generation from ``model``, yielding a :class:`Delta` per response.

    ``grpc_url`` is ``host:port``, or several: the scheduler replicas (or servers) to use in turn. When the
    one serving the stream goes away (its connection breaks, it answers UNAVAILABLE, or it sends nothing for
    ``timeout`` seconds while another endpoint is left), the generation resumes through the next one with the
    token ids already received (the ``generated_ids`` input), so the caller sees one continuous stream:
    token-exact for greedy decoding and for sampling with a ``seed`` (one is chosen here for a
    ``temperature`` > 0 without one, so a resume can be exact). Each endpoint is tried once.

    ``sampling`` are the backend's sampling parameters (``max_tokens``, ``temperature``, ``top_p``, ``top_k``,
    ``seed``, ``stop``). Raises :class:`GenerationError` if the server reports an error about the request,
    or every endpoint was lost; ``TimeoutError`` if the only endpoint sends nothing for ``timeout`` seconds.
    Closing the iterator early cancels the request.
    """
    urls = [grpc_url] if isinstance(grpc_url, str) else list(grpc_url)
    if not urls:
        raise ValueError("generate_stream needs at least one endpoint (host:port)")
    params = dict(sampling)
    if float(params.get("temperature", 0.0) or 0.0) > 0 and params.get("seed") is None and len(urls) > 1:
        params["seed"] = secrets.randbits(31)
    received: list[int] = []
    t0 = time.monotonic()
    lost: list[str] = []
    finished = False
    for n, url in enumerate(urls):
        last = n == len(urls) - 1
        try:
            for delta in _stream_once(
                url, model, prompt, sampling=params, generated=received, timeout=timeout, t0=t0, last=last
            ):
                received.extend(delta.token_ids)
                finished = finished or delta.finish_reason is not None
                yield delta
            return
        except _EndpointLost as e:
            lost.append(f"{url}: {e}")
            if finished or len(received) >= int(params.get("max_tokens", 16)):
                return  # everything arrived but the final response: nothing to resume
            if last:
                break
            logger.warning(
                "%s at %s lost (%s); resuming at token %d through %s",
                model,
                url,
                e,
                len(received),
                urls[n + 1],
            )
    raise GenerationError(f"{model}: every endpoint was lost ({'; '.join(lost)})")


def _stream_once(
    url: str,
    model: str,
    prompt: str,
    *,
    sampling: dict[str, Any],
    generated: Sequence[int],
    timeout: float,
    t0: float,
    last: bool,
) -> Iterator[Delta]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    q: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    done = False
    try:
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        try:
            client.async_stream_infer(
                model, _inputs(prompt, sampling, generated), request_id="1", enable_empty_final_response=True
            )
        except InferenceServerException as e:  # the stream broke at once: its reason went to the callback
            try:
                _, cause = q.get(timeout=1.0)
            except queue.Empty:
                cause = e
            if _is_lost(cause):
                raise _EndpointLost(str(cause)) from None
            raise GenerationError(f"{model} at {url}: {cause}") from None
        while not done:
            try:
                result, error = q.get(timeout=timeout)
            except queue.Empty:
                if not last:
                    raise _EndpointLost(f"sent nothing for {timeout} s") from None
                raise TimeoutError(f"{model} at {url} sent nothing for {timeout} s") from None
            if error is not None:
                if _is_lost(error):
                    raise _EndpointLost(str(error))
                raise GenerationError(f"{model} at {url}: {error}")
            done = result.get_response().parameters["triton_final_response"].bool_param
            text = result.as_numpy("text_output")
            ids = result.as_numpy("token_ids")
            reason = result.as_numpy("finish_reason")
            if text is None and ids is None and reason is None:
                continue  # the empty final response
            yield Delta(
                text="" if text is None else text.reshape(-1)[0].decode("utf-8"),
                token_ids=() if ids is None else tuple(int(i) for i in ids.reshape(-1)),
                seconds=time.monotonic() - t0,
                finish_reason=None if reason is None else reason.reshape(-1)[0].decode(),
                endpoint=url,
            )
    finally:
        try:
            client.stop_stream(cancel_requests=not done)
            client.close()
        except Exception as e:
            logger.debug("closing the stream to %s: %s", url, e)
