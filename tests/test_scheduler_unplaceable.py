"""No silent hangs: the scheduler against real tritonservers answers at once, with the reason, a request
that no server can ever take (its model is in no server's repository, or larger than every memory
budget), places a model only where a repository has it, makes a fresh node store's models placeable
before it measured its remote tier, and logs every placement decision with its estimate.

Models are the fake decoupled Python model of ``_scheduler_fake``; node stores are the HTTP stand-in."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _scheduler_cluster import REPO_KEY, BackgroundScheduler, FakeNodeStore, scheduler_config
from _scheduler_fake import expected_text, fake_triton_config, write_fake_repository

from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MIB = 1 << 20


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # server 0's repository has u1 and u2; server 1's has u1 and u3; "ghost" is in neither
    root = tmp_path_factory.mktemp("unplaceable-repos")
    return write_fake_repository(root / "r0", ["u1", "u2"]), write_fake_repository(root / "r1", ["u1", "u3"])


@pytest.fixture(scope="module")
def tritons(
    repos: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[TritonServer]]:
    work = tmp_path_factory.mktemp("unplaceable-tritons")
    servers: list[TritonServer] = []
    try:
        for i, repo in enumerate(repos):
            t = TritonServer(
                TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY), workdir=work / f"t{i}"
            )
            servers.append(t)
            t.start()
        yield servers
    finally:
        for t in servers:
            t.stop(timeout=5.0)


@pytest.fixture
def make_scheduler() -> Iterator[Any]:
    made: list[BackgroundScheduler] = []
    stores: list[FakeNodeStore] = []

    def make(
        servers: list[dict[str, Any]], models: dict[str, dict[str, Any]], **extra: Any
    ) -> BackgroundScheduler:
        s = BackgroundScheduler(scheduler_config(servers, models, **extra))
        made.append(s)
        return s

    make.stores = stores  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for s in made:
            s.close()
        for st in stores:
            st.close()


def entry(name: str, triton: TritonServer, store: FakeNodeStore | None = None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "grpc": triton.grpc_url, "repository_api_key": REPO_KEY, **kw}
    if store is not None:
        out["node_store"] = store.url
    else:
        out["bandwidth"] = {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8}
    return out


def model(name: str, size_bytes: int = MIB) -> dict[str, Any]:
    return {
        "checkpoint": f"s3://models/{name}",
        "size_bytes": size_bytes,
        "triton_config": fake_triton_config(name, token_delay_s=0.002),
    }


def _post(url: str, body: Any) -> tuple[int, str]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _generate(sched: BackgroundScheduler, name: str, prompt: str = "hi") -> tuple[int, str]:
    return _post(
        f"{sched.http}/v2/models/{name}/generate", {"text_input": prompt, "parameters": {"max_tokens": 3}}
    )


def _grpc_error(sched: BackgroundScheduler, name: str) -> str | None:
    """The error message of one streamed gRPC generation (None if it succeeded)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(sched.grpc)
    results: queue.Queue[Any] = queue.Queue()
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        inp = grpcclient.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
        sp = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        sp.set_data_from_numpy(np.array([json.dumps({"max_tokens": 3}).encode()], dtype=np.object_))
        client.async_stream_infer(name, [inp, sp], request_id="r1")
        _, error = results.get(timeout=120)
        client.stop_stream()
        return None if error is None else str(error)
    finally:
        client.close()


def _unload(tritons: list[TritonServer], names: list[str]) -> None:
    for t in tritons:
        for name in names:
            req = urllib.request.Request(
                f"http://{t.http_url}/v2/repository/models/{name}/unload",
                data=b"{}",
                method="POST",
                headers={"Content-Type": "application/json", **t.repository_headers},
            )
            with contextlib.suppress(urllib.error.HTTPError):  # not loaded there
                urllib.request.urlopen(req, timeout=30).close()


