"""Byte sources: where a checkpoint's files are read from, behind one small protocol.

Ranges are ``(offset, length)``; a read returns exactly ``length`` bytes or raises. Two implementations:

* :class:`LocalSource` — a local directory: ``os.preadv`` into caller buffers (optionally ``O_DIRECT``),
  and read-only ``mmap`` for zero-copy views.
* :class:`TensorStoreSource` — any TensorStore kvstore (``file://``, ``s3://``, ``gs://``, ``http(s)://``),
  with many ranged reads in flight.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from warmstart.errors import (
    FileOutsideCheckpoint,
    InvalidRemoteTimeout,
    InvalidURI,
    MissingDependency,
    NotARegularFile,
    RemoteTimeout,
    SourceError,
    UnsafeFileName,
)
from warmstart.format import spec

URI_SCHEMES = ("file", "s3", "gs", "http", "https")

_FILE_KINDS = {
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFDIR: "directory",
    stat.S_IFSOCK: "socket",
}


@runtime_checkable
class ByteSource(Protocol):
    """Read access to the files of one checkpoint location."""

    @property
    def location(self) -> str: ...

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def read_into(self, name: str, offset: int, out: memoryview) -> None: ...


def _check_name(name: str) -> None:
    if name != spec.INDEX_FILE and not spec.is_safe_file_name(name):
        raise UnsafeFileName(f"refusing to access {name!r}: not a plain file name inside the checkpoint")


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` strings (as opposed to local paths)."""
    return isinstance(location, str) and "://" in location


# --- local ------------------------------------------------------------------------------------------------


