"""TritonServer against a real tritonserver 2.51 (CPU): start, health, repository API, streaming, stop."""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import subprocess
import sys
import sysconfig
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import warmstart.triton as triton_mod
from warmstart._process import group_members, listening_addresses, pid_running
from warmstart.triton import (
    InvalidModelName,
    ModelLoadError,
    TritonConfig,
    TritonConfigError,
    TritonServer,
    TritonStartError,
    prepare_backend_dir,
    triton_env,
    validate_model_name,
)

MODEL = "echo_stream"
API_KEY = "test-repo-key-0123"

MODEL_PY = textwrap.dedent(
    '''
    import json

    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        """Decoupled: for text_input t sends max_tokens responses "t-0", "t-1", ..., the last one FINAL."""

        def execute(self, requests):
            for request in requests:
                sender = request.get_response_sender()
                text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
                n = int(json.loads(request.parameters() or "{}").get("max_tokens", 3))
                for i in range(n):
                    out = pb_utils.Tensor("text_output", np.array([text + b"-%d" % i], dtype=np.object_))
                    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if i == n - 1 else 0
                    sender.send(pb_utils.InferenceResponse([out]), flags=final)
            return None
    '''
)

# Full config: auto-complete is off, so inputs, outputs and the decoupled policy must all be spelled out.
MODEL_CONFIG: dict[str, Any] = {
    "name": MODEL,
    "backend": "python",
    "max_batch_size": 0,
    "model_transaction_policy": {"decoupled": True},
    "input": [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]}],
    "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]}],
    "instance_group": [{"kind": "KIND_CPU", "count": 1}],
}

CONFIG_PBTXT = textwrap.dedent(
    f"""
    name: "{MODEL}"
    backend: "python"
    max_batch_size: 0
    model_transaction_policy {{ decoupled: true }}
    input [ {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }} ]
    output [ {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }} ]
    instance_group [ {{ kind: KIND_CPU count: 1 }} ]
    """
)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / MODEL / "1").mkdir(parents=True)
    (root / MODEL / "config.pbtxt").write_text(CONFIG_PBTXT)
    (root / MODEL / "1" / "model.py").write_text(MODEL_PY)
    return root


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # gRPC listens on ::ffff:127.0.0.1
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


def _http(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _grpc_stream(server: TritonServer, text: bytes, max_tokens: int) -> list[bytes]:
    import tritonclient.grpc as grpcclient

    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        inp = grpcclient.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([text], dtype=np.object_))
        client.async_stream_infer(
            MODEL,
            [inp],
            request_id="r1",
            parameters={"max_tokens": max_tokens},
            enable_empty_final_response=True,
        )
        tokens = []
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            out = result.as_numpy("text_output")
            if out is not None:
                tokens.extend(bytes(x) for x in out.reshape(-1))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return tokens
    finally:
        client.stop_stream()
        client.close()


def _http_generate_stream(server: TritonServer, text: str, max_tokens: int) -> list[str]:
    body = json.dumps({"text_input": text, "parameters": {"max_tokens": max_tokens}}).encode()
    status, raw = _http(
        f"http://{server.http_url}/v2/models/{MODEL}/generate_stream",
        data=body,
        headers={"Content-Type": "application/json", "Connection": "close"},
    )
    assert status == 200, raw
    events = [
        json.loads(line[len("data: ") :]) for line in raw.decode().splitlines() if line.startswith("data: ")
    ]
    return [e["text_output"] for e in events]


# --- config (no server) --------------------------------------------------------------------------------


