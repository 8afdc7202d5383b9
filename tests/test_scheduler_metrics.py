"""The scheduler's Prometheus metrics (``GET /metrics`` on its HTTP port), read with prometheus_client's
parser after driving real requests through a scheduler in front of real tritonservers (the fake decoupled
model of ``_scheduler_fake``; node stores are the HTTP stand-in of ``_scheduler_cluster``)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from _scheduler_cluster import ADMIN_TOKEN, REPO_KEY, FakeNodeStore
from _scheduler_fake import expected_tokens, fake_triton_config, write_fake_repository
from prometheus_client.parser import text_string_to_metric_families

from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MIB = 1 << 20
NAMES = ["ma", "mb", "mc", "md", "me", "mf"]
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _stop_all(servers: list[TritonServer]) -> None:
    threads = [threading.Thread(target=s.stop, kwargs={"timeout": 5.0}) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.fixture(scope="module")
def tritons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TritonServer]]:
    repo = write_fake_repository(tmp_path_factory.mktemp("fake-repo"), NAMES)
    work = tmp_path_factory.mktemp("tritons")
    servers: list[TritonServer] = []
    try:
        for i in range(2):
            s = TritonServer(
                TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY), workdir=work / f"t{i}"
            )
            servers.append(s)
            s.start()
        yield servers
    finally:
        _stop_all(servers)


@pytest.fixture
def store() -> Iterator[FakeNodeStore]:
    made = FakeNodeStore()
    try:
        yield made
    finally:
        made.close()


def _server(name: str, triton: TritonServer, **kw: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "grpc": triton.grpc_url, "repository_api_key": REPO_KEY, **kw}
    if "node_store" not in entry:
        entry["bandwidth"] = {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8}
    return entry


def _model(name: str, **kw: Any) -> dict[str, Any]:
    delays = {k: kw.pop(k) for k in ("token_delay_s", "load_delay_s") if k in kw}
    return {
        "checkpoint": f"s3://models/{name}",
        "size_bytes": MIB,
        "triton_config": fake_triton_config(name, **{"token_delay_s": 0.005, **delays}),
        **kw,
    }


def _request(
    url: str, body: Any = None, headers: dict[str, str] | None = None, method: str = "POST"
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


def _generate(base: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    status, body = _request(
        f"{base}/v2/models/{model}/generate", {"text_input": prompt, "parameters": {"max_tokens": max_tokens}}
    )
    assert status == 200, body
    out: dict[str, Any] = json.loads(body)
    return out


def _scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``GET /metrics`` by (sample name, sorted labels)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _get(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sample's value; 0 when the series does not exist (a counter never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _series(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str
) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


# ----------------------------------------------------------------------------------------------- requests


def test_metrics_count_requests_by_outcome_and_first_tokens_by_load_tier(
    tritons: list[TritonServer], store: FakeNodeStore, make_scheduler: Any
) -> None:
    """One cold load from the disk tier, three requests served (HTTP, SSE, OpenAI), one bad request and
    one for a model that is not deployed: each is counted once, by model and outcome; the first request's
    time to first token is labelled with the tier its load came from, the other two ``warm``; the load's
    actual and estimated durations are exposed for its server."""
    store.tiers = {"ma": "disk"}
    sched = make_scheduler([_server("s0", tritons[0], node_store=store.url)], {"ma": _model("ma")})
    base = sched.http
    assert _generate(base, "ma", "one", 3)["token_ids"] == expected_tokens("one", 3)

    async def stream_and_openai() -> None:
        async with aiohttp.ClientSession() as session:
            body: dict[str, Any] = {"text_input": "two", "parameters": {"stream": True, "max_tokens": 3}}
            async with session.post(f"{base}/v2/models/ma/generate_stream", json=body) as resp:
                assert resp.status == 200
                await resp.read()
            body = {"model": "ma", "prompt": "three", "max_tokens": 2}
            async with session.post(f"{base}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()

    asyncio.run(stream_and_openai())
    bad = {"text_input": "x", "parameters": {"max_tokens": -1}}
    bad_status, body = _request(f"{base}/v2/models/ma/generate", bad)
    assert bad_status >= 400, body  # 400 is the bad-input tests' business; here: it is counted as such
    status, body = _request(f"{base}/v2/models/not-deployed/generate", {"text_input": "x"})
    assert status == 404, body

    m = _scrape(base)
    requests = _series(m, "warmstart_scheduler_requests_total")
    assert requests == {
        (("model", "ma"), ("outcome", "ok")): 3,
        (("model", "ma"), ("outcome", "bad_request")): 1,
        (("model", ""), ("outcome", "unknown_model")): 1,
    }
    ttft_counts = _series(m, "warmstart_scheduler_time_to_first_token_seconds_count")
    assert ttft_counts == {(("model", "ma"), ("tier", "disk")): 1, (("model", "ma"), ("tier", "warm")): 2}
    cold = _get(m, "warmstart_scheduler_time_to_first_token_seconds_sum", model="ma", tier="disk")
    warm = _get(m, "warmstart_scheduler_time_to_first_token_seconds_sum", model="ma", tier="warm")
    assert cold > 0 and warm > 0

    assert _series(m, "warmstart_scheduler_loads_total") == {
        (("result", "ok"), ("server", "s0"), ("tier", "disk")): 1
    }
    assert _get(m, "warmstart_scheduler_load_seconds_count", server="s0", tier="disk") == 1
    assert _get(m, "warmstart_scheduler_load_estimate_seconds_count", server="s0", tier="disk") == 1
    actual = _get(m, "warmstart_scheduler_last_load_seconds", server="s0")
    assert actual == _get(m, "warmstart_scheduler_load_seconds_sum", server="s0", tier="disk") > 0
    # the policy's estimate for a disk-tier load with nothing to evict: size / disk bandwidth + overhead
    config = sched.router.config
    estimate = MIB / store.bandwidth["disk_bps"] + config.initial_load_overhead_s
    assert _get(m, "warmstart_scheduler_last_load_estimate_seconds", server="s0") == pytest.approx(estimate)

    assert _get(m, "warmstart_scheduler_cold_start_queue_depth") == 0
    assert _get(m, "warmstart_scheduler_cold_start_queue_capacity") == config.cold_start_queue
    assert _get(m, "warmstart_scheduler_generations_running") == 0
    assert _get(m, "warmstart_scheduler_server_healthy", server="s0") == 1
    assert _get(m, "warmstart_scheduler_models_loaded", server="s0") == 1
    assert _get(m, "warmstart_scheduler_loads_in_flight", server="s0") == 0

    http = _series(m, "warmstart_scheduler_http_responses_total")
    assert http[(("code", "200"), ("route", "/v2/models/{model}/generate"))] == 1
    assert http[(("code", str(bad_status)), ("route", "/v2/models/{model}/generate"))] == 1
    assert http[(("code", "404"), ("route", "/v2/models/{model}/generate"))] == 1
    assert http[(("code", "200"), ("route", "/v2/models/{model}/generate_stream"))] == 1
    assert http[(("code", "200"), ("route", "/v1/completions"))] == 1


def test_each_scheduler_in_a_process_has_its_own_metrics(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    """Two schedulers in one process: a request through one is counted by that one only."""
    a = make_scheduler([_server("s0", tritons[0])], {"mb": _model("mb")})
    b = make_scheduler([_server("s1", tritons[1])], {"mb": _model("mb")})
    _generate(a.http, "mb", "x", 2)
    assert _get(_scrape(a.http), "warmstart_scheduler_requests_total", model="mb", outcome="ok") == 1
    assert _get(_scrape(b.http), "warmstart_scheduler_requests_total", model="mb", outcome="ok") == 0
    assert _get(_scrape(b.http), "warmstart_scheduler_server_healthy", server="s1") == 1


# ---------------------------------------------------------------------------------------- loads and unloads


def test_metrics_count_the_eviction_its_failed_release_and_the_unload(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    """A server with room for one model: the second model's load evicts the first. The fake model cannot
    release (Triton refuses a request without text_input), so the release counts as failed and the unload
    is waited for; both loads come from the remote tier (no node store)."""
    sched = make_scheduler(
        [_server("s0", tritons[1], memory_budget_bytes=MIB)], {"mc": _model("mc"), "md": _model("md")}
    )
    _generate(sched.http, "mc", "first", 2)
    _generate(sched.http, "md", "second", 2)
    m = _scrape(sched.http)
    assert _series(m, "warmstart_scheduler_evictions_total") == {(("server", "s0"),): 1}
    assert _series(m, "warmstart_scheduler_releases_total") == {(("result", "failed"), ("server", "s0")): 1}
    assert _series(m, "warmstart_scheduler_unloads_total") == {(("result", "ok"), ("server", "s0")): 1}
    assert _series(m, "warmstart_scheduler_loads_total") == {
        (("result", "ok"), ("server", "s0"), ("tier", "remote")): 2
    }
    assert _series(m, "warmstart_scheduler_time_to_first_token_seconds_count") == {
        (("model", "mc"), ("tier", "remote")): 1,
        (("model", "md"), ("tier", "remote")): 1,
    }
    assert _get(m, "warmstart_scheduler_models_loaded", server="s0") == 1


def test_cold_start_queue_depth_gauge_counts_requests_waiting_for_a_load(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    """Three requests arrive while a slow load runs: the gauge reads 3 (and one load in flight) while they
    wait, and 0 once they are served."""
    sched = make_scheduler([_server("s0", tritons[0])], {"me": _model("me", load_delay_s=3.0)})
    seen: dict[str, float] = {}

    async def run() -> list[dict[str, Any]]:
        async def one(session: aiohttp.ClientSession, i: int) -> dict[str, Any]:
            body = {"text_input": f"q{i}", "parameters": {"max_tokens": 2}}
            async with session.post(f"{sched.http}/v2/models/me/generate", json=body) as resp:
                assert resp.status == 200, await resp.text()
                out: dict[str, Any] = await resp.json()
                return out

        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(one(session, i)) for i in range(3)]
            deadline = time.monotonic() + 60
            while not seen:
                assert time.monotonic() < deadline, "the three requests never waited together"
                m = await asyncio.to_thread(_scrape, sched.http)
                depth = _get(m, "warmstart_scheduler_cold_start_queue_depth")
                if depth == 3:
                    seen["depth"] = depth
                    seen["loading"] = _get(m, "warmstart_scheduler_loads_in_flight", server="s0")
                    seen["running"] = _get(m, "warmstart_scheduler_generations_running")
                else:
                    assert all(not t.done() for t in tasks), "a request was served before all three waited"
                    await asyncio.sleep(0.05)
            return list(await asyncio.gather(*tasks))

    results = asyncio.run(run())
    assert [r["token_ids"] for r in results] == [expected_tokens(f"q{i}", 2) for i in range(3)]
    assert seen == {"depth": 3, "loading": 1, "running": 3}
    m = _scrape(sched.http)
    assert _get(m, "warmstart_scheduler_cold_start_queue_depth") == 0
    assert _get(m, "warmstart_scheduler_loads_in_flight", server="s0") == 0
    assert _get(m, "warmstart_scheduler_requests_total", model="me", outcome="ok") == 3


# ------------------------------------------------------------------------------- migrations and failovers


def test_metrics_count_a_live_migration_and_a_failover(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    """A running stream is migrated (admin API) to the other server, then that server is removed under
    it: one migration ``switched``, one failover labelled with the server the generation lost, and the
    request still completes token-exactly (counted ``ok``)."""
    sched = make_scheduler(
        [_server("s0", tritons[0]), _server("s1", tritons[1])], {"mf": _model("mf", token_delay_s=0.04)}
    )
    n = 40
    body = {"text_input": "move", "parameters": {"stream": True, "max_tokens": n, "seed": 3}}
    steps: dict[str, Any] = {}

    async def admin(session: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> Any:
        async with session.request(method, f"{sched.http}{path}", headers=AUTH, **kw) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def run() -> list[int]:
        tokens: list[int] = []
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{sched.http}/v2/models/mf/generate_stream", json=body) as resp,
        ):
            assert resp.status == 200
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                assert "error" not in event, event
                tokens.extend(event["token_ids"])
                if len(tokens) >= 5 and "migrated" not in steps:
                    gen_id, info = next(iter(sched.state()["generations"].items()))
                    dest = "s1" if info["server"] == "s0" else "s0"
                    steps["migrated"] = await admin(
                        session, "POST", "/admin/v1/migrate", json={"generation": gen_id, "server": dest}
                    )
                    steps["dest"] = dest
                elif len(tokens) >= 20 and "removed" not in steps:
                    steps["removed"] = await admin(session, "DELETE", f"/admin/v1/servers/{steps['dest']}")
        return tokens

    tokens = asyncio.run(run())
    assert steps["migrated"]["outcome"] == "switched", steps
    assert tokens == expected_tokens("move", n, seed=3)
    m = _scrape(sched.http)
    assert _series(m, "warmstart_scheduler_migrations_total") == {(("outcome", "switched"),): 1}
    assert _series(m, "warmstart_scheduler_failovers_total") == {(("server", steps["dest"]),): 1}
    assert _get(m, "warmstart_scheduler_requests_total", model="mf", outcome="ok") == 1
