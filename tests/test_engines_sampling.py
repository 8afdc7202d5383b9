"""Sampling parameters, seeded sampling and text streaming: pure numpy, no model."""

from __future__ import annotations

import numpy as np
import pytest

from warmstart.engines import InvalidSamplingParams, SamplingParams, TextStreamer, sample_token
from warmstart.engines.sampling import filtered_probs


def _logits(seed: int = 0, vocab: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, vocab).astype(np.float32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": True}, "max_tokens must be an integer"),
        ({"max_tokens": 3.0}, "max_tokens must be an integer"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": "1"}, "temperature must be a finite number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"seed": -1}, "seed must be in"),
        ({"seed": 2**64}, "seed must be in"),
        ({"stop": ["x"]}, "stop must be a tuple"),
        ({"stop": ("",)}, "non-empty"),
    ],
)
def test_sampling_params_rejects_bad_value_with_message(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidSamplingParams, match=match):
        SamplingParams(**kwargs)


def test_invalid_sampling_params_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-5)


def test_from_json_reads_all_fields_with_coercions() -> None:
    p = SamplingParams.from_json(
        {"max_tokens": 5, "temperature": 1, "top_p": 0.5, "top_k": -1, "seed": 7, "stop": "END"}
    )
    assert p == SamplingParams(max_tokens=5, temperature=1.0, top_p=0.5, top_k=0, seed=7, stop=("END",))
    assert isinstance(p.temperature, float)
    assert SamplingParams.from_json({"stop": ["a", "b"], "seed": None}).stop == ("a", "b")
    assert SamplingParams.from_json({}) == SamplingParams()


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"max_token": 5}, r"unknown sampling parameter\(s\) \['max_token'\]"),
        ({"max_tokens": True}, "max_tokens must be an integer"),
        ({"max_tokens": 5.0}, "max_tokens must be an integer"),
        ({"max_tokens": "5"}, "max_tokens must be an integer"),
        ({"temperature": False}, "temperature must be a number"),
        ({"temperature": "0.5"}, "temperature must be a number"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"stop": 3}, "stop must be a string or a list"),
        ({"stop": ["ok", 3]}, "stop must be a tuple of non-empty strings"),
    ],
)
def test_from_json_rejects_unknown_keys_and_wrong_types(obj: dict, match: str) -> None:
    with pytest.raises(InvalidSamplingParams, match=match):
        SamplingParams.from_json(obj)


def test_from_json_rejects_non_object() -> None:
    with pytest.raises(InvalidSamplingParams, match="must be a JSON object"):
        SamplingParams.from_json([1, 2])  # type: ignore[arg-type]


def test_greedy_picks_first_maximum() -> None:
    logits = np.array([0.0, 3.0, 3.0, -1.0], np.float32)
    assert sample_token(logits, SamplingParams(), position=0) == 1


def test_sample_is_deterministic_given_seed_and_position() -> None:
    logits = _logits()
    p = SamplingParams(temperature=1.0, seed=123)
    draws = [sample_token(logits, p, position=i) for i in range(64)]
    assert draws == [sample_token(logits, p, position=i) for i in range(64)]
    assert len(set(draws)) > 5  # positions draw independently
    other_seed = [
        sample_token(logits, SamplingParams(temperature=1.0, seed=124), position=i) for i in range(64)
    ]
    assert draws != other_seed


def test_sampling_without_seed_is_rejected() -> None:
    with pytest.raises(InvalidSamplingParams, match="needs a seed"):
        sample_token(_logits(), SamplingParams(temperature=0.7), position=0)


def test_top_k_restricts_draws_to_k_best() -> None:
    logits = _logits(1)
    best3 = set(np.argsort(-logits)[:3].tolist())
    p = SamplingParams(temperature=5.0, top_k=3, seed=1)
    assert {sample_token(logits, p, position=i) for i in range(200)} == best3


def test_top_p_keeps_smallest_prefix_reaching_mass() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    ids, probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert ids.tolist() == [0, 1]
    np.testing.assert_allclose(probs, [0.5 / 0.8, 0.3 / 0.8])
    ids, _ = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert ids.tolist() == [0, 1, 2]


def test_sample_frequencies_follow_softmax() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.1], np.float32))
    p = SamplingParams(temperature=1.0, seed=5)
    counts = np.bincount([sample_token(logits, p, position=i) for i in range(4000)], minlength=3)
    np.testing.assert_allclose(counts / 4000, [0.6, 0.3, 0.1], atol=0.03)


# ---------------------------------------------------------------- TextStreamer


# a byte-level toy tokenizer: ids are bytes, so one character may span several tokens
def _detok(ids: list[int] | tuple[int, ...]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextStreamer]:
    s = TextStreamer(_detok, stop)
    deltas = [s.push(b) for b in text.encode()]
    deltas.append(s.flush())
    return deltas, s


def test_streamer_waits_for_complete_multibyte_characters() -> None:
    deltas, _ = _stream("né€x")
    assert "".join(deltas) == "né€x"
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1] == "" and deltas[2] == "é"  # 'é' is two bytes: nothing after the first


def test_streamer_stops_before_stop_string_and_holds_back_partial_match() -> None:
    deltas, s = _stream("hello END world", stop=("END",))
    assert s.stopped
    assert "".join(deltas) == "hello "
    assert s.text == "hello "


def test_streamer_releases_held_back_text_that_was_not_a_stop_string() -> None:
    deltas, s = _stream("an ENd", stop=("END",))
    assert not s.stopped
    assert "".join(deltas) == "an ENd"
    assert deltas[-4:] == ["", "", "ENd", ""]  # "EN" held back until it could no longer become "END"


def _full_sort_reference(x: np.ndarray, p: SamplingParams) -> np.ndarray:
    z = x.astype(np.float64) / p.temperature
    order = np.argsort(-z, kind="stable")[: p.top_k or None]
    e = np.exp(z[order] - z.max())
    cum = np.cumsum(e) / e.sum()
    return order[: min(int(np.searchsorted(cum, p.top_p)) + 1, len(order))] if p.top_p < 1 else order


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=6.0, top_p=0.99),  # flat: the nucleus search has to grow
        SamplingParams(temperature=0.8, top_k=50, top_p=0.5),
        SamplingParams(temperature=0.8, top_k=7),
    ],
)
def test_filtered_candidates_equal_a_full_sort_with_ties_broken_by_id(params: SamplingParams) -> None:
    logits = np.round(np.random.default_rng(3).normal(0, 3, 5000), 1).astype(np.float32)  # many ties
    ids, probs = filtered_probs(logits, params)
    assert ids.tolist() == _full_sort_reference(logits, params).tolist()
    assert abs(probs.sum() - 1) < 1e-12
