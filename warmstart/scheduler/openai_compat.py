"""The OpenAI-compatible API of the scheduler, as pure functions: request bodies in, responses out.

``/v1/completions`` and ``/v1/chat/completions`` bodies are checked key by key (:func:`parse_completion`,
:func:`parse_chat`): a key this server does not implement is a 400 naming it, never silently ignored; keys
whose OpenAI default is all we do (``n``, ``logprobs``, ``echo``, penalties...) are accepted only at that
default. The HTTP front end (``warmstart.scheduler.http_frontend``) turns an :class:`OpenAIRequest` into a
router generation and renders its result with :func:`completion_response` / :func:`stream_chunk` /
:func:`usage_chunk`.

Why ``n > 1`` and ``logprobs`` are refused rather than supported: each choice would be one more full
generation through the router (its own placement, slot, failover and token-exact resume), with no shared
prefill, so ``n`` choices cost ``n`` requests; a client that wants them sends ``n`` requests with different
seeds. The backend's responses carry token ids, not log-probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from warmstart.names import validate_model_name
from warmstart.scheduler.protocol import BadRequest, chat_messages, coerce_sampling

__all__ = [
    "COMPLETION_DEFAULT_MAX_TOKENS",
    "MAX_PROMPT_TOKEN_IDS",
    "OpenAIRequest",
    "completion_response",
    "parse_chat",
    "parse_completion",
    "stream_chunk",
    "usage",
    "usage_chunk",
]

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the model's limit
MAX_PROMPT_TOKEN_IDS = 1 << 20  # a token-id prompt longer than this fits no context we serve

# keys passed on as sampling parameters (coerce_sampling checks their types); top_k and min_tokens are
# vLLM's extensions of the API
_SAMPLING = frozenset({"max_tokens", "temperature", "top_p", "seed", "stop", "top_k", "min_tokens"})
# keys read here; "user" is OpenAI's end-user id for abuse monitoring: accepted and not used
_OWN = frozenset({"model", "stream", "stream_options", "max_completion_tokens", "user"})


def _is_default(default: Any) -> Any:
    return lambda v: v is None or (v == default and type(v) is type(default))


# keys accepted only at their OpenAI default (None is always the default): what each would need
_DEFAULT_ONLY_COMMON: dict[str, tuple[Any, str]] = {
    "n": (_is_default(1), "n > 1 (several choices) is not supported: send one request per choice"),
    "presence_penalty": (
        lambda v: v is None or (isinstance(v, int | float) and not isinstance(v, bool) and v == 0),
        "presence_penalty is not supported (only 0)",
    ),
    "frequency_penalty": (
        lambda v: v is None or (isinstance(v, int | float) and not isinstance(v, bool) and v == 0),
        "frequency_penalty is not supported (only 0)",
    ),
    "logit_bias": (lambda v: v is None or v == {}, "logit_bias is not supported"),
}
_DEFAULT_ONLY_COMPLETION: dict[str, tuple[Any, str]] = {
    **_DEFAULT_ONLY_COMMON,
    "logprobs": (lambda v: v is None or v is False, "logprobs are not supported (the backend returns none)"),
    "echo": (lambda v: v is None or v is False, "echo is not supported: prepend the prompt yourself"),
    "best_of": (_is_default(1), "best_of > 1 is not supported"),
    "suffix": (lambda v: v is None or v == "", "suffix (insertion) is not supported"),
}
_DEFAULT_ONLY_CHAT: dict[str, tuple[Any, str]] = {
    **_DEFAULT_ONLY_COMMON,
    "logprobs": (lambda v: v is None or v is False, "logprobs are not supported (the backend returns none)"),
    "top_logprobs": (lambda v: v is None or (v == 0 and v is not False), "top_logprobs are not supported"),
    "response_format": (
        lambda v: v is None or v == {"type": "text"},
        'response_format other than {"type": "text"} is not supported',
    ),
}
COMPLETION_KEYS = frozenset(_SAMPLING | _OWN | {"prompt"} | set(_DEFAULT_ONLY_COMPLETION))
CHAT_KEYS = frozenset(_SAMPLING | _OWN | {"messages"} | set(_DEFAULT_ONLY_CHAT))


@dataclass(frozen=True)
class OpenAIRequest:
    """A checked OpenAI request: what the router generates and how the answer is rendered."""

    model: str
    prompt: str  # empty for a token-id prompt and for a chat
    sampling: dict[str, Any]
    chat: bool
    stream: bool = False
    include_usage: bool = False
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] | None = None  # a chat: the backend renders its own template


def _check_keys(body: Mapping[str, Any], allowed: frozenset[str], endpoint: str) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        shown = ", ".join(repr(k)[:60] for k in unknown[:5])
        raise BadRequest(
            f"{endpoint} does not support the key(s) {shown}; supported: {', '.join(sorted(allowed))}"
        )


def _check_defaults(body: Mapping[str, Any], table: Mapping[str, tuple[Any, str]]) -> None:
    for key, (ok, why) in table.items():
        if key in body and not ok(body[key]):
            raise BadRequest(f"{why} (got {key}={body[key]!r:.60})")


def _bool(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false, got {value!r:.60}")
    return value


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    """``include_usage`` from ``stream_options`` (only with ``stream: true``, as OpenAI and vLLM require)."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise BadRequest("stream_options is only allowed with stream: true")
    if not isinstance(opts, Mapping):
        raise BadRequest('stream_options must be an object such as {"include_usage": true}')
    unknown = sorted(k for k in opts if k != "include_usage")
    if unknown:
        raise BadRequest(f"stream_options does not support {unknown!r:.80}; supported: include_usage")
    return _bool(opts, "include_usage")


