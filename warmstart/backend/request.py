"""Parsing one generation request of the ``warmstart`` backend. Pure: no Triton, no engine.

Inputs (vllm_backend conventions, plus resume):

* ``text_input`` (STRING [1]): the prompt. Required unless ``input_ids`` is given.
* ``stream`` (BOOL [1], default false): one response per generated token, each with the new text only.
* ``sampling_parameters`` (STRING [1]): JSON object with ``max_tokens``, ``temperature``, ``top_p``,
  ``top_k``, ``seed``, ``stop``, ``min_tokens``. Without it the request parameters are read instead
  (Triton's HTTP ``generate`` endpoint passes unknown JSON keys and ``parameters`` that way). Numbers may
  be sent as strings (``"0.1"``, ``"16"``), as the vLLM backend reads them; other strings are refused,
  naming the key.
  The JSON is parsed with :func:`warmstart.jsonsafe.loads` (bounded depth, no NaN, valid Unicode).
* ``exclude_input_in_output`` (BOOL [1]): non-streaming responses start with the prompt text unless true.
  Streaming never repeats the prompt, so ``stream=true`` with ``exclude_input_in_output=false`` is refused,
  as vllm does.
* ``input_ids`` (INT64 [-1]) and ``num_generated`` (INT64 [1]): the prompt's token ids followed by the ids
  already generated (elsewhere), and how many of them were generated. The generation then continues
  token-exactly where it stopped (same seed). ``text_input`` may accompany them; it is then only the text
  repeated in non-streaming output. When ``num_generated`` covers all of ``input_ids``, the prompt is
  ``text_input`` (tokenized here): a router that never tokenizes resumes that way.
* ``messages`` (STRING [1]): a chat instead of ``text_input``: a JSON array of OpenAI-style
  ``{"role", "content"}`` messages (roles system, user, assistant, tool; content a string or a list of
  ``{"type": "text", "text"}`` parts), checked by :func:`warmstart.chat.validate_messages`. The runtime
  renders it with the checkpoint's own chat template, the assistant's turn opened
  (:mod:`warmstart.chat`); a model without a template refuses it (INVALID_ARG). It resumes like
  ``text_input``: with ``input_ids`` holding only generated ids (``num_generated`` = their count).

* ``lora_name`` (a key of ``sampling_parameters``, or a request parameter; the vLLM backend's key): the LoRA
  adapter to generate with, a name from the model's ``multi_lora.json`` (docs/lora.md). A model without
  ``enable_lora``, or an unknown name, answers INVALID_ARG.

Control requests (KServe request parameters; no input needed): ``warmstart_release`` = true asks the model
instance to drop its engine now, ahead of an unload (:func:`is_release_request`); ``warmstart_lora_reload`` =
true makes it re-read its ``multi_lora.json`` (adapters added and removed at run time, the base staying
loaded; :func:`is_lora_reload_request`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from warmstart import jsonsafe
from warmstart.chat import ChatError, validate_messages
from warmstart.engines import (
    EmptyPrompt,
    GeneratorClosed,
    InvalidSamplingParams,
    InvalidTokenId,
    PromptTooLong,
    SamplingParams,
)
from warmstart.engines.adapters import LoraNotEnabled, UnknownAdapter
from warmstart.errors import WarmstartError

__all__ = [
    "MAX_PROMPT_BYTES",
    "RELEASED",
    "RELEASE_PARAMETER",
    "BadInput",
    "ConflictingInputs",
    "GenerateRequest",
    "InvalidParametersJSON",
    "MissingPrompt",
    "RequestError",
    "UnknownRequestParameter",
    "error_code",
    "is_lora_reload_request",
    "is_release_request",
    "lora_reload_adapters",
    "parse_request",
    "request_from_json",
    "request_to_json",
]

MAX_PROMPT_BYTES = 1 << 20  # a prompt larger than this cannot fit any context we serve
_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_tokens")
_INT_KEYS = ("max_tokens", "top_k", "seed", "min_tokens")
_FLOAT_KEYS = ("temperature", "top_p")
RELEASE_PARAMETER = "warmstart_release"  # request parameter (bool): drop the engine, ahead of an unload
RELEASED = "released"  # finish_reason of the one response that answers a release
LORA_RELOAD_PARAMETER = "warmstart_lora_reload"  # request parameter (bool): re-read multi_lora.json
LORA_RELOADED = "adapters_reloaded"  # finish_reason of the one response that answers a reload
# request parameter (string, JSON object) of a reload: the adapters to serve, written to multi_lora.json first
# (the scheduler's run-time add/remove; needs the repository key, as a release does)
LORA_ADAPTERS_PARAMETER = "warmstart_lora_adapters"
LORA_NAME_KEY = "lora_name"
MAX_LORA_NAME = 256


class RequestError(WarmstartError, ValueError):
    """A request cannot be served as sent (Triton code INVALID_ARG)."""


class MissingPrompt(RequestError):
    """Neither ``text_input`` nor ``input_ids`` was given."""


class BadInput(RequestError):
    """An input tensor has the wrong type, shape or value."""


class InvalidParametersJSON(RequestError):
    """``sampling_parameters`` is not a JSON object."""


class UnknownRequestParameter(RequestError):
    """A request parameter is not a sampling parameter."""


class ConflictingInputs(RequestError):
    """Inputs that cannot be combined (e.g. streaming with the prompt included in the output)."""


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request. ``prompt_ids``/``generated_ids`` are set only when ``input_ids`` was given."""

    text: str | None
    prompt_ids: tuple[int, ...] | None
    generated_ids: tuple[int, ...]
    stream: bool
    exclude_input_in_output: bool
    params: SamplingParams
    messages: tuple[dict[str, str], ...] | None = None  # a chat, rendered by the runtime's chat template
    lora_name: str | None = None  # the LoRA adapter to generate with (None: the base model)


