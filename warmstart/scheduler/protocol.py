"""What both front ends share: sampling-parameter parsing, error → status mapping, model metadata."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from warmstart import jsonsafe
from warmstart.chat import InvalidMessages, validate_messages
from warmstart.scheduler.config import ModelConfig
from warmstart.scheduler.errors import (
    BadRequest,
    ClusterStateUnavailable,
    InvalidModelName,
    RequestBodyTimeout,
    RequestBodyTooLarge,
    UnknownModelError,
    UnplaceableModelError,
)
from warmstart.scheduler.router import ColdStartQueueFull, ColdStartTimeout, GenerationFailed
from warmstart.scheduler.upstream import ModelLoadFailed, UpstreamRequestError

# lora_name (the vLLM backend's key): the LoRA adapter of the model to generate with (a KServe request's
# sampling parameters or request parameters; the router takes it out and forwards it with every attempt)
SAMPLING_KEYS = frozenset(
    {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_tokens", "lora_name"}
)
MAX_LORA_NAME = 256
_INT_KEYS = frozenset({"max_tokens", "top_k", "seed", "min_tokens"})
_FLOAT_KEYS = frozenset({"temperature", "top_p"})


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sampling_value(key: str, value: Any) -> Any:
    """``value`` of sampling parameter ``key`` as its type: a JSON number, or a string spelling one."""
    if key in _INT_KEYS:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and (n := jsonsafe.number_from_string(value, integer=True)) is not None:
            return n
        raise BadRequest(
            f'sampling parameter {key!r} must be an integer (a JSON number or a string such as "16"), '
            f"got {_shown(value)}"
        )
    if key in _FLOAT_KEYS:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str) and (x := jsonsafe.number_from_string(value, integer=False)) is not None:
            return x
        raise BadRequest(
            f"sampling parameter {key!r} must be a finite number (a JSON number or a string such as "
            f'"0.1"), got {_shown(value)}'
        )
    if key == "lora_name":
        if not isinstance(value, str) or not value or len(value) > MAX_LORA_NAME:
            raise BadRequest(
                f"lora_name must be a non-empty string of at most {MAX_LORA_NAME} characters naming one of the "
                f"model's adapters, got {_shown(value)}"
            )
        return value
    # stop: a string or a list of strings
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest(
            f"sampling parameter {key!r} must be a string or a list of strings, got {_shown(value)}"
        )
    return list(stops)


def coerce_sampling(values: Mapping[str, Any], *, strict: bool) -> dict[str, Any]:
    """Sampling parameters from ``values``: known keys coerced to their types.

    Integers (``max_tokens``, ``top_k``, ``seed``, ``min_tokens``) and floats (``temperature``, ``top_p``) may
    also be strings spelling a number (``"16"``, ``"0.1"``), as the vLLM backend accepts them; any other
    string, a bool, NaN or an infinity is refused with a message naming the key. ``strict`` rejects unknown
    keys (a ``sampling_parameters`` JSON); otherwise they are ignored (top-level request fields that Triton
    would have passed as request parameters).
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in SAMPLING_KEYS:
            if strict:
                raise BadRequest(
                    f"unknown sampling parameter {_shown(key)}; known: {', '.join(sorted(SAMPLING_KEYS))}"
                )
            continue
        if value is None:
            continue
        out[key] = _sampling_value(key, value)
    return out


