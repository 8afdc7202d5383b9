"""Bad input to the scheduler's front ends is a 4xx with a JSON error saying what is wrong (gRPC: an error
message that is not an "internal error"), never a 500 or a held connection, and the next good request works.

One real tritonserver with the fake model (``_scheduler_fake``) behind one scheduler for the module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from _bad_input_support import (
    MAX_TOKENS,
    add_input,
    bytes_tensor,
    http_request,
    infer_request,
    json_error,
    post_json,
    raw_exchange,
    response_text,
    response_tokens,
    start_scheduler,
    stream_infer,
    triton_with_fake_models,
)
from _scheduler_cluster import BackgroundScheduler
from _scheduler_fake import expected_text, expected_tokens

from warmstart.triton import TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MODELS = ["b0", "b1"]
GENERATE = "/v2/models/b0/generate"
STREAM = "/v2/models/b0/generate_stream"


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with triton_with_fake_models(tmp_path_factory.mktemp("bad-input"), MODELS) as server:
        yield server


@pytest.fixture(scope="module")
def sched(triton: TritonServer) -> Iterator[BackgroundScheduler]:
    s = start_scheduler(triton, MODELS)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def port(sched: BackgroundScheduler) -> int:
    return int(sched.service.http_port)


def assert_good_request_works(sched: BackgroundScheduler) -> None:
    status, body = post_json(
        sched.service.http_port, GENERATE, {"text_input": "ok", "parameters": {"max_tokens": 2}}
    )
    assert status == 200, body
    assert json.loads(body)["text_output"] == "ok" + expected_text("ok", 2)


# ----------------------------------------------------------------------------------------- sampling values


@pytest.mark.parametrize("max_tokens", [-1, 10**12])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        (GENERATE, {"text_input": "hi", "parameters": {}}),
        (STREAM, {"text_input": "hi", "parameters": {}}),
        ("/v1/completions", {"model": "b0", "prompt": "hi"}),
        ("/v1/chat/completions", {"model": "b0", "messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_out_of_range_max_tokens_is_a_400_naming_the_valid_range(
    sched: BackgroundScheduler, port: int, path: str, body: dict[str, Any], max_tokens: int
) -> None:
    body = json.loads(json.dumps(body))
    body.get("parameters", body)["max_tokens"] = max_tokens
    status, raw = post_json(port, path, body)
    assert status == 400, raw
    assert f"max_tokens must be in 0..{MAX_TOKENS}, got {max_tokens}" in json_error(status, raw)
    assert_good_request_works(sched)


@pytest.mark.parametrize("max_tokens", [-1, 10**12])
def test_out_of_range_max_tokens_over_grpc_is_an_invalid_argument_not_an_internal_error(
    sched: BackgroundScheduler, max_tokens: int
) -> None:
    bad = infer_request("b0", "hi", sampling={"max_tokens": max_tokens}, request_id="bad")
    good = infer_request("b0", "hi", sampling={"max_tokens": 2}, request_id="good")
    responses, code = sched.call(stream_infer(sched.grpc, [bad, good]))
    assert code.name == "OK"
    by_id = {r.infer_response.id: r for r in responses}
    message = by_id["bad"].error_message
    assert message == f"max_tokens must be in 0..{MAX_TOKENS}, got {max_tokens}", message
    assert not by_id["good"].error_message and response_tokens(by_id["good"]) == expected_tokens("hi", 2)


@pytest.mark.parametrize(
    ("sampling", "key"),
    [
        ({"temperature": "warm"}, "temperature"),
        ({"max_tokens": "1.5"}, "max_tokens"),
        ({"seed": "0x10"}, "seed"),
        ({"temperature": "nan"}, "temperature"),
        ({"top_p": "inf"}, "top_p"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stop": [1, 2]}, "stop"),
    ],
)
def test_sampling_values_that_are_not_numbers_are_a_400_naming_the_key(
    port: int, sampling: dict[str, Any], key: str
) -> None:
    body = {"text_input": "hi", "sampling_parameters": json.dumps(sampling)}
    status, raw = post_json(port, GENERATE, body)
    assert status == 400, raw
    assert f"sampling parameter {key!r}" in json_error(status, raw)


def test_sampling_values_sent_as_numeric_strings_are_accepted_over_http_and_grpc(
    sched: BackgroundScheduler, port: int
) -> None:
    # what the vLLM backend's sample client sends: every value a string
    sampling = {"max_tokens": "3", "seed": "2", "temperature": "0.1", "top_p": "0.9", "top_k": "5"}
    status, raw = post_json(port, GENERATE, {"text_input": "hi", "sampling_parameters": json.dumps(sampling)})
    assert status == 200, raw
    out = json.loads(raw)
    assert out["token_ids"] == expected_tokens("hi", 3, seed=2)
    status, raw = post_json(port, GENERATE, {"text_input": "hi", "parameters": sampling})
    assert status == 200 and json.loads(raw)["token_ids"] == expected_tokens("hi", 3, seed=2), raw
    status, raw = post_json(port, "/v1/completions", {"model": "b0", "prompt": "hi", **sampling})
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["text"] == expected_text("hi", 3, seed=2)
    responses, _ = sched.call(stream_infer(sched.grpc, [infer_request("b0", "hi", sampling=sampling)]))
    assert [r.error_message for r in responses] == [""]
    assert response_tokens(responses[0]) == expected_tokens("hi", 3, seed=2)


def test_non_finite_numbers_are_a_400(port: int) -> None:
    for raw_body in (
        b'{"text_input": "hi", "temperature": NaN}',
        b'{"text_input": "hi", "parameters": {"top_p": Infinity}}',
        b'{"text_input": "hi", "temperature": 1e400}',
    ):
        status, raw = http_request(port, "POST", GENERATE, raw_body)
        assert status == 400, (raw_body, raw)
        assert "finite number" in json_error(status, raw)


# ------------------------------------------------------------------------------------------- JSON bodies


@pytest.mark.parametrize("path", [GENERATE, STREAM, "/v1/completions", "/v1/chat/completions"])
def test_a_body_nested_thousands_of_levels_deep_is_a_400(
    sched: BackgroundScheduler, port: int, path: str
) -> None:
    for body in (
        b"[" * 5000 + b"]" * 5000,
        b'{"text_input": "hi", "model": "b0", "parameters": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001,
    ):
        status, raw = http_request(port, "POST", path, body)
        assert status == 400, raw
        assert "nested deeper than" in json_error(status, raw)
    assert_good_request_works(sched)


def test_a_sampling_parameters_string_nested_deeply_is_a_400_over_http_and_grpc(
    sched: BackgroundScheduler, port: int
) -> None:
    deep = "[" * 5000 + "]" * 5000
    status, raw = post_json(port, GENERATE, {"text_input": "hi", "sampling_parameters": deep})
    assert status == 400 and "nested deeper than" in json_error(status, raw), raw
    req = infer_request("b0", "hi")
    add_input(req, "sampling_parameters", "BYTES", [1], bytes_tensor([deep.encode()]))
    responses, code = sched.call(stream_infer(sched.grpc, [req]))
    assert code.name == "OK" and "nested deeper than" in responses[0].error_message, responses


@pytest.mark.parametrize(
    "body",
    [
        b'{"text_input": "\\ud800"}',
        b'{"text_input": "hi", "parameters": {"stop": "\\udfff"}}',
        b'{"text_input": "hi", "\\ud800": 1}',
        b'{"model": "b0", "prompt": "\\ud800x"}',
    ],
)
def test_a_lone_surrogate_escape_is_a_400(sched: BackgroundScheduler, port: int, body: bytes) -> None:
    path = "/v1/completions" if b'"prompt"' in body else GENERATE
    status, raw = http_request(port, "POST", path, body)
    assert status == 400, raw
    assert "lone surrogate" in json_error(status, raw)
    assert_good_request_works(sched)


def test_a_body_that_is_not_utf8_or_not_an_object_is_a_400(port: int) -> None:
    for body, message in ((b'{"text_input": "\xff"}', "not valid JSON"), (b"[1]", "must be a JSON object")):
        status, raw = http_request(port, "POST", GENERATE, body)
        assert status == 400 and message in json_error(status, raw), raw


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text_input": "hi", "sampling_parameters": [1]}, "sampling_parameters must be a JSON object"),
        ({"text_input": "hi", "parameters": {"exclude_input_in_output": "no"}}, "true or false"),
        ({"text_input": "hi", "id": {"a": 1}}, "id must be a string"),
        ({"text_input": 7}, "text_input must be a string"),
    ],
)
def test_fields_of_the_wrong_type_are_a_400(port: int, body: dict[str, Any], message: str) -> None:
    status, raw = post_json(port, GENERATE, body)
    assert status == 400 and message in json_error(status, raw), raw


# ------------------------------------------------------------------------------------ two prompts in one


def test_text_input_with_two_elements_is_refused_over_http(sched: BackgroundScheduler, port: int) -> None:
    status, raw = post_json(port, GENERATE, {"text_input": ["a", "b"], "parameters": {"max_tokens": 2}})
    assert status == 400, raw
    assert "list of 2" in json_error(status, raw) and "one request per prompt" in json_error(status, raw)
    # a one-element list is the [1]-shaped tensor Triton reads from a JSON array: served
    status, raw = post_json(port, GENERATE, {"text_input": ["a"], "parameters": {"max_tokens": 2}})
    assert status == 200 and json.loads(raw)["token_ids"] == expected_tokens("a", 2), raw


def test_text_input_with_two_elements_is_refused_over_grpc(sched: BackgroundScheduler) -> None:
    two = infer_request("b0", None, sampling={"max_tokens": 2}, request_id="two")
    add_input(two, "text_input", "BYTES", [2], bytes_tensor([b"first", b"second"]))
    torn = infer_request("b0", None, request_id="torn")
    add_input(torn, "text_input", "BYTES", [1], bytes_tensor([b"abc"])[:-1])  # says 3 bytes, 2 follow
    unknown = infer_request("b0", "hi", request_id="unknown")
    add_input(unknown, "input_ids", "INT64", [1], (1).to_bytes(8, "little"))
    responses, code = sched.call(stream_infer(sched.grpc, [two, torn, unknown]))
    assert code.name == "OK"
    by_id = {r.infer_response.id: r.error_message for r in responses}
    assert "must hold exactly one element, got 2" in by_id["two"], by_id
    assert "fewer follow" in by_id["torn"], by_id
    assert "'input_ids' is not accepted" in by_id["unknown"], by_id
    assert not any("internal error" in m for m in by_id.values()), by_id


def test_bad_generated_ids_over_grpc_are_refused_each_with_its_reason(sched: BackgroundScheduler) -> None:
    cases = {
        "dtype": ("INT32", [1], (1).to_bytes(4, "little"), "must be INT64"),
        "shape": ("INT64", [1, 1], (1).to_bytes(8, "little"), "shape [n]"),
        "torn": ("INT64", [2], (1).to_bytes(8, "little"), "8 bytes per id"),
        "negative": ("INT64", [1], (-3).to_bytes(8, "little", signed=True), ">= 0"),
        "complete": ("INT64", [2], (1).to_bytes(8, "little") * 2, "nothing is left to generate"),
        "unary": ("INT64", [1], (1).to_bytes(8, "little"), "resumes a stream"),
    }
    reqs = []
    for rid, (dtype, shape, raw, _) in cases.items():
        req = infer_request("b0", "hi", sampling={"max_tokens": 2}, stream=rid != "unary", request_id=rid)
        add_input(req, "generated_ids", dtype, shape, raw)
        reqs.append(req)
    resumed = infer_request("b0", "hi", sampling={"max_tokens": 3}, stream=True, request_id="resumed")
    first = expected_tokens("hi", 3)[0]
    add_input(resumed, "generated_ids", "INT64", [1], first.to_bytes(8, "little"))
    responses, code = sched.call(stream_infer(sched.grpc, [*reqs, resumed]))
    assert code.name == "OK"
    errors = {r.infer_response.id: r.error_message for r in responses if r.error_message}
    for rid, (*_, message) in cases.items():
        assert message in errors.get(rid, ""), (rid, errors)
    assert "resumed" not in errors
    tokens = [t for r in responses if r.infer_response.id == "resumed" for t in response_tokens(r)]
    assert tokens == expected_tokens("hi", 3)[1:]  # continues after the one given


def test_a_prompt_that_is_not_utf8_over_grpc_is_refused(sched: BackgroundScheduler) -> None:
    req = infer_request("b0", None, request_id="x")
    add_input(req, "text_input", "BYTES", [1], bytes_tensor([b"\xff\xfe"]))
    ok = infer_request("b0", "fine", sampling={"max_tokens": 1}, request_id="ok")
    responses, _ = sched.call(stream_infer(sched.grpc, [req, ok]))
    by_id = {r.infer_response.id: r for r in responses}
    assert "not valid UTF-8" in by_id["x"].error_message
    assert response_text(by_id["ok"]) == "fine" + expected_text("fine", 1)


# ------------------------------------------------------------------------------------------ body limits


@pytest.fixture(scope="module")
def limited(triton: TritonServer) -> Iterator[BackgroundScheduler]:
    s = start_scheduler(triton, MODELS, max_request_body_bytes=64 << 10, request_body_timeout_s=1.0)
    try:
        yield s
    finally:
        s.close()


def _head(path: str, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("path", [GENERATE, STREAM, "/v1/completions", "/v1/chat/completions"])
def test_a_body_shorter_than_its_content_length_gets_408_at_the_read_deadline(
    limited: BackgroundScheduler, path: str
) -> None:
    port = limited.service.http_port
    status, raw, connection = raw_exchange(port, _head(path, Content_Length="1000"), b'{"text_input": ')
    assert status == 408, raw
    assert "request_body_timeout_s" in json_error(status, raw)
    assert connection == "close"  # the rest of the body is never read as a next request
    status, raw = post_json(port, GENERATE, {"text_input": "ok", "parameters": {"max_tokens": 1}})
    assert status == 200, raw


def test_a_body_over_the_size_limit_gets_413(limited: BackgroundScheduler) -> None:
    port = limited.service.http_port
    # declared too large: answered before a byte of the body is read
    for path in (GENERATE, "/v1/completions"):
        status, raw, connection = raw_exchange(port, _head(path, Content_Length=str(1 << 30)))
        assert status == 413 and "max_request_body_bytes" in json_error(status, raw), raw
        assert connection == "close"
    # chunked, no length declared: answered once the limit is passed
    chunk = b'{"text_input": "' + b"x" * (70 << 10) + b'"}'
    body = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    status, raw, connection = raw_exchange(port, _head(GENERATE, Transfer_Encoding="chunked"), body)
    assert status == 413 and "max_request_body_bytes" in json_error(status, raw), raw
    assert connection == "close"
    # a body under the limit is served
    status, raw = post_json(port, GENERATE, {"text_input": "y" * 1000, "parameters": {"max_tokens": 1}})
    assert status == 200, raw


def test_body_limits_are_configuration_checked() -> None:
    from warmstart.scheduler.config import SchedulerConfig, SchedulerConfigError

    assert SchedulerConfig().max_request_body_bytes == 8 << 20
    assert SchedulerConfig().request_body_timeout_s == 30.0
    with pytest.raises(SchedulerConfigError, match="max_request_body_bytes"):
        SchedulerConfig.from_dict({"max_request_body_bytes": 0})
    with pytest.raises(SchedulerConfigError, match="request_body_timeout_s"):
        SchedulerConfig.from_dict({"request_body_timeout_s": "soon"})
