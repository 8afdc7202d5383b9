#!/usr/bin/env python
"""Cluster-scale replay: the scheduler's own policy code on simulated clusters (``warmstart.scheduler.simulate``).

Subcommands (``--help`` on each; how to read the output: ``benchmarks/README.md``, "Cluster replay"):

* ``derive-profile``: write ``benchmarks/sim_profiles/this_machine.json`` from the project's own benchmark
  results (every figure names the file and key it came from).
* ``calibrate``: replay the exact workload of a ``benchmarks/workload.py`` run (its JSON holds the requests,
  models, layout, budgets and link) with this machine's profile, per policy, and compare p50/p99 TTFT, loads
  per tier and evictions with what really happened.
* ``scale``: p50/p99 TTFT against request rate and cluster size (8, 64, 512 servers) for every policy on a
  profile (default H100) with a 7-70B catalogue, and the full code trace; tables, PNG plots, JSON.
* ``perf``: wall time of replaying the full code trace on 512 servers for one policy; the policy's decision
  time at 512 servers x 1000 models inside the replay.

Workloads: the Azure LLM inference trace (any CSV with the columns ``TIMESTAMP,ContextTokens,GeneratedTokens``),
Poisson or Gamma arrivals, Zipf popularity over N models, rate sweeps. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from warmstart.scheduler.simulate import (  # noqa: E402
    POLICY_NAMES,
    ServerProfile,
    SimRequest,
    SimServer,
    SimSettings,
    Simulator,
    layout_servers,
    model_spec,
    stats,
)
from warmstart.scheduler.state import ModelSpec, NodeBandwidth  # noqa: E402

PROFILES = REPO / "benchmarks" / "sim_profiles"
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_TRACE = REPO.parent / "shared" / "data" / "AzureLLMInferenceTrace_code.csv"
TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
GB = 1e9
WORKLOAD_CONFIG_REMOTE_BPS = (
    2e8  # benchmarks/workload.py's scheduler config: remote_bps until the store measured
)


class TraceError(ValueError):
    """A trace file the loader cannot use; the message names the file, the line and what to fix."""


class ProfileError(ValueError):
    """A hardware profile file the simulator cannot use; the message names the key."""


# ============================================================================================ inputs


def read_trace(path: Path) -> list[tuple[float, int, int]]:
    """``(timestamp_s, context_tokens, generated_tokens)`` rows of an Azure LLM inference trace CSV, sorted by
    time. Any file with the columns ``TIMESTAMP`` (``YYYY-MM-DD HH:MM:SS[.fraction]``), ``ContextTokens`` and
    ``GeneratedTokens`` (integers >= 0) is accepted; other columns are ignored."""
    try:
        f = path.open(newline="")
    except OSError as e:
        raise TraceError(f"{path}: cannot open the trace ({e.strerror})") from None
    rows: list[tuple[float, int, int]] = []
    with f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in TRACE_COLUMNS if c not in header]
        if missing:
            raise TraceError(
                f"{path}: missing column(s) {', '.join(missing)}; a trace needs the header "
                f"{','.join(TRACE_COLUMNS)} (found {','.join(header) or 'nothing'})"
            )
        for line, r in enumerate(reader, start=2):
            stamp = (r.get("TIMESTAMP") or "").strip()
            try:
                head, _, frac = stamp.partition(".")
                ts = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
                if frac:
                    if not frac.isdigit():
                        raise ValueError(frac)
                    ts += int(frac) / 10 ** len(frac)
            except ValueError:
                raise TraceError(
                    f"{path}:{line}: TIMESTAMP {stamp!r} is not 'YYYY-MM-DD HH:MM:SS[.fraction]'"
                ) from None
            values = []
            for col in TRACE_COLUMNS[1:]:
                text = (r.get(col) or "").strip()
                if not text.isdigit():
                    raise TraceError(f"{path}:{line}: {col} {text!r} is not an integer >= 0")
                values.append(int(text))
            rows.append((ts, values[0], values[1]))
    if not rows:
        raise TraceError(f"{path}: the trace has a header but no rows")
    rows.sort()
    return rows


def trace_arrivals(rows: Sequence[tuple[float, int, int]], rate: float | None = None) -> list[float]:
    """Arrival times (s from the first row), time-scaled so the mean rate is ``rate`` (None: as recorded)."""
    t0 = rows[0][0]
    span = rows[-1][0] - t0
    scale = 1.0
    if rate is not None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {rate!r}")
        native = (len(rows) - 1) / span if span > 0 else rate
        scale = native / rate
    return [(ts - t0) * scale for ts, _, _ in rows]


def poisson_arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    """``n`` Poisson arrivals at ``rate`` per second."""
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def gamma_arrivals(n: int, rate: float, cv: float, rng: random.Random) -> list[float]:
    """``n`` arrivals with Gamma gaps of mean ``1/rate`` and coefficient of variation ``cv`` (bursty > 1)."""
    shape = 1.0 / cv**2
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
    return out


def zipf_weights(n: int, exponent: float, rng: random.Random) -> list[float]:
    """Zipf popularity over ``n`` models; which model gets which rank is a seeded permutation."""
    order = list(range(n))
    rng.shuffle(order)
    weights = [0.0] * n
    for rank, i in enumerate(order, start=1):
        weights[i] = 1.0 / rank**exponent
    total = sum(weights)
    return [w / total for w in weights]


def make_requests(
    times: Sequence[float],
    lengths: Sequence[tuple[int, int]],
    models: Sequence[ModelSpec],
    weights: Sequence[float],
    rng: random.Random,
    *,
    max_prompt: int = 8192,
    max_output: int = 2048,
) -> list[SimRequest]:
    """One request per arrival: model drawn by ``weights``, prompt/output lengths from ``lengths``."""
    names = [m.name for m in models]
    cum: list[float] = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    out = []
    for i, (at, (ctx, gen)) in enumerate(zip(times, lengths, strict=True)):
        x = rng.random() * acc
        lo, hi = 0, len(cum) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cum[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        out.append(SimRequest(i, at, names[lo], min(max_prompt, max(1, ctx)), min(max_output, max(1, gen))))
    return out


def load_profile(path: Path) -> tuple[ServerProfile, dict[str, Any]]:
    """A hardware profile file: ``{"name", "server": {field: {"value", "source"}}, "cluster": {...}}``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ProfileError(f"{path}: not a readable JSON profile ({e})") from None
    server = data.get("server")
    if not isinstance(server, dict):
        raise ProfileError(f"{path}: needs a 'server' object")
    known = {f.name for f in fields(ServerProfile)}
    unknown = sorted(set(server) - known)
    if unknown:
        raise ProfileError(
            f"{path}: server: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    values: dict[str, Any] = {}
    for key, entry in server.items():
        if not isinstance(entry, dict) or "value" not in entry or "source" not in entry:
            raise ProfileError(f"{path}: server.{key} must be {{'value': ..., 'source': '...'}}")
        values[key] = entry["value"]
    required = {
        f.name
        for f in fields(ServerProfile)
        if f.name not in ("compute_scope", "load_scope", "machine_share")
    }
    missing = sorted(required - set(values))
    if missing:
        raise ProfileError(f"{path}: server: missing {', '.join(missing)}")
    cluster = {k: (v["value"] if isinstance(v, dict) else v) for k, v in (data.get("cluster") or {}).items()}
    return ServerProfile(**values), {"name": data.get("name", path.stem), "cluster": cluster}


# ============================================================================================ this machine


def _median(xs: Sequence[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def derive_this_machine(results: Path = RESULTS) -> dict[str, Any]:
    """This machine's profile, every figure computed from a file under ``benchmarks/results``.

    Loads and Triton's overhead are taken as measured under the workload (``workload.json``: the backend's
    per-tier weight-load seconds and the router's learned overheads, over every policy), because on 2
    cores shared by three tritonservers, the node stores and SeaweedFS, a load under the workload takes
    2-3x what it takes on the idle machine (``coldstart.json``, given in each source for comparison).
    Decoding is taken idle (``coldstart.json``'s decode streams) and slowed in the replay by what else runs
    on the machine (``machine_share``, fitted on the workload's per-token times against concurrency).
    """
    cold = json.loads((results / "coldstart.json").read_text())
    work = json.loads((results / "workload.json").read_text())
    sm = cold["models"]["smollm2"]
    size = sm["checkpoint_bytes"]
    comp = sm["competitors"]
    dec = cold["decode"]["smollm2"]["torch"]
    one, eight = dec["streams_1"]["per_stream_tokens_per_s"], dec["streams_8"]["per_stream_tokens_per_s"]
    token_per_gb = (1.0 / one) / (size / GB)
    sizes = {k: v["bytes"] for k, v in work["models"].items()}
    pols = work["policies"]
    bw: dict[str, list[float]] = {}
    for r in pols.values():
        for per_node in r["backend_weight_load_s"].values():
            for m, e in per_node.items():
                bw.setdefault(e["tier"], []).append(sizes[m] / e["seconds"])
    overheads = [v for r in pols.values() for v in r["triton_overhead_s_learned"].values()]
    # machine_share: per-token time / idle per-token time - 1 against the mean number of other models'
    # generations running meanwhile (least squares through the origin, per policy; median of policies)
    at = {r["idx"]: r["at_s"] for r in work["workload"]["requests"]}
    shares = []
    for r in pols.values():
        iv = [
            (at[x["idx"]] + x["ttft_s"], at[x["idx"]] + x["e2e_s"], x)
            for x in r["results"]
            if x["tokens"] > 1
        ]
        num = den = 0.0
        for a, b, x in iv:
            if b <= a:
                continue
            others = sum(
                max(0.0, min(b, b2) - max(a, a2)) for a2, b2, y in iv if y["model"] != x["model"]
            ) / (b - a)
            ratio = ((b - a) / (x["tokens"] - 1)) / (token_per_gb * sizes[x["model"]] / GB)
            num += others * (ratio - 1.0)
            den += others * others
        shares.append(num / den)
    prefill_fixed = max(0.0, comp["memory"]["first_token_s"] - token_per_gb * size / GB)
    # prefill per token and GB: the fastest quarter of each model's TTFTs (warm routes), warmstart run
    px, py = [], []
    by_model: dict[str, list[dict[str, Any]]] = {}
    for x in pols["warmstart"]["results"]:
        by_model.setdefault(x["model"], []).append(x)
    for m, rs in by_model.items():
        for x in sorted(rs, key=lambda x: x["ttft_s"])[: max(1, len(rs) // 4)]:
            px.append(x["prompt_tokens"] * sizes[m] / GB)
            py.append(max(0.0, x["ttft_s"] - prefill_fixed - token_per_gb * sizes[m] / GB))
    prefill_per = sum(x * y for x, y in zip(px, py, strict=True)) / sum(x * x for x in px)
    c = work["cluster"]
    src_w, src_c = "benchmarks/results/workload.json", "benchmarks/results/coldstart.json"
    wl = "policies.*.backend_weight_load_s (median bytes/s over every policy's last loads from"

    def f(value: Any, source: str) -> dict[str, Any]:
        return {"value": value, "source": source}

    def idle(tier: str) -> str:
        return (
            f"idle: {size / comp[tier]['weight_load_s'] / GB:.2f} GB/s, {src_c} smollm2 {tier} weight_load_s"
        )

    return {
        "name": "this_machine",
        "description": "This 2-core x86_64 machine, 3 tritonservers (CPU torch engines), node stores and "
        "SeaweedFS on the same host: what benchmarks/workload.py ran on. Written by "
        "`python benchmarks/simulate.py derive-profile`.",
        "server": {
            "memory_budget_bytes": f(c["triton_budget_bytes"], f"{src_w}: cluster.triton_budget_bytes"),
            "host_memory_bytes": f(c["memory_tier_bytes"], f"{src_w}: cluster.memory_tier_bytes"),
            "disk_bytes": f(c["disk_tier_bytes"], f"{src_w}: cluster.disk_tier_bytes"),
            "memory_bps": f(_median(bw["memory"]), f"{src_w}: {wl} memory; {idle('memory')})"),
            "disk_bps": f(_median(bw["disk"]), f"{src_w}: {wl} disk; {idle('disk-cold')})"),
            "remote_bps": f(_median(bw["remote"]), f"{src_w}: {wl} remote; {idle('remote')})"),
            "triton_load_overhead_s": f(
                _median(overheads),
                f"{src_w}: median of policies.*.triton_overhead_s_learned (idle: "
                f"{comp['memory']['triton_load_s'] - comp['memory']['weight_load_s']:.3f} s, {src_c} smollm2 "
                "memory triton_load_s - weight_load_s)",
            ),
            "release_s": f(
                0.05,
                "in no results file: benchmarks/README.md ('tens of ms', commit 215dd43); the router's "
                "initial_release_s",
            ),
            "unload_s": f(
                1.0,
                "in no results file: tritonserver 2.51's Python backend sleeps 1 s per finalize (policy.LoadCosts)",
            ),
            "prefill_fixed_s": f(
                prefill_fixed, f"{src_c}: smollm2 competitors.memory.first_token_s minus one idle token"
            ),
            "prefill_s_per_token_gb": f(
                prefill_per,
                f"{src_w}: least squares over the fastest quarter of each model's TTFTs (warmstart)",
            ),
            "token_fixed_s": f(0.0, "fit through the origin"),
            "token_s_per_gb": f(
                token_per_gb, f"{src_c}: decode.smollm2.torch.streams_1 per_stream_tokens_per_s"
            ),
            "batch_slowdown": f(
                (one / eight - 1.0) / 7.0,
                f"{src_c}: decode.smollm2.torch per-stream tokens/s, 1 vs 8 streams",
            ),
            "compute_scope": f("machine", "one machine: every engine, load and store shares its 2 cores"),
            "machine_share": f(
                _median(shares),
                f"{src_w}: per-token time over idle per-token time - 1 against the mean number of other models' "
                f"generations running meanwhile, least squares per policy, median ({', '.join(f'{x:.2f}' for x in shares)})",
            ),
            "load_scope": f("server", "a server's loads share it (ServerState.load_wait_s)"),
        },
        "cluster": {"remote_egress_bps": f(None, "SeaweedFS on the same host: no separate egress limit")},
    }


# ============================================================================================ calibration


def _pct_err(sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None or real == 0:
        return None
    return 100.0 * (sim - real) / real


def calibration_setup(
    run: dict[str, Any], profile: ServerProfile, policy: str
) -> tuple[list[SimServer], list[ModelSpec], list[SimRequest], SimSettings]:
    """The simulated twin of one policy's run in a ``workload.py`` JSON."""
    s = run["settings"]
    c = run["cluster"]
    link = c.get("remote_link_bytes_per_s")
    prof = replace(
        profile,
        memory_budget_bytes=int(c["triton_budget_bytes"]),
        host_memory_bytes=int(c["memory_tier_bytes"]),
        disk_bytes=int(c["disk_tier_bytes"]),
        remote_bps=min(profile.remote_bps or math.inf, link) if link else profile.remote_bps,
    )
    models = [model_spec(name, m["bytes"], s["keep_alive"], 8) for name, m in sorted(run["models"].items())]
    reported = run.get("store_bandwidth", {})
    servers = []
    for node, tiers in sorted(c["initial_layout"].items()):
        bw = reported.get(node)
        nb = NodeBandwidth(bw["memory_bps"], bw["disk_bps"], bw["remote_bps"]) if bw else None
        servers.append(
            SimServer(
                node,
                prof,
                tuple(tiers["memory"]),
                tuple(tiers["disk"]),
                bandwidth=nb,
                remote_until_measured_bps=WORKLOAD_CONFIG_REMOTE_BPS,
            )
        )
    requests = [
        SimRequest(r["idx"], r["at_s"], r["model"], r["prompt_tokens"], r["max_tokens"])
        for r in run["workload"]["requests"]
    ]
    settings = SimSettings(
        policy=policy,
        seed=s["seed"],
        cold_start_timeout_s=600.0,
        migration_threshold_tokens=s["migration_threshold"],
        migration_min_gain_s=1.0,
    )
    return servers, models, requests, settings


def calibrate(run_path: Path, profile_path: Path) -> dict[str, Any]:
    """Replay every policy of a workload run and compare with what it measured."""
    run = json.loads(run_path.read_text())
    profile, _ = load_profile(profile_path)
    rows = []
    for policy, real in run["policies"].items():
        servers, models, requests, settings = calibration_setup(run, profile, policy)
        res = Simulator(servers, models, requests, settings).run()
        summ = res.summary()
        row = {
            "policy": policy,
            "real": {
                "p50": real["ttft"]["p50"],
                "p99": real["ttft"]["p99"],
                "mean": real["ttft"]["mean"],
                "loads_per_tier": real["loads_per_tier"],
                "evictions": real["evictions"],
                "migrations": real["migrations"],
            },
            "sim": {
                "p50": summ["ttft"]["p50"],
                "p99": summ["ttft"]["p99"],
                "mean": summ["ttft"]["mean"],
                "loads_per_tier": summ["loads_per_tier"],
                "evictions": summ["evictions"],
                "migrations": summ["migrations"],
            },
        }
        row["error_pct"] = {k: _pct_err(row["sim"][k], row["real"][k]) for k in ("p50", "p99", "mean")}
        rows.append(row)
    rank_real = [r["policy"] for r in sorted(rows, key=lambda r: r["real"]["p99"])]
    rank_sim = [r["policy"] for r in sorted(rows, key=lambda r: r["sim"]["p99"])]
    return {
        "run": str(run_path.relative_to(REPO) if run_path.is_relative_to(REPO) else run_path),
        "run_commit": run.get("code", {}).get("commit"),
        "profile": str(profile_path.relative_to(REPO) if profile_path.is_relative_to(REPO) else profile_path),
        "policies": rows,
        "ranking_by_p99": {"real": rank_real, "sim": rank_sim, "same": rank_real == rank_sim},
        "within_25pct": all(
            r["error_pct"][k] is not None and abs(r["error_pct"][k]) <= 25
            for r in rows
            for k in ("p50", "p99")
        ),
    }


def calibration_table(cal: dict[str, Any]) -> str:
    """Markdown: real vs simulated per policy."""
    lines = [
        f"Run `{cal['run']}` (commit {str(cal['run_commit'])[:7]}), profile `{cal['profile']}`",
        "",
        "| policy | p50 real | p50 sim | err | p99 real | p99 sim | err | loads m/d/r real | sim | evictions real | sim |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def t(d: dict[str, int]) -> str:
        return f"{d.get('memory', 0)}/{d.get('disk', 0)}/{d.get('remote', 0)}"

    def e(x: float | None) -> str:
        return "–" if x is None else f"{x:+.0f} %"

    for r in cal["policies"]:
        re_, si, er = r["real"], r["sim"], r["error_pct"]
        lines.append(
            f"| {r['policy']} | {re_['p50']:.3f} | {si['p50']:.3f} | {e(er['p50'])} | {re_['p99']:.3f} | "
            f"{si['p99']:.3f} | {e(er['p99'])} | {t(re_['loads_per_tier'])} | {t(si['loads_per_tier'])} | "
            f"{re_['evictions']} | {si['evictions']} |"
        )
    rk = cal["ranking_by_p99"]
    lines += [
        "",
        f"Ranking by p99, real: {' < '.join(rk['real'])}; simulated: {' < '.join(rk['sim'])} "
        f"({'same' if rk['same'] else 'different'}). All p50/p99 within 25 %: {cal['within_25pct']}.",
    ]
    return "\n".join(lines)


# ============================================================================================ at scale

# Real families' fp16/bf16 checkpoint sizes (bytes = parameters x 2).
CATALOGUE: tuple[tuple[str, float], ...] = (
    ("qwen2.5-1.5b", 1.54e9),
    ("llama2-7b", 6.74e9),
    ("llama3-8b", 8.03e9),
    ("llama2-13b", 13.0e9),
    ("qwen2.5-32b", 32.8e9),
    ("llama3-70b", 70.6e9),
)


def catalogue(n: int, *, min_params: float = 0.0) -> list[ModelSpec]:
    """``n`` models cycling through :data:`CATALOGUE` (fine-tuned variants of each family)."""
    fams = [f for f in CATALOGUE if f[1] >= min_params]
    out = []
    for i in range(n):
        fam, params = fams[i % len(fams)]
        out.append(model_spec(f"{fam}-{i:04d}", int(params * 2), keep_alive_s=60.0, max_concurrency=8))
    return out


def scale_run(
    profile: ServerProfile,
    cluster: dict[str, Any],
    *,
    servers: int,
    n_models: int,
    requests: list[SimRequest],
    models: list[ModelSpec],
    policy: str,
    seed: int,
    time_decisions: bool = False,
) -> tuple[dict[str, Any], Simulator, float]:
    sims = layout_servers(profile, servers, models)
    settings = SimSettings(
        policy=policy,
        seed=seed,
        remote_egress_bps=cluster.get("remote_egress_bps"),
        migration_threshold_tokens=20,
        time_decisions=time_decisions,
    )
    sim = Simulator(sims, models, requests, settings)
    t0 = time.perf_counter()
    res = sim.run()
    wall = time.perf_counter() - t0
    summ = res.summary()
    if time_decisions and res.decision_s:
        ds = sorted(res.decision_s)
        summ["decision_ms"] = {k: (v * 1e3 if isinstance(v, float) else v) for k, v in stats(ds).items()}
        summ["decisions_per_s"] = len(ds) / sum(ds)
    return summ, sim, wall


def trace_requests(
    trace: Path,
    models: list[ModelSpec],
    *,
    zipf: float,
    seed: int,
    rate: float | None,
    limit: int | None = None,
) -> list[SimRequest]:
    rows = read_trace(trace)
    if limit is not None:
        rows = rows[:limit]
    rng = random.Random(seed)
    weights = zipf_weights(len(models), zipf, rng)
    times = trace_arrivals(rows, rate)
    return make_requests(times, [(c, g) for _, c, g in rows], models, weights, rng)


def scale(args: argparse.Namespace) -> dict[str, Any]:
    profile, meta = load_profile(args.profile)
    cluster = meta["cluster"]
    policies = args.policies.split(",")
    out: dict[str, Any] = {
        "profile": str(args.profile.relative_to(REPO)),
        "settings": vars_json(args),
        "rate_sweep": [],
        "size_sweep": [],
        "full_trace": [],
    }
    sections = set(args.sections.split(","))

    def save() -> None:
        _write_json(args.out, out)  # after every row: a long run that is stopped keeps what it did

    # 1) request-rate sweep on a fixed cluster (Gamma arrivals, Zipf popularity, trace lengths)
    rows = read_trace(args.trace)
    for rate in [float(x) for x in args.rates.split(",")] if "rate" in sections else []:
        models = catalogue(args.models)
        n = args.sweep_requests
        r2 = random.Random(args.seed)
        times = gamma_arrivals(n, rate, args.gamma_cv, r2)
        lengths = [(c, g) for _, c, g in rows[:n]]
        reqs = make_requests(times, lengths, models, zipf_weights(len(models), args.zipf, r2), r2)
        for policy in policies:
            summ, _, wall = scale_run(
                profile,
                cluster,
                servers=args.sweep_servers,
                n_models=args.models,
                requests=reqs,
                models=models,
                policy=policy,
                seed=args.seed,
            )
            out["rate_sweep"].append(
                {"rate": rate, "servers": args.sweep_servers, "policy": policy, "wall_s": wall, **summ}
            )
            save()
            _log(
                f"rate {rate}: {policy} p50 {fmt(summ['ttft']['p50'])} p99 {fmt(summ['ttft']['p99'])} ({wall:.1f} s)"
            )
    # 2) cluster-size sweep: models and load grow with the cluster
    for n_servers in [int(x) for x in args.sizes.split(",")] if "size" in sections else []:
        n_models = max(8, n_servers * args.models_per_server)
        models = catalogue(n_models)
        rate = args.rate_per_server * n_servers
        r2 = random.Random(args.seed)
        n = min(args.sweep_requests * max(1, n_servers // 8), args.max_requests)
        times = gamma_arrivals(n, rate, args.gamma_cv, r2)
        lengths = [(rows[i % len(rows)][1], rows[i % len(rows)][2]) for i in range(n)]
        reqs = make_requests(times, lengths, models, zipf_weights(len(models), args.zipf, r2), r2)
        for policy in policies:
            summ, _, wall = scale_run(
                profile,
                cluster,
                servers=n_servers,
                n_models=n_models,
                requests=reqs,
                models=models,
                policy=policy,
                seed=args.seed,
            )
            out["size_sweep"].append(
                {
                    "servers": n_servers,
                    "models": n_models,
                    "rate": rate,
                    "policy": policy,
                    "wall_s": wall,
                    **summ,
                }
            )
            save()
            _log(
                f"{n_servers} servers: {policy} p50 {fmt(summ['ttft']['p50'])} p99 {fmt(summ['ttft']['p99'])} ({wall:.1f} s)"
            )
    # 3) the full code trace, every request, at its recorded times
    models = catalogue(args.trace_models)
    reqs = trace_requests(args.trace, models, zipf=args.zipf, seed=args.seed, rate=None)
    for policy in policies if "trace" in sections else []:
        summ, _, wall = scale_run(
            profile,
            cluster,
            servers=args.trace_servers,
            n_models=args.trace_models,
            requests=reqs,
            models=models,
            policy=policy,
            seed=args.seed,
        )
        out["full_trace"].append(
            {
                "servers": args.trace_servers,
                "models": args.trace_models,
                "policy": policy,
                "wall_s": wall,
                **summ,
            }
        )
        save()
        _log(
            f"full trace ({len(reqs)} requests, {args.trace_servers} servers): {policy} p50 {fmt(summ['ttft']['p50'])} p99 {fmt(summ['ttft']['p99'])} ({wall:.1f} s)"
        )
    return out


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def vars_json(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


def scale_tables(out: dict[str, Any]) -> str:
    policies = list(
        dict.fromkeys(r["policy"] for r in out["rate_sweep"] + out["size_sweep"] + out["full_trace"])
    )
    lines = []

    def block(title: str, rows: list[dict[str, Any]], key: str) -> None:
        keys = list(dict.fromkeys(r[key] for r in rows))
        lines.append(f"**{title}** (TTFT p50 / p99, s)")
        lines.append("")
        lines.append(f"| {key} | " + " | ".join(policies) + " |")
        lines.append("|---|" + "---|" * len(policies))
        for k in keys:
            cells = []
            for p in policies:
                r = next((x for x in rows if x[key] == k and x["policy"] == p), None)
                cells.append("–" if r is None else f"{fmt(r['ttft']['p50'])} / {fmt(r['ttft']['p99'])}")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")

    block("Request rate (req/s)", out["rate_sweep"], "rate")
    block("Cluster size (servers)", out["size_sweep"], "servers")
    block("Full code trace", out["full_trace"], "servers")
    return "\n".join(lines)


def plot_scale(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, rows, key, label in (
        (axes[0], out["rate_sweep"], "rate", "request rate (req/s)"),
        (axes[1], out["size_sweep"], "servers", "servers"),
    ):
        for p in dict.fromkeys(r["policy"] for r in rows):
            pts = [
                (r[key], r["ttft"]["p50"], r["ttft"]["p99"])
                for r in rows
                if r["policy"] == p and r["ttft"]["p99"] is not None
            ]
            if not pts:
                continue
            xs = [x for x, _, _ in pts]
            (line,) = ax.plot(xs, [y for _, _, y in pts], marker="o", label=f"{p} p99")
            ax.plot(xs, [y for _, y, _ in pts], marker=".", linestyle="--", color=line.get_color(), alpha=0.6)
        ax.set_xlabel(label)
        ax.set_ylabel("TTFT (s), solid p99, dashed p50")
        ax.set_yscale("log")
        if key == "servers":
            ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Cluster replay, profile {out['profile']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================================ perf


def perf(args: argparse.Namespace) -> dict[str, Any]:
    profile, meta = load_profile(args.profile)
    models = catalogue(args.trace_models)
    reqs = trace_requests(args.trace, models, zipf=args.zipf, seed=args.seed, rate=None, limit=args.limit)
    summ, _, wall = scale_run(
        profile,
        meta["cluster"],
        servers=args.servers,
        n_models=args.trace_models,
        requests=reqs,
        models=models,
        policy=args.policy,
        seed=args.seed,
    )
    out: dict[str, Any] = {
        "replay": {
            "requests": len(reqs),
            "servers": args.servers,
            "models": args.trace_models,
            "policy": args.policy,
            "wall_s": wall,
            "target_s": 60.0,
            "full_trace": args.limit is None,
            "pass": wall < 60.0 and args.limit is None,
            "decisions": summ["decisions"],
            "ttft": summ["ttft"],
        },
    }
    _log(f"full trace replay: {len(reqs)} requests on {args.servers} servers, {args.policy}: {wall:.1f} s")
    models = catalogue(1000)
    reqs = trace_requests(
        args.trace, models, zipf=args.zipf, seed=args.seed, rate=None, limit=args.decision_requests
    )
    summ, _, wall = scale_run(
        profile,
        meta["cluster"],
        servers=args.servers,
        n_models=1000,
        requests=reqs,
        models=models,
        policy=args.policy,
        seed=args.seed,
        time_decisions=True,
    )
    out["decisions"] = {
        "servers": args.servers,
        "models": 1000,
        "requests": len(reqs),
        "policy": args.policy,
        "decision_ms": summ.get("decision_ms"),
        "decisions_per_s": summ.get("decisions_per_s"),
        "replay_wall_s": wall,
    }
    _log(f"decision time at {args.servers} x 1000: {summ.get('decision_ms')}")
    return out


# ============================================================================================ CLI


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _meta(command: str) -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", *a], check=False, cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "command": command,
        "commit": git("rev-parse", "HEAD"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("derive-profile", help="write sim_profiles/this_machine.json from benchmarks/results")
    d.add_argument("--out", type=Path, default=PROFILES / "this_machine.json")
    c = sub.add_parser("calibrate", help="replay workload.py runs and compare with what they measured")
    c.add_argument(
        "--run",
        type=Path,
        action="append",
        help="workload JSON (repeatable; default: every results/workload*.json)",
    )
    c.add_argument("--profile", type=Path, default=PROFILES / "this_machine.json")
    c.add_argument("--out", type=Path, default=RESULTS / "simulate_calibration.json")
    for name in ("scale", "perf"):
        s = sub.add_parser(name)
        s.add_argument("--profile", type=Path, default=PROFILES / "h100_server.json")
        s.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--zipf", type=float, default=1.1)
        s.add_argument("--trace-models", type=int, default=200, help="models in the full-trace replay")
    s = sub.choices["scale"]
    s.add_argument("--policies", default=",".join(p for p in POLICY_NAMES))
    s.add_argument("--rates", default="1,2,4,8,16")
    s.add_argument("--sweep-servers", type=int, default=64)
    s.add_argument("--sweep-requests", type=int, default=1000)
    s.add_argument("--models", type=int, default=128, help="models in the rate sweep")
    s.add_argument("--sizes", default="8,64,512")
    s.add_argument("--models-per-server", type=int, default=2)
    s.add_argument("--rate-per-server", type=float, default=0.1)
    s.add_argument("--max-requests", type=int, default=8000)
    s.add_argument("--gamma-cv", type=float, default=2.0)
    s.add_argument("--trace-servers", type=int, default=512)
    s.add_argument("--sections", default="rate,size,trace", help="which of rate,size,trace to run")
    s.add_argument("--out", type=Path, default=RESULTS / "simulate_scale.json")
    s = sub.choices["perf"]
    s.add_argument("--servers", type=int, default=512)
    s.add_argument("--policy", default="warmstart")
    s.add_argument("--decision-requests", type=int, default=2000)
    s.add_argument("--limit", type=int, default=None, help="replay only the trace's first N requests")
    s.add_argument("--out", type=Path, default=RESULTS / "simulate_perf.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/simulate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.cmd == "derive-profile":
            _write_json(args.out, derive_this_machine())
            print(f"wrote {args.out}")
        elif args.cmd == "calibrate":
            runs = args.run or sorted(RESULTS.glob("workload*.json"))
            cals = [calibrate(r, args.profile) for r in runs]
            for cal in cals:
                print(calibration_table(cal) + "\n")
            _write_json(args.out, {**_meta(command), "calibrations": cals})
        elif args.cmd == "scale":
            out = scale(args)
            out.update(_meta(command))
            print(scale_tables(out))
            _write_json(args.out, out)
            plot_scale(out, args.out.with_suffix(".png"))
        elif args.cmd == "perf":
            out = perf(args)
            out.update(_meta(command))
            print(json.dumps(out, indent=1))
            _write_json(args.out, out)
    except (TraceError, ProfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
