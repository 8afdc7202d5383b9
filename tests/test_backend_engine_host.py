"""The engine host and its engine processes, without Triton: a real host process, a tiny torch checkpoint,
recording sinks, and the same requests answered by an in-process runtime for comparison."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from backend_support import RecordingSink, byte_tokenizer_json, make_tiny_checkpoint

from warmstart.backend.host import EngineHost, _TokenizerCache
from warmstart.backend.remote import EngineHostUnavailable, RemoteRuntime
from warmstart.backend.request import parse_request
from warmstart.backend.runtime import ModelLoadFailed, Runtime
from warmstart.tritonconfig import ModelSettings

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"


@dataclass
class RecordingMetrics:
    events: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)

    def model_loaded(self, tier: str, seconds: float) -> None:
        self.events.append(("model_loaded", (tier, seconds)))

    def first_token(self, seconds: float) -> None:
        self.events.append(("first_token", (seconds,)))

    def tokens_generated(self, n: int) -> None:
        self.events.append(("tokens_generated", (n,)))

    def prompt_tokens(self, n: int) -> None:
        self.events.append(("prompt_tokens", (n,)))


def s(text: str) -> np.ndarray:
    return np.array([text.encode()], dtype=np.object_)


def run(
    rt: Runtime | RemoteRuntime, inputs: dict[str, np.ndarray], params: str = "", **kw: bool
) -> RecordingSink:
    sink = RecordingSink(**kw)
    rt.submit(parse_request(inputs, params), sink)
    assert sink.done.wait(60), "no final response within 60 s"
    time.sleep(0.05)  # a second final response would arrive now
    assert sink.finals == 1
    return sink


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead: read its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="wseh-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("eh") / "tiny", "llama")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, short_dir: Path) -> Iterator[EngineHost]:
    work = tmp_path_factory.mktemp("host")
    sock_dir = short_dir
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    h = EngineHost(sock_dir / "engines.sock", env=env, log_path=work / "engine-host.log").start()
    try:
        h.wait_ready(120)
        yield h
    finally:
        h.stop()


@pytest.fixture
def remote(host: EngineHost, checkpoint: Path) -> Iterator[RemoteRuntime]:
    rt = RemoteRuntime.connect(
        host.socket_path,
        ModelSettings(checkpoint=str(checkpoint), engine="torch", max_batch=4),
        model_name="m",
    )
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture(scope="module")
def local(checkpoint: Path) -> Iterator[Runtime]:
    rt = Runtime.load(ModelSettings(checkpoint=str(checkpoint), engine="torch", max_batch=4))
    try:
        yield rt
    finally:
        rt.close()


@pytest.mark.parametrize(
    "params",
    ['{"max_tokens": 12}', '{"max_tokens": 12, "temperature": 0.9, "top_p": 0.8, "seed": 7}'],
    ids=["greedy", "seeded"],
)
def test_engine_process_streams_exactly_what_an_in_process_runtime_generates(
    remote: RemoteRuntime, local: Runtime, params: str
) -> None:
    inputs = {"text_input": s(PROMPT), "stream": np.array([True])}
    there, here = run(remote, inputs, params), run(local, inputs, params)
    assert there.ids == here.ids and len(there.ids) == 12
    assert there.texts == here.texts and there.finish_reason == here.finish_reason == "length"
    whole = run(remote, {"text_input": s(PROMPT)}, params)
    assert whole.ids == here.ids and whole.texts == [PROMPT + "".join(here.texts)]


def test_engine_process_reports_load_and_generation_metrics_to_the_stub(
    host: EngineHost, checkpoint: Path
) -> None:
    metrics = RecordingMetrics()
    rt = RemoteRuntime.connect(
        host.socket_path,
        ModelSettings(checkpoint=str(checkpoint), engine="torch"),
        model_name="m",
        metrics=metrics,
    )
    try:
        run(rt, {"text_input": s(PROMPT)}, '{"max_tokens": 5}')
    finally:
        rt.close()
    names = [name for name, _ in metrics.events]
    assert names[0] == "model_loaded" and metrics.events[0][1][0] == "disk"
    assert "first_token" in names and ("tokens_generated", (5,)) in metrics.events


def test_bad_request_gets_invalid_arg_and_the_engine_process_keeps_serving(remote: RemoteRuntime) -> None:
    bad = run(remote, {"text_input": s("x" * 600)})  # longer than the tiny model's context
    assert bad.error is not None and bad.error[0] == "INVALID_ARG" and "prompt" in bad.error[1].lower()
    good = run(remote, {"text_input": s(PROMPT)}, '{"max_tokens": 3}')
    assert good.error is None and len(good.ids) == 3


def test_cancellation_reaches_the_engine_process(remote: RemoteRuntime) -> None:
    sink = RecordingSink()
    remote.submit(
        parse_request({"text_input": s(PROMPT), "stream": np.array([True])}, '{"max_tokens": 400}'), sink
    )
    deadline = time.monotonic() + 30
    while not sink.ids and time.monotonic() < deadline:
        time.sleep(0.01)
    sink.cancelled = True
    assert sink.done.wait(10), "a cancelled request must end promptly"
    assert sink.error is not None and sink.error[0] == "CANCELLED"
    assert 0 < len(sink.ids) < 400


def test_missing_checkpoint_fails_the_load_with_the_engine_processs_reason(
    host: EngineHost, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadFailed, match=r"model 'gone'.*CheckpointNotFound"):
        RemoteRuntime.connect(
            host.socket_path,
            ModelSettings(checkpoint=str(tmp_path / "nope"), engine="torch"),
            model_name="gone",
        )
    assert host.is_alive()


def test_killed_engine_process_ends_live_and_later_requests_with_unavailable(
    host: EngineHost, checkpoint: Path
) -> None:
    rt = RemoteRuntime.connect(
        host.socket_path, ModelSettings(checkpoint=str(checkpoint), engine="torch"), model_name="victim"
    )
    try:
        sink = RecordingSink()
        rt.submit(
            parse_request({"text_input": s(PROMPT), "stream": np.array([True])}, '{"max_tokens": 400}'), sink
        )
        while not sink.ids:
            time.sleep(0.01)
        os.kill(rt.pid, signal.SIGKILL)
        assert sink.done.wait(10)
        assert sink.error is not None and sink.error[0] == "UNAVAILABLE" and "reload" in sink.error[1]
        later = run(rt, {"text_input": s(PROMPT)})
        assert later.error is not None and later.error[0] == "UNAVAILABLE"
    finally:
        rt.close()
    assert host.is_alive()


def test_closing_a_remote_runtime_ends_its_engine_process(host: EngineHost, checkpoint: Path) -> None:
    rt = RemoteRuntime.connect(
        host.socket_path, ModelSettings(checkpoint=str(checkpoint), engine="torch"), model_name="short"
    )
    pid = rt.pid
    assert pid_alive(pid)
    rt.close()
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid)


def test_stopping_the_host_stops_its_engine_processes(
    tmp_path: Path, checkpoint: Path, short_dir: Path
) -> None:
    h = EngineHost(
        short_dir / "e.sock", env={**os.environ, "OMP_NUM_THREADS": "1"}, log_path=tmp_path / "log"
    )
    h.start().wait_ready(120)
    rt = RemoteRuntime.connect(
        h.socket_path, ModelSettings(checkpoint=str(checkpoint), engine="torch"), model_name="m"
    )
    try:
        assert pid_alive(rt.pid)
        h.stop()
        assert not h.socket_path.exists()
        deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
        while pid_alive(rt.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pid_alive(rt.pid)
    finally:
        rt.close()
        h.stop()


def test_stale_socket_is_reported_unavailable_at_once(short_dir: Path) -> None:
    path = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # bound, never listening: what a crashed host leaves behind
        t0 = time.monotonic()
        with pytest.raises(EngineHostUnavailable, match="cannot connect"):
            RemoteRuntime.connect(
                path, ModelSettings(checkpoint="x", engine="torch"), model_name="m", wait_s=30
            )
        assert time.monotonic() - t0 < 5


def test_tokenizer_offered_by_an_engine_process_is_reused_by_the_next_one(tmp_path: Path) -> None:
    cache = _TokenizerCache(tmp_path, capacity=1)
    text = byte_tokenizer_json()
    first = cache.parse(text)  # in an engine process: parsed there, offered to the host
    assert list(tmp_path.glob("*.json"))
    cache.absorb()  # in the host, between connections
    assert not list(tmp_path.glob("*.json"))
    assert cache.parse(text) is not first  # the host's own copy, inherited at the next fork
    assert cache.parse(text) is cache.parse(text)
    changed = text + " "  # the same tokenizer, different bytes
    assert cache.parse(changed) is not cache.parse(text)  # keyed by content
