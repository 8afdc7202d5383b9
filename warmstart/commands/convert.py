"""``warmstart convert SRC DST``: any supported model format into a warmstart checkpoint."""

from __future__ import annotations

import argparse

from warmstart.commands import out
from warmstart.format import spec
from warmstart.units import format_bytes, parse_size

HELP = "convert a model (HF dir, .safetensors, .gguf, orbax, warmstart, PEFT LoRA adapter; pickle with --allow-pickle) into a checkpoint"


def size(text: str) -> int:
    """argparse type for sizes (its name makes argparse say "invalid size value")."""
    return parse_size(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        metavar="SRC",
        help="model directory, .safetensors/.gguf file, orbax or warmstart checkpoint, PEFT adapter directory",
    )
    p.add_argument("dst", metavar="DST", help="destination directory or URI (s3://bucket/prefix)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast floating tensors to this dtype")
    p.add_argument(
        "--partition-size",
        type=size,
        default=spec.DEFAULT_PARTITION_SIZE,
        metavar="SIZE",
        help="largest data partition, e.g. 512MiB, 1G, 4096 (default 512MiB)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle inputs (.bin/.pt/.pth/.ckpt), loaded with torch.load(weights_only=True); trusted files only",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at DST")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from warmstart.format.convert import convert, open_model_source, total_output_bytes
    from warmstart.format.sources import is_uri
    from warmstart.progress import Progress

    source = open_model_source(args.src, allow_pickle=args.allow_pickle)
    total = total_output_bytes(source, args.dtype)
    remote = is_uri(args.dst)
    with Progress("convert", total, quiet=args.quiet) as prog:
        upload_prog = Progress("upload", quiet=args.quiet) if remote else None
        index = convert(
            source,
            args.dst,
            dtype=args.dtype,
            partition_size=args.partition_size,
            overwrite=args.overwrite,
            progress=prog,
            upload_progress=upload_prog,
        )
        if upload_prog is not None:
            prog.close()
            upload_prog.close()
    if not args.quiet:
        out(
            f"wrote {args.dst}: {len(index.tensors)} tensors, {format_bytes(index.total_bytes)} in "
            f"{len(index.partitions)} partition(s), {len(index.files)} model file(s) (from {source.kind})"
        )
    return 0
