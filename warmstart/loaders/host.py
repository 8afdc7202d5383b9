"""A checkpoint resident in host memory (`HostCheckpoint`), and how one is made from a tier's cache lease.

Shared by the tier logic (`warmstart.loaders.tiers`) and the node-store client
(`warmstart.loaders.storeclient`), so neither imports the other's module for it.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from warmstart.errors import ChecksumMismatch
from warmstart.format.index import Index
from warmstart.format.sources import LocalSource
from warmstart.loaders.hostcache import Lease
from warmstart.loaders.pipeline import Transfer

__all__ = ["HostCheckpoint", "from_lease", "local_reader", "map_partitions"]


class HostCheckpoint:
    """A checkpoint resident in host memory: its index and one readable buffer per partition.

    The buffers are the memory the tensors will view. Where they are cache mappings, the cache entry stays
    marked in use until every buffer (and so every tensor made from it) has been garbage collected.
    """

    def __init__(
        self,
        index: Index,
        buffers: list[Any],
        *,
        tier: str,
        location: str,
        path: Path | None = None,
        read_file: Callable[[str], bytes] | None = None,
        transfers: list[Transfer] | None = None,
    ) -> None:
        self.index = index
        self.buffers = buffers
        self.tier = tier
        self.location = location
        self.path = path
        self._read_file = read_file
        self.transfers = transfers or []

    def read_file(self, name: str) -> bytes:
        """A model file (``config.json``, ...) of the checkpoint, checked against its xxh3."""
        for f in self.index.files:
            if f.name == name:
                if self._read_file is None:
                    break
                data = self._read_file(name)
                if len(data) != f.size or xxhash.xxh3_64_hexdigest(data) != f.xxh3:
                    raise ChecksumMismatch(
                        f"{self.location}/{name} does not match index.json; re-fetch the checkpoint",
                        file=name,
                        chunk=0,
                        start=0,
                        end=f.size,
                    )
                return data
        raise FileNotFoundError(f"checkpoint {self.location} has no file {name!r}")


def map_partitions(root: Path, index: Index, lease: Lease | None) -> list[Any]:
    """One buffer per partition: the lease's mapping, else a private copy-on-write map of the file."""
    bufs: list[Any] = []
    for p in index.partitions:
        if lease is not None:
            bufs.append(lease.map(p.file))
        elif p.size == 0:
            bufs.append(mmap.mmap(-1, 1))
        else:
            with open(root / p.file, "rb") as f:
                bufs.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
    return bufs


def local_reader(root: Path) -> Callable[[str], bytes]:
    """Reads a model file of the checkpoint directory ``root``."""
    return lambda name: LocalSource(root).read(name)


def from_lease(lease: Lease, location: str, transfers: list[Transfer]) -> HostCheckpoint:
    """Map a cache entry's partitions and release the lookup lease (the mappings keep the entry in use)."""
    index = lease.index()
    bufs = map_partitions(lease.path, index, lease)
    tier = lease.cache.tier
    lease.release()
    return HostCheckpoint(
        index,
        bufs,
        tier=tier,
        location=location,
        path=lease.path,
        read_file=local_reader(lease.path),
        transfers=transfers,
    )
