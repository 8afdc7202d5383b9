"""The engine host: a per-server process that has torch imported once and forks one engine process per model.

Why: a Triton Python model is a fresh stub process; one that imports torch and builds an engine spends
about 1 s of every cold start on ``import torch`` alone (profiled: 1.0 of the 1.26 s memory-tier time to
first token of SmolLM2). The host pays that once, at server start. When a stub of the ``warmstart`` backend
loads a model it connects to the host's Unix socket; the host forks (a few ms: the child shares the
imported modules copy-on-write) and the child loads the checkpoint (zero-copy from the node's memory tier),
builds the engine and serves that model's requests over the same connection
(:mod:`warmstart.backend.wire` frames; :mod:`warmstart.backend.remote` is the stub's side). The stub stays
a thin proxy that imports neither torch nor JAX.

Isolation is kept: each model runs in its own process, as with plain stubs. An engine process lives exactly
as long as its connection: the stub's finalize (model unload), the stub's death, or the host's stop (its
process group) ends it. The host itself never runs a model, never starts a thread (so forking is safe), and
only accepts connections from processes of its own user.

Reaping (no orphans): a busy engine process would not see its connection close, and Triton's stubs outlive
a tritonserver that was SIGKILLed for as long as it stays an unreaped zombie (the stub's own check,
``kill(parent, 0)``, succeeds on a zombie). So the host checks, every :data:`REAP_INTERVAL_S`, the peer of
each engine process (its pid and start time, from ``SO_PEERCRED`` at connect): when the peer is gone (or a
zombie) the engine process is SIGKILLed; when the peer is a Triton Python stub whose parent changed since it
connected (its tritonserver exited and it was reparented), the stub and the engine process are SIGKILLed.
Engine processes also die with the host (``PR_SET_PDEATHSIG``).

Run it with ``python -m warmstart.backend.host --socket PATH`` (``warmstart.triton.TritonServer`` does, and
sets ``WARMSTART_ENGINE_HOST=PATH`` for the server and its stubs). The socket file appears, atomically, once
the host is ready.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import logging
import os
import re
import select
import shutil
import signal
import socket
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from warmstart._process import ManagedProcess, set_parent_death_signal, tail
from warmstart.backend.metrics import Metrics
from warmstart.backend.request import error_code, request_from_json
from warmstart.backend.wire import ENV_VAR, Channel, ChannelClosed, ProtocolError
from warmstart.errors import WarmstartError
from warmstart.tritonconfig import ModelSettings

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PRELOAD", "ENV_VAR", "EngineHost", "EngineHostError", "serve"]

# Imported before the first fork: everything a torch model load touches. JAX is left to the engine process
# (it is imported there on first use): the JAX runtime must not be initialised before a fork.
DEFAULT_PRELOAD = (
    "numpy",
    "torch",
    "tokenizers",
    "warmstart.backend.runtime",
    "warmstart.backend.weights",
    "warmstart.engines.torch_llama",
    "warmstart.loaders.tiers",
    "warmstart.loaders.hostcache",
    "warmstart.store.client",
    "warmstart.torch",
    "jinja2.sandbox",  # chat templates (warmstart.chat): a first chat request would import it (~0.05 s)
    "jinja2.ext",
)
_SO_PEERCRED = struct.Struct("3i")  # pid, uid, gid
REAP_INTERVAL_S = 0.5
"""How often the host checks that the peer (stub) of each engine process is still there."""
STUB_BINARY = "triton_python_backend_stub"


class EngineHostError(WarmstartError, RuntimeError):
    """The engine host could not start, or exited; the message ends with its log tail."""


class _TokenizerCache:
    """Tokenizers the host has parsed, inherited by every engine process it forks afterwards.

    Parsing SmolLM2's 3.4 MB ``tokenizer.json`` takes 0.06 s and holds the GIL (so it does not overlap the
    engine build): a sixth of a memory-tier cold start. A child that had to parse one offers its text to
    the host (a file in the host's private directory, then the file's key on a pipe); the host parses it
    between connections, so the next start of that model finds it ready. Keyed by the SHA-256 of the text,
    so a changed tokenizer is never mistaken for a cached one; at most ``capacity`` are kept (LRU).
    """

    def __init__(self, directory: Path, capacity: int = 16) -> None:
        self.directory = directory
        self.capacity = capacity
        self._parsed: OrderedDict[str, Any] = OrderedDict()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._pending = b""

    # in an engine process
    def parse(self, text: str) -> Any:
        key = hashlib.sha256(text.encode("utf-8")).hexdigest()
        tokenizer = self._parsed.get(key)
        if tokenizer is not None:
            return tokenizer
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(text)
        target = self.directory / f"{key}.json"
        tmp = self.directory / f".{key}.{os.getpid()}.tmp"
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
            os.write(self._write_fd, f"{key}\n".encode())  # < PIPE_BUF: one atomic write
        except OSError as e:  # only a lost optimisation
            logger.info("engine process %d: cannot offer the tokenizer to the host: %s", os.getpid(), e)
            with contextlib.suppress(OSError):
                tmp.unlink()
        return tokenizer

    # in the host
    def fileno(self) -> int:
        return self._read_fd

    def absorb(self) -> None:
        """Parse every tokenizer the engine processes offered since the last call."""
        try:
            self._pending += os.read(self._read_fd, 1 << 16)
        except BlockingIOError:
            return
        *keys, self._pending = self._pending.split(b"\n")
        for raw in keys:
            key = raw.decode("ascii", errors="replace")
            path = self.directory / f"{key}.json"
            if not re.fullmatch(r"[0-9a-f]{64}", key):
                continue
            try:
                text = path.read_text(encoding="utf-8")
                path.unlink()
            except (OSError, UnicodeDecodeError):
                continue
            if key in self._parsed:
                self._parsed.move_to_end(key)
                continue
            if hashlib.sha256(text.encode("utf-8")).hexdigest() != key:
                continue
            from tokenizers import Tokenizer

            try:
                self._parsed[key] = Tokenizer.from_str(text)
            except Exception as e:  # the engine process parsed it, so this is unexpected; skip it
                logger.warning("engine host: cannot parse an offered tokenizer: %s", e)
                continue
            while len(self._parsed) > self.capacity:
                self._parsed.popitem(last=False)


# -- the engine process (one per model, forked from the host) ------------------------------------------------


class _WireSink:
    """A request's responses, sent to the stub as frames (the stub's side replays them on Triton)."""

    cancel_check_is_cheap = True  # a flag the reader loop sets when the stub says the client went away

    def __init__(self, chan: Channel, rid: int, live: dict[int, _WireSink]) -> None:
        self._chan = chan
        self._rid = rid
        self._live = live
        self.cancelled = False

    def is_cancelled(self) -> bool:
        return self.cancelled

    def _send(self, op: str, last: bool, **fields: Any) -> None:
        if last:
            self._live.pop(self._rid, None)
        with contextlib.suppress(ChannelClosed):  # the stub is gone: the reader loop ends the process
            self._chan.send(op, id=self._rid, **fields)

    def send(
        self,
        text: str,
        token_ids: Sequence[int],
        finish_reason: str | None,
        *,
        final: bool,
        prompt_tokens: int | None = None,
        stop_token_id: int | None = None,
    ) -> None:
        extra = {
            k: v
            for k, v in (("prompt_tokens", prompt_tokens), ("stop_token_id", stop_token_id))
            if v is not None
        }
        self._send("send", final, text=text, ids=list(token_ids), reason=finish_reason, final=final, **extra)

    def send_error(self, message: str, code: str) -> None:
        self._send("error", True, message=message, code=code)


class _WireMetrics:
    """Metrics sent to the stub, which reports them through Triton's metrics API."""

    def __init__(self, chan: Channel) -> None:
        self._chan = chan

    def _send(self, name: str, *args: Any) -> None:
        with contextlib.suppress(ChannelClosed):
            self._chan.send("metric", name=name, args=list(args))

    def model_loaded(self, tier: str, seconds: float) -> None:
        self._send("model_loaded", tier, seconds)

    def first_token(self, seconds: float) -> None:
        self._send("first_token", seconds)

    def tokens_generated(self, n: int) -> None:
        self._send("tokens_generated", n)

    def prompt_tokens(self, n: int) -> None:
        self._send("prompt_tokens", n)


