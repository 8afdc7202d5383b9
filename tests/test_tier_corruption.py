"""Cached copies are verified, and corrupt ones dropped.

Every tier's copy is corrupted in place, as the adversarial run of issue 16 did (open the file, overwrite a
range with zeros): the memory tier and the disk tier, through the in-process loaders, the node store, and
the node store under a real tritonserver with the warmstart backend. Each time the corrupt copy must be
noticed before it is used again, removed (gone from the inventory and from disk), and fetched again from
the next tier, and the load must return the checkpoint's real bytes (or the model its real tokens).
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import warmstart.format as wf
from tests.test_loaders_tiers import assert_equal, save, upload
from warmstart.errors import EntryInUse
from warmstart.loaders import hostcache
from warmstart.loaders.hostcache import SEAL_FILE, DiskCache, HostCache, Seal, seal_verdict, wait_until
from warmstart.loaders.storeclient import StoreClient
from warmstart.loaders.tiers import Tiers, cache_key, open_host, wait_disk_copies
from warmstart.store.service import NodeStore, StoreConfig, _Server

torch = pytest.importorskip("torch")
from warmstart.torch import load_state_dict  # noqa: E402


def overwrite(path: Path, offset: int = 0, n: int | None = None) -> None:
    """Overwrite ``n`` bytes of ``path`` at ``offset`` with zeros in place (``dd conv=notrunc``). A process
    without write permission on the read-only cached file makes it writable first, as an attacker would."""
    if not os.access(path, os.W_OK):
        os.chmod(path, 0o600)
    size = path.stat().st_size
    n = size - offset if n is None else n
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * n)


def zeroed(path: Path, n: int) -> bool:
    """Whether the first ``n`` bytes of ``path`` are the zeros :func:`overwrite` wrote (random weights never are)."""
    with open(path, "rb") as f:
        return f.read(n) == b"\0" * n


def big_partition(entry: Path) -> Path:
    return max(entry.glob("data-*.bin"), key=lambda p: p.stat().st_size)


# --- the seal: policy -----------------------------------------------------------------------------------


def _seal(mtime: int = 1) -> Seal:
    return Seal("ab" * 8, (hostcache.FileStamp("data-00000.bin", 7, 4096, mtime, mtime),))


@pytest.mark.parametrize(
    ("recorded", "current", "remembered", "trust_recorded", "trusted"),
    [
        (_seal(), _seal(), None, True, True),  # a loader trusts the seal file when nothing changed
        (_seal(), _seal(2), None, True, False),  # a file was written after the seal
        (None, _seal(), None, True, False),  # no seal (a copy from before seals, or it was deleted)
        (_seal(), _seal(), None, False, False),  # the store trusts only the seals it made itself
        (_seal(), _seal(), _seal(), False, True),
        (_seal(2), _seal(2), _seal(), False, False),  # the seal file was rewritten behind the store's back
    ],
)
def test_seal_verdict(
    recorded: Seal | None, current: Seal, remembered: Seal | None, trust_recorded: bool, trusted: bool
) -> None:
    assert seal_verdict(recorded, current.files, remembered, trust_recorded=trust_recorded) is trusted


# --- the in-process loaders ----------------------------------------------------------------------------


def test_every_fill_records_a_seal_of_what_it_verified_and_leaves_the_copy_read_only(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    save(src)
    t = Tiers(memory=HostCache(tmp_path / "shm"), disk=DiskCache(tmp_path / "disk"))
    uri = src.as_uri()
    host = open_host(uri, tiers=t)
    assert wait_disk_copies(60) == []
    key = cache_key(uri + "/")
    for entry in (host.path, tmp_path / "disk" / key):
        assert entry is not None
        seal = json.loads((entry / SEAL_FILE).read_bytes())
        assert seal["index_xxh3"] == wf.checksum.xxh3_hex((entry / "index.json").read_bytes())
        names = {f[0] for f in seal["files"]}
        assert names == {p.name for p in entry.iterdir() if p.name != SEAL_FILE}
        assert all(p.stat().st_mode & 0o222 == 0 for p in entry.iterdir())


def test_overwritten_memory_copy_is_dropped_and_refilled_from_the_next_tier(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    tensors = save(src)
    t = Tiers(memory=HostCache(tmp_path / "shm"))
    entry = open_host(src, tiers=t).path
    gc.collect()
    assert entry is not None
    overwrite(big_partition(entry))
    host = open_host(src, tiers=t)
    assert [x.source for x in host.transfers] == ["disk"]  # fetched again from the local checkpoint
    # the same place holds sound bytes again (not an inode check: a removed file's inode is reused)
    assert host.path == entry and not zeroed(big_partition(entry), 65536)
    del host
    assert_equal(load_state_dict(src, tiers=t), tensors)
    wf.open(entry).verify()


def test_each_tier_copy_overwritten_is_dropped_and_fetched_from_the_next(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    tensors = save(src)
    mem, disk = HostCache(tmp_path / "shm"), DiskCache(tmp_path / "disk")
    t = Tiers(memory=mem, disk=disk)
    uri = src.as_uri()
    key = cache_key(uri + "/")
    open_host(uri, tiers=t)
    assert wait_disk_copies(60) == []
    gc.collect()
    # memory copy corrupt, disk copy sound: the memory tier is refilled from the disk tier
    overwrite(big_partition(mem.root / key), 4096, 8192)
    host = open_host(uri, tiers=t)
    assert [x.source for x in host.transfers] == ["disk"]
    del host
    assert_equal(load_state_dict(uri, tiers=t), tensors)
    gc.collect()
    # both copies corrupt: both dropped, the checkpoint comes from the remote
    overwrite(big_partition(mem.root / key))
    overwrite(big_partition(disk.root / key))
    host = open_host(uri, tiers=t)
    assert [x.source for x in host.transfers] == ["remote"]
    del host
    assert_equal(load_state_dict(uri, tiers=t), tensors)
    assert wait_disk_copies(60) == []  # the disk tier is refilled from the new memory copy
    wf.open(disk.root / key).verify()
    wf.open(mem.root / key).verify()


def test_disk_only_tier_copy_overwritten_is_refetched(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    tensors = save(src)
    t = Tiers(disk=DiskCache(tmp_path / "disk"))
    uri = src.as_uri()
    entry = open_host(uri, tiers=t).path
    gc.collect()
    assert entry is not None
    overwrite(big_partition(entry), 0, 4096)
    host = open_host(uri, tiers=t)
    assert [x.source for x in host.transfers] == ["remote"]
    del host
    assert_equal(load_state_dict(uri, tiers=t), tensors)
    wf.open(entry).verify()


def test_a_copy_in_use_that_is_found_corrupt_is_still_removed(tmp_path: Path) -> None:
    """Eviction skips entries in use, but a corrupt copy must go even while a process maps it (the store
    used to log "evicting it" and leave it listed). Mappings of it stay valid until they are dropped."""
    src = tmp_path / "ckpt"
    tensors = save(src)
    mem = HostCache(tmp_path / "shm")
    t = Tiers(memory=mem)
    held = open_host(src, tiers=t)  # keeps the entry in use
    assert held.path is not None
    overwrite(big_partition(held.path), 0, 4096)
    host = open_host(src, tiers=t)
    assert [x.source for x in host.transfers] == ["disk"]
    assert [e.key for e in mem.entries()] == [cache_key(str(src.resolve()))]
    del host
    assert_equal(load_state_dict(src, tiers=t), tensors)
    assert len(held.buffers[0]) > 0  # the old mapping is still readable
    del held


def _forge_seal(entry: Path) -> None:
    """Rewrite ``entry``'s seal with the files' current times, as a process hiding its write would."""
    seal = hostcache.read_seal(entry)
    assert seal is not None
    (entry / SEAL_FILE).chmod(0o600)
    (entry / SEAL_FILE).write_bytes(Seal(seal.index_xxh3, hostcache.current_stamps(entry)).to_json())


def test_verify_on_every_load_catches_a_copy_whose_seal_was_forged(tmp_path: Path) -> None:
    """``Tiers(verify=True)`` re-hashes every chunk on every load, whatever the seal says."""
    src = tmp_path / "ckpt"
    tensors = save(src)
    mem = HostCache(tmp_path / "shm")
    entry = open_host(src, tiers=Tiers(memory=mem)).path
    gc.collect()
    assert entry is not None
    overwrite(big_partition(entry), 0, 4096)
    _forge_seal(entry)
    host = open_host(src, tiers=Tiers(memory=mem, verify=True))
    assert [x.source for x in host.transfers] == ["disk"]
    del host
    assert_equal(load_state_dict(src, tiers=Tiers(memory=mem)), tensors)


# --- the node store ----------------------------------------------------------------------------------------

PREFIX = "s3://models/corruption-test"


@pytest.fixture(scope="module")
def remote(seaweedfs: object, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    d = tmp_path_factory.mktemp("corrupt-src")
    tensors = save(d / "m", seed=5)
    upload(d / "m", f"{PREFIX}/m/")
    return tensors


@pytest.fixture
def store(remote: object, tmp_path: Path) -> Iterator[tuple[NodeStore, str]]:
    import threading

    ns = NodeStore(
        StoreConfig(
            root=tmp_path / "root",
            remote=PREFIX,
            memory_capacity=64 * 1024**2,
            disk_capacity=64 * 1024**2,
            memory_root=tmp_path / "shm",
            probe=False,
            port=0,
        )
    )
    server = _Server(ns)
    th = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    try:
        yield ns, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        wait_disk_copies(60)


def _metric(text: str, name: str, **labels: str) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(sel)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _sources(info: dict) -> list[str]:
    return [t["source"] for t in info["transfers"]]


@pytest.mark.s3
def test_store_drops_a_corrupt_memory_copy_and_serves_the_disk_copy_instead(
    store: tuple[NodeStore, str], remote: dict[str, np.ndarray]
) -> None:
    ns, url = store
    c = StoreClient(url)
    assert _sources(c.ensure("m", "memory")) == ["remote"]
    assert wait_disk_copies(60) == []
    overwrite(big_partition(ns.memory.root / "m"))  # every byte zero: the "every token id 0" copy
    info = c.locate("m")
    assert info["tier"] == "memory" and _sources(info) == ["disk"]
    assert_equal(load_state_dict("m", tiers=Tiers(store=url)), remote)
    assert _metric(c.metrics(), "warmstart_store_corrupt_copies_total", tier="memory") == 1
    wf.open(ns.memory.root / "m").verify()


@pytest.mark.s3
def test_store_drops_a_corrupt_disk_copy_and_fetches_from_the_remote(
    store: tuple[NodeStore, str], remote: dict[str, np.ndarray]
) -> None:
    """A disk-only model is mapped straight from the disk tier: the corrupt disk copy used to be served
    (and, when the promotion found it, logged as "evicting it" while it stayed listed under ``disk``)."""
    ns, url = store
    c = StoreClient(url)
    assert _sources(c.ensure("m", "disk")) == ["remote"]
    overwrite(big_partition(ns.disk.root / "m"), 0, 64 * 1024)
    info = c.locate("m")
    assert info["tier"] == "memory" and _sources(info) == ["remote"]
    # the corrupt copy is gone (a new one is published whole, by rename, once it is written)
    assert not (ns.disk.root / "m").exists() or not zeroed(big_partition(ns.disk.root / "m"), 64 * 1024)
    assert_equal(load_state_dict("m", tiers=Tiers(store=url)), remote)
    assert _metric(c.metrics(), "warmstart_store_corrupt_copies_total", tier="disk") == 1
    assert wait_disk_copies(60) == []  # and the disk tier gets a sound copy back
    wf.open(ns.disk.root / "m").verify()
    assert {m["name"]: m["tiers"] for m in c.models()} == {"m": ["memory", "disk"]}


@pytest.mark.s3
def test_store_drops_a_corrupt_disk_copy_when_asked_for_the_disk_tier(store: tuple[NodeStore, str]) -> None:
    ns, url = store
    c = StoreClient(url)
    c.ensure("m", "disk")
    overwrite(big_partition(ns.disk.root / "m"), 8192, 100)
    assert _sources(c.ensure("m", "disk")) == ["remote"]
    wf.open(ns.disk.root / "m").verify()


@pytest.mark.s3
def test_store_does_not_trust_a_seal_it_did_not_write(
    store: tuple[NodeStore, str], remote: dict[str, np.ndarray]
) -> None:
    """A copy corrupted and then re-sealed by another process (the seal file rewritten with the new file
    times) passes a loader's seal check, but the store re-verifies it: it trusts only its own seals."""
    ns, url = store
    c = StoreClient(url)
    c.ensure("m", "memory")
    entry = ns.memory.root / "m"
    overwrite(big_partition(entry), 0, 4096)
    _forge_seal(entry)
    info = c.locate("m")
    assert _sources(info) in (["disk"], ["remote"])
    assert_equal(load_state_dict("m", tiers=Tiers(store=url)), remote)


