"""The OpenAI request checks and response shapes (``warmstart.scheduler.openai_compat``) and the chat
messages' checks (``chat_messages``), as pure functions: no servers."""

from __future__ import annotations

from typing import Any

import pytest

from warmstart.scheduler.openai_compat import (
    completion_response,
    parse_chat,
    parse_completion,
    stream_chunk,
    usage_chunk,
)
from warmstart.scheduler.protocol import BadRequest, chat_messages


def completion(**kw: Any) -> Any:
    return parse_completion({"model": "m", "prompt": "hi", **kw})


def chat(messages: Any = None, **kw: Any) -> Any:
    body = {"model": "m", "messages": messages or [{"role": "user", "content": "hi"}], **kw}
    return parse_chat(body, default_max_tokens=512)


def test_sampling_keys_pass_through_and_the_defaults_are_openais() -> None:
    req = completion(temperature=0.5, top_p=0.9, seed=3, stop=["\n"], top_k=5, min_tokens=1, user="u1")
    assert req.sampling == {
        "max_tokens": 16,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["\n"],
        "top_k": 5,
        "min_tokens": 1,
    }
    assert not req.stream and not req.include_usage and req.prompt_ids is None
    assert chat().sampling == {"max_tokens": 512}  # chat: up to the model's limit


def test_max_completion_tokens_is_the_limit_and_must_agree_with_max_tokens() -> None:
    assert chat(max_completion_tokens=3).sampling["max_tokens"] == 3
    assert completion(max_completion_tokens=3).sampling["max_tokens"] == 3
    assert chat(max_completion_tokens=3, max_tokens=3).sampling["max_tokens"] == 3
    with pytest.raises(BadRequest, match="disagree"):
        chat(max_completion_tokens=3, max_tokens=16)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("n", 2, "n > 1"),
        ("logprobs", 1, "logprobs"),
        ("logprobs", 0, "logprobs"),
        ("echo", True, "echo"),
        ("best_of", 3, "best_of"),
        ("presence_penalty", 0.5, "presence_penalty"),
        ("frequency_penalty", 1, "frequency_penalty"),
        ("logit_bias", {"1": 5}, "logit_bias"),
        ("suffix", "x", "suffix"),
        ("tools", [], "'tools'"),
        ("frobnicate", 1, "'frobnicate'"),
        ("stream_options", {"include_usage": True}, "stream: true"),
    ],
)
def test_what_completions_do_not_support_is_refused_by_name(key: str, value: Any, needle: str) -> None:
    with pytest.raises(BadRequest, match=None) as info:
        completion(**{key: value})
    assert needle in str(info.value)


def test_defaults_of_unsupported_features_are_accepted() -> None:
    completion(n=1, logprobs=None, echo=False, best_of=1, presence_penalty=0, frequency_penalty=0.0)
    chat(n=1, logprobs=False, top_logprobs=None, logit_bias={}, response_format={"type": "text"})
    with pytest.raises(BadRequest, match="n > 1"):
        chat(n=True)  # a bool is not the number 1
    with pytest.raises(BadRequest, match="top_logprobs"):
        chat(top_logprobs=2)
    with pytest.raises(BadRequest, match="response_format"):
        chat(response_format={"type": "json_object"})
    with pytest.raises(BadRequest, match="does not support the key"):
        chat(echo=False)  # a completions-only key


def test_stream_options_ask_for_usage_only_with_stream() -> None:
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage
    assert not completion(stream=True, stream_options={"include_usage": False}).include_usage
    with pytest.raises(BadRequest, match="include_usage"):
        completion(stream=True, stream_options={"continuous_usage_stats": True})
    with pytest.raises(BadRequest, match="true or false"):
        completion(stream="yes")


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [
        ("hi", "hi", None),
        (["hi"], "hi", None),
        ([1, 2, 3], "", (1, 2, 3)),
        ([[4, 5]], "", (4, 5)),
    ],
)
def test_the_prompt_forms_openai_allows(prompt: Any, text: str, ids: Any) -> None:
    req = completion(prompt=prompt)
    assert (req.prompt, req.prompt_ids) == (text, ids)


@pytest.mark.parametrize(
    ("prompt", "needle"),
    [
        ("", "empty"),
        ([], "non-empty"),
        (["a", "b"], "2 prompts"),
        ([[1], [2]], "2 prompts"),
        ([1, -2], "non-negative"),
        ([1, True], "non-negative integers"),
        ([1, 2.5], "non-negative integers"),
        (7, "must be"),
    ],
)
def test_bad_prompts_are_refused(prompt: Any, needle: str) -> None:
    with pytest.raises(BadRequest) as info:
        completion(prompt=prompt)
    assert needle in str(info.value)


def test_responses_carry_usage_finish_reason_and_the_eos_id() -> None:
    req = completion()
    out = completion_response(
        req,
        cid="cmpl-1",
        created=5,
        text="",
        finish_reason="stop",
        stop_token_id=2,
        prompt_tokens=9,
        completion_tokens=0,
    )
    assert out["object"] == "text_completion" and out["model"] == "m"
    assert out["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop", "stop_reason": 2}
    ]
    assert out["usage"] == {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}
    c = chat(stream=True, stream_options={"include_usage": True})
    first = stream_chunk(c, cid="x", created=1, text="a", finish_reason=None, stop_token_id=None, first=True)
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"content": "a", "role": "assistant"}
    last = stream_chunk(
        c, cid="x", created=1, text="", finish_reason="length", stop_token_id=None, first=False
    )
    assert last["choices"][0]["stop_reason"] is None and "role" not in last["choices"][0]["delta"]
    u = usage_chunk(c, cid="x", created=1, prompt_tokens=None, completion_tokens=3)
    assert u["choices"] == [] and u["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 3,
        "total_tokens": 3,
    }


# -- chat messages --------------------------------------------------------------------------------------------


def test_a_chat_goes_to_the_backend_as_its_messages_not_as_a_prompt_of_the_schedulers() -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a: b"}, {"type": "text", "text": "c"}]},
        {
            "role": "assistant",
            "content": "ok\nuser: said so",
        },  # no longer a forged turn: the model's template
        {"role": "tool", "content": "42"},
    ]
    req = chat(msgs)
    assert req.chat and req.prompt == "" and req.prompt_ids is None
    assert req.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a: b\nc"},
        {"role": "assistant", "content": "ok\nuser: said so"},
        {"role": "tool", "content": "42"},
    )
    assert chat_messages(msgs) == req.messages


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        ({"role": "root", "content": "x"}, "role must be one of system, user, assistant, tool"),
        ({"role": "developer", "content": "x"}, "role must be one of"),
        ({"role": "user"}, "content must be a string"),
        ({"role": "user", "content": None}, "content must be a string"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, "text parts"),
        ({"role": "user", "content": "x", "name": "bob"}, "unsupported key(s) ['name']"),
        ("user: hi", "must be an object"),
    ],
)
def test_chat_messages_outside_what_templates_render_are_refused(message: Any, needle: str) -> None:
    with pytest.raises(BadRequest) as info:
        chat([message])
    assert needle in str(info.value)
    with pytest.raises(BadRequest, match="non-empty list"):
        parse_chat({"model": "m", "messages": []}, default_max_tokens=512)
