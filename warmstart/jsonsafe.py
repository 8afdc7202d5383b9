"""JSON from clients that may be hostile, and the numeric strings sampling parameters may arrive as.

Shared by the scheduler's front ends and the backend's request parsing, so both refuse the same bodies with
the same messages. Pure: no I/O.

:func:`loads` refuses what :func:`json.loads` lets through but later code cannot handle: nesting deeper
than :data:`MAX_DEPTH` (``json.loads`` itself raises ``RecursionError`` a few hundred levels further on),
``NaN``/``Infinity`` (not JSON) and numbers too large for a float, and strings that are not valid Unicode
(a lone surrogate escape such as ``"\\ud800"`` cannot be encoded as UTF-8).

:func:`number_from_string` reads a number written as a string (``"0.1"``, ``"16"``), as the vLLM backend's
sample client sends sampling parameters; the vLLM backend reads them with ``float()``/``int()``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from warmstart.errors import WarmstartError

__all__ = ["MAX_DEPTH", "UnsafeJSON", "loads", "number_from_string"]

MAX_DEPTH = 64  # objects/arrays inside each other; real requests nest 3 or 4 levels
_MAX_NUMBER_CHARS = 64  # a numeric string longer than this is not a sampling parameter
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class UnsafeJSON(WarmstartError, ValueError):
    """A JSON document nests too deeply, holds NaN/Infinity or a huge number, or a string that is not Unicode."""


def _constant(name: str) -> Any:
    raise UnsafeJSON(f"{name} is not a JSON number; send a finite number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnsafeJSON(f"the number {text[:40]} is too large; send a finite number")
    return value


def _check_string(s: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = s[e.start : e.start + 1]
        raise UnsafeJSON(
            f"a string holds the lone surrogate \\u{ord(bad):04x}, which is not a character; "
            "send valid Unicode (a surrogate escape must be half of a pair)"
        ) from None


def _check(data: Any, max_depth: int) -> None:
    """Depth and strings of ``data``, without recursion (so depth is checked before anything recurses)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_string(value)
            continue
        if isinstance(value, dict):
            children: Any = value.values()
            for key in value:
                _check_string(key)
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > max_depth:
            raise UnsafeJSON(f"JSON nested deeper than {max_depth} levels; send a flatter document")
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif isinstance(child, str):
                _check_string(child)


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` as JSON, refusing unsafe documents.

    Raises :class:`UnsafeJSON` (see the module docstring), :class:`json.JSONDecodeError` for malformed JSON
    and :class:`UnicodeDecodeError` for bytes that are not UTF-8; all are ``ValueError``.
    """
    try:
        data = json.loads(text, parse_constant=_constant, parse_float=_float)
    except RecursionError:
        raise UnsafeJSON(f"JSON nested deeper than {max_depth} levels; send a flatter document") from None
    _check(data, max_depth)
    return data


def number_from_string(value: str, *, integer: bool) -> int | float | None:
    """The number ``value`` spells (surrounding whitespace allowed), or None if it spells none.

    ``integer``: only decimal integers (``"16"``, ``"-1"``; not ``"16.0"``, as Python's ``int()``); otherwise
    any finite decimal number (``"0.1"``, ``"1e-3"``, ``"2"``). ``"nan"``, ``"inf"``, ``"0x10"``, ``"1_000"``
    and non-ASCII digits spell none.
    """
    s = value.strip()
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    if integer:
        return int(s) if _INT.fullmatch(s) else None
    if not _FLOAT.fullmatch(s):
        return None
    number = float(s)
    return number if math.isfinite(number) else None
