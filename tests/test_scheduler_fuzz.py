"""Fuzzing the scheduler's three front ends with hypothesis-generated requests.

The property, for the KServe HTTP generate endpoints, the OpenAI endpoints and gRPC ModelStreamInfer: every
answer is a 2xx or a 4xx carrying a JSON error (gRPC: the stream ends OK and each error message is not an
"internal error"), and the next good request still succeeds. One real tritonserver with the fake model
behind one scheduler serves every example; bodies mix well-formed requests with wrong types, out-of-range
and non-finite numbers, numeric strings, lone surrogates, deep nesting, junk bytes and unknown keys.
``WARMSTART_FUZZ_EXAMPLES`` (default 50 per front end) runs more examples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from _bad_input_support import (
    MAX_TOKENS,
    bytes_tensor,
    http_request,
    infer_request,
    post_json,
    response_tokens,
    sse_events,
    start_scheduler,
    stream_infer,
    triton_with_fake_models,
)
from _scheduler_cluster import BackgroundScheduler
from _scheduler_fake import expected_tokens
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MODEL = "f0"
FUZZ = settings(
    max_examples=int(os.environ.get("WARMSTART_FUZZ_EXAMPLES", "50")),  # more for a deeper run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def sched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundScheduler]:
    with triton_with_fake_models(tmp_path_factory.mktemp("fuzz"), [MODEL]) as triton:
        s = start_scheduler(triton, [MODEL])
        try:
            yield s
        finally:
            s.close()


# ------------------------------------------------------------------------------------------- strategies

SAMPLING_KEYS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_tokens"]
odd_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["\ud800", "a\udfffb", "16", "0.1", " 3 ", "nan", "inf", "1e400", "1_0", "0x10", ""]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=20),
    st.integers(),
    st.floats(),  # NaN and infinities included: json.dumps writes them as NaN/Infinity
    odd_text,
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(odd_text, children, max_size=3),
    max_leaves=8,
)
plain_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
good_sampling = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.one_of(st.integers(0, MAX_TOKENS), st.integers(0, MAX_TOKENS).map(str)),
        "temperature": st.one_of(st.floats(0, 2), st.floats(0, 2).map(repr)),  # numeric strings too
        "top_p": st.floats(0.05, 1),
        "top_k": st.integers(0, 50),
        "seed": st.one_of(st.integers(0, 2**31), st.integers(0, 2**31).map(str)),
        "stop": st.lists(plain_text, max_size=2),
        "min_tokens": st.integers(0, 2),
    },
)
extremes = st.sampled_from(
    [-1, 0, MAX_TOKENS + 1, 10**12, 2**63, -(2**63), 10**30, 1e400, float("nan"), True]
)
sampling_values = st.one_of(
    st.integers(min_value=-2, max_value=3 * MAX_TOKENS), extremes, st.floats(), odd_text, json_values
)
sampling_dicts = st.one_of(
    good_sampling,
    st.dictionaries(st.sampled_from([*SAMPLING_KEYS, "beam", "n"]), sampling_values, max_size=4),
)


bad_sampling = st.builds(  # good sampling parameters but one, extreme or arbitrary
    lambda d, k, v: {**d, k: v},
    good_sampling,
    st.sampled_from(SAMPLING_KEYS),
    st.one_of(extremes, sampling_values),
)


def _encode(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8", errors="surrogatepass")  # ensure_ascii: surrogates as \udxxx


def _with(body: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**body, key: value}


def one_field_off(good: st.SearchStrategy[dict[str, Any]], keys: list[str]) -> st.SearchStrategy[Any]:
    """A good request with one field replaced by (or added as) an extreme or arbitrary JSON value."""
    return st.builds(_with, good, st.sampled_from(keys), st.one_of(extremes, sampling_values))


good_kserve = st.fixed_dictionaries(
    {"text_input": st.one_of(plain_text, st.lists(plain_text, min_size=1, max_size=1))},
    optional={
        "parameters": good_sampling,
        "sampling_parameters": st.one_of(good_sampling, good_sampling.map(json.dumps)),
        "id": plain_text,
        "exclude_input_in_output": st.booleans(),
    },
)
any_kserve = st.fixed_dictionaries(
    {},
    optional={
        "text_input": st.one_of(odd_text, st.lists(odd_text, max_size=3), json_values),
        "parameters": st.one_of(sampling_dicts, json_values),
        "sampling_parameters": st.one_of(
            sampling_dicts, sampling_dicts.map(json.dumps), odd_text, json_values
        ),
        "id": st.one_of(odd_text, json_values),
        "max_tokens": sampling_values,
        "temperature": sampling_values,
        "exclude_input_in_output": json_values,
        "stream": json_values,
        "unknown": json_values,
    },
)
kserve_bodies = st.one_of(
    good_kserve,
    st.builds(_with, good_kserve, st.just("parameters"), bad_sampling),
    st.builds(_with, good_kserve, st.just("sampling_parameters"), bad_sampling.map(json.dumps)),
    one_field_off(good_kserve, ["text_input", "parameters", "sampling_parameters", "id", "max_tokens", "x"]),
    any_kserve,
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), odd_text),
        "content": st.one_of(odd_text, json_values),
        "name": odd_text,
    },
)
good_openai = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "max_tokens": st.integers(1, MAX_TOKENS),
        "stream": st.booleans(),
    },
    optional={"temperature": st.floats(0, 2), "seed": st.integers(0, 2**31), "stop": plain_text},
)
good_completion = st.builds(lambda b, p: {**b, "prompt": p}, good_openai, plain_text)
good_chat = st.builds(
    lambda b, c: {**b, "messages": [{"role": "user", "content": c}]}, good_openai, plain_text
)
any_openai = st.fixed_dictionaries(
    {"model": st.one_of(st.just(MODEL), odd_text, json_values)},
    optional={
        "prompt": st.one_of(
            odd_text, st.lists(odd_text, max_size=2), st.lists(st.integers(-1, 300), max_size=4), json_values
        ),
        "messages": st.one_of(st.lists(message, max_size=3), json_values),
        "max_tokens": sampling_values,
        "max_completion_tokens": sampling_values,
        "temperature": sampling_values,
        "top_p": sampling_values,
        "seed": sampling_values,
        "stop": st.one_of(odd_text, st.lists(odd_text, max_size=2), json_values),
        "n": st.one_of(st.integers(-1, 3), json_values),
        "logprobs": json_values,
        "stream": st.one_of(st.booleans(), json_values),
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
        "user": odd_text,
        "unknown_key": json_values,
    },
)
_OPENAI_KEYS = ["model", "prompt", "messages", "max_tokens", "temperature", "stream", "stream_options", "n"]
_OPENAI_SAMPLING = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop"]
openai_bodies = st.one_of(
    good_completion,
    good_chat,
    one_field_off(st.one_of(good_completion, good_chat), _OPENAI_SAMPLING),
    one_field_off(good_completion, _OPENAI_KEYS),
    one_field_off(good_chat, _OPENAI_KEYS),
    any_openai,
)


def _nested(depth: int, inner: bytes) -> bytes:
    return (
        b'{"text_input": "x", "model": "f0", "prompt": "x", "parameters": '
        + b"[" * depth
        + inner
        + b"]" * depth
        + b"}"
    )


def http_bodies(structured: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Mostly requests (good, one field off, or anything of the right shape), sometimes any JSON, junk bytes,
    a cut-off object or one nested thousands of levels deep."""
    return st.one_of(
        st.builds(_nested, st.integers(1, 5000), st.sampled_from([b"", b"1", b'"\\ud800"'])),
        structured.map(_encode),
        structured.map(_encode),
        structured.map(_encode),
        structured.map(_encode),
        json_values.map(_encode),
        st.binary(max_size=64),
        st.tuples(structured.map(_encode), st.integers(0, 40)).map(lambda t: t[0][: t[1]]),
    )


