"""A generation the model ends with its EOS token says so (finish "stop" plus the EOS id), and ``min_tokens``
holds the EOS back: in the sampling parameters, the batched generator, the backend's request parsing and its
runtime (a tiny random Llama whose EOS is, by construction, the first token greedy decoding picks)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from backend_support import RecordingSink, make_tiny_checkpoint

from warmstart.backend.request import parse_request, request_from_json, request_to_json
from warmstart.backend.runtime import Runtime
from warmstart.engines import InvalidSamplingParams, SamplingParams
from warmstart.tritonconfig import ModelSettings

pytestmark = pytest.mark.slow

PROMPT = "What is Triton Inference Server?"


def _load(ckpt: Path) -> Runtime:
    return Runtime.load(ModelSettings(checkpoint=str(ckpt), engine="torch", max_batch=2), warmup=False)


@pytest.fixture(scope="module")
def first_token(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[int]]:
    """The first greedy token for PROMPT of the tiny model without EOS, and its 8-token greedy answer."""
    rt = _load(make_tiny_checkpoint(tmp_path_factory.mktemp("plain") / "ckpt"))
    try:
        out, reason = rt.generator.generate(rt.encode(PROMPT), SamplingParams(max_tokens=8))
    finally:
        rt.close()
    assert reason == "length"
    return out[0], out


@pytest.fixture(scope="module")
def eos_runtime(
    tmp_path_factory: pytest.TempPathFactory, first_token: tuple[int, list[int]]
) -> Iterator[Runtime]:
    """The same weights, with the first greedy token declared the model's EOS."""
    rt = _load(make_tiny_checkpoint(tmp_path_factory.mktemp("eos") / "ckpt", eos_token_id=first_token[0]))
    try:
        yield rt
    finally:
        rt.close()


def _run(rt: Runtime, params: dict[str, object], *, stream: bool = False) -> RecordingSink:
    inputs = {
        "text_input": np.array([PROMPT.encode()], dtype=np.object_),
        "sampling_parameters": np.array([json.dumps(params).encode()], dtype=np.object_),
        "stream": np.array([stream]),
    }
    sink = RecordingSink()
    rt.submit(parse_request(inputs), sink)
    assert sink.done.wait(60) and sink.finals == 1 and sink.error is None, sink.error
    return sink


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_the_model_ends_at_once_is_empty_with_finish_stop_and_the_eos_id(
    eos_runtime: Runtime, first_token: tuple[int, list[int]], stream: bool
) -> None:
    out = _run(eos_runtime, {"max_tokens": 8}, stream=stream)
    assert out.ids == [] and out.finish_reason == "stop"
    assert out.stop_token_id == first_token[0]
    assert out.prompt_tokens == len(PROMPT.encode())  # the byte tokenizer: one token per byte


def test_min_tokens_holds_the_eos_back_until_that_many_tokens(
    eos_runtime: Runtime, first_token: tuple[int, list[int]]
) -> None:
    eos = first_token[0]
    out = _run(eos_runtime, {"max_tokens": 8, "min_tokens": 3})
    assert len(out.ids) >= 3 and eos not in out.ids
    if out.finish_reason == "stop":
        assert out.stop_token_id == eos
    else:
        assert out.finish_reason == "length" and len(out.ids) == 8 and out.stop_token_id is None


def test_a_length_finish_names_no_stop_token(eos_runtime: Runtime) -> None:
    out = _run(eos_runtime, {"max_tokens": 2, "min_tokens": 2})
    assert len(out.ids) == 2 and out.finish_reason == "length" and out.stop_token_id is None


def test_min_tokens_is_deterministic_with_seeded_sampling(eos_runtime: Runtime) -> None:
    params = {"max_tokens": 6, "min_tokens": 6, "temperature": 0.9, "seed": 11}
    a, b = _run(eos_runtime, params), _run(eos_runtime, params)
    assert a.ids == b.ids and len(a.ids) == 6


def test_the_generator_reports_the_eos_id_and_not_for_a_stop_string(
    eos_runtime: Runtime, first_token: tuple[int, list[int]]
) -> None:
    gen = eos_runtime.generator
    seen: list[int] = []
    handle = gen.submit(
        eos_runtime.encode(PROMPT),
        SamplingParams(max_tokens=4),
        on_token=lambda t: None,
        on_finish=lambda r, e: None,
        on_eos=seen.append,
    )
    assert handle.wait(60) and handle.finish_reason == "stop"
    assert handle.stop_token_id == first_token[0] and seen == [first_token[0]]
    # a stop string ends it with "stop" too, and names no token
    ids, _ = gen.generate(eos_runtime.encode(PROMPT), SamplingParams(max_tokens=8, min_tokens=8))
    text = eos_runtime.decode(ids)
    assert text.strip(), ids  # the byte tokenizer decodes ids < 256
    stop = text.strip()[-1]
    handle = gen.submit(
        eos_runtime.encode(PROMPT),
        SamplingParams(max_tokens=8, min_tokens=8, stop=(stop,)),
        on_token=lambda t: None,
        on_finish=lambda r, e: None,
        detokenize=eos_runtime.decode,
    )
    assert handle.wait(60) and handle.finish_reason == "stop" and handle.stop_token_id is None


def test_min_tokens_must_lie_within_max_tokens() -> None:
    assert SamplingParams.from_json({"max_tokens": 4, "min_tokens": 4}).min_tokens == 4
    with pytest.raises(InvalidSamplingParams, match=r"min_tokens must be in 0\.\.max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(InvalidSamplingParams, match="min_tokens"):
        SamplingParams(min_tokens=-1)
    with pytest.raises(InvalidSamplingParams, match="integer"):
        SamplingParams.from_json({"min_tokens": 1.5})


def test_the_backend_reads_min_tokens_from_sampling_parameters_and_request_parameters() -> None:
    text = np.array([b"hi"], dtype=np.object_)
    sp = np.array([b'{"max_tokens": 5, "min_tokens": 2}'], dtype=np.object_)
    assert parse_request({"text_input": text, "sampling_parameters": sp}).params.min_tokens == 2
    parsed = parse_request({"text_input": text}, '{"max_tokens": 5, "min_tokens": 3}')
    assert parsed.params.min_tokens == 3
    # and it crosses to the engine process intact
    assert request_from_json(json.loads(json.dumps(request_to_json(parsed)))).params.min_tokens == 3
