"""The scheduler over real node stores and a real remote: SeaweedFS, two `warmstart store` daemons, two
tritonservers with the warmstart backend, a tiny Llama checkpoint in S3. The model sits in server 2's memory
tier only; a request for it through the scheduler must be placed on server 2 and answered."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _scheduler_cluster import REPO_KEY, BackgroundScheduler, scheduler_config
from backend_support import make_tiny_checkpoint, write_model

from warmstart.format.transfer import upload
from warmstart.objectstore import SeaweedFS
from warmstart.store.owner import StoreServer
from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.s3, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, seaweedfs: SeaweedFS
) -> Iterator[tuple[list[StoreServer], BackgroundScheduler]]:
    root = tmp_path_factory.mktemp("sched-stores")
    ckpt = make_tiny_checkpoint(root / "tiny", "llama")
    upload(ckpt, "s3://models/sched-stores/tiny")
    repo = root / "repo"
    write_model(repo, "tiny", "tiny", "torch")  # a bare name: each backend asks its node store
    stores: list[StoreServer] = []
    tritons: list[TritonServer] = []
    sched: BackgroundScheduler | None = None
    try:
        for i in range(2):
            store = StoreServer(
                root=root / f"node{i}", remote="s3://models/sched-stores", memory_capacity="256MiB",
                disk_capacity="256MiB", memory_root=Path(f"/dev/shm/ws-test-{os.getpid()}-{i}"),
                env=dict(os.environ),
            )  # fmt: skip
            stores.append(store)
            store.start()
            t = TritonServer(
                TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY),
                workdir=root / f"t{i}",
                env={"WARMSTART_STORE": store.url, "OMP_NUM_THREADS": "1"},
            )
            tritons.append(t)
            t.start()
        stores[1].client().ensure("tiny", tier="memory")  # server 2 (index 1) holds it in memory
        size = sum(p.stat().st_size for p in ckpt.iterdir())
        sched = BackgroundScheduler(
            scheduler_config(
                [
                    {
                        "name": f"server{i + 1}",
                        "grpc": t.grpc_url,
                        "repository_api_key": REPO_KEY,
                        "node_store": s.url,
                    }
                    for i, (t, s) in enumerate(zip(tritons, stores, strict=True))
                ],
                {"tiny": {"checkpoint": "tiny", "engine": "torch", "size_bytes": size}},
            )
        )
        yield stores, sched
    finally:
        if sched is not None:
            sched.close()
        for t in tritons:
            t.stop()
        for s in stores:
            s.stop()
        for i in range(2):
            shutil.rmtree(f"/dev/shm/ws-test-{os.getpid()}-{i}", ignore_errors=True)


async def _generate(base: str) -> list[int]:
    body = {"text_input": "Hello", "parameters": {"stream": True, "max_tokens": 5}}
    tokens: list[int] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v2/models/tiny/generate_stream", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                tokens.extend(event["token_ids"])
    return tokens


def _servers(sched: BackgroundScheduler) -> dict[str, Any]:
    return dict(sched.state()["servers"])


def test_cold_model_is_placed_on_the_server_whose_store_holds_it_in_memory(cluster: Any) -> None:
    _, sched = cluster
    deadline = time.monotonic() + 30
    while not all(s["reported"] for s in _servers(sched).values()):  # the stores have been polled
        assert time.monotonic() < deadline, _servers(sched)
        time.sleep(0.2)
    assert _servers(sched)["server2"]["store_tiers"].get("tiny") == "memory"
    assert "tiny" not in _servers(sched)["server1"]["store_tiers"]

    tokens = asyncio.run(_generate(sched.http))

    assert len(tokens) == 5
    servers = _servers(sched)
    assert "tiny" in servers["server2"]["instances"]
    assert "tiny" not in servers["server1"]["instances"]
    assert (
        sched.state()["stats"]["loads"] == {"server2": 1}
        or sum(sched.state()["stats"]["loads"].values()) == 1
    )