# ---------------------------------------------------------------------------------------------- checks


def _assert_answer_is_2xx_or_json_4xx(status: int, body: bytes, *, openai: bool = False) -> None:
    event(f"HTTP {status}")
    assert status < 300 or 400 <= status < 500, (status, body[:500])
    if status >= 400:
        data = json.loads(body)
        error = data["error"]
        text = error["message"] if openai and isinstance(error, dict) else error
        assert isinstance(text, str) and text and "internal error" not in text, data
    elif b"data: " in body:  # SSE: an error event after the 200 must still be a client error's message
        for sse in sse_events(body):
            if isinstance(sse, dict) and "error" in sse:
                assert "internal error" not in json.dumps(sse), sse


def _good_request_works(sched: BackgroundScheduler) -> None:
    status, body = post_json(
        sched.service.http_port,
        f"/v2/models/{MODEL}/generate",
        {"text_input": "good", "parameters": {"max_tokens": 2}},
    )
    assert status == 200, body
    assert json.loads(body)["token_ids"] == expected_tokens("good", 2)


# ------------------------------------------------------------------------------------------------ tests


@FUZZ
@given(body=http_bodies(kserve_bodies), stream=st.booleans())
def test_fuzzed_kserve_generate_bodies_get_2xx_or_json_4xx(
    sched: BackgroundScheduler, body: bytes, stream: bool
) -> None:
    path = f"/v2/models/{MODEL}/generate" + ("_stream" if stream else "")
    status, answer = http_request(sched.service.http_port, "POST", path, body)
    _assert_answer_is_2xx_or_json_4xx(status, answer)
    _good_request_works(sched)


