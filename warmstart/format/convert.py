"""Convert the model formats people have into warmstart checkpoints.

Supported sources (detected from the path):

* a Hugging Face model directory: ``config.json`` plus ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json`` (model files such as the tokenizer are carried over);
* a single ``.safetensors`` file;
* a ``.gguf`` file, dequantized through transformers + gguf (config, generation config and tokenizer are
  carried over);
* an orbax checkpoint directory (read through TensorStore; names are orbax's dotted key paths);
* a warmstart checkpoint, local or at a URI (re-partition and/or cast);
* a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``): a small adapter
  checkpoint (docs/format.md section 10, :mod:`warmstart.format.lora`);
* pickle files (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``), only with ``allow_pickle=True``,
  and then through ``torch.load(weights_only=True)``.

Tensors stream into :func:`warmstart.format.save` one at a time, so a model larger than memory converts
(GGUF and pickle inputs are the exception: their libraries materialize the whole model).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from warmstart.errors import (
    CheckpointExists,
    InvalidSource,
    MalformedGGUF,
    MalformedSafetensors,
    MissingDependency,
    PickleRefused,
    SourceNotARegularFile,
    SourceNotFound,
    UnknownSourceFormat,
    UnsupportedSourceDtype,
)
from warmstart.format import spec
from warmstart.format.index import Index
from warmstart.format.sources import is_uri
from warmstart.format.writer import save, to_numpy

log = logging.getLogger(__name__)

Progress = Callable[[int], None]

DTYPE_ALIASES: dict[str, str] = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}
FLOATING = ("float64", "float32", "float16", "bfloat16")
"""Dtypes a ``dtype=`` cast applies to (float8 tensors are quantized data and are left alone)."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_MODEL_FILE_BYTES = 64 * 1024**2
MAX_JSON_BYTES = 64 * 1024**2
MAX_SAFETENSORS_HEADER = 100 * 1024**2
MAX_SOURCE_JSON_DEPTH = 128  # what serde_json (the safetensors library) accepts; configs nest a few levels
MODEL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_NOT_MODEL_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", spec.INDEX_FILE}

SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}

PICKLE_EXPLANATION = (
    "Pickle files can run arbitrary code when loaded (even torch.load(weights_only=True) had such a hole: "
    "CVE-2025-32434), so warmstart does not open them by default. Either convert the model to safetensors "
    "first (e.g. `model.save_pretrained(dir, safe_serialization=True)`), or, if you trust this file, pass "
    "--allow-pickle (allow_pickle=True): it is then loaded with torch.load(weights_only=True, mmap=True)."
)


# --- sources ----------------------------------------------------------------------------------------------


