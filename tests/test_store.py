"""The node store daemon, started for real over HTTP with SeaweedFS as its remote."""

from __future__ import annotations

import gc
import json
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import warmstart.format as wf
from tests.test_loaders_tiers import assert_equal, make_tensors, upload
from warmstart.errors import CacheFull, CheckpointNotFound, EntryInUse, InvalidModelName
from warmstart.format.index import Index
from warmstart.loaders import hostcache, pipeline
from warmstart.loaders.hostcache import wait_until
from warmstart.loaders.storeclient import StoreClient
from warmstart.loaders.tiers import DiskCopy, Tiers, wait_disk_copies
from warmstart.store.owner import StoreServer
from warmstart.store.service import NodeStore, StoreConfig

torch = pytest.importorskip("torch")
from warmstart.torch import load_state_dict  # noqa: E402

pytestmark = pytest.mark.s3
PREFIX = "s3://models/store-test"


@pytest.fixture(scope="module")
def models(seaweedfs: object, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, np.ndarray]]:
    d = tmp_path_factory.mktemp("store-src")
    out = {}
    for name, seed, scale in (("small-a", 1, 1), ("small-b", 2, 1), ("big", 3, 30)):
        tensors = make_tensors(seed, scale)
        wf.save(tensors, d / name, chunk_size=64 * 1024)
        upload(d / name, f"{PREFIX}/{name}/")
        out[name] = tensors
    return out


