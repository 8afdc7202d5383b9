"""The cluster replay (warmstart.scheduler.simulate): a hand-computed timeline, determinism, conservation,
and that it drives the router's own policy functions."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from warmstart.scheduler import policy
from warmstart.scheduler.config import SchedulerConfig
from warmstart.scheduler.router import placement_rule
from warmstart.scheduler.simulate import (
    ServerProfile,
    SimRequest,
    SimResult,
    SimServer,
    SimSettings,
    SimulationInputError,
    Simulator,
    model_spec,
    placement_for,
    simulate,
)
from warmstart.scheduler.state import ModelSpec

GB = 10**9

# Round figures so the timeline can be worked out by hand: loads and decoding independent of batch size.
TINY = ServerProfile(
    memory_budget_bytes=10 * GB,
    host_memory_bytes=20 * GB,
    disk_bytes=100 * GB,
    memory_bps=10e9,
    disk_bps=1e9,
    remote_bps=0.5e9,
    triton_load_overhead_s=1.0,
    release_s=0.1,
    unload_s=1.0,
    prefill_fixed_s=0.1,
    prefill_s_per_token_gb=0.0,
    token_fixed_s=0.1,
    token_s_per_gb=0.0,
    batch_slowdown=0.0,
)
MODELS = [model_spec("a", 4 * GB, 1000), model_spec("b", 3 * GB, 1000), model_spec("c", 6 * GB, 1000)]
SERVERS = [
    SimServer("s0", TINY, memory_tier=("a", "c"), disk_tier=("b",)),
    SimServer("s1", TINY),  # nothing local: every load there comes from the remote store
]
REQUESTS = [
    SimRequest(0, 0.0, "a", 8, 200),
    SimRequest(1, 1.0, "b", 8, 100),
    SimRequest(2, 6.0, "c", 8, 10),
]


def _by_idx(result: SimResult) -> dict[int, dict[str, Any]]:
    return {r["idx"]: r for r in result.requests}


def test_tiny_scenario_matches_the_hand_computed_timeline() -> None:
    """Worked out by hand (docs/simulate.md, "The tiny scenario"):

    t=0  a: s0 holds it in memory (0.4 + 1.0 s) against s1's remote (8 + 1 s): load on s0.
    t=1  b: s0's disk (3 + 1 s, plus 0.4 s of a's load still running) against s1's remote (6 + 1 s): s0.
         The two loads share s0: a had 0.4 s left, done at 1.8; b's 4.0 s, 0.4 of it done by then, at 5.4.
         a: first token 1.8 + 0.1 prefill + 0.1 = 2.0, ends 1.8 + 0.1 + 200 * 0.1 = 21.9.
         b: first token 5.6, ends 5.4 + 0.1 + 100 * 0.1 = 15.5.
    t=6  c (6 GB) does not fit on s0 (a and b busy, 3 GB free): without migration it would load on s1 from
         the remote (12 + 1 s). The plan moves b's generation to s1 (b loads there from the remote: 6 + 1 s,
         ready at 13.0), c then loads on s0 from memory. c waits in the cold-start queue meanwhile.
    t=13 b ready on s1; replay: the context (0.1 s), then the token generated meanwhile (0.1 s): switch at
         13.2; b's generation goes on there and still ends at 15.5 (independent of the batch).
    13.2 c: evict b from s0 (release 0.1 s: memory free at 13.3), load from memory 0.6 + 1.0 s: ready 14.9,
         first token 15.1, ends 14.9 + 0.1 + 10 * 0.1 = 16.0.
    """
    result = simulate(SERVERS, MODELS, REQUESTS, SimSettings(policy="warmstart"))
    reqs = _by_idx(result)
    assert reqs[0]["ttft_s"] == pytest.approx(2.0, abs=1e-9)
    assert reqs[0]["e2e_s"] == pytest.approx(21.9, abs=1e-9)
    assert reqs[1]["ttft_s"] == pytest.approx(5.6 - 1.0, abs=1e-9)
    assert reqs[1]["e2e_s"] == pytest.approx(15.5 - 1.0, abs=1e-9)
    assert reqs[1]["server"] == "s1" and reqs[1]["migrations"] == 1
    assert reqs[2]["ttft_s"] == pytest.approx(15.1 - 6.0, abs=1e-9)
    assert reqs[2]["e2e_s"] == pytest.approx(16.0 - 6.0, abs=1e-9)
    assert reqs[2]["server"] == "s0"
    loads = [(ld["model"], ld["server"], ld["tier"], round(ld["at_s"], 9)) for ld in result.loads]
    assert loads == [
        ("a", "s0", "memory", 0.0),
        ("b", "s0", "disk", 1.0),
        ("b", "s1", "remote", 6.0),
        ("c", "s0", "memory", 13.3),
    ]
    assert result.counters["evictions"] == 1
    assert result.counters["migrations"] == 1
    summary = result.summary()
    assert summary["loads_per_tier"] == {"memory": 2, "disk": 1, "remote": 1}


def test_tiny_scenario_without_migration_loads_c_from_the_remote() -> None:
    """no_migration: c loads on s1 from the remote at t=6 (12 + 1 s): first token 19.2, no eviction."""
    result = simulate(SERVERS, MODELS, REQUESTS, SimSettings(policy="no_migration"))
    reqs = _by_idx(result)
    assert reqs[2]["server"] == "s1"
    assert reqs[2]["ttft_s"] == pytest.approx(19.2 - 6.0, abs=1e-9)
    assert result.counters["migrations"] == 0 and result.counters["evictions"] == 0


def _random_case(seed: int, n: int = 60) -> tuple[list[SimServer], list[ModelSpec], list[SimRequest]]:
    rng = random.Random(seed)
    models = [
        model_spec(f"m{i}", rng.randint(1, 6) * GB, keep_alive_s=rng.choice([5.0, 60.0])) for i in range(6)
    ]
    profile = ServerProfile(**{**TINY.__dict__, "batch_slowdown": 0.3})
    servers = [
        SimServer(f"s{i}", profile, memory_tier=(f"m{i}",), disk_tier=(f"m{(i + 1) % 6}",)) for i in range(3)
    ]
    t = 0.0
    reqs = []
    for i in range(n):
        t += rng.expovariate(1.0)
        reqs.append(SimRequest(i, t, f"m{rng.randrange(6)}", rng.randint(1, 64), rng.randint(1, 40)))
    return servers, models, reqs


@pytest.mark.parametrize(
    "policy_name", ["warmstart", "no_migration", "random", "serverlessllm", "ray", "kserve"]
)
def test_every_arrival_is_served_once_within_memory_and_time_never_goes_back(policy_name: str) -> None:
    servers, models, reqs = _random_case(3)
    sim = Simulator(servers, models, reqs, SimSettings(policy=policy_name))
    result = sim.run()
    assert [r["idx"] for r in result.requests] == [r.idx for r in reqs]
    for r in result.requests:
        assert r["rejected"] is None
        assert r["ttft_s"] is not None and r["e2e_s"] is not None and 0 <= r["ttft_s"] <= r["e2e_s"]
    assert sim.max_used_fraction <= 1.0 + 1e-12
    assert sim.time_went_back == 0
    starts = [ld["at_s"] for ld in result.loads]
    assert all(s >= 0 for s in starts)


def test_replay_is_byte_identical_for_a_seed() -> None:
    servers, models, reqs = _random_case(5)
    outs = [
        json.dumps(simulate(servers, models, reqs, SimSettings(policy=p, seed=7)).to_json(), sort_keys=True)
        for p in ("random", "random", "warmstart", "warmstart")
    ]
    assert outs[0] == outs[1] and outs[2] == outs[3]
    other = json.dumps(
        simulate(servers, models, reqs, SimSettings(policy="random", seed=8)).to_json(), sort_keys=True
    )
    assert other != outs[0]  # the seed is what the random baseline draws from


def test_the_simulator_uses_the_routers_placement_functions() -> None:
    """The project's policies come from the router's own ``placement_rule``: if the router's entry point
    and the simulator's diverge, this fails."""
    snap_servers, models, _ = _random_case(1)
    sim = Simulator(snap_servers, models, [], SimSettings(policy="warmstart"))
    snapshot = sim.snapshot()
    assert placement_for(SimSettings(policy="warmstart")) is placement_rule(
        SchedulerConfig(policy="warmstart")
    )
    assert placement_for(SimSettings(policy="warmstart")) is policy.place
    assert placement_for(SimSettings(policy="no_migration")) is policy.place
    assert placement_for(SimSettings(policy="serverlessllm")) is policy.serverlessllm_place
    ours = placement_for(SimSettings(policy="random", seed=3))
    routers = placement_rule(SchedulerConfig(policy="random", policy_seed=3))
    assert [ours(snapshot, "m2") for _ in range(5)] == [routers(snapshot, "m2") for _ in range(5)]


