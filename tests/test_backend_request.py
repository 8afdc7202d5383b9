"""Unit tests of the backend's pure parts: request parsing, error codes, model settings and configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from warmstart.backend.request import (
    BadInput,
    ConflictingInputs,
    InvalidParametersJSON,
    MissingPrompt,
    UnknownRequestParameter,
    error_code,
    is_release_request,
    parse_request,
)
from warmstart.backend.weights import UnsetVariable, resolve_reference
from warmstart.engines import (
    EmptyPrompt,
    GeneratorClosed,
    InvalidSamplingParams,
    InvalidTokenId,
    PromptTooLong,
    SamplingParams,
)
from warmstart.tritonconfig import (
    INPUTS,
    OUTPUTS,
    BackendConfigError,
    ModelSettings,
    model_config,
    to_pbtxt,
)

REPO = Path(__file__).resolve().parent.parent / "model_repository"


def s(text: str) -> np.ndarray:
    return np.array([text.encode()], dtype=np.object_)


def b(value: bool) -> np.ndarray:
    return np.array([value])


def test_parse_request_reads_prompt_and_sampling_parameters_tensor() -> None:
    req = parse_request(
        {
            "text_input": s("Hello"),
            "sampling_parameters": s('{"max_tokens": 5, "temperature": 0.5, "seed": 3}'),
        },
        '{"max_tokens": 99}',
    )
    assert req.text == "Hello"
    assert req.params == SamplingParams(max_tokens=5, temperature=0.5, seed=3)
    assert req.stream is False and req.exclude_input_in_output is False
    assert req.prompt_ids is None and req.generated_ids == ()


def test_parse_request_uses_request_parameters_when_no_sampling_tensor() -> None:
    req = parse_request({"text_input": s("Hi"), "stream": b(True)}, json.dumps({"max_tokens": 7, "top_k": 4}))
    assert req.params.max_tokens == 7 and req.params.top_k == 4
    assert req.stream is True and req.exclude_input_in_output is True


@pytest.mark.parametrize(
    ("parameters", "release"),
    [
        ("", False),
        ("{}", False),
        ('{"max_tokens": 4}', False),
        ('{"warmstart_release": true}', True),
        ('{"warmstart_release": false}', False),
        ('{"warmstart_release": true, "triton_enable_empty_final_response": true}', True),
        ("{not json warmstart_release", False),  # parse_request reports bad JSON
        ('["warmstart_release"]', False),
    ],
)
def test_is_release_request_reads_only_the_release_flag(parameters: str, release: bool) -> None:
    assert is_release_request(parameters) is release


@pytest.mark.parametrize("value", ['"true"', "1", "null"])
def test_is_release_request_refuses_a_release_flag_that_is_not_a_bool(value: str) -> None:
    with pytest.raises(BadInput, match="must be a bool"):
        is_release_request(f'{{"warmstart_release": {value}}}')


def test_parse_request_ignores_a_false_release_flag_among_request_parameters() -> None:
    req = parse_request({"text_input": s("Hi")}, json.dumps({"warmstart_release": False, "max_tokens": 3}))
    assert req.params.max_tokens == 3


def test_parse_request_defaults_when_no_parameters() -> None:
    assert parse_request({"text_input": s("Hi")}, "").params == SamplingParams()
    assert parse_request({"text_input": s("Hi")}, "{}").params == SamplingParams()


def test_parse_request_splits_input_ids_into_prompt_and_generated() -> None:
    req = parse_request(
        {
            "input_ids": np.array([5, 6, 7, 8, 9], dtype=np.int64),
            "num_generated": np.array([2], dtype=np.int64),
        }
    )
    assert req.prompt_ids == (5, 6, 7) and req.generated_ids == (8, 9)
    assert req.text is None


def test_parse_request_input_ids_without_num_generated_is_all_prompt() -> None:
    req = parse_request({"input_ids": np.array([1, 2], dtype=np.int64), "text_input": s("ab")})
    assert req.prompt_ids == (1, 2) and req.generated_ids == () and req.text == "ab"


def test_parse_request_text_with_only_generated_ids_resumes_from_text() -> None:
    req = parse_request(
        {"text_input": s("ab"), "input_ids": np.array([7, 8], dtype=np.int64), "num_generated": np.array([2])}
    )
    assert req.prompt_ids is None and req.generated_ids == (7, 8) and req.text == "ab"


@pytest.mark.parametrize(
    ("inputs", "params", "exc"),
    [
        ({"text_input": s("x"), "sampling_parameters": s("{bad")}, "", InvalidParametersJSON),
        ({"text_input": s("x"), "sampling_parameters": s("[1]")}, "", InvalidParametersJSON),
        ({"text_input": s("x")}, "not json", InvalidParametersJSON),
        ({"text_input": s("x"), "sampling_parameters": s('{"foo": 1}')}, "", UnknownRequestParameter),
        ({"text_input": s("x")}, '{"max_tokens": 3, "beam_width": 2}', UnknownRequestParameter),
        ({"text_input": s("x"), "sampling_parameters": s('{"max_tokens": 0}')}, "", InvalidSamplingParams),
        (
            {"text_input": s("x"), "sampling_parameters": s('{"temperature": "hot"}')},
            "",
            InvalidSamplingParams,
        ),
        ({"text_input": s("x"), "sampling_parameters": s('{"max_tokens": 1.5}')}, "", InvalidSamplingParams),
        ({}, "", MissingPrompt),
        ({"text_input": s("")}, "", EmptyPrompt),
        ({"text_input": np.array([b"a", b"b"], dtype=np.object_)}, "", BadInput),
        ({"text_input": np.array([b"\xff\xfe"], dtype=np.object_)}, "", BadInput),
        ({"text_input": np.array([1.0], dtype=np.float32)}, "", BadInput),
        ({"text_input": s("x"), "stream": np.array([1], dtype=np.int32)}, "", BadInput),
        (
            {"text_input": s("x"), "stream": b(True), "exclude_input_in_output": b(False)},
            "",
            ConflictingInputs,
        ),
        ({"text_input": s("x"), "num_generated": np.array([1], dtype=np.int64)}, "", ConflictingInputs),
        ({"input_ids": np.array([1.0], dtype=np.float32)}, "", BadInput),
        ({"input_ids": np.array([1, -2], dtype=np.int64)}, "", InvalidTokenId),
        (
            {"input_ids": np.array([1, 2], dtype=np.int64), "num_generated": np.array([3], dtype=np.int64)},
            "",
            BadInput,
        ),
        (
            {"input_ids": np.array([1, 2], dtype=np.int64), "num_generated": np.array([2], dtype=np.int64)},
            "",
            EmptyPrompt,
        ),
        ({"input_ids": np.array([], dtype=np.int64)}, "", EmptyPrompt),
        ({"text_input": np.array([b"x" * (1 << 20 | 1)], dtype=np.object_)}, "", PromptTooLong),
    ],
)
def test_parse_request_rejects_bad_input_with_its_own_error(
    inputs: dict[str, np.ndarray], params: str, exc: type[Exception]
) -> None:
    with pytest.raises(exc):
        parse_request(inputs, params)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidParametersJSON("x"), "INVALID_ARG"),
        (UnknownRequestParameter("x"), "INVALID_ARG"),
        (InvalidSamplingParams("x"), "INVALID_ARG"),
        (EmptyPrompt("x"), "INVALID_ARG"),
        (PromptTooLong("x"), "INVALID_ARG"),
        (InvalidTokenId("x"), "INVALID_ARG"),
        (GeneratorClosed("x"), "UNAVAILABLE"),
        (RuntimeError("x"), "INTERNAL"),
    ],
)
def test_error_code_maps_each_failure(exc: Exception, code: str) -> None:
    assert error_code(exc) == code


def _params(**kw: str) -> dict[str, object]:
    return {"parameters": {k: {"string_value": v} for k, v in kw.items()}}


def test_model_settings_read_from_model_config() -> None:
    cfg = _params(checkpoint="/x", engine="jax", dtype="bfloat16", max_batch="4", EXECUTION_ENV_PATH="/env")
    assert ModelSettings.from_model_config(cfg) == ModelSettings("/x", "jax", "bfloat16", 4)
    assert ModelSettings.from_model_config(_params(checkpoint="c", engine="torch")).max_batch == 8


@pytest.mark.parametrize(
    "cfg",
    [
        _params(engine="torch"),
        _params(checkpoint="c"),
        _params(checkpoint="c", engine="tensorflow"),
        _params(checkpoint="c", engine="torch", dtype="int3"),
        _params(checkpoint="c", engine="torch", max_batch="0"),
        _params(checkpoint="c", engine="torch", max_batch="many"),
        _params(checkpoint="c", engine="torch", temperature="1"),
        {"parameters": {"checkpoint": "c", "engine": {"string_value": "torch"}}},
    ],
)
def test_model_settings_reject_bad_parameters(cfg: dict[str, object]) -> None:
    with pytest.raises(BackendConfigError):
        ModelSettings.from_model_config(cfg)


def test_model_config_is_complete_and_decoupled() -> None:
    cfg = model_config("m", "/ckpt", "torch", max_batch=4)
    assert cfg["backend"] == "warmstart"
    assert cfg["model_transaction_policy"] == {"decoupled": True}
    assert [i["name"] for i in cfg["input"]] == [i["name"] for i in INPUTS]
    assert [o["name"] for o in cfg["output"]] == [o["name"] for o in OUTPUTS]
    assert ModelSettings.from_model_config(cfg) == ModelSettings("/ckpt", "torch", None, 4)
    json.dumps(cfg)


def test_model_config_rejects_bad_values() -> None:
    with pytest.raises(BackendConfigError):
        model_config("m", "", "torch")
    with pytest.raises(BackendConfigError):
        model_config("m", "c", "torch", instance_kind="KIND_TPU")


def test_to_pbtxt_renders_the_config() -> None:
    text = to_pbtxt(model_config("m", '/a "b"', "jax"))
    assert 'backend: "warmstart"' in text
    assert "decoupled: true" in text
    assert "data_type: TYPE_STRING" in text
    assert "dims: [ -1 ]" in text
    assert 'string_value: "/a \\"b\\""' in text


@pytest.mark.parametrize("name", ["smollm2_torch", "smollm2_jax"])
def test_repository_config_matches_model_config(name: str) -> None:
    text = (REPO / name / "config.pbtxt").read_text()
    engine = name.rsplit("_", 1)[1]
    body = text[text.index("name:") :]  # the file may start with comments
    checkpoint = body.split('key: "checkpoint"')[1].split('string_value: "')[1].split('"')[0]
    assert body == to_pbtxt(model_config(name, checkpoint, engine))


def test_resolve_reference_expands_variables_and_relative_paths(tmp_path: Path) -> None:
    env = {"MODELS": "/data/models"}
    assert resolve_reference("${MODELS}/smol", tmp_path, env) == "/data/models/smol"
    assert resolve_reference("${NOPE:-/fallback}/smol", tmp_path, env) == "/fallback/smol"
    assert resolve_reference("../ckpt", tmp_path / "m", env) == str(tmp_path / "ckpt")
    assert resolve_reference("s3://models/smol", tmp_path, env) == "s3://models/smol"
    assert resolve_reference("smol", tmp_path, env) == str(tmp_path / "smol")
    assert resolve_reference("smol", tmp_path, {"WARMSTART_STORE": "http://127.0.0.1:1"}) == "smol"
    with pytest.raises(UnsetVariable, match="NOPE"):
        resolve_reference("${NOPE}/x", tmp_path, env)
