"""benchmarks/lora.py: its statistics, targets, adapter rotation and argument checks, and a smoke run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "lora.py"


def _load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_lora", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_lora"] = mod
    spec.loader.exec_module(mod)
    return mod


def _ttft(name: str, secs: float, **extra: Any) -> dict[str, Any]:
    return {"competitor": name, "ttft_s": secs, "load_avg": 1.0, **extra}


def test_summary_takes_each_competitors_median_and_compares_with_the_resident_adapter() -> None:
    mod = _load_module()
    samples = [
        *(_ttft("resident", s) for s in (0.2, 0.4, 0.3)),
        *(_ttft("memory", s) for s in (0.33, 0.5, 0.31)),
        *(_ttft("peft-disk-warm", s, attach_s=a) for s, a in ((3.0, 2.0), (4.0, 2.5))),
        {"competitor": "decode-base", "tokens_per_s": 20.0, "per_stream_tokens_per_s": 2.5, "load_avg": 1.0},
    ]
    got = mod.summarize(samples, ["resident", "memory", "peft-disk-warm", "decode-base", "decode-lora"])
    resident, memory = got["ttft"]["resident"], got["ttft"]["memory"]
    assert (resident["n"], resident["ttft_s"], resident["min_s"], resident["max_s"]) == (3, 0.3, 0.2, 0.4)
    assert memory["ttft_s"] == 0.33
    assert memory["vs_resident"] == pytest.approx(1.1)
    assert memory["extra_vs_resident_s"] == pytest.approx(0.03)
    assert got["ttft"]["peft-disk-warm"]["ttft_s"] == 3.5
    assert got["ttft"]["peft-disk-warm"]["attach_s"] == 2.25
    assert got["decode"]["decode-base"]["tokens_per_s"] == 20.0
    assert got["decode"]["decode-lora"]["n"] == 0 and got["decode"]["decode-lora"]["tokens_per_s"] is None


def _summary(ttft: dict[str, float], decode: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "ttft": {k: {"ttft_s": v} for k, v in ttft.items()},
        "decode": {k: {"tokens_per_s": v} for k, v in (decode or {}).items()},
        "profile": {},
    }


def test_targets_pass_and_fail_at_their_bounds() -> None:
    mod = _load_module()
    summary = _summary(
        {
            "base": 0.2,
            "resident": 0.25,
            "memory": 0.3,  # 1.2x resident: the bound itself passes
            "disk-warm": 0.31,  # 1.24x: fails
            "peft-disk-warm": 3.1,  # 10x disk-warm: passes
            "disk-cold": 0.4,
            "peft-disk-cold": 3.9,  # 9.75x: fails
        },
        {"decode-base": 30.0, "decode-lora": 23.9},  # 0.797x: fails
    )
    rows = {r["target"].split(":")[0]: r for r in mod.targets(summary, 8)}
    peft_warm = rows["(a) cold adapter from disk (disk-warm)"]
    assert (peft_warm["pass"], peft_warm["value"]) == (True, pytest.approx(10.0))
    assert rows["(a) cold adapter from disk (disk-cold)"]["pass"] is False
    assert rows["(b) cold adapter (memory) first token / resident adapter's"]["pass"] is True
    assert rows["(b) cold adapter (disk-warm) first token / resident adapter's"]["pass"] is False
    decode = rows["(c) 8 streams on 8 adapters / 8 streams on the base (tokens/s)"]
    assert (decode["pass"], decode["value"]) == (False, pytest.approx(23.9 / 30.0))
    bound = rows["(a) bound (disk-cold)"]  # PEFT's path against a warmstart load of 0 ms: 3.9 / 0.25
    assert (bound["pass"], bound["value"]) == (None, pytest.approx(15.6))
    info = rows["resident adapter first token / base's (informational)"]
    assert (info["pass"], info["value"]) == (None, pytest.approx(1.25))
    assert not any("remote" in t for t in rows)  # not run: left out


def test_targets_leave_out_everything_that_was_not_run() -> None:
    mod = _load_module()
    assert mod.targets(_summary({"memory": 0.3, "peft-disk-cold": 1.0}), 8) == []


def test_the_load_only_comparison_uses_peft_from_pretrained_and_the_in_process_load_path() -> None:
    mod = _load_module()
    summary = _summary({"peft-disk-cold": 1.0})
    summary["ttft"]["peft-disk-cold"]["attach_s"] = 0.6
    summary["profile"] = {"disk-cold": {"load_total": 0.05}}
    (row,) = mod.targets(summary, 8)
    assert row["pass"] is None and row["value"] == pytest.approx(12.0)
    assert "from_pretrained alone" in row["target"]


def test_every_tier_walks_through_every_adapter_and_peft_loads_warmstarts_adapter() -> None:
    mod = _load_module()
    for tier in mod.COLD_TIERS:
        assert sorted(mod.cold_adapter(tier, rep, 8) for rep in range(8)) == list(range(8))
    for rep in range(5):
        assert mod.cold_adapter("peft-disk-cold", rep, 8) == mod.cold_adapter("disk-cold", rep, 8)
        assert mod.cold_adapter("peft-disk-warm", rep, 8) == mod.cold_adapter("disk-warm", rep, 8)
    assert mod.cold_adapter("memory", 0, 8) != mod.cold_adapter("remote", 0, 8)


def test_first_tokens_are_compared_per_adapter_across_the_two_sides() -> None:
    mod = _load_module()
    samples = [
        _ttft("disk-cold", 0.3, adapter=1, first_id=7),
        _ttft("peft-disk-cold", 1.0, adapter=1, first_id=7),
        _ttft("memory", 0.3, adapter=2, first_id=5),
        _ttft("peft-disk-warm", 1.0, adapter=2, first_id=6),
        _ttft("remote", 0.3, adapter=3, first_id=9),  # no PEFT sample: not compared
        _ttft("base", 0.2, adapter=None, first_id=9),
    ]
    assert mod.first_token_agreement(samples) == {"adapters_compared": 2, "agree": 1, "disagree": [2]}


def test_decode_rates_leave_out_each_streams_first_token() -> None:
    mod = _load_module()
    assert mod.stream_rate([1.0, 1.1, 1.2, 1.3]) == pytest.approx(10.0)
    assert mod.stream_rate([1.0]) is None
    a, b = [0.0, 0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5]
    assert mod.total_rate([a, b]) == pytest.approx(7 / 0.5)
    assert mod.total_rate([[], []]) is None


def test_tables_show_medians_ratios_and_the_load_path() -> None:
    mod = _load_module()
    samples = [
        _ttft("resident", 0.25),
        _ttft("memory", 0.3),
        {"competitor": "profile", "load_avg": 1.0,
         "tiers": {"memory": dict.fromkeys((*mod.PROFILE_STEPS, "load_total", "bytes"), 0.001)}},
    ]  # fmt: skip
    text = mod.render_tables(mod.summarize(samples, ["resident", "memory", "profile"]))
    assert "Time to first token" in text and "Cold adapter load path" in text
    memory = next(line for line in text.splitlines() if line.startswith("memory "))
    assert "300.0" in memory and "1.20" in memory and "50.0" in memory  # ms, x resident, +ms


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reps", "0"], "--reps"),
        (["--streams", "1"], "--streams"),
        (["--streams", "8", "--adapters", "4"], "--adapters"),
        (["--tokens", "1"], "--tokens"),
        (["--streams", "8", "--max-loras", "9"], "--max-loras"),
        (["--threads", "-1"], "--threads"),
        (["--competitors", "memory,vllm"], "unknown competitor(s) vllm"),
        (["--competitors", ","], "no competitor given"),
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


def test_quick_is_small_and_no_s3_drops_the_remote_tier() -> None:
    mod = _load_module()
    quick = mod.parse_args(["--quick"])
    assert (quick.reps, quick.streams, quick.tokens, quick.adapters) == (1, 2, 8, 4)
    assert quick.max_loras == 6
    assert quick.competitor_list == list(mod.ALL_COMPETITORS)
    local = mod.parse_args(["--no-s3", "--competitors", "remote,memory,memory"])
    assert local.competitor_list == ["memory"]


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.timeout(600)
def test_quick_run_loads_cold_adapters_through_a_real_tritonserver_and_peft(tmp_path: Path) -> None:
    out = tmp_path / "results"
    competitors = "resident,memory,disk-warm,peft-disk-warm,decode-base,decode-lora"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-s3", "--no-plot", "--competitors", competitors,
         "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    data = json.loads((out / "lora_quick.json").read_text())
    assert data["errors"] == []
    ttft = data["summary"]["ttft"]
    assert set(ttft) == {"resident", "memory", "disk-warm", "peft-disk-warm"}
    for name, row in ttft.items():
        assert row["n"] == 1 and row["ttft_s"] > 0, name
    assert ttft["peft-disk-warm"]["attach_s"] > 0
    for name, row in data["summary"]["decode"].items():
        assert row["n"] == 1 and row["tokens_per_s"] > 0, name
    cold = [s for s in data["samples"] if s["competitor"] in ("memory", "disk-warm")]
    assert {s["adapter"] for s in cold} <= set(range(data["settings"]["adapters"]))
    assert "Targets" in r.stdout and "(b) cold adapter (memory)" in r.stdout
