"""The `warmstart` command line: exit codes, output, one-line errors; sizes and progress helpers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from warmstart.cli import main
from warmstart.errors import InvalidSize
from warmstart.format import open as open_checkpoint
from warmstart.format import save
from warmstart.progress import Progress
from warmstart.units import format_bytes, parse_size


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    tensors = {
        "embed.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "layers.0.w": rng.standard_normal((32, 32)).astype(np.float32),
        "ids": np.arange(5, dtype=np.int64),
    }
    path = tmp_path / "ckpt"
    save(tensors, path, metadata={"framework": "numpy"}, files={"config.json": b"{}"}, chunk_size=4096)
    return path


def test_inspect_prints_table_totals_partitions_files_and_metadata(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "name" in text and "partition" in text
    assert "layers.0.w" in text and "[32, 32]" in text and "4.00 KiB" in text
    assert "total: 3 tensors, 3,077 parameters" in text
    assert "data-00000.bin" in text
    assert "config.json" in text
    assert "framework: numpy" in text


def test_inspect_json_is_machine_readable(ckpt: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["inspect", "--json", str(ckpt)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["totals"]["tensors"] == 3
    assert doc["totals"]["parameters"] == 64 * 32 + 32 * 32 + 5
    assert [t["name"] for t in doc["tensors"]] == ["embed.weight", "layers.0.w", "ids"]
    assert doc["metadata"] == {"framework": "numpy"}


def test_verify_exits_zero_on_an_intact_checkpoint(ckpt: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["verify", str(ckpt)]) == 0
    assert "all checksums match" in capsys.readouterr().out


def test_verify_exits_one_and_names_the_bad_chunk_after_a_flipped_byte(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
):
    part = ckpt / "data-00000.bin"
    data = bytearray(part.read_bytes())
    data[2 * 4096 + 10] ^= 0x01  # chunk 2 (4 KiB chunks)
    part.write_bytes(bytes(data))
    assert main(["verify", "-q", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: checksum mismatch in data-00000.bin chunk 2 (bytes 8192-12288)")


def test_verify_of_a_truncated_partition_exits_one(ckpt: Path, capsys: pytest.CaptureFixture[str]):
    part = ckpt / "data-00000.bin"
    part.write_bytes(part.read_bytes()[:-100])
    assert main(["verify", str(ckpt)]) == 1
    assert "data-00000.bin" in capsys.readouterr().err


def test_missing_checkpoint_is_one_error_line_with_exit_two(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint at")
    assert err.count("\n") == 1


def test_convert_of_a_pickle_without_flag_explains_and_exits_two(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    import torch

    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    assert main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and "arbitrary code" in err
    assert main(["convert", "-q", "--allow-pickle", str(tmp_path / "model.pt"), str(tmp_path / "out")]) == 0
    assert open_checkpoint(tmp_path / "out").names == ["w"]


def test_convert_with_dtype_and_partition_size_then_export(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "bf16"
    assert main(["convert", str(ckpt), str(out), "--dtype", "bf16", "--partition-size", "4KiB"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "3 tensors" in captured.out
    assert "convert:" in captured.err and "MB/s" in captured.err
    c = open_checkpoint(out)
    assert c.info("embed.weight").dtype == "bfloat16"
    assert c.info("ids").dtype == "int64"
    assert len(c.index.partitions) == 3
    assert main(["export", str(out), "--to", "safetensors", str(tmp_path / "st"), "-q"]) == 0
    assert (tmp_path / "st" / "model.safetensors").is_file()
    assert (tmp_path / "st" / "config.json").read_bytes() == b"{}"


def test_convert_to_an_existing_destination_needs_overwrite(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["convert", "-q", str(ckpt), str(ckpt)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", "-q", "--overwrite", "--dtype", "fp16", str(ckpt), str(ckpt)]) == 0
    assert open_checkpoint(ckpt).info("layers.0.w").dtype == "float16"


def test_bad_partition_size_is_a_usage_error(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(ckpt), str(tmp_path / "x"), "--partition-size", "lots"])
    assert e.value.code == 2
    assert "invalid size value: 'lots'" in capsys.readouterr().err


def test_cli_errors_never_print_a_traceback(tmp_path: Path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "index.json").write_text("{not json")
    proc = subprocess.run(
        [sys.executable, "-m", "warmstart.cli", "inspect", str(tmp_path / "junk")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: index.json is not valid UTF-8 JSON")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("512MiB", 512 * 1024**2),
        ("1G", 1024**3),
        ("1g", 1024**3),
        ("1GB", 10**9),
        ("1.5 GiB", 3 * 1024**3 // 2),
        ("64k", 65536),
        ("10B", 10),
    ],
)
def test_parse_size_accepts_units(text: str, expected: int):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "1XB", "-5", "0", "1e9"])
def test_parse_size_rejects_malformed_sizes(text: str):
    with pytest.raises(InvalidSize):
        parse_size(text)


def test_format_bytes_is_human_readable():
    assert format_bytes(0) == "0 B"
    assert format_bytes(4096) == "4.00 KiB"
    assert format_bytes(1.5 * 1024**3) == "1.50 GiB"
    assert format_bytes(300 * 1024**2) == "300.0 MiB"


def test_progress_off_a_terminal_prints_only_a_summary_line():
    stream = io.StringIO()
    with Progress("verify", 1000, stream=stream) as p:
        for _ in range(20):
            p(50)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("verify: 1000 B in ") and "MB/s" in lines[0]


def test_progress_on_a_terminal_shows_percent_and_rate():
    stream = io.StringIO()
    p = Progress("convert", 1000, stream=stream, live=True)
    p(500)
    assert "50.0%" in p.status_line() and "MB/s" in p.status_line()
    p.close()
    assert stream.getvalue().endswith("\n")


def test_progress_quiet_prints_nothing():
    stream = io.StringIO()
    with Progress("convert", 10, stream=stream, quiet=True) as p:
        p(10)
    assert stream.getvalue() == ""
