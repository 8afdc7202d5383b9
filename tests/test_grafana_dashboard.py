"""docs/grafana/warmstart.json is a valid dashboard whose every PromQL expression (and template query) names
only metrics that exist: the scheduler's (its registry), the backend's (``BackendMetrics``, with pb_utils
replaced by a recorder of the families it declares) and the node store's (its registry)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from warmstart.backend.metrics import BackendMetrics
from warmstart.scheduler.config import SchedulerConfig
from warmstart.scheduler.router import Router
from warmstart.store.service import NodeStore, StoreConfig

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "warmstart.json"

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# PromQL words that are not metric names: operators, modifiers (aggregations and functions are followed
# by "(" and skipped anyway)
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}


def _registry_names(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
    return names


class _RecordingPbUtils:
    """Stands in for ``triton_python_backend_utils`` only to list the families BackendMetrics declares."""

    def __init__(self) -> None:
        self.families: list[tuple[str, str]] = []
        recorder = self

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, *, name: str, description: str, kind: str) -> None:
                recorder.families.append((name, kind))

            def Metric(self, **kwargs: Any) -> object:  # noqa: N802 (pb_utils' name)
                return object()

        self.MetricFamily = MetricFamily


def _backend_names() -> set[str]:
    pb = _RecordingPbUtils()
    BackendMetrics(pb, "m", "1")
    # Triton exposes a counter under the name given (ours end in _total already), histograms as Prometheus does
    return {
        name + s for name, kind in pb.families for s in (("",) if kind != "histogram" else _SUFFIXES[kind])
    }


@pytest.fixture(scope="module")
def known_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    config = SchedulerConfig.from_dict(
        {
            "servers": [
                {
                    "name": "s0",
                    "grpc": "127.0.0.1:1",
                    "bandwidth": {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8},
                }
            ],
            "models": {"m": {"checkpoint": "s3://models/m", "size_bytes": 1}},
        }
    )

    async def scheduler_names() -> set[str]:  # a router's gRPC channels need a running event loop
        router = Router(config)
        try:
            return _registry_names(router.metrics.registry)
        finally:
            await router.close()

    scheduler = asyncio.run(scheduler_names())
    root = tmp_path_factory.mktemp("store")
    store = NodeStore(
        StoreConfig(
            root=root,
            remote="s3://models",
            memory_capacity=1 << 20,
            disk_capacity=1 << 20,
            memory_root=root / "shm",
            probe=False,
        )
    )
    return scheduler | _backend_names() | _registry_names(store.metrics.registry)


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not in label matchers, ranges,
    strings, grouping clauses, function calls or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, Grafana variables)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group()
        following = text[m.end() :].lstrip()
        if word in _KEYWORDS or following.startswith("("):
            continue
        names.add(word)
    return names


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [node["expr"] for node in _walk(dashboard["panels"]) if isinstance(node.get("expr"), str)]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)  # Grafana's, not PromQL
            assert inner is not None, query
            exprs.append(inner.group(1))
    return exprs


def test_metric_name_extraction_skips_functions_labels_and_ranges() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, tier) (rate(a_bucket{model=~"$model",x="y z"}[$__rate_interval])))'
        " / on (server) group_left b_total + c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_dashboard_is_valid_grafana_json_with_panels_and_targets() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        assert {t["refId"] for t in p["targets"]} == {chr(65 + i) for i in range(len(p["targets"]))}


def test_every_dashboard_expression_names_only_existing_metrics(known_names: set[str]) -> None:
    exprs = _expressions(_dashboard())
    assert exprs
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - known_names
        assert not unknown, f"{expr!r} names metrics that do not exist: {sorted(unknown)}"
        used |= names
    # the dashboard covers all three sources
    for prefix in ("warmstart_scheduler_", "warmstart_store_", "warmstart_generation_tokens"):
        assert any(n.startswith(prefix) for n in used), prefix


def test_a_misspelt_metric_is_caught(known_names: set[str]) -> None:
    assert metric_names("rate(warmstart_scheduler_request_total[5m])") - known_names == {
        "warmstart_scheduler_request_total"
    }


def test_every_alert_in_operations_md_names_only_existing_metrics(known_names: set[str]) -> None:
    import yaml

    text = (DASHBOARD.parent.parent / "operations.md").read_text()
    rules = [
        rule
        for block in re.findall(r"```yaml\n(.*?)```", text, re.S)
        if "groups" in (doc := yaml.safe_load(block))
        for group in doc["groups"]
        for rule in group["rules"]
    ]
    assert len(rules) >= 8
    for rule in rules:
        unknown = metric_names(rule["expr"]) - known_names - {"up"}  # up: Prometheus's own, per target
        assert not unknown, f"alert {rule['alert']} names metrics that do not exist: {sorted(unknown)}"
