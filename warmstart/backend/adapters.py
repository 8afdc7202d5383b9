"""A model's LoRA adapters on the serving side: ``multi_lora.json`` and adapter references through the tiers.

``multi_lora.json`` (the vLLM backend's file, in the model's directory next to ``config.pbtxt``) maps adapter
names to checkpoint references: a path (relative to the model directory, or absolute), a URI
(``s3://...``, ``http://...``), or a node-store name, each resolved as the base's ``checkpoint`` parameter
is (:func:`warmstart.backend.weights.resolve_reference`, ``${VAR}`` expansion included) and brought in
through the same loader tiers (:func:`warmstart.loaders.tiers.open_host`). Example::

    {"sql": "adapters/sql-lora", "chat": "s3://models/adapters/chat-lora", "fr": "smollm2-fr-lora"}

Only read with ``enable_lora``; re-read on a ``warmstart_lora_reload`` control request (docs/lora.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from warmstart import jsonsafe
from warmstart.format.lora import Adapter, adapter_from_buffers
from warmstart.tritonconfig import BackendConfigError

__all__ = [
    "MULTI_LORA_FILE",
    "MultiLoraConfigError",
    "open_adapter",
    "parse_multi_lora",
    "read_multi_lora",
    "write_multi_lora",
]

MULTI_LORA_FILE = "multi_lora.json"
MAX_FILE_BYTES = 1 << 20
MAX_ADAPTERS = 4096
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}")


class MultiLoraConfigError(BackendConfigError):
    """``multi_lora.json`` is missing (with ``enable_lora``), not a JSON object, or holds a bad entry."""


def read_multi_lora(model_dir: Path | str | None) -> dict[str, str]:
    """The adapters of the model in ``model_dir``: name -> reference (as written; resolved on load).

    A model with ``enable_lora`` and no ``multi_lora.json`` serves no adapter yet (an empty map): adapters can
    be added at run time. Raises :class:`MultiLoraConfigError` for a file that cannot be used.
    """
    if model_dir is None:
        return {}
    path = Path(model_dir) / MULTI_LORA_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise MultiLoraConfigError(f"cannot read {path}: {e}") from e
    return parse_multi_lora(data, str(path))


def parse_multi_lora(data: bytes, where: str) -> dict[str, str]:
    """``multi_lora.json``'s content checked: name -> reference. :class:`MultiLoraConfigError` names ``where``."""
    if len(data) > MAX_FILE_BYTES:
        raise MultiLoraConfigError(f"{where} is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        obj = jsonsafe.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MultiLoraConfigError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise MultiLoraConfigError(
            f'{where} must be a JSON object mapping adapter names to checkpoint references, e.g. {{"sql": '
            f'"adapters/sql-lora"}}; got {type(obj).__name__}'
        )
    if len(obj) > MAX_ADAPTERS:
        raise MultiLoraConfigError(f"{where} names {len(obj)} adapters; the limit is {MAX_ADAPTERS}")
    out: dict[str, str] = {}
    for name, ref in obj.items():
        if not _NAME.fullmatch(name):
            raise MultiLoraConfigError(
                f"{where}: adapter name {name[:60]!r} must be 1-256 characters of letters, digits and ._:/- "
                "starting with a letter or digit"
            )
        if not isinstance(ref, str) or not ref.strip():
            raise MultiLoraConfigError(
                f"{where}: adapter {name!r} must map to a checkpoint reference (a path, URI or store name), "
                f"got {ref!r}"
            )
        out[name] = ref
    return out


def write_multi_lora(model_dir: Path | str, content: str) -> dict[str, str]:
    """Replace ``model_dir``'s ``multi_lora.json`` with ``content`` (checked first: a bad one changes nothing),
    atomically (a reader sees the old file or the new one); returns the adapters it names."""
    data = content.encode("utf-8")
    adapters = parse_multi_lora(data, "the adapters sent")
    path = Path(model_dir) / MULTI_LORA_FILE
    tmp = path.with_name(f".{MULTI_LORA_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MultiLoraConfigError(f"cannot write {path}: {e}") from e
    return adapters


def open_adapter(ref: str, model_dir: Path | str | None) -> Adapter:
    """Bring the adapter checkpoint ``ref`` into host memory through the loader tiers and read it.

    Raises the loaders' :class:`~warmstart.errors.CheckpointError` subclasses (not found, corrupt) and the
    adapter reader's (:class:`~warmstart.format.lora.NotAnAdapter`, ``MalformedAdapterMetadata``).
    """
    from warmstart.backend.weights import resolve_reference
    from warmstart.loaders.tiers import open_host

    host = open_host(resolve_reference(ref, model_dir))
    return adapter_from_buffers(host.index, host.buffers, str(host.location))