def _settings_from_json(obj: Any) -> ModelSettings:
    known = {f.name for f in dataclasses.fields(ModelSettings)}
    if not isinstance(obj, dict) or not set(obj) <= known:
        raise ProtocolError(f"settings must be an object with keys among {sorted(known)}")
    return ModelSettings(**obj)


def _serve_model(chan: Channel, tokenizers: _TokenizerCache | None = None) -> None:
    """Load the model the stub names, then serve its requests until the stub closes the connection."""
    from warmstart.backend.runtime import Runtime

    msg = chan.recv()
    if msg["op"] != "load":
        raise ProtocolError(f"the first frame must be 'load', got {msg['op']!r}")
    name = str(msg.get("model", "model"))
    model_dir = msg.get("model_dir")
    metrics: Metrics = _WireMetrics(chan)
    try:
        settings = _settings_from_json(msg.get("settings"))
        runtime = Runtime.load(
            settings,
            model_name=name,
            model_dir=model_dir if isinstance(model_dir, str) else None,
            metrics=metrics,
            parse_tokenizer=tokenizers.parse if tokenizers is not None else None,
        )
    except Exception as e:  # the stub fails the model load with this message
        logger.warning("engine process %d: loading %s failed: %s", os.getpid(), name, e)
        chan.send("failed", message=str(e))
        return
    chan.send("ready", pid=os.getpid())
    live: dict[int, _WireSink] = {}
    try:
        while True:
            try:
                msg = chan.recv()
            except ChannelClosed:
                break
            op = msg["op"]
            if op == "submit":
                rid = msg.get("id")
                if not isinstance(rid, int) or isinstance(rid, bool) or rid in live:
                    raise ProtocolError(f"submit needs a new integer id, got {rid!r}")
                sink = live[rid] = _WireSink(chan, rid, live)
                arrived = msg.get("arrived")
                try:
                    runtime.submit(
                        request_from_json(msg.get("request")),
                        sink,
                        arrived=float(arrived) if isinstance(arrived, (int, float)) else None,
                    )
                except Exception as e:  # one bad request never ends the engine process
                    sink.send_error(str(e), error_code(e))
            elif op == "control":  # warmstart_lora_reload: answered like a request, with one FINAL frame
                rid = msg.get("id")
                if not isinstance(rid, int) or isinstance(rid, bool) or rid in live:
                    raise ProtocolError(f"control needs a new integer id, got {rid!r}")
                sink = live[rid] = _WireSink(chan, rid, live)
                try:
                    runtime.control(str(msg.get("name")), sink)
                except Exception as e:
                    sink.send_error(str(e), error_code(e))
            elif op == "cancel":
                target = live.get(msg.get("id"))  # type: ignore[arg-type]
                if target is not None:
                    target.cancelled = True
            elif op == "close":
                break
            else:
                raise ProtocolError(f"unknown op {op!r}")
    finally:
        runtime.close()
        with contextlib.suppress(WarmstartError):
            chan.send("closed")


