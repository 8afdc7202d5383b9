"""Direct ranged GETs over HTTP(S) for the remote tier: response bodies land in the caller's memory.

TensorStore's kvstore returns each range as a fresh Python ``bytes`` after three copies into freshly faulted
pages (``../shared/notes/jax.md`` §1); on this machine that caps an S3 read at about a third of what
``http.client`` reaching ``recv_into`` a reused buffer gets from the same server (benchmarks/remote_fill.py).
So the bulk of a checkpoint (its partitions) is read here, with one persistent connection per thread, straight
into the destination mapping or a small reused staging buffer; TensorStore still serves ``index.json``, model
files, ``gs://``, ``file://`` and S3 configurations this module does not sign (AWS default credential chain,
session tokens), where :func:`http_reader_for` returns None.

``WARMSTART_REMOTE_READER=tensorstore`` forces TensorStore for everything (comparisons, odd servers).
"""

from __future__ import annotations

import http.client
import os
import threading
import urllib.parse

from warmstart.errors import SourceError
from warmstart.format import spec

ENV_READER = "WARMSTART_REMOTE_READER"
TIMEOUT_S = 120.0


class RemoteReadError(SourceError):
    """A ranged GET failed: connection error, unexpected HTTP status or a body of the wrong length."""


class Body:
    """The body of one ranged GET; :meth:`readinto` fills exactly ``len(buf)`` bytes or raises."""

    def __init__(self, resp: http.client.HTTPResponse, url: str, remaining: int) -> None:
        self._resp = resp
        self._url = url
        self.remaining = remaining

    def readinto(self, buf: memoryview) -> None:
        got = 0
        n = len(buf)
        if n > self.remaining:
            raise RemoteReadError(f"{self._url}: asked for {n} more bytes, the range has {self.remaining}")
        while got < n:
            try:
                k = self._resp.readinto(buf[got:])
            except (OSError, http.client.HTTPException) as e:
                raise RemoteReadError(f"reading {self._url}: {e}") from e
            if not k:
                raise RemoteReadError(f"{self._url}: the body ended {n - got} bytes early")
            got += k
        self.remaining -= n


class HttpReader:
    """Ranged GETs of ``<base_url><name>``, one keep-alive connection per calling thread.

    ``sign`` (for S3 with keys) returns the extra headers of a request, given its method and full URL.
    """

    def __init__(self, base_url: str, *, sign: _Signer | None = None, timeout: float = TIMEOUT_S) -> None:
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
        self._timeout = timeout
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return self.base_url

    def _conn(self, fresh: bool = False) -> http.client.HTTPConnection:
        c: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if c is not None and not fresh:
            return c
        if c is not None:
            c.close()
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        c = cls(self._host, self._port, timeout=self._timeout)
        self._local.conn = c
        with self._lock:
            self._all.append(c)
        return c

    def _request(self, name: str, byte_range: tuple[int, int] | None) -> tuple[http.client.HTTPResponse, str]:
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
        last: BaseException | None = None
        for attempt in range(2):  # a keep-alive connection the server closed fails once; retry on a new one
            conn = self._conn(fresh=attempt > 0)
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                last = e
                continue
            if resp.status == 404:
                resp.read()
                raise FileNotFoundError(f"{url} does not exist")
            if resp.status not in ((200, 206) if byte_range else (200,)):
                body = resp.read()[:300].decode(errors="replace")
                raise RemoteReadError(f"GET {what}: HTTP {resp.status} {body}")
            return resp, what
        raise RemoteReadError(f"GET {what}: {last}") from last

    def get(self, name: str, offset: int, length: int) -> Body:
        """Start ``GET name`` for bytes ``[offset, offset + length)``; read the body before the next get."""
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        resp, what = self._request(name, (offset, length))
        size = resp.getheader("Content-Length")
        if size is not None and int(size) != length:
            raise RemoteReadError(f"GET {what}: the server sent {size} bytes")
        return Body(resp, what, length)

    def read(self, name: str) -> bytes:
        """A whole (small) object: ``index.json`` or a model file."""
        resp, what = self._request(name, None)
        try:
            return resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise RemoteReadError(f"GET {what}: {e}") from e

    def close(self) -> None:
        with self._lock:
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
