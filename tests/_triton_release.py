"""A release as any client that reaches a tritonserver's inference port can send it (tests' helper)."""

from __future__ import annotations

import queue
from typing import Any


def raw_release(url: str, model: str, parameters: dict[str, Any]) -> str:
    """Send one gRPC stream request without inputs and with ``parameters`` to ``model`` at ``url``; return its
    error message, or ``"finish_reason: <reason>"`` for an answer."""
    import tritonclient.grpc as grpcclient

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(model, [], request_id="intruder", parameters=parameters)
        result, error = answers.get(timeout=30)
    finally:
        client.stop_stream()
        client.close()
    if error is not None:
        return str(error.message() if hasattr(error, "message") else error)
    return f"finish_reason: {result.as_numpy('finish_reason').reshape(-1)[0].decode()}"
