"""Export a warmstart checkpoint back to the formats other tools read: safetensors or orbax.

* ``to="safetensors"``: ``DST/model.safetensors`` plus the checkpoint's model files (config, tokenizer), so
  ``DST`` is a Hugging Face model directory; or, when ``DST`` ends in ``.safetensors``, that one file. The file
  is written tensor by tensor (never the whole model in memory) and published atomically.
* ``to="orbax"``: an orbax ``StandardCheckpointer`` checkpoint of the nested dict rebuilt from the dotted
  tensor names (``model.layers.0.mlp`` → ``{"model": {"layers": {"0": {"mlp": ...}}}}``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from warmstart.errors import CheckpointExists, ExportError, MissingDependency
from warmstart.format.reader import Checkpoint, open_checkpoint
from warmstart.format.writer import publish_dir

Progress = Callable[[int], None]
ExportFormat = Literal["safetensors", "orbax"]
FORMATS: tuple[str, ...] = ("safetensors", "orbax")

SAFETENSORS_DTYPE_OF: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}


def export(
    ckpt: Checkpoint | str | os.PathLike[str],
    to: ExportFormat,
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write the checkpoint ``ckpt`` (a handle, path or URI) in format ``to`` at ``dst``; returns ``dst``."""
    if to not in FORMATS:
        raise ExportError(f"cannot export to {to!r}; formats: {', '.join(FORMATS)}")
    c = ckpt if isinstance(ckpt, Checkpoint) else open_checkpoint(ckpt)
    dest = Path(dst)
    if dest.exists() and not overwrite:
        raise CheckpointExists(f"{dest} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if to == "safetensors":
        if dest.suffix == ".safetensors":
            _export_safetensors_file(c, dest, progress)
        else:
            _export_safetensors_dir(c, dest, progress)
    else:
        _export_orbax(c, dest, overwrite, progress)
    return dest


# --- safetensors ------------------------------------------------------------------------------------------


def _safetensors_header(c: Checkpoint) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in c.index.tensors:
        header[t.name] = {
            "dtype": SAFETENSORS_DTYPE_OF[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_safetensors(c: Checkpoint, path: Path, progress: Progress | None) -> None:
    with open(path, "wb") as f:
        f.write(_safetensors_header(c))
        for name in c.names:
            arr = c.read(name)
            f.write(arr.reshape(-1).view("uint8").data)
            if progress is not None:
                progress(arr.nbytes)
        f.flush()
        os.fsync(f.fileno())


def _export_safetensors_file(c: Checkpoint, dest: Path, progress: Progress | None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        _write_safetensors(c, tmp, progress)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _export_safetensors_dir(c: Checkpoint, dest: Path, progress: Progress | None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        _write_safetensors(c, tmp / "model.safetensors", progress)
        for f in c.index.files:
            (tmp / f.name).write_bytes(c.read_file(f.name))
        publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- orbax ------------------------------------------------------------------------------------------------


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a nested dict from dotted names; raises :class:`ExportError` when a name is also a prefix."""
    root: dict[str, Any] = {}
    for name, value in flat.items():
        parts = name.split(".")
        if any(not p for p in parts):
            raise ExportError(f"tensor name {name!r} has an empty path component; orbax cannot hold it")
        node = root
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ExportError(f"tensor {name!r} lies below tensor {p!r}; orbax trees cannot hold both")
            node = child
        if parts[-1] in node:
            raise ExportError(
                f"tensor {name!r} is also a prefix of other tensors; orbax trees cannot hold both"
            )
        node[parts[-1]] = value
    return root


def _export_orbax(c: Checkpoint, dest: Path, overwrite: bool, progress: Progress | None) -> None:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise MissingDependency(
            "exporting to orbax needs orbax-checkpoint: pip install 'warmstart[jax]'"
        ) from e
    empty = [t.name for t in c.index.tensors if t.numel == 0]
    if empty:
        raise ExportError(f"orbax cannot save empty tensors ({', '.join(empty[:3])}); drop them first")
    flat: dict[str, Any] = {}
    for name in c.names:
        flat[name] = c.read(name)
        if progress is not None:
            progress(flat[name].nbytes)
    tree = nest(flat)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(dest.resolve(), tree, force=overwrite)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
