"""``warmstart serve`` as a user runs it: a subprocess serving a repository, stopped by Ctrl-C or a dying server."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_support import http_generate_stream, make_tiny_checkpoint, write_model

pytestmark = [pytest.mark.triton, pytest.mark.slow]

BANNER = re.compile(
    r"tritonserver pid (\d+) on http (\S+), grpc (\S+), metrics (\S+) \(repository API key: (\S+)\)"
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    ckpt = make_tiny_checkpoint(root / "tiny", "llama")
    write_model(root / "repo", "tiny", str(ckpt), "torch")
    return root / "repo"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


@contextlib.contextmanager
def serve(repo: Path, tmp_path: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], re.Match[str]]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WARMSTART_REPO_KEY", None)
    argv = [sys.executable, "-m", "warmstart.cli", "serve", "--model-repository", str(repo)]
    argv += [
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--workdir",
        str(tmp_path / "w"),
        *extra,
    ]
    with (tmp_path / "serve.out").open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
    server_pid = None
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            m = BANNER.search(line)
            if m:
                server_pid = int(m.group(1))
                yield proc, m
                break
        else:
            raise AssertionError("serve exited before the server was up:\n" + "".join(lines))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if server_pid is not None and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def test_serve_loads_models_answers_and_stops_cleanly_on_ctrl_c(repo: Path, tmp_path: Path) -> None:
    with serve(repo, tmp_path, "--load-model", "tiny") as (proc, m):
        pid, http = int(m.group(1)), m.group(2)
        status, events = http_generate_stream(
            http, "tiny", {"text_input": "Hi", "parameters": {"stream": True, "max_tokens": 3}}
        )
        assert status == 200 and len(events) == 4, events
        # the repository API needs the key
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"http://{http}/v2/repository/index", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(req, timeout=10)
        req.add_header("x-warmstart-repo-key", m.group(5))
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert b'"tiny"' in resp.read()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 20
        assert not _alive(pid)


def test_serve_exits_with_the_server_status_when_it_dies(repo: Path, tmp_path: Path) -> None:
    with serve(repo, tmp_path) as (proc, m):
        os.kill(int(m.group(1)), signal.SIGKILL)
        assert proc.wait(30) == 128 + signal.SIGKILL
