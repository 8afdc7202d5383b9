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
