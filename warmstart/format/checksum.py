"""Chunk checksums: xxh3-64 of fixed-size chunks of a partition, computed while bytes stream past."""

from __future__ import annotations

import xxhash


def xxh3_hex(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


class ChunkHasher:
    """Feeds a byte stream and collects the xxh3-64 hex digest of every ``chunk_size`` chunk."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.digests: list[str] = []
        self._h = xxhash.xxh3_64()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            take = min(len(mv), self.chunk_size - self._filled)
            self._h.update(mv[:take])
            self._filled += take
            mv = mv[take:]
            if self._filled == self.chunk_size:
                self.digests.append(self._h.hexdigest())
                self._h.reset()
                self._filled = 0

    def finish(self) -> list[str]:
        if self._filled:
            self.digests.append(self._h.hexdigest())
            self._h.reset()
            self._filled = 0
        return self.digests
