"""Test harness for the scheduler service: fake node stores, a scheduler on a background event loop."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from warmstart.scheduler.config import SchedulerConfig
from warmstart.scheduler.service import SchedulerService

T = TypeVar("T")
ADMIN_TOKEN = "test-admin-token-0123456789"
REPO_KEY = "repo-key-0123456789"


class FakeNodeStore:
    """A node store's HTTP API serving a mutable inventory and bandwidth table (stand-in for warmstart.store)."""

    def __init__(self, tiers: dict[str, str] | None = None, bandwidth: dict[str, Any] | None = None) -> None:
        self.tiers = dict(tiers or {})
        self.bandwidth = bandwidth or {"memory_bps": 20e9, "disk_bps": 2e9, "remote_bps": 0.2e9}
        store = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    body = {"models": [{"name": n, "tier": t} for n, t in store.tiers.items()]}
                elif self.path == "/v1/bandwidth":
                    body = store.bandwidth
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class BackgroundScheduler:
    """A :class:`SchedulerService` on its own event loop thread, reachable over real sockets."""

    def __init__(self, config: SchedulerConfig, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def build() -> SchedulerService:
            return SchedulerService(config, **kwargs)  # grpc.aio channels bind to the loop they are made on

        self.service = self.call(build())
        self.call(self.service.start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def sync(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.call(run())

    @property
    def router(self) -> Any:
        return self.service.router

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.service.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.service.grpc_port}"

    def state(self) -> dict[str, Any]:
        return self.sync(self.service.router.describe)

    def close(self) -> None:
        try:
            self.call(self.service.stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def scheduler_config(
    servers: list[dict[str, Any]], models: dict[str, dict[str, Any]], **extra: Any
) -> SchedulerConfig:
    """A config listening on free loopback ports with the test admin token."""
    data: dict[str, Any] = {
        "listen": {"http": "127.0.0.1:0", "grpc": "127.0.0.1:0"},
        "admin_token": ADMIN_TOKEN,
        "servers": servers,
        "models": models,
        "health_interval_s": 0.5,
        "store_poll_interval_s": 0.5,
        "reaper_interval_s": 0.2,
        "upstream_timeout_s": 2.0,
    }
    data.update(extra)
    return SchedulerConfig.from_dict(data)
