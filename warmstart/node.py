"""The node agent: keeps one node registered in cluster state, so schedulers find it by themselves.

A node is a Triton server with its node store. The agent (``warmstart node``) writes the node's
`NodeRecord` (Triton endpoint, node-store URL, repository key reference, memory budget, the store's measured
bandwidths and inventory) under a lease of ``ttl_s`` seconds, fenced by the epoch of this incarnation
(``docs/cluster.md``):

* it begins a new incarnation when it starts, so a write of any earlier incarnation of the same node is
  refused from then on (`StaleEpochError`);
* it renews the lease every ``ttl_s / 3`` and rewrites the record when the inventory or bandwidths change;
* a lease that lapsed (etcd was away, the link was cut) is replaced by a new one and the record written
  again; cluster state that cannot be reached is logged and retried on the next round;
* a newer incarnation of the node (the node restarted elsewhere under the same name) ends this agent for
  good: it stops writing, logs why, and `NodeAgent.superseded` says so;
* a clean stop revokes the lease, so the node leaves routing at once instead of after ``ttl_s``.

A node that dies (SIGKILL, power, a cut link) stops renewing: its record goes when the lease ends, and the
schedulers take it out of routing then. The loop is a thread (the cluster-state store is synchronous);
`NodeAgent.step` is one round, for tests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace

from warmstart.errors import WarmstartError
from warmstart.scheduler.errors import ClusterStateUnavailable, LeaseNotFoundError, StaleEpochError
from warmstart.scheduler.state import (
    DEFAULT_LEASE_TTL_S,
    ClusterStateStore,
    Lease,
    NodeBandwidth,
    NodeRecord,
    Tier,
    check_lease_ttl,
)

__all__ = ["NodeAgent", "NodeAgentError", "store_inventory"]

logger = logging.getLogger(__name__)

Inventory = tuple[NodeBandwidth | None, dict[str, Tier]]


class NodeAgentError(WarmstartError):
    """The node agent cannot run as configured (bad TTL, a record that does not validate)."""


def store_inventory(url: str, *, timeout_s: float = 2.0) -> Callable[[], Inventory]:
    """A function reading a node store's measured bandwidths and inventory (its best tier per model)."""
    from warmstart.loaders.storeclient import StoreClient

    client = StoreClient(url, timeout=timeout_s)

    def read() -> Inventory:
        bw = client.bandwidth()
        bandwidth = None
        memory, disk = bw.get("memory_bps"), bw.get("disk_bps")
        if memory and disk:
            bandwidth = NodeBandwidth(float(memory), float(disk), bw.get("remote_bps"))
        tiers: dict[str, Tier] = {}
        for m in client.models():
            held = set(m.get("tiers") or ())
            tiers[str(m["name"])] = (
                Tier.MEMORY if "memory" in held else Tier.DISK if "disk" in held else Tier.NONE
            )
        return bandwidth, {k: v for k, v in tiers.items() if v is not Tier.NONE}

    return read


class NodeAgent:
    """Registers ``record`` (its ``epoch`` is replaced by this incarnation's) and keeps it registered."""

    def __init__(
        self,
        cluster: ClusterStateStore,
        record: NodeRecord,
        *,
        ttl_s: int = DEFAULT_LEASE_TTL_S,
        inventory: Callable[[], Inventory] | None = None,
        interval_s: float | None = None,
    ) -> None:
        try:
            self.ttl_s = check_lease_ttl(ttl_s)
        except ValueError as e:
            raise NodeAgentError(str(e)) from None
        self.cluster = cluster
        self.interval_s = interval_s if interval_s is not None else max(0.2, self.ttl_s / 3)
        self._inventory = inventory
        self._base = record
        self.epoch: int | None = None
        self.lease: Lease | None = None
        self.record: NodeRecord | None = None  # what is registered now
        self.superseded = False
        self.registrations = 0  # writes of the record (first one, re-registrations, inventory changes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one round -----------------------------------------------------------------------------------------
    def _current(self) -> NodeRecord:
        assert self.epoch is not None
        record = replace(self._base, epoch=self.epoch)
        if self._inventory is not None:
            try:
                bandwidth, tiers = self._inventory()
            except (WarmstartError, OSError, ValueError, KeyError) as e:
                logger.warning(
                    "node %s: cannot read its store's inventory (%s); keeping the last one", record.name, e
                )
                return self.record or record
            record = replace(record, bandwidth=bandwidth or record.bandwidth, store_tiers=tiers)
        return record

    def step(self) -> bool:
        """One round: begin the incarnation (first time), renew or replace the lease, write the record if it
        is new or changed. False once this incarnation was superseded (the agent must stop)."""
        if self.superseded:
            return False
        name = self._base.name
        try:
            if self.epoch is None:
                self.epoch = self.cluster.begin_incarnation(name)
                logger.info("node %s: incarnation epoch %d", name, self.epoch)
            if self.lease is not None:
                try:
                    self.cluster.keep_alive(self.lease)
                except LeaseNotFoundError:
                    logger.warning("node %s: its lease %d lapsed; registering again", name, self.lease.id)
                    self.lease, self.record = None, None
            if self.lease is None:
                self.lease = self.cluster.grant_lease(self.ttl_s)
            record = self._current()
            if record != self.record:
                self.cluster.put_node(record, lease=self.lease)
                if self.record is None:
                    logger.info("node %s: registered (%s, lease %d s)", name, record.grpc, self.lease.ttl_s)
                self.record = record
                self.registrations += 1
        except StaleEpochError as e:
            self.superseded = True
            logger.error("node %s: superseded by a newer incarnation, stopping for good: %s", name, e)
            return False
        except LeaseNotFoundError:
            self.lease, self.record = None, None  # lapsed between the renewal and the write: next round
        except ClusterStateUnavailable as e:
            logger.warning(
                "node %s: cluster state unreachable (%s); retrying in %.1f s", name, e, self.interval_s
            )
        return True

    # -- the loop ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Register now (raises if the first registration fails for a reason other than etcd being away),
        then keep it up in a background thread."""
        self.step()
        self._thread = threading.Thread(target=self._run, name=f"node-agent {self._base.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.step():
                return

    def run_forever(self) -> None:
        """Register and keep it up in this thread until `stop` (from another thread or a signal handler)."""
        while not self._stop.is_set():
            if not self.step():
                return
            self._stop.wait(self.interval_s)

    def request_stop(self) -> None:
        """Make `run_forever` return after the round in progress (safe from a signal handler)."""
        self._stop.set()

    def stop(self, *, revoke: bool = True) -> None:
        """Stop renewing; with ``revoke`` end the lease now so the node leaves routing at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if revoke and self.lease is not None and not self.superseded:
            try:
                self.cluster.revoke_lease(self.lease)
            except (LeaseNotFoundError, ClusterStateUnavailable) as e:
                logger.warning(
                    "node %s: could not revoke its lease (%s); it ends by its TTL", self._base.name, e
                )
            self.lease = None

    def __enter__(self) -> NodeAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
