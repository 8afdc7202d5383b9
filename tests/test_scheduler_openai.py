"""The scheduler's OpenAI API checked with the official ``openai`` client, and the EOS / ``min_tokens``
behaviour through every front end, against a real tritonserver running the real ``warmstart`` backend.

Three tiny random Llama checkpoints with the same weights: ``tiny`` has no EOS (generations run to
``max_tokens``); ``tiny_eos`` declares as EOS the first token greedy decoding picks for :data:`EOS_PROMPT`
(and for its chat rendering), so, like SmolLM2 on "What is Triton Inference Server?", a greedy answer is
empty with finish_reason "stop" unless ``min_tokens`` holds the EOS back. Both carry :data:`CHAT_TEMPLATE`
(one ``role: content`` line per turn) as their chat template; ``tiny_plain`` has none.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _scheduler_cluster import REPO_KEY, BackgroundScheduler, scheduler_config
from backend_support import byte_tokenizer_json, grpc_generate, make_tiny_checkpoint, write_model

from warmstart.backend.runtime import Runtime
from warmstart.chat import ChatTemplate, validate_messages
from warmstart.engines import SamplingParams
from warmstart.triton import TritonConfig, TritonServer
from warmstart.tritonconfig import ModelSettings

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.triton, pytest.mark.slow]

PROMPT = "Once upon a time"
EOS_PROMPT = "What is Triton Inference Server?"
EOS_MESSAGES = [{"role": "user", "content": EOS_PROMPT}]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def chat_prompt(messages: list[dict[str, Any]]) -> str:
    """What the backend renders for ``messages`` with :data:`CHAT_TEMPLATE`."""
    return ChatTemplate(CHAT_TEMPLATE).render(validate_messages(messages))


class Cluster:
    def __init__(self, triton: TritonServer, sched: BackgroundScheduler, eos: dict[str, int]) -> None:
        self.triton, self.sched, self.eos = triton, sched, eos
        self.client = openai.OpenAI(
            base_url=f"{sched.http}/v1", api_key="not-checked", max_retries=0, timeout=120
        )


def _first_greedy_tokens(ckpt: Path, prompts: list[str]) -> list[int]:
    rt = Runtime.load(ModelSettings(checkpoint=str(ckpt), engine="torch", max_batch=1), warmup=False)
    try:
        return [rt.generator.generate(rt.encode(p), SamplingParams(max_tokens=1))[0][0] for p in prompts]
    finally:
        rt.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("openai")
    plain = make_tiny_checkpoint(root / "plain", "llama", chat_template=CHAT_TEMPLATE)
    no_template = make_tiny_checkpoint(root / "no_template", "llama")
    t_text, t_chat = _first_greedy_tokens(plain, [EOS_PROMPT, chat_prompt(EOS_MESSAGES)])
    eos_ckpt = make_tiny_checkpoint(
        root / "eos", "llama", eos_token_id=sorted({t_text, t_chat}), chat_template=CHAT_TEMPLATE
    )
    repo = root / "repo"
    write_model(repo, "tiny", str(plain), "torch")
    write_model(repo, "tiny_eos", str(eos_ckpt), "torch")
    write_model(repo, "tiny_plain", str(no_template), "torch")
    triton: TritonServer | None = None
    sched: BackgroundScheduler | None = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # 2 shared cores
        try:
            triton = TritonServer(
                TritonConfig(model_repositories=(repo,), repository_api_key=REPO_KEY), workdir=root / "t0"
            )
            triton.start()
            sched = BackgroundScheduler(
                scheduler_config(
                    [
                        {
                            "name": "s0",
                            "grpc": triton.grpc_url,
                            "repository_api_key": REPO_KEY,
                            "bandwidth": {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8},
                        }
                    ],
                    {
                        "tiny": {"checkpoint": str(plain), "engine": "torch", "size_bytes": 1 << 20},
                        "tiny_eos": {"checkpoint": str(eos_ckpt), "engine": "torch", "size_bytes": 1 << 20},
                        "tiny_plain": {
                            "checkpoint": str(no_template),
                            "engine": "torch",
                            "size_bytes": 1 << 20,
                        },
                    },
                    upstream_timeout_s=30.0,
                )
            )
            yield Cluster(triton, sched, {"text": t_text, "chat": t_chat})
        finally:
            if sched is not None:
                sched.close()
            if triton is not None:
                triton.stop()


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _generate(url: str, model: str, prompt: str, **params: Any) -> dict[str, Any]:
    """KServe ``generate`` (the scheduler's or tritonserver's), the prompt left out of the text."""
    status, body = _post(
        f"{url}/v2/models/{model}/generate",
        {"text_input": prompt, "exclude_input_in_output": True, "parameters": params},
    )
    assert status == 200, body
    return dict(json.loads(body))


def _sse(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    status, payload = _post(url, body)
    assert status == 200, payload
    return [json.loads(line[6:]) for line in payload.splitlines() if line.startswith("data: ")]


# -- the official client --------------------------------------------------------------------------------------


def test_models_list_parses_and_names_every_deployed_model(cluster: Cluster) -> None:
    models = cluster.client.models.list()
    assert sorted(m.id for m in models) == ["tiny", "tiny_eos", "tiny_plain"]
    assert all(m.object == "model" and m.owned_by == "warmstart" for m in models)


def test_completions_report_the_prompt_tokens_and_the_right_text(cluster: Cluster) -> None:
    want = _generate(cluster.sched.http, "tiny", PROMPT, max_tokens=5)
    c = cluster.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5)
    assert c.object == "text_completion" and c.id.startswith("cmpl-") and c.model == "tiny"
    assert len(c.choices) == 1 and c.choices[0].index == 0
    assert c.choices[0].text == want["text_output"] and c.choices[0].finish_reason == "length"
    assert c.usage is not None
    assert c.usage.prompt_tokens == len(PROMPT.encode())  # the byte tokenizer: one token per byte
    assert c.usage.completion_tokens == 5 and c.usage.total_tokens == len(PROMPT.encode()) + 5


def test_streamed_completions_with_include_usage_end_with_a_usage_chunk(cluster: Cluster) -> None:
    want = _generate(cluster.sched.http, "tiny", PROMPT, max_tokens=4)
    chunks = list(
        cluster.client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    *content, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT.encode()), 4)
    assert all(c.usage is None and len(c.choices) == 1 for c in content)
    assert len({c.id for c in chunks}) == 1 and all(c.model == "tiny" for c in chunks)
    assert "".join(c.choices[0].text for c in content) == want["text_output"]
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])


def test_chat_completions_stream_and_not_with_usage(cluster: Cluster) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    want = _generate(cluster.sched.http, "tiny", chat_prompt(messages), max_tokens=4)
    n_prompt = len(chat_prompt(messages).encode())
    c = cluster.client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert c.object == "chat.completion" and c.id.startswith("chatcmpl-") and c.model == "tiny"
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content == want["text_output"]
    assert c.choices[0].finish_reason == "length"
    assert c.usage is not None and (c.usage.prompt_tokens, c.usage.completion_tokens) == (n_prompt, 4)
    chunks = list(
        cluster.client.chat.completions.create(
            model="tiny",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == want["text_output"]
    assert content[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        n_prompt,
        4,
        n_prompt + 4,
    )


def test_max_completion_tokens_is_honoured_and_a_conflict_with_max_tokens_is_refused(
    cluster: Cluster,
) -> None:
    c = cluster.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=3,
    )
    assert c.usage is not None and c.usage.completion_tokens == 3 and c.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="disagree"):
        cluster.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, max_completion_tokens=3
        )


def test_what_is_not_supported_is_a_400_naming_it(cluster: Cluster) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    cases: list[tuple[Any, str]] = [
        (lambda: cluster.client.completions.create(model="tiny", prompt="hi", n=2), "n > 1"),
        (lambda: cluster.client.completions.create(model="tiny", prompt="hi", logprobs=1), "logprobs"),
        (
            lambda: cluster.client.chat.completions.create(model="tiny", messages=msgs, logprobs=True),
            "logprobs",
        ),
        (
            lambda: cluster.client.chat.completions.create(model="tiny", messages=msgs, tools=[]),
            "'tools'",
        ),
        (
            lambda: cluster.client.completions.create(
                model="tiny", prompt="hi", extra_body={"frobnicate": 1}
            ),
            "'frobnicate'",
        ),
        (
            lambda: cluster.client.completions.create(
                model="tiny", prompt="hi", stream_options={"include_usage": True}
            ),
            "stream: true",
        ),
    ]
    for call, needle in cases:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.status_code == 400
        assert needle in str(info.value), info.value
        assert isinstance(info.value.body, dict) and info.value.body["type"] == "invalid_request_error"


def test_a_token_id_prompt_generates_what_its_text_does(cluster: Cluster) -> None:
    text = cluster.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5)
    from tokenizers import Tokenizer

    prompt_ids = Tokenizer.from_str(byte_tokenizer_json()).encode(PROMPT).ids
    ids = cluster.client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=5)
    assert ids.choices[0].text == text.choices[0].text
    assert ids.usage is not None and ids.usage.prompt_tokens == len(PROMPT.encode())
    assert ids.usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError, match="token id"):
        cluster.client.completions.create(model="tiny", prompt=[1, 10**9], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="one request serves one prompt"):
        cluster.client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2)


def test_chat_with_a_model_without_a_template_or_with_a_bad_role_is_a_400(cluster: Cluster) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        cluster.client.chat.completions.create(model="tiny_plain", messages=EOS_MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert "model 'tiny_plain' has no chat template" in str(info.value) and "/v1/completions" in str(
        info.value
    )
    with pytest.raises(openai.BadRequestError, match="role must be one of"):
        cluster.client.chat.completions.create(
            model="tiny",
            messages=[{"role": "root", "content": "hi"}],  # type: ignore[list-item]
        )


# -- the model's EOS and min_tokens through every front end ---------------------------------------------------


def test_openai_says_the_model_ended_its_answer_and_min_tokens_holds_it_back(cluster: Cluster) -> None:
    c = cluster.client.completions.create(model="tiny_eos", prompt=EOS_PROMPT, max_tokens=8)
    assert c.choices[0].text == "" and c.choices[0].finish_reason == "stop"
    assert getattr(c.choices[0], "stop_reason", None) == cluster.eos["text"]
    assert c.usage is not None and c.usage.completion_tokens == 0
    assert c.usage.prompt_tokens == len(EOS_PROMPT.encode())
    chat = cluster.client.chat.completions.create(model="tiny_eos", messages=EOS_MESSAGES, max_tokens=8)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == "" and chat.choices[0].finish_reason == "stop"
    assert getattr(chat.choices[0], "stop_reason", None) == cluster.eos["chat"]
    chunks = list(
        cluster.client.completions.create(
            model="tiny_eos",
            prompt=EOS_PROMPT,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert getattr(chunks[-2].choices[0], "stop_reason", None) == cluster.eos["text"]
    held = cluster.client.completions.create(
        model="tiny_eos", prompt=EOS_PROMPT, max_tokens=8, extra_body={"min_tokens": 3}
    )
    assert held.usage is not None and held.usage.completion_tokens >= 3
    held_chat = cluster.client.chat.completions.create(
        model="tiny_eos",
        messages=EOS_MESSAGES,  # type: ignore[arg-type]
        max_tokens=8,
        extra_body={"min_tokens": 3},
    )
    assert held_chat.usage is not None and held_chat.usage.completion_tokens >= 3


def _check_eos(out: dict[str, Any] | Any, eos: int, min_tokens: int) -> None:
    get = out.get if isinstance(out, dict) else lambda k: getattr(out, k)
    if min_tokens == 0:
        assert get("finish_reason") == "stop" and get("stop_token_id") == eos
        ids = get("token_ids") if isinstance(out, dict) else out.ids
        assert list(ids) == []
    else:
        ids = get("token_ids") if isinstance(out, dict) else out.ids
        assert len(ids) >= min_tokens and eos not in ids


@pytest.mark.parametrize("min_tokens", [0, 3])
def test_kserve_and_grpc_say_the_model_ended_its_answer_and_honour_min_tokens(
    cluster: Cluster, min_tokens: int
) -> None:
    eos = cluster.eos["text"]
    params: dict[str, Any] = {"max_tokens": 8, **({"min_tokens": min_tokens} if min_tokens else {})}
    # the scheduler's KServe generate and generate_stream
    _check_eos(_generate(cluster.sched.http, "tiny_eos", EOS_PROMPT, **params), eos, min_tokens)
    events = _sse(
        f"{cluster.sched.http}/v2/models/tiny_eos/generate_stream",
        {"text_input": EOS_PROMPT, "parameters": {**params, "stream": True}},
    )
    final = dict(events[-1])
    final["token_ids"] = [t for e in events for t in e["token_ids"]]
    _check_eos(final, eos, min_tokens)
    assert final["prompt_tokens"] == len(EOS_PROMPT.encode())
    # the scheduler's gRPC stream
    r = grpc_generate(cluster.sched.grpc, "tiny_eos", EOS_PROMPT, params=params)
    assert r.error is None, r.error
    _check_eos(r, eos, min_tokens)
    # directly against tritonserver: its HTTP generate and gRPC stream (the model is loaded by now)
    _check_eos(
        _generate(f"http://{cluster.triton.http_url}", "tiny_eos", EOS_PROMPT, **params), eos, min_tokens
    )
    r = grpc_generate(cluster.triton.grpc_url, "tiny_eos", EOS_PROMPT, params=params)
    assert r.error is None, r.error
    _check_eos(r, eos, min_tokens)
    assert r.prompt_tokens == len(EOS_PROMPT.encode())
