"""The warmstart backend in a real tritonserver, with tiny random Llama checkpoints (both engines).

One server for the module; every model is loaded through the repository API as a test needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _triton_release import raw_release
from backend_support import (
    StreamResult,
    byte_tokenizer_json,
    grpc_generate,
    grpc_generate_many,
    grpc_inputs,
    http_generate_stream,
    iter_ids,
    make_tiny_checkpoint,
    write_model,
)

from warmstart.triton import ModelLoadError, TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]

ENGINES = ("torch", "jax")
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("backend")
    ckpt = make_tiny_checkpoint(root / "tiny_llama", "llama")
    qwen = make_tiny_checkpoint(root / "tiny_qwen2", "qwen2", seed=1)
    repo = root / "repo"
    for engine in ENGINES:
        write_model(repo, f"tiny_{engine}", str(ckpt), engine)
    write_model(repo, "qwen_jax", str(qwen), "jax")
    write_model(repo, "to_release", str(ckpt), "torch")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "index.json").write_text('{"format": "warmstart", "format_version": 1, "tensors": [')
    write_model(repo, "corrupt", str(corrupt), "torch")
    write_model(repo, "missing", str(root / "does-not-exist"), "torch")
    with pytest.MonkeyPatch.context() as mp:
        # 2 shared cores: one compute thread per engine avoids oversubscription (10x slower otherwise)
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("WARMSTART_MEMORY_CACHE", str(root / "memory-tier"))  # unloaded models stay in host memory
        mp.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        srv = TritonServer(
            TritonConfig(model_repositories=(repo,), repository_api_key="test-key-123"), workdir=root / "srv"
        )
        srv.start()
    try:
        srv.load_model("tiny_torch")
        srv.load_model("tiny_jax")
        yield srv
    finally:
        srv.stop()


def prompt_ids(text: str) -> list[int]:
    from tokenizers import Tokenizer

    return list(Tokenizer.from_str(byte_tokenizer_json()).encode(text).ids)


def ok(r: StreamResult) -> StreamResult:
    assert r.error is None, r.error
    return r


@pytest.mark.parametrize("engine", ENGINES)
def test_grpc_stream_sends_one_response_per_token_then_finish_reason(
    server: TritonServer, engine: str
) -> None:
    r = ok(grpc_generate(server.grpc_url, f"tiny_{engine}", PROMPT, params={"max_tokens": 12}))
    assert len(r.ids) == 12
    assert r.responses == 13  # 12 tokens + the final response carrying finish_reason
    assert r.finish_reason == "length"
    full = ok(
        grpc_generate(server.grpc_url, f"tiny_{engine}", PROMPT, stream=False, params={"max_tokens": 12})
    )
    assert full.ids == r.ids and full.responses == 1
    assert full.text.startswith(PROMPT)
    assert full.text == PROMPT + r.text


def test_engines_agree_greedily(server: TritonServer) -> None:
    torch_ids = ok(grpc_generate(server.grpc_url, "tiny_torch", PROMPT, params={"max_tokens": 16})).ids
    jax_ids = ok(grpc_generate(server.grpc_url, "tiny_jax", PROMPT, params={"max_tokens": 16})).ids
    assert torch_ids == jax_ids


@pytest.mark.parametrize("engine", ENGINES)
def test_http_generate_stream_and_generate(server: TritonServer, engine: str) -> None:
    model = f"tiny_{engine}"
    expected = ok(grpc_generate(server.grpc_url, model, PROMPT, params={"max_tokens": 8})).ids
    body = {"text_input": PROMPT, "parameters": {"stream": True, "max_tokens": 8, "temperature": 0}}
    status, events = http_generate_stream(server.http_url, model, body)
    assert status == 200, events
    assert all("error" not in e for e in events), events
    assert [t for e in events for t in iter_ids(e.get("token_ids"))] == expected
    assert events[-1]["finish_reason"] == "length"
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/generate",
        data=json.dumps({"text_input": PROMPT, "max_tokens": 8, "exclude_input_in_output": True}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())
    assert list(iter_ids(out["token_ids"])) == expected
    assert not out["text_output"].startswith(PROMPT)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "params", [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 7}]
)
def test_resume_with_input_ids_continues_token_exactly(
    server: TritonServer, engine: str, params: dict
) -> None:
    model = f"tiny_{engine}"
    params = {**params, "max_tokens": 20}
    whole = ok(grpc_generate(server.grpc_url, model, PROMPT, params=params))
    assert len(whole.ids) == 20
    # cut the stream after k tokens (the client goes away), then resume from what it received
    cut = grpc_generate_many(server.grpc_url, model, [grpc_inputs(PROMPT, params=params)], cancel_after=7)[0]
    k = len(cut.ids)
    assert 7 <= k < 20 and cut.ids == whole.ids[:k]
    resumed = ok(
        grpc_generate(
            server.grpc_url, model, input_ids=prompt_ids(PROMPT) + cut.ids, num_generated=k, params=params
        )
    )
    assert cut.ids + resumed.ids == whole.ids
    assert resumed.finish_reason == "length"


def test_qwen2_model_loads_and_streams(server: TritonServer) -> None:
    server.load_model("qwen_jax")
    try:
        r = ok(grpc_generate(server.grpc_url, "qwen_jax", PROMPT, params={"max_tokens": 5}))
        assert len(r.ids) == 5
        # a first load fills the memory tier from disk, and is labelled with where the bytes came from
        assert _metric(_metrics(server), 'warmstart_model_load_seconds{model="qwen_jax",tier="disk"') > 0
    finally:
        server.unload_model("qwen_jax")


@pytest.mark.parametrize("engine", ENGINES)
def test_concurrent_streams_are_correct_and_faster_than_serial(server: TritonServer, engine: str) -> None:
    model = f"tiny_{engine}"
    prompts = [f"{PROMPT} number {i}" for i in range(8)]
    params = {"max_tokens": 32}
    grpc_generate_many(
        server.grpc_url, model, [grpc_inputs(p, params=params) for p in prompts]
    )  # warm caches
    t0 = time.monotonic()
    serial = [ok(grpc_generate(server.grpc_url, model, p, params=params)) for p in prompts]
    serial_s = time.monotonic() - t0
    t0 = time.monotonic()
    concurrent = grpc_generate_many(server.grpc_url, model, [grpc_inputs(p, params=params) for p in prompts])
    concurrent_s = time.monotonic() - t0
    assert [ok(r).ids for r in concurrent] == [r.ids for r in serial]
    assert concurrent_s < 0.75 * serial_s, (concurrent_s, serial_s)


def test_cancelled_stream_stops_and_server_keeps_serving(server: TritonServer) -> None:
    counter = 'warmstart_generation_tokens_total{model="tiny_torch"'
    initial = _metric(_metrics(server), counter)
    r = grpc_generate_many(
        server.grpc_url, "tiny_torch", [grpc_inputs(PROMPT, params={"max_tokens": 400})], cancel_after=3
    )[0]
    assert r.error is not None and 3 <= len(r.ids) < 400
    time.sleep(1.0)  # tokens are counted when a request finishes, cancelled ones included
    stopped = _metric(_metrics(server), counter)
    time.sleep(1.0)
    assert _metric(_metrics(server), counter) == stopped  # nothing is generating any more
    assert 3 <= stopped - initial < 100  # it stopped soon after the client went away, not after 400 tokens
    assert len(ok(grpc_generate(server.grpc_url, "tiny_torch", PROMPT, params={"max_tokens": 4})).ids) == 4


def _metrics(server: TritonServer) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        return str(resp.read().decode())


def _metric(text: str, selector: str) -> float:
    """The value of the first sample named like ``selector`` (``name{label="v",...``) with all its labels."""
    name, _, labels = selector.partition("{")
    wanted = [lab for lab in labels.split(",") if lab]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in wanted):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {selector} in:\n{text}")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"raw_params": "{bad json"}, "not valid JSON"),
        ({"params": {"max_tokens": 4, "beam_width": 2}}, "unknown key"),
        ({"params": {"temperature": -1}}, "temperature"),
        ({"prompt": "x" * 600}, "prompt"),
        ({"prompt": ""}, "empty"),
        ({"prompt": None}, "text_input"),
        ({"prompt": None, "input_ids": [1, 2], "num_generated": 2}, "no prompt tokens"),
        ({"input_ids": [1, 100000]}, "token id"),
    ],
)
@pytest.mark.parametrize("engine", ENGINES)
def test_bad_input_gets_invalid_arg_error_and_server_keeps_serving(
    server: TritonServer, engine: str, kwargs: dict, message: str
) -> None:
    model = f"tiny_{engine}"
    kwargs = {"prompt": PROMPT, **kwargs}
    r = grpc_generate(server.grpc_url, model, kwargs.pop("prompt"), **kwargs)
    assert r.error is not None and message in r.error, r.error
    assert r.ids == []
    assert len(ok(grpc_generate(server.grpc_url, model, PROMPT, params={"max_tokens": 2})).ids) == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text_input": PROMPT, "sampling_parameters": "{bad json"}, "not valid JSON"),
        ({"text_input": PROMPT, "parameters": {"nope": 1}}, "unknown key"),
        ({"text_input": "x" * 600}, "prompt"),
        ({"text_input": ""}, "empty"),
    ],
)
def test_http_bad_input_is_invalid_arg(server: TritonServer, body: dict, message: str) -> None:
    body = {**body, "parameters": {"stream": True, **body.get("parameters", {})}}
    status, events = http_generate_stream(server.http_url, "tiny_torch", body)
    assert status == 400 and message in events[0]["error"], events  # Triton maps INVALID_ARG to 400


@pytest.mark.parametrize(
    ("model", "message"), [("corrupt", "MalformedIndex"), ("missing", "CheckpointNotFound")]
)
def test_bad_checkpoint_fails_only_its_own_model(server: TritonServer, model: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        server.load_model(model)
    assert len(ok(grpc_generate(server.grpc_url, "tiny_jax", PROMPT, params={"max_tokens": 3})).ids) == 3
    states = {m["name"]: m.get("state") for m in server.repository_index()}
    assert states[model] == "UNAVAILABLE" and states["tiny_jax"] == "READY"


def test_load_unload_load_again(server: TritonServer) -> None:
    before = ok(grpc_generate(server.grpc_url, "tiny_torch", PROMPT, params={"max_tokens": 6})).ids
    server.unload_model("tiny_torch")
    assert grpc_generate(server.grpc_url, "tiny_torch", PROMPT, params={"max_tokens": 2}).error is not None
    server.load_model("tiny_torch")
    assert ok(grpc_generate(server.grpc_url, "tiny_torch", PROMPT, params={"max_tokens": 6})).ids == before
    assert _metric(_metrics(server), 'warmstart_model_load_seconds{model="tiny_torch",tier="memory"') > 0


def test_release_frees_the_instance_and_the_model_unloads_itself_then_loads_again(
    server: TritonServer,
) -> None:
    """A release (the scheduler's, ahead of an eviction's unload) is refused while a generation runs; then
    the engine process has exited when it answers, later requests are refused, the model leaves READY with no
    unload sent (so a release whose unload fails cannot leave it READY but dead), an unload after it still
    succeeds, and the model loads and serves again."""
    from warmstart.scheduler.upstream import (
        GenerationRequest,
        ModelReleaseFailed,
        TritonUpstream,
        UpstreamModelMissing,
    )

    server.load_model("to_release")
    pids = re.findall(r"warmstart model to_release ready \(.*engine process (\d+)\)", server.logs())
    assert pids, "no engine process of 'to_release' in the log"
    engine = Path(f"/proc/{pids[-1]}")
    assert engine.exists()

    def gen(n: int) -> GenerationRequest:
        return GenerationRequest("to_release", f"r{n}", PROMPT, {"max_tokens": n})

    async def tokens(up: TritonUpstream, n: int) -> list[int]:
        out: list[int] = []
        async with contextlib.aclosing(up.generate(gen(n), idle_timeout_s=60.0)) as chunks:
            async for chunk in chunks:
                out.extend(chunk.token_ids)
        return out

    async def scenario() -> tuple[list[int], list[int], str, str]:
        up = _upstream(server)
        try:
            before = await tokens(up, 6)
            long = up.generate(gen(480), idle_timeout_s=60.0)
            first = await anext(long)  # a generation is in flight
            with pytest.raises(ModelReleaseFailed, match="in flight") as refused:
                await up.release("to_release", timeout_s=30.0)
            rest = [t for chunk in [first, *[c async for c in long]] for t in chunk.token_ids]
            await up.release("to_release", timeout_s=30.0)
            assert _exited(engine), "the engine process outlived the release's answer"
            refusal = r"released; it is being unloaded|unknown model"  # the unload may have started already
            with pytest.raises(UpstreamModelMissing, match=refusal) as missing:
                await tokens(up, 2)
            return before, rest, str(refused.value), str(missing.value)
        finally:
            await up.close()

    before, rest, refused, missing = asyncio.run(scenario())
    assert len(rest) == 480, (refused, missing)  # the refused release cut nothing
    deadline = time.monotonic() + 30
    while (state := _state(server, "to_release")) != "UNAVAILABLE":  # no unload was sent
        assert time.monotonic() < deadline, f"a released model stayed {state}"
        time.sleep(0.05)
    server.unload_model("to_release")
    assert {m["name"]: m.get("state") for m in server.repository_index()}["to_release"] == "UNAVAILABLE"
    server.load_model("to_release")
    try:
        again = ok(grpc_generate(server.grpc_url, "to_release", PROMPT, params={"max_tokens": 6}))
        assert again.ids == before
    finally:
        server.unload_model("to_release")


def _state(server: TritonServer, model: str) -> str | None:
    return {m["name"]: m.get("state") for m in server.repository_index()}.get(model)


@pytest.mark.parametrize(
    ("parameters", "why"),
    [
        ({"warmstart_release": True}, "no key"),
        ({"warmstart_release": True, "warmstart_release_key": "not-the-key"}, "a wrong key"),
    ],
)
def test_release_without_the_repository_key_is_refused_and_changes_nothing(
    server: TritonServer, parameters: dict[str, Any], why: str
) -> None:
    """Anyone can reach the inference port: a release must carry the server's repository key, else it is
    refused (INVALID_ARG, over gRPC and HTTP alike) and the model keeps serving from the same engine."""
    server.load_model("to_release")
    try:
        engines = re.findall(r"warmstart model to_release ready \(.*engine process (\d+)\)", server.logs())
        engine = Path(f"/proc/{engines[-1]}")
        answer = raw_release(server.grpc_url, "to_release", parameters)
        assert f"release refused ({why})" in answer and "warmstart_release_key" in answer, answer
        status, events = http_generate_stream(server.http_url, "to_release", {"parameters": parameters})
        assert status == 400 and f"release refused ({why})" in events[0]["error"], (status, events)
        assert not _exited(engine) and _state(server, "to_release") == "READY"
        served = ok(grpc_generate(server.grpc_url, "to_release", PROMPT, params={"max_tokens": 3}))
        assert len(served.ids) == 3
        key = {"warmstart_release_key": server.config.repository_api_key}
        assert raw_release(server.grpc_url, "to_release", {**parameters, **key}) == "finish_reason: released"
        assert _exited(engine)
    finally:
        server.unload_model("to_release")


def test_custom_metrics_are_reported(server: TritonServer) -> None:
    ok(grpc_generate(server.grpc_url, "tiny_jax", PROMPT, params={"max_tokens": 3}))
    text = _metrics(server)
    assert _metric(text, 'warmstart_model_load_seconds{model="tiny_jax",tier="') > 0
    assert _metric(text, 'warmstart_time_to_first_token_seconds_count{model="tiny_jax"') >= 1
    assert _metric(text, 'warmstart_generation_tokens_total{model="tiny_jax"') >= 3
    assert _metric(text, 'warmstart_prompt_tokens_total{model="tiny_jax"') >= len(PROMPT)


def test_full_config_via_repository_api_loads_a_model_not_in_the_repository(
    server: TritonServer, tmp_path: Path
) -> None:
    from warmstart.tritonconfig import model_config

    ckpt = Path(server.config.model_repositories[0]).parent / "tiny_llama"
    server.load_model(
        "via_api",
        config=model_config("via_api", str(ckpt), "torch", max_batch=2),
        files={"file:1/.keep": b""},
    )
    try:
        assert len(ok(grpc_generate(server.grpc_url, "via_api", PROMPT, params={"max_tokens": 3})).ids) == 3
    finally:
        server.unload_model("via_api")


def test_models_run_in_engine_processes_and_stubs_never_import_torch(server: TritonServer) -> None:
    ok(grpc_generate(server.grpc_url, "tiny_torch", PROMPT, params={"max_tokens": 2}))
    assert "tiny_torch ready (torch engine" in server.logs()
    assert "engine process" in server.logs()
    stubs = [
        p
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and _cmdline(p).split(" ")[0].endswith("/triton_python_backend_stub")
        and "tiny_torch" in _cmdline(p)
    ]
    assert stubs, "no stub process of tiny_torch found"
    for stub in stubs:
        maps = (stub / "maps").read_text()
        assert "libtorch" not in maps, "the stub of a warmstart model must stay a thin proxy"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_without_an_engine_host_models_run_inside_their_stubs(tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    repo = tmp_path / "repo"
    write_model(repo, "in_stub", str(ckpt), "torch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        srv = TritonServer(
            TritonConfig(model_repositories=(repo,), repository_api_key="test-key-123"),
            workdir=tmp_path / "srv",
            engine_host=False,
        )
        srv.start()
    try:
        srv.load_model("in_stub")
        assert len(ok(grpc_generate(srv.grpc_url, "in_stub", PROMPT, params={"max_tokens": 3})).ids) == 3
        assert "in_stub ready (torch engine" in srv.logs() and "in the stub" in srv.logs()
        asyncio.run(_release(srv, "in_stub"))  # the engine in the stub is dropped
        assert "released in" in srv.logs()
        error = str(grpc_generate(srv.grpc_url, "in_stub", PROMPT).error)
        assert "released; it is being unloaded" in error or "unknown model" in error, error
        srv.unload_model("in_stub")
        srv.load_model("in_stub")
        assert len(ok(grpc_generate(srv.grpc_url, "in_stub", PROMPT, params={"max_tokens": 3})).ids) == 3
    finally:
        srv.stop()


def _exited(proc: Path) -> bool:
    """Whether the process at ``/proc/<pid>`` is gone or a zombie (its memory released)."""
    try:
        return (proc / "stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def _upstream(server: TritonServer) -> Any:
    """The scheduler's client of ``server`` (make it inside the event loop that uses it)."""
    from warmstart.scheduler.config import BandwidthConfig, ServerConfig
    from warmstart.scheduler.upstream import TritonUpstream

    config = ServerConfig(
        name="s",
        grpc=server.grpc_url,
        repository_api_key=server.config.repository_api_key,
        bandwidth=BandwidthConfig(1e10, 1e9, None),
    )
    return TritonUpstream(config, timeout_s=10.0, retries=1)


async def _release(server: TritonServer, model: str) -> None:
    up = _upstream(server)
    try:
        await up.release(model, timeout_s=30.0)
    finally:
        await up.close()
