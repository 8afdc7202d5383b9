"""LoRA adapter checkpoints (docs/format.md section 10): conversion from PEFT directories, golden bytes,
refusals of what the engines cannot apply, bad input, the reader, base compatibility, inspect and S3."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from warmstart.errors import ConversionError, CorruptCheckpoint, InvalidSource
from warmstart.format import open as open_checkpoint
from warmstart.format import save
from warmstart.format.convert import convert, detect
from warmstart.format.lora import (
    AdapterKeyMismatch,
    AdapterRankMismatch,
    IncompatibleBase,
    MalformedAdapterMetadata,
    MissingAdapterFile,
    NotAnAdapter,
    UnsupportedAdapter,
    check_compatible,
    read_adapter,
)

P = "base_model.model.model.layers"
CONFIG: dict[str, Any] = {
    "peft_type": "LORA",
    "base_model_name_or_path": "tiny/base",
    "r": 2,
    "lora_alpha": 4,
    "use_rslora": False,
    "target_modules": ["down_proj", "q_proj"],
    "rank_pattern": {"down_proj": 1},
    "alpha_pattern": {},
    "fan_in_fan_out": False,
    "bias": "none",
}


def _weights() -> dict[str, np.ndarray]:
    def f(n: int, shape: tuple[int, int]) -> np.ndarray:
        return (np.arange(shape[0] * shape[1], dtype=np.float32) + n).reshape(shape)

    return {
        f"{P}.0.mlp.down_proj.lora_A.weight": f(10, (1, 4)),
        f"{P}.0.mlp.down_proj.lora_B.weight": f(20, (3, 1)),
        f"{P}.0.self_attn.q_proj.lora_A.weight": f(0, (2, 3)),
        f"{P}.0.self_attn.q_proj.lora_B.weight": f(100, (3, 2)),
    }


def _adapter(
    d: Path, config: dict[str, Any] | None = None, weights: dict[str, np.ndarray] | None = None, **over: Any
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {**(CONFIG if config is None else config), **over}
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(_weights() if weights is None else weights, str(d / "adapter_model.safetensors"))
    return d


GOLDEN_INDEX = """{
  "format": "warmstart",
  "format_version": 1,
  "alignment": 4096,
  "chunk_size": 16777216,
  "hash": "xxh3_64",
  "partitions": [
    {"file": "data-00000.bin", "size": 12300, "chunks": ["a8f2ada68daf9e89"]}
  ],
  "tensors": [
    {"name": "layers.0.q_proj.lora_A", "dtype": "float32", "shape": [2, 3], "partition": 0, "offset": 0, "nbytes": 24},
    {"name": "layers.0.q_proj.lora_B", "dtype": "float32", "shape": [3, 2], "partition": 0, "offset": 4096, "nbytes": 24},
    {"name": "layers.0.down_proj.lora_A", "dtype": "float32", "shape": [1, 4], "partition": 0, "offset": 8192, "nbytes": 16},
    {"name": "layers.0.down_proj.lora_B", "dtype": "float32", "shape": [3, 1], "partition": 0, "offset": 12288, "nbytes": 12}
  ],
  "files": [
    {"name": "adapter_config.json", "size": 289, "xxh3": "c90bad8d8bd068c9"}
  ],
  "metadata": {
    "adapter": {
      "alpha_pattern": {},
      "base_model": "tiny/base",
      "fan_in_fan_out": false,
      "kind": "lora",
      "layers": [
        0
      ],
      "lora_alpha": 4,
      "modules": [
        {
          "alpha": 4,
          "layer": 0,
          "rank": 2,
          "scaling": 2.0,
          "target": "q_proj"
        },
        {
          "alpha": 4,
          "layer": 0,
          "rank": 1,
          "scaling": 4.0,
          "target": "down_proj"
        }
      ],
      "r": 2,
      "rank_pattern": {
        "down_proj": 1
      },
      "targets": {
        "down_proj": {
          "in_features": 4,
          "out_features": 3
        },
        "q_proj": {
          "in_features": 3,
          "out_features": 3
        }
      },
      "use_rslora": false,
      "version": 1
    },
    "dtype": "float32",
    "framework": "peft",
    "source_kind": "peft-lora",
    "source_path": "@SOURCE@"
  }
}
"""


def test_tiny_adapter_converts_to_golden_index_and_bytes(tmp_path: Path) -> None:
    src = _adapter(tmp_path / "adapter")
    convert(src, tmp_path / "ck")
    config = (src / "adapter_config.json").read_bytes()
    data = bytearray(12300)
    data[0:24] = struct.pack("<6f", *range(6))
    data[4096:4120] = struct.pack("<6f", *range(100, 106))
    data[8192:8208] = struct.pack("<4f", *range(10, 14))
    data[12288:12300] = struct.pack("<3f", *range(20, 23))
    assert (tmp_path / "ck" / "data-00000.bin").read_bytes() == bytes(data)
    golden = GOLDEN_INDEX.replace("@SOURCE@", str(src.resolve()))
    assert (tmp_path / "ck" / "index.json").read_text() == golden
    assert (tmp_path / "ck" / "adapter_config.json").read_bytes() == config
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "adapter_config.json",
        "data-00000.bin",
        "index.json",
    ]


def test_conversion_is_deterministic_and_ignores_safetensors_key_order(tmp_path: Path) -> None:
    convert(_adapter(tmp_path / "a"), tmp_path / "ck-a")
    reordered = dict(reversed(list(_weights().items())))
    convert(_adapter(tmp_path / "b", weights=reordered), tmp_path / "ck-b")
    for name in ("data-00000.bin", "adapter_config.json"):
        assert (tmp_path / "ck-a" / name).read_bytes() == (tmp_path / "ck-b" / name).read_bytes()


def test_read_adapter_returns_ranks_scalings_targets_and_the_matrices(tmp_path: Path) -> None:
    convert(_adapter(tmp_path / "a", use_rslora=True, alpha_pattern={"q_proj": 3}), tmp_path / "ck")
    ad = read_adapter(tmp_path / "ck", verify=True)
    assert ad.base_model == "tiny/base"
    assert ad.r == 2 and ad.lora_alpha == 4 and ad.use_rslora and not ad.fan_in_fan_out
    assert list(ad.targets) == ["q_proj", "down_proj"]
    assert (ad.targets["down_proj"].in_features, ad.targets["down_proj"].out_features) == (4, 3)
    assert ad.ranks == {(0, "q_proj"): 2, (0, "down_proj"): 1}
    assert ad.scalings == {(0, "q_proj"): 3 / 2**0.5, (0, "down_proj"): 4.0}
    q = ad.module(0, "q_proj")
    assert q is not None
    np.testing.assert_array_equal(q.a, _weights()[f"{P}.0.self_attn.q_proj.lora_A.weight"])
    np.testing.assert_array_equal(q.b, _weights()[f"{P}.0.self_attn.q_proj.lora_B.weight"])
    assert not q.a.flags.writeable and not q.a.flags.owndata  # a view of the mapped partition
    assert ad.module(1, "q_proj") is None and ad.module(0, "v_proj") is None
    assert ad.nbytes == 24 + 24 + 16 + 12 and ad.max_rank == 2 and ad.dtype == "float32"


def test_target_modules_regex_and_phi3_fused_targets_convert(tmp_path: Path) -> None:
    w = {
        f"{P}.1.self_attn.qkv_proj.lora_A.weight": np.ones((2, 4), np.float32),
        f"{P}.1.self_attn.qkv_proj.lora_B.weight": np.ones((8, 2), np.float32),
        f"{P}.1.mlp.gate_up_proj.lora_A.weight": np.ones((2, 4), np.float32),
        f"{P}.1.mlp.gate_up_proj.lora_B.weight": np.ones((12, 2), np.float32),
    }
    cfg = {**CONFIG, "target_modules": r".*\.(qkv_proj|gate_up_proj)", "rank_pattern": {}}
    convert(_adapter(tmp_path / "a", cfg, w), tmp_path / "ck")
    ad = read_adapter(tmp_path / "ck")
    assert list(ad.targets) == ["qkv_proj", "gate_up_proj"] and list(ad.layers) == [1]
    phi3 = {
        "model_type": "phi3",
        "hidden_size": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 6,
        "num_hidden_layers": 2,
    }
    check_compatible(ad, phi3)  # qkv: 4 -> (2 + 2*1) * 2 = 8; gate_up: 4 -> 2 * 6
    with pytest.raises(IncompatibleBase, match="the base has no qkv_proj"):
        check_compatible(ad, {**phi3, "model_type": "llama"})


def test_target_modules_given_as_dotted_suffixes_match_as_peft_matches_them(tmp_path: Path) -> None:
    convert(_adapter(tmp_path / "a", target_modules=["self_attn.q_proj", "mlp.down_proj"]), tmp_path / "ck")
    assert list(read_adapter(tmp_path / "ck").targets) == ["q_proj", "down_proj"]
    with pytest.raises(AdapterKeyMismatch, match="not in the config's target_modules"):
        convert(
            _adapter(tmp_path / "b", target_modules=["self_attn.q_proj", "self_attn.down_proj"]),
            tmp_path / "x",
        )


def test_adapter_cast_to_bfloat16_reads_back_in_bfloat16(tmp_path: Path) -> None:
    convert(_adapter(tmp_path / "a"), tmp_path / "ck", dtype="bf16")
    ad = read_adapter(tmp_path / "ck")
    q = ad.module(0, "q_proj")
    assert ad.dtype == "bfloat16" and q is not None and q.a.dtype.name == "bfloat16"
    np.testing.assert_array_equal(q.a.astype(np.float32), _weights()[f"{P}.0.self_attn.q_proj.lora_A.weight"])


# --- what the engines cannot apply -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "PREFIX_TUNING"}, "peft_type 'PREFIX_TUNING'"),
        ({"peft_type": "PROMPT_TUNING"}, "peft_type 'PROMPT_TUNING'"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
        ({"peft_type": "LOKR"}, "peft_type 'LOKR'"),
        ({"bias": "lora_only"}, "bias 'lora_only'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"lora_bias": True}, "bias on lora_B"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens: embedding LoRA"),
        ({"target_modules": ["q_proj", "lm_head"]}, "targets lm_head"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa'"),
        ({"some_future_option": {"x": 1}}, "sets some_future_option"),
    ],
)
def test_unsupported_adapter_kinds_are_refused_naming_what_is_supported(
    tmp_path: Path, override: dict[str, Any], match: str
) -> None:
    src = _adapter(tmp_path / "a", **override)
    with pytest.raises(UnsupportedAdapter, match=match) as info:
        convert(src, tmp_path / "ck")
    assert "supported" in str(info.value) or "plain LoRA" in str(info.value)
    assert isinstance(info.value, ConversionError)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding LoRA"),
        (f"{P}.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
        ("base_model.model.lm_head.lora_A.weight", "LoRA on lm_head"),
    ],
)
def test_unsupported_weights_in_the_safetensors_are_refused(tmp_path: Path, key: str, match: str) -> None:
    w = {**_weights(), key: np.zeros((2, 3), np.float32)}
    with pytest.raises(UnsupportedAdapter, match=match):
        convert(_adapter(tmp_path / "a", weights=w), tmp_path / "ck")


# --- bad input --------------------------------------------------------------------------------------------


def test_missing_adapter_files_are_named(tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a")
    (src / "adapter_model.safetensors").unlink()
    assert detect(src) == "peft-lora"
    with pytest.raises(MissingAdapterFile, match=r"no adapter_model.safetensors"):
        convert(src, tmp_path / "ck")
    (src / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(InvalidSource, match=r"adapter_model.bin .a pickle."):
        convert(src, tmp_path / "ck")
    src2 = _adapter(tmp_path / "b")
    (src2 / "adapter_config.json").unlink()
    with pytest.raises(MissingAdapterFile, match=r"has no adapter_config.json"):
        convert(src2, tmp_path / "ck")


def test_weights_that_do_not_match_the_config_targets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterKeyMismatch, match=r"targets v_proj, but .* has no LoRA weights for it"):
        convert(_adapter(tmp_path / "a", target_modules=["q_proj", "down_proj", "v_proj"]), tmp_path / "ck")
    with pytest.raises(AdapterKeyMismatch, match="down_proj is not in the config's target_modules"):
        convert(_adapter(tmp_path / "b", target_modules=["q_proj"]), tmp_path / "ck")
    w = _weights()
    del w[f"{P}.0.mlp.down_proj.lora_B.weight"]
    with pytest.raises(AdapterKeyMismatch, match=r"lora_A but no lora_B for model.layers.0.mlp.down_proj"):
        convert(_adapter(tmp_path / "c", weights=w), tmp_path / "ck")
    w = {
        **_weights(),
        "base_model.model.model.layers.0.self_attn.q_proj.weight": np.zeros((3, 3), np.float32),
    }
    with pytest.raises(AdapterKeyMismatch, match="not a LoRA weight of a decoder layer"):
        convert(_adapter(tmp_path / "d", weights=w), tmp_path / "ck")


def test_rank_mismatches_are_refused(tmp_path: Path) -> None:
    w = _weights()
    w[f"{P}.0.self_attn.q_proj.lora_B.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(AdapterRankMismatch, match=r"lora_A of rank 2 .* but lora_B of rank 3"):
        convert(_adapter(tmp_path / "a", weights=w), tmp_path / "ck")
    with pytest.raises(AdapterRankMismatch, match="q_proj has rank 2, but the config gives it r = 4"):
        convert(_adapter(tmp_path / "b", r=4), tmp_path / "ck")
    with pytest.raises(AdapterRankMismatch, match="down_proj has rank 1, but the config gives it r = 2"):
        convert(_adapter(tmp_path / "c", rank_pattern={}), tmp_path / "ck")


def test_cli_reports_bad_adapters_in_one_line_without_traceback(tmp_path: Path) -> None:
    src = _adapter(tmp_path / "a", use_dora=True)
    proc = subprocess.run(
        [sys.executable, "-m", "warmstart.cli", "convert", str(src), str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "DoRA" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_conversion_that_fails_midway_leaves_nothing_behind(tmp_path: Path) -> None:
    from warmstart.format.convert import open_model_source

    src = _adapter(tmp_path / "a")
    source = open_model_source(src)
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated after its header was checked
    with pytest.raises(InvalidSource, match="changed while it was being converted"):
        convert(source, tmp_path / "out" / "ck")
    assert list((tmp_path / "out").iterdir()) == []  # no checkpoint, no temporary directory


# --- reading converted adapters -----------------------------------------------------------------------------


def test_read_adapter_refuses_a_checkpoint_that_is_not_an_adapter(tmp_path: Path) -> None:
    save({"w": np.zeros(3, np.float32)}, tmp_path / "ck")
    with pytest.raises(NotAnAdapter, match="not a LoRA adapter checkpoint"):
        read_adapter(tmp_path / "ck")


def _resave(src: Path, dst: Path, mutate: Any) -> None:
    ck = open_checkpoint(src)
    meta = json.loads(json.dumps(ck.metadata))
    tensors = {n: ck.read(n) for n in ck.names}
    mutate(meta["adapter"], tensors)
    save(tensors, dst, metadata=meta)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a, t: a["modules"][0].update(scaling=1.0), "scaling 1.0, but alpha 4 and rank 2 make 2.0"),
        (lambda a, t: a["targets"]["q_proj"].update(in_features=5), r"implies shape \[2, 5\]"),
        (lambda a, t: t.update(extra=np.zeros(1, np.float32)), "does not list the tensors"),
        (lambda a, t: a.update(kind="ia3"), "kind 'ia3'"),
        (lambda a, t: a.pop("modules"), "missing fields"),
        (lambda a, t: a["modules"].reverse(), "out of .layer, target. order"),
    ],
)
def test_read_adapter_refuses_metadata_that_contradicts_the_tensors(
    tmp_path: Path, mutate: Any, match: str
) -> None:
    convert(_adapter(tmp_path / "a"), tmp_path / "ck")
    _resave(tmp_path / "ck", tmp_path / "bad", mutate)
    with pytest.raises(MalformedAdapterMetadata, match=match) as info:
        read_adapter(tmp_path / "bad")
    assert isinstance(info.value, CorruptCheckpoint)


def test_check_compatible_names_every_mismatch(tmp_path: Path) -> None:
    convert(_adapter(tmp_path / "a"), tmp_path / "ck")
    ad = read_adapter(tmp_path / "ck")
    base = {"hidden_size": 3, "num_attention_heads": 1, "intermediate_size": 4, "num_hidden_layers": 1}
    check_compatible(ad, base)
    check_compatible(ad, {"text_config": base})  # multimodal configs nest the text model
    with pytest.raises(
        IncompatibleBase,
        match=r"trained for tiny/base.*q_proj maps 3 -> 3 features in the "
        r"adapter but 6 -> 6 in the base.*down_proj maps 4 -> 3 .* but 4 -> 6",
    ):
        check_compatible(ad, {**base, "hidden_size": 6, "num_attention_heads": 2})
    with pytest.raises(IncompatibleBase, match="no positive integer intermediate_size"):
        check_compatible(ad, {k: v for k, v in base.items() if k != "intermediate_size"})
    convert(
        _adapter(tmp_path / "b", weights={k.replace(".0.", ".3."): v for k, v in _weights().items()}),
        tmp_path / "ck3",
    )
    with pytest.raises(IncompatibleBase, match="adapts layer 3, the base has 1 layers"):
        check_compatible(read_adapter(tmp_path / "ck3"), base)


# --- inspect ----------------------------------------------------------------------------------------------


def test_inspect_shows_base_ranks_alpha_targets_layers_and_size(tmp_path: Path) -> None:
    from warmstart.cli import main

    convert(_adapter(tmp_path / "a"), tmp_path / "ck")
    run = subprocess.run(
        [sys.executable, "-m", "warmstart.cli", "inspect", str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "LoRA adapter for tiny/base" in run.stdout
    assert "rank 1-2, alpha 4.0, scaling 2.0-4.0" in run.stdout
    assert "targets: q_proj, down_proj" in run.stdout
    assert "1 layer(s), 2 module(s), 19 parameters, 76 B" in run.stdout
    js = subprocess.run(
        [sys.executable, "-m", "warmstart.cli", "inspect", "--json", str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    summary = json.loads(js.stdout)["adapter"]
    assert summary == {
        "kind": "lora",
        "base_model": "tiny/base",
        "ranks": [1, 2],
        "alphas": [4.0],
        "use_rslora": False,
        "scalings": [2.0, 4.0],
        "targets": ["q_proj", "down_proj"],
        "layers": 1,
        "modules": 2,
        "parameters": 19,
        "tensor_bytes": 76,
    }
    save({"w": np.zeros(3, np.float32)}, tmp_path / "plain")
    assert main(["inspect", "--json", str(tmp_path / "plain")]) == 0  # no adapter section: none shown


# --- S3 ---------------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_adapter_round_trips_through_seaweedfs(tmp_path: Path, seaweedfs: Any) -> None:
    uri = "s3://models/test-lora/adapter"
    convert(_adapter(tmp_path / "a"), uri)
    convert(_adapter(tmp_path / "b"), tmp_path / "ck")
    local = read_adapter(tmp_path / "ck")
    remote = read_adapter(uri)
    assert remote.location.startswith("s3://") and remote.ranks == local.ranks
    assert remote.scalings == local.scalings and remote.targets == local.targets
    for m in local.modules:
        r = remote.module(m.layer, m.target)
        assert r is not None
        np.testing.assert_array_equal(r.a, m.a)
        np.testing.assert_array_equal(r.b, m.b)
    open_checkpoint(uri).verify()
