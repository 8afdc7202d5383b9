"""Bounded waits: every remote read has a deadline with a clear error, and every owner of an external
process stops it within a bounded time, escalating to SIGKILL. Real SeaweedFS, store, host and Triton."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import warmstart.format as wf
from warmstart._process import KILL_WAIT_S, ManagedProcess, group_members
from warmstart.errors import InvalidRemoteTimeout, RemoteTimeout
from warmstart.format.sources import (
    DEFAULT_REMOTE_TIMEOUT_S,
    ENV_REMOTE_TIMEOUT,
    TensorStoreSource,
    remote_timeout_s,
)
from warmstart.format.transfer import upload
from warmstart.loaders.remote import HttpReader
from warmstart.loaders.tiers import Tiers, open_host
from warmstart.objectstore import SeaweedFS, SeaweedFSConfig
from warmstart.store.owner import StoreServer

DEADLINE_S = 2.0
SLACK_S = 10.0  # what a loaded 2-core machine may add to a deadline; far below the hangs this guards against


# -- the setting ----------------------------------------------------------------------------------------------


def test_remote_timeout_defaults_to_60_s_and_reads_the_environment() -> None:
    assert remote_timeout_s({}) == DEFAULT_REMOTE_TIMEOUT_S == 60.0
    assert remote_timeout_s({ENV_REMOTE_TIMEOUT: " 2.5 "}) == 2.5


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "nan", "inf", "1e9"])
def test_a_bad_remote_timeout_is_refused_with_the_variable_named(raw: str) -> None:
    with pytest.raises(InvalidRemoteTimeout, match=f"{ENV_REMOTE_TIMEOUT}='{raw}'.*number of seconds"):
        remote_timeout_s({ENV_REMOTE_TIMEOUT: raw})


# -- remote reads against a paused SeaweedFS ------------------------------------------------------------------


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS of this module's own (it is paused), holding the checkpoint ``s3://models/tiny/``."""
    server = SeaweedFS(SeaweedFSConfig(data_dir=tmp_path_factory.mktemp("weed"), buckets=("models",)))
    local = tmp_path_factory.mktemp("ckpt") / "tiny"
    rng = np.random.default_rng(0)
    wf.save({f"t{i}": rng.standard_normal((256, 1024)).astype(np.float32) for i in range(4)}, local)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_ACCESS_KEY_ID", raising=False)
        mp.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
        server.start()
        try:
            mp.setenv("WARMSTART_S3_ENDPOINT", server.endpoint)
            upload(local, "s3://models/tiny/")
            yield server
        finally:
            server.stop()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def paused(proc_pid: int | None) -> Iterator[None]:
    assert proc_pid is not None
    os.kill(proc_pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while _state(proc_pid) != "T" and time.monotonic() < deadline:  # the stop is delivered asynchronously
            time.sleep(0.01)
        assert _state(proc_pid) == "T"
        yield
    finally:
        os.kill(proc_pid, signal.SIGCONT)


def run_bounded(fn: Callable[[], Any], limit_s: float) -> tuple[BaseException | None, float]:
    """Run ``fn`` on a thread; return what it raised and how long it took. Fails if it is still running after
    ``limit_s`` (the thread is then left to end when the server resumes)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t0 = time.monotonic()
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(limit_s)
    assert not th.is_alive(), f"still waiting {limit_s:.0f} s later"
    return outcome[0], time.monotonic() - t0


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.parametrize("reader", ["http", "tensorstore"])
def test_a_remote_load_from_a_paused_object_store_fails_at_its_deadline(
    weed: SeaweedFS, reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_REMOTE_TIMEOUT, str(DEADLINE_S))
    if reader == "tensorstore":
        monkeypatch.setenv("WARMSTART_REMOTE_READER", "tensorstore")
    with paused(weed.pid):
        error, took = run_bounded(lambda: open_host("s3://models/tiny/", tiers=Tiers()), DEADLINE_S + SLACK_S)
    assert isinstance(error, RemoteTimeout), error
    assert took >= DEADLINE_S * 0.9
    message = str(error)
    assert "s3://models/tiny/index.json" in message or "/models/tiny/index.json" in message
    assert weed.endpoint in message and f"within {DEADLINE_S:g} s ({ENV_REMOTE_TIMEOUT})" in message
    # resumed, the same load succeeds (no connection is left half-used)
    ckpt = open_host("s3://models/tiny/", tiers=Tiers())
    assert ckpt.index.total_bytes == 4 * 256 * 1024 * 4


@pytest.mark.s3
@pytest.mark.slow
def test_the_node_store_answers_a_paused_remote_with_a_timeout_error(weed: SeaweedFS, tmp_path: Path) -> None:
    env = {**os.environ, ENV_REMOTE_TIMEOUT: str(DEADLINE_S), "WARMSTART_S3_ENDPOINT": weed.endpoint}
    store = StoreServer(
        root=tmp_path / "store", remote="s3://models", memory_capacity="64MiB", disk_capacity="64MiB", env=env
    )
    with store:
        client = store.client()
        with paused(weed.pid):
            error, _ = run_bounded(lambda: client.ensure("tiny"), DEADLINE_S + SLACK_S)
        assert isinstance(error, RemoteTimeout), error  # the store's 504
        assert weed.endpoint in str(error) and f"within {DEADLINE_S:g} s" in str(error)
        assert client.ensure("tiny")["tier"] == "memory"  # resumed: the same fill works


@pytest.mark.s3
@pytest.mark.slow
def test_tensorstore_range_reads_have_the_deadline(weed: SeaweedFS) -> None:
    src = TensorStoreSource("s3://models/tiny/", timeout_s=DEADLINE_S)
    with paused(weed.pid):
        error, _ = run_bounded(
            lambda: list(src.read_ranges([("data-00000.bin", 0, 4096)] * 3)), DEADLINE_S + SLACK_S
        )
    assert isinstance(error, RemoteTimeout) and "[0, 4096)" in str(error), error


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a 200 of 10,000 bytes, sent one byte every 0.1 s (never idle for long)."""

    def do_GET(self) -> None:
        self.send_response(200 if "Range" not in self.headers else 206)
        self.send_header("Content-Length", "10000")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(10000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def trickle() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ckpt/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_body_trickling_in_fails_at_the_deadline_not_at_a_socket_timeout(trickle: str) -> None:
    """Bytes keep coming (no single recv waits long), so only a deadline on the whole read ends it."""
    reader = HttpReader(trickle, timeout=DEADLINE_S)
    try:

        def read_range() -> None:
            reader.get("data-00000.bin", 0, 10000).readinto(memoryview(bytearray(10000)))

        error, took = run_bounded(read_range, DEADLINE_S + SLACK_S)
        assert isinstance(error, RemoteTimeout), error
        assert took >= DEADLINE_S * 0.9
        assert "data-00000.bin bytes 0+10000" in str(error) and trickle.rsplit("/", 2)[0] in str(error)
        error, _ = run_bounded(lambda: reader.read("index.json"), DEADLINE_S + SLACK_S)
        assert isinstance(error, RemoteTimeout), error
    finally:
        reader.close()


def test_a_server_that_accepts_but_never_answers_fails_at_the_deadline() -> None:
    with socket.socket() as listener:  # listening, never accepting: connect() succeeds, nothing answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        reader = HttpReader(f"http://127.0.0.1:{listener.getsockname()[1]}/ckpt/", timeout=DEADLINE_S)
        try:
            error, _ = run_bounded(lambda: reader.read("index.json"), DEADLINE_S + SLACK_S)
        finally:
            reader.close()
    assert isinstance(error, RemoteTimeout) and "index.json" in str(error), error


# -- stop paths -----------------------------------------------------------------------------------------------


def test_stop_kills_a_process_that_ignores_sigterm_and_sweeps_its_group(tmp_path: Path) -> None:
    proc = ManagedProcess(
        ["sh", "-c", "trap '' TERM; sleep 600 & sleep 600 & wait"],
        env=dict(os.environ),
        log_path=tmp_path / "log",
    )
    pid = proc.start()
    deadline = time.monotonic() + 10
    while len(group_members(pid)) < 3 and time.monotonic() < deadline:  # sh and its two sleeps
        time.sleep(0.05)
    assert len(group_members(pid)) == 3
    t0 = time.monotonic()
    rc = proc.stop(timeout=1.0)
    took = time.monotonic() - t0
    assert rc == -signal.SIGKILL, rc
    assert took < 1.0 + KILL_WAIT_S, took
    assert group_left(pid) == []


def group_left(pgid: int, deadline_s: float = 10.0) -> list[int]:
    """The group's members still running once the sweep's SIGKILLs (delivered asynchronously) had time to land."""
    deadline = time.monotonic() + deadline_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return group_members(pgid)


def _short_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="wsbw-"))  # Unix socket paths hold at most 107 bytes


