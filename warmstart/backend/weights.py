"""Resolving a model's checkpoint reference and loading its files and weights for an engine.

A reference (the ``checkpoint`` parameter of a model config) is a local path, a URI (``s3://``,
``file://``, ...) or a node-store model name. ``${VAR}`` and ``${VAR:-default}`` are expanded from the
environment of the server; a relative path is relative to the model's directory in the repository, so a
repository can point at a checkpoint next to it (see ``model_repository/README.md``).

Weights come through the warmstart loaders: the tier chain (node store, host-memory and disk caches, as
configured by ``WARMSTART_*`` variables in tritonserver's environment) brings the checkpoint into host memory
once, and the engine's tensors are zero-copy views of it. The tier it came from is reported. On a CUDA device
the torch tensors are copied from that host copy straight to the GPU through pinned staging buffers
(:func:`warmstart.torch.tensors_from_host`), once; JAX's engine reads host views (it restacks the layers on the
host) and places its parameters on the device itself.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmstart.errors import CheckpointError, WarmstartError

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointFileMissing",
    "LoadedCheckpoint",
    "UnsetVariable",
    "load_checkpoint",
    "resolve_reference",
]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_NAME_RESOLVERS = ("WARMSTART_STORE", "WARMSTART_REMOTE")


class UnsetVariable(WarmstartError, KeyError):
    """A ``${VAR}`` in a checkpoint reference names an unset environment variable and has no default."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """The checkpoint lacks a model file the backend needs (``config.json``, ``tokenizer.json``)."""


def resolve_reference(raw: str, model_dir: Path | str | None, env: Mapping[str, str] | None = None) -> str:
    """Expand variables in ``raw`` and make relative paths absolute (relative to ``model_dir``).

    A bare name (no ``/``, not starting with ``.``) stays a name when ``WARMSTART_STORE`` or
    ``WARMSTART_REMOTE`` is set (the loaders resolve it); otherwise it is a directory in ``model_dir``.
    """
    environ = os.environ if env is None else env

    def expand(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise UnsetVariable(
            f"checkpoint reference {raw!r} uses ${{{name}}} but {name} is not set in tritonserver's "
            f"environment; set it or write ${{{name}:-default}}"
        )

    ref = _VAR.sub(expand, raw.strip())
    if _URI.match(ref):
        return ref
    is_name = "/" not in ref and not ref.startswith(".")
    if is_name and any(environ.get(v) for v in _NAME_RESOLVERS):
        return ref
    path = Path(ref).expanduser()
    if not path.is_absolute() and model_dir is not None:
        path = Path(model_dir) / path
    return str(path.resolve())


@dataclass
class LoadedCheckpoint:
    """What an engine and a tokenizer need from a checkpoint, plus where it came from and how long it took.

    ``weights`` (``{hf_name: tensor}``) are views of ``host`` (the host-memory copy), which stays referenced
    while they live.
    """

    location: str
    config: dict[str, Any]
    tokenizer_json: str
    tier: str
    seconds: float
    weights: Mapping[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    host: Any = field(default=None, repr=False)
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # chat_template.jinja's text, when the checkpoint has one


def _read_json(read_file: Any, location: str, name: str, *, required: bool) -> dict[str, Any]:
    try:
        data = read_file(name)
    except FileNotFoundError:
        if required:
            raise CheckpointFileMissing(
                f"checkpoint {location} has no {name}; convert the model with `warmstart convert`, which "
                "stores config.json and the tokenizer files beside the weights"
            ) from None
        return {}
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{location}/{name} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{location}/{name} must hold a JSON object")
    return obj


def _read_text(read_file: Any, location: str, name: str) -> str | None:
    """An optional UTF-8 model file's text, or None when the checkpoint has no such file."""
    try:
        data = read_file(name)
    except FileNotFoundError:
        return None
    try:
        return str(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{location}/{name} is not valid UTF-8: {e}") from None


def source_tier(host: Any) -> str:
    """The tier the bytes came from: the source of the first transfer when the load filled a cache (a first
    load through the memory tier is a disk or remote load), else the tier the checkpoint was found in."""
    transfers = getattr(host, "transfers", None) or []
    return str(transfers[0].source) if transfers else str(host.tier)


def populate(host: Any) -> None:
    """Make every page of ``host``'s file mappings resident and touched now (:func:`prefault`).

    The engine reads every weight in its first forward anyway; faulting 4 KiB pages one at a time there
    is slower, and on this project's VMs a page fresh from the disk costs a host fault at its first touch
    (about 0.7 s per GiB), which would land in the first request's time to first token. Measured on
    SmolLM2 from a local checkpoint (load + engine + first prefill, medians of 3 interleaved fresh
    processes): 0.49 s without populating, 0.36 s with one ``MADV_POPULATE_READ``; the first token after a
    cold 1 GiB disk-tier load took 0.5-1.1 s more than after a warm one until the pages were also touched.
    """
    from warmstart.loaders.hostcache import prefault

    maps = [buf for buf in getattr(host, "buffers", None) or () if isinstance(buf, mmap.mmap)]
    if maps and not prefault(maps):
        logger.warning(
            "could not populate the mappings of %s up front; their pages faulted in lazily", host.location
        )


def load_checkpoint(
    ref: str, engine: str, *, dtype: str | None = None, device: str = "cpu"
) -> LoadedCheckpoint:
    """Bring the checkpoint ``ref`` (already resolved) into host memory and load what ``engine`` needs.

    The checkpoint goes through the tier chain (:func:`warmstart.loaders.tiers.open_host`: node store,
    memory and disk caches when configured, else straight from the path or URI); the tensors are views of
    that host copy (:func:`warmstart.torch.tensors_from_host`, :func:`warmstart.jax.params_from_host`).
    Raises the :class:`~warmstart.errors.CheckpointError` subclasses (not found, corrupt, ...) and
    :class:`CheckpointFileMissing`; the caller turns them into a failed model load. ``device`` (``"cpu"``,
    ``"cuda:N"``) is where torch tensors go; JAX weights always stay host views (see the module docstring).
    """
    from warmstart.loaders.tiers import open_host

    t0 = time.perf_counter()
    host = open_host(ref)
    location = str(host.location)
    config = _read_json(host.read_file, location, "config.json", required=True)
    generation_config = _read_json(host.read_file, location, "generation_config.json", required=False)
    tokenizer_config = _read_json(host.read_file, location, "tokenizer_config.json", required=False)
    chat_template = _read_text(host.read_file, location, "chat_template.jinja")
    try:
        tokenizer_json = host.read_file("tokenizer.json").decode("utf-8")
    except FileNotFoundError:
        raise CheckpointFileMissing(
            f"checkpoint {location} has no tokenizer.json; convert the model with a fast tokenizer"
        ) from None
    populate(host)
    weights: Mapping[str, Any]
    if engine == "torch":
        import torch

        from warmstart.torch import tensors_from_host

        weights = tensors_from_host(
            host, device=torch.device(device), dtype=getattr(torch, dtype) if dtype else None
        )
    else:
        from warmstart.jax import params_from_host

        # on the host even where jax's default device is a GPU: the engine restacks them on the host
        weights = params_from_host(host, device="cpu", dtype=dtype)
    seconds = time.perf_counter() - t0
    tier = source_tier(host)
    logger.info("checkpoint %s loaded from the %s tier in %.3f s", location, tier, seconds)
    return LoadedCheckpoint(
        location=location,
        config=config,
        tokenizer_json=tokenizer_json,
        tier=tier,
        seconds=seconds,
        weights=weights,
        generation_config=generation_config,
        host=host,
        tokenizer_config=tokenizer_config,
        chat_template=chat_template,
    )