def test_model_in_no_servers_repository_is_a_404_at_once_over_http_openai_and_grpc(
    tritons: list[TritonServer], repos: tuple[Path, Path], make_scheduler: Any
) -> None:
    sched = make_scheduler(
        [entry("s0", tritons[0]), entry("s1", tritons[1])],
        {"ghost": model("ghost")},
        cold_start_timeout_s=60.0,
    )
    try:
        status, body = _generate(sched, "ghost")
        assert status == 404, body
        message = json.loads(body)["error"]
        assert "no server's model repository has it" in message
        assert "s0: no 'ghost' in its model repository" in message and "s1: no 'ghost'" in message
        status, body = _post(
            f"{sched.http}/v1/completions", {"model": "ghost", "prompt": "hi", "max_tokens": 3}
        )
        assert status == 404 and "no server's model repository has it" in body, body
        error = _grpc_error(sched, "ghost")
        assert error is not None and "no server's model repository has it" in error
        stats = sched.state()["stats"]
        assert stats["loads"] == {} and stats["load_failures"] == 0  # refused without trying a load

        write_fake_repository(repos[1], ["ghost"])  # the operator adds it: the index is re-read, no stale 404
        status, body = _generate(sched, "ghost", "now")
        assert status == 200, body
        assert json.loads(body)["text_output"] == "now" + expected_text("now", 3)
        assert sched.state()["stats"]["loads"] == {"s1/ghost": 1}
    finally:
        _unload(tritons, ["ghost"])


def test_model_in_one_servers_repository_is_loaded_there_not_where_its_store_holds_it(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    stores = [
        FakeNodeStore({"u3": "memory"}),
        FakeNodeStore(),
    ]  # s0 holds u3 in memory, s1's repository has it
    make_scheduler.stores.extend(stores)
    sched = make_scheduler([entry(f"s{i}", tritons[i], stores[i]) for i in range(2)], {"u3": model("u3")})
    try:
        status, body = _generate(sched, "u3")
        assert status == 200, body
        stats = sched.state()["stats"]
        assert stats["loads"] == {"s1/u3": 1} and stats["load_failures"] == 0
    finally:
        _unload(tritons, ["u3"])


def test_model_larger_than_every_memory_budget_is_a_503_at_once_with_the_reason(
    tritons: list[TritonServer], make_scheduler: Any
) -> None:
    sched = make_scheduler(
        [entry(f"s{i}", tritons[i], memory_budget_bytes=MIB) for i in range(2)],
        {"u1": model("u1", size_bytes=4 * MIB)},
        cold_start_timeout_s=60.0,
    )
    reason = (
        "s0: memory budget 1048576 bytes is smaller than the model's size_bytes 4194304; s1: memory budget"
    )
    status, body = _generate(sched, "u1")
    assert status == 503, body
    assert "cannot be placed on any server" in body and reason in body
    status, body = _post(f"{sched.http}/v1/completions", {"model": "u1", "prompt": "hi", "max_tokens": 3})
    assert status == 503 and reason in body, body
    error = _grpc_error(sched, "u1")
    assert error is not None and reason in error
    assert sched.state()["stats"]["rejected_timeout"] == 0


def test_fresh_node_store_without_a_remote_figure_still_places_its_models_and_every_decision_is_logged(
    tritons: list[TritonServer], make_scheduler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # a store that has filled nothing yet reports remote_bps null; the config gives no bandwidth fallback
    store = FakeNodeStore(bandwidth={"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": None})
    make_scheduler.stores.append(store)
    caplog.set_level(logging.INFO, logger="warmstart.scheduler.router")
    sched = make_scheduler([entry("s0", tritons[0], store)], {"u2": model("u2")}, cold_start_timeout_s=60.0)
    try:
        status, body = _generate(sched, "u2", "first")
        assert status == 200, body
        status, body = _generate(sched, "u2", "second")
        assert status == 200, body
        first = [
            r.getMessage() for r in caplog.records if r.getMessage().startswith("placement of u2 for g1-")
        ]
        second = [
            r.getMessage() for r in caplog.records if r.getMessage().startswith("placement of u2 for g2-")
        ]
        # the first request: load (it starts the load), join it while it runs, then route to the instance
        assert [m.split(": ")[1].split(" ")[0] for m in first] == ["load", "join", "route"], first
        assert " load on s0 from remote: " in first[0] and "evicting nothing (penalty 0.00 s)" in first[0]
        assert "remote not measured yet there, assumed 100 MB/s; cold-start queue 0/256" in first[0]
        assert (
            len(second) == 1 and " route to s0: 0.00 s (wait 0.00 + load 0.00 + overhead 0.00)" in second[0]
        )
        assert all(
            r.levelno == logging.INFO for r in caplog.records if r.getMessage().startswith("placement")
        )
        assert sched.state()["stats"]["loads"] == {"s0/u2": 1}
    finally:
        _unload(tritons, ["u2"])
