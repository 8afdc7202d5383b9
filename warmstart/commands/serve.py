"""``warmstart serve``: run tritonserver with the warmstart backend over a model repository.

The server runs as configured for a fleet behind the scheduler: explicit model control, auto-complete off
(configs are complete), strict readiness off, loopback binding, a short exit timeout, and one key (the
repository API key) guarding the model-repository, shared-memory, logging and trace APIs
(``warmstart.triton.RESTRICTED_APIS``) and the warmstart backend's engine releases (handed to it as
``WARMSTART_REPO_KEY`` in tritonserver's environment; ``warmstart.backend.release``). ``serve`` supervises it, copies its log to stdout, exits with its status if it dies, and
stops it on Ctrl-C or SIGTERM (SIGTERM, then SIGKILL by PID if it hangs). Beside it runs the node's engine
host (``warmstart.backend.host``: torch imported once, one forked engine process per loaded model), unless
``--no-engine-host``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO

HELP = "serve a model repository with tritonserver and the warmstart backend"

ENV_API_KEY = "WARMSTART_REPO_KEY"
POLL_SECONDS = 0.2
STOP_TIMEOUT = 10.0


class _Stop(Exception):
    """SIGTERM or SIGINT asked serve to stop the server."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-repository",
        action="append",
        type=Path,
        metavar="DIR",
        help="model repository (repeatable; default: ./model_repository)",
    )
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 picks a free one)")
    p.add_argument(
        "--metrics-port", type=int, default=8002, help="metrics port (default 8002; 0 picks a free one)"
    )
    p.add_argument("--address", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--load-model", action="append", default=[], metavar="NAME", help="load at start (repeatable)"
    )
    p.add_argument("--store", metavar="URL", help="node store URL (sets WARMSTART_STORE for the backend)")
    p.add_argument(
        "--models-dir",
        metavar="DIR_OR_URI",
        help="where ${WARMSTART_MODELS} in checkpoint references points (a directory or a URI prefix)",
    )
    p.add_argument(
        "--api-key",
        help=f"key for the repository API (load/unload/index), the shared-memory, logging and trace APIs, and "
        f"engine releases (header x-warmstart-repo-key); default ${ENV_API_KEY}, else a random key printed at start",
    )
    p.add_argument(
        "--workdir", type=Path, help="directory for the backend files and the log (default: a temp dir)"
    )
    p.add_argument(
        "--exit-timeout", type=int, default=3, help="seconds tritonserver waits for in-flight work"
    )
    p.add_argument("--log-verbose", action="store_true", help="tritonserver verbose logging")
    p.add_argument(
        "--no-engine-host",
        action="store_true",
        help="run each model's engine inside its Triton stub instead of a process forked from the node's engine "
        "host (slower cold starts: every load imports torch)",
    )


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _copy_new(log: IO[bytes] | None, out: IO[bytes]) -> None:
    if log is not None:
        data = log.read()
        if data:
            out.write(data)
            out.flush()


def run(args: argparse.Namespace) -> int:
    from warmstart.triton import TritonConfig, TritonServer

    repos = tuple(args.model_repository or [Path("model_repository")])
    key = args.api_key or os.environ.get(ENV_API_KEY) or secrets.token_urlsafe(24)
    if args.store:
        os.environ["WARMSTART_STORE"] = args.store
    if args.models_dir:
        os.environ["WARMSTART_MODELS"] = args.models_dir
    config = TritonConfig(
        model_repositories=repos,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        bind_address=args.address,
        load_models=tuple(args.load_model),
        repository_api_key=key,
        exit_timeout_secs=args.exit_timeout,
        verbose=args.log_verbose,
    )
    server = TritonServer(config, workdir=args.workdir, engine_host=not args.no_engine_host)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    log: IO[bytes] | None = None
    out = sys.stdout.buffer
    try:
        server.start(timeout=600.0)  # --load-model loads before the server is live
        assert server.log_path is not None
        log = server.log_path.open("rb")
        _copy_new(log, out)
        who = "" if args.api_key or os.environ.get(ENV_API_KEY) else f" (repository API key: {key})"
        sys.stderr.write(
            f"warmstart serve: tritonserver pid {server.pid} on http {server.http_url}, grpc {server.grpc_url}, "
            f"metrics {server.metrics_url}{who}; Ctrl-C stops it\n"
        )
        sys.stderr.flush()
        while server.is_alive():
            _copy_new(log, out)
            time.sleep(POLL_SECONDS)
        _copy_new(log, out)
        rc = server.stop()
        sys.stderr.write(f"warmstart serve: tritonserver exited by itself with status {rc}\n")
        if rc is None:
            return 1
        return rc if rc >= 0 else 128 - rc  # killed by a signal: the shell's convention
    except (_Stop, KeyboardInterrupt):
        sys.stderr.write("warmstart serve: stopping tritonserver\n")
        server.stop(STOP_TIMEOUT)
        _copy_new(log, out)
        return 0
    finally:
        server.stop(STOP_TIMEOUT)  # idempotent; also on errors
        if log is not None:
            log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
