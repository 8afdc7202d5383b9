"""The backend runtime without Triton: a tiny torch checkpoint, a recording sink, real generation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from backend_support import RecordingSink, make_tiny_checkpoint

from warmstart.backend.request import parse_request
from warmstart.backend.runtime import ModelLoadFailed, Runtime
from warmstart.engines import PromptTooLong
from warmstart.tritonconfig import ModelSettings

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("rt") / "tiny", "llama")
    rt = Runtime.load(ModelSettings(checkpoint=str(ckpt), engine="torch", max_batch=4))
    try:
        yield rt
    finally:
        rt.close()


def run(
    rt: Runtime, inputs: dict[str, np.ndarray], params: str = "", *, cancel: bool = False
) -> RecordingSink:
    sink = RecordingSink(cancelled=cancel)
    rt.submit(parse_request(inputs, params), sink)
    assert sink.done.wait(60)
    assert sink.finals == 1
    return sink


def s(text: str) -> np.ndarray:
    return np.array([text.encode()], dtype=np.object_)


def test_streaming_sends_deltas_whose_concatenation_is_the_full_text(runtime: Runtime) -> None:
    streamed = run(runtime, {"text_input": s(PROMPT), "stream": np.array([True])}, '{"max_tokens": 10}')
    whole = run(runtime, {"text_input": s(PROMPT)}, '{"max_tokens": 10}')
    assert len(streamed.ids) == 10 and streamed.finish_reason == "length"
    assert len(streamed.texts) == 11  # one per token + the final response
    assert whole.ids == streamed.ids and len(whole.texts) == 1
    assert whole.texts[0] == PROMPT + "".join(streamed.texts)


def test_exclude_input_in_output_leaves_the_prompt_out(runtime: Runtime) -> None:
    out = run(
        runtime, {"text_input": s(PROMPT), "exclude_input_in_output": np.array([True])}, '{"max_tokens": 4}'
    )
    assert not out.texts[0].startswith(PROMPT)


def test_stop_string_ends_generation_and_is_not_returned(runtime: Runtime) -> None:
    free = run(runtime, {"text_input": s(PROMPT)}, '{"max_tokens": 24}')
    text = free.texts[0][len(PROMPT) :]
    stop = next((c for c in text[3:] if c.isprintable() and c != "\ufffd"), None)
    if stop is None:
        pytest.skip("the random model produced no printable character to stop at")
    stopped = run(runtime, {"text_input": s(PROMPT)}, json.dumps({"max_tokens": 24, "stop": [stop]}))
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.texts[0][len(PROMPT) :]


def test_cancelled_request_ends_with_one_cancelled_error(runtime: Runtime) -> None:
    out = run(runtime, {"text_input": s(PROMPT)}, '{"max_tokens": 200}', cancel=True)
    assert out.error is not None and out.error[0] == "CANCELLED"
    assert len(out.ids) == 0


def test_prompt_too_long_is_raised_before_anything_is_sent(runtime: Runtime) -> None:
    sink = RecordingSink()
    with pytest.raises(PromptTooLong):
        runtime.submit(parse_request({"text_input": s("x" * 600)}), sink)
    assert sink.finals == 0


def test_resume_from_text_plus_generated_ids_continues_exactly(runtime: Runtime) -> None:
    params = '{"max_tokens": 12, "temperature": 0.8, "seed": 5}'
    whole = run(runtime, {"text_input": s(PROMPT), "stream": np.array([True])}, params)
    resumed = run(
        runtime,
        {
            "text_input": s(PROMPT),
            "stream": np.array([True]),
            "input_ids": np.array(whole.ids[:5], dtype=np.int64),
            "num_generated": np.array([5], dtype=np.int64),
        },
        params,
    )
    assert whole.ids[:5] + resumed.ids == whole.ids


def test_missing_checkpoint_fails_the_load_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadFailed, match=r"model 'm'.*CheckpointNotFound"):
        Runtime.load(ModelSettings(checkpoint=str(tmp_path / "nope"), engine="jax"), model_name="m")
