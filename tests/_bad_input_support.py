"""Helpers of the scheduler's bad-input and fuzz tests: one real tritonserver with the fake model, a
scheduler in front of it, and clients that send exactly the bytes a test gives (HTTP) or protobufs (gRPC).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from _scheduler_cluster import REPO_KEY, BackgroundScheduler, scheduler_config
from _scheduler_fake import fake_triton_config, write_fake_repository
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from warmstart.triton import TritonConfig, TritonServer

MAX_TOKENS = 16  # the models' max_tokens: requests above it are out of range


@contextmanager
def triton_with_fake_models(root: Path, names: list[str]) -> Iterator[TritonServer]:
    """A tritonserver whose repository holds the fake model under each of ``names``."""
    repo = write_fake_repository(root / "repo", names)
    server = TritonServer(
        TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY), workdir=root / "triton"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(timeout=5.0)


def start_scheduler(triton: TritonServer, names: list[str], **extra: Any) -> BackgroundScheduler:
    """A scheduler serving ``names`` (fake models, ``max_tokens`` = :data:`MAX_TOKENS`) from ``triton``."""
    server = {
        "name": "s0",
        "grpc": triton.grpc_url,
        "repository_api_key": REPO_KEY,
        "bandwidth": {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8},
    }
    models = {
        n: {
            "checkpoint": f"s3://models/{n}",
            "size_bytes": 1 << 20,
            "max_tokens": MAX_TOKENS,
            "triton_config": fake_triton_config(n, token_delay_s=0.001),
        }
        for n in names
    }
    return BackgroundScheduler(scheduler_config([server], models, **extra))


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, bytes]:
    """One HTTP request with exactly ``body`` as its bytes; the status and the whole response body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post_json(port: int, path: str, body: Any) -> tuple[int, bytes]:
    return http_request(port, "POST", path, json.dumps(body).encode())


def raw_exchange(
    port: int, head: bytes, body: bytes = b"", timeout: float = 20.0
) -> tuple[int, bytes, str | None]:
    """Send ``head`` (request line and headers, ending in a blank line) and ``body``, then read one response
    without closing our side: a server that waits for more body bytes makes this time out. Returns the
    status, the body and the response's ``Connection`` header."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read(), resp.getheader("Connection")


def json_error(status: int, body: bytes) -> str:
    """The ``error`` message of a JSON error response (asserting it is one): ``{"error": "..."}`` (KServe,
    admin) or OpenAI's ``{"error": {"message": "...", ...}}`` (the ``/v1`` endpoints)."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise AssertionError(f"status {status}: the body is not JSON: {body[:300]!r}") from e
    assert isinstance(data, dict), (status, data)
    error = data.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    assert isinstance(error, str) and error, (status, data)
    return error


def sse_events(body: bytes) -> list[Any]:
    """The ``data:`` payloads of an SSE body (``[DONE]`` kept as the string)."""
    out: list[Any] = []
    for line in body.decode().splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :].strip()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# --------------------------------------------------------------------------------------------------- gRPC


def bytes_tensor(values: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def add_input(req: pb.ModelInferRequest, name: str, datatype: str, shape: list[int], data: bytes) -> None:
    """Append one input with raw contents ``data`` to ``req``."""
    t = req.inputs.add()
    t.name, t.datatype = name, datatype
    t.shape.extend(shape)
    req.raw_input_contents.append(data)


def infer_request(
    model: str,
    prompt: str | None = "hello",
    *,
    sampling: dict[str, Any] | None = None,
    stream: bool | None = None,
    request_id: str = "",
    parameters: dict[str, Any] | None = None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest as tritonclient builds it (raw contents, shape [1] per input)."""
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    if prompt is not None:
        add_input(req, "text_input", "BYTES", [1], bytes_tensor([prompt.encode()]))
    if stream is not None:
        add_input(req, "stream", "BOOL", [1], bytes([int(stream)]))
    if sampling is not None:
        add_input(req, "sampling_parameters", "BYTES", [1], bytes_tensor([json.dumps(sampling).encode()]))
    for key, value in (parameters or {}).items():
        p = req.parameters[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = str(value)
    return req


async def stream_infer(
    target: str, requests: Sequence[pb.ModelInferRequest], timeout: float = 60.0
) -> tuple[list[pb.ModelStreamInferResponse], grpc.StatusCode]:
    """Send ``requests`` on one ModelStreamInfer stream; every response until the server ends the stream,
    and the status it ended with."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(iter(list(requests)))
        responses: list[pb.ModelStreamInferResponse] = []

        async def read() -> None:
            async for resp in call:
                responses.append(resp)

        try:
            await asyncio.wait_for(read(), timeout)
        except grpc.aio.AioRpcError as e:
            return responses, e.code()
        return responses, await call.code()


def response_text(resp: pb.ModelStreamInferResponse) -> str:
    """The ``text_output`` of one stream response."""
    r = resp.infer_response
    names = [o.name for o in r.outputs]
    raw = r.raw_output_contents[names.index("text_output")]
    (n,) = struct.unpack_from("<I", raw, 0)
    return raw[4 : 4 + n].decode()


def response_tokens(resp: pb.ModelStreamInferResponse) -> list[int]:
    """The ``token_ids`` of one stream response."""
    r = resp.infer_response
    names = [o.name for o in r.outputs]
    raw = r.raw_output_contents[names.index("token_ids")]
    return list(struct.unpack(f"<{len(raw) // 8}q", raw))
