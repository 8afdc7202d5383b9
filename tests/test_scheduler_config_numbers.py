"""The scheduler config accepts numbers as YAML users write them, and partial bandwidth fallbacks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from warmstart.scheduler.config import BandwidthConfig, SchedulerConfig, SchedulerConfigError, ServerConfig
from warmstart.scheduler.nodestore import MeasuredBandwidth, NodeReport
from warmstart.scheduler.router import Router
from warmstart.scheduler.state import NodeBandwidth

STORE_SERVER = {"name": "a", "grpc": "127.0.0.1:8001", "node_store": "http://127.0.0.1:7070"}


def test_yaml_exponents_without_a_dot_or_sign_are_numbers(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 2.0e8, 1e9 and 1e10 as strings; they are what people write.
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "cold_start_timeout_s: 1.2e2\n"
        "cold_start_queue: 1e3\n"
        "servers:\n"
        "  - name: a\n"
        "    grpc: 127.0.0.1:8001\n"
        "    memory_budget_bytes: 8e9\n"
        "    bandwidth: {memory_bps: 1e10, disk_bps: 2.0e9, remote_bps: 2.0e8}\n"
        "models:\n"
        "  m: {checkpoint: s3://models/m, size_bytes: 2.7e8, keep_alive_s: '300'}\n"
    )
    cfg = SchedulerConfig.from_yaml(path)
    assert cfg.cold_start_timeout_s == 120.0
    assert cfg.cold_start_queue == 1000 and isinstance(cfg.cold_start_queue, int)
    server = cfg.servers[0]
    assert server.memory_budget_bytes == 8_000_000_000 and isinstance(server.memory_budget_bytes, int)
    assert server.bandwidth == BandwidthConfig(memory_bps=1e10, disk_bps=2e9, remote_bps=2e8)
    assert cfg.models[0].size_bytes == 270_000_000 and isinstance(cfg.models[0].size_bytes, int)
    assert cfg.models[0].keep_alive_s == 300


@pytest.mark.parametrize("text", ["2.0e8", " 2.0e8 ", "+2e8", "200_000_000", "200000000", "2E8"])
def test_numeric_strings_are_converted(text: str) -> None:
    assert BandwidthConfig(remote_bps=text).remote_bps == 2e8  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["fast", "nan", "inf", "-inf", "1e", "0x10", "1__0", "", "e8", "true"])
def test_non_numeric_strings_are_still_refused(text: str) -> None:
    with pytest.raises(SchedulerConfigError, match=r"bandwidth\.remote_bps must be a number"):
        BandwidthConfig(remote_bps=text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"cold_start_queue": "2.5"}, "cold_start_queue must be an integer"),
        ({"cold_start_queue": 2.5}, "cold_start_queue must be an integer"),
        ({"cold_start_queue": True}, "cold_start_queue must be a number"),
        ({"cold_start_timeout_s": "-1e2"}, "cold_start_timeout_s must be a finite number >= 0"),
        ({"cold_start_timeout_s": "1e999"}, "cold_start_timeout_s must be a finite number"),
    ],
)
def test_numbers_keep_their_ranges_and_integrality(data: dict, match: str) -> None:
    with pytest.raises(SchedulerConfigError, match=match):
        SchedulerConfig.from_dict(data)


def test_a_partial_bandwidth_is_a_fallback_for_unmeasured_tiers_of_a_node_store() -> None:
    cfg = SchedulerConfig.from_dict({"servers": [{**STORE_SERVER, "bandwidth": {"remote_bps": "2.0e8"}}]})
    measured = MeasuredBandwidth(memory_bps=1e10, disk_bps=1e9, remote_bps=None)
    assert measured.to_node_bandwidth(cfg.servers[0].bandwidth) == NodeBandwidth(1e10, 1e9, 2e8)
    # a measured figure wins over the configured one
    remote_measured = MeasuredBandwidth(memory_bps=1e10, disk_bps=1e9, remote_bps=5e8)
    assert remote_measured.to_node_bandwidth(cfg.servers[0].bandwidth) == NodeBandwidth(1e10, 1e9, 5e8)


def test_without_a_node_store_memory_and_disk_are_still_required() -> None:
    with pytest.raises(SchedulerConfigError, match="memory_bps and disk_bps are required"):
        ServerConfig.from_dict({"name": "a", "grpc": "127.0.0.1:8001", "bandwidth": {"remote_bps": 2e8}})


class _Store:
    """Stands in for a node store client: a fresh store that has measured its local tiers, not its remote."""

    async def report(self) -> NodeReport:
        return NodeReport(
            tiers={}, bandwidth=MeasuredBandwidth(memory_bps=1e10, disk_bps=1e9, remote_bps=None)
        )

    async def close(self) -> None:
        pass


def test_the_router_applies_a_partial_fallback_from_a_store_report() -> None:
    cfg = SchedulerConfig.from_dict({"servers": [{**STORE_SERVER, "bandwidth": {"remote_bps": "2.0e8"}}]})

    async def main() -> NodeBandwidth | None:
        router = Router(cfg)
        try:
            await router._stores["a"].close()
            router._stores["a"] = _Store()  # type: ignore[assignment]
            await router._poll_store(router.servers["a"])
            return router.servers["a"].bandwidth
        finally:
            await router.close()

    assert asyncio.run(main()) == NodeBandwidth(1e10, 1e9, 2e8)
