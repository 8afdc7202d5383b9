"""``warmstart node``: the node agent, which keeps this node registered in cluster state (etcd)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

HELP = (
    "register this node (its Triton server and node store) in cluster state on etcd, and keep it registered"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", required=True, metavar="URL", help="etcd client URL, e.g. http://127.0.0.1:2379")
    p.add_argument("--name", required=True, help="the node's server name (unique in the cluster)")
    p.add_argument("--grpc", required=True, metavar="HOST:PORT", help="its Triton server's gRPC endpoint")
    p.add_argument(
        "--memory-budget", required=True, metavar="SIZE", help="memory its models may take, e.g. 70GiB"
    )
    p.add_argument(
        "--store", default=None, metavar="URL", help="its node store (warmstart store), http://HOST:PORT"
    )
    p.add_argument(
        "--repository-key-env",
        default=None,
        metavar="VAR",
        help="environment variable (on the schedulers) that holds its Triton repository API key",
    )
    p.add_argument("--lease-ttl", type=int, default=10, metavar="S", help="lease TTL in whole seconds (10)")
    p.add_argument("--prefix", default="/warmstart/", help="cluster-state key prefix (default /warmstart/)")


def run(args: argparse.Namespace) -> int:
    from warmstart.node import NodeAgent, store_inventory
    from warmstart.scheduler.errors import InvalidSnapshotError
    from warmstart.scheduler.etcd_state import EtcdClusterState
    from warmstart.scheduler.state import NodeRecord
    from warmstart.units import parse_size

    logging.getLogger("warmstart.node").setLevel(logging.INFO)
    try:
        record = NodeRecord(
            name=args.name,
            grpc=args.grpc,
            memory_budget_bytes=parse_size(args.memory_budget),
            epoch=1,  # replaced by the incarnation's
            node_store=args.store,
            repository_key_env=args.repository_key_env,
        )
    except InvalidSnapshotError as e:
        sys.stderr.write(f"warmstart node: {e}\n")
        return 2
    cluster = EtcdClusterState(args.etcd, prefix=args.prefix)
    agent = NodeAgent(
        cluster, record, ttl_s=args.lease_ttl, inventory=store_inventory(args.store) if args.store else None
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        agent.request_stop()  # the loop ends after its round; the lease is revoked below

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.step()
    if agent.superseded:
        return 1
    sys.stdout.write(f"node {args.name} registered={agent.record is not None} epoch={agent.epoch}\n")
    sys.stdout.flush()
    agent.run_forever()
    agent.stop(revoke=True)
    cluster.close()
    return 1 if agent.superseded else 0
