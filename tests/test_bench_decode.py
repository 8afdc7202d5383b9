"""benchmarks/decode.py: its statistics, targets and argument checks, and a smoke run of ``--quick``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "decode.py"


def _load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_decode"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_decode_rate_leaves_out_the_first_token() -> None:
    mod = _load_module()
    # the first token comes after a long prefill (1 s); four more follow, 0.1 s apart
    times = [1.0, 1.1, 1.2, 1.3, 1.4]
    assert mod.stream_rate(times) == pytest.approx(10.0)
    assert mod.stream_rate([1.0]) is None
    assert mod.stream_rate([]) is None


def test_total_rate_counts_every_stream_after_its_first_token_over_the_whole_span() -> None:
    mod = _load_module()
    a = [0.0, 0.1, 0.2, 0.3]  # 3 decode tokens
    b = [0.1, 0.2, 0.3, 0.4, 0.5]  # 4 decode tokens, starts later and ends last
    assert mod.total_rate([a, b]) == pytest.approx(7 / 0.5)
    assert mod.total_rate([[], []]) is None


def test_gaps_are_pooled_per_stream_in_milliseconds_and_never_span_two_streams() -> None:
    mod = _load_module()
    gaps = mod.gaps_ms([[0.0, 0.01, 0.03], [5.0, 5.002]])
    assert gaps == pytest.approx([10.0, 20.0, 2.0])
    assert mod.percentile(gaps, 50) == pytest.approx(10.0)
    assert mod.percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert mod.percentile([], 99) is None


def test_cpu_per_token_divides_each_process_delta_and_keeps_missing_readings_missing() -> None:
    mod = _load_module()
    before = {"engine": 1.0, "stub": 0.5, "gone": None}
    after = {"engine": 2.0, "stub": 0.6, "gone": 3.0}
    got = mod.cpu_per_token(before, after, 100)
    assert got["engine"] == pytest.approx(10.0)
    assert got["stub"] == pytest.approx(1.0)
    assert got["gone"] is None


def _summary(**rates: float) -> dict[str, dict[str, object]]:
    return {name: {"tokens_per_s": r, "itl_p50_ms": 100.0, "itl_p99_ms": 250.0} for name, r in rates.items()}


def test_targets_compare_triton_with_the_faster_in_process_engine_and_one_stream() -> None:
    mod = _load_module()
    summary = _summary(engine=20.0, generator=18.0, transformers=15.0, triton=19.5, **{"triton-8": 70.0})
    rows = mod.targets(summary, 8)
    assert len(rows) == 5
    in_process, transformers, batch, p50, p99 = rows
    assert (in_process["pass"], in_process["value"]) == (True, pytest.approx(19.5 / 20.0))  # >= 0.95
    assert (transformers["pass"], transformers["value"]) == (True, pytest.approx(1.3))
    assert (batch["pass"], batch["value"]) == (False, pytest.approx(70.0 / 19.5))  # < 4x
    assert (p50["pass"], p50["value"], p99["value"]) == (None, 100.0, 250.0)
    assert "faster of engine, generator" in in_process["target"]


def test_the_matmul_floor_under_the_batch_target_is_reported_beside_it() -> None:
    mod = _load_module()
    rates = {"triton": 20.0, "triton-8": 60.0, "matmul-1": 22.0, "matmul-8": 77.0, "matmul-8-packed": 110.0}
    rows = mod.targets(_summary(**rates), 8)
    batch, floor, packed = rows[0], rows[1], rows[2]
    assert (batch["pass"], batch["value"]) == (False, pytest.approx(3.0))
    assert (floor["pass"], floor["value"]) == (None, pytest.approx(3.5))  # matmuls alone: 77 / 22
    assert (packed["pass"], packed["value"]) == (None, pytest.approx(5.0))  # repacked vs plain one row
    assert "matmul-8" in mod.competitors(8) and "matmul-8-packed" in mod.competitors(8)


def test_targets_fail_below_the_bounds_and_leave_out_what_was_not_run() -> None:
    mod = _load_module()
    rows = mod.targets(_summary(engine=20.0, triton=18.9), 8)  # 0.945 < 0.95
    assert [(r["pass"], round(r["value"], 3)) for r in rows] == [(False, 0.945)]
    assert mod.targets(_summary(engine=20.0), 8) == []


def test_summary_takes_medians_of_each_competitors_samples() -> None:
    mod = _load_module()
    samples = [
        {"competitor": "triton", "tokens_per_s": r, "per_stream_tokens_per_s": r, "gaps_ms": [g],
         "load_avg": 1.0, "cpu_ms_per_token": {"stub": c}}
        for r, g, c in ((10.0, 50.0, 1.0), (30.0, 70.0, 3.0), (20.0, 60.0, 2.0))
    ]  # fmt: skip
    row = mod.summarize(samples, ["triton", "engine"])
    assert row["triton"]["n"] == 3
    assert row["triton"]["tokens_per_s"] == 20.0
    assert (row["triton"]["tokens_per_s_min"], row["triton"]["tokens_per_s_max"]) == (10.0, 30.0)
    assert row["triton"]["itl_p50_ms"] == 60.0
    assert row["triton"]["cpu_ms_per_token"] == {"stub": 2.0}
    assert row["engine"]["n"] == 0 and row["engine"]["tokens_per_s"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "1"], "--tokens"),
        (["--reps", "0"], "--reps"),
        (["--streams", "1"], "--streams"),
        (["--threads", "0"], "--threads"),
        (["--competitors", "triton,vllm"], "unknown competitor(s) vllm"),
        (["--competitors", ","], "no competitor given"),
        (["--streams", "4", "--competitors", "triton-8"], "unknown competitor(s) triton-8"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = _load_module()
    with pytest.raises(SystemExit) as e:
        mod.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_competitors_follow_the_stream_count_and_quick_is_small() -> None:
    mod = _load_module()
    args = mod.parse_args(["--streams", "4", "--competitors", "triton,triton-4,triton"])
    assert args.competitor_list == ["triton", "triton-4"]  # duplicates dropped, order kept
    quick = mod.parse_args(["--quick"])
    assert (quick.tokens, quick.reps, quick.streams) == (16, 1, 2)
    assert "generator-2" in quick.competitor_list


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.timeout(900)
def test_quick_run_measures_every_competitor_through_a_real_tritonserver(tmp_path: Path) -> None:
    out = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-plot", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=880,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    data = json.loads((out / "decode_quick.json").read_text())
    assert data["errors"] == []
    assert data["_meta"]["command"].startswith("python benchmarks/decode.py --quick")
    for name, row in data["summary"].items():
        assert row["n"] == 1, name
        assert row["tokens_per_s"] > 0, name
    assert set(data["summary"]["triton"]["cpu_ms_per_token"]) == {"engine", "stub", "tritonserver", "client"}
    assert "Targets" in r.stdout
