"""A small byte-progress reporter for long operations (convert, upload, download, verify).

``Progress`` is a callable taking a number of bytes just done, which is the shape every warmstart function's
``progress=`` argument expects. On a terminal it redraws one status line (bytes, percent, MB/s) at most
ten times a second; elsewhere (logs, pipes, tests) it prints only the final summary line. ``quiet=True``
prints nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TextIO

from warmstart.units import format_bytes, format_rate

_REDRAW_SECONDS = 0.1


class Progress:
    """Reports bytes done of ``total`` for an operation called ``label``; thread-safe."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        quiet: bool = False,
        live: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.live = (not quiet) and (live if live is not None else _isatty(self.stream))
        self.done = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._lock = threading.Lock()
        self._closed = False

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if self.live:
                now = time.monotonic()
                if now - self._last_draw >= _REDRAW_SECONDS:
                    self._last_draw = now
                    self._draw("\r" + self.status_line(now) + "\x1b[K")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def status_line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self.start
        done = format_bytes(self.done)
        if self.total:
            pct = min(100.0, 100.0 * self.done / self.total)
            amount = f"{done} / {format_bytes(self.total)}  {pct:5.1f}%"
        else:
            amount = done
        return f"{self.label}: {amount}  {format_rate(self.done, elapsed)}"

    def close(self, suffix: str = "") -> None:
        """Print the summary line (bytes, seconds, MB/s), unless quiet. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.quiet:
                return
            elapsed = self.elapsed
            line = (
                f"{self.label}: {format_bytes(self.done)} in {elapsed:.1f} s "
                f"({format_rate(self.done, elapsed)}){suffix}"
            )
            self._draw(("\r" + line + "\x1b[K" if self.live else line) + "\n")

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self.live and not self.quiet:
            with self._lock:
                self._closed = True
                self._draw("\n")

    def _draw(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # closed or broken stream: progress is best effort
            pass


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
