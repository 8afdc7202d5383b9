"""benchmarks/workload.py: unit checks of the workload generator, and a smoke run of ``--quick``."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "workload.py"


def _load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_workload", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_workload"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arrivals", ["trace", "poisson", "gamma"])
def test_workload_is_seeded_scaled_and_clamped(tmp_path: Path, arrivals: str) -> None:
    mod = _load_module()
    if not mod.DEFAULT_TRACE.is_file():
        pytest.skip(f"no trace at {mod.DEFAULT_TRACE}")
    models = [mod.BenchModel(n, tmp_path, "llama", 1.0) for n in ("a", "b", "c", "d")]
    args = mod.parse_args(["--arrivals", arrivals, "--requests", "400", "--rate", "2", "--zipf", "1.1"])
    reqs, info = mod.make_workload(args, models)
    again, _ = mod.make_workload(args, models)
    assert reqs == again  # same seed, same arrivals: every policy replays the same requests
    assert len(reqs) == 400 and all(b.at_s >= a.at_s for a, b in itertools.pairwise(reqs))
    rate = (len(reqs) - 1) / reqs[-1].at_s
    assert 1.0 < rate < 4.0, rate  # scaled to about --rate
    assert all(args.prompt_min <= r.prompt_tokens <= args.prompt_max for r in reqs)
    assert all(args.output_min <= r.max_tokens <= args.output_max for r in reqs)
    counts = sorted((sum(r.model == m.name for r in reqs) for m in models), reverse=True)
    assert counts[0] > 1.5 * counts[-1]  # Zipf: the most popular model clearly ahead of the least
    assert abs(sum(info["popularity"].values()) - 1.0) < 1e-3


def test_initial_layout_puts_each_model_in_one_memory_tier_within_capacity(tmp_path: Path) -> None:
    mod = _load_module()

    class M(mod.BenchModel):  # type: ignore[name-defined]
        @property
        def size_bytes(self) -> int:
            return int(self.name[1:]) * mod.MB

    models = [M(f"m{s}", tmp_path, "llama", 1.0) for s in (100, 200, 300, 400, 500)]
    layout = mod.initial_layout(models, 3, 700 * mod.MB, 600 * mod.MB)
    in_memory = [n for node in layout.values() for n in node["memory"]]
    assert sorted(in_memory) == sorted(m.name for m in models)
    for node in layout.values():
        assert sum(int(n[1:]) for n in node["memory"]) <= 600
        assert set(node["memory"]) <= set(node["disk"])


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.s3
def test_quick_run_serves_every_request_under_two_policies(tmp_path: Path) -> None:
    if not _load_module().DEFAULT_TRACE.is_file():
        pytest.skip("the Azure trace (../shared/data beside the checkout) is not here")
    out = tmp_path / "results"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--policies", "warmstart,random", "--requests", "8",
         "--contention-rounds", "0", "--no-policy-speed", "--no-plot", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    result = json.loads((out / "workload_quick.json").read_text())
    for policy in ("warmstart", "random"):
        run = result["policies"][policy]
        assert run["errors"] == 0 and run["ttft"]["n"] == 8, run
        assert all(x["tokens"] == x["max_tokens"] for x in run["results"])  # byte models: no EOS
        assert sum(run["loads_per_tier"].values()) >= 1
    assert "Targets" in r.stdout
    print(f"quick workload run: {time.monotonic() - t0:.0f} s")


def test_remote_link_passes_every_byte_and_shares_its_rate_between_connections() -> None:
    """The benchmark's emulated link to the object store: responses arrive intact, and two connections
    together take at least the time their bytes need at the link's rate (a lower bound: never flaky)."""
    import socket
    import threading

    mod = _load_module()
    payload = bytes(range(256)) * 8192  # 2 MiB
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                assert conn.recv(4) == b"GET!"  # the request passes through
                conn.sendall(payload)

    threading.Thread(target=serve, daemon=True).start()
    rate = 10e6  # bytes/s
    link = mod.RemoteLink(f"http://127.0.0.1:{server.getsockname()[1]}", rate)
    port = int(link.endpoint.rsplit(":", 1)[1])
    got: list[bytes] = []

    def fetch() -> None:
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"GET!")
            chunks = []
            while chunk := c.recv(1 << 16):
                chunks.append(chunk)
            got.append(b"".join(chunks))

    try:
        t0 = time.monotonic()
        threads = [threading.Thread(target=fetch) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        link.stop()
        server.close()
    assert got == [payload, payload]
    assert elapsed >= 2 * len(payload) / rate - link.BURST_S
    assert link.bytes_passed == 2 * len(payload)
    with pytest.raises(ValueError, match="rate"):
        mod.RemoteLink("http://127.0.0.1:1", 0)


def _run(p50: float, p99: float, ttfts: list[float], *, coord: list[dict] | None = None,
         over: int = 0, loads: int = 3) -> dict:  # fmt: skip
    run = {"ttft": {"p50": p50, "p99": p99}, "ttft_sorted": ttfts, "errors": 0, "evictions": 1,
           "loads": [{"model": "m", "server": "s", "tier": "disk"}] * loads,
           "triton_index": {"over_budget": [{"node": "node0"}] * over, "within_budget": over == 0}}  # fmt: skip
    if coord is not None:
        run["per_replica"] = [{"loads": 2, "coordinator": c} for c in coord]
    return run


def _coord(claims_ms: list[float], outcomes: dict[str, int]) -> dict:
    ops = {
        "claim": {"samples_ms": claims_ms},
        "may_unload": {"samples_ms": []},
        "finished": {"samples_ms": []},
    }
    return {"ops": ops, "outcomes": outcomes}


def test_schedulers_option_defaults_to_one_and_names_the_results_apart() -> None:
    mod = _load_module()
    default = mod.parse_args([])
    assert default.schedulers == 1 and mod.result_name(default) == "workload"
    two = mod.parse_args(["--schedulers", "2", "--replica-rounds", "2"])
    assert two.schedulers == 2 and two.replica_rounds == 2
    assert mod.result_name(two) == "workload-replicas"  # workload.json is not overwritten
    assert mod.result_name(mod.parse_args(["--quick", "--schedulers", "2"])) == "workload_quick-replicas"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--schedulers", "3"], "invalid choice: 3"),
        (["--replica-rounds", "0"], "--replica-rounds must be >= 1"),
        (["--schedulers", "2", "--contention-only"], "drop --contention-only"),
    ],
)
def test_bad_replica_options_are_refused_with_what_to_change(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _load_module().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_replica_summary_takes_medians_over_rounds_and_pools_claim_times() -> None:
    mod = _load_module()
    rounds = [
        {"round": 0, "single": _run(0.2, 1.0, [0.1, 1.0]),
         "pair": _run(0.3, 1.1, [0.2, 1.1], coord=[_coord([1.0, 2.0], {"won": 2}),
                                                   _coord([3.0], {"join": 1})])},
        {"round": 1, "single": _run(0.2, 2.0, [0.1, 2.0]),
         "pair": _run(0.2, 3.0, [0.1, 3.0], coord=[_coord([4.0], {"no_room": 1}), _coord([5.0], {"won": 1})])},
    ]  # fmt: skip
    s = mod.replica_summary(rounds)
    assert s["single"]["ttft_p99_s"] == pytest.approx(1.5) and s["pair"]["ttft_p99_s"] == pytest.approx(2.05)
    assert s["p99_ratio"] == pytest.approx(2.05 / 1.5)
    assert s["p99_ratio_per_round"] == pytest.approx([1.1, 1.5])
    assert s["coordinator_ms"]["claim"]["n"] == 5
    assert s["coordinator_ms"]["claim"]["median_ms"] == pytest.approx(3.0)
    assert s["coordinator_ms"]["claim"]["max_ms"] == pytest.approx(5.0)
    assert s["joins"] == 1 and s["no_room"] == 1 and s["outcomes"]["won"] == 3
    assert s["loads_per_replica"] == [[2, 2], [2, 2]]
    assert s["within_budget"] and s["index_checked_runs"] == 4
    verdicts = {t["target"].split(":")[0].split(" ")[0]: t["pass"] for t in mod.replica_targets(s)}
    assert verdicts == {"p99": False, "load": True, "no": True}  # 1.37 > 1.2; 5 ms < 10 ms; no sample over


def test_replica_targets_pass_within_the_ratio_and_fail_on_a_node_over_budget() -> None:
    mod = _load_module()
    coord = [_coord([12.0, 2.0], {"won": 2})]
    s = mod.replica_summary(
        [{"single": _run(0.2, 1.0, [1.0]), "pair": _run(0.2, 1.15, [1.15], coord=coord, over=1)}]
    )
    by_need = {t["need"]: t for t in mod.replica_targets(s)}
    assert by_need[mod.REPLICA_TTFT_RATIO]["pass"] is True  # 1.15 <= 1.2
    assert by_need[mod.CLAIM_P99_MS]["pass"] is False  # p99 of (2, 12) ms is over 10 ms
    assert by_need[0.0]["pass"] is False and by_need[0.0]["value"] == 1.0
    failed = _run(0.2, 1.0, [1.0])
    failed["errors"] = 1  # within the ratio, but a request failed: percentiles leave it out
    s = mod.replica_summary([{"single": _run(0.2, 1.0, [1.0]), "pair": failed}])
    assert s["p99_ratio"] == pytest.approx(1.0)
    assert next(t for t in mod.replica_targets(s) if t["need"] == mod.REPLICA_TTFT_RATIO)["pass"] is False
    empty = mod.replica_summary([])
    assert all(t["pass"] is None for t in mod.replica_targets(empty))  # nothing measured: no verdict


def test_index_poller_checks_ready_models_against_the_budget() -> None:
    mod = _load_module()
    models = [mod.BenchModel(n, Path("/nonexistent"), "llama", 1.0) for n in ("a", "b")]
    cluster = mod.Cluster(Path("/nonexistent"), models, 1, 0, 0)
    cluster.nodes = [mod.Node("node0", None, None, Path("/x"), Path("/y"))]
    poller = mod.IndexPoller.__new__(mod.IndexPoller)
    poller.cluster, poller.budget = cluster, 150
    poller.size_of = {"a": 100, "b": 100}
    poller.max_ready, poller.max_ready_loading, poller.over = {"node0": 0}, {"node0": 0}, []
    poller.samples = poller.poll_errors = 0
    poller.observe("node0", [{"name": "a", "state": "READY"}, {"name": "b", "state": "LOADING"}], 1.0)
    assert poller.summary()["within_budget"] is True
    assert poller.summary()["max_ready_plus_loading_bytes"] == {"node0": 200}
    poller.observe("node0", [{"name": "a", "state": "READY"}, {"name": "b", "state": "READY"}], 2.0)
    s = poller.summary()
    assert s["within_budget"] is False and s["max_ready_bytes"] == {"node0": 200}
    assert s["over_budget"] == [{"node": "node0", "at": 2.0, "ready": ["a", "b"], "bytes": 200}]


def test_etcd_histograms_are_read_from_its_prometheus_text() -> None:
    text = "\n".join([
        "# HELP etcd_disk_wal_fsync_duration_seconds The latency distributions of fsync called by WAL.",
        'etcd_disk_wal_fsync_duration_seconds_bucket{le="0.001"} 3',
        'etcd_disk_wal_fsync_duration_seconds_bucket{le="0.002"} 7',
        'etcd_disk_wal_fsync_duration_seconds_bucket{le="+Inf"} 8',
        "etcd_disk_wal_fsync_duration_seconds_sum 0.0123",
        "etcd_disk_wal_fsync_duration_seconds_count 8",
        'etcd_server_proposals_committed_total 42',
    ])  # fmt: skip
    h = _load_module().etcd_histograms(text)
    assert list(h) == ["etcd_disk_wal_fsync_duration_seconds"]
    fsync = h["etcd_disk_wal_fsync_duration_seconds"]
    assert fsync["buckets"] == {"0.001": 3.0, "0.002": 7.0, "+Inf": 8.0}
    assert fsync["count"] == 8.0 and fsync["sum"] == pytest.approx(0.0123)


def test_the_wal_fsync_bound_is_the_first_bucket_holding_the_quantile() -> None:
    mod = _load_module()
    h = {"buckets": {"0.001": 3.0, "0.004": 7.0, "0.002": 5.0, "+Inf": 8.0}, "count": 8.0, "sum": 0.016}
    assert mod.histogram_bound(h, 0.5) == 0.002  # 4 of 8 samples: the 2 ms bucket holds 5
    assert mod.histogram_bound(h, 0.8) == 0.004
    assert mod.histogram_bound(h, 0.99) == float("inf")
    assert mod.histogram_bound({"buckets": {}, "count": 0.0, "sum": 0.0}, 0.5) is None
    line = mod.fsync_line({"etcd_disk_wal_fsync_duration_seconds": h})
    assert line is not None and "p50 <= 2 ms" in line and "mean 2.00 ms" in line
    assert mod.fsync_line({"error": "no etcd"}) is None