def _single(name: str, value: np.ndarray) -> Any:
    arr = np.asarray(value)
    if arr.size != 1:
        raise BadInput(
            f"input {name!r} must hold exactly one element, got shape {list(arr.shape)}: one request is one "
            "generation (send one request per prompt)"
        )
    return arr.reshape(-1)[0]


def _bool(name: str, value: np.ndarray | None, default: bool | None) -> bool | None:
    if value is None:
        return default
    item = _single(name, value)
    if not isinstance(item, (bool, np.bool_)):
        raise BadInput(f"input {name!r} must be BOOL, got {np.asarray(value).dtype}")
    return bool(item)


def _text(name: str, value: np.ndarray) -> str:
    item = _single(name, value)
    if isinstance(item, (bytes, np.bytes_)):
        if len(item) > MAX_PROMPT_BYTES:
            raise PromptTooLong(f"input {name!r} is {len(item)} bytes; the limit is {MAX_PROMPT_BYTES}")
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(f"input {name!r} is not valid UTF-8: {e}") from None
    if isinstance(item, str):
        return item
    raise BadInput(f"input {name!r} must be STRING (BYTES), got {np.asarray(value).dtype}")


def _numbers_from_strings(obj: dict[str, Any], source: str) -> dict[str, Any]:
    """``obj`` with numeric strings of the integer and float keys read as numbers (as the vLLM backend does)."""
    out = dict(obj)
    for key, value in obj.items():
        if not isinstance(value, str) or key not in _INT_KEYS + _FLOAT_KEYS:
            continue
        integer = key in _INT_KEYS
        number = jsonsafe.number_from_string(value, integer=integer)
        if number is None:
            example = '"16"' if integer else '"0.1"'
            raise InvalidSamplingParams(
                f"{key} in {source} must be {'an integer' if integer else 'a number'}, got the string "
                f"{value[:40]!r} (a number, or a string spelling one such as {example}, is accepted)"
            )
        out[key] = number
    return out


