"""`warmstart bench` runs the benchmarks of the source checkout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from warmstart.cli import main


def test_bench_runs_the_named_benchmark_script(tmp_path: Path) -> None:
    out = tmp_path / "policy.json"
    rc = subprocess.call(
        [sys.executable, "-m", "warmstart.cli", "bench", "policy_speed", "--servers", "20", "--models", "20",
         "--decisions", "50", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    assert out.is_file() and json.loads(out.read_text())


def test_bench_rejects_unknown_benchmark_names() -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "nope"])
    assert e.value.code == 2
