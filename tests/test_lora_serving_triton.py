"""LoRA adapters served by the warmstart backend in a real tritonserver (both engines).

Two PEFT adapters on a tiny random Llama, converted with `warmstart convert` (the second straight to the S3
store, SeaweedFS, as an ``s3://`` destination, and served from there), are listed in the model's
``multi_lora.json`` (with a corrupt one); the model has ``enable_lora``. Concurrent requests on both adapters
and the bare base each produce peft's greedy tokens; an unknown adapter name and ``lora_name`` on a model
without ``enable_lora`` are INVALID_ARG; the corrupt adapter fails only its own request; an adapter is added,
used and removed at run time with a ``warmstart_lora_reload`` request while the base stays loaded.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_support import (
    StreamResult,
    grpc_generate,
    grpc_generate_many,
    grpc_inputs,
    http_generate_stream,
    write_model,
)
from lora_support import LoraFixture, make_base_and_adapters, peft_greedy

from warmstart.format.convert import convert
from warmstart.objectstore import SeaweedFS
from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.s3, pytest.mark.slow]

ENGINES = ("torch", "jax")
PROMPT = [72, 101, 108, 108, 111, 32, 119]
N = 8


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> LoraFixture:
    return make_base_and_adapters(tmp_path_factory.mktemp("lora-triton"))


@pytest.fixture(scope="module")
def expected(fx: LoraFixture) -> dict[str | None, list[int]]:
    return {name: peft_greedy(fx.peft, name, PROMPT, N) for name in ("one", "two", None)}


@pytest.fixture(scope="module")
def server(
    fx: LoraFixture, tmp_path_factory: pytest.TempPathFactory, seaweedfs: SeaweedFS
) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("srv")
    remote_two = "s3://models/lora-triton/two"
    convert(fx.base.parent / "peft" / "two", remote_two)  # convert -> upload: served from the S3 store
    repo = root / "repo"
    corrupt = root / "corrupt-lora"
    corrupt.mkdir()
    (corrupt / "index.json").write_text('{"format": "warmstart", "format_version": 1, "tensors": [')
    for engine in ENGINES:
        name = f"lora_{engine}"
        write_model(
            repo, name, str(fx.base), engine, max_batch=4, enable_lora=True, max_loras=2, max_lora_rank=8
        )
        sources = {"one": str(fx.adapters["one"]), "two": remote_two, "bad": str(corrupt)}
        (repo / name / "multi_lora.json").write_text(json.dumps(sources))
    write_model(repo, "plain", str(fx.base), "torch", max_batch=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        srv = TritonServer(TritonConfig(model_repositories=(repo,)), workdir=root / "work")
        srv.start()
    try:
        for engine in ENGINES:
            srv.load_model(f"lora_{engine}")
        srv.load_model("plain")
        yield srv
    finally:
        srv.stop()


def _inputs(lora: str | None) -> list[Any]:
    params: dict[str, Any] = {"max_tokens": N}
    if lora is not None:
        params["lora_name"] = lora
    return grpc_inputs(input_ids=PROMPT, params=params)


def _control(url: str, model: str, parameters: dict[str, Any]) -> tuple[str | None, str, str]:
    """One input-less stream request with ``parameters``: (error, text_output, finish_reason)."""
    import tritonclient.grpc as grpcclient

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(model, [], request_id="control", parameters=parameters)
        result, error = answers.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    if error is not None:
        return str(error.message() if hasattr(error, "message") else error), "", ""
    text = result.as_numpy("text_output").reshape(-1)[0].decode()
    return None, text, result.as_numpy("finish_reason").reshape(-1)[0].decode()


def _http_body(lora: str) -> dict[str, Any]:
    """A generate_stream body naming ``lora`` as a request parameter (how HTTP clients send it)."""
    return {"text_input": "Hello", "parameters": {"stream": True, "max_tokens": 2, "lora_name": lora}}


def _ok(r: StreamResult) -> StreamResult:
    assert r.error is None, r.error
    return r


@pytest.mark.parametrize("engine", ENGINES)
def test_concurrent_requests_on_two_adapters_and_the_base_match_peft_greedy(
    server: TritonServer, expected: dict[str | None, list[int]], engine: str
) -> None:
    loras = ["one", None, "two", "one"]
    results = grpc_generate_many(server.grpc_url, f"lora_{engine}", [_inputs(name) for name in loras])
    for name, r in zip(loras, results, strict=True):
        assert _ok(r).ids == expected[name], (engine, name)
    assert expected["one"] != expected[None] and expected["two"] != expected[None]


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_adapter_is_invalid_arg_and_a_corrupt_one_fails_only_its_request(
    server: TritonServer, expected: dict[str | None, list[int]], engine: str
) -> None:
    model = f"lora_{engine}"
    unknown = grpc_generate(
        server.grpc_url, model, input_ids=PROMPT, params={"max_tokens": 2, "lora_name": "x"}
    )
    assert unknown.error is not None
    assert "unknown LoRA adapter 'x'" in unknown.error and "bad, one, two" in unknown.error
    status, events = http_generate_stream(server.http_url, model, _http_body("x"))
    assert status == 400 and "unknown LoRA adapter 'x'" in events[0]["error"]  # INVALID_ARG
    bad = grpc_generate(
        server.grpc_url, model, input_ids=PROMPT, params={"max_tokens": 2, "lora_name": "bad"}
    )
    assert bad.error is not None and "LoRA adapter 'bad'" in bad.error and "cannot be loaded" in bad.error
    status, events = http_generate_stream(server.http_url, model, _http_body("bad"))
    assert "MalformedIndex" in events[0]["error"]  # the cause: the adapter's index.json is broken
    after = grpc_generate_many(server.grpc_url, model, [_inputs("two"), _inputs(None)])
    assert [_ok(r).ids for r in after] == [expected["two"], expected[None]]


def test_lora_name_on_a_model_without_enable_lora_is_invalid_arg(server: TritonServer) -> None:
    r = grpc_generate(
        server.grpc_url, "plain", input_ids=PROMPT, params={"max_tokens": 2, "lora_name": "one"}
    )
    assert r.error is not None and "enable_lora" in r.error
    status, events = http_generate_stream(server.http_url, "plain", _http_body("one"))
    assert status == 400 and "serves no LoRA adapters" in events[0]["error"]  # INVALID_ARG
    error, _, _ = _control(server.grpc_url, "plain", {"warmstart_lora_reload": True})
    assert error is not None and "serves no LoRA adapters" in error


def test_an_adapter_is_added_used_and_removed_at_run_time(
    server: TritonServer, fx: LoraFixture, expected: dict[str | None, list[int]]
) -> None:
    model_dir = Path(server.config.model_repositories[0]) / "lora_torch"
    path = model_dir / "multi_lora.json"
    before = json.loads(path.read_text())
    try:
        path.write_text(json.dumps({**before, "three": str(fx.adapters["two"])}))
        error, text, reason = _control(server.grpc_url, "lora_torch", {"warmstart_lora_reload": True})
        assert error is None and reason == "adapters_reloaded"
        assert json.loads(text)["added"] == ["three"]
        three, base = grpc_generate_many(server.grpc_url, "lora_torch", [_inputs("three"), _inputs(None)])
        assert (_ok(three).ids, _ok(base).ids) == (expected["two"], expected[None])
        path.write_text(json.dumps(before))
        error, text, _ = _control(server.grpc_url, "lora_torch", {"warmstart_lora_reload": True})
        assert error is None and json.loads(text)["removed"] == ["three"]
        gone = grpc_generate(server.grpc_url, "lora_torch", input_ids=PROMPT, params={"lora_name": "three"})
        assert gone.error is not None and "unknown LoRA adapter 'three'" in gone.error
        assert (
            _ok(grpc_generate_many(server.grpc_url, "lora_torch", [_inputs("one")])[0]).ids == expected["one"]
        )
    finally:
        path.write_text(json.dumps(before))
