"""Time one placement decision on a 1000-server x 1000-model cluster snapshot.

Usage: python benchmarks/policy_speed.py [--servers N] [--models M] [--decisions D] [--seed S]

Prints medians and p99 of ``place()`` (all models, cold models only, warm models only), the one-off
cost of building the snapshot's index (done once per snapshot, shared by every decision on it), and
of ``plan_migration()``; and the router's whole decision, its snapshot included, when one server changed
since the last one (a generation routed there: ``Router.snapshot()`` + the placement rule on a router
with N servers x M models, no processes); writes benchmarks/results/policy_speed.json. Targets: median
``place()`` < 1 ms; the router's decision with its snapshot: median and p99 < 1 ms.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from warmstart.scheduler import ClusterSnapshot, place, plan_migration
from warmstart.scheduler.synthetic import GIB, synthetic_cluster

RESULTS = Path(__file__).parent / "results" / "policy_speed.json"


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
        "n": len(ordered),
    }


def _time_place(snapshot: ClusterSnapshot, models: list[str]) -> list[float]:
    samples = []
    for model in models:
        start = time.perf_counter()
        place(snapshot, model)
        samples.append(time.perf_counter() - start)
    return samples


def _scenario(snapshot: ClusterSnapshot, decisions: int, seed: int) -> dict[str, object]:
    index = snapshot.index
    rng = random.Random(seed)
    names = sorted(snapshot.models)
    warm = sorted(set(index.warm) | set(index.in_flight))
    cold = sorted(set(names) - set(warm))
    _time_place(snapshot, names[:200])  # warm up caches and numpy
    rows: dict[str, dict[str, float] | None] = {
        "place_all": _ms(_time_place(snapshot, [rng.choice(names) for _ in range(decisions)])),
        "place_cold": _ms(_time_place(snapshot, [rng.choice(cold) for _ in range(decisions)]))
        if cold
        else None,
        "place_warm": _ms(_time_place(snapshot, [rng.choice(warm) for _ in range(decisions)]))
        if warm
        else None,
    }
    migration = []
    for model in [rng.choice(cold) for _ in range(min(200, decisions))] if cold else []:
        start = time.perf_counter()
        plan_migration(snapshot, model, replay_s_per_token=0.002, threshold_tokens=20)
        migration.append(time.perf_counter() - start)
    rows["plan_migration_cold"] = _ms(migration) if migration else None
    medians = [row["median_ms"] for key, row in rows.items() if row is not None and key.startswith("place")]
    return {"cold_models": len(cold), **rows, "meets_target": max(medians) < 1.0}


def _router_decisions(servers: int, models: int, decisions: int, seed: int) -> dict[str, object]:
    """The router's decision, snapshot included, after one server changed (no processes: no upstream is
    called). The first snapshot renders every server: reported apart."""
    import asyncio

    from warmstart.scheduler.config import SchedulerConfig
    from warmstart.scheduler.router import Router, _InstanceRT

    bw = {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8}
    config = SchedulerConfig.from_dict(
        {
            "servers": [
                {
                    "name": f"s{i:04d}",
                    "grpc": f"127.0.0.1:{10000 + i}",
                    "bandwidth": bw,
                    "memory_budget_bytes": 80 * GIB,
                }
                for i in range(servers)
            ],
            "models": {
                f"m{j:04d}": {"checkpoint": f"s3://models/m{j}", "size_bytes": 4 * GIB} for j in range(models)
            },
        }
    )

    async def run() -> dict[str, object]:
        router = Router(config, renderer=lambda m: {}, upstream_factory=lambda server: None)  # type: ignore[arg-type,return-value]
        names = sorted(router.models)
        for i, rt in enumerate(router.servers.values()):
            rt.healthy = True
            for j in (2 * i % models, (2 * i + 1) % models):
                rt.instances[names[j]] = _InstanceRT(names[j], 4 * GIB, 0.0)
        rng = random.Random(seed)
        t0 = time.perf_counter()
        router._place(router.snapshot(), names[0])
        first = time.perf_counter() - t0
        samples = []
        runtimes = list(router.servers.values())
        for k in range(decisions):
            rt = rng.choice(
                runtimes
            )  # one server changed since the last decision (a generation routed there)
            inst = next(iter(rt.instances.values()))
            inst.last_used_s = float(k)
            start = time.perf_counter()
            router._place(router.snapshot(), rng.choice(names))
            samples.append(time.perf_counter() - start)
        return {"first_snapshot_ms": first * 1e3, "decision": _ms(samples)}

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    scenarios = {
        # roomy: 80 GiB per server, most models fit somewhere without eviction
        "roomy": synthetic_cluster(args.servers, args.models, seed=args.seed, loaded_per_server=2),
        # contended: 8 GiB per server, loads need evictions and migration planning has real candidates
        "contended": synthetic_cluster(
            args.servers, args.models, seed=args.seed, loaded_per_server=2, budget_bytes=8 * GIB
        ),
    }
    result: dict[str, object] = {
        "benchmark": "policy_speed",
        "servers": args.servers,
        "models": args.models,
        "decisions": args.decisions,
        "seed": args.seed,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "target_ms": 1.0,
    }
    builds = []
    for _ in range(5):
        base = scenarios["roomy"]
        fresh = ClusterSnapshot(base.servers, base.models, base.now)
        start = time.perf_counter()
        _ = fresh.index
        builds.append(time.perf_counter() - start)
    result["index_build_per_snapshot"] = _ms(builds)
    print(f"policy speed: {args.servers} servers x {args.models} models, {args.decisions} decisions per row")
    print(f"{'scenario':<11}{'what':<22}{'median ms':>11}{'p99 ms':>10}{'n':>7}")
    met = True
    for name, snapshot in scenarios.items():
        rows = _scenario(snapshot, args.decisions, args.seed)
        result[name] = rows
        met = met and bool(rows["meets_target"])
        for key, row in rows.items():
            if isinstance(row, dict):
                print(f"{name:<11}{key:<22}{row['median_ms']:>11.4f}{row['p99_ms']:>10.4f}{row['n']:>7}")
    row = result["index_build_per_snapshot"]
    assert isinstance(row, dict)
    print(f"{'(once)':<11}{'index_build':<22}{row['median_ms']:>11.4f}{row['p99_ms']:>10.4f}{row['n']:>7}")
    router_rows = _router_decisions(args.servers, args.models, min(args.decisions, 2000), args.seed)
    result["router_decision_with_snapshot"] = router_rows
    decision = router_rows["decision"]
    assert isinstance(decision, dict)
    router_met = decision["median_ms"] < 1.0 and decision["p99_ms"] < 1.0
    router_rows["meets_target"] = router_met
    print(
        f"{'router':<11}{'snapshot+decision':<22}{decision['median_ms']:>11.4f}{decision['p99_ms']:>10.4f}{decision['n']:>7}"
    )
    print(
        f"{'router':<11}{'first snapshot (all)':<22}{router_rows['first_snapshot_ms']:>11.4f}{'':>10}{1:>7}"
    )
    result["meets_target"] = met and router_met
    print(f"target: median place() < 1 ms in every row: {'met' if met else 'MISSED'}")
    print(
        "target: the router's decision with its snapshot (one server changed) median and p99 < 1 ms: "
        f"{'PASS' if router_met else 'FAIL'}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