def _max_tokens(body: Mapping[str, Any], default: int) -> Any:
    """``max_tokens`` / ``max_completion_tokens`` (the newer name for chat): either, or both if equal."""
    a, b = body.get("max_tokens"), body.get("max_completion_tokens")
    if a is not None and b is not None and a != b:
        raise BadRequest(
            f"max_tokens ({a!r:.20}) and max_completion_tokens ({b!r:.20}) disagree: send one of them"
        )
    value = b if b is not None else a
    return default if value is None else value


def _sampling(body: Mapping[str, Any], default_max_tokens: int) -> dict[str, Any]:
    given = {k: v for k, v in body.items() if k in _SAMPLING and k != "max_tokens"}
    given["max_tokens"] = _max_tokens(body, default_max_tokens)
    try:
        return coerce_sampling(given, strict=True)
    except BadRequest:
        raise
    except ValueError as e:  # a coercion that failed without a BadRequest of its own
        raise BadRequest(str(e)) from None


def _token_ids(value: Sequence[Any]) -> tuple[int, ...]:
    if len(value) > MAX_PROMPT_TOKEN_IDS:
        raise BadRequest(f"a token-id prompt holds at most {MAX_PROMPT_TOKEN_IDS} ids, got {len(value)}")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise BadRequest("a token-id prompt must be a list of non-negative integers")
    return tuple(value)


def _completion_prompt(prompt: Any) -> tuple[str, tuple[int, ...] | None]:
    """``(text, None)`` or ``("", ids)`` from the forms OpenAI allows: a string, a token-id list, or a
    list holding one of those (a batch of one). A batch of several prompts is refused."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt is empty; send at least one character (or token id)")
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise BadRequest(
            f"prompt holds {len(prompt)} prompts; one request serves one prompt (send one request each)"
        )
    if isinstance(prompt, list) and prompt:
        return "", _token_ids(prompt)
    raise BadRequest("prompt must be a non-empty string, a list of token ids, or a list holding one of those")


def _common(body: Mapping[str, Any], *, chat: bool, default_max_tokens: int) -> dict[str, Any]:
    model = validate_model_name(body.get("model"))
    stream = _bool(body, "stream")
    include_usage = _stream_options(body, stream)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("user must be a string")
    return {
        "model": model,
        "sampling": _sampling(body, default_max_tokens),
        "chat": chat,
        "stream": stream,
        "include_usage": include_usage,
    }


def parse_completion(body: Mapping[str, Any]) -> OpenAIRequest:
    """A ``/v1/completions`` body, checked; :class:`BadRequest` names what is wrong or unsupported."""
    _check_keys(body, COMPLETION_KEYS, "/v1/completions")
    _check_defaults(body, _DEFAULT_ONLY_COMPLETION)
    if "prompt" not in body:
        raise BadRequest("prompt is required")
    text, ids = _completion_prompt(body["prompt"])
    common = _common(body, chat=False, default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS)
    return OpenAIRequest(prompt=text, prompt_ids=ids, **common)


def parse_chat(body: Mapping[str, Any], *, default_max_tokens: int) -> OpenAIRequest:
    """A ``/v1/chat/completions`` body, checked (``messages`` by :func:`~warmstart.scheduler.protocol.
    chat_messages`); without ``max_tokens``/``max_completion_tokens`` it may generate ``default_max_tokens``
    (the model's limit: OpenAI's chat has no small default). The messages go to the backend as they are,
    which renders them with the model's own chat template (``warmstart.chat``)."""
    _check_keys(body, CHAT_KEYS, "/v1/chat/completions")
    _check_defaults(body, _DEFAULT_ONLY_CHAT)
    messages = chat_messages(body.get("messages"))
    common = _common(body, chat=True, default_max_tokens=default_max_tokens)
    return OpenAIRequest(prompt="", messages=messages, **common)


# -- responses ----------------------------------------------------------------------------------------------


def usage(prompt_tokens: int | None, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object. ``prompt_tokens`` None (a backend that does not report it) counts 0."""
    p = prompt_tokens or 0
    return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}


def _choice(
    chat: bool, text: str, finish_reason: str | None, stop_token_id: int | None, *, first: bool, stream: bool
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0}
    if chat and stream:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice["delta"] = delta
    elif chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    # vLLM's field: what ended a "stop"; here the EOS token id when the model ended its answer with one
    choice["stop_reason"] = stop_token_id if finish_reason == "stop" else None
    return choice


def completion_response(
    req: OpenAIRequest,
    *,
    cid: str,
    created: int,
    text: str,
    finish_reason: str | None,
    stop_token_id: int | None,
    prompt_tokens: int | None,
    completion_tokens: int,
) -> dict[str, Any]:
    """The non-streaming ``text_completion`` / ``chat.completion`` object."""
    return {
        "id": cid,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": created,
        "model": req.model,
        "choices": [
            _choice(req.chat, text, finish_reason or "stop", stop_token_id, first=True, stream=False)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def stream_chunk(
    req: OpenAIRequest,
    *,
    cid: str,
    created: int,
    text: str,
    finish_reason: str | None,
    stop_token_id: int | None,
    first: bool,
) -> dict[str, Any]:
    """One streamed chunk (``usage: null`` on every content chunk when usage was asked for, as OpenAI)."""
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": req.model,
        "choices": [_choice(req.chat, text, finish_reason, stop_token_id, first=first, stream=True)],
    }
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(
    req: OpenAIRequest, *, cid: str, created: int, prompt_tokens: int | None, completion_tokens: int
) -> dict[str, Any]:
    """The chunk ``stream_options.include_usage`` asks for, before ``[DONE]``: no choices, the usage."""
    return {
        "id": cid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": req.model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }
