"""Tier behaviour of the loaders: equality through every tier and framework, zero copy, LRU, in-use
protection, shared transfers, crash safety, corruption recovery and capacity errors."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import warmstart.format as wf
from warmstart.errors import CacheFull, CheckpointNotFound, InvalidModelName, ModelNotFound, StorageFull
from warmstart.format.sources import TensorStoreSource
from warmstart.loaders.hostcache import (
    SPARE_PREFIX,
    DiskCache,
    HostCache,
    prefault,
    take_spare,
    validate_name,
    wait_until,
)
from warmstart.loaders.pipeline import BUFFERS, BufferPool
from warmstart.loaders.tiers import Tiers, cache_key, open_host, wait_disk_copies

torch = pytest.importorskip("torch")

from warmstart.jax import load_params  # noqa: E402
from warmstart.torch import load_state_dict  # noqa: E402

CHUNK = 64 * 1024


def make_tensors(seed: int = 0, scale: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((64 * scale, 48)).astype(ml_dtypes.bfloat16),
        "layers.0.q.weight": rng.standard_normal((96, 48 * scale)).astype(np.float32),
        "layers.0.q.bias": rng.standard_normal((96,)).astype(np.float16),
        "layers.0.norm": rng.standard_normal((48,)).astype(np.float32),
        "ids": np.arange(1000, dtype=np.int64),
        "mask": rng.random(33) > 0.5,
        "empty": np.zeros((0, 4), np.float32),
        "layers.1.big": rng.standard_normal((300 * scale, 256)).astype(np.float32),
    }


def save(path: Path, seed: int = 0, scale: int = 1) -> dict[str, np.ndarray]:
    tensors = make_tensors(seed, scale)
    wf.save(tensors, path, chunk_size=CHUNK, partition_size=256 * 1024)
    return tensors


def upload(local: Path, uri: str) -> None:
    dst = TensorStoreSource(uri)
    names = sorted(p.name for p in local.iterdir() if p.name != "index.json")
    dst.write_many((n, (local / n).read_bytes()) for n in names)
    dst.write("index.json", (local / "index.json").read_bytes())


def as_numpy(t: object) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(t)


def assert_equal(loaded: dict[str, object], src: dict[str, np.ndarray]) -> None:
    assert list(loaded) == list(src)
    for k, v0 in src.items():
        got = as_numpy(loaded[k])
        v = v0
        if not isinstance(loaded[k], (torch.Tensor, np.ndarray)):  # jax: 64-bit types follow jax_enable_x64
            import jax

            v = v0.astype(jax.dtypes.canonicalize_dtype(v0.dtype))
        assert got.dtype == v.dtype and got.shape == v.shape, k
        assert np.array_equal(got.view(np.uint8), v.view(np.uint8)), k


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    p = tmp_path / "ckpt"
    return p, save(p)


def tiers_for(tmp_path: Path, kind: str, **kw: object) -> Tiers:
    mem = HostCache(tmp_path / "shm", kw.pop("mem_cap", None))  # type: ignore[arg-type]
    disk = DiskCache(tmp_path / "disk", kw.pop("disk_cap", None))  # type: ignore[arg-type]
    return {
        "embedded": Tiers(),
        "memory": Tiers(memory=mem),
        "disk": Tiers(disk=disk),
        "memory+disk": Tiers(memory=mem, disk=disk),
    }[kind]


# --- equality through each tier and framework --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["embedded", "memory", "disk", "memory+disk"])
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_load_equals_source_when_loaded_from_local_path_or_file_uri(
    tmp_path: Path, ckpt: tuple[Path, dict[str, np.ndarray]], kind: str, framework: str
) -> None:
    path, src = ckpt
    load = load_state_dict if framework == "torch" else load_params
    for ref in (str(path), path.as_uri()):
        t = tiers_for(tmp_path, kind)
        first = load(ref, tiers=t)
        assert_equal(first, src)
        again = load(ref, tiers=t)  # second load: served by the highest tier filled by the first
        assert_equal(again, src)


def test_remote_fill_populates_memory_then_disk_from_one_transfer(
    tmp_path: Path, ckpt: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, src = ckpt
    seen: list[tuple[str, tuple[str, ...]]] = []
    t = replace(tiers_for(tmp_path, "memory+disk"), on_transfer=lambda x: seen.append((x.source, x.targets)))
    host = open_host(path.as_uri(), tiers=t)
    assert [(x.source, x.targets) for x in host.transfers] == [("remote", ("memory",))]
    assert wait_disk_copies(60) == []  # the disk copy runs in the background, from the memory tier
    assert sorted(seen) == [("memory", ("disk",)), ("remote", ("memory",))]
    key = cache_key(path.as_uri().rstrip("/") + "/")
    assert t.memory is not None and t.disk is not None
    assert t.memory.contains(key) and t.disk.contains(key)
    wf.open(t.disk.root / key).verify()
    wf.open(t.memory.root / key).verify()
    del host
    gc.collect()
    t.memory.evict(key)
    host = open_host(path.as_uri(), tiers=t)  # memory gone: refilled from disk, not remote
    assert [(x.source, x.targets) for x in host.transfers] == [("disk", ("memory",))]
    assert_equal(load_state_dict(path.as_uri(), tiers=t), src)


@pytest.mark.s3
@pytest.mark.parametrize("kind", ["embedded", "memory+disk"])
def test_load_equals_source_when_loaded_from_s3(
    tmp_path: Path, seaweedfs: object, ckpt: tuple[Path, dict[str, np.ndarray]], kind: str
) -> None:
    path, src = ckpt
    name = kind.replace("+", "-")
    uri = f"s3://models/test-loaders/{name}/"
    upload(path, uri)
    t = tiers_for(tmp_path, kind)
    assert_equal(load_state_dict(uri, tiers=t), src)
    assert_equal(load_params(uri, tiers=t), src)
    if kind != "embedded":
        named = Tiers(memory=t.memory, disk=t.disk, remote="s3://models/test-loaders")
        assert_equal(load_state_dict(name, tiers=named), src)
    else:  # the process's buffer pool: a second load reuses the first one's (faulted) buffer once it is free
        gc.collect()
        reused = BUFFERS.reused
        sd = load_state_dict(uri, tiers=t)
        assert BUFFERS.reused == reused + 1
        assert_equal(sd, src)
    assert wait_disk_copies(60) == []


def test_buffer_pool_reuses_a_buffer_only_after_its_views_are_gone_and_stays_bounded() -> None:
    pool = BufferPool(capacity=3 << 20)
    a = pool.views(1 << 20, [(0, 100), (4096, 5000)])
    a[1][:3] = b"abc"
    b = pool.views(1 << 20, [(0, 10)])  # a is alive: a second buffer
    assert pool.created == 2 and pool.reused == 0
    keep = torch.frombuffer(a[1], dtype=torch.uint8)
    del a
    gc.collect()
    assert pool.idle_bytes() == 0  # a tensor still views the first buffer
    del keep, b
    gc.collect()
    assert pool.idle_bytes() == 2 << 20
    c = pool.views(1 << 20, [(4096, 5000)])
    assert pool.reused == 1 and bytes(c[0][:3]) == b"abc"  # the same memory, no new mapping
    big = pool.views(4 << 20, [(0, 4 << 20)])
    del big
    gc.collect()
    assert pool.idle_bytes() <= 3 << 20  # the 4 MiB buffer is over the bound: unmapped, not kept
    del c
    gc.collect()
    pool.clear()
    assert pool.idle_bytes() == 0


# --- zero copy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["embedded", "memory"])
def test_cpu_tensors_are_views_of_the_host_mapping(
    tmp_path: Path, ckpt: tuple[Path, dict[str, np.ndarray]], kind: str
) -> None:
    path, _ = ckpt
    host = open_host(path, tiers=tiers_for(tmp_path, kind))
    from warmstart.jax import params_from_host
    from warmstart.torch import tensors_from_host

    spans = []
    for b in host.buffers:
        a = np.frombuffer(b, np.uint8)
        spans.append((a.ctypes.data, a.ctypes.data + a.nbytes))
    sd = tensors_from_host(host, device=torch.device("cpu"))
    params = params_from_host(host)
    for t in host.index.tensors:
        if not t.nbytes:
            continue
        lo, hi = spans[t.partition]
        assert sd[t.name].data_ptr() == lo + t.offset, t.name
        if t.dtype in ("int64", "uint64", "float64"):
            continue  # without jax_enable_x64, JAX converts 64-bit arrays to 32 bits (a copy)
        ptr = params[t.name].unsafe_buffer_pointer()
        assert ptr == lo + t.offset and ptr + t.nbytes <= hi, t.name


def test_load_state_dict_converts_dtype_and_selects_names(ckpt: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, src = ckpt
    sd = load_state_dict(path, names=["layers.0.q.bias", "ids"], dtype=torch.float32)
    assert list(sd) == ["layers.0.q.bias", "ids"]
    assert sd["layers.0.q.bias"].dtype == torch.float32 and sd["ids"].dtype == torch.int64
    np.testing.assert_array_equal(sd["layers.0.q.bias"].numpy(), src["layers.0.q.bias"].astype(np.float32))


# --- cache policy ------------------------------------------------------------------------------------------


def _fill(cache: HostCache, key: str, size: int) -> None:
    def fill(tmp: Path) -> None:
        (tmp / "data-00000.bin").write_bytes(b"x" * size)
        (tmp / "index.json").write_bytes(b"{}")

    lease, _ = cache.get_or_fill(key, size, fill)
    lease.release()


def test_lru_entry_is_evicted_first_when_capacity_is_reached(tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "c", capacity=10_000)
    for k in ("a", "b", "c"):
        _fill(cache, k, 3000)
        time.sleep(0.02)
    os.utime(cache.root / "a")  # a used recently: b is now the least recently used
    _fill(cache, "d", 3000)
    assert sorted(e.key for e in cache.entries()) == ["a", "c", "d"]
    assert cache.used_bytes() <= 10_000


def test_full_cache_raises_cache_full_and_writes_nothing(
    tmp_path: Path, ckpt: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, _ = ckpt
    t = Tiers(memory=HostCache(tmp_path / "shm", capacity=100_000))
    with pytest.raises(CacheFull, match="raise the capacity"):
        load_state_dict(path, tiers=t)
    assert t.memory is not None
    assert t.memory.entries() == [] and list((t.memory.root / ".tmp").iterdir()) == []


MiB = 1 << 20


def _pool_inodes(cache: HostCache) -> set[int]:
    return {path.stat().st_ino for path, _ in cache.pool()}


def _big_partition(root: Path) -> Path:
    return max((p for p in root.iterdir() if p.name.startswith("data-")), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("source", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_memory_fill_reuses_the_pages_of_an_evicted_entry_and_loads_the_new_bytes(
    tmp_path: Path, request: pytest.FixtureRequest, source: str
) -> None:
    refs = []
    for seed in (1, 2):  # same shapes, different bytes
        local = tmp_path / f"ckpt{seed}"
        wf.save(make_tensors(seed, scale=8), local, chunk_size=CHUNK, partition_size=4 * MiB)
        if source == "s3":
            request.getfixturevalue("seaweedfs")
            uri = f"s3://models/test-pool/{tmp_path.name}-{seed}/"
            upload(local, uri)
            refs.append(uri)
        else:
            refs.append(local.as_uri())
    cache = HostCache(tmp_path / "shm", capacity=64 * MiB)
    t = Tiers(memory=cache)
    assert_equal(load_state_dict(refs[0], tiers=t), make_tensors(1, scale=8))
    gc.collect()
    [first] = cache.entries()
    old = _big_partition(first.path).stat()
    assert old.st_size >= MiB
    cache.evict(first.key)
    assert old.st_ino in _pool_inodes(cache)  # its pages stayed, in the pool

    sd = load_state_dict(refs[1], tiers=t)
    assert_equal(sd, make_tensors(2, scale=8))  # nothing of the old bytes shows through
    [second] = cache.entries()
    assert _big_partition(second.path).stat().st_ino == old.st_ino  # written into the pooled pages
    assert old.st_ino not in _pool_inodes(cache)
    wf.open(second.path).verify()
    assert not list(second.path.glob(".spare-*"))


def test_page_pool_stays_within_the_capacity_and_is_trimmed_when_it_shrinks(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cache = HostCache(root, capacity=20 * MiB)
    for k in ("a", "b"):
        _fill(cache, k, 5 * MiB)
    for k in ("a", "b"):
        cache.evict(k)
    assert sorted(n for _, n in cache.pool()) == [5 * MiB, 5 * MiB]
    smaller = HostCache(root, capacity=8 * MiB)
    _fill(smaller, "c", 2 * MiB)  # claims one 5 MiB file (unused by this fill: deleted), keeps the other
    assert smaller.used_bytes() + smaller.pool_bytes() <= 8 * MiB
    assert smaller.pool_bytes() == 5 * MiB
    tiny = HostCache(root, capacity=6 * MiB)
    _fill(tiny, "d", 2 * MiB)  # 2 (c) + 2 (d) in use leaves 2 MiB: the 5 MiB file goes
    assert tiny.pool_bytes() == 0 and tiny.used_bytes() <= 6 * MiB


def test_only_a_bounded_memory_tier_keeps_a_page_pool(tmp_path: Path) -> None:
    for cache in (
        HostCache(tmp_path / "unbounded"),
        DiskCache(tmp_path / "disk", capacity=64 * MiB),
        HostCache(tmp_path / "off", capacity=64 * MiB, page_pool=False),
    ):
        _fill(cache, "a", 2 * MiB)  # type: ignore[arg-type]
        cache.evict("a")
        assert cache.pool_bytes() == 0, cache


def test_take_spare_picks_the_smallest_covering_file_and_sizes_it(tmp_path: Path) -> None:
    for name, n in (("x", 3 * MiB), ("y", 8 * MiB), ("z", 5 * MiB)):
        (tmp_path / f"{SPARE_PREFIX}{name}").write_bytes(b"\1" * n)
    assert take_spare(tmp_path, "p0", 4 * MiB) == 4 * MiB  # z: the smallest of those >= 4 MiB
    assert (tmp_path / "p0").stat().st_size == 4 * MiB
    assert take_spare(tmp_path, "p1", 20 * MiB) == 8 * MiB  # none covers: the biggest, extended
    assert (tmp_path / "p1").stat().st_size == 20 * MiB
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{SPARE_PREFIX}x", "p0", "p1"]
    assert take_spare(tmp_path, "p2", 0) == 0


HOLDER = textwrap.dedent(
    """
    import sys, time
    from warmstart.loaders.tiers import Tiers, open_host
    from warmstart.loaders.hostcache import HostCache
    from warmstart.torch import tensors_from_host
    import torch
    host = open_host(sys.argv[1], tiers=Tiers(memory=HostCache(sys.argv[2], int(sys.argv[3]))))
    sd = tensors_from_host(host, device=torch.device("cpu"))
    del host
    print("ready", len(sd), flush=True)
    time.sleep(float(sys.argv[4]))
    """
)


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_checkpoint_in_use_by_another_process_is_never_evicted(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    save(a, 1)
    save(b, 2)
    size = wf.open(a).index.total_bytes
    shm = tmp_path / "shm"
    cap = size + size // 2  # room for one checkpoint only
    holder = _spawn([str(a), str(shm), str(cap), "60"])
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().startswith("ready")
        cache = HostCache(shm, cap)
        assert [e.in_use for e in cache.entries()] == [True]
        with pytest.raises(CacheFull, match="in use"):
            open_host(b, tiers=Tiers(memory=cache))
        assert [e.key for e in cache.entries()] == [cache_key(str(a.resolve()))]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (kill -9 releases its lock): now a can be evicted for b
    open_host(b, tiers=Tiers(memory=HostCache(shm, cap)))
    assert [e.key for e in HostCache(shm, cap).entries()] == [cache_key(str(b.resolve()))]


def test_entry_stays_in_use_while_tensors_live_in_this_process(
    tmp_path: Path, ckpt: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, _ = ckpt
    cache = HostCache(tmp_path / "shm")
    sd = load_state_dict(path, tiers=Tiers(memory=cache))
    assert [e.in_use for e in cache.entries()] == [True]
    keep = sd["layers.1.big"]
    del sd
    gc.collect()
    assert [e.in_use for e in cache.entries()] == [True]
    del keep
    gc.collect()
    assert [e.in_use for e in cache.entries()] == [False]


LOADER = textwrap.dedent(
    """
    import sys, json, time
    from warmstart.format.sources import TensorStoreSource
    from warmstart.loaders.tiers import Tiers, open_host
    from warmstart.loaders.hostcache import HostCache, DiskCache
    real = TensorStoreSource.read_ranges
    def slow(self, ranges):  # slow the transfer down so that the three loads overlap
        for item in real(self, ranges):
            time.sleep(0.01)
            yield item
    TensorStoreSource.read_ranges = slow
    t = Tiers(memory=HostCache(sys.argv[2]), disk=DiskCache(sys.argv[3]))
    host = open_host(sys.argv[1], tiers=t)
    print(json.dumps([[x.source, x.nbytes] for x in host.transfers]), flush=True)
    """
)


def test_concurrent_loads_in_two_processes_share_one_transfer(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    save(path, scale=20)
    args = [path.as_uri(), str(tmp_path / "shm"), str(tmp_path / "disk")]
    procs = [
        subprocess.Popen([sys.executable, "-c", LOADER, *args], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    import json

    transfers = [json.loads(o) for o in outs]
    fetched = [t for t in transfers if t]
    assert len(fetched) == 1, transfers
    assert fetched[0] == [["remote", wf.open(path).index.total_bytes]]


KILLABLE = textwrap.dedent(
    """
    import sys, time
    from warmstart.format.sources import TensorStoreSource
    from warmstart.loaders.tiers import Tiers, open_host
    from warmstart.loaders.hostcache import HostCache, DiskCache
    real = TensorStoreSource.read_ranges
    def slow(self, ranges):
        for item in real(self, ranges):
            print("chunk", flush=True)
            time.sleep(0.05)
            yield item
    TensorStoreSource.read_ranges = slow
    open_host(sys.argv[1], tiers=Tiers(memory=HostCache(sys.argv[2]), disk=DiskCache(sys.argv[3])))
    """
)


def test_kill_9_during_download_leaves_no_visible_entry(
    tmp_path: Path, ckpt: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, src = ckpt
    shm, disk = tmp_path / "shm", tmp_path / "disk"
    p = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, path.as_uri(), str(shm), str(disk)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    for _ in range(3):
        assert p.stdout.readline().strip() == "chunk"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    mem, dc = HostCache(shm), DiskCache(disk)
    assert mem.entries() == [] and dc.entries() == []
    assert [d.name for d in shm.iterdir() if not d.name.startswith(".")] == []
    assert list((shm / ".tmp").iterdir())  # the hidden leftovers exist until the next fill cleans them
    sd = load_state_dict(path.as_uri(), tiers=Tiers(memory=mem, disk=dc))
    assert_equal(sd, src)
    assert wait_disk_copies(60) == []
    assert list((shm / ".tmp").iterdir()) == [] and list((disk / ".tmp").iterdir()) == []
    assert dc.entries() != []


# --- corruption ------------------------------------------------------------------------------------------


def test_truncated_memory_copy_is_refetched(tmp_path: Path, ckpt: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, src = ckpt
    t = tiers_for(tmp_path, "memory")
    del_host = open_host(path, tiers=t)
    entry = del_host.path
    del del_host
    gc.collect()
    assert entry is not None
    part = entry / "data-00000.bin"
    os.truncate(part, part.stat().st_size - 100)
    host = open_host(path, tiers=t)
    assert [x.source for x in host.transfers] == ["disk"]
    assert_equal(load_state_dict(path, tiers=t), src)


def test_flipped_byte_in_memory_copy_is_refetched_when_verifying(
    tmp_path: Path, ckpt: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, src = ckpt
    mem = HostCache(tmp_path / "shm")
    entry = open_host(path, tiers=Tiers(memory=mem)).path
    gc.collect()
    assert entry is not None
    with open(entry / "data-00000.bin", "r+b") as f:
        f.seek(5)
        b = f.read(1)
        f.seek(5)
        f.write(bytes([b[0] ^ 0xFF]))
    host = open_host(path, tiers=Tiers(memory=mem, verify=True))
    assert [x.source for x in host.transfers] == ["disk"]
    del host
    assert_equal(load_state_dict(path, tiers=Tiers(memory=mem, verify=True)), src)


def test_corrupt_disk_copy_is_evicted_and_refetched_from_remote(
    tmp_path: Path, ckpt: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, src = ckpt
    t = tiers_for(tmp_path, "memory+disk")
    assert t.memory is not None and t.disk is not None
    uri = path.as_uri()
    open_host(uri, tiers=t)
    assert wait_disk_copies(60) == []
    gc.collect()
    key = cache_key(uri + "/")
    t.memory.evict(key)
    with open(t.disk.root / key / "data-00001.bin", "r+b") as f:
        f.write(b"\x00\x01\x02\x03")
    host = open_host(uri, tiers=t)
    assert [x.source for x in host.transfers] == ["remote"]
    del host
    assert_equal(load_params(uri, tiers=t), src)
    assert wait_disk_copies(60) == []  # the disk tier is refilled from the new memory copy
    wf.open(t.disk.root / key).verify()


# --- names and errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "..", "a/b", "../etc", ".hidden", "a..b", "x" * 129, "a b", "-a"])
def test_bad_model_names_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidModelName):
        validate_name(bad)


def test_bare_name_without_store_or_remote_raises_model_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WARMSTART_STORE", "WARMSTART_REMOTE", "WARMSTART_MEMORY_CACHE", "WARMSTART_DISK_CACHE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ModelNotFound, match="WARMSTART_STORE"):
        load_state_dict("some-model")


def test_missing_local_checkpoint_raises_checkpoint_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound):
        load_state_dict(tmp_path / "nope")


def test_tiers_from_env_reads_the_environment(tmp_path: Path) -> None:
    t = Tiers.from_env(
        {
            "WARMSTART_MEMORY_CACHE": str(tmp_path / "m"),
            "WARMSTART_MEMORY_CAPACITY": "1GiB",
            "WARMSTART_REMOTE": "s3://b/p",
        }
    )
    assert t.memory is not None and t.memory.capacity == 1024**3 and t.disk is None and t.remote == "s3://b/p"


def test_wait_until_times_out() -> None:
    assert not wait_until(lambda: False, 0.05)


# --- full file systems (a real small tmpfs; needs root's mount, skipped elsewhere) -------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``mount(options)`` mounts a fresh tmpfs under ``tmp_path`` and returns it; all are unmounted after."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        d = tmp_path / f"mnt{len(mounted)}"
        d.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)],
            check=False,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    try:
        yield mount
    finally:
        for d in reversed(mounted):
            subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_disk_tier_raises_storage_full_and_leaves_nothing(
    tmp_path: Path, small_tmpfs: Callable[[str], Path]
) -> None:
    path = tmp_path / "ckpt"
    save(path, scale=30)  # ~9.5 MB: more than the 8 MiB file system, though no capacity is configured
    disk = DiskCache(small_tmpfs("size=8m"))
    with pytest.raises(StorageFull, match="no space"):
        open_host(path.as_uri(), tiers=Tiers(disk=disk))
    assert disk.entries() == [] and list((disk.root / ".tmp").iterdir()) == []


def test_full_memory_tier_raises_storage_full_and_leaves_nothing(
    tmp_path: Path, small_tmpfs: Callable[[str], Path]
) -> None:
    path = tmp_path / "ckpt"
    save(path, scale=30)
    mem = HostCache(small_tmpfs("size=8m"))
    for ref in (path.as_uri(), str(path)):  # remote -> memory, and disk -> memory
        with pytest.raises(StorageFull):
            open_host(ref, tiers=Tiers(memory=mem))
        assert mem.entries() == [] and list((mem.root / ".tmp").iterdir()) == []


@pytest.mark.s3
def test_full_memory_tier_raises_storage_full_when_filled_from_s3(
    tmp_path: Path, seaweedfs: object, small_tmpfs: Callable[[str], Path]
) -> None:
    path = tmp_path / "ckpt"
    save(path, scale=30)
    uri = "s3://models/test-loaders/full-memory/"
    upload(path, uri)
    mem = HostCache(small_tmpfs("size=8m"))
    with pytest.raises(StorageFull, match="no space"):
        open_host(uri, tiers=Tiers(memory=mem))
    assert mem.entries() == [] and list((mem.root / ".tmp").iterdir()) == []


def test_full_disk_under_memory_fill_keeps_the_memory_copy_and_reports_the_disk_error(
    tmp_path: Path, small_tmpfs: Callable[[str], Path]
) -> None:
    path = tmp_path / "ckpt"
    src = save(path, scale=30)
    t = Tiers(memory=HostCache(tmp_path / "shm"), disk=DiskCache(small_tmpfs("size=8m")))
    assert_equal(load_state_dict(path.as_uri(), tiers=t), src)  # usable: the disk copy is not needed
    errors = wait_disk_copies(60)
    assert len(errors) == 1 and isinstance(errors[0], StorageFull)
    assert t.disk is not None
    assert t.disk.entries() == [] and list((t.disk.root / ".tmp").iterdir()) == []


def test_memory_tier_on_a_huge_page_tmpfs(tmp_path: Path, small_tmpfs: Callable[[str], Path]) -> None:
    path = tmp_path / "ckpt"
    src = save(path, scale=10)
    mem = HostCache(small_tmpfs("size=64m,huge=within_size"))
    assert mem.huge_pages and not HostCache(tmp_path / "plain").huge_pages
    assert_equal(load_state_dict(path, tiers=Tiers(memory=mem)), src)
    assert_equal(load_state_dict(path, tiers=Tiers(memory=mem)), src)


def _resident_pages(m: mmap.mmap) -> int:
    """Pages of ``m`` in memory, by ``mincore``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = -(-len(m) // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
    assert libc.mincore(addr, len(m), vec) == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec)


def test_prefault_makes_every_page_of_evicted_files_resident_without_changing_or_sharing_them(
    tmp_path: Path,
) -> None:
    sizes = [5 * 1024**2 + 123, 3 * mmap.PAGESIZE, 1]
    files = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes())
        files.append(p)
    maps = []
    for p in files:
        with open(p, "rb") as f:
            os.fdatasync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))

    assert prefault(maps, threads=2, chunk_bytes=1024**2)

    for p, m in zip(files, maps, strict=True):
        assert _resident_pages(m) == -(-len(m) // mmap.PAGESIZE)
        assert m[:] == p.read_bytes()
    maps[0][0] = (maps[0][0] + 1) % 256  # a private mapping: the write stays in this process
    assert maps[0][0] != files[0].read_bytes()[0]
