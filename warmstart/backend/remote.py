"""The stub's side of an engine process (:mod:`warmstart.backend.host`): a :class:`RemoteRuntime`.

It offers what :class:`warmstart.backend.runtime.Runtime` offers the backend's ``model.py`` (``submit`` a
parsed request with a response sink, ``close``) but the engine runs in a process forked from the node's
engine host. One reader thread turns the engine process's frames back into calls on each request's sink and
on the model's metrics, and between frames forwards cancellations (asking Triton whether a request was
cancelled is an IPC round trip, so it is asked every :data:`CANCEL_POLL_SECONDS` per live request). All of a
model's Triton calls for its requests are made on that one thread.

If the engine process dies, every live request ends with UNAVAILABLE and so does every later one; the
model has to be reloaded (the scheduler does that when it sees the errors).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from warmstart.backend.metrics import Metrics, NullMetrics
from warmstart.backend.request import GenerateRequest, request_to_json
from warmstart.backend.runtime import CANCEL_POLL_SECONDS, ModelLoadFailed, ResponseSink
from warmstart.backend.wire import Channel, ChannelClosed, ProtocolError
from warmstart.errors import WarmstartError
from warmstart.tritonconfig import ModelSettings

logger = logging.getLogger(__name__)

__all__ = ["EngineHostUnavailable", "RemoteRuntime"]

_METRICS = ("model_loaded", "first_token", "tokens_generated", "prompt_tokens")


class EngineHostUnavailable(WarmstartError, ConnectionError):
    """The engine host's socket is missing or refuses connections (the backend then loads in-process)."""


def _connect(socket_path: str, wait_s: float) -> socket.socket:
    """Connect to the host, waiting up to ``wait_s`` for its socket to appear (it may still be starting)."""
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(socket_path)
            return sock
        except OSError as e:
            sock.close()
            # no socket yet: the host may still be importing torch; any other error: a dead host's leftover
            if not isinstance(e, FileNotFoundError) or time.monotonic() >= deadline:
                raise EngineHostUnavailable(f"cannot connect to the engine host at {socket_path}: {e}") from e
            time.sleep(0.05)


