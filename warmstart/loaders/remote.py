"""Direct ranged GETs over HTTP(S) for the remote tier: response bodies land in the caller's memory.

TensorStore's kvstore returns each range as a fresh Python ``bytes`` after three copies into freshly faulted
pages (``../shared/notes/jax.md`` §1); on this machine that caps an S3 read at about a third of what
``http.client`` reaching ``recv_into`` a reused buffer gets from the same server (benchmarks/remote_fill.py).
So the bulk of a checkpoint (its partitions) is read here, with one persistent connection per thread, straight
into the destination mapping or a small reused staging buffer; TensorStore still serves ``index.json``, model
files, ``gs://``, ``file://`` and S3 configurations this module does not sign (AWS default credential chain,
session tokens), where :func:`http_reader_for` returns None.

``WARMSTART_REMOTE_READER=tensorstore`` forces TensorStore for everything (comparisons, odd servers).

Every read has a deadline (``WARMSTART_REMOTE_TIMEOUT_S``, :func:`warmstart.format.sources.remote_timeout_s`):
one GET — connect, request, headers and the whole body — must be done within it. A timer shuts the
connection's socket down when it passes, so a read blocked on a paused or vanished server (or one trickling
bytes) returns at once and fails with :class:`~warmstart.errors.RemoteTimeout`.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import threading
import time
import urllib.parse

from warmstart.errors import RemoteTimeout, SourceError
from warmstart.format import spec
from warmstart.format.sources import remote_timeout_error, remote_timeout_s

ENV_READER = "WARMSTART_REMOTE_READER"


class RemoteReadError(SourceError):
    """A ranged GET failed: connection error, unexpected HTTP status or a body of the wrong length."""


class _Deadline:
    """The deadline of one read: when it passes, the watched connection's socket is shut down."""

    def __init__(self, seconds: float, owner: HttpReader) -> None:
        self.seconds = seconds
        self._at = time.monotonic() + seconds
        self._owner = owner
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        owner._deadlines.add(self)
        self._timer.start()

    def remaining(self) -> float:
        return max(0.001, self._at - time.monotonic())

    def watch(self, conn: http.client.HTTPConnection) -> None:
        """Cut ``conn`` at the deadline (at once if it has passed). Call it once ``conn`` is connected."""
        with self._lock:
            self._conn = conn
            self._sock = conn.sock  # kept: a response that ends the connection takes the socket from conn
            if self.expired:
                self._cut()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._cut()

    def _cut(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # EBADF once the socket was really closed: nothing to cut
                self._sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        """The read is over (done or failed): stop the timer; a connection it cut is closed for good."""
        self._timer.cancel()
        self._owner._deadlines.discard(self)
        with self._lock:
            if self.expired and self._conn is not None:
                self._conn.close()  # the next request on it connects afresh


class Body:
    """The body of one ranged GET; :meth:`readinto` fills exactly ``len(buf)`` bytes or raises."""

    def __init__(
        self, resp: http.client.HTTPResponse, url: str, remaining: int, deadline: _Deadline, endpoint: str
    ) -> None:
        self._resp = resp
        self._url = url
        self.remaining = remaining
        self._deadline = deadline
        self._endpoint = endpoint

    def readinto(self, buf: memoryview) -> None:
        got = 0
        n = len(buf)
        if n > self.remaining:
            raise RemoteReadError(f"{self._url}: asked for {n} more bytes, the range has {self.remaining}")
        try:
            while got < n:
                try:
                    k = self._resp.readinto(buf[got:])
                except (OSError, http.client.HTTPException) as e:
                    if self._deadline.expired or isinstance(e, TimeoutError):
                        raise self._timeout() from None
                    raise RemoteReadError(f"reading {self._url}: {e}") from e
                if not k:
                    if self._deadline.expired:
                        raise self._timeout()
                    raise RemoteReadError(f"{self._url}: the body ended {n - got} bytes early")
                got += k
        except BaseException:
            self._deadline.finish()
            raise
        self.remaining -= n
        if self.remaining == 0:
            self._deadline.finish()

    def _timeout(self) -> RemoteTimeout:
        return remote_timeout_error(f"GET {self._url}", self._endpoint, self._deadline.seconds)


class HttpReader:
    """Ranged GETs of ``<base_url><name>``, one keep-alive connection per calling thread.

    ``sign`` (for S3 with keys) returns the extra headers of a request, given its method and full URL.
    ``timeout`` is the deadline of each read in seconds (default: :func:`remote_timeout_s`).
    """

    def __init__(self, base_url: str, *, sign: _Signer | None = None, timeout: float | None = None) -> None:
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"expected an http(s) base URL, got {base_url!r}")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._scheme = u.scheme
        self._netloc = u.netloc
        self._host = u.hostname
        self._port = u.port
        self._path = urllib.parse.urlsplit(self.base_url).path
        self._sign = sign
        self.timeout = remote_timeout_s() if timeout is None else timeout
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._deadlines: set[_Deadline] = set()

    @property
    def location(self) -> str:
        return self.base_url

    @property
    def endpoint(self) -> str:
        """The server every read goes to (``scheme://host:port``)."""
        return f"{self._scheme}://{self._netloc}"

    def _conn(self, fresh: bool = False) -> http.client.HTTPConnection:
        c: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if c is not None and not fresh:
            return c
        if c is not None:
            c.close()
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        c = cls(self._host, self._port, timeout=self.timeout)
        self._local.conn = c
        with self._lock:
            self._all.append(c)
        return c

    def _request(
        self, name: str, byte_range: tuple[int, int] | None
    ) -> tuple[http.client.HTTPResponse, str, _Deadline]:
        if not spec.is_safe_file_name(name) and name != spec.INDEX_FILE:
            raise RemoteReadError(f"refusing to read {name!r}: not a plain file name inside the checkpoint")
        url = self.base_url + name
        path = self._path + urllib.parse.quote(name)
        headers = {"Host": self._netloc}
        what = url
        if byte_range is not None:
            offset, length = byte_range
            headers["Range"] = f"bytes={offset}-{offset + length - 1}"
            what = f"{url} bytes {offset}+{length}"
        if self._sign is not None:
            headers.update(self._sign("GET", f"{self._scheme}://{self._netloc}{path}"))
        deadline = _Deadline(self.timeout, self)
        try:
            resp = self._send(path, headers, what, deadline)
            if resp.status == 404:
                resp.read()
                raise FileNotFoundError(f"{url} does not exist")
            if resp.status not in ((200, 206) if byte_range else (200,)):
                body = resp.read()[:300].decode(errors="replace")
                raise RemoteReadError(f"GET {what}: HTTP {resp.status} {body}")
        except BaseException as e:
            deadline.finish()
            if deadline.expired and not isinstance(e, RemoteTimeout):
                raise remote_timeout_error(f"GET {what}", self.endpoint, self.timeout) from None
            raise
        return resp, what, deadline

    def _send(
        self, path: str, headers: dict[str, str], what: str, deadline: _Deadline
    ) -> http.client.HTTPResponse:
        last: BaseException | None = None
        for attempt in range(2):  # a keep-alive connection the server closed fails once; retry on a new one
            conn = self._conn(fresh=attempt > 0)
            try:
                if conn.sock is None:
                    conn.timeout = deadline.remaining()  # bounds connect(); the deadline cuts what follows
                    conn.connect()
                deadline.watch(conn)
                conn.request("GET", path, headers=headers)
                return conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                if deadline.expired or isinstance(e, TimeoutError):
                    raise remote_timeout_error(f"GET {what}", self.endpoint, self.timeout) from None
                last = e
        raise RemoteReadError(f"GET {what}: {last}") from last

    def get(self, name: str, offset: int, length: int) -> Body:
        """Start ``GET name`` for bytes ``[offset, offset + length)``; read the body before the next get."""
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        resp, what, deadline = self._request(name, (offset, length))
        size = resp.getheader("Content-Length")
        if size is not None and int(size) != length:
            deadline.finish()
            raise RemoteReadError(f"GET {what}: the server sent {size} bytes")
        return Body(resp, what, length, deadline, self.endpoint)

    def read(self, name: str) -> bytes:
        """A whole (small) object: ``index.json`` or a model file."""
        resp, what, deadline = self._request(name, None)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            if deadline.expired or isinstance(e, TimeoutError):
                raise remote_timeout_error(f"GET {what}", self.endpoint, self.timeout) from None
            raise RemoteReadError(f"GET {what}: {e}") from e
        finally:
            deadline.finish()
        if deadline.expired:  # a cut body can end early without an error (no Content-Length)
            raise remote_timeout_error(f"GET {what}", self.endpoint, self.timeout)
        return data

    def close(self) -> None:
        with self._lock:
            for d in list(self._deadlines):
                d.finish()
            for c in self._all:
                c.close()
            self._all.clear()


