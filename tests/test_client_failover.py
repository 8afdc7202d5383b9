"""A client of several scheduler replicas sees one continuous, token-exact stream when the replica serving it
is SIGKILLed: `warmstart.client.generate_stream` resumes through the next replica with the tokens it has
(the scheduler's ``generated_ids`` input). Two real ``warmstart scheduler`` replicas sharing one real etcd front one real
tritonserver serving the fake model (tests/_scheduler_fake.py: token k is a pure function of prompt, seed, k).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from _scheduler_cluster import REPO_KEY
from _scheduler_fake import expected_tokens, fake_triton_config, write_fake_repository

from warmstart.client import GenerationError, generate_stream
from warmstart.etcd import Etcd
from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.etcd]


class Replica:
    """One ``warmstart scheduler`` process on free loopback ports."""

    def __init__(self, config: Path) -> None:
        cmd = [
            sys.executable,
            "-m",
            "warmstart.cli",
            "scheduler",
            "--config",
            str(config),
            "--log-level",
            "WARNING",
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("scheduler ready"), f"scheduler did not start: {line!r}"
        fields = dict(kv.split("=") for kv in line.split()[2:])
        self.grpc = f"127.0.0.1:{fields['grpc']}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, etcd: Etcd) -> Iterator[tuple[Path, TritonServer]]:
    root = tmp_path_factory.mktemp("failover")
    repo = write_fake_repository(root / "repo", ["slow"])
    triton = TritonServer(
        TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY), workdir=root / "t"
    )
    triton.start()
    config = {
        "listen_http": "127.0.0.1:0",
        "listen_grpc": "127.0.0.1:0",
        "etcd": etcd.url,  # the replicas share cluster state (their load decisions are compare-and-sets)
        "etcd_prefix": f"/failover-{uuid.uuid4().hex}/",
        "servers": [
            {
                "name": "t0",
                "grpc": triton.grpc_url,
                "repository_api_key": REPO_KEY,
                "bandwidth": {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8},
            }
        ],
        "models": {
            "slow": {
                "checkpoint": "s3://models/slow",
                "size_bytes": 1 << 20,
                "triton_config": fake_triton_config("slow", token_delay_s=0.05),
            }
        },
    }
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        yield path, triton
    finally:
        triton.stop(timeout=5.0)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 5}], ids=["greedy", "seeded"])
def test_stream_resumes_through_another_replica_token_exactly_when_its_replica_is_killed(
    cluster: tuple[Path, TritonServer], sampling: dict[str, object]
) -> None:
    config, _ = cluster
    a, b = Replica(config), Replica(config)
    try:
        n = 24
        got: list[int] = []
        endpoints: list[str | None] = []
        for delta in generate_stream(
            [a.grpc, b.grpc], "slow", "keep going", max_tokens=n, timeout=30, **sampling
        ):
            got.extend(delta.token_ids)
            endpoints.append(delta.endpoint)
            if len(got) >= 6 and a.proc.poll() is None:
                a.kill()  # the replica serving the stream dies mid-stream
        seed = int(sampling.get("seed", 0))  # type: ignore[call-overload]
        assert got == expected_tokens("keep going", n, seed=seed)  # one stream: no gap, no repeat
        assert endpoints[0] == a.grpc and endpoints[-1] == b.grpc  # the second replica finished it
    finally:
        a.kill()
        b.kill()


def test_a_resume_with_every_token_already_received_is_refused_with_a_clear_error(
    cluster: tuple[Path, TritonServer],
) -> None:
    config, _ = cluster
    r = Replica(config)
    try:
        client = grpcclient.InferenceServerClient(r.grpc)
        inputs = []
        for name, dtype, value in [
            ("text_input", "BYTES", np.array([b"x"], dtype=np.object_)),
            ("stream", "BOOL", np.array([True])),
            ("sampling_parameters", "BYTES", np.array([b'{"max_tokens": 2}'], dtype=np.object_)),
            ("generated_ids", "INT64", np.array([5, 6], dtype=np.int64)),
        ]:
            t = grpcclient.InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            inputs.append(t)
        errors: list[str] = []
        client.start_stream(callback=lambda result, error: errors.append(str(error)) if error else None)
        client.async_stream_infer("slow", inputs, request_id="r1")
        client.stop_stream()
        client.close()
        assert len(errors) == 1 and "nothing is left to generate" in errors[0], errors
        with pytest.raises(GenerationError, match="every endpoint was lost"):
            list(generate_stream(["127.0.0.1:1", "127.0.0.1:2"], "slow", "x", max_tokens=2, timeout=5))
    finally:
        r.kill()
