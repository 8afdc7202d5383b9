"""No orphans: the engine host reaps engine processes whose stub is gone, and the Triton stubs of a
tritonserver that was SIGKILLed; engine processes die with their host. Real processes throughout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_support import grpc_generate, make_tiny_checkpoint, write_model

from warmstart.backend.host import EngineHost, Peer, reap_decision
from warmstart.backend.remote import RemoteRuntime
from warmstart.triton import TritonConfig, TritonServer
from warmstart.tritonconfig import ModelSettings

REAP_DEADLINE_S = 20.0  # the host checks every 0.5 s; the rest is slack for a loaded 2-core machine


def exited(pid: int) -> bool:
    """Gone or a zombie (its memory released)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_exited(pids: list[int], deadline_s: float = REAP_DEADLINE_S) -> list[int]:
    """Poll until every pid has exited or the deadline passes; returns those still running."""
    deadline = time.monotonic() + deadline_s
    while True:
        left = [p for p in pids if not exited(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def children(ppid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid and fields[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def exe_name(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


# -- the rule, as a pure function ------------------------------------------------------------------------------


STUB = Peer(pid=100, ppid=10, start_time=5000, is_stub=True)
CLIENT = Peer(pid=100, ppid=10, start_time=5000, is_stub=False)


@pytest.mark.parametrize(
    ("peer", "now", "decision"),
    [
        (STUB, ("S", 10, 5000), None),  # stub and its server alive
        (STUB, None, "engine"),  # stub gone
        (STUB, ("Z", 10, 5000), "engine"),  # stub a zombie
        (STUB, ("S", 10, 9999), "engine"),  # the pid now names another process
        (STUB, ("S", 1, 5000), "stub+engine"),  # the stub was reparented: its tritonserver exited
        (CLIENT, ("S", 1, 5000), None),  # any other client is never killed for being reparented
        (CLIENT, None, "engine"),
    ],
)
def test_reap_decision(peer: Peer, now: tuple[str, int, int] | None, decision: str | None) -> None:
    assert reap_decision(peer, now) == decision


# -- the engine host alone -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("orphans") / "tiny", "llama")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[EngineHost]:
    sock_dir = Path(tempfile.mkdtemp(prefix="wseo-"))  # a Unix socket path holds at most 107 bytes
    h = EngineHost(
        sock_dir / "e.sock", env={**os.environ, "OMP_NUM_THREADS": "1"}, log_path=tmp_path / "engine-host.log"
    )
    try:
        h.start().wait_ready(120)
        yield h
    finally:
        h.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from warmstart.tritonconfig import ModelSettings
    from warmstart.backend.remote import RemoteRuntime
    rt = RemoteRuntime.connect(sys.argv[1], ModelSettings(checkpoint=sys.argv[2], engine="torch"), model_name="m")
    print(rt.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_engine_process_whose_stub_died_is_killed_by_the_host(host: EngineHost, checkpoint: Path) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, str(host.socket_path), str(checkpoint)],
        stdout=subprocess.PIPE,
        text=True,
    )
    engine = 0
    try:
        assert client.stdout is not None
        engine = int(client.stdout.readline())
        # Stopped, the engine process cannot see its connection close: it stands for one busy in a load or a
        # generation when its stub dies.
        os.kill(engine, signal.SIGSTOP)
        client.kill()
        client.wait()
        assert wait_exited([engine]) == [], "the engine process outlived its stub"
        assert "is gone; killing it" in host.logs()
        assert host.is_alive()
    finally:
        client.kill()
        client.wait()
        if engine and not exited(engine):
            os.kill(engine, signal.SIGKILL)


@pytest.mark.slow
def test_engine_processes_die_with_their_host(host: EngineHost, checkpoint: Path) -> None:
    rt = RemoteRuntime.connect(
        host.socket_path, ModelSettings(checkpoint=str(checkpoint), engine="torch"), model_name="m"
    )
    try:
        assert host.pid is not None and not exited(rt.pid)
        os.kill(host.pid, signal.SIGKILL)  # no stop(): no sweep of its process group
        assert wait_exited([rt.pid]) == [], "the engine process outlived its host"
    finally:
        rt.close()


# -- a real tritonserver ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.triton
def test_sigkilled_tritonserver_leaves_no_stub_and_no_engine_process(
    tmp_path: Path, checkpoint: Path
) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m", str(checkpoint), "torch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        srv = TritonServer(TritonConfig(model_repositories=(repo,)), workdir=tmp_path / "srv")
        srv.start()
    try:
        srv.load_model("m")
        assert len(grpc_generate(srv.grpc_url, "m", "hi", params={"max_tokens": 2}).ids) == 2
        host_pid = srv.engine_host_pid
        assert srv.pid is not None and host_pid is not None
        stubs = [p for p in children(srv.pid) if exe_name(p) == "triton_python_backend_stub"]
        engines = children(host_pid)
        assert stubs and engines
        os.kill(srv.pid, signal.SIGKILL)
        # Not stopped and not reaped: tritonserver stays a zombie, as under a supervisor that has not noticed
        # yet (the stubs' own check of their parent, kill(pid, 0), succeeds on a zombie).
        assert wait_exited(stubs + engines) == [], "a stub or engine process outlived its tritonserver"
        assert not exited(host_pid)  # the host itself stays up until the server's owner stops it
    finally:
        srv.stop()


@pytest.mark.slow
@pytest.mark.triton
def test_sigkilled_tritonserver_leaves_no_stub_without_an_engine_host(
    tmp_path: Path, checkpoint: Path
) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m", str(checkpoint), "torch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        srv = TritonServer(
            TritonConfig(model_repositories=(repo,)), workdir=tmp_path / "srv", engine_host=False
        )
        srv.start()
    try:
        srv.load_model("m")  # the engine runs inside the stub
        assert srv.pid is not None
        stubs = [p for p in children(srv.pid) if exe_name(p) == "triton_python_backend_stub"]
        assert stubs
        os.kill(srv.pid, signal.SIGKILL)  # left a zombie, as above
        assert wait_exited(stubs) == [], "a stub outlived its tritonserver"
    finally:
        srv.stop()
