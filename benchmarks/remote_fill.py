"""Remote-tier fill against the raw S3 limit: warmstart S3 → usable vs parallel ranged GETs, same server, one run.

Starts SeaweedFS, uploads a generated checkpoint (``--size-mib``, LLM-shaped bf16 tensors), then runs each
competitor in a fresh process, rounds interleaved, and prints medians and the two remote-tier ratios of
issue 3 (``t(ws) / t(raw)`` ≤ 1.15, ``GB/s(ws) / GB/s(raw)`` ≥ 0.85). Time = load call + touching one byte
of every 4 KiB page of every tensor.

Competitors:

* ``raw-ts``: TensorStore ranged GETs (64 MiB, 8 in flight) → ``bytes`` (as ``benchmarks/load.py``).
* ``raw-http``: 8 threads of ``http.client`` ranged GETs (64 MiB) into a pre-faulted buffer.
* ``ws-embedded``: ``load_state_dict(uri)`` with no tiers (aligned anonymous buffer).
* ``ws-embedded-reuse``: the same, timing the second load of the process (its pooled buffer is reused).
* ``ws-fill``: memory + disk tiers, emptied before every run (a real remote → memory + disk fill).
* ``ws-fill-mem``: memory tier only, emptied before every run.

A ``ws-*`` kind with the suffix ``@ts`` runs with ``WARMSTART_REMOTE_READER=tensorstore`` (every read through
TensorStore, as before the direct HTTP reader), e.g. ``--kinds raw-http,ws-fill,ws-fill@ts``; with ``@base``
it imports warmstart from ``--baseline DIR`` (e.g. ``git archive <commit> warmstart | tar -x -C DIR``), for a
before/after comparison in one interleaved run.

    .venv/bin/python benchmarks/remote_fill.py --size-mib 512 --reps 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

PAGE = 4096
BUCKET = "models"
PREFIX = "remote-fill-bench"
KINDS = ("raw-ts", "raw-http", "ws-embedded", "ws-embedded-reuse", "ws-fill", "ws-fill-mem")


def make_checkpoint(out: Path, size_mib: int) -> None:
    """Qwen2-1.5B-like layers (hidden 1536, MLP 8960) of random bf16 bytes until ``size_mib`` is reached."""
    import numpy as np

    import warmstart.format as wf

    rng = np.random.default_rng(0)
    h, m = 1536, 8960
    tensors: dict[str, np.ndarray] = {}
    total, i = 0, 0
    while total < size_mib << 20:
        for name, shape in (
            ("self_attn.q_proj.weight", (h, h)),
            ("self_attn.k_proj.weight", (256, h)),
            ("self_attn.v_proj.weight", (256, h)),
            ("self_attn.o_proj.weight", (h, h)),
            ("mlp.gate_proj.weight", (m, h)),
            ("mlp.up_proj.weight", (m, h)),
            ("mlp.down_proj.weight", (h, m)),
            ("input_layernorm.weight", (h,)),
        ):
            a = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
            tensors[f"model.layers.{i}.{name}"] = a
            total += a.nbytes
        i += 1
    wf.save(tensors, out)


def _touch(arrays: list[Any]) -> int:
    import numpy as np

    acc = 0
    for a in arrays:
        b = np.asarray(a).reshape(-1).view(np.uint8)
        if b.size:
            acc += int(b[::PAGE].sum()) + int(b[-1])
    return acc


def _layout(uri: str) -> tuple[list[tuple[str, int]], list[tuple[int, int, int]]]:
    from warmstart.format.index import Index
    from warmstart.format.sources import TensorStoreSource

    idx = Index.from_json_bytes(TensorStoreSource(uri).read("index.json"))
    return [(p.file, p.size) for p in idx.partitions], [
        (t.partition, t.offset, t.nbytes) for t in idx.tensors
    ]


def worker(kind: str, uri: str, mem_dir: str, disk_dir: str) -> dict[str, Any]:
    """One measured load in this (fresh) process."""
    import numpy as np
    import tensorstore as ts
    import torch

    import warmstart.loaders.tiers as tiers_mod
    from warmstart.loaders.hostcache import DiskCache, HostCache
    from warmstart.loaders.tiers import Tiers
    from warmstart.objectstore import kvstore_spec
    from warmstart.torch import load_state_dict

    chunk = 64 << 20
    parts, _ = _layout(uri)
    if kind == "raw-ts":
        kv = ts.KvStore.open(kvstore_spec(uri, request_concurrency=8)).result()

        def load() -> list[Any]:
            futs = [
                (p, o, kv.read(f, byte_range=slice(o, min(o + chunk, size))))
                for p, (f, size) in enumerate(parts)
                for o in range(0, size, chunk)
            ]
            return [np.frombuffer(fut.result().value, np.uint8) for _, _, fut in futs]

    elif kind == "raw-http":
        endpoint = os.environ["WARMSTART_S3_ENDPOINT"]
        u = urllib.parse.urlsplit(endpoint)
        path = urllib.parse.urlsplit(uri.replace("s3://", "http://")).path
        total = sum(s for _, s in parts)
        buf = np.empty(total, np.uint8)
        buf.fill(1)  # a reused, pre-faulted buffer
        mv = memoryview(buf.data)
        jobs, base = [], 0
        for f, size in parts:
            jobs += [(f, o, base + o, min(chunk, size - o)) for o in range(0, size, chunk)]
            base += size

        def load() -> list[Any]:
            import http.client

            nxt = iter(jobs)
            lock = threading.Lock()
            errors: list[BaseException] = []

            def run() -> None:
                conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=120)
                try:
                    while True:
                        with lock:
                            job = next(nxt, None)
                        if job is None:
                            return
                        f, fo, bo, n = job
                        conn.request(
                            "GET", f"/{BUCKET}{path}{f}", headers={"Range": f"bytes={fo}-{fo + n - 1}"}
                        )
                        resp = conn.getresponse()
                        view, got = mv[bo : bo + n], 0
                        while got < n:
                            k = resp.readinto(view[got:])
                            if not k:
                                raise OSError("short body")
                            got += k
                        resp.read()
                except BaseException as e:
                    errors.append(e)
                finally:
                    conn.close()

            ths = [threading.Thread(target=run) for _ in range(8)]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            if errors:
                raise errors[0]
            return [buf]

    else:
        if kind.endswith("@ts"):
            os.environ["WARMSTART_REMOTE_READER"] = "tensorstore"
        tiers = {
            "ws-embedded": Tiers(),
            "ws-embedded-reuse": Tiers(),
            "ws-fill": Tiers(memory=HostCache(mem_dir), disk=DiskCache(disk_dir)),
            "ws-fill-mem": Tiers(memory=HostCache(mem_dir)),
        }[kind.removesuffix("@ts").removesuffix("@base")]

        def load() -> list[Any]:
            sd = load_state_dict(uri, tiers=tiers)
            return [t.view(torch.uint8).numpy() for t in sd.values()]

    if kind.startswith("ws-embedded-reuse"):  # a second load in this process: the pooled buffer is reused
        _touch(load())
        gc.collect()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    obj = load()
    t1 = time.perf_counter()
    _touch(obj)
    t2 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out = {"kind": kind, "seconds": t2 - t0, "load_seconds": t1 - t0, "cpu_seconds": cpu}
    if kind.startswith("ws-fill") and hasattr(tiers_mod, "wait_disk_copies"):
        tiers_mod.wait_disk_copies()  # the disk tier is copied from the memory tier in the background
        out["disk_done_seconds"] = time.perf_counter() - t0
    return out


def _clean(*dirs: Path) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ", ".join(KINDS))
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument(
        "--memory-dir", type=Path, default=None, help="memory-tier root (default: under /dev/shm)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the runs and medians here")
    ap.add_argument(
        "--baseline", type=Path, default=None, help="a directory holding an older warmstart/ (@base)"
    )
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "URI", "MEM", "DISK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)), flush=True)
        return

    from warmstart.format.transfer import upload
    from warmstart.objectstore import SeaweedFS, SeaweedFSConfig

    kinds = [k for k in a.kinds.split(",") if k]
    work = a.work or Path(tempfile.mkdtemp(prefix="remote-fill-"))
    work.mkdir(parents=True, exist_ok=True)
    mem_dir = a.memory_dir or Path("/dev/shm") / f"remote-fill-bench-{os.getpid()}"
    disk_dir = work / "disk-tier"
    ckpt = work / "ckpt"
    if not (ckpt / "index.json").exists():
        make_checkpoint(ckpt, a.size_mib)
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    disk_done: dict[str, list[float]] = {}
    with SeaweedFS(SeaweedFSConfig(data_dir=work / "seaweedfs", buckets=(BUCKET,))) as s3:
        env = dict(os.environ, WARMSTART_S3_ENDPOINT=s3.endpoint)
        os.environ["WARMSTART_S3_ENDPOINT"] = s3.endpoint
        uri = f"s3://{BUCKET}/{PREFIX}/{a.size_mib}/"
        upload(ckpt, uri, overwrite=True)
        nbytes = sum(s for _, s in _layout(uri)[0])
        for rep in range(a.reps):
            order = kinds if rep % 2 == 0 else kinds[::-1]
            for kind in order:
                _clean(mem_dir, disk_dir)
                wenv = env
                if kind.endswith("@base"):
                    if a.baseline is None:
                        raise SystemExit("@base kinds need --baseline DIR")
                    wenv = dict(env, PYTHONPATH=str(a.baseline.resolve()))
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", kind, uri, str(mem_dir), str(disk_dir)],
                    env=wenv,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if out.returncode != 0:
                    raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs[kind].append(r["seconds"])
                cpu[kind].append(r["cpu_seconds"])
                if "disk_done_seconds" in r:
                    disk_done.setdefault(kind, []).append(r["disk_done_seconds"])
                print(
                    f"rep {rep} {kind:12s} {r['seconds']:.3f} s  {nbytes / r['seconds'] / 1e9:.2f} GB/s  "
                    f"cpu {r['cpu_seconds']:.2f} s"
                    + (
                        f"  disk tier done at {r['disk_done_seconds']:.3f} s"
                        if "disk_done_seconds" in r
                        else ""
                    ),
                    flush=True,
                )
        _clean(mem_dir, disk_dir)
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    raws: list[str] = [k for k in ("raw-ts", "raw-http") if k in med]
    best: str | None = min(raws, key=lambda k: med[k]) if raws else None
    print(f"\n{nbytes / 2**20:.0f} MiB, {a.reps} reps, medians; paired = median over reps of t(ws) / t(raw)")
    print("in the same rep (cancels most drift in background load); cpu = the loading process's user+sys:")
    paired: dict[str, float] = {}
    for k, v in med.items():
        line = f"  {k:12s} {v:.3f} s  {nbytes / v / 1e9:.2f} GB/s  cpu {statistics.median(cpu[k]):.2f} s"
        if best is not None and k.startswith("ws"):
            paired[k] = statistics.median(x / y for x, y in zip(runs[k], runs[best], strict=True))
            line += f"  t/t({best}) = {v / med[best]:.2f}  paired {paired[k]:.2f}"
        if k in disk_done:
            line += f"  (disk tier complete at {statistics.median(disk_done[k]):.3f} s)"
        print(line)
    if a.json:
        a.json.write_text(
            json.dumps(
                {"bytes": nbytes, "runs": runs, "cpu": cpu, "medians": med, "paired": paired}, indent=1
            )
        )
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
