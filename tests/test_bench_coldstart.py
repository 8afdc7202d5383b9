"""Smoke test of the cold-start benchmark (benchmarks/coldstart.py --quick): SmolLM2, one repetition, the
memory tier and the baseline, through a real tritonserver.

The SmolLM2 copies are generated once under ``.bench/coldstart/`` (dequantizing the GGUF takes ~30-60 s on
2 cores) and reused by later runs and by the full benchmark.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "coldstart.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_coldstart", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_coldstart"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_llama1g_shapes_are_about_one_gib():
    mod = _load_module()
    specs = mod.llama1g_tensors()
    gib = 2 * sum(math.prod(shape) for _, shape in specs) / mod.GIB  # bf16
    assert 0.95 < gib < 1.1, gib
    names = [name for name, _ in specs]
    assert len(names) == len(set(names))
    assert "lm_head.weight" not in names  # tied to the embeddings


def test_targets_compare_each_tier_with_its_baseline():
    mod = _load_module()
    rows = {
        "baseline": 10.0,
        "baseline-cold": 12.0,
        "memory": 0.9,
        "disk-warm": 2.5,
        "disk-cold": 3.0,
        "remote": 3.0,
    }
    summary = {"m": {"competitors": {k: {"ttft_s": v} for k, v in rows.items()}, "raw_s3_read_s": 2.0}}
    got = mod.targets(summary)
    assert [(t["pass"], round(t["value"], 3)) for t in got] == [
        (True, round(10 / 0.9, 3)),  # memory vs baseline >= 10x
        (False, 4.0),  # disk warm vs baseline >= 5x
        (False, 4.0),  # disk cold vs baseline cold >= 5x
        (True, round(3.0 / (2.0 + 0.9), 3)),  # remote <= 1.2 x (raw S3 + memory)
    ]


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.timeout(600)
def test_quick_run_measures_memory_tier_and_baseline(tmp_path: Path):
    out = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-plot", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=590,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    data = json.loads((out / "coldstart.json").read_text())
    assert data["errors"] == []
    rows = data["models"]["smollm2"]["competitors"]
    assert set(rows) == {"baseline", "memory"}
    for name, row in rows.items():
        assert row["n"] == 1, name
        for key in ("ttft_s", "triton_load_s", "weight_load_s", "first_token_s"):
            assert row[key] is not None and row[key] > 0, (name, key, row)
        assert row["ttft_s"] >= row["triton_load_s"]
    assert rows["memory"]["speedup_vs_baseline"] > 0
    assert "Cold start, time to first token" in r.stdout