def test_config_to_argv_renders_safe_defaults_when_ports_are_concrete(tmp_path: Path) -> None:
    cfg = TritonConfig(
        model_repositories=(tmp_path,),
        backend_directory=tmp_path / "b",
        http_port=1001,
        grpc_port=1002,
        metrics_port=1003,
        repository_api_key=API_KEY,
        load_models=("m1",),
    )
    argv = cfg.to_argv("/bin/tritonserver")
    for flag in (
        "--model-control-mode=explicit",
        "--disable-auto-complete-config",
        "--strict-readiness=false",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        "--load-model=m1",
        f"--http-restricted-api=model-repository,shared-memory,logging,trace:x-warmstart-repo-key={API_KEY}",
        f"--grpc-restricted-protocol=model-repository,shared-memory,logging,trace:x-warmstart-repo-key={API_KEY}",
    ):
        assert flag in argv
    assert API_KEY not in repr(cfg)


@pytest.mark.parametrize(
    "fields",
    [
        {"http_port": 70000},
        {"http_port": 5, "grpc_port": 5},
        {"strict_readiness": "false"},
        {"load_models": ("../outside",)},
        {"repository_api_key": "short"},
        {"repository_api_header": "Bad Header"},
        {"bind_address": "127.0.0.1 --foo"},
    ],
)
def test_config_rejects_invalid_fields(tmp_path: Path, fields: dict[str, Any]) -> None:
    with pytest.raises(TritonConfigError):
        TritonConfig(model_repositories=(tmp_path,), **fields)


def test_config_from_dict_rejects_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(TritonConfigError, match="unknown TritonConfig keys: grpc_addr"):
        TritonConfig.from_dict({"model_repositories": [str(tmp_path)], "grpc_addr": "0.0.0.0"})


@pytest.mark.parametrize(
    "name", ["../outside", "..", "a/b", "a..b", ".hidden", "", "x" * 129, "a\x00b", "-x"]
)
def test_validate_model_name_raises_for_unsafe_names(name: str) -> None:
    with pytest.raises(InvalidModelName):
        validate_model_name(name)


@pytest.mark.parametrize("name", ["m", "llama-3.1_8B", "A0", "x" * 128])
def test_validate_model_name_accepts_allow_listed_names(name: str) -> None:
    assert validate_model_name(name) == name


# --- real server ---------------------------------------------------------------------------------------


@pytest.mark.triton
def test_server_answers_live_and_ready_on_loopback_only(
    triton_server_factory: Callable[..., TritonServer],
) -> None:
    server = triton_server_factory()
    assert _http(f"http://{server.http_url}/v2/health/live")[0] == 200
    assert _http(f"http://{server.http_url}/v2/health/ready")[0] == 200
    assert server.pid is not None
    wanted = {server.config.http_port, server.config.grpc_port, server.config.metrics_port}
    deadline = time.monotonic() + 15  # HTTP answers first; the other listeners may open a moment later
    while True:
        addresses = listening_addresses(server.pid)
        ports = {port for _, port in addresses}
        if wanted <= ports or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert wanted <= ports
    assert all(_is_loopback(ip) for ip, _ in addresses), addresses


@pytest.mark.triton
def test_decoupled_model_streams_over_grpc_and_http_then_unloads(
    triton_server_factory: Callable[..., TritonServer], repo: Path
) -> None:
    server = triton_server_factory(repo)
    server.load_model(MODEL, config=MODEL_CONFIG)
    assert _http(f"http://{server.http_url}/v2/models/{MODEL}/ready")[0] == 200

    assert _grpc_stream(server, b"hi", 4) == [b"hi-0", b"hi-1", b"hi-2", b"hi-3"]
    assert _http_generate_stream(server, "yo", 3) == ["yo-0", "yo-1", "yo-2"]

    server.unload_model(MODEL, wait=True)
    state = {m["name"]: m.get("state") for m in server.repository_index()}
    assert state[MODEL] == "UNAVAILABLE"
    assert _http(f"http://{server.http_url}/v2/models/{MODEL}/ready")[0] != 200


