"""With a repository key, tritonserver's control APIs (model repository, shared memory, logging, trace) need
it over HTTP and gRPC; inference, health, metadata, model config and statistics stay open for plain clients.

Real tritonserver, real HTTP and gRPC calls, a real system shared-memory region.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from warmstart.triton import RESTRICTED_APIS, TritonServer

pytestmark = pytest.mark.triton

KEY = "restricted-key-0123456789"
HEADER = "x-warmstart-repo-key"


def _http(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else None


@pytest.fixture
def region() -> Iterator[tuple[str, int]]:
    """A 64-byte POSIX shared-memory region (its key and size), removed afterwards."""
    import tritonclient.utils.shared_memory as shm

    key = f"/warmstart-restricted-{os.getpid()}"
    handle = shm.create_shared_memory_region("probe", key, 64)
    try:
        yield key, 64
    finally:
        shm.destroy_shared_memory_region(handle)


def test_the_restricted_list_keeps_what_plain_clients_need_open() -> None:
    assert set(RESTRICTED_APIS) == {"model-repository", "shared-memory", "logging", "trace"}


def test_control_apis_need_the_key_over_http(
    triton_server_factory: Callable[..., TritonServer], region: tuple[str, int]
) -> None:
    server = triton_server_factory(repository_api_key=KEY)
    base = f"http://{server.http_url}"
    key, size = region
    register = (
        f"{base}/v2/systemsharedmemory/region/probe/register",
        {"key": key, "offset": 0, "byte_size": size},
    )
    calls = [
        (f"{base}/v2/logging", {"log_verbose_level": 1}),
        (f"{base}/v2/logging", None),
        (f"{base}/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
        register,
        (f"{base}/v2/systemsharedmemory/status", None),
        (f"{base}/v2/repository/index", {}),
    ]
    for url, body in calls:
        for headers in ({}, {HEADER: "wrong-key-0000000"}):
            status, answer = _http(url, body, headers)
            assert status == 403 and "restricted" in str(answer), (url, headers, status, answer)
    assert _http(f"{base}/v2/logging", headers={HEADER: KEY})[1]["log_verbose_level"] == 0  # nothing changed
    assert _http(f"{base}/v2/systemsharedmemory/status", headers={HEADER: KEY}) == (200, [])

    authorized = {HEADER: KEY}
    status, settings = _http(f"{base}/v2/logging", {"log_verbose_level": 1}, authorized)
    assert status == 200 and settings["log_verbose_level"] == 1, settings
    assert _http(f"{base}/v2/trace/setting", {"trace_level": ["OFF"]}, authorized)[0] == 200
    assert _http(*register, authorized)[0] == 200
    status, regions = _http(f"{base}/v2/systemsharedmemory/status", headers=authorized)
    assert status == 200 and [r["name"] for r in regions] == ["probe"], regions
    assert _http(f"{base}/v2/systemsharedmemory/region/probe/unregister", {}, authorized)[0] == 200

    # plain clients keep what they need, without a key
    assert _http(f"{base}/v2/health/live")[0] == 200
    assert _http(f"{base}/v2")[0] == 200  # server metadata
    assert _http(f"{base}/v2/models/stats")[0] == 200  # statistics: read-only, as on the metrics port


def test_control_apis_need_the_key_over_grpc(
    triton_server_factory: Callable[..., TritonServer], region: tuple[str, int]
) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = triton_server_factory(repository_api_key=KEY)
    key, size = region
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        calls: list[Callable[..., Any]] = [
            lambda **h: client.update_log_settings({"log_verbose_level": 1}, **h),
            client.get_log_settings,
            lambda **h: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}, **h),
            lambda **h: client.register_system_shared_memory("probe", key, size, **h),
            client.get_system_shared_memory_status,
            client.get_model_repository_index,
        ]
        for call in calls:
            for headers in (None, {"triton-grpc-protocol-" + HEADER: "wrong-key-0000000"}):
                with pytest.raises(InferenceServerException, match="restricted"):
                    call(headers=headers)
        authorized = server.repository_grpc_headers
        assert authorized == {"triton-grpc-protocol-" + HEADER: KEY}
        assert client.get_log_settings(headers=authorized, as_json=True)["settings"]["log_verbose_level"] == {
            "uint32_param": 0
        }
        assert client.get_system_shared_memory_status(headers=authorized, as_json=True) == {}

        client.update_log_settings({"log_verbose_level": 1}, headers=authorized)
        settings = client.get_log_settings(headers=authorized, as_json=True)["settings"]
        assert settings["log_verbose_level"] == {"uint32_param": 1}, settings
        client.update_trace_settings(settings={"trace_level": ["OFF"]}, headers=authorized)
        client.register_system_shared_memory("probe", key, size, headers=authorized)
        status = client.get_system_shared_memory_status(headers=authorized, as_json=True)
        assert list(status["regions"]) == ["probe"], status
        client.unregister_system_shared_memory("probe", headers=authorized)

        assert client.is_server_live() and client.is_server_ready()  # health: open
        assert client.get_server_metadata().name == "triton"  # metadata: open
        client.get_inference_statistics()  # statistics: open
    finally:
        client.close()
