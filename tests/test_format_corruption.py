"""One test per defect: the reader rejects each with its own exception type, before trusting anything."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import warmstart.format as wf
from warmstart import errors
from warmstart.format import spec


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ck"
    wf.save(
        {
            "a": np.arange(3000, dtype=np.float32),
            "b": np.ones((10, 10), dtype=np.float16),
            "c": np.zeros(5, np.int8),
        },
        path,
        chunk_size=4096,
    )
    return path


def _edit(path: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads((path / "index.json").read_text())
    fn(raw)
    (path / "index.json").write_text(json.dumps(raw))


def test_truncated_partition_is_rejected_on_open(ckpt: Path) -> None:
    data = ckpt / "data-00000.bin"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(errors.TruncatedPartition, match="re-fetch or re-convert"):
        wf.open(ckpt)


def test_missing_partition_is_rejected_on_open(ckpt: Path) -> None:
    (ckpt / "data-00000.bin").unlink()
    with pytest.raises(errors.TruncatedPartition, match="missing"):
        wf.open(ckpt)


def test_flipped_byte_is_found_by_verify_which_names_the_chunk(ckpt: Path) -> None:
    data = ckpt / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[5000] ^= 0xFF  # chunk 1 of 4096-byte chunks
    data.write_bytes(bytes(raw))
    ck = wf.open(ckpt)  # sizes are right, so open succeeds; verify finds it
    with pytest.raises(errors.ChecksumMismatch, match="chunk 1") as ei:
        ck.verify()
    assert (ei.value.file, ei.value.chunk, ei.value.start, ei.value.end) == ("data-00000.bin", 1, 4096, 8192)


def test_offset_out_of_range_is_rejected(ckpt: Path) -> None:
    _edit(ckpt, lambda r: r["tensors"][2].update(offset=1 << 30))
    with pytest.raises(errors.OffsetOutOfRange):
        wf.open(ckpt)


def test_partition_number_out_of_range_is_rejected(ckpt: Path) -> None:
    _edit(ckpt, lambda r: r["tensors"][0].update(partition=3))
    with pytest.raises(errors.OffsetOutOfRange, match="partition 3"):
        wf.open(ckpt)


def test_overlapping_tensors_are_rejected(ckpt: Path) -> None:
    _edit(ckpt, lambda r: r["tensors"][1].update(offset=r["tensors"][0]["offset"]))
    with pytest.raises(errors.OverlappingTensors):
        wf.open(ckpt)


def test_misaligned_offset_is_rejected(ckpt: Path) -> None:
    _edit(ckpt, lambda r: r["tensors"][2].update(offset=r["tensors"][2]["offset"] + 8))
    with pytest.raises(errors.MisalignedOffset):
        wf.open(ckpt)


def test_size_shape_mismatch_is_rejected(ckpt: Path) -> None:
    _edit(ckpt, lambda r: r["tensors"][1].update(shape=[10, 11]))
    with pytest.raises(errors.SizeMismatch, match="needs 220 bytes"):
        wf.open(ckpt)


def test_unknown_dtype_is_rejected(ckpt: Path) -> None:
    _edit(ckpt, lambda r: r["tensors"][0].update(dtype="float128"))
    with pytest.raises(errors.UnknownDtype):
        wf.open(ckpt)


def test_unsupported_version_is_rejected(ckpt: Path) -> None:
    _edit(ckpt, lambda r: r.update(format_version=2))
    with pytest.raises(errors.UnsupportedVersion, match="upgrade warmstart"):
        wf.open(ckpt)


def test_oversized_index_is_rejected_before_parsing(ckpt: Path) -> None:
    with open(ckpt / "index.json", "r+b") as f:
        f.truncate(spec.MAX_INDEX_BYTES + 1)
    with pytest.raises(errors.IndexTooLarge):
        wf.open(ckpt)


def test_oversized_index_bytes_are_rejected_by_the_parser() -> None:
    with pytest.raises(errors.IndexTooLarge):
        wf.Index.from_json_bytes(b" " * (spec.MAX_INDEX_BYTES + 1))


@pytest.mark.parametrize(
    "name", ["../data-00000.bin", "/etc/passwd", "sub/data.bin", "..", ".hidden", "a\x00b", ""]
)
def test_unsafe_partition_file_name_is_rejected(ckpt: Path, name: str) -> None:
    _edit(ckpt, lambda r: r["partitions"][0].update(file=name))
    with pytest.raises(errors.UnsafeFileName):
        wf.open(ckpt)


@pytest.mark.parametrize(
    "name", ["", "x" * (spec.MAX_NAME_LENGTH + 1), "bad name", ".starts_with_dot", "nul\x00", "é"]
)
def test_invalid_tensor_name_is_rejected(ckpt: Path, name: str) -> None:
    _edit(ckpt, lambda r: r["tensors"][0].update(name=name))
    with pytest.raises(errors.InvalidTensorName):
        wf.open(ckpt)


def test_duplicate_tensor_name_is_rejected(ckpt: Path) -> None:
    _edit(ckpt, lambda r: r["tensors"][1].update(name="a"))
    with pytest.raises(errors.DuplicateTensorName):
        wf.open(ckpt)


def test_rank_over_limit_is_rejected(ckpt: Path) -> None:
    _edit(ckpt, lambda r: r["tensors"][2].update(shape=[1] * (spec.MAX_RANK + 1)))
    with pytest.raises(errors.LimitExceeded):
        wf.open(ckpt)


def test_negative_dimension_is_rejected(ckpt: Path) -> None:
    _edit(ckpt, lambda r: r["tensors"][2].update(shape=[-5]))
    with pytest.raises(errors.InvalidShape):
        wf.open(ckpt)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda r: r.pop("tensors"), id="missing-field"),
        pytest.param(lambda r: r.update(extra=1), id="unknown-field"),
        pytest.param(lambda r: r["tensors"][0].update(offset="0"), id="string-offset"),
        pytest.param(lambda r: r["tensors"][0].update(nbytes=True), id="bool-nbytes"),
        pytest.param(lambda r: r.update(format="safetensors"), id="wrong-format"),
        pytest.param(lambda r: r["partitions"][0]["chunks"].pop(), id="chunk-count"),
        pytest.param(lambda r: r.update(alignment=4000), id="bad-alignment"),
        pytest.param(lambda r: r.update(hash="md5"), id="unknown-hash"),
    ],
)
def test_malformed_index_is_rejected(ckpt: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    _edit(ckpt, mutate)
    with pytest.raises(errors.MalformedIndex):
        wf.open(ckpt)


def test_invalid_json_is_rejected(ckpt: Path) -> None:
    (ckpt / "index.json").write_bytes(b"{not json")
    with pytest.raises(errors.MalformedIndex, match="not valid UTF-8 JSON"):
        wf.open(ckpt)


def test_missing_index_means_no_checkpoint(tmp_path: Path, ckpt: Path) -> None:
    (ckpt / "index.json").unlink()
    with pytest.raises(errors.CheckpointNotFound, match=r"index\.json is missing"):
        wf.open(ckpt)
    with pytest.raises(errors.CheckpointNotFound):
        wf.open(tmp_path / "nowhere")


def test_every_corruption_error_shares_one_base_class() -> None:
    for exc in (
        errors.TruncatedPartition,
        errors.ChecksumMismatch,
        errors.OffsetOutOfRange,
        errors.OverlappingTensors,
        errors.MisalignedOffset,
        errors.SizeMismatch,
        errors.UnknownDtype,
        errors.UnsupportedVersion,
        errors.IndexTooLarge,
        errors.UnsafeFileName,
        errors.InvalidTensorName,
    ):
        assert issubclass(exc, errors.CorruptCheckpoint)
        assert issubclass(exc, errors.WarmstartError)


def test_unknown_tensor_name_raises_tensor_not_found(ckpt: Path) -> None:
    with pytest.raises(errors.TensorNotFound, match=r"no tensor 'zzz'"):
        wf.open(ckpt).read("zzz")
