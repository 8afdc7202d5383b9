"""A family's Hugging Face directory (``save_pretrained`` + tokenizer files) goes through ``warmstart convert``
with every tokenizer/config file intact, and the converted checkpoint serves from the compact torch engine
with no transformers import: a fresh process loads it as the backend does (`Runtime.load`), renders the
family's chat template and generates greedily; the tokens equal transformers' greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from backend_support import byte_tokenizer_json  # noqa: E402
from engine_families import FAMILIES, random_model  # noqa: E402

from warmstart.format import open as open_checkpoint  # noqa: E402
from warmstart.format.convert import convert  # noqa: E402

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
BYTE_VOCAB = 256  # byte_tokenizer_json: one token per byte
PROMPT = "Hi there"
NEW_TOKENS = 6

# family -> (its chat template, the extra tokenizer files its Hub directory ships)
CASES: dict[str, tuple[str, dict[str, bytes]]] = {
    # Gemma ships the SentencePiece model beside tokenizer.json
    "gemma2-softcap-tied": ("google-gemma-2-9b-it.jinja", {"tokenizer.model": b"\x0a\x0bsentencepiece"}),
    "phi3-fused-longrope-sliding": ("microsoft-Phi-3.5-mini-instruct.jinja", {"added_tokens.json": b"{}"}),
    # Qwen ships the BPE vocab and merges beside tokenizer.json
    "qwen3-qk-norm-untied": (
        "Qwen-Qwen3-0.6B.jinja",
        {"vocab.json": b'{"a": 0}', "merges.txt": b"#version: 0.2\n"},
    ),
}

SERVE = textwrap.dedent(
    """
    import json, sys
    from warmstart.backend.runtime import Runtime
    from warmstart.engines import SamplingParams
    from warmstart.engines.torch_llama import TorchLlamaEngine
    from warmstart.tritonconfig import ModelSettings

    rt = Runtime.load(ModelSettings(checkpoint=sys.argv[1], engine="torch", max_batch=2), warmup=False)
    prompt = rt.chat_prompt([{"role": "user", "content": "Hi"}])
    ids = rt.encode(sys.argv[2])
    out, reason = rt.generator.generate(ids, SamplingParams(max_tokens=int(sys.argv[3])))
    rt.close()
    print(json.dumps({
        "engine": type(rt.engine).__name__,
        "compact": isinstance(rt.engine, TorchLlamaEngine),
        "prompt_ids": ids,
        "tokens": out,
        "reason": reason,
        "chat_prompt": prompt,
        "transformers_imported": "transformers" in sys.modules,
    }))
    """
)


def _hf_dir(name: str, dest: Path) -> tuple[Any, dict[str, bytes]]:
    """Save the family's tiny model as a Hub-like directory; return it and the non-weight files written."""
    template, extra = CASES[name]
    model = random_model(FAMILIES[name], vocab_size=BYTE_VOCAB)
    model.save_pretrained(dest, safe_serialization=True)
    files = {
        "tokenizer.json": byte_tokenizer_json().encode(),
        "tokenizer_config.json": json.dumps({"add_bos_token": False, "model_max_length": 64}).encode(),
        "special_tokens_map.json": b"{}",
        "chat_template.jinja": (TEMPLATES / template).read_bytes(),
        "generation_config.json": json.dumps({"do_sample": False}).encode(),
        **extra,
    }
    for fname, data in files.items():
        (dest / fname).write_bytes(data)
    files["config.json"] = (dest / "config.json").read_bytes()
    return model, files


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_converted_family_checkpoint_serves_from_the_compact_engine_without_transformers(
    name: str, tmp_path: Path
) -> None:
    model, files = _hf_dir(name, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    for fname, data in files.items():
        assert ckpt.read_file(fname) == data, f"{fname} did not come through the conversion"

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-c", SERVE, str(tmp_path / "ckpt"), PROMPT, str(NEW_TOKENS)],
        capture_output=True,
        check=False,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["compact"], f"served by {got['engine']}, not the compact engine"
    assert not got["transformers_imported"], "the serving path imported transformers"
    assert "Hi" in got["chat_prompt"]

    ids = got["prompt_ids"]
    assert len(ids) == len(PROMPT.encode())  # the byte tokenizer: a token per byte
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )[0, len(ids) :].tolist()
    assert got["tokens"] == ref
    assert got["reason"] == "length"
