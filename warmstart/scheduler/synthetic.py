"""Seeded synthetic cluster snapshots, for policy benchmarks and large-scale policy tests."""

from __future__ import annotations

import random

from warmstart.scheduler.state import (
    ClusterSnapshot,
    Instance,
    LoadInFlight,
    ModelSpec,
    NodeBandwidth,
    PendingLoad,
    RunningRequest,
    ServerState,
    Tier,
)

GIB = 1 << 30


def synthetic_cluster(
    n_servers: int,
    n_models: int,
    *,
    seed: int = 0,
    now: float = 1000.0,
    loaded_per_server: int = 4,
    stored_per_server: int = 16,
    budget_bytes: int = 80 * GIB,
) -> ClusterSnapshot:
    """A random but reproducible cluster: per server a few loaded models (some busy), a load in flight
    on some, node stores holding ``stored_per_server`` checkpoints in memory or disk, measured bandwidths
    and overheads drawn from plausible ranges, and about 2% unhealthy servers. Names sort in index order.
    """
    rng = random.Random(seed)
    models = [
        ModelSpec(
            name=f"m-{i:05d}",
            checkpoint_uri=f"s3://models/m-{i:05d}",
            size_bytes=rng.choice([1, 2, 4, 8, 16]) * GIB // 2,
            engine="torch",
            keep_alive_s=rng.choice([30.0, 60.0, 300.0]),
            max_concurrency=rng.choice([1, 4, 8]),
        )
        for i in range(n_models)
    ]
    servers: list[ServerState] = []
    for i in range(n_servers):
        picked = rng.sample(models, min(n_models, loaded_per_server + 1 + stored_per_server))
        loaded, loading, stored = picked[:loaded_per_server], picked[loaded_per_server], picked
        instances = []
        for spec in loaded:
            busy = rng.random() < 0.5
            requests = (
                tuple(
                    RunningRequest(f"r-{i}-{spec.name}-{k}", rng.randint(16, 512), rng.randint(1, 256), 5.0)
                    for k in range(rng.randint(1, spec.max_concurrency))
                )
                if busy
                else ()
            )
            instances.append(Instance(spec.name, spec.size_bytes, now - rng.uniform(0, 600), requests))
        in_flight = (
            (LoadInFlight(loading.name, loading.size_bytes, now + rng.uniform(0.1, 20)),)
            if rng.random() < 0.2
            else ()
        )
        taken = {x.model for x in instances} | {x.model for x in in_flight}
        queue = tuple(
            PendingLoad(spec.name, spec.size_bytes, 3.0)
            for spec in stored[-1:]
            if rng.random() < 0.05 and spec.name not in taken
        )
        servers.append(
            ServerState(
                name=f"s-{i:05d}",
                healthy=rng.random() > 0.02,
                memory_budget_bytes=budget_bytes,
                bandwidth=NodeBandwidth(
                    memory_bps=rng.uniform(10e9, 25e9),
                    disk_bps=rng.uniform(1e9, 7e9),
                    remote_bps=rng.uniform(0.2e9, 2e9),
                ),
                triton_load_overhead_s=rng.uniform(0.3, 1.5),
                instances=tuple(instances),
                loading=in_flight,
                load_queue=queue,
                store_tiers={m.name: rng.choice([Tier.MEMORY, Tier.DISK, Tier.DISK]) for m in stored},
            )
        )
    return ClusterSnapshot.of(servers, models, now)
