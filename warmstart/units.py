"""Byte sizes: parse ``512MiB`` / ``1G`` / ``4096`` and print ``1.50 GiB``.

Units: ``K``, ``M``, ``G``, ``T`` and ``KiB``... are powers of 1024; ``KB``, ``MB``, ``GB``, ``TB`` are powers
of 1000; a bare number (or ``B``) is bytes. Case does not matter; a space before the unit is allowed.
"""

from __future__ import annotations

import re

from warmstart.errors import InvalidSize

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
MAX_SIZE = 1 << 62


def parse_size(text: str | int) -> int:
    """Bytes in a size string: ``"512MiB"`` → 536870912, ``"1G"`` → 1073741824, ``"4096"`` → 4096."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise InvalidSize(
                f"cannot parse size {text!r}: use a number of bytes with an optional unit, e.g. 4096, 512MiB, "
                "1G, 1.5GiB (K/M/G/T and KiB/MiB/GiB/TiB are binary, KB/MB/GB/TB decimal)"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if not 0 < value <= MAX_SIZE:
        raise InvalidSize(f"size {text!r} must be positive and at most {MAX_SIZE} bytes")
    return value


def format_bytes(n: float) -> str:
    """A human size with binary units: ``0 B``, ``4.0 KiB``, ``1.50 GiB``."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if n >= 100 else f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def format_rate(nbytes: float, seconds: float) -> str:
    """Throughput in decimal megabytes per second (``812.3 MB/s``)."""
    if seconds <= 0:
        return "-- MB/s"
    return f"{nbytes / seconds / 1e6:.1f} MB/s"
