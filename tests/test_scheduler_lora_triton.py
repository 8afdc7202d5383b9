"""LoRA adapters through the scheduler, against two real tritonservers running the warmstart backend.

A tiny random Llama and two PEFT adapters (tests/lora_support.py) are served through the scheduler, which
lists the adapters in the base's config: its loads carry ``multi_lora.json`` (Triton's file override), its
requests ``lora_name``. Checked against peft's greedy tokens: KServe generate (HTTP) and ModelStreamInfer
(gRPC, ``warmstart.client``) with ``lora_name``, and OpenAI completions naming ``base_lora_<adapter>``; ``/v1/models`` listing the adapters under their base; unknown
adapters refused with the names served (404, never a 500); an adapter added and removed at run time through
the admin API while the base stays loaded (the backend refusing such a write without the repository key);
and a stream on an adapter whose server is SIGKILLed mid-stream continuing token-exactly on the other
server, on its adapter.
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
from typing import Any

import aiohttp
import pytest
from _scheduler_cluster import ADMIN_TOKEN, REPO_KEY, BackgroundScheduler, scheduler_config
from backend_support import byte_tokenizer_json, write_model
from lora_support import LoraFixture, make_base_and_adapters, peft_greedy

from warmstart.client import _stream_once, generate_stream
from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]

PROMPT_TEXT = "Hello w"
N = 8
LONG = 300  # tokens of the stream cut by a SIGKILL (the tiny model streams them in about a second)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _prompt_ids() -> list[int]:
    from tokenizers import Tokenizer

    return list(Tokenizer.from_str(byte_tokenizer_json()).encode(PROMPT_TEXT).ids)  # one id per byte


PROMPT = _prompt_ids()


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> LoraFixture:
    return make_base_and_adapters(tmp_path_factory.mktemp("lora-sched"))


@pytest.fixture(scope="module")
def expected(fx: LoraFixture) -> dict[str | None, list[int]]:
    out = {name: peft_greedy(fx.peft, name, PROMPT, N) for name in ("one", "two", None)}
    assert len({tuple(v) for v in out.values()}) == 3  # each adapter changes the tokens
    return out


@pytest.fixture(scope="module")
def tritons(fx: LoraFixture, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TritonServer]]:
    root = tmp_path_factory.mktemp("lora-tritons")
    repo = root / "repo"
    write_model(repo, "base", str(fx.base), "torch")  # the directory the index lists; loads bring their own
    servers: list[TritonServer] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        try:
            for i in range(2):
                s = TritonServer(
                    TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY),
                    workdir=root / f"t{i}",
                )
                servers.append(s)
                s.start()
            yield servers
        finally:
            threads = [threading.Thread(target=s.stop, kwargs={"timeout": 5.0}) for s in servers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()


@pytest.fixture(scope="module")
def sched(fx: LoraFixture, tritons: list[TritonServer]) -> Iterator[BackgroundScheduler]:
    servers = [
        {
            "name": f"s{i}",
            "grpc": t.grpc_url,
            "repository_api_key": REPO_KEY,
            "bandwidth": {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8},
        }
        for i, t in enumerate(tritons)
    ]
    models = {
        "base": {
            "checkpoint": str(fx.base),
            "engine": "torch",
            "size_bytes": 1 << 20,
            "max_tokens": 400,
            "adapters": {"one": str(fx.adapters["one"])},
            "max_loras": 2,
            "max_lora_rank": 8,
        }
    }
    # a live migration switches once fewer tokens than this are outstanding: the tiny model streams faster
    # than a destination replays its whole context, so the default 4 would rarely converge
    s = BackgroundScheduler(scheduler_config(servers, models, migration_threshold_tokens=64))
    try:
        yield s
    finally:
        s.close()


def _call(
    url: str, body: Any = None, headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _generate(sched: BackgroundScheduler, lora: str | None, n: int = N) -> tuple[int, Any]:
    params: dict[str, Any] = {"max_tokens": n}
    if lora is not None:
        params["lora_name"] = lora
    return _call(f"{sched.http}/v2/models/base/generate", {"text_input": PROMPT_TEXT, "parameters": params})


def _completion(sched: BackgroundScheduler, model: str) -> tuple[int, Any]:
    return _call(f"{sched.http}/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": N})


def test_kserve_and_openai_requests_on_adapters_produce_their_adapters_tokens(
    sched: BackgroundScheduler, expected: dict[str | None, list[int]]
) -> None:
    texts = {}
    for lora in ("one", None):
        status, out = _generate(sched, lora)
        assert status == 200, out
        assert out["token_ids"] == expected[lora], lora
        texts[lora] = out["text_output"][len(PROMPT_TEXT) :]
    grpc = [
        t
        for d in generate_stream(sched.grpc, "base", PROMPT_TEXT, max_tokens=N, lora_name="one")
        for t in d.token_ids
    ]
    assert grpc == expected["one"]  # gRPC ModelStreamInfer: lora_name in sampling_parameters
    # a client resuming through this scheduler after another replica went away: generated_ids + lora_name
    resumed = _stream_once(
        sched.grpc,
        "base",
        PROMPT_TEXT,
        sampling={"max_tokens": N, "lora_name": "one"},
        generated=expected["one"][:3],
        timeout=60.0,
        t0=time.monotonic(),
        last=True,
    )
    assert [t for d in resumed for t in d.token_ids] == expected["one"][3:]
    status, out = _completion(sched, "base_lora_one")
    assert status == 200, out
    assert out["model"] == "base_lora_one" and out["choices"][0]["text"] == texts["one"]
    assert out["usage"]["completion_tokens"] == N
    status, out = _completion(sched, "one")  # the adapter's own name: one base serves it
    assert status == 200 and out["choices"][0]["text"] == texts["one"]
    status, models = _call(f"{sched.http}/v1/models", method="GET")
    assert status == 200
    assert {m["id"]: m["parent"] for m in models["data"]} == {"base": None, "base_lora_one": "base"}
    state = sched.state()
    assert sum(state["stats"]["loads"].values()) == 1  # one base serves the base and its adapters
    (inst,) = [s["instances"]["base"] for s in state["servers"].values() if "base" in s["instances"]]
    assert inst["adapters_served"] == ["one"] and "one" in inst["adapters_resident"]


def test_unknown_adapters_are_refused_with_the_names_served_never_a_500(sched: BackgroundScheduler) -> None:
    status, out = _generate(sched, "nope")
    assert status == 404 and "no adapter 'nope'; it serves: one" in out["error"], out
    status, out = _completion(sched, "base_lora_nope")
    assert status == 404 and "it serves: one" in out["error"]["message"], out
    status, out = _completion(sched, "nope")
    assert status == 404 and "no model named 'nope'" in out["error"]["message"]
    status, out = _generate(sched, "")
    assert status == 400 and "lora_name" in out["error"]


def _control(url: str, model: str, parameters: dict[str, Any]) -> str | None:
    """One input-less stream request with ``parameters`` sent to a tritonserver: its error, or None."""
    import tritonclient.grpc as grpcclient

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(model, [], request_id="control", parameters=parameters)
        _, error = answers.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    return None if error is None else str(error)


def test_an_adapter_added_at_run_time_is_served_without_reloading_the_base_and_removed_again(
    sched: BackgroundScheduler,
    fx: LoraFixture,
    tritons: list[TritonServer],
    expected: dict[str | None, list[int]],
) -> None:
    assert _generate(sched, None)[0] == 200  # the base is loaded somewhere
    loads = dict(sched.state()["stats"]["loads"])
    (where,) = [n for n, s in sched.state()["servers"].items() if "base" in s["instances"]]
    url = f"{sched.http}/admin/v1/models/base/adapters"
    body = {"name": "two", "checkpoint": str(fx.adapters["two"])}
    assert _call(url, body)[0] == 401  # the admin token is required
    status, out = _call(url, body, AUTH)
    assert status == 201 and out["servers"] == {where: "ok"}, out
    assert _call(url, body, AUTH)[0] == 400  # already there
    status, out = _generate(sched, "two")
    assert status == 200 and out["token_ids"] == expected["two"]
    status, models = _call(f"{sched.http}/v1/models", method="GET")
    assert "base_lora_two" in {m["id"] for m in models["data"]}
    assert sched.state()["stats"]["loads"] == loads  # no load: the instance re-read its adapters
    # the write behind it needs the repository key: another client of the inference port cannot redirect it
    triton = tritons[int(where[1:])]
    refused = _control(
        triton.grpc_url, "base", {"warmstart_lora_reload": True, "warmstart_lora_adapters": '{"x": "/etc"}'}
    )
    assert refused is not None and "release refused" in refused
    status, out = _call(f"{url}/two", method="DELETE", headers=AUTH)
    assert status == 200 and out["servers"] == {where: "ok"}, out
    status, out = _generate(sched, "two")
    assert status == 404 and "it serves: one" in out["error"]
    status, out = _generate(sched, "one")
    assert status == 200 and out["token_ids"] == expected["one"]


def test_a_live_migration_moves_an_adapter_stream_to_the_other_server_token_exactly(
    sched: BackgroundScheduler, fx: LoraFixture
) -> None:
    want = peft_greedy(fx.peft, "one", PROMPT, LONG)
    for name in ("s0", "s1"):  # the base warm on both servers: the destination replays at once
        status, out = _call(f"{sched.http}/admin/v1/servers/{name}/models/base/load", {}, AUTH)
        assert status == 200, out
    body = {"text_input": PROMPT_TEXT, "parameters": {"stream": True, "max_tokens": LONG, "lora_name": "one"}}
    got: list[int] = []
    outcome: dict[str, Any] = {}

    async def migrate() -> None:
        ((gen_id, info),) = sched.state()["generations"].items()
        dest = "s1" if info["server"] == "s0" else "s0"
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{sched.http}/admin/v1/migrate", json={"generation": gen_id, "server": dest}, headers=AUTH
            ) as resp,
        ):
            outcome.update(await resp.json(), status=resp.status, dest=dest)
        outcome["server_after"] = sched.state()["generations"].get(gen_id, {}).get("server")

    async def run() -> None:
        hooked: list[asyncio.Task[None]] = []
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{sched.http}/v2/models/base/generate_stream", json=body) as resp,
        ):
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    got.extend(event["token_ids"])
                    if len(got) >= 5 and not hooked:
                        hooked.append(asyncio.create_task(migrate()))
        await hooked[0]

    migrations = sched.state()["stats"]["migrations"]
    asyncio.run(run())
    assert outcome["status"] == 200 and outcome["outcome"] == "switched", outcome
    assert outcome["server_after"] == outcome["dest"]
    assert got == want  # the destination continued on adapter "one": no gap, no repeat
    assert sched.state()["stats"]["migrations"] == migrations + 1


def test_sigkill_mid_stream_continues_an_adapter_generation_token_exactly_on_the_other_server(
    sched: BackgroundScheduler, fx: LoraFixture, tritons: list[TritonServer]
) -> None:
    want = peft_greedy(fx.peft, "one", PROMPT, LONG)
    body = {"text_input": PROMPT_TEXT, "parameters": {"stream": True, "max_tokens": LONG, "lora_name": "one"}}
    got: list[int] = []
    killed: list[str] = []

    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{sched.http}/v2/models/base/generate_stream", json=body) as resp,
        ):
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                assert "error" not in event, event
                got.extend(event["token_ids"])
                if len(got) >= 8 and not killed:
                    gens = sched.state()["generations"]
                    (info,) = gens.values()
                    assert info["adapter"] == "one"
                    victim = tritons[int(info["server"][1:])]
                    assert victim.pid is not None
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.append(info["server"])

    asyncio.run(run())
    assert killed, "the stream ended before the server could be killed"
    assert got == want  # no gap, no repeat, and every token after the cut still from adapter "one"
    state = sched.state()
    assert state["stats"]["failovers"] >= 1
    assert state["servers"][killed[0]]["healthy"] is False
    (other,) = [n for n in state["servers"] if n != killed[0]]
    assert state["servers"][other]["instances"]["base"]["adapters_served"] == ["one"]
