"""Round trips through the writer and reader for every dtype, shape kind and input framework."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import warmstart.format as wf
from warmstart.errors import CheckpointExists, InvalidTensorName, UnsupportedTensor
from warmstart.format import spec

NUMPY_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint64": np.uint64,
    "uint32": np.uint32,
    "uint16": np.uint16,
    "uint8": np.uint8,
    "bool": np.bool_,
}


def _sample(dtype: object, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(np.dtype(dtype))
        return rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def _assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def test_every_dtype_round_trips_bit_exactly(tmp_path: Path) -> None:
    tensors = {f"t.{name}": _sample(dt, (3, 5), i) for i, (name, dt) in enumerate(NUMPY_DTYPES.items())}
    wf.save(tensors, tmp_path / "ck")
    ck = wf.open(tmp_path / "ck")
    assert ck.names == list(tensors)
    for name, arr in tensors.items():
        _assert_same(ck.read(name), arr)
        assert ck.info(name).dtype == name.split(".", 1)[1]


def test_dtype_table_covers_the_spec() -> None:
    assert set(NUMPY_DTYPES) == set(spec.DTYPES)


def test_scalar_empty_and_noncontiguous_tensors_round_trip(tmp_path: Path) -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 7), dtype=np.int8),
        "empty_first": np.zeros((0,), dtype=np.float16),
        "transposed": base.T,
        "strided": base[::2, 1::3],
    }
    wf.save(tensors, tmp_path / "ck")
    ck = wf.open(tmp_path / "ck")
    for name, arr in tensors.items():
        got = ck.read(name)
        assert got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)
    assert ck.info("scalar").shape == ()


def test_torch_tensors_round_trip_including_bfloat16_and_float8(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    src = {
        "bf16": torch.randn(5, 3, dtype=torch.bfloat16),
        "bf16_t": torch.randn(4, 6, dtype=torch.bfloat16).t(),
        "f8": torch.randn(8).to(torch.float8_e4m3fn),
        "f8b": torch.randn(8).to(torch.float8_e5m2),
        "f16": torch.randn(2, 2, dtype=torch.float16),
        "i64": torch.arange(7),
        "b": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.0),
        "empty": torch.zeros(0, 3),
    }
    wf.save(src, tmp_path / "ck")
    ck = wf.open(tmp_path / "ck")
    for name, t in src.items():
        got = torch.from_numpy(ck.read(name).reshape(-1).view(np.uint8).copy())
        want = (
            t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8)
        )
        assert torch.equal(got.reshape(-1), want), name
        assert tuple(ck.info(name).shape) == tuple(t.shape)
    assert ck.info("bf16").dtype == "bfloat16"
    assert ck.info("f8").dtype == "float8_e4m3fn"


def test_jax_arrays_round_trip(tmp_path: Path) -> None:
    jnp = pytest.importorskip("jax.numpy")
    src = {"w": jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4), "s": jnp.float32(1.5), "e": jnp.zeros((0,))}
    wf.save(src, tmp_path / "ck")
    ck = wf.open(tmp_path / "ck")
    for name, a in src.items():
        _assert_same(ck.read(name), np.asarray(a))


def test_iterator_input_streams_tensors_in_order(tmp_path: Path) -> None:
    consumed: list[str] = []

    def gen():  # type: ignore[no-untyped-def]
        for i in range(5):
            consumed.append(f"l{i}")
            yield f"l{i}", np.full((10,), i, dtype=np.int32)

    wf.save(gen(), tmp_path / "ck")
    assert consumed == [f"l{i}" for i in range(5)]
    assert wf.open(tmp_path / "ck").names == consumed


def test_every_offset_is_aligned_and_partitions_respect_the_bound(tmp_path: Path) -> None:
    tensors = {f"w{i}": np.ones((3000 + i,), dtype=np.float32) for i in range(10)}
    idx = wf.save(tensors, tmp_path / "ck", partition_size=40_000)
    assert len(idx.partitions) > 1
    for t in idx.tensors:
        assert t.offset % spec.ALIGNMENT == 0
    for p in idx.partitions:
        assert p.size <= 40_000


def test_tensor_larger_than_partition_size_gets_its_own_partition(tmp_path: Path) -> None:
    idx = wf.save(
        {"a": np.ones(10, np.float32), "big": np.ones(5000, np.float32)}, tmp_path / "ck", partition_size=8192
    )
    assert [t.partition for t in idx.tensors] == [0, 1]
    assert idx.partitions[1].size == 20000


def test_model_files_are_stored_and_checksummed(tmp_path: Path) -> None:
    wf.save({"a": np.ones(3)}, tmp_path / "ck", files={"config.json": b'{"x": 1}'})
    ck = wf.open(tmp_path / "ck")
    assert json.loads(ck.read_file("config.json")) == {"x": 1}
    with pytest.raises(FileNotFoundError):
        ck.read_file("tokenizer.json")


def test_save_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    wf.save({"a": np.ones(3)}, tmp_path / "ck")
    with pytest.raises(CheckpointExists, match="overwrite"):
        wf.save({"a": np.zeros(3)}, tmp_path / "ck")
    wf.save({"b": np.zeros(3)}, tmp_path / "ck", overwrite=True)
    assert wf.open(tmp_path / "ck").names == ["b"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old dirs left


def test_save_rejects_bad_names_and_types_without_leaving_anything(tmp_path: Path) -> None:
    with pytest.raises(InvalidTensorName):
        wf.save({"../evil": np.ones(1)}, tmp_path / "ck")
    with pytest.raises(InvalidTensorName):
        wf.save([("a", np.ones(1)), ("a", np.ones(1))], tmp_path / "ck")
    with pytest.raises(UnsupportedTensor):
        wf.save({"a": [1, 2, 3]}, tmp_path / "ck")
    with pytest.raises(UnsupportedTensor):
        wf.save({"a": np.array(["x"])}, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_same_input_gives_same_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    tensors = {f"layer.{i}.w": rng.standard_normal((17, 33)).astype(np.float32) for i in range(4)}
    for d in ("a", "b"):
        wf.save(
            tensors,
            tmp_path / d,
            metadata={"source": "test", "nested": {"b": 1, "a": [1, 2]}},
            partition_size=8192,
        )
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_verify_passes_on_a_fresh_checkpoint(tmp_path: Path) -> None:
    wf.save({"a": np.arange(100_000, dtype=np.float32)}, tmp_path / "ck", chunk_size=8192)
    seen: list[int] = []
    wf.open(tmp_path / "ck").verify(progress=seen.append)
    assert sum(seen) == 400_000
