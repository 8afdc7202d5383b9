"""Owner of a ``warmstart store`` daemon process (start, health, stop by PID), for tests and benchmarks."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from warmstart._process import ManagedProcess, free_port
from warmstart.errors import StoreUnavailable
from warmstart.loaders.storeclient import StoreClient


class StoreServer:
    """A ``warmstart store`` child process listening on 127.0.0.1."""

    def __init__(
        self,
        *,
        root: Path,
        remote: str,
        memory_capacity: str | int,
        disk_capacity: str | int,
        memory_root: Path | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        argv = [
            sys.executable, "-m", "warmstart.cli", "store",
            "--root", str(self.root), "--remote", remote,
            "--memory-capacity", str(memory_capacity), "--disk-capacity", str(disk_capacity),
            "--listen", f"127.0.0.1:{self.port}",
        ]  # fmt: skip
        if memory_root is not None:
            argv += ["--memory-root", str(memory_root)]
        self._proc = ManagedProcess(
            argv, env=dict(os.environ if env is None else env), log_path=self.root / "store.log"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def client(self) -> StoreClient:
        return StoreClient(self.url)

    def start(self, timeout: float = 60.0) -> StoreServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self._proc.start()
        deadline = time.monotonic() + timeout
        c = StoreClient(self.url, timeout=2.0)
        while True:
            if not self._proc.is_alive():
                raise StoreUnavailable(f"warmstart store exited at startup:\n{self.logs()[-3000:]}")
            try:
                if c.health():
                    return self
            except StoreUnavailable:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise StoreUnavailable(
                    f"warmstart store did not answer within {timeout} s:\n{self.logs()[-3000:]}"
                )
            time.sleep(0.1)

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def logs(self) -> str:
        return self._proc.logs()

    def stop(self, timeout: float = 10.0) -> int | None:
        return self._proc.stop(timeout)

    def __enter__(self) -> StoreServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