@pytest.fixture(scope="module")
def store(models: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreServer]:
    root = tmp_path_factory.mktemp("store")
    server = StoreServer(
        root=root / "root",
        remote=PREFIX,
        memory_capacity="4MiB",
        disk_capacity="64MiB",
        memory_root=root / "shm",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.is_alive()


def _metric(text: str, name: str, **labels: str) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(sel)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_store_ensures_loads_and_reports_inventory(store: StoreServer, models: dict[str, dict]) -> None:
    c = store.client()
    assert c.health()
    info = c.ensure("small-a", "memory")
    assert [(t["source"], t["targets"]) for t in info["transfers"]] == [("remote", ["memory"])]
    sd = load_state_dict("small-a", tiers=Tiers(store=store.url))
    assert_equal(sd, models["small-a"])
    # zero copy: the tensors view the store's memory-tier files
    maps = Path("/proc/self/maps").read_text()
    ptr = sd["layers.1.big"].data_ptr()
    owner = next(
        line
        for line in maps.splitlines()
        if int(line.split("-")[0], 16) <= ptr < int(line.split()[0].split("-")[1], 16)
    )
    assert f"{store.root.parent}/shm/small-a/data-" in owner
    # the disk copy follows in the background, from the memory tier
    assert wait_until(
        lambda: {m["name"]: m for m in c.models()}["small-a"]["tiers"] == ["memory", "disk"], 30
    )
    inv = {m["name"]: m for m in c.models()}
    assert inv["small-a"]["tier"] == "memory"
    assert inv["small-a"]["in_use"] and inv["small-a"]["bytes"] > 0
    bw = c.bandwidth()
    assert bw["memory_bps"] and bw["disk_bps"] and bw["remote_bps"]
    again = c.ensure("small-a", "memory")
    assert again["hit"] and again["transfers"] == []
    text = c.metrics()
    assert _metric(text, "warmstart_store_hits_total", tier="memory") >= 1
    assert _metric(text, "warmstart_store_misses_total", tier="memory") >= 1
    assert _metric(text, "warmstart_store_bytes", tier="memory") > 0
    assert "warmstart_store_load_seconds_bucket" in text


def test_concurrent_ensures_share_one_transfer(store: StoreServer) -> None:
    c = store.client()
    before = _metric(c.metrics(), "warmstart_store_transfers_total", source="remote")
    results: list[dict] = []
    ts = [threading.Thread(target=lambda: results.append(c.ensure("small-b", "disk"))) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(results) == 4 and sum(not r["hit"] for r in results) == 1
    assert _metric(c.metrics(), "warmstart_store_transfers_total", source="remote") == before + 1


def test_evict_and_refill_from_disk(store: StoreServer) -> None:
    c = store.client()
    c.ensure("small-b", "memory")
    gc.collect()
    assert c.evict("small-b", "memory") == ["memory"]
    assert {m["name"]: m["tiers"] for m in c.models()}["small-b"] == ["disk"]
    info = c.ensure("small-b", "memory")
    assert [t["source"] for t in info["transfers"]] == ["disk"]
    assert _metric(c.metrics(), "warmstart_store_evictions_total", tier="memory") >= 1


def test_evicting_a_model_in_use_is_refused(store: StoreServer) -> None:
    c = store.client()
    sd = load_state_dict("small-a", tiers=Tiers(store=store.url))
    with pytest.raises(EntryInUse):
        c.evict("small-a", "memory")
    del sd
    gc.collect()


def test_model_larger_than_memory_capacity_is_a_clear_507(store: StoreServer) -> None:
    with pytest.raises(CacheFull, match="capacity"):
        store.client().ensure("big", "memory")
    assert "big" not in {m["name"] for m in store.client().models() if "memory" in m["tiers"]}


def test_unknown_model_is_not_found(store: StoreServer) -> None:
    with pytest.raises(CheckpointNotFound):
        load_state_dict("no-such-model", tiers=Tiers(store=store.url))


@pytest.mark.parametrize("bad", ["..", "a%2F..%2Fb", ".hidden", "a..b", "x" * 129, "bad%20name"])
def test_bad_names_are_rejected_with_400_json(store: StoreServer, bad: str) -> None:
    req = urllib.request.Request(f"{store.url}/v1/models/{bad}/ensure?tier=memory", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400
    assert json.loads(e.value.read())["error"]["type"] == "InvalidModelName"


def test_client_rejects_bad_names_before_sending() -> None:
    with pytest.raises(InvalidModelName):
        StoreClient("http://127.0.0.1:1").ensure("../x")


def test_store_config_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        StoreConfig.from_args(
            root=str(tmp_path),
            remote="s3://b",
            memory_capacity="1G",
            disk_capacity="1G",
            listen="x",
            memory_root=None,
        )
    with pytest.raises(ValueError, match="URI"):
        StoreConfig(root=tmp_path, remote="/local", memory_capacity=1, disk_capacity=1)


# --- the store's logic in process, where a background disk copy can be held at a chosen point ---------------


def _node_store(tmp_path: Path) -> NodeStore:
    return NodeStore(
        StoreConfig(
            root=tmp_path / "root",
            remote=PREFIX,
            memory_capacity=4 * 1024**2,
            disk_capacity=64 * 1024**2,
            memory_root=tmp_path / "shm",
            probe=False,
        )
    )


@pytest.mark.parametrize(
    ("tier", "evicted", "left"),
    [("all", ["memory"], []), ("disk", [], ["memory"]), ("memory", ["memory"], ["disk"])],
)
def test_evict_during_the_background_disk_copy(
    models: object,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tier: str,
    evicted: list[str],
    left: list[str],
) -> None:
    """A reset evicts a model whose disk copy (memory → disk, after a remote load) is still being written.

    The eviction waits for the copy, cancelled when the disk tier is evicted: it then publishes nothing and
    leaves no temporary directory (it used to publish the disk entry after an eviction of ``disk`` had
    answered, and an eviction of ``all`` failed with 409 on the memory entry the copy holds).
    """
    copying, release = threading.Event(), threading.Event()
    real_copy = pipeline.local_copy

    def held_copy(src: Path, index: Index, dst: Path) -> float:
        copying.set()
        release.wait(60)
        return real_copy(src, index, dst)

    monkeypatch.setattr(pipeline, "local_copy", held_copy)
    ns = _node_store(tmp_path)
    try:
        assert [t["source"] for t in ns.ensure("small-a", "memory")["transfers"]] == ["remote"]
        assert copying.wait(30)  # the copy is writing into disk/.tmp/small-a.<id>
        (copy,) = DiskCopy.running("small-a", ns.tiers)
        assert [p.name.split(".")[0] for p in (ns.disk.root / ".tmp").iterdir()] == ["small-a"]
        result: list[list[str]] = []
        errors: list[BaseException] = []

        def evict() -> None:
            try:
                result.append(ns.evict("small-a", tier))
            except BaseException as e:
                errors.append(e)

        th = threading.Thread(target=evict)
        th.start()
        if tier != "memory":
            assert wait_until(lambda: copy.cancelled, 10)
        th.join(0.2)
        assert th.is_alive() and not errors  # the eviction waits for the copy
    finally:
        release.set()
    th.join(30)
    assert not errors and result == [evicted]
    assert copy.join(0) and copy.error is None
    assert wait_disk_copies(30) == []  # a cancelled copy is no failure
    assert list((ns.disk.root / ".tmp").iterdir()) == []  # nothing partial left
    assert {m["name"]: m["tiers"] for m in ns.inventory()} == ({"small-a": left} if left else {})
    # the copy let go of the disk tier's fill lock: the model can be brought back
    info = ns.ensure("small-a", "disk")
    assert info["hit"] == ("disk" in left) and ns.disk.contains("small-a")


def test_reserving_room_skips_a_fill_published_meanwhile(
    models: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fill directory that is renamed into place (or removed) while a reservation counts the bytes held in
    ``.tmp``: the count used to fail with FileNotFoundError on ``disk/.tmp/<key>.<id>`` (a 404 "not found"
    for the ensure of another model, or a failed /metrics)."""
    ns = _node_store(tmp_path)
    held = ns.disk.try_fill_lock("small-z")  # small-z is being filled (by a background copy, say)
    assert held is not None
    tmp = ns.disk.root / ".tmp" / "small-z.0123456789ab"
    real_dir_bytes = hostcache._dir_bytes

    def publishing() -> None:  # the fill's last step: ``reserved`` is gone, the rename comes next
        tmp.mkdir()
        (tmp / "data-00000.bin").write_bytes(b"x" * 4096)

    def publish_first(d: Path) -> int:
        if d == tmp:  # the rename lands between the listing of .tmp and this read
            os.rename(tmp, ns.disk.root / ".trash" / f"small-z.{os.urandom(6).hex()}")
        return real_dir_bytes(d)

    monkeypatch.setattr(hostcache, "_dir_bytes", publish_first)
    try:
        publishing()
        assert ns.disk.used_bytes() == 0
        publishing()
        assert "warmstart_store_bytes" in ns.metrics.render().decode()
        publishing()
        info = ns.ensure("small-b", "disk")
        assert [t["source"] for t in info["transfers"]] == ["remote"] and ns.disk.contains("small-b")
    finally:
        held.release()


def test_locate_maps_a_disk_only_model_from_disk_then_promotes_it_to_memory(
    models: dict[str, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from warmstart.store import service

    monkeypatch.setattr(service, "PROMOTE_DELAY_S", 0.3)
    ns = _node_store(tmp_path)
    ns.ensure("small-a", "disk")
    assert not ns.memory.contains("small-a")
    info = ns.locate("small-a")
    assert info["tier"] == "disk" and info["transfers"] == [] and info["root"] == str(ns.disk.root)
    assert not ns.memory.contains("small-a")  # not on the load's critical path
    assert {m["name"]: m for m in ns.inventory()}["small-a"]["promoting"]
    assert wait_until(lambda: ns.memory.contains("small-a"), 30)
    assert wait_until(lambda: not {m["name"]: m for m in ns.inventory()}["small-a"]["promoting"], 30)
    again = ns.locate("small-a")
    assert again["tier"] == "memory" and again["root"] == str(ns.memory.root)
    # a remote-only model is fetched into memory, as ensure?tier=memory does
    fetched = ns.locate("small-b")
    assert fetched["tier"] == "memory" and [t["source"] for t in fetched["transfers"]] == ["remote"]
    wait_disk_copies(30)


def test_evict_cancels_a_pending_promotion(
    models: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from warmstart.store import service

    monkeypatch.setattr(service, "PROMOTE_DELAY_S", 0.5)
    ns = _node_store(tmp_path)
    ns.ensure("small-a", "disk")
    assert ns.locate("small-a")["tier"] == "disk"
    assert ns.evict("small-a", "disk") == ["disk"]
    threading.Event().wait(1.0)  # past the promotion's delay
    assert not ns.memory.contains("small-a") and not ns.disk.contains("small-a")


def test_promotion_does_not_count_page_cache_reads_as_disk_bandwidth(
    models: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from warmstart.store import service

    monkeypatch.setattr(service, "PROMOTE_DELAY_S", 0.0)
    ns = _node_store(tmp_path)
    ns.ensure("small-a", "disk")
    before = ns.bandwidth()["disk_bps"]
    ns.locate("small-a")
    assert wait_until(lambda: ns.memory.contains("small-a"), 30)
    assert ns.bandwidth()["disk_bps"] == before


def test_disk_to_memory_copy_leaves_the_probed_disk_bandwidth_alone(models: object, tmp_path: Path) -> None:
    ns = _node_store(tmp_path)
    ns.ensure("small-a", "disk")
    assert ns.evict("small-a", "memory") in ([], ["memory"])
    before = ns.bandwidth()
    copied = ns.ensure("small-a", "memory")
    assert [t["source"] for t in copied["transfers"]] == ["disk"]
    assert ns.bandwidth()["disk_bps"] == before["disk_bps"]


def test_store_client_maps_a_disk_only_model_straight_from_the_disk_tier(
    store: StoreServer, models: dict[str, dict]
) -> None:
    c = store.client()
    c.ensure("small-b", "disk")
    gc.collect()
    if "memory" in {m["name"]: m["tiers"] for m in c.models()}["small-b"]:
        c.evict("small-b", "memory")
    host = c.open_host("small-b")
    assert host.tier == "disk" and host.transfers == []
    assert str(host.path).startswith(f"{store.root}/disk/")
    sd = load_state_dict("small-b", tiers=Tiers(store=store.url))
    assert_equal(sd, models["small-b"])
    with pytest.raises(EntryInUse):  # mapped: the disk entry is in use
        c.evict("small-b", "disk")
    del sd, host
    gc.collect()
