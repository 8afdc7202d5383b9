"""``warmstart verify CKPT``: check every chunk checksum and model file."""

from __future__ import annotations

import argparse
import sys

from warmstart.commands import out

HELP = "check every checksum of a checkpoint (exit 0 if intact, 1 naming the first bad chunk)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory or URI")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from warmstart.errors import CheckpointNotFound, CorruptCheckpoint
    from warmstart.format.reader import open_checkpoint
    from warmstart.progress import Progress
    from warmstart.units import format_bytes

    try:
        ckpt = open_checkpoint(args.ckpt)
        with Progress("verify", ckpt.index.total_bytes, quiet=args.quiet) as prog:
            ckpt.verify(progress=prog)
    except CheckpointNotFound:
        raise
    except CorruptCheckpoint as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return 1
    if not args.quiet:
        out(
            f"ok: {args.ckpt}: {len(ckpt.index.partitions)} partition(s), {format_bytes(ckpt.index.total_bytes)}, "
            f"{len(ckpt.index.files)} file(s), all checksums match"
        )
    return 0
