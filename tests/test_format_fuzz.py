"""Fuzzing the index parser: any input either parses or raises a CorruptCheckpoint subclass."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from warmstart.errors import CorruptCheckpoint
from warmstart.format import Index

VALID: dict[str, Any] = {
    "format": "warmstart",
    "format_version": 1,
    "alignment": 4096,
    "chunk_size": 4096,
    "hash": "xxh3_64",
    "partitions": [{"file": "data-00000.bin", "size": 8200, "chunks": ["0" * 16] * 3}],
    "tensors": [
        {"name": "a", "dtype": "float32", "shape": [2, 3], "partition": 0, "offset": 0, "nbytes": 24},
        {"name": "b", "dtype": "int16", "shape": [2], "partition": 0, "offset": 4096, "nbytes": 4},
    ],
    "files": [],
    "metadata": {},
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def _parse(data: bytes) -> None:
    with contextlib.suppress(CorruptCheckpoint):
        Index.from_json_bytes(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_parser_never_crashes_on_arbitrary_bytes(data: bytes) -> None:
    _parse(data)


@settings(max_examples=400, deadline=None)
@given(
    path=st.sampled_from(
        [
            ("format_version",),
            ("alignment",),
            ("chunk_size",),
            ("partitions", 0, "size"),
            ("partitions", 0, "file"),
            ("partitions", 0, "chunks"),
            ("tensors", 0, "shape"),
            ("tensors", 0, "offset"),
            ("tensors", 1, "nbytes"),
            ("tensors", 1, "dtype"),
            ("tensors", 0, "name"),
            ("tensors", 1, "partition"),
            ("files",),
            ("metadata",),
            ("tensors",),
            ("partitions",),
        ]
    ),
    value=json_values,
)
def test_parser_never_crashes_on_mutated_fields(path: tuple[Any, ...], value: Any) -> None:
    doc = json.loads(json.dumps(VALID))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    _parse(json.dumps(doc).encode())
