"""Client of a node store's HTTP API: which checkpoints the node holds in which tier, and its bandwidths.

``GET /v1/models`` → ``{"models": [{"name": ..., "tier": "memory"|"disk"|"remote", ...}, ...]}``
``GET /v1/bandwidth`` → ``{"memory_bps": ..., "disk_bps": ..., "remote_bps": ... | null}`` (measured by
the node, bytes per second). Names that fail the model-name allow-list are ignored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import aiohttp

from warmstart.scheduler.errors import InvalidModelName, InvalidSnapshotError, SchedulerError
from warmstart.scheduler.names import validate_model_name
from warmstart.scheduler.state import NodeBandwidth, Tier

logger = logging.getLogger(__name__)


class NodeStoreError(SchedulerError):
    """A node store could not be reached or answered something malformed."""


@dataclass(frozen=True)
class NodeReport:
    """One poll of a node store: tier per checkpoint name and the measured bandwidths."""

    tiers: Mapping[str, Tier] = field(default_factory=dict)
    bandwidth: NodeBandwidth | None = None

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


def parse_bandwidth(data: Any) -> NodeBandwidth:
    """The measured bandwidths from a ``/v1/bandwidth`` body."""
    if not isinstance(data, Mapping):
        raise NodeStoreError("bandwidth: expected an object")
    try:
        return NodeBandwidth(
            memory_bps=float(data["memory_bps"]),
            disk_bps=float(data["disk_bps"]),
            remote_bps=float(data["remote_bps"]) if data.get("remote_bps") is not None else None,
        )
    except (KeyError, TypeError, ValueError, InvalidSnapshotError) as e:
        raise NodeStoreError(f"bandwidth: {e}") from e


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