def test_bad_inputs_are_refused_with_what_to_fix() -> None:
    with pytest.raises(SimulationInputError, match="unknown model 'zz'"):
        Simulator(SERVERS, MODELS, [SimRequest(0, 0.0, "zz", 1, 1)], SimSettings())
    with pytest.raises(SimulationInputError, match="policy must be one of"):
        Simulator(SERVERS, MODELS, [], SimSettings(policy="best"))
    with pytest.raises(SimulationInputError, match="no servers"):
        Simulator([], MODELS, [], SimSettings())
    with pytest.raises(SimulationInputError, match="disk_bps must be a number > 0"):
        ServerProfile(**{**TINY.__dict__, "disk_bps": 0})


# ------------------------------------------------------------------------------------ benchmarks/simulate.py

REPO = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_simulate", REPO / "benchmarks" / "simulate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_simulate"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_trace_loader_accepts_any_csv_with_the_three_columns(tmp_path: Path) -> None:
    bench = _bench()
    path = tmp_path / "t.csv"
    path.write_text(
        "extra,GeneratedTokens,TIMESTAMP,ContextTokens\n"
        "x,7,2023-11-16 18:17:04.5,30\n"
        "y,5,2023-11-16 18:17:03.9799600,100\n"
        "z,1,2023-11-16 18:17:06,2\n"
    )
    rows = bench.read_trace(path)
    assert [(c, g) for _, c, g in rows] == [(100, 5), (30, 7), (2, 1)]  # sorted by time
    assert rows[1][0] - rows[0][0] == pytest.approx(0.52004, abs=1e-6)
    times = bench.trace_arrivals(rows, rate=1.0)  # 2 gaps over 2.02 s -> scaled to 1 request/s
    assert times[0] == 0.0 and times[-1] == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("TIMESTAMP,ContextTokens\n2023-11-16 18:17:04,3\n", "missing column.*GeneratedTokens"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no rows"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n16/11/2023,3,4\n", r":2: TIMESTAMP '16/11/2023' is not"),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:04,-3,4\n",
            r":2: ContextTokens '-3' is not",
        ),
    ],
)
def test_trace_loader_names_the_line_and_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    bench = _bench()
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(bench.TraceError, match=message):
        bench.read_trace(path)


