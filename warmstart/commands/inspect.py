"""``warmstart inspect CKPT [--json]``: tensors, partitions, files and metadata of a checkpoint."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from warmstart.commands import out
from warmstart.format.index import Index
from warmstart.format.lora import adapter_summary
from warmstart.units import format_bytes

HELP = "show a checkpoint's tensors, dtypes, sizes, partitions, files and metadata"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory or URI")
    p.add_argument("--json", action="store_true", help="machine-readable output (the index plus totals)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="show only the first N tensors")


def run(args: argparse.Namespace) -> int:
    from warmstart.format.reader import open_checkpoint

    ckpt = open_checkpoint(args.ckpt)
    if args.json:
        out(json.dumps(summary(ckpt.index, ckpt.location), indent=2, sort_keys=False))
    else:
        out(render(ckpt.index, ckpt.location, limit=args.limit))
    return 0


def summary(index: Index, location: str) -> dict[str, Any]:
    """The index as a JSON object plus totals (what ``inspect --json`` prints)."""
    d = index.to_json_dict()
    d["location"] = location
    d["totals"] = {
        "tensors": len(index.tensors),
        "parameters": sum(t.numel for t in index.tensors),
        "tensor_bytes": index.tensor_bytes,
        "partition_bytes": index.total_bytes,
        "partitions": len(index.partitions),
        "files": len(index.files),
        "dtypes": dict(sorted(Counter(t.dtype for t in index.tensors).items())),
    }
    adapter = adapter_summary(index, location)
    if adapter is not None:
        d["adapter"] = adapter
    return d


def _adapter_lines(a: dict[str, Any]) -> list[str]:
    def span(values: list[Any]) -> str:
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"

    rs = " (rsLoRA: alpha/sqrt(r))" if a["use_rslora"] else ""
    return [
        f"LoRA adapter for {a['base_model'] or '(base model not recorded)'}",
        f"  rank {span(a['ranks'])}, alpha {span(a['alphas'])}, scaling {span(a['scalings'])}{rs}",
        f"  targets: {', '.join(a['targets'])}",
        f"  {a['layers']} layer(s), {a['modules']} module(s), {a['parameters']:,} parameters, "
        f"{format_bytes(a['tensor_bytes'])}",
    ]


def _table(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(index: Index, location: str, *, limit: int | None = None) -> str:
    """A human-readable report: tensors table, totals, partitions, files, metadata."""
    lines = [f"checkpoint {location}  (format v{index.format_version}, alignment {index.alignment})", ""]
    adapter = adapter_summary(index, location)
    if adapter is not None:
        lines += [*_adapter_lines(adapter), ""]
    shown = index.tensors if limit is None else index.tensors[:limit]
    rows: list[tuple[str, ...]] = [("name", "dtype", "shape", "bytes", "partition")]
    rows += [
        (t.name, t.dtype, "[" + ", ".join(map(str, t.shape)) + "]", format_bytes(t.nbytes), str(t.partition))
        for t in shown
    ]
    lines += _table(rows, right={3, 4})
    if len(shown) < len(index.tensors):
        lines.append(f"... {len(index.tensors) - len(shown)} more tensors")
    dtypes = ", ".join(f"{k} {v}" for k, v in sorted(Counter(t.dtype for t in index.tensors).items()))
    params = sum(t.numel for t in index.tensors)
    lines += [
        "",
        f"total: {len(index.tensors)} tensors, {params:,} parameters, {format_bytes(index.tensor_bytes)} of "
        f"tensor data in {format_bytes(index.total_bytes)} of partitions ({dtypes or 'no tensors'})",
        "",
        f"partitions ({len(index.partitions)}, chunk size {format_bytes(index.chunk_size)}):",
    ]
    lines += [f"  {p.file}  {format_bytes(p.size)}  {len(p.chunks)} chunk(s)" for p in index.partitions]
    lines += ["", f"files ({len(index.files)}):"]
    lines += [f"  {f.name}  {format_bytes(f.size)}" for f in index.files]
    meta = dict(index.metadata)
    lines += ["", "metadata:"]
    for k in sorted(meta):
        v = meta[k]
        text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
        if len(text) > 100:
            text = text[:97] + "..."
        lines.append(f"  {k}: {text}")
    return "\n".join(lines)