def _seaweedfs(tmp: Path) -> Any:
    return SeaweedFS(SeaweedFSConfig(data_dir=tmp / "weed", buckets=("models",))).start()


def _store(tmp: Path) -> Any:
    return StoreServer(
        root=tmp / "store", remote="s3://nowhere", memory_capacity="16MiB", disk_capacity="16MiB"
    ).start()


def _engine_host(tmp: Path) -> Any:
    from warmstart.backend.host import EngineHost

    host = EngineHost(_short_dir() / "e.sock", env=dict(os.environ), log_path=tmp / "host.log").start()
    host.wait_ready(120)
    return host


def _tritonserver(tmp: Path) -> Any:
    from warmstart.triton import TritonConfig, TritonServer

    (tmp / "repo").mkdir()
    return TritonServer(
        TritonConfig(model_repositories=(tmp / "repo",)), workdir=tmp / "srv", engine_host=False
    ).start()


@pytest.mark.slow
@pytest.mark.parametrize(
    "start",
    [
        pytest.param(_seaweedfs, id="seaweedfs", marks=pytest.mark.s3),
        pytest.param(_store, id="node-store"),
        pytest.param(_engine_host, id="engine-host"),
        pytest.param(_tritonserver, id="tritonserver", marks=pytest.mark.triton),
    ],
)
def test_every_owner_kills_a_process_that_cannot_handle_sigterm(
    start: Callable[[Path], Any], tmp_path: Path
) -> None:
    owner = start(tmp_path)
    try:
        pid = owner.pid
        os.kill(pid, signal.SIGSTOP)  # stopped: SIGTERM stays pending, as if ignored
        t0 = time.monotonic()
        rc = owner.stop(timeout=1.0)
        took = time.monotonic() - t0
        assert rc == -signal.SIGKILL, rc
        assert took < 1.0 + KILL_WAIT_S + SLACK_S, took  # + the owner's own clean-up
        assert group_left(pid) == []
    finally:
        owner.stop()
        if hasattr(owner, "socket_path"):
            shutil.rmtree(owner.socket_path.parent, ignore_errors=True)