@pytest.mark.triton
def test_server_that_dies_during_start_up_is_started_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = triton_mod.tritonserver_binary()
    marker = tmp_path / "first-start"
    flaky = tmp_path / "tritonserver"
    flaky.write_text(
        f'#!/bin/sh\nif [ ! -e "{marker}" ]; then : > "{marker}"; exit 1; fi\nexec "{real}" "$@"\n'
    )
    flaky.chmod(0o755)
    monkeypatch.setattr(triton_mod, "tritonserver_binary", lambda: flaky)
    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(
        TritonConfig(model_repositories=(repo,)), workdir=tmp_path / "srv", engine_host=False
    )
    try:
        server.start()
        assert marker.exists()  # the first start died
        assert _http(f"http://{server.http_url}/v2/health/live")[0] == 200
    finally:
        server.stop()
    assert server.pid is None or not pid_running(server.pid)


@pytest.mark.triton
def test_stop_leaves_no_server_or_stub_process(
    triton_server_factory: Callable[..., TritonServer], repo: Path
) -> None:
    server = triton_server_factory(repo, load_models=(MODEL,))
    assert server.pid is not None
    pid = server.pid
    deadline = time.monotonic() + 30
    while len(group_members(pid)) < 2 and time.monotonic() < deadline:  # server + the model's stub
        time.sleep(0.05)
    members = group_members(pid)
    assert pid in members and len(members) >= 2, members

    server.stop()
    server.stop()  # idempotent

    assert not server.is_alive()
    assert [p for p in members if pid_running(p)] == []


@pytest.mark.triton
def test_repository_api_requires_the_key(
    triton_server_factory: Callable[..., TritonServer], repo: Path
) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = triton_server_factory(repo, repository_api_key=API_KEY)
    index_url = f"http://{server.http_url}/v2/repository/index"
    load_url = f"http://{server.http_url}/v2/repository/models/{MODEL}/load"

    assert _http(index_url, data=b"{}")[0] == 403
    assert _http(load_url, data=b"{}")[0] == 403
    assert _http(index_url, data=b"{}", headers={"x-warmstart-repo-key": "wrong-key-0000"})[0] == 403
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.load_model(MODEL)
        assert client.is_server_live()  # health stays open
    finally:
        client.close()

    status, body = _http(index_url, data=b"{}", headers=server.repository_headers)
    assert status == 200 and json.loads(body) == [{"name": MODEL}]
    server.load_model(MODEL)
    assert _http(f"http://{server.http_url}/v2/models/{MODEL}/ready")[0] == 200
    server.unload_model(MODEL)


@pytest.mark.triton
def test_load_model_rejects_traversal_name_before_reaching_triton(
    triton_server_factory: Callable[..., TritonServer], tmp_path: Path, repo: Path
) -> None:
    # tritonserver 2.51 itself would load "../outside" from beside the repository: the owner class refuses.
    outside = repo.parent / "outside"
    (outside / "1").mkdir(parents=True)
    (outside / "config.pbtxt").write_text(CONFIG_PBTXT.replace(MODEL, "outside"))
    (outside / "1" / "model.py").write_text(MODEL_PY)
    server = triton_server_factory(repo)

    with pytest.raises(InvalidModelName, match="outside"):
        server.load_model("../outside")
    with pytest.raises(InvalidModelName):
        server.unload_model("../outside")
    assert all(m.get("state") != "READY" for m in server.repository_index())


@pytest.mark.triton
def test_load_model_raises_with_reason_when_model_is_missing(
    triton_server_factory: Callable[..., TritonServer],
) -> None:
    server = triton_server_factory()
    with pytest.raises(ModelLoadError, match="no_such_model"):
        server.load_model("no_such_model")
    assert _http(f"http://{server.http_url}/v2/health/ready")[0] == 200  # strict readiness is off


