"""Crash safety: a converter killed with SIGKILL at any moment never leaves a checkpoint that opens as complete.

Each trial runs `convert` in a subprocess and kills it after a seeded random delay. Afterwards the destination
either does not open (CheckpointNotFound) or, with overwrite, is still the complete previous checkpoint, or it
is the complete new checkpoint: every chunk verifies and every tensor equals the source.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from warmstart.errors import CheckpointNotFound
from warmstart.format import open as open_checkpoint
from warmstart.format import save

N_TENSORS = 24
TENSOR_SHAPE = (512, 1024)  # 2 MiB of float32 each: 48 MiB in 6 partitions of 8 MiB
TRIALS = 8

_CHILD = """
import sys
from warmstart.format.convert import convert
import safetensors, torch  # imported before 'go' so that kill times fall into the conversion itself
print("go", flush=True)
convert(sys.argv[1], sys.argv[2], partition_size=8 * 1024**2, overwrite=sys.argv[3] == "1", dtype=sys.argv[4] or None)
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1234)
    tensors = {
        f"layers.{i}.w": rng.standard_normal(TENSOR_SHAPE).astype(np.float32) for i in range(N_TENSORS)
    }
    path = tmp_path_factory.mktemp("crash") / "model.safetensors"
    save_file(tensors, path)
    return path, tensors


def _run_and_kill(src: Path, dst: Path, delay: float, *, overwrite: bool, dtype: str) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(src), str(dst), "1" if overwrite else "0", dtype],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "go", proc.stderr.read() if proc.stderr else ""
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "finished" if "done" in out else "killed"


def _calibrate(src: Path, tmp: Path) -> float:
    """Seconds one full conversion takes after the child is ready (kill delays are drawn within it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(src), str(tmp / "calibration"), "0", ""],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "go"
    t0 = time.monotonic()
    assert proc.stdout.readline().strip() == "done"  # not process exit: interpreter teardown is slow
    elapsed = time.monotonic() - t0
    proc.communicate(timeout=120)
    return elapsed


def _state(dst: Path, tensors: dict[str, np.ndarray], *, dtype: str) -> str:
    try:
        ckpt = open_checkpoint(dst)
    except CheckpointNotFound:
        return "absent"
    ckpt.verify()  # raises on any bad chunk: a half-written checkpoint must never get here
    assert sorted(ckpt.names) == sorted(tensors)
    kind = ckpt.info("layers.0.w").dtype
    for name, arr in tensors.items():
        expected = arr.astype(ckpt.read(name).dtype) if kind != "float32" else arr
        np.testing.assert_array_equal(ckpt.read(name), expected)
    return "new" if kind == ("bfloat16" if dtype == "bf16" else "float32") else "old"


@pytest.mark.slow
def test_convert_killed_at_random_points_never_leaves_a_loadable_partial_checkpoint(
    source: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
):
    src, tensors = source
    rng = random.Random(20261121)
    duration = _calibrate(src, tmp_path)
    outcomes: list[tuple[str, str]] = []
    for trial in range(TRIALS):
        dst = tmp_path / f"trial{trial}"
        run = _run_and_kill(src, dst, rng.uniform(0.0, 1.1 * duration), overwrite=False, dtype="")
        state = _state(dst, tensors, dtype="")
        assert state in ("absent", "new")
        if run == "finished":
            assert state == "new"
        outcomes.append((run, state))
    assert len(outcomes) == TRIALS
    print("crash-safety outcomes:", outcomes)


@pytest.mark.slow
def test_overwrite_killed_at_random_points_leaves_the_old_or_the_new_checkpoint(
    source: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
):
    src, tensors = source
    rng = random.Random(7)
    duration = _calibrate(src, tmp_path)
    outcomes: list[tuple[str, str]] = []
    for trial in range(TRIALS // 2):
        dst = tmp_path / f"trial{trial}"
        save(tensors, dst)  # the old, float32 checkpoint
        run = _run_and_kill(src, dst, rng.uniform(0.0, 1.5 * duration), overwrite=True, dtype="bf16")
        state = _state(dst, tensors, dtype="bf16")
        assert state in ("old", "new")
        if run == "finished":
            assert state == "new"
        outcomes.append((run, state))
    print("crash-safety overwrite outcomes:", outcomes)
