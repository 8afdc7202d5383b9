"""Convert and verify throughput on a generated Llama-1B-shaped bf16 safetensors file (random values).

    .venv/bin/python benchmarks/convert_throughput.py [--dir .bench/convert] [--layers 16] [--repeat 2]

Shapes follow Llama-3.2-1B (vocab 128256, hidden 2048, FFN 8192, 32 heads / 8 KV heads, tied embeddings):
16 layers give 1.24 B parameters, 2.3 GiB in bf16. Prints a table and writes JSON next to the data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

VOCAB, HIDDEN, FFN, HEADS, KV_HEADS = 128256, 2048, 8192, 32, 8


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    head_dim = HIDDEN // HEADS
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    out["model.norm.weight"] = (HIDDEN,)
    return out


def generate(path: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {k: torch.randn(s, dtype=torch.bfloat16) for k, s in shapes(layers).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(".bench/convert"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from warmstart.format import open as open_checkpoint
    from warmstart.format.convert import convert

    src = args.dir / f"llama1b-like-{args.layers}l.safetensors"
    if not src.exists():
        t0 = time.monotonic()
        generate(src, args.layers)
        print(f"generated {src} in {time.monotonic() - t0:.1f} s")
    size = src.stat().st_size
    rows = []
    for r in range(args.repeat):
        dst = args.dir / "ckpt"
        shutil.rmtree(dst, ignore_errors=True)
        t0 = time.monotonic()
        index = convert(src, dst)
        t_convert = time.monotonic() - t0
        ckpt = open_checkpoint(dst)
        t0 = time.monotonic()
        ckpt.verify()
        t_verify = time.monotonic() - t0
        rows.append(
            {
                "run": r,
                "bytes": index.total_bytes,
                "convert_s": t_convert,
                "convert_MBps": index.total_bytes / t_convert / 1e6,
                "verify_s": t_verify,
                "verify_MBps": index.total_bytes / t_verify / 1e6,
            }
        )
    print(f"source {src} ({size / 2**30:.2f} GiB, {len(shapes(args.layers))} tensors)")
    print(f"{'run':>3}  {'convert s':>9}  {'convert MB/s':>12}  {'verify s':>8}  {'verify MB/s':>11}")
    for row in rows:
        print(
            f"{row['run']:>3}  {row['convert_s']:>9.2f}  {row['convert_MBps']:>12.1f}  "
            f"{row['verify_s']:>8.2f}  {row['verify_MBps']:>11.1f}"
        )
    (args.dir / "convert_throughput.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
