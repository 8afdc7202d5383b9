"""A small stdlib client of the node store's HTTP API, used by the loaders when a store is configured.

It lives with the loaders (a store is one of their tiers), so `warmstart.store` depends on the loaders and
never the other way round.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from warmstart.errors import (
    CacheFull,
    CheckpointNotFound,
    EntryInUse,
    InvalidModelName,
    ModelNotFound,
    RemoteTimeout,
    StoreError,
    StoreUnavailable,
)
from warmstart.loaders.host import HostCheckpoint, from_lease
from warmstart.loaders.hostcache import DiskCache, HostCache, validate_name
from warmstart.loaders.pipeline import Transfer

_BY_STATUS: dict[int, type[Exception]] = {
    400: InvalidModelName,
    404: ModelNotFound,
    409: EntryInUse,
    504: RemoteTimeout,
    507: CacheFull,
}


class StoreClient:
    """Talks to a node store at ``url`` (``http://127.0.0.1:PORT``); every call has a timeout."""

    def __init__(self, url: str, *, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, query: dict[str, str] | None = None) -> Any:
        full = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(full, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                msg = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = raw.decode(errors="replace")[:500]
            raise _BY_STATUS.get(e.code, StoreError)(f"node store {self.url}: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            raise StoreUnavailable(
                f"no node store answers at {self.url} ({e}); start one with `warmstart store` or unset WARMSTART_STORE"
            ) from None
        return json.loads(body) if body else None

    def health(self) -> bool:
        return bool(self._call("GET", "/healthz").get("ok"))

    def models(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/models")["models"])

    def bandwidth(self) -> dict[str, float | None]:
        return dict(self._call("GET", "/v1/bandwidth"))

    def ensure(self, name: str, tier: str = "memory") -> dict[str, Any]:
        """Ask the store to bring ``name`` into ``tier``; returns when it is there (with timings)."""
        return dict(
            self._call("POST", f"/v1/models/{urllib.parse.quote(validate_name(name))}/ensure", {"tier": tier})
        )

    def evict(self, name: str, tier: str = "all") -> list[str]:
        return list(
            self._call("POST", f"/v1/models/{urllib.parse.quote(validate_name(name))}/evict", {"tier": tier})[
                "evicted"
            ]
        )

    def metrics(self) -> str:
        full = self.url + "/metrics"
        with urllib.request.urlopen(full, timeout=self.timeout) as r:
            return str(r.read().decode())

    def locate(self, name: str) -> dict[str, Any]:
        """Where to map ``name`` now (memory, else disk, else fetched into memory); see the store's docs."""
        return dict(self._call("POST", f"/v1/models/{urllib.parse.quote(validate_name(name))}/locate"))

    def open_host(self, name: str, *, attempts: int = 3) -> HostCheckpoint:
        """Map ``name``'s files directly from the node's memory tier, or from its disk tier when it is there
        and not in memory (the page cache, no copy); fetched into memory first when it is in neither."""
        for _ in range(attempts):
            try:
                info = self.locate(name)
            except ModelNotFound as e:
                raise CheckpointNotFound(str(e)) from None
            cache = (
                HostCache(Path(info["root"])) if info["tier"] == "memory" else DiskCache(Path(info["root"]))
            )
            # the store checked the copy just now; a copy changed since is left to the store to re-verify
            lease = cache.lookup(name, repair=False)
            if lease is not None:  # else: evicted (or changed) between the answer and our lock; ask again
                transfers = [
                    Transfer(t["source"], tuple(t["targets"]), int(t["bytes"]), float(t["seconds"]))
                    for t in info["transfers"]
                ]
                return from_lease(lease, f"{self.url}/v1/models/{name}", transfers)
            time.sleep(0.05)
        raise StoreError(
            f"node store {self.url} keeps evicting {name} before it can be mapped; raise its tier capacities"
        )
