"""Client of a node store's HTTP API: which checkpoints the node holds in which tier, and its bandwidths.

``GET /v1/models`` → ``{"models": [{"name": ..., "tier": "memory"|"disk"|"remote", ...}, ...]}``
``GET /v1/bandwidth`` → ``{"memory_bps": ..., "disk_bps": ..., "remote_bps": ... | null}`` (measured by
the node, bytes per second; null until measured, when a server's configured ``bandwidth`` fills in).
Names that fail the model-name allow-list are ignored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import aiohttp

from warmstart.names import validate_model_name
from warmstart.scheduler.errors import InvalidModelName, InvalidSnapshotError, SchedulerError
from warmstart.scheduler.state import NodeBandwidth, Tier

logger = logging.getLogger(__name__)


class NodeStoreError(SchedulerError):
    """A node store could not be reached or answered something malformed."""


@dataclass(frozen=True)
class NodeReport:
    """One poll of a node store: tier per checkpoint name and the measured bandwidths."""

    tiers: Mapping[str, Tier] = field(default_factory=dict)
    bandwidth: MeasuredBandwidth = field(default_factory=lambda: MeasuredBandwidth(None, None, None))

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers", MappingProxyType(dict(self.tiers)))


def parse_inventory(data: Any) -> dict[str, Tier]:
    """Tier per model name from a ``/v1/models`` body; raises :class:`NodeStoreError` when malformed."""
    models = data.get("models") if isinstance(data, Mapping) else None
    if not isinstance(models, list):
        raise NodeStoreError("inventory: expected {'models': [...]}")
    tiers: dict[str, Tier] = {}
    order = {Tier.MEMORY: 0, Tier.DISK: 1, Tier.REMOTE: 2, Tier.NONE: 3}
    for entry in models:
        if not isinstance(entry, Mapping):
            raise NodeStoreError("inventory: every entry must be an object")
        try:
            name = validate_model_name(entry.get("name"))
            tier = Tier(entry.get("tier"))
        except InvalidModelName:
            logger.debug("inventory: ignoring entry with an invalid name")
            continue
        except ValueError as e:
            raise NodeStoreError(f"inventory: bad tier {entry.get('tier')!r}") from e
        if name not in tiers or order[tier] < order[tiers[name]]:
            tiers[name] = tier
    return tiers


class BandwidthFallback(Protocol):
    """Configured bytes/s per tier (``None``: not configured), e.g. a server's ``BandwidthConfig``."""

    @property
    def memory_bps(self) -> float | None: ...
    @property
    def disk_bps(self) -> float | None: ...
    @property
    def remote_bps(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class MeasuredBandwidth:
    """Bytes/s a node store measured per tier; ``None`` where it has not measured that tier yet."""

    memory_bps: float | None
    disk_bps: float | None
    remote_bps: float | None

    def to_node_bandwidth(self, fallback: BandwidthFallback | None) -> NodeBandwidth:
        """The policy's view: measured figures, the configured ``fallback`` for tiers not measured yet.

        ``fallback`` may be partial (a server's ``bandwidth: {remote_bps: 2.0e8}``): a tier neither measured
        nor configured stays unknown.

        Raises :class:`NodeStoreError` when a local tier has neither (the node cannot be placed on).
        """

        def pick(measured: float | None, default: float | None) -> float | None:
            return measured if measured is not None else default

        memory = pick(self.memory_bps, fallback.memory_bps if fallback else None)
        disk = pick(self.disk_bps, fallback.disk_bps if fallback else None)
        if memory is None or disk is None:
            raise NodeStoreError("the node store has not measured its memory and disk tiers yet")
        try:
            return NodeBandwidth(
                memory, disk, pick(self.remote_bps, fallback.remote_bps if fallback else None)
            )
        except InvalidSnapshotError as e:
            raise NodeStoreError(f"bandwidth: {e}") from e


def parse_bandwidth(data: Any) -> MeasuredBandwidth:
    """The measured bandwidths from a ``/v1/bandwidth`` body (missing or null: not measured yet)."""
    if not isinstance(data, Mapping):
        raise NodeStoreError("bandwidth: expected an object")
    values: dict[str, float | None] = {}
    for key in ("memory_bps", "disk_bps", "remote_bps"):
        value = data.get(key)
        if value is None:
            values[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise NodeStoreError(f"bandwidth: {key} must be a positive number, got {value!r}")
        values[key] = float(value)
    return MeasuredBandwidth(**values)


class NodeStoreClient:
    """Polls one node store; every call has a timeout."""

    def __init__(self, base_url: str, *, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def _get(self, path: str) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(self.base_url + path) as resp:
                if resp.status != 200:
                    raise NodeStoreError(f"{self.base_url}{path}: HTTP {resp.status}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise NodeStoreError(f"{self.base_url}{path}: {e!r}") from e

    async def report(self) -> NodeReport:
        """Inventory and bandwidths, fetched together."""
        inventory, bandwidth = await asyncio.gather(self._get("/v1/models"), self._get("/v1/bandwidth"))
        return NodeReport(tiers=parse_inventory(inventory), bandwidth=parse_bandwidth(bandwidth))

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
