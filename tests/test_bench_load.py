"""Smoke test of the loader benchmark (benchmarks/load.py): a tiny checkpoint, one repetition, no S3."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "load.py"
OPTIONAL_PEERS = {"runai-streamer", "tensorizer", "fastsafetensors"}


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_load", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tensor_specs_hit_the_target_size():
    mod = _load_module()
    sizes = {"bfloat16": 2, "float16": 2, "float32": 4}
    for gib in (0.03125, 0.25, 0.5, 1, 2, 4):
        target = int(gib * mod.GIB)
        specs = mod.tensor_specs(target)
        total = sum(math.prod(s) * sizes[d] for _, s, d in specs)
        assert 0 <= target - total <= 2 * 4 * 2048, (gib, total, target)
        names = [n for n, _, _ in specs]
        assert len(names) == len(set(names))
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(names)
        assert {d for _, _, d in specs} == {"bfloat16", "float16", "float32"}


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~60 s on this 2-core machine; several times that while it is shared
def test_quick_run_measures_every_competitor(tmp_path: Path):
    out = tmp_path / "results"
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--sizes",
            "0.03125",
            "--reps",
            "1",
            "--no-s3",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "load.json").read_text())
    assert (out / "load.png").stat().st_size > 0
    listed = subprocess.run(
        [sys.executable, str(SCRIPT), "--list", "--no-s3"], capture_output=True, text=True, check=True
    ).stdout.split()
    (size,) = data["sizes"].values()
    comps = size["competitors"]
    names = [line for line in listed if line in comps]
    assert names and set(names) == set(comps)
    for name, rec in comps.items():
        if rec["unavailable"]:
            # Only the optional peers may be missing (not installed); everything else must run.
            assert name.removesuffix("-cold") in OPTIONAL_PEERS, (name, rec["unavailable"])
            continue
        assert not rec["errors"], (name, rec["errors"])
        assert rec["median_s"] is not None and rec["median_s"] > 0, name
        assert all(run["seconds"] > 0 for run in rec["runs"])
        assert all(run["tensors"] == size["n_tensors"] for run in rec["runs"])
    assert {t["target"] for t in data["targets"]} >= {"mem <= 1.2x raw mmap", "jax within 1.3x of torch"}
    print(f"quick benchmark run took {elapsed:.1f} s")
