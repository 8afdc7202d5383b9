"""The scheduler in front of real tritonservers running the real ``warmstart`` backend on a tiny random
Llama checkpoint: an eviction releases the victim's engine and loads without waiting for its unload; live
migration and SIGKILL recovery continue token-exactly (seeded sampling)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _scheduler_cluster import ADMIN_TOKEN, REPO_KEY, BackgroundScheduler, scheduler_config
from backend_support import make_tiny_checkpoint, write_model

from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]

N = 480  # long enough that the migration switches before the source finishes (tiny model, fast engine)
BODY = {
    "text_input": "Once upon a time",
    "parameters": {"stream": True, "max_tokens": N, "temperature": 0.8, "seed": 3},
}


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[list[TritonServer], BackgroundScheduler]]:
    root = tmp_path_factory.mktemp("sched-backend")
    ckpt = make_tiny_checkpoint(root / "tiny_llama", "llama")
    repo = root / "repo"
    write_model(repo, "tiny", str(ckpt), "torch")
    servers: list[TritonServer] = []
    sched: BackgroundScheduler | None = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # 2 shared cores
        try:
            for i in range(2):
                s = TritonServer(
                    TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY),
                    workdir=root / f"t{i}",
                )
                servers.append(s)
                s.start()
            sched = BackgroundScheduler(
                scheduler_config(
                    [
                        {
                            "name": f"s{i}",
                            "grpc": s.grpc_url,
                            "repository_api_key": REPO_KEY,
                            "bandwidth": {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8},
                        }
                        for i, s in enumerate(servers)
                    ],
                    {"tiny": {"checkpoint": str(ckpt), "engine": "torch", "size_bytes": 1 << 20}},
                )
            )
            yield servers, sched
        finally:
            if sched is not None:
                sched.close()
            for s in servers:
                s.stop()


async def _stream(
    sched: BackgroundScheduler,
    at: int | None = None,
    hook: Any = None,
    *,
    model: str = "tiny",
    max_tokens: int | None = None,
) -> list[int]:
    """The token ids of one generate_stream call; ``hook()`` starts once ``at`` tokens have arrived."""
    body = (
        BODY
        if max_tokens is None
        else {**BODY, "parameters": {**BODY["parameters"], "max_tokens": max_tokens}}
    )
    tokens: list[int] = []
    task: asyncio.Task[Any] | None = None
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sched.http}/v2/models/{model}/generate_stream", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                tokens.extend(event["token_ids"])
                if at is not None and len(tokens) >= at and task is None:
                    task = asyncio.create_task(hook())
    if task is not None:
        await task
    return tokens


async def _tokens(sched: BackgroundScheduler, model: str, max_tokens: int) -> list[int]:
    return await _stream(sched, model=model, max_tokens=max_tokens)


def test_eviction_releases_the_victim_and_the_load_does_not_wait_for_its_unload(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """One model's worth of memory: each request for the other model evicts the idle one. The victim's
    engine is released first (memory free in tens of ms), so the new load starts while tritonserver is still
    unloading the victim (its Python backend sleeps 1 s per instance finalize), and the output is right."""
    servers, _ = cluster
    triton = next(s for s in servers if s.is_alive())
    repo = Path(triton.config.model_repositories[0])
    ckpt = repo.parent / "tiny_llama"
    names = ("evict_a", "evict_b")
    for name in names:
        write_model(repo, name, str(ckpt), "torch")
    caplog.set_level(logging.INFO, logger="warmstart.scheduler.router")
    sched = BackgroundScheduler(
        scheduler_config(
            [
                {
                    "name": "s0",
                    "grpc": triton.grpc_url,
                    "repository_api_key": REPO_KEY,
                    "memory_budget_bytes": 1 << 20,
                    "bandwidth": {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8},
                }
            ],
            {n: {"checkpoint": str(ckpt), "engine": "torch", "size_bytes": 1 << 20} for n in names},
        )
    )
    try:
        reference = asyncio.run(_tokens(sched, "evict_a", 16))
        assert len(reference) == 16
        for round_, (model, victim) in enumerate([("evict_b", "evict_a"), ("evict_a", "evict_b")], 1):
            # same checkpoint and seed: a correct load of either model gives the same tokens
            assert asyncio.run(_tokens(sched, model, 16)) == reference
            deadline = time.monotonic() + 60
            while (state := sched.state())["servers"]["s0"]["unloading"] or state["stats"][
                "unloads"
            ] < round_:
                assert time.monotonic() < deadline, f"the unload of {victim} never ended: {state}"
                time.sleep(0.05)
            assert (state["stats"]["evictions"], state["stats"]["releases"]) == (round_, round_)
            assert list(state["servers"]["s0"]["instances"]) == [model]
            assert state["servers"]["s0"]["release_s"] is not None
            messages = [r.getMessage() for r in caplog.records if r.name == "warmstart.scheduler.router"]
            loading = messages.index(f"loading {model} on s0 (tier remote)")
            released = next(i for i, m in enumerate(messages) if m.startswith(f"released {victim} on s0"))
            unloaded = next(i for i, m in enumerate(messages) if m.startswith(f"unloaded {victim} on s0"))
            assert released < loading < unloaded, messages
            caplog.clear()
        states = {m["name"]: m.get("state") for m in triton.repository_index()}
        assert (states["evict_a"], states["evict_b"]) == ("READY", "UNAVAILABLE")
    finally:
        sched.close()
        for name in names:
            triton.unload_model(name)


def test_real_backend_migration_then_sigkill_continue_token_exactly(cluster: Any) -> None:
    servers, sched = cluster
    reference = asyncio.run(_stream(sched))
    assert len(reference) == N
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for name in ("s0", "s1"):  # warm on both, so the migration only replays
        req = urllib.request.Request(
            f"{sched.http}/admin/v1/servers/{name}/models/tiny/load", data=b"{}", method="POST", headers=auth
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200

    outcome: dict[str, Any] = {}

    async def migrate() -> None:
        gen_id, info = next(iter(sched.state()["generations"].items()))
        dest = "s1" if info["server"] == "s0" else "s0"
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{sched.http}/admin/v1/migrate",
                json={"generation": gen_id, "server": dest},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as resp,
        ):
            outcome.update(await resp.json(), status=resp.status)

    assert asyncio.run(_stream(sched, 4, migrate)) == reference
    assert outcome.get("outcome") == "switched", outcome
    assert sched.state()["stats"]["migrations"] == 1

    async def kill() -> None:
        serving = next(iter(sched.state()["generations"].values()))["server"]
        os.kill(servers[int(serving[1:])].pid, signal.SIGKILL)

    assert asyncio.run(_stream(sched, 4, kill)) == reference
    assert sched.state()["stats"]["failovers"] >= 1