def _child(conn: socket.socket, tokenizers: _TokenizerCache, host_pid: int) -> None:
    """Body of a forked engine process: never returns."""
    code = 0
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        set_parent_death_signal()  # the host is single-threaded: its death is the forking thread's
        if os.getppid() != host_pid:  # the host died before the line above
            os._exit(1)
        chan = Channel(conn)
        try:
            _serve_model(chan, tokenizers)
        finally:
            chan.close()
    except (ChannelClosed, ProtocolError) as e:
        logger.warning("engine process %d: %s", os.getpid(), e)
        code = 1
    except BaseException:
        logger.exception("engine process %d failed", os.getpid())
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)  # never run the host's atexit handlers or return into its accept loop


# -- the host -------------------------------------------------------------------------------------------------


def _peer_creds(conn: socket.socket) -> tuple[int, int]:
    """``(pid, uid)`` of the process at the other end of ``conn``."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _SO_PEERCRED.size)
    pid, uid, _ = _SO_PEERCRED.unpack(creds)
    return int(pid), int(uid)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, start time)`` of ``pid`` from ``/proc``, or None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])  # fields 3, 4 and 22 of proc(5)


@dataclasses.dataclass(frozen=True)
class Peer:
    """The process that connected for an engine process (a stub), as it was when it connected."""

    pid: int
    ppid: int
    start_time: int
    is_stub: bool

    @classmethod
    def of(cls, pid: int) -> Peer | None:
        stat = _proc_stat(pid)
        if stat is None or pid <= 0:
            return None
        try:
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            exe = ""
        return cls(pid, stat[1], stat[2], exe == STUB_BINARY)


def reap_decision(peer: Peer, now: tuple[str, int, int] | None) -> str | None:
    """What to do with an engine process whose peer was ``peer``, given the peer's ``/proc`` stat ``now``.

    None: keep it. ``"engine"``: SIGKILL the engine process (its peer is gone, a zombie, or its pid now
    names another process). ``"stub+engine"``: the peer is a Triton stub whose tritonserver exited (it was
    reparented): SIGKILL both.
    """
    if now is None:
        return "engine"
    state, ppid, start_time = now
    if start_time != peer.start_time or state in ("Z", "X"):
        return "engine"
    if peer.is_stub and ppid != peer.ppid:
        return "stub+engine"
    return None


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _reap_orphans(engines: dict[int, Peer]) -> None:
    """Apply :func:`reap_decision` to every engine process (the host's liveness check of the stubs)."""
    for engine_pid, peer in list(engines.items()):
        decision = reap_decision(peer, _proc_stat(peer.pid))
        if decision is None:
            continue
        if decision == "stub+engine":
            logger.warning(
                "engine host: stub %d of engine process %d outlived its tritonserver (pid %d); killing both",
                peer.pid,
                engine_pid,
                peer.ppid,
            )
            _kill(peer.pid)
        else:
            logger.warning(
                "engine host: the stub (pid %d) of engine process %d is gone; killing it",
                peer.pid,
                engine_pid,
            )
        _kill(engine_pid)
        del engines[engine_pid]  # reaped by _reap once it has exited


def _reap(engines: dict[int, Peer] | None = None) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if engines is not None:
            engines.pop(pid, None)
        if os.waitstatus_to_exitcode(status) != 0:
            logger.info("engine process %d exited with %d", pid, os.waitstatus_to_exitcode(status))


def serve(socket_path: Path | str, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
    """Import ``preload``, listen on ``socket_path`` and fork an engine process per connection until SIGTERM."""
    t0 = time.perf_counter()
    for module in preload:
        try:
            importlib.import_module(module)
        except ImportError as e:  # e.g. no torch installed: JAX-only nodes still work
            logger.warning("engine host: cannot preload %s: %s", module, e)
    path = Path(socket_path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is rw for this user only
    try:
        listener.bind(str(tmp))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    cache_dir = path.with_name(f".tokenizers-{os.getpid()}")
    cache_dir.mkdir(mode=0o700, exist_ok=True)
    tokenizers = _TokenizerCache(cache_dir)
    os.replace(tmp, path)  # atomically visible, and only once listening
    logger.info("engine host pid %d ready on %s after %.2f s", os.getpid(), path, time.perf_counter() - t0)

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    uid = os.getuid()
    host_pid = os.getpid()
    engines: dict[int, Peer] = {}  # live engine processes and their peers
    try:
        while not stopping:
            try:
                ready, _, _ = select.select([listener.fileno(), tokenizers.fileno()], [], [], REAP_INTERVAL_S)
            except InterruptedError:
                ready = []
            _reap(engines)
            _reap_orphans(engines)
            if tokenizers.fileno() in ready:
                tokenizers.absorb()
            if listener.fileno() not in ready:
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            peer_pid, peer_uid = _peer_creds(conn)
            if peer_uid != uid:
                logger.warning("engine host: refused a connection from another user")
                conn.close()
                continue
            peer = Peer.of(peer_pid)
            if peer is None:  # it connected and died already
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                _child(conn, tokenizers, host_pid)
            engines[pid] = peer
            conn.close()
            logger.debug("engine host: forked engine process %d", pid)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        shutil.rmtree(cache_dir, ignore_errors=True)
        _reap()


class EngineHost:
    """Owner of one engine-host process: start, wait until its socket is up, stop (with its engine processes).

    ``env`` is the environment the host runs with (the same as tritonserver's, so engine processes see the
    same ``WARMSTART_*`` settings a stub would).
    """

    def __init__(self, socket_path: Path | str, *, env: Mapping[str, str], log_path: Path | str) -> None:
        self.socket_path = Path(socket_path)
        if len(os.fsencode(self.socket_path)) > 100:  # sun_path holds 108 bytes; leave room for the temp name
            raise EngineHostError(
                f"socket path {self.socket_path} is too long for a Unix socket; use a shorter work directory"
            )
        self._process = ManagedProcess(
            [sys.executable, "-m", "warmstart.backend.host", "--socket", str(self.socket_path)],
            env=env,
            log_path=Path(log_path),
        )

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self) -> EngineHost:
        """Spawn the host (it imports torch for a second or so; see :meth:`wait_ready`)."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._process.start()
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the socket exists; raise :class:`EngineHostError` if the host exits or times out."""
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if not self._process.is_alive():
                raise EngineHostError(
                    f"engine host exited during start-up; log tail:\n{tail(self._process.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise EngineHostError(
                    f"engine host not ready after {timeout:.0f} s; log tail:\n{tail(self._process.log_path)}"
                )
            time.sleep(0.02)

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def logs(self) -> str:
        """Everything the host and its engine processes logged so far."""
        return self._process.logs()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL, then sweep its process group (every engine process). Idempotent."""
        if self._process.pid is None:
            return None
        rc = self._process.stop(timeout)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        return rc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m warmstart.backend.host", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
    parser.add_argument(
        "--preload",
        default=",".join(DEFAULT_PRELOAD),
        help="comma-separated modules to import before forking",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
    )
    serve(args.socket, [m for m in args.preload.split(",") if m])
    return 0


if __name__ == "__main__":
    sys.exit(main())
