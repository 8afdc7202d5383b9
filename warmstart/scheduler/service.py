"""The scheduler process: ``warmstart scheduler --config cluster.yaml``.

Starts the router (health, node-store and keep-alive loops), the HTTP front end (KServe v2 + OpenAI +
admin API) and the gRPC front end, all on loopback unless the config says otherwise, and runs until
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Sequence
from typing import Any

import grpc
from aiohttp import web

from warmstart.scheduler.config import SchedulerConfig, _address
from warmstart.scheduler.grpc_frontend import add_to_server
from warmstart.scheduler.http_frontend import HttpFrontend
from warmstart.scheduler.router import Router

logger = logging.getLogger(__name__)


class SchedulerService:
    """Router plus both front ends; ``start`` binds the listeners, ``stop`` closes everything."""

    def __init__(self, config: SchedulerConfig, **router_kwargs: Any) -> None:
        self.config = config
        if config.etcd is not None and "store" not in router_kwargs:
            from warmstart.scheduler.etcd_state import EtcdClusterState

            router_kwargs["store"] = EtcdClusterState(config.etcd, prefix=config.etcd_prefix)
        self.router = Router(config, **router_kwargs)
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self.http_port = 0
        self.grpc_port = 0

    async def start(self) -> None:
        """Start the router, then listen on HTTP and gRPC."""
        await self.router.start()
        http = HttpFrontend(
            self.router,
            admin_token=self.config.admin_token,
            max_body_bytes=self.config.max_request_body_bytes,
            body_timeout_s=self.config.request_body_timeout_s,
        )
        self._runner = web.AppRunner(http.app, access_log=None)
        await self._runner.setup()
        host, port = _address("listen_http", self.config.listen_http)
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else port
        self._grpc = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        add_to_server(self._grpc, self.router)
        self.grpc_port = self._grpc.add_insecure_port(self.config.listen_grpc)
        await self._grpc.start()
        logger.info("scheduler listening: http %s:%d, grpc port %d", host, self.http_port, self.grpc_port)

    async def stop(self) -> None:
        """Stop accepting, cancel in-flight work, close upstream channels."""
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.router.close()


async def serve(config: SchedulerConfig) -> None:
    """Run the scheduler until SIGINT/SIGTERM."""
    service = SchedulerService(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    print(f"scheduler ready http={service.http_port} grpc={service.grpc_port}", flush=True)  # noqa: T201
    try:
        await stop.wait()
    finally:
        await service.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``scheduler`` subcommand's options."""
    parser.add_argument("--config", required=True, help="cluster YAML (servers, models, listen addresses)")
    parser.add_argument(
        "--etcd",
        default=None,
        metavar="URL",
        help="cluster state on this etcd (http://host:port): route to the nodes registered there "
        "(overrides the config's etcd key)",
    )
    parser.add_argument(
        "--etcd-prefix",
        default=None,
        metavar="PREFIX",
        help="the cluster's etcd key prefix (default /warmstart/)",
    )
    parser.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    """Entry point of ``warmstart scheduler``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level is not None:
        logging.getLogger().setLevel(args.log_level)
    config = SchedulerConfig.from_yaml(args.config)
    if args.etcd is not None:
        config = dataclasses.replace(config, etcd=args.etcd)
    if args.etcd_prefix is not None:
        config = dataclasses.replace(config, etcd_prefix=args.etcd_prefix)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m warmstart.scheduler.service --config cluster.yaml``."""
    parser = argparse.ArgumentParser(prog="warmstart scheduler", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