def test_every_hardware_profile_loads_and_names_a_source_for_each_figure() -> None:
    bench = _bench()
    profiles = sorted((REPO / "benchmarks" / "sim_profiles").glob("*.json"))
    assert {p.stem for p in profiles} >= {"this_machine", "serverlessllm_testbed", "h100_server"}
    for path in profiles:
        profile, _ = bench.load_profile(path)
        data = json.loads(path.read_text())
        assert all(entry["source"] for entry in data["server"].values()), path
        assert profile.memory_budget_bytes > 0


def test_this_machine_profile_is_what_the_results_files_give() -> None:
    bench = _bench()
    on_disk = json.loads((REPO / "benchmarks" / "sim_profiles" / "this_machine.json").read_text())
    assert bench.derive_this_machine() == on_disk


def _policy_comparisons() -> list[Path]:
    """The recorded workload runs that compare policies on one scheduler (what the simulator replays):
    not `workload.py --schedulers 2` runs, which measure one policy through replicas (their single-scheduler
    side is calibrated in benchmarks/README.md, "Two scheduler replicas", as a figure, not a gate)."""
    runs = []
    for run in sorted((REPO / "benchmarks" / "results").glob("workload*.json")):
        data = json.loads(run.read_text())
        if data["settings"].get("schedulers", 1) == 1 and len(data["policies"]) > 1:
            runs.append(run)
    return runs


def test_calibration_predicts_the_recorded_workload_runs_within_25_percent() -> None:
    bench = _bench()
    runs = _policy_comparisons()
    assert [r.name for r in runs if r.name == "workload.json"], runs  # the main run is always checked
    for run in runs:
        cal = bench.calibrate(run, REPO / "benchmarks" / "sim_profiles" / "this_machine.json")
        for row in cal["policies"]:
            for key in ("p50", "p99"):
                assert abs(row["error_pct"][key]) <= 25, (run.name, row["policy"], key, row["error_pct"][key])
        assert cal["ranking_by_p99"]["real"][-1] == cal["ranking_by_p99"]["sim"][-1] == "random"
