"""Byte sources behind one interface: the local fast path and TensorStore URIs (file:// and real S3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import warmstart.format as wf
from warmstart.errors import CheckpointNotFound, ChecksumMismatch, InvalidURI, UnsafeFileName
from warmstart.format.sources import LocalSource, TensorStoreSource, open_source
from warmstart.objectstore import SeaweedFS

TENSORS = {
    "emb": np.arange(40_000, dtype=np.float32).reshape(200, 200),
    "bias": np.linspace(-1, 1, 77).astype(np.float16),
    "s": np.array(5, dtype=np.int32),
}


def _save(path: Path) -> None:
    wf.save(TENSORS, path, files={"config.json": b'{"a": 1}'}, chunk_size=8192, partition_size=100_000)


def _upload(local: Path, uri: str) -> None:
    """Copy a local checkpoint to a URI, index.json last (the order the format requires)."""
    dst = TensorStoreSource(uri)
    names = sorted(p.name for p in local.iterdir() if p.name != "index.json")
    dst.write_many((n, (local / n).read_bytes()) for n in names)
    dst.write("index.json", (local / "index.json").read_bytes())


def _check_reads(ck: wf.Checkpoint) -> None:
    assert ck.names == list(TENSORS)
    for name, arr in TENSORS.items():
        np.testing.assert_array_equal(ck.read(name), arr)
    assert ck.read_file("config.json") == b'{"a": 1}'
    ck.verify()


def test_local_source_reads_exact_ranges_and_maps_files(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(bytes(range(256)) * 64)
    src = LocalSource(tmp_path)
    buf = bytearray(10)
    src.read_into("f.bin", 250, memoryview(buf))
    assert bytes(buf) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
    with src.mmap("f.bin") as m:
        assert m[256:260] == bytes([0, 1, 2, 3])
    with pytest.raises(OSError, match="truncated"):
        src.read_into("f.bin", 16380, memoryview(bytearray(10)))


def test_local_source_o_direct_reads_the_same_bytes(tmp_path: Path) -> None:
    _save(tmp_path / "ck")
    ck = wf.open(tmp_path / "ck", direct=True)
    for name, arr in TENSORS.items():
        np.testing.assert_array_equal(ck.read(name), arr)


def test_sources_refuse_names_that_leave_the_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UnsafeFileName):
        LocalSource(tmp_path).read("../etc/passwd")
    with pytest.raises(UnsafeFileName):
        TensorStoreSource(tmp_path.as_uri()).read("a/../../b")


def test_unknown_uri_scheme_is_rejected() -> None:
    with pytest.raises(InvalidURI, match="unsupported URI scheme"):
        open_source("ftp://host/ckpt")


def test_file_uri_goes_through_tensorstore_and_reads_the_same(tmp_path: Path) -> None:
    _save(tmp_path / "ck")
    ck = wf.open((tmp_path / "ck").as_uri())
    assert isinstance(ck.source, TensorStoreSource)
    _check_reads(ck)


@pytest.mark.s3
def test_s3_checkpoint_round_trips_through_seaweedfs(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    _save(tmp_path / "ck")
    _upload(tmp_path / "ck", "s3://models/format-sources/ck")
    _check_reads(wf.open("s3://models/format-sources/ck"))


@pytest.mark.s3
def test_s3_prefix_without_index_is_not_a_checkpoint(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    _save(tmp_path / "ck")
    dst = TensorStoreSource("s3://models/format-sources/half")
    dst.write("data-00000.bin", (tmp_path / "ck" / "data-00000.bin").read_bytes())
    with pytest.raises(CheckpointNotFound):
        wf.open("s3://models/format-sources/half")


@pytest.mark.s3
def test_s3_corruption_is_found_by_verify(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    _save(tmp_path / "ck")
    raw = bytearray((tmp_path / "ck" / "data-00000.bin").read_bytes())
    raw[9000] ^= 1
    (tmp_path / "ck" / "data-00000.bin").write_bytes(bytes(raw))
    _upload(tmp_path / "ck", "s3://models/format-sources/bad")
    with pytest.raises(ChecksumMismatch, match="chunk 1"):
        wf.open("s3://models/format-sources/bad").verify()
