"""The JSON records a cluster-state store keeps (server reports, model specs, incarnation epochs). Pure.

Every record is one JSON object ``{"schema": 1, "kind": "<kind>", "value": {...}}`` in UTF-8 (no pickle):
``schema`` is :data:`SCHEMA_VERSION` and changes with any incompatible change to a ``value``; a reader
refuses any other version, and refuses a value with a missing, unknown or mistyped field, with
:class:`~warmstart.scheduler.errors.CorruptClusterStateError` naming the key it was read from. The field
lists are the dataclasses of :mod:`warmstart.scheduler.state`; ``docs/cluster.md`` has them as tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from warmstart import jsonsafe
from warmstart.scheduler.errors import CorruptClusterStateError, InvalidSnapshotError
from warmstart.scheduler.state import (
    Instance,
    LoadInFlight,
    ModelSpec,
    NodeBandwidth,
    NodeRecord,
    PendingLoad,
    RunningRequest,
    ServerState,
    Tier,
)

__all__ = [
    "MAX_RECORD_BYTES",
    "SCHEMA_VERSION",
    "decode_alloc",
    "decode_deployment",
    "decode_epoch",
    "decode_model",
    "decode_node",
    "decode_server",
    "encode_alloc",
    "encode_deployment",
    "encode_epoch",
    "encode_model",
    "encode_node",
    "encode_server",
]

SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 1 << 20
"""A record longer than this is refused on read (etcd's default request limit is 1.5 MiB)."""

_T = TypeVar("_T")


# --- encoding ------------------------------------------------------------------------------------------


def _int(owner: str, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSnapshotError(f"{owner}: {key} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidSnapshotError(f"{owner}: {key} must be an integer, got {value!r}")
        return int(value)
    return value


def _unpinned(owner: str, instance: Instance) -> Instance:
    if instance.pinned:  # a replica's own view of another replica's use; the stored schema has no field
        raise InvalidSnapshotError(
            f"{owner}: instance {instance.model!r} is pinned (another replica's view), which is not stored"
        )
    return instance


def _float(owner: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidSnapshotError(f"{owner}: {key} must be a finite number to be stored, got {value!r}")
    return float(value)


def _dump(kind: str, value: Mapping[str, Any]) -> bytes:
    record = {"schema": SCHEMA_VERSION, "kind": kind, "value": value}
    return json.dumps(record, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def _server_value(s: ServerState) -> dict[str, Any]:
    who = f"server {s.name!r}"
    bw = s.bandwidth
    return {
        "name": s.name,
        "healthy": bool(s.healthy),
        "memory_budget_bytes": _int(who, "memory_budget_bytes", s.memory_budget_bytes),
        "bandwidth": {
            "memory_bps": _float(who, "memory_bps", bw.memory_bps),
            "disk_bps": _float(who, "disk_bps", bw.disk_bps),
            "remote_bps": None if bw.remote_bps is None else _float(who, "remote_bps", bw.remote_bps),
        },
        "triton_load_overhead_s": _float(who, "triton_load_overhead_s", s.triton_load_overhead_s),
        "instances": [
            {
                "model": _unpinned(who, i).model,
                "size_bytes": _int(who, "size_bytes", i.size_bytes),
                "last_used_s": _float(who, "last_used_s", i.last_used_s),
                "requests": [
                    {
                        "request_id": r.request_id,
                        "prompt_tokens": _int(who, "prompt_tokens", r.prompt_tokens),
                        "generated_tokens": _int(who, "generated_tokens", r.generated_tokens),
                        "expected_remaining_s": _float(who, "expected_remaining_s", r.expected_remaining_s),
                    }
                    for r in i.requests
                ],
            }
            for i in s.instances
        ],
        "loading": [
            {
                "model": ld.model,
                "size_bytes": _int(who, "size_bytes", ld.size_bytes),
                "expected_finish_s": _float(who, "expected_finish_s", ld.expected_finish_s),
            }
            for ld in s.loading
        ],
        "load_queue": [
            {
                "model": p.model,
                "size_bytes": _int(who, "size_bytes", p.size_bytes),
                "expected_load_s": _float(who, "expected_load_s", p.expected_load_s),
            }
            for p in s.load_queue
        ],
        "store_tiers": {model: tier.value for model, tier in s.store_tiers.items()},
        "eviction_s": _float(who, "eviction_s", s.eviction_s),
        "repository": None if s.repository is None else sorted(s.repository),
        "freeing_bytes": _int(who, "freeing_bytes", s.freeing_bytes),
    }


def encode_server(state: ServerState) -> bytes:
    """The record of a server report. :class:`InvalidSnapshotError` for a value JSON cannot hold
    (a non-finite time, a fractional byte count)."""
    return _dump("server", _server_value(state))


def encode_model(spec: ModelSpec) -> bytes:
    """The record of a model spec."""
    who = f"model {spec.name!r}"
    return _dump(
        "model",
        {
            "name": spec.name,
            "checkpoint_uri": spec.checkpoint_uri,
            "size_bytes": _int(who, "size_bytes", spec.size_bytes),
            "engine": spec.engine,
            "keep_alive_s": _float(who, "keep_alive_s", spec.keep_alive_s),
            "max_concurrency": _int(who, "max_concurrency", spec.max_concurrency),
        },
    )


def encode_node(record: NodeRecord) -> bytes:
    """The record of a node's registration."""
    who = f"node {record.name!r}"
    bw = record.bandwidth
    return _dump(
        "node",
        {
            "name": record.name,
            "grpc": record.grpc,
            "memory_budget_bytes": _int(who, "memory_budget_bytes", record.memory_budget_bytes),
            "epoch": _int(who, "epoch", record.epoch),
            "node_store": record.node_store,
            "repository_key_env": record.repository_key_env,
            "bandwidth": None
            if bw is None
            else {
                "memory_bps": _float(who, "memory_bps", bw.memory_bps),
                "disk_bps": _float(who, "disk_bps", bw.disk_bps),
                "remote_bps": None if bw.remote_bps is None else _float(who, "remote_bps", bw.remote_bps),
            },
            "store_tiers": {model: tier.value for model, tier in record.store_tiers.items()},
        },
    )


def encode_epoch(server: str) -> bytes:
    """The record of a server's incarnation key; the epoch itself is that key's ``mod_revision``."""
    return _dump("epoch", {"server": server})


# --- decoding ------------------------------------------------------------------------------------------


class _Reader:
    """Typed field access on a decoded record; every failure is a :class:`CorruptClusterStateError`."""

    def __init__(self, key: str) -> None:
        self.key = key

    def fail(self, where: str, what: str) -> CorruptClusterStateError:
        return CorruptClusterStateError(
            f"cluster state at key {self.key!r} is corrupt: {where}: {what}; delete the key or rewrite it "
            f"with this version of warmstart (record schema {SCHEMA_VERSION})"
        )

    def obj(self, value: object, where: str, fields: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {type(value).__name__}")
        missing = [f for f in fields if f not in value]
        unknown = sorted(set(value) - set(fields))
        if missing or unknown:
            raise self.fail(where, f"missing fields {missing}, unknown fields {unknown}")
        return value

    def str_(self, d: Mapping[str, Any], field: str, where: str) -> str:
        value = d[field]
        if not isinstance(value, str):
            raise self.fail(f"{where}.{field}", f"expected a string, got {value!r}")
        return value

    def bool_(self, d: Mapping[str, Any], field: str, where: str) -> bool:
        value = d[field]
        if not isinstance(value, bool):
            raise self.fail(f"{where}.{field}", f"expected true or false, got {value!r}")
        return value

    def int_(self, d: Mapping[str, Any], field: str, where: str) -> int:
        value = d[field]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{where}.{field}", f"expected an integer, got {value!r}")
        return value

    def num(self, d: Mapping[str, Any], field: str, where: str, *, nullable: bool = False) -> Any:
        value = d[field]
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"{where}.{field}", f"expected a number, got {value!r}")
        return float(value)

    def list_(
        self, d: Mapping[str, Any], field: str, where: str, item: Callable[[object, str], _T]
    ) -> tuple[_T, ...]:
        value = d[field]
        if not isinstance(value, list):
            raise self.fail(f"{where}.{field}", f"expected a list, got {type(value).__name__}")
        return tuple(item(v, f"{where}.{field}[{n}]") for n, v in enumerate(value))


def _record(data: bytes, key: str, kind: str) -> tuple[_Reader, Mapping[str, Any]]:
    r = _Reader(key)
    if len(data) > MAX_RECORD_BYTES:
        raise r.fail("record", f"{len(data)} bytes, more than the limit of {MAX_RECORD_BYTES}")
    try:
        doc = jsonsafe.loads(data)
    except ValueError as e:  # malformed JSON, not UTF-8, NaN, too deep
        raise r.fail("record", f"not a JSON document ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION:
        schema = doc.get("schema") if isinstance(doc, dict) else None
        raise r.fail("record", f"schema version {schema!r}, this reader knows only {SCHEMA_VERSION}")
    top = r.obj(doc, "record", ("schema", "kind", "value"))
    if top["kind"] != kind:
        raise r.fail("record", f"kind {top['kind']!r} where a {kind!r} record belongs")
    return r, top["value"]


def _decode(build: Callable[[], _T], r: _Reader, where: str) -> _T:
    try:
        return build()
    except InvalidSnapshotError as e:  # the dataclasses' own checks (negative sizes, bad bandwidths...)
        raise r.fail(where, str(e)) from None


def decode_server(data: bytes, key: str, *, name: str | None = None) -> ServerState:
    """A server report read back from ``key``; ``name``: the name the key says it holds."""
    r, raw = _record(data, key, "server")
    v = r.obj(
        raw,
        "value",
        (
            "name",
            "healthy",
            "memory_budget_bytes",
            "bandwidth",
            "triton_load_overhead_s",
            "instances",
            "loading",
            "load_queue",
            "store_tiers",
            "eviction_s",
            "repository",
            "freeing_bytes",
        ),
    )
    server = r.str_(v, "name", "value")
    if name is not None and server != name:
        raise r.fail("value.name", f"{server!r}, but the key holds server {name!r}")
    bw = r.obj(v["bandwidth"], "value.bandwidth", ("memory_bps", "disk_bps", "remote_bps"))

    def request(x: object, where: str) -> RunningRequest:
        d = r.obj(x, where, ("request_id", "prompt_tokens", "generated_tokens", "expected_remaining_s"))
        return _decode(
            lambda: RunningRequest(
                r.str_(d, "request_id", where),
                r.int_(d, "prompt_tokens", where),
                r.int_(d, "generated_tokens", where),
                r.num(d, "expected_remaining_s", where),
            ),
            r,
            where,
        )

    def instance(x: object, where: str) -> Instance:
        d = r.obj(x, where, ("model", "size_bytes", "last_used_s", "requests"))
        return _decode(
            lambda: Instance(
                r.str_(d, "model", where),
                r.int_(d, "size_bytes", where),
                r.num(d, "last_used_s", where),
                r.list_(d, "requests", where, request),
            ),
            r,
            where,
        )

    def loading(x: object, where: str) -> LoadInFlight:
        d = r.obj(x, where, ("model", "size_bytes", "expected_finish_s"))
        return LoadInFlight(
            r.str_(d, "model", where), r.int_(d, "size_bytes", where), r.num(d, "expected_finish_s", where)
        )

    def pending(x: object, where: str) -> PendingLoad:
        d = r.obj(x, where, ("model", "size_bytes", "expected_load_s"))
        return PendingLoad(
            r.str_(d, "model", where), r.int_(d, "size_bytes", where), r.num(d, "expected_load_s", where)
        )

    tiers = _tiers(r, v["store_tiers"])
    repo_raw = v["repository"]
    repository: frozenset[str] | None = None
    if repo_raw is not None:
        if not isinstance(repo_raw, list) or not all(isinstance(m, str) for m in repo_raw):
            raise r.fail("value.repository", f"expected null or a list of names, got {repo_raw!r}")
        repository = frozenset(repo_raw)
    return _decode(
        lambda: ServerState(
            name=server,
            healthy=r.bool_(v, "healthy", "value"),
            memory_budget_bytes=r.int_(v, "memory_budget_bytes", "value"),
            bandwidth=NodeBandwidth(
                r.num(bw, "memory_bps", "value.bandwidth"),
                r.num(bw, "disk_bps", "value.bandwidth"),
                r.num(bw, "remote_bps", "value.bandwidth", nullable=True),
            ),
            triton_load_overhead_s=r.num(v, "triton_load_overhead_s", "value"),
            instances=r.list_(v, "instances", "value", instance),
            loading=r.list_(v, "loading", "value", loading),
            load_queue=r.list_(v, "load_queue", "value", pending),
            store_tiers=tiers,
            eviction_s=r.num(v, "eviction_s", "value"),
            repository=repository,
            freeing_bytes=r.int_(v, "freeing_bytes", "value"),
        ),
        r,
        "value",
    )


def _tiers(r: _Reader, tiers_raw: object) -> dict[str, Tier]:
    if not isinstance(tiers_raw, dict):
        raise r.fail("value.store_tiers", f"expected an object, got {type(tiers_raw).__name__}")
    tiers: dict[str, Tier] = {}
    for model, tier in tiers_raw.items():
        try:
            tiers[model] = Tier(tier)
        except ValueError:
            known = [t.value for t in Tier]
            raise r.fail(f"value.store_tiers[{model!r}]", f"{tier!r} is not one of {known}") from None
    return tiers


def decode_node(data: bytes, key: str, *, name: str | None = None) -> NodeRecord:
    """A node's registration read back from ``key``; ``name``: the name the key says it holds."""
    r, raw = _record(data, key, "node")
    fields = (
        "name",
        "grpc",
        "memory_budget_bytes",
        "epoch",
        "node_store",
        "repository_key_env",
        "bandwidth",
        "store_tiers",
    )
    v = r.obj(raw, "value", fields)
    node = r.str_(v, "name", "value")
    if name is not None and node != name:
        raise r.fail("value.name", f"{node!r}, but the key holds node {name!r}")
    for opt in ("node_store", "repository_key_env"):
        if v[opt] is not None and not isinstance(v[opt], str):
            raise r.fail(f"value.{opt}", f"expected null or a string, got {v[opt]!r}")
    bandwidth: NodeBandwidth | None = None
    if v["bandwidth"] is not None:
        bw = r.obj(v["bandwidth"], "value.bandwidth", ("memory_bps", "disk_bps", "remote_bps"))
        bandwidth = _decode(
            lambda: NodeBandwidth(
                r.num(bw, "memory_bps", "value.bandwidth"),
                r.num(bw, "disk_bps", "value.bandwidth"),
                r.num(bw, "remote_bps", "value.bandwidth", nullable=True),
            ),
            r,
            "value.bandwidth",
        )
    tiers = _tiers(r, v["store_tiers"])
    return _decode(
        lambda: NodeRecord(
            name=node,
            grpc=r.str_(v, "grpc", "value"),
            memory_budget_bytes=r.int_(v, "memory_budget_bytes", "value"),
            epoch=r.int_(v, "epoch", "value"),
            node_store=v["node_store"],
            repository_key_env=v["repository_key_env"],
            bandwidth=bandwidth,
            store_tiers=tiers,
        ),
        r,
        "value",
    )


def decode_model(data: bytes, key: str, *, name: str | None = None) -> ModelSpec:
    """A model spec read back from ``key``; ``name``: the name the key says it holds."""
    r, raw = _record(data, key, "model")
    fields = ("name", "checkpoint_uri", "size_bytes", "engine", "keep_alive_s", "max_concurrency")
    v = r.obj(raw, "value", fields)
    model = r.str_(v, "name", "value")
    if name is not None and model != name:
        raise r.fail("value.name", f"{model!r}, but the key holds model {name!r}")
    return _decode(
        lambda: ModelSpec(
            model,
            r.str_(v, "checkpoint_uri", "value"),
            r.int_(v, "size_bytes", "value"),
            r.str_(v, "engine", "value"),
            r.num(v, "keep_alive_s", "value"),
            r.int_(v, "max_concurrency", "value"),
        ),
        r,
        "value",
    )


def decode_epoch(data: bytes, key: str, *, name: str | None = None) -> str:
    """The server name an incarnation key's record names."""
    r, raw = _record(data, key, "epoch")
    v = r.obj(raw, "value", ("server",))
    server = r.str_(v, "server", "value")
    if name is not None and server != name:
        raise r.fail("value.server", f"{server!r}, but the key holds the epoch of {name!r}")
    return server


# --- allocation records (scheduler replicas' shared view of a server) ---------------------------------


def encode_alloc(kind: str, value: Mapping[str, Any]) -> bytes:
    """An allocation record: ``alloc-version`` {server}, ``use-version`` {server}, ``alloc-claim``
    {replica, size_bytes}, ``alloc-loaded`` {size_bytes} or ``alloc-inuse`` {count}."""
    if kind not in _ALLOC_FIELDS:
        raise InvalidSnapshotError(f"unknown allocation record kind {kind!r}")
    return _dump(kind, dict(value))


_ALLOC_FIELDS: dict[str, tuple[str, ...]] = {
    "alloc-version": ("server",),
    "use-version": ("server",),
    "alloc-claim": ("replica", "size_bytes"),
    "alloc-loaded": ("size_bytes",),
    "alloc-inuse": ("count",),
}


def decode_alloc(data: bytes, key: str, kind: str) -> Mapping[str, Any]:
    """An allocation record read back from ``key`` (its fields checked for their types)."""
    r, raw = _record(data, key, kind)
    v = r.obj(raw, "value", _ALLOC_FIELDS[kind])
    out: dict[str, Any] = {}
    for name in _ALLOC_FIELDS[kind]:
        out[name] = r.str_(v, name, "value") if name in ("server", "replica") else r.int_(v, name, "value")
        if name in ("size_bytes", "count") and out[name] < 0:
            raise r.fail(f"value.{name}", f"{out[name]} is negative")
    return out


def encode_deployment(name: str, config: Mapping[str, Any]) -> bytes:
    """The record of a deployed model: its name and its scheduler config (a JSON object)."""
    try:
        return _dump("deployment", {"name": name, "config": dict(config)})
    except (TypeError, ValueError) as e:
        raise InvalidSnapshotError(f"model {name!r}: its config cannot be stored as JSON ({e})") from None


def decode_deployment(data: bytes, key: str, *, name: str | None = None) -> Mapping[str, Any]:
    """A deployed model's config read back from ``key`` (checked by the scheduler when it deploys it)."""
    r, raw = _record(data, key, "deployment")
    v = r.obj(raw, "value", ("name", "config"))
    model = r.str_(v, "name", "value")
    if name is not None and model != name:
        raise r.fail("value.name", f"{model!r}, but the key holds model {name!r}")
    if not isinstance(v["config"], dict):
        raise r.fail("value.config", f"expected an object, got {type(v['config']).__name__}")
    return dict(v["config"])