# --- node store + real tritonserver + the warmstart backend ------------------------------------------------


@pytest.fixture(scope="module")
def served(seaweedfs: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Path]]:
    from backend_support import make_tiny_checkpoint, write_model

    from warmstart.store.owner import StoreServer
    from warmstart.triton import TritonConfig, TritonServer

    root = tmp_path_factory.mktemp("corrupt-served")
    ckpt = make_tiny_checkpoint(root / "tiny", "llama")
    upload(ckpt, "s3://models/corrupt-served/tiny/")
    repo = root / "repo"
    write_model(repo, "tiny", "tiny", "torch")  # a bare name: the backend asks its node store
    shm = Path(f"/dev/shm/ws-corrupt-{os.getpid()}")
    store = StoreServer(
        root=root / "node",
        remote="s3://models/corrupt-served",
        memory_capacity="256MiB",
        disk_capacity="256MiB",
        memory_root=shm,
        env=dict(os.environ),
    )
    triton = TritonServer(
        TritonConfig(model_repositories=(repo,)),
        workdir=root / "triton",
        env={"WARMSTART_STORE": store.url, "OMP_NUM_THREADS": "1"},
    )
    try:
        store.start()
        triton.start()
        yield store, triton, shm
    finally:
        triton.stop()
        store.stop()
        shutil.rmtree(shm, ignore_errors=True)


