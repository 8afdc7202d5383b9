"""Frames between a Triton stub and its engine process (``warmstart.backend.host``): length-prefixed JSON.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding one object with an
``op`` string. JSON only (never pickle): the peer is another process of the same user, but a frame is still
input, so sizes are bounded and the shape is checked before use. Writes of one frame are atomic with
respect to other writers of the same :class:`Channel` (one lock), so a generator thread and a reader thread
can share a socket.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from typing import Any

from warmstart.errors import WarmstartError

__all__ = ["ENV_VAR", "MAX_FRAME_BYTES", "Channel", "ChannelClosed", "ProtocolError"]

ENV_VAR = (
    "WARMSTART_ENGINE_HOST"  # the host's socket path, in tritonserver's (and so every stub's) environment
)
MAX_FRAME_BYTES = 64 << 20  # a prompt's ids or a non-streamed text of a long generation fit easily
_HEADER = struct.Struct(">I")


class ProtocolError(WarmstartError, ValueError):
    """The peer sent something that is not a valid frame; the connection is dropped."""


class ChannelClosed(WarmstartError, ConnectionError):
    """The peer closed the connection (or it broke) before a whole frame arrived."""


class Channel:
    """One connected stream socket carrying frames in both directions."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._closed = False

    def send(self, op: str, **fields: Any) -> None:
        """Send one frame ``{"op": op, **fields}``. Raises :class:`ChannelClosed` when the peer is gone."""
        body = json.dumps({"op": op, **fields}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(body) > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame of {len(body)} bytes exceeds the limit of {MAX_FRAME_BYTES}")
        with self._send_lock:
            try:
                self.sock.sendall(_HEADER.pack(len(body)) + body)
            except OSError as e:
                raise ChannelClosed(f"peer closed the connection: {e}") from e

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except OSError as e:
                raise ChannelClosed(f"connection broke: {e}") from e
            if k == 0:
                raise ChannelClosed("peer closed the connection")
            got += k
        return bytes(buf)

    def recv(self) -> dict[str, Any]:
        """Block for the next frame; raises :class:`ChannelClosed` or :class:`ProtocolError`."""
        (size,) = _HEADER.unpack(self._recv_exact(_HEADER.size))
        if size > MAX_FRAME_BYTES:
            raise ProtocolError(f"peer announced a frame of {size} bytes; the limit is {MAX_FRAME_BYTES}")
        try:
            obj = json.loads(self._recv_exact(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(f"frame is not UTF-8 JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
            raise ProtocolError("frame must be a JSON object with a string 'op'")
        return obj

    def close(self) -> None:
        """Shut the socket down (wakes a blocked reader) and close it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
