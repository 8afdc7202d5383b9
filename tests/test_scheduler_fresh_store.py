"""A fresh node store (nothing filled from the remote yet, so it reports ``remote_bps: null``) behind a
scheduler whose config gives no bandwidth: the model, only in the remote, is placed at the assumed figure
and answered, and the fill measures the store's real remote bandwidth. Real everything: SeaweedFS, a
``warmstart store`` daemon, a tritonserver with the warmstart backend, a tiny Llama checkpoint in S3."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from _scheduler_cluster import REPO_KEY, BackgroundScheduler, scheduler_config
from backend_support import make_tiny_checkpoint, write_model

from warmstart.format.transfer import upload
from warmstart.objectstore import SeaweedFS
from warmstart.store.owner import StoreServer
from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.s3, pytest.mark.slow]


def _get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def test_fresh_store_that_never_measured_its_remote_still_gets_its_model_placed(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    upload(ckpt, "s3://models/sched-fresh/tiny")
    write_model(tmp_path / "repo", "tiny", "tiny", "torch")
    shm = Path(f"/dev/shm/ws-test-fresh-{os.getpid()}")
    store = StoreServer(
        root=tmp_path / "node", remote="s3://models/sched-fresh", memory_capacity="256MiB",
        disk_capacity="256MiB", memory_root=shm, env=dict(os.environ),
    )  # fmt: skip
    triton = TritonServer(
        TritonConfig(model_repositories=(tmp_path / "repo",), repository_api_key=REPO_KEY),
        workdir=tmp_path / "t0",
        env={"WARMSTART_STORE": store.url, "OMP_NUM_THREADS": "1"},
    )
    sched: BackgroundScheduler | None = None
    try:
        store.start()
        assert _get_json(f"{store.url}/v1/bandwidth")["remote_bps"] is None  # fresh: not measured
        triton.start()
        size = sum(p.stat().st_size for p in ckpt.iterdir())
        sched = BackgroundScheduler(
            scheduler_config(
                [
                    {
                        "name": "node",
                        "grpc": triton.grpc_url,
                        "repository_api_key": REPO_KEY,
                        "node_store": store.url,
                    }
                ],
                {"tiny": {"checkpoint": "tiny", "engine": "torch", "size_bytes": size}},
                cold_start_timeout_s=90.0,
            )
        )
        deadline = time.monotonic() + 30
        while not sched.state()["servers"]["node"]["reported"]:
            assert time.monotonic() < deadline, sched.state()
            time.sleep(0.2)

        body = json.dumps({"text_input": "Hello", "parameters": {"max_tokens": 4}}).encode()
        req = urllib.request.Request(
            f"{sched.http}/v2/models/tiny/generate", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
            out = json.loads(resp.read())
        assert len(out["token_ids"]) == 4, out
        assert sched.state()["stats"]["loads"] == {"node/tiny": 1}
        measured = _get_json(f"{store.url}/v1/bandwidth")["remote_bps"]
        assert isinstance(measured, float) and measured > 0  # the fill measured the real figure
    finally:
        if sched is not None:
            sched.close()
        triton.stop()
        store.stop()
        shutil.rmtree(shm, ignore_errors=True)
