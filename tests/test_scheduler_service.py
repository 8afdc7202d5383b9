"""The scheduler service against real tritonservers: placement by locality, load de-duplication, keep-alive
and LRU eviction, failure recovery, concurrency, name validation, the admin API and every front end.

Models are a tiny decoupled Python model that imitates the warmstart backend's I/O with deterministic
fake tokens (``_scheduler_fake``); node stores are a small HTTP stand-in serving inventory and bandwidths.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from _scheduler_cluster import ADMIN_TOKEN, REPO_KEY, FakeNodeStore
from _scheduler_fake import expected_text, expected_tokens, fake_triton_config, write_fake_repository

from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MODEL_NAMES = [f"m{i}" for i in range(24)]


def _stop_all(servers: list[TritonServer]) -> None:
    threads = [threading.Thread(target=s.stop, kwargs={"timeout": 5.0}) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _start_tritons(repo: Path, workdir: Path, n: int) -> list[TritonServer]:
    servers: list[TritonServer] = []
    try:
        for i in range(n):
            s = TritonServer(
                TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY),
                workdir=workdir / f"t{i}",
            )
            servers.append(s)
            s.start()
    except BaseException:
        _stop_all(servers)
        raise
    return servers


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_repository(tmp_path_factory.mktemp("fake-repo"), MODEL_NAMES)


@pytest.fixture(scope="module")
def tritons(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TritonServer]]:
    servers = _start_tritons(repo, tmp_path_factory.mktemp("tritons"), 3)
    try:
        yield servers
    finally:
        _stop_all(servers)


@pytest.fixture
def stores() -> Iterator[list[FakeNodeStore]]:
    made = [FakeNodeStore() for _ in range(3)]
    try:
        yield made
    finally:
        for s in made:
            s.close()


def server_entry(
    name: str, triton: TritonServer, store: FakeNodeStore | None = None, **kw: Any
) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "grpc": triton.grpc_url, "repository_api_key": REPO_KEY, **kw}
    if store is not None:
        entry["node_store"] = store.url
    else:
        entry["bandwidth"] = {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8}
    return entry


def model_entry(
    name: str,
    *,
    token_delay_s: float = 0.005,
    load_delay_s: float = 0.0,
    unload_delay_s: float = 0.0,
    **kw: Any,
) -> dict[str, Any]:
    return {
        "checkpoint": f"s3://models/{name}",
        "size_bytes": 1 << 20,
        "triton_config": fake_triton_config(
            name, token_delay_s=token_delay_s, load_delay_s=load_delay_s, unload_delay_s=unload_delay_s
        ),
        **kw,
    }


def _states(triton: TritonServer) -> dict[str, str]:
    # over HTTP: sync gRPC calls from this thread can stall the scheduler's grpc.aio loop in the same process
    status, body = _post(f"http://{triton.http_url}/v2/repository/index", {}, triton.repository_headers)
    assert status == 200, body
    return {m["name"]: m.get("state", "") for m in json.loads(body)}


def _ready(triton: TritonServer) -> set[str]:
    return {name for name, state in _states(triton).items() if state == "READY"}


def _unload_everywhere(tritons: list[TritonServer], names: list[str]) -> None:
    for t in tritons:
        if not t.is_alive():
            continue
        loaded = _ready(t)
        for name in names:
            if name in loaded:
                _post(f"http://{t.http_url}/v2/repository/models/{name}/unload", {}, t.repository_headers)


async def _generate_stream(
    base: str, model: str, prompt: str, max_tokens: int, **params: Any
) -> list[dict[str, Any]]:
    body = {"text_input": prompt, "parameters": {"stream": True, "max_tokens": max_tokens, **params}}
    events = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v2/models/{model}/generate_stream", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    return events


def _post(
    url: str, body: Any, headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ----------------------------------------------------------------------------------------------- placement


def test_scheduler_places_cold_model_on_server_holding_it_in_memory(
    tritons: list[TritonServer], stores: list[FakeNodeStore], make_scheduler: Any
) -> None:
    stores[0].tiers = {"m0": "remote"}
    stores[1].tiers = {"m0": "disk"}
    stores[2].tiers = {"m0": "memory"}
    sched = make_scheduler(
        [server_entry(f"s{i}", t, stores[i]) for i, t in enumerate(tritons)], {"m0": model_entry("m0")}
    )
    try:
        events = asyncio.run(_generate_stream(sched.http, "m0", "hello", 4))
        assert "".join(e["text_output"] for e in events) == expected_text("hello", 4)
        assert sched.state()["stats"]["loads"] == {"s2/m0": 1}
        assert "m0" in _ready(tritons[2])
    finally:
        _unload_everywhere(tritons, ["m0"])


def test_twenty_concurrent_first_requests_cause_one_load(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    sched = make_scheduler(
        [server_entry(f"s{i}", t) for i, t in enumerate(tritons)],
        {"m1": model_entry("m1", load_delay_s=1.0, max_concurrency=32)},
    )

    async def many() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(_generate_stream(sched.http, "m1", f"p{i}", 3) for i in range(20)))

    try:
        results = asyncio.run(many())
        for i, events in enumerate(results):
            assert [t for e in events for t in e["token_ids"]] == expected_tokens(f"p{i}", 3)
        assert sum(sched.state()["stats"]["loads"].values()) == 1
    finally:
        _unload_everywhere(tritons, ["m1"])


def test_idle_model_is_unloaded_after_keep_alive(tritons: list[TritonServer], make_scheduler: Any) -> None:
    sched = make_scheduler([server_entry("s0", tritons[0])], {"m2": model_entry("m2", keep_alive_s=1.0)})
    asyncio.run(_generate_stream(sched.http, "m2", "x", 2))
    assert _states(tritons[0]).get("m2") == "READY"
    deadline = time.monotonic() + 30  # generous: the 2 cores are shared
    while time.monotonic() < deadline:
        if _states(tritons[0]).get("m2") == "UNAVAILABLE" and sched.state()["stats"]["unloads"] == 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"m2 was not unloaded after its keep-alive: {sched.state()}")
    assert "m2" not in sched.state()["servers"]["s0"]["instances"]


def test_request_during_the_models_unload_waits_for_it_then_loads_again(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    """A request for a model whose keep-alive unload is still running on the only server: the new load waits
    for that unload (loading under it made tritonserver reload the model, and the unload then waited 30 s
    for an UNAVAILABLE that never came, holding the server's memory budget)."""
    sched = make_scheduler(
        [server_entry("s0", tritons[0])], {"m6": model_entry("m6", keep_alive_s=0.5, unload_delay_s=2.0)}
    )
    try:
        asyncio.run(_generate_stream(sched.http, "m6", "a", 2))
        deadline = time.monotonic() + 30
        while "m6" not in sched.state()["servers"]["s0"]["unloading"]:
            assert time.monotonic() < deadline, f"m6 was never unloaded: {sched.state()}"
            time.sleep(0.05)
        events = asyncio.run(_generate_stream(sched.http, "m6", "b", 2))  # while the stub finalizes
        assert [t for e in events for t in e["token_ids"]] == expected_tokens("b", 2)
        state = sched.state()
        assert state["servers"]["s0"]["unloading"] == [] and state["stats"]["unloads"] == 1
        assert _states(tritons[0]).get("m6") == "READY"
    finally:
        _unload_everywhere(tritons, ["m6"])


def test_least_recently_used_model_is_evicted_when_memory_is_full(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    mib = 1 << 20
    sched = make_scheduler(
        [server_entry("s0", tritons[1], memory_budget_bytes=2 * mib)],
        {n: model_entry(n) for n in ("m3", "m4", "m5")},
    )
    try:
        for name in ("m3", "m4", "m3", "m5"):  # m4 is the least recently used when m5 needs room
            asyncio.run(_generate_stream(sched.http, name, "y", 2))
            time.sleep(0.05)
        ready = _ready(tritons[1])
        assert {"m3", "m5"} <= ready and "m4" not in ready
        state = sched.state()
        assert state["stats"]["evictions"] == 1
        # the fake model cannot release (it answers a request without a prompt with an error): the load waited
        # for the unload instead, and evictions there keep costing the unload time
        assert (state["stats"]["releases"], state["stats"]["unloads"]) == (0, 1)
        assert state["servers"]["s0"]["release_s"] is None
        assert set(state["servers"]["s0"]["instances"]) == {"m3", "m5"}
    finally:
        _unload_everywhere([tritons[1]], ["m3", "m4", "m5"])


# ---------------------------------------------------------------------------------------- failure recovery


def test_sigkill_mid_stream_continues_token_exactly_on_another_server(
    repo: Path, tmp_path: Path, make_scheduler: Any
) -> None:
    own = _start_tritons(repo, tmp_path, 2)
    try:
        sched = make_scheduler(
            [server_entry(f"k{i}", t) for i, t in enumerate(own)],
            {"m6": model_entry("m6", token_delay_s=0.05)},
        )
        n = 30
        body = {
            "text_input": "resume me",
            "parameters": {"stream": True, "max_tokens": n, "temperature": 0.7, "seed": 11},
        }
        got: list[int] = []
        killed: list[str] = []

        async def run() -> None:
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{sched.http}/v2/models/m6/generate_stream", json=body) as resp,
            ):
                assert resp.status == 200
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    got.extend(event["token_ids"])
                    if len(got) == 8 and not killed:
                        serving = next(
                            name for name, s in sched.state()["servers"].items() if "m6" in s["instances"]
                        )
                        victim = own[int(serving[1:])]
                        assert victim.pid is not None
                        os.kill(victim.pid, signal.SIGKILL)
                        killed.append(serving)

        asyncio.run(run())
        assert got == expected_tokens("resume me", n, seed=11)
        state = sched.state()
        assert state["stats"]["failovers"] >= 1
        assert state["servers"][killed[0]]["healthy"] is False
        # the health loop brings it back once a server answers on its address again
        dead = own[int(killed[0][1:])]
        cfg = dead.config
        revived = TritonServer(
            TritonConfig(
                model_repositories=cfg.model_repositories,
                repository_api_key=REPO_KEY,
                http_port=cfg.http_port,
                grpc_port=cfg.grpc_port,
                metrics_port=cfg.metrics_port,
            ),
            workdir=tmp_path / "revived",
        )
        own.append(revived)
        revived.start()
        deadline = time.monotonic() + 20
        while not sched.state()["servers"][killed[0]]["healthy"]:
            assert time.monotonic() < deadline, "the restarted server did not come back into routing"
            time.sleep(0.2)
    finally:
        _stop_all(own)


# ------------------------------------------------------------------------------------------------- scale


def test_two_hundred_concurrent_streams_over_five_models_none_lost_or_duplicated(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    import tritonclient.grpc.aio as grpcaio

    names = ["m7", "m8", "m9", "m10", "m11"]
    sched = make_scheduler(
        [server_entry(f"s{i}", t) for i, t in enumerate(tritons)],
        {n: model_entry(n, token_delay_s=0.01, max_concurrency=64) for n in names},
    )
    n_tokens = 6

    async def one(client: Any, i: int) -> tuple[int, list[int], int]:
        model = names[i % len(names)]
        text = np.array([f"q{i}".encode()], dtype=np.object_)
        from tritonclient.grpc import InferInput

        inp = InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(text)
        stream = InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True]))

        async def requests() -> Any:
            yield {
                "model_name": model,
                "inputs": [inp, stream],
                "request_id": str(i),
                "parameters": {"max_tokens": n_tokens},
            }

        tokens: list[int] = []
        finals = 0
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            ids = result.as_numpy("token_ids")
            tokens.extend(int(x) for x in (ids if ids is not None else []))
            reason = result.as_numpy("finish_reason")
            if reason is not None and reason.size:
                finals += 1
        return i, tokens, finals  # the aio client sends no enable_empty_final_response: the stream just ends

    async def all_streams() -> list[tuple[int, list[int], int]]:
        client = grpcaio.InferenceServerClient(sched.grpc)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(200)))
        finally:
            await client.close()

    try:
        results = asyncio.run(all_streams())
        assert len(results) == 200
        for i, tokens, finals in results:
            assert tokens == expected_tokens(f"q{i}", n_tokens), i
            assert finals == 1
        assert sched.state()["generations"] == {}
    finally:
        _unload_everywhere(tritons, names)


