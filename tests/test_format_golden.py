"""The byte layout is pinned: a tiny checkpoint must come out byte for byte as the spec says."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

import warmstart.format as wf

GOLDEN_INDEX = """{
  "format": "warmstart",
  "format_version": 1,
  "alignment": 4096,
  "chunk_size": 4096,
  "hash": "xxh3_64",
  "partitions": [
    {"file": "data-00000.bin", "size": 8200, "chunks": ["f4c31e87346ffcec", "6034b6262e7593ab", "81671e58d6b596af"]}
  ],
  "tensors": [
    {"name": "embed.weight", "dtype": "float32", "shape": [2, 3], "partition": 0, "offset": 0, "nbytes": 24},
    {"name": "norm.bias", "dtype": "int16", "shape": [2], "partition": 0, "offset": 4096, "nbytes": 4},
    {"name": "step", "dtype": "int64", "shape": [], "partition": 0, "offset": 8192, "nbytes": 8}
  ],
  "files": [
    {"name": "config.json", "size": 2, "xxh3": "1349cde127705c16"}
  ],
  "metadata": {
    "source": "golden"
  }
}
"""


def _write_golden(path: Path) -> None:
    wf.save(
        {
            "embed.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
            "norm.bias": np.array([1, -2], dtype=np.int16),
            "step": np.array(7, dtype=np.int64),
        },
        path,
        metadata={"source": "golden"},
        files={"config.json": b"{}"},
        chunk_size=4096,
    )


def test_tiny_checkpoint_matches_golden_bytes(tmp_path: Path) -> None:
    _write_golden(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json",
        "data-00000.bin",
        "index.json",
    ]
    assert (tmp_path / "ck" / "index.json").read_text() == GOLDEN_INDEX
    expected = bytearray(8200)
    expected[0:24] = struct.pack("<6f", 0, 1, 2, 3, 4, 5)
    expected[4096:4100] = struct.pack("<2h", 1, -2)
    expected[8192:8200] = struct.pack("<q", 7)
    assert (tmp_path / "ck" / "data-00000.bin").read_bytes() == bytes(expected)
    assert (tmp_path / "ck" / "config.json").read_bytes() == b"{}"


def test_golden_checkpoint_reads_back(tmp_path: Path) -> None:
    _write_golden(tmp_path / "ck")
    ck = wf.open(tmp_path / "ck")
    ck.verify()
    assert ck.read("step").item() == 7
    assert ck.metadata == {"source": "golden"}
