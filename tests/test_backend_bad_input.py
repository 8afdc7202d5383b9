"""The warmstart backend's request parsing: numbers sent as strings (as the vLLM backend reads them), two
prompts in one request, and JSON that ``json.loads`` alone lets through (deep nesting, lone surrogates).

Unit tests of :mod:`warmstart.backend.request`, then the same through a real tritonserver.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from backend_support import (
    StreamResult,
    grpc_generate,
    grpc_generate_many,
    grpc_inputs,
    http_generate_stream,
    iter_ids,
    make_tiny_checkpoint,
    write_model,
)

from warmstart.backend.request import (
    BadInput,
    InvalidParametersJSON,
    error_code,
    is_release_request,
    parse_request,
)
from warmstart.engines import InvalidSamplingParams, SamplingParams
from warmstart.triton import TritonConfig, TritonServer

PROMPT = "Once upon a time"


def s(text: str) -> np.ndarray:
    return np.array([text.encode("utf-8", errors="surrogatepass")], dtype=np.object_)


# ------------------------------------------------------------------------------------------------- units


def test_sampling_values_sent_as_numeric_strings_are_read_as_numbers() -> None:
    sampling = {"max_tokens": "5", "temperature": "0.5", "top_p": "0.9", "top_k": " 7 ", "seed": "3"}
    expected = SamplingParams(max_tokens=5, temperature=0.5, top_p=0.9, top_k=7, seed=3)
    assert parse_request({"text_input": s("Hi"), "sampling_parameters": s(json.dumps(sampling))}).params == (
        expected
    )
    # request parameters (Triton's HTTP generate passes top-level JSON keys that way) too
    assert parse_request({"text_input": s("Hi")}, json.dumps(sampling)).params == expected
    assert parse_request({"text_input": s("Hi")}, '{"temperature": "1e-1"}').params.temperature == 0.1


@pytest.mark.parametrize(
    ("sampling", "key"),
    [
        ({"temperature": "warm"}, "temperature"),
        ({"max_tokens": "5.5"}, "max_tokens"),
        ({"seed": "0x10"}, "seed"),
        ({"top_p": "nan"}, "top_p"),
        ({"top_k": "1_000"}, "top_k"),
    ],
)
def test_non_numeric_strings_are_refused_naming_the_key(sampling: dict[str, Any], key: str) -> None:
    with pytest.raises(InvalidSamplingParams, match=f"^{key} in sampling_parameters must be") as e:
        parse_request({"text_input": s("Hi"), "sampling_parameters": s(json.dumps(sampling))})
    assert error_code(e.value) == "INVALID_ARG"


def test_text_input_with_two_elements_is_refused() -> None:
    for arr in (np.array([b"a", b"b"], dtype=np.object_), np.array([[b"a"], [b"b"]], dtype=np.object_)):
        with pytest.raises(BadInput, match=r"exactly one element.*one request per prompt") as e:
            parse_request({"text_input": arr})
        assert error_code(e.value) == "INVALID_ARG"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 5000 + "]" * 5000, "nested deeper than"),
        ('{"stop": "\\ud800"}', "lone surrogate"),
        ('{"temperature": NaN}', "finite number"),
    ],
)
def test_unsafe_sampling_json_is_invalid_arg(text: str, message: str) -> None:
    with pytest.raises(InvalidParametersJSON, match=message) as e:
        parse_request({"text_input": s("Hi"), "sampling_parameters": s(text)})
    assert error_code(e.value) == "INVALID_ARG"
    with pytest.raises(InvalidParametersJSON, match=message):
        parse_request({"text_input": s("Hi")}, text)


def test_a_deeply_nested_parameters_json_is_not_a_release() -> None:
    deep = '{"warmstart_release": true, "x": ' + "[" * 5000 + "]" * 5000 + "}"
    assert is_release_request(deep) is False  # and parse_request then reports it
    with pytest.raises(InvalidParametersJSON, match="nested deeper than"):
        parse_request({}, deep)


# ---------------------------------------------------------------------------------- through tritonserver


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("backend-bad-input")
    ckpt = make_tiny_checkpoint(root / "tiny_llama", "llama")
    repo = root / "repo"
    write_model(repo, "tiny", str(ckpt), "torch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # 2 shared cores: one compute thread
        srv = TritonServer(TritonConfig(model_repositories=(repo,)), workdir=root / "srv")
        srv.start()
    try:
        srv.load_model("tiny")
        yield srv
    finally:
        srv.stop()


def ok(r: StreamResult) -> StreamResult:
    assert r.error is None, r.error
    return r


@pytest.mark.triton
@pytest.mark.slow
def test_numeric_strings_are_served_like_numbers_over_grpc_and_http(server: TritonServer) -> None:
    numbers = {"max_tokens": 4, "temperature": 0.8, "top_k": 20, "seed": 5}
    strings = {k: str(v) for k, v in numbers.items()}
    expected = ok(grpc_generate(server.grpc_url, "tiny", PROMPT, params=numbers)).ids
    assert len(expected) == 4
    assert ok(grpc_generate(server.grpc_url, "tiny", PROMPT, params=strings)).ids == expected
    body = {"text_input": PROMPT, "parameters": {"stream": True, **strings}}
    status, events = http_generate_stream(server.http_url, "tiny", body)
    assert status == 200, events
    assert [t for e in events for t in iter_ids(e.get("token_ids"))] == expected
    r = grpc_generate(server.grpc_url, "tiny", PROMPT, params={"temperature": "warm"})
    assert r.error is not None and "temperature in sampling_parameters must be a number" in r.error, r.error


@pytest.mark.triton
@pytest.mark.slow
def test_two_prompts_in_one_request_are_refused_and_the_server_keeps_serving(server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    # the model config says text_input is [1], so Triton refuses two before the backend sees them; a config
    # that allowed more would meet parse_request's refusal (test_text_input_with_two_elements_is_refused)
    two = grpcclient.InferInput("text_input", [2], "BYTES")
    two.set_data_from_numpy(np.array([PROMPT.encode(), b"second"], dtype=np.object_))
    inputs = [two, *grpc_inputs(params={"max_tokens": 2})]
    r = grpc_generate_many(server.grpc_url, "tiny", [inputs])[0]
    assert r.error is not None and "unexpected shape for input 'text_input'" in r.error, r.error
    assert r.ids == []
    assert len(ok(grpc_generate(server.grpc_url, "tiny", PROMPT, params={"max_tokens": 2})).ids) == 2
