"""The one allow-list for model names, checked at every edge before a name reaches Triton or a file system.

Triton 2.51 loads ``../outside`` from outside its repository when asked over gRPC, so the scheduler, the
tritonserver owner and the node store accept only names that are a single, plain path component.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from warmstart.errors import InvalidModelName

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ALLOWED = (
    f"model names must match {MODEL_NAME_PATTERN}: 1 to 128 characters, letters, digits, '.', '_' "
    "and '-', starting with a letter or digit, and never containing '..'"
)


def _shown(name: str) -> str:
    return repr(name if len(name) <= 40 else name[:40] + "...")


def validate_model_name(name: object) -> str:
    """Return ``name`` unchanged if it is an allowed model name, else raise :class:`InvalidModelName`.

    Rejected: non-strings, NUL bytes, anything percent-encoded (checked again after one unquote, so
    ``%2e%2e%2f`` is named as traversal), path separators, absolute paths, ``..`` anywhere, and names
    longer than 128 characters.
    """
    if not isinstance(name, str):
        raise InvalidModelName(f"{_ALLOWED}; got a {type(name).__name__}, not a string")
    if "\x00" in name:
        raise InvalidModelName(f"{_ALLOWED}; got a name containing a NUL byte")
    decoded = unquote(name)
    if decoded != name:
        what = "path traversal" if (".." in decoded or "/" in decoded) else "percent-encoding"
        raise InvalidModelName(f"{_ALLOWED}; got {_shown(name)} ({what} after one unquote)")
    if ".." in name:
        raise InvalidModelName(f"{_ALLOWED}; got {_shown(name)} (contains '..')")
    if _MODEL_NAME_RE.fullmatch(name) is None:
        raise InvalidModelName(f"{_ALLOWED}; got {_shown(name)} ({len(name)} characters)")
    return name