@FUZZ
@given(body=http_bodies(openai_bodies), chat=st.booleans())
def test_fuzzed_openai_bodies_get_2xx_or_json_4xx(
    sched: BackgroundScheduler, body: bytes, chat: bool
) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, answer = http_request(sched.service.http_port, "POST", path, body)
    _assert_answer_is_2xx_or_json_4xx(status, answer, openai=True)
    _good_request_works(sched)


INPUT_NAMES = ["text_input", "stream", "sampling_parameters", "exclude_input_in_output", "input_ids", "x"]
DATATYPES = ["BYTES", "BOOL", "INT64", "FP32", "STRING", ""]


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, str, list[int], bytes | None, list[bytes]]:
    """(name, datatype, shape, raw contents or None, typed bytes contents)."""
    name = draw(st.sampled_from(INPUT_NAMES))
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.lists(st.integers(-2, 3), max_size=3))
    values = draw(
        st.lists(
            st.one_of(
                odd_text.map(lambda s: s.encode("utf-8", errors="surrogatepass")),
                sampling_dicts.map(_encode),
                st.binary(max_size=8),
            ),
            max_size=3,
        )
    )
    raw = draw(st.one_of(st.just(bytes_tensor(values)), st.binary(max_size=16), st.none()))
    return name, datatype, shape, raw, values


param_values = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["16", "0.1", "nan", "x"]),
)


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A good request (as tritonclient sends it), one with an extra fuzzed tensor or parameters, or any."""
    kind = draw(st.sampled_from(["good", "off", "any"]))
    if kind == "any":
        req = pb.ModelInferRequest(
            model_name=draw(st.one_of(st.just(MODEL), st.text(max_size=10))), id=draw(st.text(max_size=8))
        )
    else:
        req = infer_request(
            MODEL,
            draw(plain_text),
            sampling=draw(st.none() | good_sampling | bad_sampling),
            stream=draw(st.none() | st.booleans()),
            request_id=draw(st.text(max_size=8)),
        )
        if kind == "good":
            return req
    drawn = draw(st.lists(tensors(), min_size=kind == "off", max_size=4 if kind == "any" else 1))
    raw_mode = "all" if kind == "off" else draw(st.sampled_from(["all", "none", "some"]))
    for i, (name, datatype, shape, raw, values) in enumerate(drawn):
        t = req.inputs.add()
        t.name, t.datatype = name, datatype
        t.shape.extend(shape)
        if raw_mode == "none" or raw is None:
            t.contents.bytes_contents.extend(values)
        if raw_mode == "all" or (raw_mode == "some" and i % 2 == 0):
            req.raw_input_contents.append(raw if raw is not None else b"")
    for key, value in draw(
        st.dictionaries(
            st.sampled_from([*SAMPLING_KEYS, "triton_enable_empty_final_response", "other"]), param_values
        )
    ).items():
        p = req.parameters[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = value
    return req


@FUZZ
@given(requests=st.lists(infer_requests(), min_size=1, max_size=3))
def test_fuzzed_grpc_stream_requests_get_responses_or_client_errors(
    sched: BackgroundScheduler, requests: list[pb.ModelInferRequest]
) -> None:
    responses, code = sched.call(stream_infer(sched.grpc, requests))
    assert code.name == "OK", (code, responses)
    for resp in responses:
        event("error" if resp.error_message else "generated")
        assert not resp.error_message.startswith("internal error"), resp.error_message
    good = infer_request(MODEL, "good", sampling={"max_tokens": 2}, request_id="good")
    responses, code = sched.call(stream_infer(sched.grpc, [good]))
    assert code.name == "OK" and [r.error_message for r in responses] == [""], responses
    assert response_tokens(responses[0]) == expected_tokens("good", 2)
