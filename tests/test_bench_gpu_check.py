"""benchmarks/gpu_check.py: without a GPU it says so, exits 0 and writes nothing; its CPU dry run writes the
report; on a GPU (``gpu``-marked) a short run measures all three parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from backend_support import make_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
torch = pytest.importorskip("torch")


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA device")
def test_without_a_gpu_it_says_no_cuda_device_is_visible_exits_0_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results"
    r = _run("--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device is visible" in r.stdout and "nothing written" in r.stdout
    assert not out.exists()


def test_cpu_dry_run_needs_an_explicit_out_directory() -> None:
    r = _run("--cpu-dry-run", timeout=120)
    assert r.returncode == 2 and "--cpu-dry-run needs --out" in r.stderr


@pytest.mark.slow
def test_cpu_dry_run_writes_the_report_from_the_memory_tier(tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "results"
    r = _run("--cpu-dry-run", "--reps", "2", "--model-dir", str(ckpt), "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["device"] == "cpu"
    assert result["bandwidth"] == {"skipped": "needs CUDA (pinned staging)"}
    start = result["ttft"]["cpu"]
    assert len(start["samples_total_s"]) == 2 and start["total_s"] > 0 and len(start["tokens"]) == 1
    assert {k: v["pass"] for k, v in result["logits"].items()} == {"torch": True, "jax": True}
    assert (out / "gpu_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "memory-tier start to first token" in r.stdout


@pytest.mark.gpu
@pytest.mark.slow
def test_on_a_gpu_a_short_run_measures_bandwidth_ttft_and_logits(tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "results"
    r = _run(
        "--reps",
        "2",
        "--gib",
        "0.25",
        "--model-dir",
        str(ckpt),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["bandwidth"]["loader_gb_s"] > 0 and result["bandwidth"]["pinned_copy_gb_s"] > 0
    assert (
        set(result["ttft"]) == {"cuda:0", "cpu"}
        and result["ttft"]["cuda:0"]["tokens"] == result["ttft"]["cpu"]["tokens"]
    )
    assert result["logits"]["torch"]["pass"]
