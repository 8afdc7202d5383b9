"""Sampling parameters and token sampling as small pure numpy functions.

Sampling is deterministic given ``(seed, position)``: the random draw for the token at absolute
position ``p`` of a sequence comes from a counter-based generator keyed by ``[seed, p]``. A
generation replayed elsewhere (prompt + tokens so far) therefore continues token-exactly.
Both engines hand float32 numpy logits to these functions, so torch and JAX sample identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from warmstart.engines.base import InvalidSamplingParams

_MAX_STOP_STRINGS = 16
_U64 = 2**64


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens.

    ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``min_tokens`` (vLLM's meaning): no EOS token can be sampled before that many tokens were generated
    (tokens resumed from elsewhere count); stop strings still end a generation.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise InvalidSamplingParams(f"max_tokens must be >= 1, got {self.max_tokens}")
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidSamplingParams(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingParams(f"top_p must be in (0, 1] (1 = disabled), got {self.top_p}")
        _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise InvalidSamplingParams(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not 0 <= self.seed < _U64:
                raise InvalidSamplingParams(f"seed must be in [0, 2**64), got {self.seed}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidSamplingParams(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if len(self.stop) > _MAX_STOP_STRINGS:
            raise InvalidSamplingParams(f"at most {_MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        _check_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidSamplingParams(
                f"min_tokens must be in 0..max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SamplingParams:
        """Build from a parsed JSON object, rejecting unknown keys and wrong types.

        Ints must be JSON integers (not bools, not floats); floats may be JSON integers; ``stop``
        may be a string or a list of strings; ``seed`` may be null. ``top_k: -1`` (vLLM's
        "disabled") is read as 0.
        """
        if not isinstance(obj, dict):
            raise InvalidSamplingParams(
                f"sampling parameters must be a JSON object, got {type(obj).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise InvalidSamplingParams(f"unknown sampling parameter(s) {unknown}; allowed: {sorted(known)}")
        kw: dict[str, Any] = {}
        for name in ("max_tokens", "top_k", "seed", "min_tokens"):
            if name in obj:
                v = obj[name]
                if name == "seed" and v is None:
                    kw[name] = None
                    continue
                _check_int(name, v)
                kw[name] = int(v)
        if kw.get("top_k") == -1:
            kw["top_k"] = 0
        for name in ("temperature", "top_p"):
            if name in obj:
                v = obj[name]
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise InvalidSamplingParams(f"{name} must be a number, got {v!r}")
                kw[name] = float(v)
        if "stop" in obj:
            stop = obj["stop"]
            if isinstance(stop, str):
                stop = [stop]
            if stop is None:
                stop = []
            if not isinstance(stop, list):
                raise InvalidSamplingParams(f"stop must be a string or a list of strings, got {stop!r}")
            kw["stop"] = tuple(stop)
        return cls(**kw)


def _check_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidSamplingParams(f"{name} must be an integer, got {v!r}")


def _check_float(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InvalidSamplingParams(f"{name} must be a finite number, got {v!r}")


def rng_for(seed: int, position: int) -> np.random.Generator:
    """Counter-based RNG for the token at absolute ``position`` of a sequence seeded with ``seed``."""
    return np.random.Generator(np.random.Philox(key=np.array([seed, position], dtype=np.uint64)))


def _ranked(x: np.ndarray, n: int) -> np.ndarray:
    """Ids of the ``n`` largest entries of ``x``, by descending value, ties by ascending id. O(V + n log n)."""
    if n >= len(x):
        return np.argsort(-x, kind="stable")
    threshold = np.partition(x, len(x) - n)[len(x) - n]  # the n-th largest value
    cand = np.flatnonzero(x >= threshold)  # ascending ids, at least n of them
    return cand[np.argsort(-x[cand], kind="stable")[:n]]


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Temperature, top-k and top-p applied to ``logits`` [vocab].

    Returns ``(token_ids, probs)``: the candidate ids and their renormalized float64 probabilities.
    With top-k or top-p the ids are in descending-logit order (ties by id); with neither, all ids in
    id order (no sort needed). The result does not depend on how the candidates were searched for.
    """
    x = np.asarray(logits, dtype=np.float64) / params.temperature  # [V]
    e = np.exp(x - x.max())  # unnormalized probabilities
    vocab = len(x)
    if params.top_k == 0 and params.top_p >= 1.0:
        return np.arange(vocab), e / e.sum()
    if params.top_k > 0:
        ids = _ranked(x, min(params.top_k, vocab))
        total = e[ids].sum()
    else:
        ids, total = np.empty(0, np.int64), e.sum()
    if params.top_p < 1.0:
        if params.top_k > 0:
            cum = np.cumsum(e[ids]) / total
        else:  # rank a growing prefix until it holds the nucleus (usually a few hundred ids)
            n = 256
            while True:
                ids = _ranked(x, min(n, vocab))
                cum = np.cumsum(e[ids]) / total
                if cum[-1] >= params.top_p or len(ids) == vocab:
                    break
                n *= 4
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = min(int(np.searchsorted(cum, params.top_p, side="left")) + 1, len(ids))
        ids = ids[:keep]
    p = e[ids]
    return ids, p / p.sum()


def sample_token(logits: np.ndarray, params: SamplingParams, position: int) -> int:
    """Pick the token at absolute ``position`` from ``logits`` [vocab] float32.

    Greedy (first maximum) when ``temperature == 0``; otherwise a draw from the filtered
    distribution that depends only on ``(logits, params, position)``. ``params.seed`` must be
    set for sampling; `BatchedGenerator` fills in a random one when the caller gave none.
    """
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    if params.seed is None:
        raise InvalidSamplingParams("temperature > 0 needs a seed; set SamplingParams.seed")
    ids, p = filtered_probs(logits, params)
    u = rng_for(params.seed, position).random()
    i = int(np.searchsorted(np.cumsum(p), u, side="right"))
    return int(ids[min(i, len(ids) - 1)])