def _tokens(triton: Any) -> list[int]:
    from backend_support import grpc_generate

    r = grpc_generate(triton.grpc_url, "tiny", "Hello", params={"max_tokens": 8, "temperature": 0})
    assert r.error is None, r.error
    return list(r.ids)


def _tiers(c: StoreClient) -> list[str] | None:
    return {m["name"]: m["tiers"] for m in c.models()}.get("tiny")


def _evicted(c: StoreClient, tier: str) -> bool:
    try:
        return c.evict("tiny", tier) == [tier]
    except EntryInUse:  # the unloaded engine process has not exited yet
        return False


@pytest.mark.s3
@pytest.mark.triton
@pytest.mark.slow
def test_backend_through_the_store_serves_correct_tokens_after_each_tier_copy_is_corrupted(
    served: tuple[Any, Any, Path],
) -> None:
    store, triton, memory_root = served
    c: StoreClient = store.client()
    disk_root = store.root / "disk"
    triton.load_model("tiny")
    expected = _tokens(triton)  # from a copy verified as it arrived from the remote
    triton.unload_model("tiny")
    assert wait_until(lambda: _tiers(c) == ["memory", "disk"], 60)
    # the memory copy overwritten with zeros: the load gets the disk copy's bytes instead
    overwrite(big_partition(memory_root / "tiny"))
    disk_before = _metric(c.metrics(), "warmstart_store_transfers_total", source="disk")
    triton.load_model("tiny")
    assert _tokens(triton) == expected
    triton.unload_model("tiny")
    text = c.metrics()
    assert _metric(text, "warmstart_store_corrupt_copies_total", tier="memory") == 1
    assert _metric(text, "warmstart_store_transfers_total", source="disk") == disk_before + 1
    wf.open(memory_root / "tiny").verify()
    # the disk copy overwritten while only the disk tier holds the model: fetched from the remote again
    assert wait_until(lambda: _evicted(c, "memory"), 60)
    overwrite(big_partition(disk_root / "tiny"))
    remote_before = _metric(c.metrics(), "warmstart_store_transfers_total", source="remote")
    triton.load_model("tiny")
    assert _tokens(triton) == expected
    text = c.metrics()
    assert _metric(text, "warmstart_store_corrupt_copies_total", tier="disk") == 1
    assert _metric(text, "warmstart_store_transfers_total", source="remote") == remote_before + 1
    assert wait_until(lambda: _tiers(c) == ["memory", "disk"], 60)
    wf.open(disk_root / "tiny").verify()
    triton.unload_model("tiny")