class RemoteRuntime:
    """A model served by an engine process; see the module docstring."""

    def __init__(self, chan: Channel, *, model_name: str, pid: int, metrics: Metrics) -> None:
        self._chan = chan
        self._model = model_name
        self.pid = pid
        self._metrics = metrics
        self._sinks: dict[int, ResponseSink] = {}
        self._cancel_sent: set[int] = set()
        self._lock = threading.Lock()
        self._next_id = 0
        self._dead: str | None = None  # why no request can be served any more
        self._closed = threading.Event()
        self._reader = threading.Thread(
            target=self._read_loop, name=f"warmstart-{model_name}-reader", daemon=True
        )

        self._reader.start()

    @classmethod
    def connect(
        cls,
        socket_path: str | os.PathLike[str],
        settings: ModelSettings,
        *,
        model_name: str,
        model_dir: Path | str | None = None,
        metrics: Metrics | None = None,
        wait_s: float = 30.0,
    ) -> RemoteRuntime:
        """Ask the host for an engine process, have it load the model, and return once it is ready.

        Raises :class:`EngineHostUnavailable` when the host cannot be reached, and
        :class:`~warmstart.backend.runtime.ModelLoadFailed` when the model cannot be loaded.
        """
        metrics = metrics or NullMetrics()
        chan = Channel(_connect(os.fspath(socket_path), wait_s))
        try:
            chan.send(
                "load",
                model=model_name,
                model_dir=str(model_dir) if model_dir is not None else None,
                settings=asdict(settings),
            )
            while True:
                try:
                    msg = chan.recv()
                except (ChannelClosed, ProtocolError) as e:
                    raise ModelLoadFailed(
                        f"model {model_name!r}: its engine process exited while loading ({e}); see the engine "
                        "host's log (engine-host.log beside tritonserver's)"
                    ) from e
                op = msg["op"]
                if op == "metric":
                    _apply_metric(metrics, msg)
                elif op == "failed":
                    raise ModelLoadFailed(
                        str(msg.get("message", "the engine process failed to load the model"))
                    )
                elif op == "ready":
                    pid = msg.get("pid")
                    return cls(
                        chan, model_name=model_name, pid=pid if isinstance(pid, int) else -1, metrics=metrics
                    )
                else:
                    raise ModelLoadFailed(f"model {model_name!r}: unexpected {op!r} from its engine process")
        except BaseException:
            chan.close()
            raise

    # -- requests --------------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest, sink: ResponseSink, *, arrived: float | None = None) -> None:
        """Send ``request`` to the engine process; its responses go to ``sink`` (errors included)."""
        with self._lock:
            dead = self._dead
            if dead is None:
                rid = self._next_id
                self._next_id += 1
                self._sinks[rid] = sink
        if dead is not None:
            sink.send_error(dead, "UNAVAILABLE")
            return
        try:
            self._chan.send(
                "submit",
                id=rid,
                request=request_to_json(request),
                arrived=time.monotonic() if arrived is None else arrived,
            )
        except (ChannelClosed, ProtocolError) as e:
            with self._lock:
                self._sinks.pop(rid, None)
            sink.send_error(f"model {self._model!r}: cannot reach its engine process: {e}", "UNAVAILABLE")

    def control(self, op: str, sink: ResponseSink) -> None:
        """Send a control request (``"reload_adapters"``) to the engine process; its answer goes to ``sink``."""
        with self._lock:
            dead = self._dead
            if dead is None:
                rid = self._next_id
                self._next_id += 1
                self._sinks[rid] = sink
        if dead is not None:
            sink.send_error(dead, "UNAVAILABLE")
            return
        try:
            self._chan.send("control", id=rid, name=op)
        except (ChannelClosed, ProtocolError) as e:
            with self._lock:
                self._sinks.pop(rid, None)
            sink.send_error(f"model {self._model!r}: cannot reach its engine process: {e}", "UNAVAILABLE")

    def close(self, timeout: float = 30.0) -> None:
        """Ask the engine process to finish (running requests end with UNAVAILABLE) and wait until it has
        exited (its memory is free then), at most ``timeout`` in all. Idempotent."""
        deadline = time.monotonic() + timeout
        self._closed.set()
        with contextlib.suppress(ChannelClosed):
            self._chan.send("close")
        self._reader.join(timeout)
        self._chan.close()
        if self.pid > 0 and not _wait_exited(self.pid, deadline):
            logger.warning("model %r: engine process %d still running after close", self._model, self.pid)

    # -- threads ---------------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        reason = f"model {self._model!r}: its engine process (pid {self.pid}) exited; reload the model"
        try:
            last_poll = time.monotonic()
            while True:
                # one thread makes every pb_utils call of this model (responses and cancellation checks)
                readable, _, _ = select.select([self._chan.sock], [], [], CANCEL_POLL_SECONDS)
                if time.monotonic() - last_poll >= CANCEL_POLL_SECONDS:
                    last_poll = time.monotonic()
                    self._poll_cancellations()
                if not readable:
                    continue
                msg = self._chan.recv()
                op = msg["op"]
                if op in ("send", "error"):
                    self._dispatch(msg)
                elif op == "metric":
                    _apply_metric(self._metrics, msg)
                elif op == "closed":
                    reason = f"model {self._model!r} is being unloaded"
                    break
                else:
                    raise ProtocolError(f"unexpected {op!r}")
        except (ChannelClosed, ProtocolError) as e:
            if not self._closed.is_set():
                logger.error("%s (%s)", reason, e)
        finally:
            with self._lock:
                self._dead = reason
                orphans = list(self._sinks.values())
                self._sinks.clear()
            for sink in orphans:
                sink.send_error(reason, "UNAVAILABLE")

    def _dispatch(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        if not isinstance(rid, int):
            raise ProtocolError(f"a response needs an integer id, got {rid!r}")
        with self._lock:
            sink = self._sinks.get(rid)
            final = msg["op"] == "error" or msg.get("final") is True
            if final:
                self._sinks.pop(rid, None)
                self._cancel_sent.discard(rid)
        if sink is None:
            return
        if msg["op"] == "error":
            sink.send_error(str(msg.get("message", "")), str(msg.get("code", "INTERNAL")))
            return
        ids = msg.get("ids")
        reason = msg.get("reason")
        sink.send(
            str(msg.get("text", "")),
            [int(t) for t in ids] if isinstance(ids, list) else [],
            reason if isinstance(reason, str) else None,
            final=final,
            prompt_tokens=_count(msg.get("prompt_tokens")),
            stop_token_id=_count(msg.get("stop_token_id")),
        )

    def _poll_cancellations(self) -> None:
        with self._lock:
            pending = [(rid, s) for rid, s in self._sinks.items() if rid not in self._cancel_sent]
        for rid, sink in pending:
            try:
                cancelled = sink.is_cancelled()
            except Exception:  # a sink that cannot answer is not cancelled
                cancelled = False
            if not cancelled:
                continue
            with self._lock:
                if rid not in self._sinks:
                    continue
                self._cancel_sent.add(rid)
            with contextlib.suppress(ChannelClosed):
                self._chan.send("cancel", id=rid)


def _wait_exited(pid: int, deadline: float) -> bool:
    """Wait until process ``pid`` has exited (gone, or a zombie: its memory is released), until ``deadline``.

    The engine process is the engine host's child, not ours, so it is watched through ``/proc``.
    """
    stat = f"/proc/{pid}/stat"
    while True:
        try:
            with open(stat, "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            return True
        if state in (b"Z", b"X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


def _apply_metric(metrics: Metrics, msg: dict[str, Any]) -> None:
    name, args = msg.get("name"), msg.get("args")
    if name in _METRICS and isinstance(args, list):
        try:
            getattr(metrics, name)(*args)
        except Exception:  # a metric never fails a request
            logger.warning("reporting metric %s failed", name, exc_info=True)


def _count(value: Any) -> int | None:
    """A non-negative integer field of a response frame (``prompt_tokens``, ``stop_token_id``), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
