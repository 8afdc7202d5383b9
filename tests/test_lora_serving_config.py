"""The backend's pure LoRA parts: model parameters, ``lora_name`` in requests, the reload control flag."""

from __future__ import annotations

import json

import numpy as np
import pytest

from warmstart.backend.request import (
    BadInput,
    UnknownRequestParameter,
    error_code,
    is_lora_reload_request,
    is_release_request,
    parse_request,
    request_from_json,
    request_to_json,
)
from warmstart.engines.adapters import AdapterLoadFailed, LoraNotEnabled, UnknownAdapter
from warmstart.tritonconfig import BackendConfigError, ModelSettings, model_config, to_pbtxt


def _params(**kw: str) -> dict[str, object]:
    return {"parameters": {k: {"string_value": v} for k, v in kw.items()}}


def _sp(obj: object) -> dict[str, np.ndarray]:
    return {
        "text_input": np.array([b"hi"], dtype=np.object_),
        "sampling_parameters": np.array([json.dumps(obj).encode()], dtype=np.object_),
    }


def test_lora_parameters_are_read_in_the_vllm_backend_convention() -> None:
    cfg = _params(checkpoint="c", engine="torch", enable_lora="true", max_loras="3", max_lora_rank="32")
    s = ModelSettings.from_model_config(cfg)
    assert (s.enable_lora, s.max_loras, s.max_lora_rank) == (True, 3, 32)
    off = ModelSettings.from_model_config(_params(checkpoint="c", engine="torch", enable_lora="False"))
    assert off.enable_lora is False and (off.max_loras, off.max_lora_rank) == (4, 16)
    assert ModelSettings.from_model_config(_params(checkpoint="c", engine="torch")).enable_lora is False


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"enable_lora": "yes"}, 'must be "true" or "false"'),
        ({"max_loras": "0"}, "max_loras"),
        ({"max_loras": "65"}, "max_loras"),
        ({"max_lora_rank": "r8"}, "max_lora_rank"),
        ({"max_lora_rank": "1024"}, "max_lora_rank"),
    ],
)
def test_bad_lora_parameters_are_refused_naming_the_parameter(kw: dict[str, str], message: str) -> None:
    with pytest.raises(BackendConfigError, match=message):
        ModelSettings.from_model_config(_params(checkpoint="c", engine="torch", **kw))


def test_model_config_renders_lora_parameters_that_read_back() -> None:
    cfg = model_config("m", "/ckpt", "jax", enable_lora=True, max_loras=2, max_lora_rank=8)
    assert cfg["parameters"]["enable_lora"] == {"string_value": "true"}
    back = ModelSettings.from_model_config(cfg)
    assert (back.enable_lora, back.max_loras, back.max_lora_rank) == (True, 2, 8)
    assert 'key: "max_lora_rank"' in to_pbtxt(cfg)
    assert "enable_lora" not in model_config("m", "/ckpt", "jax")["parameters"]


def test_lora_name_is_read_from_sampling_parameters_and_request_parameters() -> None:
    req = parse_request(_sp({"max_tokens": 3, "lora_name": "sql"}))
    assert req.lora_name == "sql" and req.params.max_tokens == 3
    http = parse_request(
        {"text_input": np.array([b"hi"], dtype=np.object_)}, '{"lora_name": "fr", "max_tokens": 2}'
    )
    assert http.lora_name == "fr"
    assert parse_request(_sp({"max_tokens": 3})).lora_name is None
    assert request_from_json(json.loads(json.dumps(request_to_json(req)))) == req


@pytest.mark.parametrize("value", ["", "   ", 3, None, ["a"], "x" * 257])
def test_a_lora_name_that_is_not_a_name_is_bad_input(value: object) -> None:
    with pytest.raises(BadInput, match="lora_name"):
        parse_request(_sp({"lora_name": value}))


def test_unknown_sampling_keys_still_refused_and_lora_name_listed_as_allowed() -> None:
    with pytest.raises(UnknownRequestParameter, match="lora_name"):
        parse_request(_sp({"lora": "sql"}))


@pytest.mark.parametrize(
    ("parameters", "reload"),
    [("", False), ('{"warmstart_lora_reload": true}', True), ('{"warmstart_lora_reload": false}', False)],
)
def test_the_reload_flag_is_its_own_control_request(parameters: str, reload: bool) -> None:
    assert is_lora_reload_request(parameters) is reload
    assert is_release_request(parameters) is False


def test_a_reload_flag_that_is_not_a_bool_is_bad_input_and_a_false_one_is_not_a_sampling_key() -> None:
    with pytest.raises(BadInput, match="warmstart_lora_reload"):
        is_lora_reload_request('{"warmstart_lora_reload": "yes"}')
    req = parse_request(
        {"text_input": np.array([b"hi"], dtype=np.object_)}, '{"warmstart_lora_reload": false}'
    )
    assert req.lora_name is None


def test_adapter_errors_map_to_their_triton_codes() -> None:
    assert error_code(UnknownAdapter("x")) == "INVALID_ARG"
    assert error_code(LoraNotEnabled("x")) == "INVALID_ARG"
    assert error_code(AdapterLoadFailed("x")) == "INTERNAL"
