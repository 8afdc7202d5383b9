"""Time one placement decision on a 1000-server x 1000-model cluster snapshot.

Usage: python benchmarks/policy_speed.py [--servers N] [--models M] [--decisions D] [--seed S]

Prints medians and p99 of ``place()`` (all models, cold models only, warm models only), the one-off
cost of building the snapshot's index (done once per snapshot, shared by every decision on it), and
of ``plan_migration()``; writes benchmarks/results/policy_speed.json. Target: median ``place()`` < 1 ms.
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
    result["meets_target"] = met
    print(f"target: median place() < 1 ms in every row: {'met' if met else 'MISSED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
