"""``warmstart export CKPT --to safetensors|orbax DST``: the way back to other tools' formats."""

from __future__ import annotations

import argparse

from warmstart.commands import out

HELP = "export a checkpoint as safetensors (a HF model directory, or one .safetensors file) or orbax"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory or URI")
    p.add_argument("--to", required=True, choices=("safetensors", "orbax"), help="output format")
    p.add_argument("dst", metavar="DST", help="output directory (or a .safetensors file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from warmstart.format.export import export
    from warmstart.format.reader import open_checkpoint
    from warmstart.progress import Progress

    ckpt = open_checkpoint(args.ckpt)
    with Progress("export", ckpt.index.tensor_bytes, quiet=args.quiet) as prog:
        dst = export(ckpt, args.to, args.dst, overwrite=args.overwrite, progress=prog)
    if not args.quiet:
        out(f"wrote {dst} ({args.to}, {len(ckpt.index.tensors)} tensors)")
    return 0
