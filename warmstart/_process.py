"""Lifecycle of one external server process: the part shared by the tritonserver and SeaweedFS owners.

A child is started in its own session (so its process group holds the children it spawns, e.g. Triton's
Python stubs), with ``PR_SET_PDEATHSIG`` so that the kernel kills it when the thread that started it dies,
and with stdout/stderr appended to a log file. It is stopped by PID: SIGTERM, wait, SIGKILL, and every
wait is bounded (a process that ignores SIGTERM, or is stopped by SIGSTOP, is SIGKILLed after the stop
timeout; one that does not die even of SIGKILL within :data:`KILL_WAIT_S` is reported and left, never
waited for without end). While the stopped leader is still an unreaped zombie its PID (and so its
process-group id) cannot be reused, so the group is then swept with SIGKILL without any risk of hitting an
unrelated process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
KILL_WAIT_S = 10.0
"""How long :meth:`ManagedProcess.stop` waits for a SIGKILLed child to exit before it gives up on it."""


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when the thread that forked it exits (Linux)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``n`` distinct free ports (all sockets are held open together so none repeats)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path | None, max_bytes: int = 4000) -> str:
    """The last ``max_bytes`` of a log file, decoded leniently ("" if there is none)."""
    if path is None or not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        return f.read().decode("utf-8", errors="replace")


class ManagedProcess:
    """One child process: spawn, liveness, log, and stop-by-PID with escalation. Not thread-safe."""

    def __init__(
        self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path | None = None
    ) -> None:
        self._argv = list(argv)
        self._env = dict(env)
        self._log_path = log_path
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the child, or None before start."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        """File that receives the child's stdout and stderr."""
        return self._log_path

    def start(self) -> int:
        """Spawn the child; returns its PID. Raises RuntimeError if already started."""
        if self._proc is not None:
            raise RuntimeError("process already started")
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._argv,
                env=self._env,
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Only a prctl() call runs between fork and exec; nothing that could deadlock on a lock.
                preexec_fn=set_parent_death_signal,  # noqa: PLW1509
                close_fds=True,
            )
        logger.debug("started pid %d: %s", self._proc.pid, self._argv[0])
        return self._proc.pid

    def is_alive(self) -> bool:
        """True while the child runs (a zombie counts as exited)."""
        if self._proc is None:
            return False
        if self._proc.returncode is not None:
            return False
        try:
            info = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return info is None

    def returncode(self) -> int | None:
        """Exit status once reaped (by :meth:`stop`), else None."""
        return self._proc.returncode if self._proc is not None else None

    def logs(self) -> str:
        """Everything the child wrote so far."""
        if not self._log_path.exists():
            return ""
        return self._log_path.read_text(encoding="utf-8", errors="replace")

    def _wait_exited(self, timeout: float) -> bool:
        """Wait until the leader has exited, leaving it unreaped (a zombie keeps its PID reserved)."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_alive():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Stop the child and every process left in its group; idempotent. Returns the exit status.

        ``sig``, then at most ``timeout`` s for the child to exit, then SIGKILL and at most
        :data:`KILL_WAIT_S` more. A child still there after that (uninterruptible sleep) is logged as an
        error and left unreaped (None is returned; a later call tries again)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return self.returncode()
        pid = proc.pid
        if self.is_alive():
            logger.debug("sending signal %d to pid %d", sig, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if not self._wait_exited(timeout):
                logger.warning("pid %d did not exit %.1f s after signal %d; killing it", pid, timeout, sig)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not self._wait_exited(KILL_WAIT_S):
                    logger.error("pid %d did not exit %.1f s after SIGKILL; leaving it", pid, KILL_WAIT_S)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)  # still alive, so the group id is still ours
                    return None
        # The leader is a zombie now, so `pid` still names our group: sweep what is left in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        rc = proc.wait()
        logger.debug("pid %d exited with %s", pid, rc)
        return rc


def pid_running(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (Linux ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """PIDs of the running processes whose process group is ``pgid`` (Linux ``/proc``)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # fields: state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return sorted(members)


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """``(ip, port)`` of every TCP socket in LISTEN state owned by ``pid`` (Linux ``/proc``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    result = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            hex_ip, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_ip[:width])
            if width == 8:
                ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                ip = socket.inet_ntop(socket.AF_INET6, words)
            result.append((ip, int(hex_port, 16)))
    return sorted(result)