class _Signer:
    def __init__(self, region: str, access_key: str, secret_key: str) -> None:
        self.region = region
        self.access_key = access_key
        self.secret_key = secret_key

    def __call__(self, method: str, url: str) -> dict[str, str]:
        from warmstart.objectstore import _sigv4_headers

        return _sigv4_headers(method, url, self.region, self.access_key, self.secret_key)


def http_reader_for(uri: str, env: dict[str, str] | None = None) -> HttpReader | None:
    """A direct reader of the checkpoint at ``uri`` (ending in '/'), or None where TensorStore must serve it."""
    from warmstart.objectstore import DEFAULT_REGION, parse_uri, s3_endpoint_from_env

    e = dict(os.environ) if env is None else env
    if e.get(ENV_READER, "").lower() == "tensorstore":
        return None
    u = parse_uri(uri)
    prefix = u.path if u.path.endswith("/") or not u.path else u.path + "/"
    if u.scheme in ("http", "https"):
        return HttpReader(f"{u.scheme}://{u.bucket}{prefix}")
    if u.scheme != "s3":
        return None
    key, secret = e.get("AWS_ACCESS_KEY_ID"), e.get("AWS_SECRET_ACCESS_KEY")
    if e.get("AWS_SESSION_TOKEN"):
        return None
    region = e.get("AWS_REGION") or e.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    sign = _Signer(region, key, secret) if key and secret else None
    endpoint = s3_endpoint_from_env(e)
    quoted = urllib.parse.quote(prefix)
    if endpoint is not None:
        return HttpReader(f"{endpoint.rstrip('/')}/{u.bucket}/{quoted}", sign=sign)
    if sign is None:
        return None  # AWS without keys in the environment: TensorStore's default credential chain
    return HttpReader(f"https://{u.bucket}.s3.{region}.amazonaws.com/{quoted}", sign=sign)
