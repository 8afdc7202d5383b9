"""``warmstart store``: the node store daemon (disk and host-memory tiers, HTTP API)."""

from __future__ import annotations

import argparse

HELP = "run the node checkpoint store (disk + host-memory tiers, HTTP API on loopback)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="directory of the disk tier (and the store's files)")
    p.add_argument(
        "--memory-capacity", required=True, metavar="SIZE", help="host-memory tier capacity, e.g. 8GiB"
    )
    p.add_argument("--disk-capacity", required=True, metavar="SIZE", help="disk tier capacity, e.g. 100GiB")
    p.add_argument(
        "--remote", required=True, metavar="URI", help="prefix of model checkpoints: <URI>/<name>/"
    )
    p.add_argument("--listen", default="127.0.0.1:8073", metavar="HOST:PORT", help="address to serve on")
    p.add_argument("--memory-root", default=None, help="memory tier directory (default: under /dev/shm)")


def run(args: argparse.Namespace) -> int:
    from warmstart.store.service import StoreConfig, serve

    serve(
        StoreConfig.from_args(
            root=args.root,
            remote=args.remote,
            memory_capacity=args.memory_capacity,
            disk_capacity=args.disk_capacity,
            listen=args.listen,
            memory_root=args.memory_root,
        )
    )
    return 0
