"""``warmstart bench NAME [ARGS...]``: run one of the benchmarks of a source checkout (``benchmarks/NAME.py``).

The benchmarks ship with the repository, not with the installed package: run this from a clone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from warmstart.errors import WarmstartError

HELP = "run a benchmark (load, coldstart, workload, policy_speed, convert_throughput, remote_fill)"
BENCHMARKS = ("load", "coldstart", "workload", "policy_speed", "convert_throughput", "remote_fill")


class BenchmarksNotFound(WarmstartError, FileNotFoundError):
    """The benchmarks directory of a source checkout was not found."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")


def benchmarks_dir() -> Path:
    """``benchmarks/`` beside the package's source tree, or under the current directory."""
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        d = base / "benchmarks"
        if (d / "load.py").is_file():
            return d
    raise BenchmarksNotFound(
        "benchmarks/ not found: the benchmarks ship with the source checkout; run this from a clone of warmstart"
    )


def run(args: argparse.Namespace) -> int:
    script = benchmarks_dir() / f"{args.name}.py"
    return subprocess.call([sys.executable, str(script), *args.args])
