"""A small streaming client for warmstart models on Triton (or the scheduler, which speaks the same protocol).

It is a thin layer over ``tritonclient.grpc`` streaming with the backend's vllm-style inputs; any KServe v2
client works the same way.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from warmstart.errors import WarmstartError


class GenerationError(WarmstartError):
    """The server answered a generation with an error (the message carries Triton's status and text)."""


@dataclass(frozen=True)
class Delta:
    """One streamed response: the new text and token ids, seconds since the request was sent, and on the
    last response the finish reason."""

    text: str
    token_ids: tuple[int, ...]
    seconds: float
    finish_reason: str | None = None


def _inputs(prompt: str, sampling: dict[str, Any]) -> list[Any]:
    import tritonclient.grpc as grpcclient

    def tensor(name: str, dtype: str, value: np.ndarray) -> Any:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    return [
        tensor("text_input", "BYTES", np.array([prompt.encode()], dtype=np.object_)),
        tensor("stream", "BOOL", np.array([True])),
        tensor("sampling_parameters", "BYTES", np.array([json.dumps(sampling).encode()], dtype=np.object_)),
    ]


def generate_stream(
    grpc_url: str, model: str, prompt: str, *, timeout: float = 300.0, **sampling: Any
) -> Iterator[Delta]:
    """Stream a generation from ``model`` at ``grpc_url`` (``host:port``), yielding a :class:`Delta` per response.

    ``sampling`` are the backend's sampling parameters (``max_tokens``, ``temperature``, ``top_p``, ``top_k``,
    ``seed``, ``stop``). Raises :class:`GenerationError` if the server reports an error, ``TimeoutError``
    if no response arrives for ``timeout`` seconds. Closing the iterator early cancels the request.
    """
    import tritonclient.grpc as grpcclient

    q: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    done = False
    t0 = time.monotonic()
    try:
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        client.async_stream_infer(
            model, _inputs(prompt, sampling), request_id="1", enable_empty_final_response=True
        )
        while not done:
            try:
                result, error = q.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"{model} at {grpc_url} sent nothing for {timeout} s") from None
            if error is not None:
                raise GenerationError(f"{model} at {grpc_url}: {error}")
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
            )
    finally:
        client.stop_stream(cancel_requests=not done)
        client.close()
