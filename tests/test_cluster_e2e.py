"""Many machines, end to end on real processes: a real etcd, two real tritonservers (the fake model of
tests/_scheduler_fake.py), a real ``warmstart node`` agent per node and a scheduler with ``--etcd`` and no
servers in its config. The scheduler routes to the nodes the agents registered; SIGKILLing the agent of the
node that serves a stream (its link to cluster state cut) takes that node out of routing within its lease
TTL, and the stream finishes on the other node token-exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from _scheduler_cluster import REPO_KEY, BackgroundScheduler, FakeNodeStore, scheduler_config
from _scheduler_fake import expected_tokens, fake_triton_config, write_fake_repository

from warmstart.etcd import Etcd
from warmstart.scheduler.errors import StaleEpochError
from warmstart.scheduler.etcd_state import EtcdClusterState
from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.etcd]

TTL_S = 2
KEY_ENV = "WARMSTART_E2E_REPO_KEY"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[tuple[TritonServer, FakeNodeStore]]]:
    repo = write_fake_repository(tmp_path / "repo", ["slow"])
    made: list[tuple[TritonServer, FakeNodeStore]] = []
    try:
        for i in range(2):
            triton = TritonServer(
                TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY),
                workdir=tmp_path / f"t{i}",
            )
            triton.start()
            made.append((triton, FakeNodeStore()))
        yield made
    finally:
        for triton, store in made:
            triton.stop(timeout=5.0)
            store.close()


def _agent(
    etcd: Etcd, prefix: str, name: str, triton: TritonServer, store: FakeNodeStore
) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "warmstart.cli",
        "node",
        "--etcd",
        etcd.url,
        "--prefix",
        prefix,
        "--name",
        name,
    ]
    cmd += ["--grpc", triton.grpc_url, "--memory-budget", "1GiB", "--store", store.url]
    cmd += ["--repository-key-env", KEY_ENV, "--lease-ttl", str(TTL_S)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith(f"node {name} registered=True")
    return proc


def test_a_node_whose_agent_dies_leaves_routing_within_its_ttl_and_its_stream_finishes_elsewhere(
    etcd: Etcd, nodes: list[tuple[TritonServer, FakeNodeStore]], monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"/e2e-{uuid.uuid4().hex}/"
    monkeypatch.setenv(KEY_ENV, REPO_KEY)  # the schedulers' side of the node records' key reference
    agents = {f"n{i}": _agent(etcd, prefix, f"n{i}", t, s) for i, (t, s) in enumerate(nodes)}
    sched = BackgroundScheduler(
        scheduler_config(
            [],
            {
                "slow": {
                    "checkpoint": "s3://models/slow",
                    "size_bytes": 1 << 20,
                    "triton_config": fake_triton_config("slow", token_delay_s=0.05),
                }
            },
            etcd=etcd.url,
            etcd_prefix=prefix,
            node_poll_interval_s=0.2,
            replica_lease_ttl_s=TTL_S,
        )
    )
    try:
        deadline = time.monotonic() + 20
        while not (
            len(sched.state()["servers"]) == 2
            and all(s["healthy"] for s in sched.state()["servers"].values())
        ):
            assert time.monotonic() < deadline, (
                f"the scheduler did not find both nodes: {sched.state()['servers']}"
            )
            time.sleep(0.1)
        n = 100  # 5 s of tokens: the node leaves routing (TTL 2 s) while the stream still runs
        body = {
            "text_input": "across nodes",
            "parameters": {"stream": True, "max_tokens": n, "temperature": 0.7, "seed": 3},
        }
        got: list[int] = []
        cut: list[tuple[str, float]] = []
        left: list[float] = []  # seconds from the cut until the node was out of routing

        async def run() -> None:
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{sched.http}/v2/models/slow/generate_stream", json=body) as resp,
            ):
                assert resp.status == 200
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    got.extend(event["token_ids"])
                    if cut and not left and cut[0][0] not in sched.state()["servers"]:
                        left.append(time.monotonic() - cut[0][1])
                    if len(got) >= 6 and not cut:
                        serving = next(
                            name for name, s in sched.state()["servers"].items() if "slow" in s["instances"]
                        )
                        os.killpg(agents[serving].pid, signal.SIGKILL)  # the node's registration is orphaned
                        cut.append((serving, time.monotonic()))

        asyncio.run(run())
        assert got == expected_tokens("across nodes", n, seed=3)  # one stream, no gap, no repeat
        assert sched.state()["stats"]["failovers"] >= 1  # it did move: the rest came from the other node
        assert left and left[0] <= TTL_S + 1.5, (
            f"out of routing {left} s after its agent died (TTL {TTL_S} s)"
        )
        # the node's agent restarts: a new incarnation, back in routing; the old one's writes are fenced off
        serving = cut[0][0]
        store = EtcdClusterState(etcd.url, prefix=prefix)
        try:
            triton, fake_store = nodes[int(serving[1:])]
            old_epoch = store.epoch(serving)
            agents[serving] = _agent(etcd, prefix, serving, triton, fake_store)
            new_epoch = store.epoch(serving)
            assert old_epoch is not None and new_epoch is not None and new_epoch > old_epoch
            deadline = time.monotonic() + 10
            while not sched.state()["servers"].get(serving, {}).get("healthy"):
                assert time.monotonic() < deadline, "the restarted node did not come back into routing"
                time.sleep(0.05)
            record = store.get_node(serving).value
            with pytest.raises(StaleEpochError):
                store.put_node(dataclasses.replace(record, epoch=old_epoch, memory_budget_bytes=1))
            assert store.get_node(serving).value.epoch == new_epoch
        finally:
            store.close()
    finally:
        sched.close()
        for proc in agents.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_with_etcd_down_loaded_models_are_served_new_loads_refused_and_a_restart_loses_nothing(
    tmp_path: Path, nodes: list[tuple[TritonServer, FakeNodeStore]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from warmstart.etcd import EtcdConfig

    own = Etcd(EtcdConfig(data_dir=tmp_path / "etcd"))  # a private one: this test stops it
    own.start()
    monkeypatch.setenv(KEY_ENV, REPO_KEY)
    triton, store = nodes[0]
    agent = _agent(own, "/warmstart/", "n0", triton, store)
    models = {
        name: {"checkpoint": f"s3://models/{name}", "size_bytes": 1 << 20,
               "triton_config": fake_triton_config(name, token_delay_s=0.01)}
        for name in ("slow", "other")
    }  # fmt: skip
    write_fake_repository(Path(triton.config.model_repositories[0]), ["other"])
    sched = BackgroundScheduler(scheduler_config([], models, etcd=own.url, node_poll_interval_s=0.2))
    try:
        deadline = time.monotonic() + 20
        while not sched.state()["servers"].get("n0", {}).get("healthy"):
            assert time.monotonic() < deadline, "the scheduler did not find the node"
            time.sleep(0.1)
        sched.call(sched.service.router._refresh_repositories())

        def generate(model: str) -> tuple[int, str]:
            req = urllib.request.Request(
                f"{sched.http}/v2/models/{model}/generate",
                data=json.dumps({"text_input": "hi", "parameters": {"max_tokens": 3}}).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        assert generate("slow")[0] == 200  # loaded while etcd is up
        own.stop()
        status, body = generate("slow")
        assert status == 200 and json.loads(body)["token_ids"] == expected_tokens("hi", 3), (
            body
        )  # still served
        t0 = time.monotonic()
        status, body = generate("other")
        assert status == 503 and "cluster state is unreachable" in body, (status, body)
        assert time.monotonic() - t0 < 5  # said at once, not after the cold-start timeout
        own.restart()  # same ports, same data directory
        deadline = time.monotonic() + 20
        while (status := generate("other")[0]) != 200:
            assert time.monotonic() < deadline, f"decisions did not resume after etcd returned ({status})"
            time.sleep(0.3)
        check = EtcdClusterState(own.url)
        try:
            assert check.get_node("n0").value.grpc == triton.grpc_url  # the registration outlived the restart
            assert "slow" in check.read().deployments
        finally:
            check.close()
    finally:
        sched.close()
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(10)
        own.stop()


# --- two scheduler replicas in front of three servers ----------------------------------------------------

MODELS6 = [f"r{i}" for i in range(6)]


@pytest.fixture
def three(tmp_path: Path) -> Iterator[list[TritonServer]]:
    repo = write_fake_repository(tmp_path / "repo", MODELS6)
    made: list[TritonServer] = []
    try:
        for i in range(3):
            triton = TritonServer(
                TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY),
                workdir=tmp_path / f"t{i}",
            )
            triton.start()
            made.append(triton)
        yield made
    finally:
        for triton in made:
            triton.stop(timeout=5.0)


def _replicas(etcd: Etcd, tritons: list[TritonServer], budget_models: int) -> list[BackgroundScheduler]:
    prefix = f"/replicas-{uuid.uuid4().hex}/"
    servers = [
        {"name": f"s{i}", "grpc": t.grpc_url, "repository_api_key": REPO_KEY, "memory_budget_bytes": budget_models << 20,
         "bandwidth": {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8}}
        for i, t in enumerate(tritons)
    ]  # fmt: skip
    models = {
        m: {"checkpoint": f"s3://models/{m}", "size_bytes": 1 << 20, "keep_alive_s": 300,
            "triton_config": fake_triton_config(m, token_delay_s=0.01, load_delay_s=0.3)}
        for m in MODELS6
    }  # fmt: skip
    return [
        BackgroundScheduler(
            scheduler_config(
                servers,
                models,
                etcd=etcd.url,
                etcd_prefix=prefix,
                replica_lease_ttl_s=3,
                cold_start_timeout_s=60,
                migration=False,
            )
        )
        for _ in range(2)
    ]


def _ready(triton: TritonServer) -> set[str]:
    return {m["name"] for m in triton.repository_index() if m.get("state") == "READY"}


async def _stream(session: aiohttp.ClientSession, url: str, model: str, prompt: str, n: int) -> list[int]:
    body = {"text_input": prompt, "parameters": {"stream": True, "max_tokens": n}}
    got: list[int] = []
    async with session.post(f"{url}/v2/models/{model}/generate_stream", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                got.extend(event["token_ids"])
    return got


def test_two_replicas_load_a_cold_model_once_and_a_load_storm_never_exceeds_a_budget(
    etcd: Etcd, three: list[TritonServer]
) -> None:
    a, b = _replicas(etcd, three, budget_models=2)
    peak: dict[str, int] = {}
    stop = False

    def watch() -> None:  # Triton's own repository index, not the schedulers' view
        while not stop:
            for i, t in enumerate(three):
                with contextlib.suppress(Exception):
                    peak[f"s{i}"] = max(peak.get(f"s{i}", 0), len(_ready(t)))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:

        async def first() -> list[list[int]]:
            async with aiohttp.ClientSession() as s:
                return await asyncio.gather(
                    *(_stream(s, (a, b)[k % 2].http, "r0", f"p{k}", 3) for k in range(20))
                )

        results = asyncio.run(first())
        assert all(r == expected_tokens(f"p{k}", 3) for k, r in enumerate(results))
        loads = [
            sum(n for key, n in sched.state()["stats"]["loads"].items() if key.endswith("/r0"))
            for sched in (a, b)
        ]
        assert sum(loads) == 1, f"loads of r0 per replica: {loads}"  # one replica loaded, the other joined
        assert sum("r0" in _ready(t) for t in three) == 1

        async def storm() -> list[list[int]]:
            async with aiohttp.ClientSession() as s:
                jobs = [_stream(s, (a, b)[k % 2].http, MODELS6[k % 6], f"q{k}", 3) for k in range(36)]
                return await asyncio.gather(*jobs)

        results = asyncio.run(storm())
        assert all(r == expected_tokens(f"q{k}", 3) for k, r in enumerate(results))
    finally:
        stop = True
        watcher.join(5)
        a.close()
        b.close()
    assert peak and max(peak.values()) <= 2, f"READY models per server at peak: {peak} (budget 2)"