def _lora_name(value: Any, source: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_LORA_NAME:
        raise BadInput(
            f"{LORA_NAME_KEY} in {source} must be a non-empty string of at most {MAX_LORA_NAME} characters "
            f"naming an adapter of the model's multi_lora.json, got {str(value)[:60]!r}"
        )
    return value


def _sampling_from_json(
    text: str, source: str, ignore: tuple[str, ...] = ()
) -> tuple[SamplingParams, str | None]:
    try:
        obj = jsonsafe.loads(text) if text.strip() else {}
    except jsonsafe.UnsafeJSON as e:
        raise InvalidParametersJSON(f"{source} is refused: {e}") from None
    except ValueError as e:  # JSONDecodeError, or an integer with too many digits
        raise InvalidParametersJSON(f"{source} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidParametersJSON(f"{source} must be a JSON object, got {type(obj).__name__}")
    obj = {k: v for k, v in obj.items() if k not in ignore}
    lora = _lora_name(obj.pop(LORA_NAME_KEY), source) if LORA_NAME_KEY in obj else None
    unknown = sorted(set(obj) - set(_SAMPLING_KEYS))
    if unknown:
        raise UnknownRequestParameter(
            f"unknown key(s) {unknown} in {source}; allowed: {', '.join((*_SAMPLING_KEYS, LORA_NAME_KEY))}"
        )
    return SamplingParams.from_json(_numbers_from_strings(obj, source)), lora


def _messages(value: np.ndarray) -> tuple[dict[str, str], ...]:
    text = _text("messages", value)
    try:
        obj = jsonsafe.loads(text)
    except jsonsafe.UnsafeJSON as e:
        raise BadInput(f"input 'messages' is refused: {e}") from None
    except ValueError as e:
        raise BadInput(f"input 'messages' is not valid JSON: {e}") from None
    return tuple(validate_messages(obj))


def is_release_request(parameters_json: str) -> bool:
    """Whether a request's parameters (Triton's ``request.parameters()`` JSON) ask for a release.

    Only :data:`RELEASE_PARAMETER` is looked at; it must be a JSON bool when present (BadInput otherwise).
    Unparseable or non-object JSON is not a release (:func:`parse_request` then reports it).
    """
    return _control_flag(parameters_json, RELEASE_PARAMETER)


def is_lora_reload_request(parameters_json: str) -> bool:
    """Whether a request's parameters ask the model to re-read its ``multi_lora.json``
    (:data:`LORA_RELOAD_PARAMETER` = true; a JSON bool, BadInput otherwise)."""
    return _control_flag(parameters_json, LORA_RELOAD_PARAMETER)


def lora_reload_adapters(parameters_json: str) -> str | None:
    """The ``multi_lora.json`` content a reload request carries (:data:`LORA_ADAPTERS_PARAMETER`, a string
    holding a JSON object; checked by the reader of the file), or None when it carries none (re-read the
    file as it is). BadInput for a value that is not a string."""
    if not parameters_json or LORA_ADAPTERS_PARAMETER not in parameters_json:
        return None
    try:
        obj = jsonsafe.loads(parameters_json)
    except ValueError:
        return None
    if not isinstance(obj, dict) or LORA_ADAPTERS_PARAMETER not in obj:
        return None
    value = obj[LORA_ADAPTERS_PARAMETER]
    if not isinstance(value, str):
        raise BadInput(
            f"request parameter {LORA_ADAPTERS_PARAMETER!r} must be a string holding the JSON object of "
            f"multi_lora.json, got {type(value).__name__}"
        )
    return value


def _control_flag(parameters_json: str, key: str) -> bool:
    if not parameters_json or key not in parameters_json:
        return False
    try:
        obj = jsonsafe.loads(parameters_json)
    except ValueError:  # malformed or unsafe JSON
        return False
    if not isinstance(obj, dict) or key not in obj:
        return False
    value = obj[key]
    if not isinstance(value, bool):
        raise BadInput(f"request parameter {key!r} must be a bool, got {value!r}")
    return value


def parse_request(inputs: Mapping[str, np.ndarray | None], parameters_json: str = "") -> GenerateRequest:
    """Validate one request's input tensors (``name -> array`` or None when absent) and parameters.

    Raises a :class:`RequestError` subclass, or the engines' `InvalidSamplingParams`, `EmptyPrompt`,
    `PromptTooLong` or `InvalidTokenId`; every one of them maps to INVALID_ARG (:func:`error_code`).
    """
    text_arr = inputs.get("text_input")
    text = _text("text_input", text_arr) if text_arr is not None else None
    msg_arr = inputs.get("messages")
    messages = _messages(msg_arr) if msg_arr is not None else None
    if messages is not None and text is not None:
        raise ConflictingInputs("send either text_input (a prompt) or messages (a chat), not both")
    stream = bool(_bool("stream", inputs.get("stream"), False))
    exclude = _bool("exclude_input_in_output", inputs.get("exclude_input_in_output"), None)
    if stream and exclude is False:
        raise ConflictingInputs(
            "exclude_input_in_output=false is not supported with stream=true: streamed responses carry only "
            "the new text"
        )
    exclude = stream if exclude is None else exclude

    sp = inputs.get("sampling_parameters")
    if sp is not None:
        params, lora = _sampling_from_json(_text("sampling_parameters", sp), "sampling_parameters")
    else:
        # a false control flag is not a sampling parameter
        params, lora = _sampling_from_json(
            parameters_json or "", "request parameters", (RELEASE_PARAMETER, LORA_RELOAD_PARAMETER)
        )

    ids_arr = inputs.get("input_ids")
    ngen_arr = inputs.get("num_generated")
    prompt_ids: tuple[int, ...] | None = None
    generated: tuple[int, ...] = ()
    if ids_arr is not None:
        ids = np.asarray(ids_arr)
        if ids.dtype.kind not in "iu":
            raise BadInput(f"input 'input_ids' must be INT64, got {ids.dtype}")
        flat = [int(t) for t in ids.reshape(-1)]
        if any(t < 0 for t in flat):
            raise InvalidTokenId("input 'input_ids' holds a negative token id")
        n_gen = 0
        if ngen_arr is not None:
            item = _single("num_generated", ngen_arr)
            if not isinstance(item, (int, np.integer)) or isinstance(item, (bool, np.bool_)):
                raise BadInput(f"input 'num_generated' must be INT64, got {np.asarray(ngen_arr).dtype}")
            n_gen = int(item)
        if not 0 <= n_gen <= len(flat):
            raise BadInput(f"num_generated={n_gen} must be in 0..{len(flat)} (the length of input_ids)")
        prompt_ids, generated = tuple(flat[: len(flat) - n_gen]), tuple(flat[len(flat) - n_gen :])
        if not prompt_ids:
            if not text and messages is None:
                raise EmptyPrompt("input_ids holds no prompt tokens (num_generated covers all of them)")
            # resume from text: the prompt is text_input or messages (rendered and tokenized here), input_ids
            # are all generated
            prompt_ids = None
        elif messages is not None:
            raise ConflictingInputs(
                "messages is the prompt, so input_ids may hold only generated ids (num_generated = their count)"
            )
    elif ngen_arr is not None:
        raise ConflictingInputs("num_generated needs input_ids (prompt ids followed by the generated ids)")
    elif messages is not None:
        pass
    elif text is None:
        raise MissingPrompt(
            "the request needs 'text_input' or 'messages' (or 'input_ids' to resume a generation)"
        )
    elif not text:
        raise EmptyPrompt("text_input is empty; send a prompt of at least one character")
    return GenerateRequest(
        text=text,
        prompt_ids=prompt_ids,
        generated_ids=generated,
        stream=stream,
        exclude_input_in_output=exclude,
        params=params,
        messages=messages,
        lora_name=lora,
    )


def request_to_json(request: GenerateRequest) -> dict[str, Any]:
    """``request`` as a JSON object (what a stub sends to its engine process)."""
    p = request.params
    return {
        "text": request.text,
        "prompt_ids": list(request.prompt_ids) if request.prompt_ids is not None else None,
        "generated_ids": list(request.generated_ids),
        "stream": request.stream,
        "exclude_input_in_output": request.exclude_input_in_output,
        "messages": list(request.messages) if request.messages is not None else None,
        "lora_name": request.lora_name,
        "params": {
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,
            "seed": p.seed,
            "stop": list(p.stop),
            "min_tokens": p.min_tokens,
        },
    }


def _ids(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise BadInput(f"{name} must be a list of non-negative integers")
    return tuple(value)


def request_from_json(obj: Any) -> GenerateRequest:
    """The inverse of :func:`request_to_json`, validating every field (the object crossed a process)."""
    if not isinstance(obj, dict):
        raise BadInput("a request must be a JSON object")
    expected = {
        "text",
        "prompt_ids",
        "generated_ids",
        "stream",
        "exclude_input_in_output",
        "messages",
        "lora_name",
        "params",
    }
    if set(obj) != expected:
        raise BadInput(f"a request has exactly the keys {sorted(expected)}, got {sorted(obj)}")
    text = obj["text"]
    if text is not None and not isinstance(text, str):
        raise BadInput("text must be a string or null")
    prompt_ids = _ids("prompt_ids", obj["prompt_ids"]) if obj["prompt_ids"] is not None else None
    messages = tuple(validate_messages(obj["messages"])) if obj["messages"] is not None else None
    if text is None and not prompt_ids and messages is None:
        raise MissingPrompt("the request needs a text, messages or prompt ids")
    for name in ("stream", "exclude_input_in_output"):
        if not isinstance(obj[name], bool):
            raise BadInput(f"{name} must be a bool")
    return GenerateRequest(
        text=text,
        prompt_ids=prompt_ids,
        generated_ids=_ids("generated_ids", obj["generated_ids"]),
        stream=obj["stream"],
        exclude_input_in_output=obj["exclude_input_in_output"],
        params=SamplingParams.from_json(obj["params"]),
        messages=messages,
        lora_name=None if obj["lora_name"] is None else _lora_name(obj["lora_name"], "the request"),
    )


def error_code(exc: BaseException) -> str:
    """The Triton error code name (``pb_utils.TritonError.<name>``) for a request's failure."""
    if isinstance(
        exc,
        (
            RequestError,
            ChatError,
            InvalidSamplingParams,
            EmptyPrompt,
            PromptTooLong,
            InvalidTokenId,
            UnknownAdapter,
            LoraNotEnabled,
        ),
    ):
        return "INVALID_ARG"
    if isinstance(exc, GeneratorClosed):
        return "UNAVAILABLE"
    return "INTERNAL"
