""":class:`EtcdClusterState`: the :class:`~warmstart.scheduler.state.ClusterStateStore` on an etcd v3 server.

It speaks etcd's JSON gateway (``POST /v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/...``) over plain HTTP
with the standard library (``http.client``, one keep-alive connection per thread): the protocol is
synchronous, so an asyncio client would not fit it, and ``etcd3gw`` would add ``requests`` and its own
error mapping for six endpoints. Keys, values, record schemas, transaction shapes and the failure rules are
specified in ``docs/cluster.md``; in short:

* every put or delete is one transaction: its compares (the server's epoch key's ``mod_revision`` for
  fencing, the key's ``mod_revision`` for ``expected_revision`` — ``create_revision == 0`` for 0), the write
  on success, and on failure a read of the compared keys so the error says which compare lost;
* :meth:`EtcdClusterState.read` / :meth:`~EtcdClusterState.snapshot` are one range read of the whole
  prefix, so everything comes from one revision;
* a store that does not answer within ``timeout_s`` raises :class:`ClusterStateUnavailable`, never hangs.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from warmstart.scheduler.errors import (
    ClusterStateError,
    ClusterStateUnavailable,
    CorruptClusterStateError,
    LeaseNotFoundError,
    RevisionConflictError,
    StaleEpochError,
    UnknownModelError,
    UnknownServerError,
)
from warmstart.scheduler.state import (
    DEFAULT_LEASE_TTL_S,
    Allocation,
    ClusterSnapshot,
    Lease,
    LoadClaim,
    ModelSpec,
    NodeRecord,
    ServerState,
    StateView,
    Versioned,
    check_allocation_names,
    check_lease_ttl,
)
from warmstart.scheduler.state_json import (
    decode_alloc,
    decode_deployment,
    decode_epoch,
    decode_model,
    decode_node,
    decode_server,
    encode_alloc,
    encode_deployment,
    encode_epoch,
    encode_model,
    encode_node,
    encode_server,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT_S", "EtcdClusterState", "EtcdRequestError", "InvalidEtcdConfig"]

DEFAULT_PREFIX = "/warmstart/"
DEFAULT_TIMEOUT_S = 2.0
_SERVERS, _MODELS, _EPOCHS, _NODES = "servers/", "models/", "epochs/", "nodes/"
_ALLOC_REV, _USE_REV, _ALLOC, _DEPLOYMENTS = "alloc-rev/", "use-rev/", "alloc/", "deployments/"
# gRPC status codes etcd's gateway returns in {"code": ...}
_NOT_FOUND, _DEADLINE_EXCEEDED, _UNAVAILABLE = 5, 4, 14
_R = TypeVar("_R")
_RETRYABLE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class InvalidEtcdConfig(ClusterStateError, ValueError):
    """The etcd URL, key prefix or timeout given to :class:`EtcdClusterState` is malformed."""


class EtcdRequestError(ClusterStateError):
    """etcd answered a request with an error that is none of the specific ones (the message is etcd's)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise EtcdRequestError(f"etcd answered a {what} that is not base64 text: {text!r}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:
        raise EtcdRequestError(f"etcd answered a {what} that is not base64: {e}") from None


def _int(value: object, what: str) -> int:
    """An int64 of the gateway's JSON (written as a string; absent when 0)."""
    if value is None:
        return 0
    try:
        return int(str(value))
    except ValueError:
        raise EtcdRequestError(f"etcd answered a {what} that is not an integer: {value!r}") from None


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


def parse_etcd_url(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an etcd client URL ``http(s)://host[:port]``; InvalidEtcdConfig else."""
    if not isinstance(url, str):
        raise InvalidEtcdConfig(f"the etcd URL must be a string such as http://127.0.0.1:2379, got {url!r}")
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
        or port == -1
    ):
        raise InvalidEtcdConfig(
            f"the etcd URL must be http(s)://host[:port] with no path, user or query, got {url!r}"
        )
    return parts.scheme, parts.hostname, port or 2379


class EtcdClusterState:
    """The cluster-state store on etcd (``docs/cluster.md``). Thread-safe: one connection per thread.

    ``url``: the etcd client URL. ``prefix``: where this cluster's keys live (several clusters, or tests,
    can share one etcd under different prefixes). ``timeout_s``: the bound on connecting and on each read
    of an answer; past it a call raises :class:`ClusterStateUnavailable`.
    """

    def __init__(
        self, url: str, *, prefix: str = DEFAULT_PREFIX, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self._scheme, self._host, self._port = parse_etcd_url(url)
        self.url = url.rstrip("/")
        if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix.endswith("/"):
            raise InvalidEtcdConfig(f"the key prefix must start and end with '/', got {prefix!r}")
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not (math.isfinite(timeout_s) and timeout_s > 0)
        ):
            raise InvalidEtcdConfig(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        self.prefix = prefix
        self.timeout_s = float(timeout_s)
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._connections_lock = threading.Lock()
        self._cache: dict[str, tuple[str, object]] = {}  # key -> (base64 value, decoded record)

    def __repr__(self) -> str:
        return f"EtcdClusterState({self.url!r}, prefix={self.prefix!r})"

    # -- keys ----------------------------------------------------------------------------------------
    def _key(self, kind: str, name: str) -> bytes:
        return f"{self.prefix}{kind}{name}".encode()

    def server_key(self, name: str) -> str:
        """The etcd key of server ``name``'s report."""
        return self._key(_SERVERS, name).decode()

    def model_key(self, name: str) -> str:
        """The etcd key of model ``name``'s spec."""
        return self._key(_MODELS, name).decode()

    def node_key(self, name: str) -> str:
        """The etcd key of node ``name``'s registration."""
        return self._key(_NODES, name).decode()

    def epoch_key(self, name: str) -> str:
        """The etcd key whose ``mod_revision`` is server ``name``'s incarnation epoch."""
        return self._key(_EPOCHS, name).decode()

    # -- HTTP ----------------------------------------------------------------------------------------
    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout_s)
        self._local.conn = conn
        with self._connections_lock:
            self._connections.append(conn)
        return conn, False

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()
            with self._connections_lock:
                if conn in self._connections:
                    self._connections.remove(conn)

    def close(self) -> None:
        """Close every connection this store opened (it reconnects on the next call)."""
        with self._connections_lock:
            conns, self._connections = self._connections, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>``; the decoded answer, or the matching ClusterStateError."""
        data = json.dumps(body).encode()
        status, raw = 0, b""
        for attempt in range(2):
            conn, reused = self._connection()
            try:
                conn.request("POST", f"/v3/{path}", body=data, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                status, raw = resp.status, resp.read()
                break
            except _RETRYABLE as e:
                self._drop()
                if reused and attempt == 0:  # the server closed an idle keep-alive connection
                    continue
                raise self._unavailable(path, e) from None
            except (OSError, http.client.HTTPException) as e:  # refused, timed out, reset, bad status line
                self._drop()
                raise self._unavailable(path, e) from None
        try:
            answer = json.loads(raw.splitlines()[0] if raw else b"{}")
        except (ValueError, IndexError):
            raise EtcdRequestError(
                f"etcd at {self.url} answered /v3/{path} with HTTP {status} and no JSON: {raw[:200]!r}"
            ) from None
        if not isinstance(answer, dict):
            raise EtcdRequestError(f"etcd at {self.url} answered /v3/{path} with {answer!r}")
        if status != 200 or "error" in answer:
            raise self._error(path, status, answer)
        return answer

    def _unavailable(self, path: str, e: BaseException) -> ClusterStateUnavailable:
        return ClusterStateUnavailable(
            f"etcd at {self.url} did not answer /v3/{path} within {self.timeout_s:g} s "
            f"({type(e).__name__}: {e}); check that etcd runs and is reachable"
        )

    def _error(self, path: str, status: int, answer: Mapping[str, Any]) -> ClusterStateError:
        message = str(answer.get("message") or answer.get("error") or answer)
        code = answer.get("code")
        if code == _NOT_FOUND and "lease not found" in message:
            return LeaseNotFoundError(f"{message}: the lease has expired or was revoked; grant a new one")
        if code in (_UNAVAILABLE, _DEADLINE_EXCEEDED) or status in (502, 503, 504):
            return ClusterStateUnavailable(f"etcd at {self.url} cannot serve /v3/{path} now: {message}")
        return EtcdRequestError(
            f"etcd at {self.url} refused /v3/{path} (HTTP {status}, code {code}): {message}"
        )

    # -- kv helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _kvs(answer: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        kvs = answer.get("kvs") or []
        if not isinstance(kvs, list):
            raise EtcdRequestError(f"etcd answered a range whose kvs is not a list: {kvs!r}")
        return kvs

    def _range_one(self, key: bytes) -> Mapping[str, Any] | None:
        kvs = self._kvs(self._call("kv/range", {"key": _b64(key)}))
        return kvs[0] if kvs else None

    @staticmethod
    def _revision(answer: Mapping[str, Any]) -> int:
        header = answer.get("header") or {}
        return _int(header.get("revision"), "header revision")

    def _txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]], reads: list[bytes]
    ) -> tuple[bool, dict[str, Any], list[Mapping[str, Any] | None]]:
        """One transaction; on failure, the current kv (or None) of each key in ``reads``."""
        failure = [{"request_range": {"key": _b64(k)}} for k in reads]
        answer = self._call("kv/txn", {"compare": compare, "success": success, "failure": failure})
        if answer.get("succeeded"):
            return True, answer, []
        found: list[Mapping[str, Any] | None] = []
        for resp in answer.get("responses") or []:
            kvs = self._kvs((resp or {}).get("response_range") or {})
            found.append(kvs[0] if kvs else None)
        found += [None] * (len(reads) - len(found))
        return False, answer, found

    def _fenced_compares(
        self, key: bytes, name: str, expected: int | None, epoch: int | None, *, must_exist: bool = False
    ) -> tuple[list[dict[str, Any]], list[bytes]]:
        compare: list[dict[str, Any]] = []
        if must_exist:
            compare.append(
                {"key": _b64(key), "target": "CREATE", "result": "GREATER", "create_revision": "0"}
            )
        if expected is not None:
            if expected == 0:
                compare.append(
                    {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                )
            else:
                compare.append(
                    {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(expected)}
                )
        reads = [key]
        if epoch is not None:
            ekey = self._key(_EPOCHS, name)
            compare.append(
                {"key": _b64(ekey), "target": "MOD", "result": "EQUAL", "mod_revision": str(epoch)}
            )
            reads.append(ekey)
        return compare, reads

    def _raise_lost(
        self,
        key: bytes,
        name: str,
        *,
        expected: int | None,
        epoch: int | None,
        found: list[Mapping[str, Any] | None],
        missing: type[LookupError] | None = None,
    ) -> None:
        current = found[0]
        if missing is not None and current is None:
            raise missing(f"nothing stored under {name!r} (etcd key {key.decode()!r})")
        if epoch is not None:
            ekv = found[1]
            now = _int(ekv.get("mod_revision"), "mod_revision") if ekv is not None else None
            if now != epoch:
                raise StaleEpochError(
                    f"server {name!r}: the write carries epoch {epoch}, but its current incarnation is "
                    f"{'none' if now is None else now}; this writer was superseded and must stop"
                )
        at = _int(current.get("mod_revision"), "mod_revision") if current is not None else 0
        if expected is not None and at != expected:
            raise RevisionConflictError(f"{name!r} is at revision {at}, the write expected {expected}")
        raise EtcdRequestError(
            f"etcd refused the transaction on {key.decode()!r} but every compare holds now"
        )

    def _put(
        self,
        kind: str,
        name: str,
        value: bytes,
        expected: int | None,
        *,
        lease: Lease | None = None,
        epoch: int | None = None,
    ) -> int:
        key = self._key(kind, name)
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            put["lease"] = str(lease.id)
        compare, reads = self._fenced_compares(key, name, expected, epoch)
        ok, answer, found = self._txn(compare, [{"request_put": put}], reads)
        if not ok:
            self._raise_lost(key, name, expected=expected, epoch=epoch, found=found)
        return self._revision(answer)

    def _delete(
        self, kind: str, name: str, expected: int | None, missing: type[LookupError], epoch: int | None = None
    ) -> None:
        key = self._key(kind, name)
        compare, reads = self._fenced_compares(key, name, expected, epoch, must_exist=True)
        ok, _, found = self._txn(compare, [{"request_delete_range": {"key": _b64(key)}}], reads)
        if not ok:
            self._raise_lost(key, name, expected=expected, epoch=epoch, found=found, missing=missing)

    # -- the store -----------------------------------------------------------------------------------
    @property
    def revision(self) -> int:
        """The store-wide revision of the last write (etcd's current revision)."""
        key = self.prefix.encode()
        return self._revision(self._call("kv/range", {"key": _b64(key), "count_only": True}))

    def get_server(self, name: str) -> Versioned[ServerState]:
        """The stored state of server ``name``."""
        key = self._key(_SERVERS, name)
        kv = self._range_one(key)
        if kv is None:
            raise UnknownServerError(f"no server named {name!r} is stored")
        state = decode_server(_unb64(kv.get("value", ""), "value"), key.decode(), name=name)
        return Versioned(state, _int(kv.get("mod_revision"), "mod_revision"))

    def put_server(
        self,
        state: ServerState,
        *,
        expected_revision: int | None = None,
        lease: Lease | None = None,
        epoch: int | None = None,
    ) -> int:
        """Store ``state`` under its name (under ``lease``, fenced by ``epoch``); returns the new revision."""
        return self._put(
            _SERVERS, state.name, encode_server(state), expected_revision, lease=lease, epoch=epoch
        )

    def delete_server(
        self, name: str, *, expected_revision: int | None = None, epoch: int | None = None
    ) -> None:
        """Remove server ``name``."""
        self._delete(_SERVERS, name, expected_revision, UnknownServerError, epoch)

    def get_model(self, name: str) -> Versioned[ModelSpec]:
        """The stored spec of model ``name``."""
        key = self._key(_MODELS, name)
        kv = self._range_one(key)
        if kv is None:
            raise UnknownModelError(f"no model named {name!r} is stored")
        spec = decode_model(_unb64(kv.get("value", ""), "value"), key.decode(), name=name)
        return Versioned(spec, _int(kv.get("mod_revision"), "mod_revision"))

    def put_model(self, spec: ModelSpec, *, expected_revision: int | None = None) -> int:
        """Store ``spec`` under its name; returns the new revision."""
        return self._put(_MODELS, spec.name, encode_model(spec), expected_revision)

    def delete_model(self, name: str, *, expected_revision: int | None = None) -> None:
        """Remove model ``name``."""
        self._delete(_MODELS, name, expected_revision, UnknownModelError)

    def get_node(self, name: str) -> Versioned[NodeRecord]:
        """The registration of node ``name``."""
        key = self._key(_NODES, name)
        kv = self._range_one(key)
        if kv is None:
            raise UnknownServerError(f"no node named {name!r} is registered")
        record = decode_node(_unb64(kv.get("value", ""), "value"), key.decode(), name=name)
        return Versioned(record, _int(kv.get("mod_revision"), "mod_revision"))

    def put_node(
        self, record: NodeRecord, *, lease: Lease | None = None, expected_revision: int | None = None
    ) -> int:
        """Register ``record`` under ``lease``, fenced by its epoch (one transaction); the new revision."""
        return self._put(
            _NODES, record.name, encode_node(record), expected_revision, lease=lease, epoch=record.epoch
        )

    def delete_node(self, name: str, *, epoch: int | None = None) -> None:
        """Remove node ``name``'s registration."""
        self._delete(_NODES, name, None, UnknownServerError, epoch)

    def put_deployment(self, name: str, config: Mapping[str, Any]) -> int:
        """Deploy model ``name`` with its scheduler config, for every replica."""
        check_allocation_names(name)
        return self._put(_DEPLOYMENTS, name, encode_deployment(name, config), None)

    def delete_deployment(self, name: str) -> None:
        """Withdraw model ``name`` from every replica."""
        self._delete(_DEPLOYMENTS, name, None, UnknownModelError)

    def read(self) -> StateView:
        """Every server, model and node with its revision: one range read of the prefix, at one revision."""
        prefix = self.prefix.encode()
        answer = self._call("kv/range", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})
        servers: dict[str, Versioned[ServerState]] = {}
        models: dict[str, Versioned[ModelSpec]] = {}
        nodes: dict[str, Versioned[NodeRecord]] = {}
        deployments: dict[str, Versioned[Mapping[str, Any]]] = {}
        sp, mp, ep, np_, dp = (self._key(k, "") for k in (_SERVERS, _MODELS, _EPOCHS, _NODES, _DEPLOYMENTS))
        decoded: dict[str, tuple[str, object]] = {}
        for kv in self._kvs(answer):
            key = _unb64(kv.get("key"), "key")
            rev = _int(kv.get("mod_revision"), "mod_revision")
            try:
                text = key.decode()
            except UnicodeDecodeError:
                raise CorruptClusterStateError(
                    f"cluster state holds the key {key!r}, which is not UTF-8; delete it"
                ) from None
            if key.startswith(sp):
                name = text[len(sp.decode()) :]
                servers[name] = Versioned(self._decoded(kv, text, name, decode_server, decoded), rev)
            elif key.startswith(mp):
                name = text[len(mp.decode()) :]
                models[name] = Versioned(self._decoded(kv, text, name, decode_model, decoded), rev)
            elif key.startswith(dp):
                name = text[len(dp.decode()) :]
                deployments[name] = Versioned(self._decoded(kv, text, name, decode_deployment, decoded), rev)
            elif key.startswith(np_):
                name = text[len(np_.decode()) :]
                nodes[name] = Versioned(self._decoded(kv, text, name, decode_node, decoded), rev)
            elif not key.startswith(ep):
                logger.debug("ignoring key %r under the cluster-state prefix", text)
        self._cache = decoded  # only what the last read saw: deleted keys drop out
        return StateView(self._revision(answer), servers, models, nodes, deployments)

    def _decoded(
        self,
        kv: Mapping[str, Any],
        key: str,
        name: str,
        decode: Callable[..., _R],
        out: dict[str, tuple[str, object]],
    ) -> _R:
        """The decoded record of ``kv``: the one the last read decoded when its bytes are the same (so
        unchanged servers keep their objects, which the snapshot index reuses), else decoded afresh."""
        raw = kv.get("value", "")
        hit = self._cache.get(key)
        if hit is not None and hit[0] == raw:
            out[key] = hit
            return hit[1]  # type: ignore[return-value]
        record = decode(_unb64(raw, "value"), key, name=name)
        out[key] = (str(raw), record)
        return record

    def snapshot(self, now: float, demand: Mapping[str, float] | None = None) -> ClusterSnapshot:
        """Every server and model as of one revision, stamped with ``now`` and the caller's ``demand``."""
        return self.read().snapshot(now, demand)

    # -- allocations ---------------------------------------------------------------------------------
    # version keys P alloc-rev/<server> (its mod_revision is the allocation revision: claims, loaded and
    # unloading records) and P use-rev/<server> (the in-use revision: in-use counts only); the records under
    # P alloc/<server>/: loads/<model> (claim, replica's lease), loaded/<model>, unloading/<model>,
    # inuse/<model>/<replica>
    def _alloc_rev_key(self, server: str) -> bytes:
        return self._key(_ALLOC_REV, server)

    def _use_rev_key(self, server: str) -> bytes:
        return self._key(_USE_REV, server)

    def _alloc_key(self, server: str, *parts: str) -> bytes:
        return self._key(_ALLOC, "/".join((server, *parts)))

    def _bump_op(self, server: str) -> dict[str, Any]:
        value = encode_alloc("alloc-version", {"server": server})
        return {"request_put": {"key": _b64(self._alloc_rev_key(server)), "value": _b64(value)}}

    @staticmethod
    def _version_compare(version_key: bytes, expected: int) -> dict[str, Any]:
        key = _b64(version_key)
        if expected == 0:
            return {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        return {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(expected)}

    def _alloc_write(
        self,
        server: str,
        ops: list[dict[str, Any]],
        expected: int | None,
        what: str,
        *,
        expected_use: int | None = None,
    ) -> int:
        """One transaction: ``ops`` and the allocation revision's bump, if the allocation revision is
        ``expected`` and (``expected_use`` not None) the in-use revision is ``expected_use``."""
        compare, reads = [], [self._alloc_rev_key(server)]
        if expected is not None:
            compare.append(self._version_compare(self._alloc_rev_key(server), expected))
        if expected_use is not None:
            compare.append(self._version_compare(self._use_rev_key(server), expected_use))
            reads.append(self._use_rev_key(server))
        ok, answer, found = self._txn(compare, [*ops, self._bump_op(server)], reads)
        if not ok:
            now = [_int(kv.get("mod_revision"), "mod_revision") if kv is not None else 0 for kv in found]
            if expected is not None and now[0] != expected:
                raise RevisionConflictError(
                    f"allocation of {server!r} is at revision {now[0]}, the {what} expected {expected}"
                )
            raise RevisionConflictError(
                f"in-use counts of {server!r} are at revision {now[1] if len(now) > 1 else 0}, the {what} "
                f"expected {expected_use}"
            )
        return self._revision(answer)

    def allocation(self, server: str) -> Allocation:
        """What the replicas together hold on ``server``: its two version keys and records in one
        transaction."""
        check_allocation_names(server)
        prefix = self._alloc_key(server, "")
        ranges = [
            {"request_range": {"key": _b64(self._alloc_rev_key(server))}},
            {"request_range": {"key": _b64(self._use_rev_key(server))}},
            {"request_range": {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}},
        ]
        answer = self._call("kv/txn", {"compare": [], "success": ranges, "failure": []})
        responses = answer.get("responses") or []
        if len(responses) != 3:
            raise EtcdRequestError(f"etcd answered the allocation read with {len(responses)} responses")
        version = self._kvs((responses[0] or {}).get("response_range") or {})
        revision = _int(version[0].get("mod_revision"), "mod_revision") if version else 0
        use_version = self._kvs((responses[1] or {}).get("response_range") or {})
        use_revision = _int(use_version[0].get("mod_revision"), "mod_revision") if use_version else 0
        loads: dict[str, LoadClaim] = {}
        loaded: dict[str, int] = {}
        unloading: dict[str, LoadClaim] = {}
        in_use: dict[str, dict[str, int]] = {}
        for kv in self._kvs((responses[2] or {}).get("response_range") or {}):
            key = _unb64(kv.get("key"), "key")
            text = key.decode(errors="replace")
            rest = key[len(prefix) :].decode(errors="replace").split("/")
            data = _unb64(kv.get("value", ""), "value")
            if rest[0] == "loads" and len(rest) == 2:
                v = decode_alloc(data, text, "alloc-claim")
                loads[rest[1]] = LoadClaim(v["replica"], v["size_bytes"])
            elif rest[0] == "loaded" and len(rest) == 2:
                loaded[rest[1]] = decode_alloc(data, text, "alloc-loaded")["size_bytes"]
            elif rest[0] == "unloading" and len(rest) == 2:
                v = decode_alloc(data, text, "alloc-claim")
                unloading[rest[1]] = LoadClaim(v["replica"], v["size_bytes"])
            elif rest[0] == "inuse" and len(rest) == 3:
                count = decode_alloc(data, text, "alloc-inuse")["count"]
                if count > 0:
                    in_use.setdefault(rest[1], {})[rest[2]] = count
            else:
                logger.debug("ignoring key %r under the allocation of %s", text, server)
        return Allocation(server, revision, loads, loaded, in_use, unloading, use_revision)

    def claim_load(
        self, server: str, model: str, size_bytes: int, replica: str, *, lease: Lease, expected_revision: int
    ) -> int:
        """Claim the load of ``model`` on ``server`` for ``replica``: one transaction comparing the
        allocation revision, writing the claim under ``lease`` and bumping the revision."""
        check_allocation_names(server, model, replica)
        value = encode_alloc("alloc-claim", {"replica": replica, "size_bytes": int(size_bytes)})
        put = {
            "key": _b64(self._alloc_key(server, "loads", model)),
            "value": _b64(value),
            "lease": str(lease.id),
        }
        return self._alloc_write(server, [{"request_put": put}], expected_revision, "claim")

    def finish_load(self, server: str, model: str, replica: str, *, size_bytes: int | None) -> int:
        """End ``replica``'s claim on ``model`` (only its own: compared on the claim's value); record the model
        loaded when ``size_bytes`` is given."""
        check_allocation_names(server, model, replica)
        claim_key = self._alloc_key(server, "loads", model)
        ops: list[dict[str, Any]] = []
        kv = self._range_one(claim_key)
        if (
            kv is not None
            and decode_alloc(_unb64(kv.get("value", ""), "value"), claim_key.decode(), "alloc-claim")[
                "replica"
            ]
            == replica
        ):
            ops.append({"request_delete_range": {"key": _b64(claim_key)}})
        if size_bytes is not None:
            value = encode_alloc("alloc-loaded", {"size_bytes": int(size_bytes)})
            ops.append(
                {"request_put": {"key": _b64(self._alloc_key(server, "loaded", model)), "value": _b64(value)}}
            )
        return self._alloc_write(server, ops, None, "finish")

    def set_in_use(self, server: str, model: str, replica: str, count: int, *, lease: Lease) -> int:
        """Set ``replica``'s count of generations on ``model`` at ``server`` (0 deletes it), under ``lease``:
        one transaction that bumps the in-use revision only (claims do not compare it); the new revision."""
        check_allocation_names(server, model, replica)
        key = _b64(self._alloc_key(server, "inuse", model, replica))
        if count > 0:
            value = _b64(encode_alloc("alloc-inuse", {"count": int(count)}))
            op = {"request_put": {"key": key, "value": value, "lease": str(lease.id)}}
        else:
            op = {"request_delete_range": {"key": key}}
        version = encode_alloc("use-version", {"server": server})
        bump = {"request_put": {"key": _b64(self._use_rev_key(server)), "value": _b64(version)}}
        _, answer, _ = self._txn([], [op, bump], [])
        return self._revision(answer)

    def release_loaded(
        self,
        server: str,
        model: str,
        replica: str,
        *,
        expected_revision: int,
        expected_use_revision: int,
        lease: Lease,
    ) -> int:
        """Move ``model`` on ``server`` from loaded to unloading (its bytes kept, under ``lease``): one
        transaction comparing both the allocation and the in-use revision (a count written since, such as
        another replica's generation starting on it, makes it conflict)."""
        check_allocation_names(server, model, replica)
        loaded_key = self._alloc_key(server, "loaded", model)
        kv = self._range_one(loaded_key)
        ops: list[dict[str, Any]] = [{"request_delete_range": {"key": _b64(loaded_key)}}]
        if kv is not None:
            size = decode_alloc(_unb64(kv.get("value", ""), "value"), loaded_key.decode(), "alloc-loaded")[
                "size_bytes"
            ]
            value = _b64(encode_alloc("alloc-claim", {"replica": replica, "size_bytes": int(size)}))
            key = _b64(self._alloc_key(server, "unloading", model))
            ops.append({"request_put": {"key": key, "value": value, "lease": str(lease.id)}})
        return self._alloc_write(
            server, ops, expected_revision, "release", expected_use=expected_use_revision
        )

    def unloaded(self, server: str, model: str, replica: str) -> int:
        """``replica``'s unload of ``model`` on ``server`` freed its memory (only its own record goes)."""
        check_allocation_names(server, model, replica)
        key = self._alloc_key(server, "unloading", model)
        kv = self._range_one(key)
        ops: list[dict[str, Any]] = []
        if kv is not None:
            owner = decode_alloc(_unb64(kv.get("value", ""), "value"), key.decode(), "alloc-claim")["replica"]
            if owner == replica:
                compare_value = {"key": _b64(key), "target": "MOD", "result": "EQUAL"}
                compare_value["mod_revision"] = str(_int(kv.get("mod_revision"), "mod_revision"))
                ok, answer, _ = self._txn(
                    [compare_value], [{"request_delete_range": {"key": _b64(key)}}, self._bump_op(server)], []
                )
                if ok:
                    return self._revision(answer)
        return self._alloc_write(server, ops, None, "unload")

    # -- leases and epochs ---------------------------------------------------------------------------
    def grant_lease(self, ttl_s: int = DEFAULT_LEASE_TTL_S) -> Lease:
        """A new lease; etcd grants at least its minimum TTL (``docs/cluster.md``)."""
        ttl_s = check_lease_ttl(ttl_s)
        answer = self._call("lease/grant", {"TTL": str(ttl_s)})
        return Lease(_int(answer.get("ID"), "lease ID"), _int(answer.get("TTL"), "lease TTL"))

    def keep_alive(self, lease: Lease) -> int:
        """Restart ``lease``'s TTL; returns the TTL granted. :class:`LeaseNotFoundError` once it is gone."""
        answer = self._call("lease/keepalive", {"ID": str(lease.id)})
        result = answer.get("result") or {}
        ttl = _int(result.get("TTL"), "lease TTL") if isinstance(result, dict) else 0
        if ttl <= 0:
            raise LeaseNotFoundError(f"lease {lease.id} has expired or was revoked; grant a new one")
        return ttl

    def revoke_lease(self, lease: Lease) -> None:
        """End ``lease`` now, deleting every key under it."""
        self._call("lease/revoke", {"ID": str(lease.id)})

    def begin_incarnation(self, server: str) -> int:
        """Start a new incarnation of ``server``: a put of its epoch key, whose new ``mod_revision`` is the epoch."""
        answer = self._call(
            "kv/put", {"key": _b64(self._key(_EPOCHS, server)), "value": _b64(encode_epoch(server))}
        )
        return self._revision(answer)

    def epoch(self, server: str) -> int | None:
        """The current incarnation epoch of ``server``, or None if it never began one."""
        key = self._key(_EPOCHS, server)
        kv = self._range_one(key)
        if kv is None:
            return None
        decode_epoch(_unb64(kv.get("value", ""), "value"), key.decode(), name=server)
        return _int(kv.get("mod_revision"), "mod_revision")