@pytest.mark.triton
def test_start_raises_with_log_tail_when_server_exits(tmp_path: Path) -> None:
    repo = tmp_path / "empty"
    repo.mkdir()
    server = TritonServer(
        TritonConfig(model_repositories=(repo,), load_models=("missing",)), workdir=tmp_path / "w"
    )
    with pytest.raises(TritonStartError, match="missing"):
        server.start(timeout=60)
    assert server.pid is not None and not pid_running(server.pid)
    assert (tmp_path / "w" / "tritonserver.log").exists()


def test_prepare_backend_dir_copies_python_backend_and_warmstart_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_backend = tmp_path / "src" / "triton_backend"
    fake_backend.mkdir(parents=True)
    (fake_backend / "model.py").write_text("# model\n")
    (fake_backend / "request.py").write_text("# helper\n")
    monkeypatch.setattr(triton_mod, "_WARMSTART_BACKEND_SRC", fake_backend)

    dest = prepare_backend_dir(tmp_path / "backends")

    python_dir = dest / "python"
    assert sorted(p.name for p in python_dir.iterdir()) == [
        "libtriton_python.so",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]
    assert os.access(python_dir / "triton_python_backend_stub", os.X_OK)
    assert sorted(p.name for p in (dest / "warmstart").iterdir()) == ["model.py", "request.py"]


def test_triton_env_puts_venv_bin_first_and_both_library_dirs() -> None:
    env = triton_env({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[0].endswith("nvidia_pytriton.libs")
    assert str(sysconfig.get_config_var("LIBDIR")) in libs
    assert libs[-1] == "/opt/lib"


@pytest.mark.triton
def test_server_dies_when_the_starting_process_is_killed(tmp_path: Path, repo: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from warmstart.triton import TritonConfig, TritonServer
        s = TritonServer(TritonConfig(model_repositories=({str(repo)!r},), load_models=({MODEL!r},)),
                         workdir={str(tmp_path / "w")!r}).start()
        print(s.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), line
        pid = int(line)
        members = group_members(pid)
        assert pid in members
        parent.kill()  # SIGKILL: no finally, no atexit; only PR_SET_PDEATHSIG can take the server down
        parent.wait()
        deadline = time.monotonic() + 10
        while any(pid_running(p) for p in members) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in members if pid_running(p)] == []
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.triton
@pytest.mark.slow
def test_stop_removes_the_shared_memory_of_stubs_killed_at_the_exit_timeout(
    triton_server_factory: Callable[..., TritonServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from backend_support import grpc_generate, make_tiny_checkpoint, write_model

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    repo = tmp_path / "stub-repo"
    write_model(repo, "tiny", str(make_tiny_checkpoint(tmp_path / "tiny", "llama")), "torch")
    server = triton_server_factory(repo, exit_timeout_secs=0)
    server.load_model("tiny")
    regions = triton_mod._stub_shm_regions(server.pid)
    assert len(regions) == 1 and (Path("/dev/shm") / regions[0]).exists()
    busy = threading.Thread(
        target=grpc_generate,
        args=(server.grpc_url, "tiny", "Once upon"),
        kwargs={"params": {"max_tokens": 2000}},
    )
    busy.start()
    time.sleep(1.0)  # a generation in flight: tritonserver gives up on the stub at its exit timeout
    server.stop()
    busy.join(30)
    assert not (Path("/dev/shm") / regions[0]).exists()


def test_orphaned_stub_regions_are_those_no_process_maps(tmp_path: Path) -> None:
    import mmap
    import uuid

    def region(kind: str) -> Path:
        path = tmp_path / f"triton_{kind}_backend_shm_region_{uuid.uuid4()}"
        path.write_bytes(b"\0" * 4096)
        return path

    orphan, in_use, young = region("python"), region("warmstart"), region("python")
    (tmp_path / "unrelated_file").write_bytes(b"x")
    old = time.time() - 60
    for path in (orphan, in_use, tmp_path / "unrelated_file"):
        os.utime(path, (old, old))
    with open(in_use, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ):
        assert triton_mod._orphaned_stub_regions(tmp_path) == [orphan]
    assert young.exists()