class LocalSource:
    """A checkpoint directory on a local file system.

    ``direct=True`` reads through ``O_DIRECT`` where offset, length and buffer are aligned (bypassing the
    page cache: useful for cold loads of large checkpoints that will be cached elsewhere anyway).
    """

    def __init__(self, root: str | os.PathLike[str], *, direct: bool = False) -> None:
        self.root = Path(root)
        self.direct = direct
        self._fds: dict[tuple[str, bool], int] = {}
        self._lock = threading.Lock()
        self._real_root: str | None = None

    @property
    def location(self) -> str:
        return str(self.root)

    def path(self, name: str) -> Path:
        _check_name(name)
        return self.root / name

    # Every file is checked before a byte of it is read: it must be a regular file (a FIFO would block the
    # reader, a device would feed it endless bytes) and, followed through any symbolic link, lie inside the
    # checkpoint directory (docs/format.md, section 5).

    def _inside(self, name: str, real: str) -> None:
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        if real == self._real_root or os.path.commonpath([real, self._real_root]) != self._real_root:
            raise FileOutsideCheckpoint(
                f"{self.root / name} is a link to {real}, outside the checkpoint directory; refusing to read "
                "it (copy the file into the checkpoint, or re-convert it)"
            )

    def _regular(self, name: str, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise NotARegularFile(
                f"{self.root / name} is a {kind}, not a regular file; refusing to read it (a checkpoint holds "
                "only plain files: re-fetch or re-convert it)"
            )

    def _stat(self, name: str) -> os.stat_result:
        """``stat`` of a file that passes the checks above (``FileNotFoundError`` if it does not exist)."""
        path = self.path(name)
        try:
            st = os.stat(path)
            self._inside(name, os.path.realpath(path))
        except FileNotFoundError:
            raise
        except OSError as e:
            raise SourceError(f"cannot stat {path}: {e}") from e
        self._regular(name, st)
        return st

    def _open(self, name: str, flags: int = 0) -> int:
        """A read-only descriptor of ``name``, checked before opening and again on what was opened."""
        self._stat(name)
        path = self.path(name)
        try:
            # O_NONBLOCK: a file swapped for a FIFO after the check still cannot block the open
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | flags)
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise SourceError(f"cannot open {path}: {e}") from e
        try:
            self._regular(name, os.fstat(fd))
            proc = f"/proc/self/fd/{fd}"
            if Path(proc).exists():
                self._inside(name, os.path.realpath(proc))
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def exists(self, name: str) -> bool:
        """True when ``name`` is a regular file (raises if it exists as something a reader must refuse)."""
        try:
            self._stat(name)
        except FileNotFoundError:
            return False
        return True

    def size(self, name: str) -> int:
        return self._stat(name).st_size

    def _fd(self, name: str, direct: bool) -> int:
        key = (name, direct)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = self._open(name, getattr(os, "O_DIRECT", 0) if direct else 0)
                self._fds[key] = fd
            return fd

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length is None:
            length = self.size(name) - offset
        buf = bytearray(length)
        self.read_into(name, offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        direct = self.direct and _aligned(offset, out)
        fd = self._fd(name, direct)
        done = 0
        total = len(out)
        while done < total:
            try:
                n = os.preadv(fd, [out[done:]], offset + done)
            except OSError as e:
                if direct and e.errno == 22:  # EINVAL: this file system refuses O_DIRECT for this range
                    fd, direct = self._fd(name, False), False
                    continue
                raise SourceError(f"reading {self.path(name)} at {offset + done}: {e}") from e
            if n == 0:
                raise SourceError(
                    f"{self.path(name)} ended at byte {offset + done}, but {total - done} more were expected "
                    "(truncated file?); run `warmstart verify` on the checkpoint"
                )
            done += n

    def mmap(self, name: str) -> mmap.mmap:
        """A read-only shared mapping of a whole file (zero copy; pages come from the page cache)."""
        fd = self._open(name)
        try:
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _aligned(offset: int, out: memoryview) -> bool:
    if offset % spec.ALIGNMENT or len(out) % 512:
        return False
    try:
        import ctypes

        addr = ctypes.addressof(ctypes.c_char.from_buffer(out))
    except (TypeError, ValueError):
        return False
    return addr % spec.ALIGNMENT == 0


# --- remote deadlines -------------------------------------------------------------------------------------

ENV_REMOTE_TIMEOUT = "WARMSTART_REMOTE_TIMEOUT_S"
DEFAULT_REMOTE_TIMEOUT_S = 60.0
"""Deadline of one remote read: one ranged GET (connect, request, headers and its whole body, at most
64 MiB in the direct reader) or one TensorStore read. 64 MiB in 60 s is about 1 MiB/s per connection."""
_MAX_REMOTE_TIMEOUT_S = 86400.0


def remote_timeout_s(env: Mapping[str, str] | None = None) -> float:
    """The deadline of one remote read in seconds: ``WARMSTART_REMOTE_TIMEOUT_S``, else 60."""
    raw = (os.environ if env is None else env).get(ENV_REMOTE_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_REMOTE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= _MAX_REMOTE_TIMEOUT_S:  # also refuses nan and inf
        raise InvalidRemoteTimeout(
            f"{ENV_REMOTE_TIMEOUT}={raw!r}: must be a number of seconds in (0, {_MAX_REMOTE_TIMEOUT_S:.0f}]; "
            f"unset it for the default ({DEFAULT_REMOTE_TIMEOUT_S:.0f} s)"
        )
    return value


def remote_endpoint(uri: str, env: Mapping[str, str] | None = None) -> str:
    """The server a URI's reads go to, for error messages (``s3://`` names its endpoint)."""
    scheme, _, rest = uri.partition("://")
    host = rest.split("/", 1)[0]
    scheme = scheme.lower()
    if scheme == "s3":
        from warmstart.objectstore import s3_endpoint_from_env

        return s3_endpoint_from_env(None if env is None else dict(env)) or f"https://{host}.s3.amazonaws.com"
    if scheme in ("http", "https"):
        return f"{scheme}://{host}"
    if scheme == "gs":
        return "https://storage.googleapis.com"
    return uri


def remote_timeout_error(what: str, endpoint: str, timeout_s: float) -> RemoteTimeout:
    """The error of a remote read (``what``: URI and range) that missed its deadline."""
    return RemoteTimeout(
        f"{what}: no complete answer from {endpoint} within {timeout_s:g} s ({ENV_REMOTE_TIMEOUT}); "
        "is the object store up and reachable? (raise the deadline for a slow link)"
    )


# --- TensorStore ------------------------------------------------------------------------------------------


def _tensorstore() -> Any:
    try:
        import tensorstore as ts
    except ImportError as e:
        raise MissingDependency(
            "reading URIs needs tensorstore: pip install 'warmstart[s3]' (or pip install tensorstore)"
        ) from e
    return ts


def kvstore_spec_for(uri: str) -> dict[str, Any]:
    """The TensorStore kvstore spec of a checkpoint URI (always ending in '/')."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in URI_SCHEMES:
        raise InvalidURI(f"unsupported URI scheme {scheme!r} in {uri!r}; use one of {', '.join(URI_SCHEMES)}")
    from warmstart import objectstore

    return objectstore.kvstore_spec(uri if uri.endswith("/") else uri + "/")


class TensorStoreSource:
    """A checkpoint under a URI, read through a TensorStore kvstore with several ranged reads in flight.

    Every read (and the open) has a deadline of ``timeout_s`` (default :func:`remote_timeout_s`): past it,
    the read is cancelled and :class:`~warmstart.errors.RemoteTimeout` raised. Writes have none (an upload
    sends whole partitions; stop it with Ctrl-C)."""

    def __init__(self, uri: str, *, concurrency: int = 8, timeout_s: float | None = None) -> None:
        ts = _tensorstore()
        self.uri = uri.rstrip("/") + "/"
        self.concurrency = concurrency
        self.timeout_s = remote_timeout_s() if timeout_s is None else timeout_s
        ctx = ts.Context(
            {"file_io_concurrency": {"limit": concurrency}, "data_copy_concurrency": {"limit": 2}}
        )
        try:
            self._kv = self._result(
                ts.KvStore.open(kvstore_spec_for(self.uri), context=ctx),
                f"opening {self.uri}",
                time.monotonic(),
            )
        except ValueError as e:
            raise InvalidURI(f"cannot open {uri!r}: {e}") from e

    @property
    def location(self) -> str:
        return self.uri

    def _result(self, fut: Any, what: str, started: float) -> Any:
        """``fut``'s result by ``started`` + the deadline; else the read is cancelled and RemoteTimeout raised."""
        try:
            return fut.result(timeout=max(0.0, started + self.timeout_s - time.monotonic()))
        except TimeoutError:
            fut.cancel()
            raise remote_timeout_error(what, remote_endpoint(self.uri), self.timeout_s) from None

    def _get(self, name: str, byte_range: slice | None = None) -> bytes:
        _check_name(name)
        t0 = time.monotonic()
        try:
            fut = self._kv.read(name, byte_range=byte_range) if byte_range else self._kv.read(name)
            r = self._result(fut, f"reading {self.uri}{name}", t0)
        except RemoteTimeout:
            raise
        except Exception as e:
            raise SourceError(f"reading {self.uri}{name}: {e}") from e
        if r.state != "value":
            raise FileNotFoundError(f"{self.uri}{name} does not exist")
        return bytes(r.value)

    def exists(self, name: str) -> bool:
        _check_name(name)
        t0 = time.monotonic()
        try:
            fut = self._kv.read(name, byte_range=slice(0, 0))
            return bool(self._result(fut, f"checking {self.uri}{name}", t0).state == "value")
        except RemoteTimeout:
            raise
        except Exception as e:
            raise SourceError(f"checking {self.uri}{name}: {e}") from e

    def size(self, name: str) -> int:
        # kvstores have no stat; the index records every size, so callers rarely need this.
        return len(self._get(name))

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length is None and offset == 0:
            return self._get(name)
        if length is None:
            return self._get(name)[offset:]
        data = self._get(name, slice(offset, offset + length))
        if len(data) != length:
            raise SourceError(f"{self.uri}{name}: asked for {length} bytes at {offset}, got {len(data)}")
        return data

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        out[:] = self.read(name, offset, len(out))

    def read_ranges(self, ranges: Iterable[tuple[str, int, int]]) -> Iterator[tuple[str, int, bytes]]:
        """Read ``(name, offset, length)`` ranges with up to ``concurrency`` in flight, yielding in order."""
        pending: list[tuple[str, int, int, Any, float]] = []
        it = iter(ranges)
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.concurrency:
                try:
                    name, off, n = next(it)
                except StopIteration:
                    exhausted = True
                    break
                _check_name(name)
                fut = self._kv.read(name, byte_range=slice(off, off + n))
                pending.append((name, off, n, fut, time.monotonic()))
            if not pending:
                return
            name, off, n, fut, t0 = pending.pop(0)
            try:
                r = self._result(fut, f"reading {self.uri}{name} [{off}, {off + n})", t0)
            except RemoteTimeout:
                for *_, other, _ in pending:
                    other.cancel()
                raise
            except Exception as e:
                raise SourceError(f"reading {self.uri}{name} [{off}, {off + n}): {e}") from e
            if r.state != "value":
                raise FileNotFoundError(f"{self.uri}{name} does not exist")
            if len(r.value) != n:
                raise SourceError(f"{self.uri}{name}: asked for {n} bytes at {off}, got {len(r.value)}")
            yield name, off, r.value

    def write(self, name: str, data: bytes) -> None:
        _check_name(name)
        try:
            self._kv.write(name, data).result()
        except Exception as e:
            raise SourceError(f"writing {self.uri}{name}: {e}") from e

    def write_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Write several objects with up to ``concurrency`` writes in flight."""
        pending: list[tuple[str, Any]] = []
        for name, data in items:
            _check_name(name)
            pending.append((name, self._kv.write(name, data)))
            if len(pending) >= self.concurrency:
                self._finish(pending.pop(0))
        for p in pending:
            self._finish(p)

    def _finish(self, item: tuple[str, Any]) -> None:
        name, fut = item
        try:
            fut.result()
        except Exception as e:
            raise SourceError(f"writing {self.uri}{name}: {e}") from e

    def delete(self, name: str) -> None:
        _check_name(name)
        t0 = time.monotonic()
        try:
            # writing None deletes the key (KvStore has no delete())
            self._result(self._kv.write(name, None), f"deleting {self.uri}{name}", t0)
        except RemoteTimeout:
            raise
        except Exception as e:
            raise SourceError(f"deleting {self.uri}{name}: {e}") from e


def open_source(location: str | os.PathLike[str], *, direct: bool = False) -> LocalSource | TensorStoreSource:
    """A :class:`ByteSource` for a local path or a URI."""
    if is_uri(location):
        return TensorStoreSource(str(location))
    if isinstance(location, str) and not location:
        raise InvalidURI("empty checkpoint location")
    return LocalSource(location, direct=direct)