@dataclass
class TensorSpec:
    """A source tensor's name, format dtype name and shape, known before its bytes are read."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class ModelSource:
    """An opened conversion source: what it holds and how to stream it."""

    kind: str
    path: str
    framework: str
    specs: list[TensorSpec]
    tensors: Callable[[], Iterator[tuple[str, Any]]]
    files: dict[str, bytes] = field(default_factory=dict)
    model_config: dict[str, Any] | None = None
    base_metadata: dict[str, Any] = field(default_factory=dict)


def detect(src: str | os.PathLike[str]) -> str:
    """The kind of a conversion source: ``hf-dir``, ``safetensors``, ``gguf``, ``orbax``, ``warmstart``,
    ``peft-lora``, ``pickle``."""
    if isinstance(src, str) and is_uri(src):
        return "warmstart"  # the only format read from URIs
    p = Path(src)
    if not p.exists():
        raise SourceNotFound(f"conversion source {p} does not exist")
    if not p.is_file() and not p.is_dir():
        raise SourceNotARegularFile(
            f"conversion source {p} is neither a regular file nor a directory (a FIFO, device or socket); "
            "give the model file or directory itself"
        )
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".safetensors":
            return "safetensors"
        if suffix == ".gguf":
            return "gguf"
        if suffix in PICKLE_SUFFIXES:
            return "pickle"
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise UnknownSourceFormat(
            f"{p} is not a file warmstart can convert: expected .safetensors, .gguf, or (with --allow-pickle) "
            f"{', '.join(PICKLE_SUFFIXES)}"
        )
    if (p / spec.INDEX_FILE).is_file():
        return "warmstart"
    from warmstart.format.lora import is_peft_adapter_dir

    if is_peft_adapter_dir(p):
        return "peft-lora"
    if _orbax_root(p) is not None:
        return "orbax"
    if (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file():
        return "hf-dir"
    if (p / "pytorch_model.bin").is_file() or (p / "pytorch_model.bin.index.json").is_file():
        return "pickle"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        raise UnknownSourceFormat(f"{p} holds one GGUF file; convert the file itself: {ggufs[0]}")
    raise UnknownSourceFormat(
        f"{p} is not a model directory warmstart recognizes: expected a Hugging Face directory (config.json + "
        "model.safetensors or model.safetensors.index.json), an orbax checkpoint (_METADATA), a PEFT LoRA adapter "
        "(adapter_config.json + adapter_model.safetensors), or a warmstart checkpoint (index.json)"
    )


def open_model_source(src: str | os.PathLike[str], *, allow_pickle: bool = False) -> ModelSource:
    """Detect and open a conversion source (raises a :class:`ConversionError` subclass if unsupported)."""
    kind = detect(src)
    if kind == "warmstart":
        return _open_warmstart(src)
    p = Path(src).resolve()
    if kind == "safetensors":
        return _open_safetensors_files([p], kind="safetensors", root=p, files={}, config=None)
    if kind == "hf-dir":
        return _open_hf_dir(p)
    if kind == "gguf":
        return _open_gguf(p)
    if kind == "orbax":
        return _open_orbax(p)
    if kind == "peft-lora":
        from warmstart.format.lora import open_peft_adapter

        return open_peft_adapter(p)
    if kind == "pickle":
        if not allow_pickle:
            raise PickleRefused(
                f"refusing to load {p}: it is a pickle-based checkpoint. {PICKLE_EXPLANATION}"
            )
        return _open_pickle(p)
    raise AssertionError(kind)


# --- safetensors / HF directory ---------------------------------------------------------------------------


def _open_regular(path: Path, what: str) -> BinaryIO:
    """``path`` opened for reading, refusing what is not a regular file (a FIFO would block the converter)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SourceNotFound(f"{path} ({what}) does not exist") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceNotARegularFile(
                f"{path} ({what}) is not a regular file (a FIFO, device, socket or directory); give the "
                "model's files themselves"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _header_json(path: Path, raw: bytes) -> Any:
    from warmstart.format.index import JSONDefect, strict_json_loads

    try:
        return strict_json_loads(raw.decode("utf-8"), max_depth=MAX_SOURCE_JSON_DEPTH)
    except (UnicodeDecodeError, JSONDefect) as e:
        why = str(e) if isinstance(e, JSONDefect) else f"is not UTF-8 ({e})"
        raise MalformedSafetensors(
            f"{path} is not a valid safetensors file: its header {why}; re-save the model with safetensors"
        ) from e


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The validated JSON header of a safetensors file (tensor entries and ``__metadata__``).

    Checked as the safetensors library checks it, so that reading the tensors afterwards cannot fail: strict
    JSON, ``__metadata__`` a string-to-string object, every entry a known dtype, a shape of non-negative
    integers and ``data_offsets`` ``[begin, end]`` with ``end - begin = prod(shape) * itemsize``, the entries
    tiling the data section from its first to its last byte without gaps or overlaps.
    """
    with _open_regular(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise MalformedSafetensors(f"{path} is not a safetensors file: shorter than 8 bytes")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise MalformedSafetensors(
                f"{path} is not a valid safetensors file: header length {n} is out of range"
            )
        raw = f.read(n)
    header = _header_json(path, raw)
    if not isinstance(header, dict):
        raise MalformedSafetensors(f"{path} is not a valid safetensors file: header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise MalformedSafetensors(
            f"{path} is not a valid safetensors file: __metadata__ must map strings to strings"
        )
    data_size = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"])
            and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1] <= data_size
        )
        if not ok:
            raise MalformedSafetensors(
                f"{path} is not a valid safetensors file: bad header entry for {name!r}"
            )
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise UnsupportedSourceDtype(
                f"tensor {name!r} in {path} has safetensors dtype {entry['dtype']}, which warmstart cannot "
                f"store; supported: {', '.join(SAFETENSORS_DTYPES)}"
            )
        begin, end = entry["data_offsets"]
        nbytes = spec.DTYPES[SAFETENSORS_DTYPES[entry["dtype"]]].itemsize
        for d in entry["shape"]:
            nbytes *= d
            if nbytes > data_size:
                break
        if nbytes != end - begin:
            needs = f"more than the {data_size} bytes of data" if nbytes > data_size else f"{nbytes} bytes"
            raise MalformedSafetensors(
                f"{path} is not a valid safetensors file: tensor {name!r} of shape {entry['shape'][:20]} "
                f"({entry['dtype']}) needs {needs}, but its data_offsets span {end - begin}"
            )
        spans.append((begin, end, name))
    spans.sort()
    at = 0
    for begin, end, name in spans:
        if begin != at:
            raise MalformedSafetensors(
                f"{path} is not a valid safetensors file: tensor {name!r} starts at byte {begin} of the data, "
                f"{'overlapping the tensor before it' if begin < at else f'leaving a gap after byte {at}'}"
            )
        at = end
    if at != data_size:
        raise MalformedSafetensors(
            f"{path} is not a valid safetensors file: its tensors cover {at} bytes of a {data_size}-byte "
            "data section (truncated or padded file?)"
        )
    return header


def _safetensors_specs(path: Path) -> list[TensorSpec]:
    header = read_safetensors_header(path)
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    entries.sort(key=lambda kv: (kv[1]["data_offsets"][0], kv[0]))  # the order the writer stored them in
    return [TensorSpec(k, SAFETENSORS_DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in entries]


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise MissingDependency("this conversion needs torch: pip install 'warmstart[torch]'") from e
    return torch


def _open_safetensors_files(
    shards: list[Path], *, kind: str, root: Path, files: dict[str, bytes], config: dict[str, Any] | None
) -> ModelSource:
    specs_by_shard: list[tuple[Path, list[TensorSpec]]] = [(s, _safetensors_specs(s)) for s in shards]
    seen: dict[str, Path] = {}
    for shard, specs in specs_by_shard:
        for s in specs:
            if s.name in seen:
                raise InvalidSource(f"tensor {s.name!r} appears in both {seen[s.name].name} and {shard.name}")
            seen[s.name] = shard
    specs = [s for _, ss in specs_by_shard for s in ss]
    order = _model_order(config) if config is not None else None
    if order is not None:
        rank = {name: i for i, name in enumerate(order)}
        specs.sort(key=lambda s: rank.get(s.name, len(rank)))  # stable: unknown names keep file order
    framework = "transformers" if config is not None else "safetensors"

    def tensors() -> Iterator[tuple[str, Any]]:
        _torch()
        from safetensors import SafetensorError, safe_open

        handles: dict[Path, Any] = {}
        try:
            for s in specs:
                shard = seen[s.name]
                try:
                    if shard not in handles:
                        handles[shard] = safe_open(str(shard), framework="pt").__enter__()
                    tensor = handles[shard].get_tensor(s.name)
                except SafetensorError as e:  # the file changed since its header was checked
                    raise MalformedSafetensors(f"{shard} cannot be read by safetensors: {e}") from e
                yield s.name, tensor
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)

    return ModelSource(kind, str(root), framework, specs, tensors, files, config)


def _load_json(path: Path, what: str) -> Any:
    with _open_regular(path, what) as f:
        if os.fstat(f.fileno()).st_size > MAX_JSON_BYTES:
            raise InvalidSource(f"{path} ({what}) is larger than {MAX_JSON_BYTES} bytes")
        data = f.read()
    try:
        return json.loads(data)
    except RecursionError:
        raise InvalidSource(f"{path} ({what}) nests JSON too deeply to be a model file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidSource(f"{path} ({what}) is not valid JSON: {e}") from e


def _model_files(d: Path) -> dict[str, bytes]:
    """Config, generation config and tokenizer files of a model directory (no weights, no code)."""
    out: dict[str, bytes] = {}
    for f in sorted(d.iterdir()):
        if not f.is_file() or f.name in _NOT_MODEL_FILES or not f.name.endswith(MODEL_FILE_SUFFIXES):
            continue
        if not spec.is_safe_file_name(f.name) or f.name.startswith("data-"):
            log.warning("not carrying over %s: its name is not allowed in a checkpoint", f)
            continue
        if f.stat().st_size > MAX_MODEL_FILE_BYTES:
            log.warning("not carrying over %s: larger than %d bytes", f, MAX_MODEL_FILE_BYTES)
            continue
        out[f.name] = f.read_bytes()
    return out


def _read_config(d: Path) -> dict[str, Any] | None:
    p = d / "config.json"
    if not p.exists():
        return None
    cfg = _load_json(p, "model config")
    if not isinstance(cfg, dict):
        raise InvalidSource(f"{p} must hold a JSON object")
    return cfg


def _safe_shard(d: Path, name: object, what: str) -> Path:
    if not isinstance(name, str) or not spec.FILE_NAME_RE.match(name) or ".." in name:
        raise InvalidSource(f"{what} names shard {name!r}, which is not a plain file name in {d}")
    p = d / name
    if not p.is_file():
        raise InvalidSource(f"{what} names shard {name}, which is missing from {d}")
    return p


def _open_hf_dir(d: Path) -> ModelSource:
    config = _read_config(d)
    index_path = d / "model.safetensors.index.json"
    if index_path.is_file():
        idx = _load_json(index_path, "safetensors shard index")
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise InvalidSource(f"{index_path} has no weight_map object")
        shards = sorted({_safe_shard(d, v, str(index_path)) for v in wm.values()})
    else:
        shards = [d / "model.safetensors"]
    return _open_safetensors_files(shards, kind="hf-dir", root=d, files=_model_files(d), config=config)


def _model_order(config: dict[str, Any]) -> list[str] | None:
    """State-dict key order of the transformers model for ``config``, built on the meta device (no weights).

    Best effort: a config transformers does not know (custom architectures) keeps the files' order.
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    try:
        import torch
        import transformers
    except ImportError:
        return None
    try:
        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        return list(model.state_dict().keys())
    except Exception as e:  # unknown or custom architecture: fall back to the files' order
        log.info("tensor order of model_type %s not derivable (%s); keeping the files' order", model_type, e)
        return None


# --- GGUF -------------------------------------------------------------------------------------------------


_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_DIMS = 8  # ggml has 4
_GGUF_MAX_ARRAY_NESTING = 8


def check_gguf(path: Path) -> None:
    """Walk a GGUF file's header, checking every count, length, type and tensor extent against the file.

    GGUF readers (``gguf``, transformers) trust the header's counts and lengths, so a file that lies about
    them makes them fail with ``struct.error`` or try to allocate terabytes; this raises
    :class:`MalformedGGUF` naming what does not fit instead. Versions 2 and 3 (little-endian).
    """
    from gguf.constants import GGML_QUANT_SIZES

    quant = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
    with _open_regular(path, "GGUF file") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise MalformedGGUF(f"{path} is not a GGUF file: {size} bytes is shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            _GGUFWalk(path, m, size, quant).run()


class _GGUFWalk:
    def __init__(self, path: Path, m: mmap.mmap, size: int, quant: dict[int, tuple[int, int]]) -> None:
        self.path, self.m, self.size, self.quant, self.pos = path, m, size, quant, 0

    def bad(self, what: str) -> MalformedGGUF:
        return MalformedGGUF(
            f"{self.path} is not a valid GGUF file: {what}; the file is truncated, damaged or not written by a "
            "GGUF writer (re-download or re-export it)"
        )

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.bad(
                f"{what} at byte {self.pos} needs {n} bytes, past the end of the file ({self.size} bytes)"
            )
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return int(struct.unpack_from("<I", self.m, self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack_from("<Q", self.m, self.take(8, what))[0])

    def string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        start = self.take(n, what)
        return bytes(self.m[start : start + n])

    def value(self, vtype: int, what: str, nesting: int = 0) -> None:
        if vtype in _GGUF_SCALAR_BYTES:
            self.take(_GGUF_SCALAR_BYTES[vtype], what)
        elif vtype == _GGUF_STRING:
            self.string(what)
        elif vtype == _GGUF_ARRAY:
            if nesting >= _GGUF_MAX_ARRAY_NESTING:
                raise self.bad(f"{what} nests arrays more than {_GGUF_MAX_ARRAY_NESTING} deep")
            itype = self.u32(f"the item type of {what}")
            count = self.u64(f"the length of {what}")
            if itype in _GGUF_SCALAR_BYTES:
                self.take(count * _GGUF_SCALAR_BYTES[itype], f"{what} ({count} items)")
                return
            if itype not in (_GGUF_STRING, _GGUF_ARRAY):
                raise self.bad(f"{what} has the unknown item type {itype}")
            if count * 8 > self.size - self.pos:  # every item takes at least 8 bytes
                raise self.bad(f"{what} claims {count} items, more than the rest of the file can hold")
            for i in range(count):
                self.value(itype, f"{what}[{i}]", nesting + 1)
        else:
            raise self.bad(f"{what} has the unknown value type {vtype}")

    def run(self) -> None:
        if self.m[:4] != b"GGUF":
            raise MalformedGGUF(f"{self.path} is not a GGUF file (its first bytes are not 'GGUF')")
        self.pos = 4
        version = self.u32("the version")
        if version not in (2, 3):
            raise self.bad(f"version {version} is not 2 or 3 (a big-endian GGUF reads as a huge version)")
        n_tensors = self.u64("the tensor count")
        n_kv = self.u64("the metadata count")
        # each metadata entry takes at least 13 bytes, each tensor entry at least 24
        if n_kv * 13 + n_tensors * 24 > self.size - self.pos:
            raise self.bad(
                f"its header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold"
            )
        alignment = 32
        for i in range(n_kv):
            key = self.string(f"metadata key {i}")
            name = key.decode("utf-8", "replace")[:100]
            vtype = self.u32(f"the type of metadata {name!r}")
            start = self.pos
            self.value(vtype, f"metadata {name!r}")
            if key == b"general.alignment":
                if vtype != 4:
                    raise self.bad("general.alignment is not a uint32")
                alignment = int(struct.unpack_from("<I", self.m, start)[0])
                if alignment <= 0 or alignment & (alignment - 1):
                    raise self.bad(f"general.alignment {alignment} is not a power of two")
        extents: list[tuple[int, int, str]] = []
        for i in range(n_tensors):
            name = self.string(f"the name of tensor {i}").decode("utf-8", "replace")[:100]
            n_dims = self.u32(f"the rank of tensor {name!r}")
            if n_dims > _GGUF_MAX_DIMS:
                raise self.bad(f"tensor {name!r} has {n_dims} dimensions (at most {_GGUF_MAX_DIMS})")
            dims = [self.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
            gtype = self.u32(f"the type of tensor {name!r}")
            offset = self.u64(f"the offset of tensor {name!r}")
            if gtype not in self.quant:
                raise self.bad(f"tensor {name!r} has the unknown ggml type {gtype}")
            block, type_size = self.quant[gtype]
            numel = math.prod(dims)
            if dims and dims[0] % block:
                raise self.bad(f"tensor {name!r}: its first dimension {dims[0]} is not a multiple of {block}")
            extents.append((offset, numel // block * type_size, name))
        data_start = -(-self.pos // alignment) * alignment
        room = self.size - data_start
        for offset, nbytes, name in extents:
            if offset % alignment or offset + nbytes > room:
                raise self.bad(
                    f"tensor {name!r} lies at bytes {offset}..{offset + nbytes} of the data section, which is "
                    f"{max(room, 0)} bytes long (or its offset is not a multiple of {alignment})"
                )


def _open_gguf(path: Path) -> ModelSource:
    with _open_regular(path, "GGUF file") as f:
        if f.read(4) != b"GGUF":
            raise MalformedGGUF(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
    torch = _torch()
    try:
        import gguf  # noqa: F401 - transformers needs it; fail early with a clear message
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise MissingDependency(
            "converting GGUF needs transformers and gguf: pip install 'warmstart[torch]'"
        ) from e
    check_gguf(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except (struct.error, IndexError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise MalformedGGUF(f"transformers cannot read {path}: {type(e).__name__}: {e}") from e
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as e:
        raise InvalidSource(f"transformers cannot load {path}: {e}") from e
    state = _untied(model.state_dict())  # model order; tied aliases (lm_head = embeddings) stored once
    files: dict[str, bytes] = {"config.json": model.config.to_json_string().encode()}
    if model.generation_config is not None:
        files["generation_config.json"] = model.generation_config.to_json_string().encode()
    tmp = Path(tempfile.mkdtemp(prefix="warmstart-gguf-tok-"))
    try:
        try:
            AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(tmp))
        except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as e:
            log.warning("%s: tokenizer not carried over (%s)", path, e)
        files.update({k: v for k, v in _model_files(tmp).items() if k not in files})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    config = json.loads(files["config.json"])
    specs = [TensorSpec(k, _format_dtype(v, k), tuple(v.shape)) for k, v in state.items()]

    def tensors() -> Iterator[tuple[str, Any]]:
        yield from state.items()

    return ModelSource("gguf", str(path), "transformers", specs, tensors, files, config)


def _untied(state: dict[str, Any]) -> dict[str, Any]:
    """Drop tensors that alias an earlier one (tied weights): the loaders re-tie them from the config."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out: dict[str, Any] = {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


# --- orbax ------------------------------------------------------------------------------------------------


def _orbax_root(d: Path) -> Path | None:
    """The directory holding orbax's ``_METADATA`` (the path itself or its single item subdirectory)."""
    if (d / "_METADATA").is_file():
        return d
    if (d / "_CHECKPOINT_METADATA").is_file():
        items = [c for c in d.iterdir() if c.is_dir() and (c / "_METADATA").is_file()]
        if len(items) == 1:
            return items[0]
    return None


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _open_orbax(d: Path) -> ModelSource:
    root = _orbax_root(d)
    assert root is not None
    meta = _load_json(root / "_METADATA", "orbax metadata")
    tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(tree, dict):
        raise InvalidSource(f"{root / '_METADATA'} has no tree_metadata object (unsupported orbax layout)")
    names: list[str] = []
    for key, entry in tree.items():
        try:
            keys = [str(k["key"]) for k in entry["key_metadata"]]
            value_type = entry.get("value_metadata", {}).get("value_type", "")
        except (KeyError, TypeError) as e:
            raise InvalidSource(f"{root / '_METADATA'}: malformed entry {key!r}") from e
        if value_type in ("np.ndarray", "jax.Array", "scalar"):
            names.append(".".join(keys))
        else:
            log.warning("orbax leaf %s of type %s skipped (not an array)", key, value_type)
    names.sort(key=natural_key)
    try:
        import tensorstore as ts
    except ImportError as e:
        raise MissingDependency("converting orbax needs tensorstore: pip install 'warmstart[jax]'") from e
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    base = root.resolve().as_uri() + "/"

    def open_array(name: str) -> Any:
        if meta.get("use_ocdbt", True):
            kv: dict[str, Any] = {"driver": "ocdbt", "base": base, "path": name + "/"}
        else:
            kv = {"driver": "file", "path": str(root / name) + "/"}
        try:
            return ts.open({"driver": driver, "kvstore": kv}, read=True).result()
        except ValueError as e:
            raise InvalidSource(f"orbax array {name!r} in {root} cannot be opened: {e}") from e

    specs = []
    for name in names:
        arr = open_array(name)
        specs.append(TensorSpec(name, _numpy_dtype_name(arr.dtype.numpy_dtype, name), tuple(arr.shape)))

    def tensors() -> Iterator[tuple[str, Any]]:
        for name in names:
            yield name, open_array(name).read().result()

    return ModelSource("orbax", str(d), "jax", specs, tensors)


# --- warmstart --------------------------------------------------------------------------------------------


def _open_warmstart(src: str | os.PathLike[str]) -> ModelSource:
    from warmstart.format.reader import open_checkpoint

    ckpt = open_checkpoint(src)
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in ckpt.index.tensors]
    files = {f.name: ckpt.read_file(f.name) for f in ckpt.index.files}
    meta = dict(ckpt.index.metadata)
    framework = meta.get("framework") if isinstance(meta.get("framework"), str) else "warmstart"
    cfg = meta.get("model_config") if isinstance(meta.get("model_config"), dict) else None

    def tensors() -> Iterator[tuple[str, Any]]:
        for name in ckpt.names:
            yield name, ckpt.read(name)

    location = src if isinstance(src, str) and is_uri(src) else str(Path(src).resolve())
    return ModelSource("warmstart", location, str(framework), specs, tensors, files, cfg, meta)


# --- pickle -----------------------------------------------------------------------------------------------


def _open_pickle(p: Path) -> ModelSource:
    torch = _torch()
    if p.is_dir():
        idx_path = p / "pytorch_model.bin.index.json"
        if idx_path.is_file():
            idx = _load_json(idx_path, "pytorch shard index")
            wm = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise InvalidSource(f"{idx_path} has no weight_map object")
            shards = sorted({_safe_shard(p, v, str(idx_path)) for v in wm.values()})
        else:
            shards = [p / "pytorch_model.bin"]
        files, config = _model_files(p), _read_config(p)
    else:
        shards, files, config = [p], {}, None
    state: dict[str, Any] = {}
    for shard in shards:
        for k, v in _torch_load(torch, shard).items():
            if k in state:
                raise InvalidSource(f"tensor {k!r} appears twice in {p}")
            state[k] = v
    if not state:
        raise InvalidSource(f"{p} holds no tensors")
    specs = [TensorSpec(k, _format_dtype(v, k), tuple(v.shape)) for k, v in state.items()]

    def tensors() -> Iterator[tuple[str, Any]]:
        yield from state.items()

    framework = "transformers" if config is not None else "pytorch"
    return ModelSource("pickle", str(p), framework, specs, tensors, files, config)


def _torch_load(torch: Any, path: Path) -> dict[str, Any]:
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise InvalidSource(f"torch cannot load {path}: {e}") from e
        try:  # legacy (non-zip) serialization cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError) as e2:
            raise InvalidSource(f"torch cannot load {path}: {e2}") from e2
    except pickle.UnpicklingError as e:
        raise InvalidSource(
            f"{path} holds objects other than tensors and plain containers; weights_only loading refused "
            f"it ({str(e).splitlines()[0]})"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style .ckpt
    if not isinstance(obj, dict):
        raise InvalidSource(f"{path} holds a {type(obj).__name__}, not a state dict")
    out: dict[str, Any] = {}
    _flatten(obj, "", out, torch)
    return out


def _flatten(obj: dict[Any, Any], prefix: str, out: dict[str, Any], torch: Any) -> None:
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif isinstance(v, dict):
            _flatten(v, name + ".", out, torch)
        else:
            log.info("skipping non-tensor entry %s (%s)", name, type(v).__name__)


# --- dtypes -----------------------------------------------------------------------------------------------


def _numpy_dtype_name(dt: np.dtype, name: str) -> str:
    n = spec.dtype_name_of_numpy(np.dtype(dt))
    if n is None:
        raise UnsupportedSourceDtype(f"tensor {name!r} has dtype {dt}, which warmstart cannot store")
    return n


def _format_dtype(t: Any, name: str) -> str:
    if isinstance(t, np.ndarray):
        return _numpy_dtype_name(t.dtype, name)
    s = str(getattr(t, "dtype", "")).removeprefix("torch.")
    if s in spec.DTYPES:
        return s
    raise UnsupportedSourceDtype(f"tensor {name!r} has dtype {s}, which warmstart cannot store")


def resolve_dtype(dtype: str | None) -> str | None:
    """The format dtype name for ``bf16``/``fp16``/``fp32`` (or their long names); None keeps dtypes."""
    if dtype is None:
        return None
    try:
        return DTYPE_ALIASES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32") from None


def cast(t: Any, target: str | None) -> Any:
    """``t`` cast to ``target`` if it is a floating tensor of another dtype (torch stays torch, numpy numpy)."""
    if target is None:
        return t
    mod = type(t).__module__
    if mod.startswith("torch"):
        import torch

        tdt = getattr(torch, target)
        if t.dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16) and t.dtype != tdt:
            return t.to(tdt)
        return t
    arr = to_numpy(t)
    name = spec.dtype_name_of_numpy(arr.dtype)
    if name in FLOATING and name != target:
        return arr.astype(spec.DTYPES[target].numpy)
    return arr


# --- convert ----------------------------------------------------------------------------------------------


def convert(
    src: str | os.PathLike[str] | ModelSource,
    dst: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    partition_size: int = spec.DEFAULT_PARTITION_SIZE,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    upload_progress: Progress | None = None,
) -> Index:
    """Convert the model at ``src`` into a warmstart checkpoint at ``dst`` (a local path or a URI).

    ``dtype`` (``bf16``, ``fp16``, ``fp32``) casts floating tensors; other tensors keep their dtype.
    A URI destination is written locally first, then uploaded with ``index.json`` last.
    ``src`` may also be a :class:`ModelSource` from :func:`open_model_source` (to size progress first).
    Returns the new checkpoint's index.
    """
    target = resolve_dtype(dtype)
    remote = isinstance(dst, str) and is_uri(dst)
    if not remote and Path(dst).exists() and not overwrite:
        raise CheckpointExists(f"{dst} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if remote and not overwrite:
        from warmstart.format.transfer import remote_checkpoint_exists

        if remote_checkpoint_exists(str(dst)):
            raise CheckpointExists(
                f"{dst} already holds a checkpoint; pass overwrite=True (CLI: --overwrite)"
            )
    source = src if isinstance(src, ModelSource) else open_model_source(src, allow_pickle=allow_pickle)
    out_dtypes = [(target if (target and s.dtype in FLOATING) else s.dtype) for s in source.specs]
    floating = sorted({d for d in out_dtypes if d in FLOATING})
    metadata: dict[str, Any] = dict(source.base_metadata)
    metadata.update(
        {
            "source_kind": source.kind,
            "source_path": source.path,
            "framework": source.framework,
            "dtype": floating[0] if len(floating) == 1 else ("mixed" if floating else None),
        }
    )
    if source.model_config is not None:
        metadata["model_config"] = source.model_config

    def stream() -> Iterator[tuple[str, Any]]:
        for name, t in source.tensors():
            yield name, cast(t, target)

    if not remote:
        return save(
            stream(),
            dst,
            metadata=metadata,
            files=source.files,
            partition_size=partition_size,
            overwrite=overwrite,
            progress=progress,
        )
    from warmstart.format.transfer import upload

    tmp = Path(tempfile.mkdtemp(prefix="warmstart-convert-", dir=os.environ.get("WARMSTART_TMPDIR")))
    try:
        local = tmp / "checkpoint"
        save(
            stream(),
            local,
            metadata=metadata,
            files=source.files,
            partition_size=partition_size,
            progress=progress,
        )
        return upload(local, str(dst), overwrite=overwrite, progress=upload_progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def total_output_bytes(source: ModelSource, dtype: str | None = None) -> int:
    """Bytes of tensor data the converted checkpoint will hold (for progress totals)."""
    target = resolve_dtype(dtype)
    total = 0
    for s in source.specs:
        d = target if (target and s.dtype in FLOATING) else s.dtype
        total += int(np.prod(s.shape, dtype=np.int64)) * spec.DTYPES[d].itemsize
    return total