# ---------------------------------------------------------------------------------------------- security


MALICIOUS = ["../x", "%2e%2e%2f", "/etc/passwd", "a\x00b", "a" * 200, "..", "x/../../y"]


def test_malicious_model_names_are_rejected_at_every_edge(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    import tritonclient.grpc as grpcclient

    sched = make_scheduler([server_entry("s0", tritons[0])], {"m12": model_entry("m12")})
    for name in ["%2e%2e%2f", "..%2fx", "a" * 200, "%00x", "%2Fetc%2Fpasswd"]:
        status, _ = _post(f"{sched.http}/v2/models/{name}/generate", {"text_input": "hi"})
        assert status in (400, 404), (name, status)
    for name in MALICIOUS:
        status, body = _post(f"{sched.http}/v1/completions", {"model": name, "prompt": "hi"})
        assert status == 400, (name, status, body)
        status, body = _post(
            f"{sched.http}/v1/chat/completions",
            {"model": name, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert status == 400, (name, status, body)
    client = grpcclient.InferenceServerClient(sched.grpc)
    try:
        errors: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: errors.put(error))
        inp = grpcclient.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
        for name in MALICIOUS:
            client.async_stream_infer(name, [inp])
            error = errors.get(timeout=10)
            assert error is not None and "model names must match" in str(error), (name, error)
        client.stop_stream()
    finally:
        client.close()
    state = sched.state()
    assert state["stats"]["loads"] == {} and state["stats"]["load_failures"] == 0
    loaded = set(_states(tritons[0]))
    assert not any(".." in n or "/" in n for n in loaded)


def test_admin_api_refuses_requests_without_the_token(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    sched = make_scheduler([server_entry("s0", tritons[0])], {})
    new_model = {"name": "m13", **model_entry("m13")}
    assert _post(f"{sched.http}/admin/v1/models", new_model)[0] == 401
    assert (
        _post(f"{sched.http}/admin/v1/models", new_model, {"Authorization": "Bearer wrong-token"})[0] == 401
    )
    assert _post(f"{sched.http}/admin/v1/state", None, method="GET")[0] == 401
    assert _post(f"{sched.http}/admin/v1/servers/s0", None, method="DELETE")[0] == 401
    assert sched.state()["models"] == []
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert _post(f"{sched.http}/admin/v1/models", {"name": "../x", **model_entry("x")}, auth)[0] == 400
    assert _post(f"{sched.http}/admin/v1/models", {**new_model, "bogus_key": 1}, auth)[0] == 400
    assert _post(f"{sched.http}/admin/v1/models", new_model, auth)[0] == 201
    try:
        events = asyncio.run(_generate_stream(sched.http, "m13", "admin", 3))
        assert [t for e in events for t in e["token_ids"]] == expected_tokens("admin", 3)
        assert _post(f"{sched.http}/admin/v1/models/m13", None, auth, method="DELETE")[0] == 200
        assert _post(f"{sched.http}/v2/models/m13/generate", {"text_input": "x"})[0] == 404
    finally:
        _unload_everywhere(tritons, ["m13"])


def test_admin_api_is_disabled_without_a_configured_token(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    sched = make_scheduler([server_entry("s0", tritons[0])], {}, admin_token=None)
    assert _post(f"{sched.http}/admin/v1/state", None, {"Authorization": "Bearer "}, method="GET")[0] == 403


# ---------------------------------------------------------------------------------------------- front ends


def test_tritonclient_grpc_streaming_through_the_scheduler(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    import tritonclient.grpc as grpcclient

    sched = make_scheduler([server_entry("s0", tritons[0])], {"m14": model_entry("m14")})
    client = grpcclient.InferenceServerClient(sched.grpc)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("m14")
        meta = client.get_model_metadata("m14", as_json=True)
        assert {i["name"] for i in meta["inputs"]} >= {"text_input", "sampling_parameters"}
        assert client.get_model_config("m14", as_json=True)["config"]["name"] == "m14"
        results: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        inp = grpcclient.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"grpc prompt"], dtype=np.object_))
        stream = grpcclient.InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True]))
        sp = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        sp.set_data_from_numpy(
            np.array([json.dumps({"max_tokens": 5, "seed": 3}).encode()], dtype=np.object_)
        )
        client.async_stream_infer("m14", [inp, stream, sp], request_id="r1", enable_empty_final_response=True)
        text: list[str] = []
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            out = result.as_numpy("text_output")
            text.extend(x.decode() for x in out)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
        assert "".join(text) == expected_text("grpc prompt", 5, seed=3)
        index = {m["name"]: m["state"] for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["m14"] == "READY"
    finally:
        client.close()
        _unload_everywhere(tritons, ["m14"])


def test_http_generate_and_generate_stream_through_the_scheduler(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    sched = make_scheduler([server_entry("s0", tritons[0])], {"m15": model_entry("m15")})
    try:
        with urllib.request.urlopen(f"{sched.http}/v2/health/ready", timeout=10) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"{sched.http}/v2/models/m15", timeout=10) as resp:
            assert json.loads(resp.read())["name"] == "m15"
        events = asyncio.run(_generate_stream(sched.http, "m15", "sse", 4))
        assert "".join(e["text_output"] for e in events) == expected_text("sse", 4)
        assert events[-1]["finish_reason"] == "length"
        status, body = _post(
            f"{sched.http}/v2/models/m15/generate",
            {
                "id": "7",
                "text_input": "sse",
                "parameters": {"max_tokens": 4, "exclude_input_in_output": True},
            },
        )
        assert status == 200
        out = json.loads(body)
        assert out["text_output"] == expected_text("sse", 4) and out["id"] == "7"
        status, body = _post(f"{sched.http}/v2/models/nope/generate", {"text_input": "x"})
        assert status == 404
        status, body = _post(
            f"{sched.http}/v2/models/m15/generate", {"text_input": "x", "sampling_parameters": "{"}
        )
        assert status == 400
    finally:
        _unload_everywhere(tritons, ["m15"])


def test_openai_completions_and_chat_stream_through_the_scheduler(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    sched = make_scheduler([server_entry("s0", tritons[0])], {"m16": model_entry("m16")})

    async def sse(path: str, body: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        async with aiohttp.ClientSession() as session, session.post(sched.http + path, json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: "):
                    payload = line[6:].strip()
                    out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
        return out

    try:
        events = asyncio.run(
            sse("/v1/completions", {"model": "m16", "prompt": "oa", "max_tokens": 4, "stream": True})
        )
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected_text("oa", 4)
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        messages = [{"role": "user", "content": "hi"}]
        chat = asyncio.run(
            sse(
                "/v1/chat/completions",
                {"model": "m16", "messages": messages, "max_tokens": 3, "stream": True},
            )
        )
        assert chat[0]["choices"][0]["delta"]["role"] == "assistant"
        content = "".join(e["choices"][0]["delta"].get("content", "") for e in chat[:-1])
        assert content == expected_text("user: hi\nassistant:", 3)
        status, body = _post(
            f"{sched.http}/v1/completions", {"model": "m16", "prompt": "oa", "max_tokens": 4}
        )
        assert status == 200 and json.loads(body)["choices"][0]["text"] == expected_text("oa", 4)
    finally:
        _unload_everywhere(tritons, ["m16"])


def test_cold_start_queue_full_answers_503(tritons: list[TritonServer], make_scheduler: Any) -> None:
    sched = make_scheduler(
        [server_entry("s0", tritons[2])], {"m17": model_entry("m17", load_delay_s=1.5)}, cold_start_queue=1
    )

    async def two() -> list[int]:
        async with aiohttp.ClientSession() as session:

            async def one(delay: float) -> int:
                await asyncio.sleep(delay)
                body = {"text_input": "q", "parameters": {"max_tokens": 1}}
                async with session.post(f"{sched.http}/v2/models/m17/generate", json=body) as resp:
                    return resp.status

            return list(await asyncio.gather(one(0), one(0.3)))

    try:
        assert sorted(asyncio.run(two())) == [200, 503]
        assert sched.state()["stats"]["rejected_queue_full"] == 1
    finally:
        _unload_everywhere(tritons, ["m17"])


# ------------------------------------------------------------------------------------------- live migration


async def _stream_with_hook(
    base: str, model: str, body: dict[str, Any], at: int, hook: Any
) -> tuple[list[int], list[str]]:
    """Stream ``body``; after ``at`` tokens await ``hook()`` (while the stream keeps going)."""
    tokens: list[int] = []
    texts: list[str] = []
    hooked: list[asyncio.Task[Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v2/models/{model}/generate_stream", json=body) as resp,
    ):
        assert resp.status == 200
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            tokens.extend(event["token_ids"])
            texts.append(event["text_output"])
            if len(tokens) >= at and not hooked:
                hooked.append(asyncio.create_task(hook()))
    if hooked:
        await hooked[0]
    return tokens, texts


def test_admin_migration_moves_a_running_stream_token_exactly(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    sched = make_scheduler(
        [server_entry("s0", tritons[0]), server_entry("s1", tritons[1])],
        {"m18": model_entry("m18", token_delay_s=0.04)},
    )
    n = 40
    body = {
        "text_input": "move me",
        "parameters": {"stream": True, "max_tokens": n, "temperature": 0.8, "seed": 5},
    }
    outcome: dict[str, Any] = {}

    async def hook() -> None:
        gen_id, info = next(iter(sched.state()["generations"].items()))
        dest = "s1" if info["server"] == "s0" else "s0"
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{sched.http}/admin/v1/migrate", json={"generation": gen_id, "server": dest}, headers=auth
            ) as resp,
        ):
            outcome.update(await resp.json(), status=resp.status, source=info["server"], dest=dest)
            outcome["server_after"] = sched.state()["generations"].get(gen_id, {}).get("server")

    try:
        tokens, texts = asyncio.run(_stream_with_hook(sched.http, "m18", body, 5, hook))
        assert outcome["status"] == 200 and outcome["outcome"] == "switched", outcome
        assert outcome["server_after"] == outcome["dest"]
        assert tokens == expected_tokens("move me", n, seed=5)  # no gap, no duplicate
        assert "".join(texts) == expected_text("move me", n, seed=5)
        stats = sched.state()["stats"]
        assert stats["migrations"] == 1 and stats["failovers"] == 0
        assert stats["loads"] == {f"{outcome['source']}/m18": 1, f"{outcome['dest']}/m18": 1}
    finally:
        _unload_everywhere(tritons, ["m18"])


def test_waiting_request_triggers_migration_that_frees_the_server_holding_its_model(
    tritons: list[TritonServer], stores: list[FakeNodeStore], make_scheduler: Any
) -> None:
    mib = 1 << 20
    stores[0].tiers = {"m19": "memory", "m20": "memory"}
    stores[1].tiers = {"m19": "memory"}
    for s in stores[:2]:
        s.bandwidth = {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e3}  # remote: 1 MiB takes ~17 min
    sched = make_scheduler(
        [server_entry(f"s{i}", tritons[i], stores[i], memory_budget_bytes=mib) for i in range(2)],
        {"m19": model_entry("m19", token_delay_s=0.04), "m20": model_entry("m20")},
        cold_start_timeout_s=30.0,
    )
    n = 50
    body = {"text_input": "long one", "parameters": {"stream": True, "max_tokens": n}}
    second: dict[str, Any] = {}

    async def hook() -> None:
        t0 = time.monotonic()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{sched.http}/v2/models/m20/generate",
                json={"text_input": "short", "parameters": {"max_tokens": 3}},
            ) as resp,
        ):
            second.update(status=resp.status, body=await resp.json(), seconds=time.monotonic() - t0)

    try:
        tokens, _ = asyncio.run(_stream_with_hook(sched.http, "m19", body, 5, hook))
        assert tokens == expected_tokens("long one", n)
        assert second["status"] == 200, second
        assert second["body"]["token_ids"] == expected_tokens("short", 3)
        stats = sched.state()["stats"]
        assert stats["migrations"] == 1
        assert stats["loads"] == {"s0/m19": 1, "s1/m19": 1, "s0/m20": 1}
        assert second["seconds"] < 15
    finally:
        _unload_everywhere(tritons, ["m19", "m20"])


# ---------------------------------------------------------------------------------------------- process


def test_warmstart_scheduler_command_serves_and_stops_on_sigterm(
    tritons: list[TritonServer], tmp_path: Path
) -> None:
    import subprocess
    import sys

    import yaml

    from warmstart._process import free_ports

    http_port, grpc_port = free_ports(2)
    config = {
        "listen": {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"},
        "admin_token": ADMIN_TOKEN,
        "servers": [server_entry("s0", tritons[2])],
        "models": {"m21": model_entry("m21")},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "warmstart.cli", "scheduler", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("scheduler ready"):
                break
        else:
            pytest.fail("the scheduler exited before it was ready")
        base = f"http://127.0.0.1:{http_port}"
        events = asyncio.run(_generate_stream(base, "m21", "cli", 3))
        assert [t for e in events for t in e["token_ids"]] == expected_tokens("cli", 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        _unload_everywhere(tritons, ["m21"])


def test_warmstart_scheduler_command_rejects_unknown_config_keys(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "cluster.yaml"
    path.write_text("servers: []\nmodels: {}\nlisten_everywhere: true\n")
    out = subprocess.run(
        [sys.executable, "-m", "warmstart.cli", "scheduler", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "unknown keys listen_everywhere" in out.stderr
