"""What it costs to trust a cached copy again: the seal check against a full xxh3 re-verification.

For each size (default: 540 MB, SmolLM2's checkpoint, and 1 GiB) a checkpoint of random bytes is generated
once, filled into a memory tier (``/dev/shm``) and a disk tier (``.bench/verify``), and then, interleaved
``--reps`` times, each of these is timed on each tier (medians):

* ``seal``: ``CacheDir.lookup`` of a sealed entry, what every hand-out does (read ``.sealed``, ``lstat``
  each file, compare);
* ``reverify``: ``hostcache.verify_entry``, the re-hash a lookup runs when the seal broke (2 threads,
  ``preadv`` into reused 4 MiB buffers, xxh3);
* ``reader_verify``: ``warmstart.format.open(dir).verify()`` (one thread, what ``warmstart verify`` does);
* ``map``: mapping the entry as a loader does (``Lease.map``: ``MADV_POPULATE_READ`` on the memory tier,
  ``WILLNEED`` on the disk tier), then touching every page (the backend's ``prefault``), for scale.

``disk-cold`` drops the disk tier's files from the page cache before each timing. Run:
``.venv/bin/python benchmarks/verify_cost.py [--sizes 540MB,1GiB] [--reps 5]``; results go to
``benchmarks/results/verify_cost.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import warmstart.format as wf
from warmstart.format.index import Index
from warmstart.loaders import pipeline
from warmstart.loaders.hostcache import CacheDir, DiskCache, HostCache, prefault, read_seal, verify_entry
from warmstart.loaders.tiers import Tiers, cache_key, open_host
from warmstart.units import parse_size

ROOT = Path(__file__).resolve().parent


def make_checkpoint(dest: Path, nbytes: int) -> Path:
    if (dest / "index.json").is_file():
        return dest
    rng = np.random.default_rng(0)
    per = 64 * 1024**2

    def tensors() -> Any:
        left, i = nbytes, 0
        while left > 0:
            n = min(per, left)
            yield f"layers.{i}.weight", rng.integers(0, 255, n, dtype=np.uint8)
            left -= n
            i += 1

    wf.save(tensors(), dest)
    return dest


def drop_cache(entry: Path) -> None:
    for p in entry.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def lookup_once(cache: CacheDir, key: str) -> None:
    lease = cache.lookup(key)
    assert lease is not None, "the sealed entry was not handed out"
    lease.release()


def map_once(cache: CacheDir, key: str) -> None:
    lease = cache.lookup(key)
    assert lease is not None
    maps = [lease.map(p.file) for p in lease.index().partitions]
    prefault(maps)
    lease.release()
    del maps
    gc.collect()


def run(sizes: list[int], reps: int, workdir: Path) -> list[dict[str, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    shm = Path(f"/dev/shm/wsverify-{os.getpid()}")
    results = []
    try:
        for nbytes in sizes:
            src = make_checkpoint(workdir / f"ckpt-{nbytes}", nbytes)
            index = Index.from_json_bytes((src / "index.json").read_bytes())
            memory = HostCache(shm / str(nbytes))
            disk = DiskCache(workdir / f"disk-{os.getpid()}" / str(nbytes))
            key = cache_key(str(src.resolve()))
            host = open_host(src, tiers=Tiers(memory=memory))
            del host
            gc.collect()
            with disk.fill_lock(key), disk.filling(key, index.total_bytes) as f:
                pipeline.local_copy(memory.root / key, index, f.path)
            assert f.lease is not None
            f.lease.release()
            tiers = {"memory": memory, "disk-warm": disk, "disk-cold": disk}
            samples: dict[str, dict[str, list[float]]] = {t: {} for t in tiers}
            for _ in range(reps):
                for tier, cache in tiers.items():
                    entry = cache.root / key
                    seal = read_seal(entry)
                    for kind, fn in (
                        ("seal", lambda c=cache, k=key: lookup_once(c, k)),
                        ("reverify", lambda e=entry, s=seal: verify_entry(e, s)),
                        ("reader_verify", lambda e=entry: wf.open(e).verify()),
                        ("map", lambda c=cache, k=key: map_once(c, k)),
                    ):
                        if tier == "disk-cold":
                            drop_cache(entry)
                        elif tier == "disk-warm":
                            verify_entry(entry, seal)  # read it into the page cache
                        samples[tier].setdefault(kind, []).append(timed(fn))
            for tier, kinds in samples.items():
                row = {"bytes": index.total_bytes, "tier": tier}
                row.update({k: statistics.median(v) for k, v in kinds.items()})
                results.append(row)
            shutil.rmtree(memory.root, ignore_errors=True)
            shutil.rmtree(disk.root, ignore_errors=True)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(workdir / f"disk-{os.getpid()}", ignore_errors=True)
    return results


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| checkpoint | tier | seal check (every hand-out) | re-verify, 2 threads | `warmstart verify`, 1 thread | map + touch |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['bytes'] / 1e6:.0f} MB | {r['tier']} | {r['seal'] * 1e3:.2f} ms | {r['reverify'] * 1e3:.0f} ms | "
            f"{r['reader_verify'] * 1e3:.0f} ms | {r['map'] * 1e3:.0f} ms |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="540MB,1GiB", help="comma-separated sizes (default: 540MB,1GiB)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=ROOT.parent / ".bench" / "verify")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "verify_cost.json")
    args = ap.parse_args()
    rows = run([parse_size(s) for s in args.sizes.split(",")], args.reps, args.workdir)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"reps": args.reps, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