def parse_json_object(body: str | bytes, what: str) -> dict[str, Any]:
    """``body`` parsed as one JSON object (with :func:`warmstart.jsonsafe.loads`'s limits), else BadRequest."""
    try:
        data = jsonsafe.loads(body)
    except jsonsafe.UnsafeJSON as e:
        raise BadRequest(f"{what} is refused: {e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digits limit
        raise BadRequest(f"{what} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def sampling_from_json(text: str | bytes) -> dict[str, Any]:
    """Parse a ``sampling_parameters`` JSON string (strict)."""
    data = parse_json_object(text, "sampling_parameters")
    if not isinstance(data, Mapping):
        raise BadRequest("sampling_parameters must be a JSON object")
    return coerce_sampling(data, strict=True)


@dataclass(frozen=True, slots=True)
class Status:
    """How an error is reported: HTTP status and gRPC status-code name."""

    http: int
    grpc: str


def status_of(error: BaseException) -> Status:
    """The HTTP/gRPC status for an error raised while serving a request."""
    if isinstance(error, RequestBodyTooLarge):
        return Status(413, "RESOURCE_EXHAUSTED")
    if isinstance(error, RequestBodyTimeout):
        return Status(408, "DEADLINE_EXCEEDED")
    if isinstance(error, (InvalidModelName, BadRequest, UpstreamRequestError)):
        return Status(400, "INVALID_ARGUMENT")
    if isinstance(error, UnknownModelError):
        return Status(404, "NOT_FOUND")
    if isinstance(
        error, (ColdStartQueueFull, ColdStartTimeout, UnplaceableModelError, ClusterStateUnavailable)
    ):
        return Status(503, "UNAVAILABLE")
    if isinstance(error, GenerationFailed):
        return Status(502, "UNAVAILABLE")
    if isinstance(error, ModelLoadFailed):
        return Status(500, "INTERNAL")
    if isinstance(error, ValueError):
        return Status(400, "INVALID_ARGUMENT")
    return Status(500, "INTERNAL")


_DTYPE = {
    "TYPE_STRING": "BYTES",
    "TYPE_BOOL": "BOOL",
    "TYPE_INT64": "INT64",
    "TYPE_INT32": "INT32",
    "TYPE_FP32": "FP32",
}

DEFAULT_INPUTS: tuple[dict[str, Any], ...] = (
    {"name": "text_input", "datatype": "BYTES", "shape": [1]},
    {"name": "stream", "datatype": "BOOL", "shape": [1]},
    {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1]},
    {"name": "exclude_input_in_output", "datatype": "BOOL", "shape": [1]},
    {"name": "input_ids", "datatype": "INT64", "shape": [-1]},
    {"name": "num_generated", "datatype": "INT64", "shape": [1]},
    {"name": "messages", "datatype": "BYTES", "shape": [1]},
)
DEFAULT_OUTPUTS: tuple[dict[str, Any], ...] = (
    {"name": "text_output", "datatype": "BYTES", "shape": [-1]},
    {"name": "token_ids", "datatype": "INT64", "shape": [-1]},
    {"name": "finish_reason", "datatype": "BYTES", "shape": [-1]},
    {"name": "prompt_tokens", "datatype": "INT64", "shape": [1]},
    {"name": "stop_token_id", "datatype": "INT64", "shape": [1]},
)


def model_metadata(model: ModelConfig) -> dict[str, Any]:
    """KServe v2 model metadata for ``model`` (from its Triton config when given, else the backend's I/O)."""
    inputs: list[dict[str, Any]] = list(DEFAULT_INPUTS)
    outputs: list[dict[str, Any]] = list(DEFAULT_OUTPUTS)
    if model.triton_config is not None:
        cfg = model.triton_config

        def conv(items: Any) -> list[dict[str, Any]]:
            return [
                {
                    "name": t["name"],
                    "datatype": _DTYPE.get(t.get("data_type", ""), "BYTES"),
                    "shape": [int(d) for d in t.get("dims", [-1])],
                }
                for t in items or []
            ]

        inputs, outputs = conv(cfg.get("input")), conv(cfg.get("output"))
    return {
        "name": model.name,
        "versions": ["1"],
        "platform": "warmstart",
        "inputs": inputs,
        "outputs": outputs,
    }


def chat_messages(messages: Any) -> tuple[dict[str, str], ...]:
    """A chat's ``messages``, checked and normalized by :func:`warmstart.chat.validate_messages` (a
    :class:`BadRequest` naming the message otherwise). The backend renders them with the model's own chat
    template; the scheduler never joins them into a prompt of its own."""
    try:
        return tuple(validate_messages(messages))
    except InvalidMessages as e:
        raise BadRequest(str(e)) from None
