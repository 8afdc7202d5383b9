"""Custom Triton metrics of the ``warmstart`` backend (Prometheus names on the server's ``/metrics``).

* ``warmstart_model_load_seconds{model, version, tier}`` (gauge): how long the last load of the model took
  (checkpoint to a ready engine), labelled with the tier the weights came from (memory, disk, remote).
* ``warmstart_time_to_first_token_seconds{model, version}`` (histogram): request arrival to first token.
* ``warmstart_generation_tokens_total{model, version}`` (counter): tokens generated.
* ``warmstart_prompt_tokens_total{model, version}`` (counter): prompt tokens prefilled (resumed ids included).

Triton 2.51 has no load-time or first-response metric of its own, and its request durations are meaningless
for decoupled models. ``pb_utils`` is passed in, so this module imports nothing from Triton.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)

__all__ = ["TTFT_BUCKETS", "BackendMetrics", "Metrics", "NullMetrics"]

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics(Protocol):
    """What the runtime reports; implemented over pb_utils, and as a no-op."""

    def model_loaded(self, tier: str, seconds: float) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def tokens_generated(self, n: int) -> None: ...
    def prompt_tokens(self, n: int) -> None: ...


class NullMetrics:
    """Metrics that go nowhere (runtime used outside Triton)."""

    def model_loaded(self, tier: str, seconds: float) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def tokens_generated(self, n: int) -> None:
        pass

    def prompt_tokens(self, n: int) -> None:
        pass


class BackendMetrics:
    """Metrics reported through ``pb_utils.MetricFamily`` for one model instance."""

    def __init__(self, pb_utils: Any, model: str, version: str) -> None:
        family = pb_utils.MetricFamily
        self._labels = {"model": model, "version": version}
        self._load = family(
            name="warmstart_model_load_seconds",
            description="Seconds the last load of the model took, by the tier its weights came from",
            kind=family.GAUGE,
        )
        self._load_metrics: dict[str, Any] = {}
        # a MetricFamily must outlive its Metrics (Triton deletes them with it): keep every family
        self._ttft_family = family(
            name="warmstart_time_to_first_token_seconds",
            description="Seconds from request arrival to its first generated token",
            kind=family.HISTOGRAM,
        )
        self._ttft = self._ttft_family.Metric(labels=self._labels, buckets=list(TTFT_BUCKETS))
        self._tokens_family = family(
            name="warmstart_generation_tokens_total", description="Tokens generated", kind=family.COUNTER
        )
        self._tokens = self._tokens_family.Metric(labels=self._labels)
        self._prompt_family = family(
            name="warmstart_prompt_tokens_total",
            description="Prompt tokens prefilled (including ids replayed to resume a generation)",
            kind=family.COUNTER,
        )
        self._prompt = self._prompt_family.Metric(labels=self._labels)

    @staticmethod
    def _report(what: str, op: Callable[[], None]) -> None:
        try:
            op()
        except Exception:  # a metric must never fail a request
            logger.warning("reporting %s failed", what, exc_info=True)

    def model_loaded(self, tier: str, seconds: float) -> None:
        metric = self._load_metrics.get(tier)
        if metric is None:
            metric = self._load.Metric(labels={**self._labels, "tier": tier})
            self._load_metrics[tier] = metric
        self._report("model load seconds", lambda: metric.set(seconds))

    def first_token(self, seconds: float) -> None:
        self._report("time to first token", lambda: self._ttft.observe(seconds))

    def tokens_generated(self, n: int) -> None:
        if n > 0:
            self._report("generated tokens", lambda: self._tokens.increment(n))

    def prompt_tokens(self, n: int) -> None:
        if n > 0:
            self._report("prompt tokens", lambda: self._prompt.increment(n))
