"""The scheduler process's typed configuration: one frozen object, read from YAML or a mapping.

Unknown keys are rejected everywhere; booleans and numbers are type-checked (``"false"`` is not a bool).
Model names are validated with the same allow-list every request passes through.

Example ``cluster.yaml``::

    listen: {http: "127.0.0.1:8080", grpc: "127.0.0.1:8081"}
    admin_token_file: /etc/warmstart/admin-token      # or admin_token: "..."
    cold_start_queue: 256
    cold_start_timeout_s: 120
    request_timeout_s: 300
    servers:
      - name: node-a
        http: 127.0.0.1:8000
        grpc: 127.0.0.1:8001
        repository_api_key: "s3cret-key"
        node_store: http://127.0.0.1:7070
        memory_budget_bytes: 8589934592
    models:
      smollm2:
        checkpoint: s3://models/smollm2
        engine: torch
        size_bytes: 270000000
        keep_alive_s: 300
        max_concurrency: 8
        max_tokens: 512
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Self

from warmstart.names import validate_model_name
from warmstart.scheduler.errors import InvalidModelName, SchedulerError
from warmstart.scheduler.state import ModelSpec, NodeBandwidth

POLICIES = ("warmstart", "random", "serverlessllm")


class SchedulerConfigError(SchedulerError, ValueError):
    """The scheduler configuration is invalid; the message names the key."""


def _reject_unknown(where: str, data: Mapping[str, Any], cls: type) -> None:
    if not isinstance(data, Mapping):
        raise SchedulerConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise SchedulerConfigError(
            f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )


# A decimal number as YAML users write it. YAML 1.1 (PyYAML) reads ``2.0e8`` and ``1e9`` as strings (its
# floats need a dot and a signed exponent), so numeric strings are accepted wherever a number is expected.
_NUMERIC = re.compile(r"[+-]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?")


def _number(where: str, value: object, *, minimum: float = 0.0, integer: bool = False) -> Any:
    """``value`` checked and converted: an ``int`` when ``integer``, else the number as given (or a float).

    Accepts YAML/JSON numbers and numeric strings (``"2.0e8"``, ``"1e9"``, ``"1_000"``); an integral float
    (``8.0e9``) passes where an integer is expected. Booleans, ``nan``/``inf`` and other strings are refused.
    """
    if isinstance(value, str):
        text = value.strip()
        if not _NUMERIC.fullmatch(text) or "__" in text or text.endswith("_"):
            raise SchedulerConfigError(f"{where} must be a number, got {value!r}")
        try:
            value = int(text.replace("_", "")) if re.fullmatch(r"[+-]?[\d_]+", text) else float(text)
        except ValueError:
            raise SchedulerConfigError(f"{where} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SchedulerConfigError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise SchedulerConfigError(f"{where} must be a finite number >= {minimum}, got {value!r}")
    if integer and not isinstance(value, int):
        if not value.is_integer():
            raise SchedulerConfigError(f"{where} must be an integer, got {value!r}")
        value = int(value)
    return value


def _set_number(obj: object, key: str, where: str, **kw: Any) -> None:
    """Check ``obj.key`` with :func:`_number` and store the converted value (frozen dataclasses too)."""
    object.__setattr__(obj, key, _number(where, getattr(obj, key), **kw))


def _address(where: str, value: object) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise SchedulerConfigError(f"{where} must be 'host:port', got {value!r}")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SchedulerConfigError(f"{where} must be 'host:port' with a port in 0..65535, got {value!r}")
    return host, int(port)


@dataclass(frozen=True)
class BandwidthConfig:
    """Static bytes/s: the figures of a server without a node store, or the fallback for tiers its node store
    has not measured yet (a fresh store reports ``remote_bps: null`` until its first download)."""

    memory_bps: float | None = None
    disk_bps: float | None = None
    remote_bps: float | None = None

    def __post_init__(self) -> None:
        for key in ("memory_bps", "disk_bps", "remote_bps"):
            if getattr(self, key) is not None:
                _set_number(self, key, f"bandwidth.{key}", minimum=1.0)

    def to_node_bandwidth(self) -> NodeBandwidth:
        """The policy's view of these figures (memory and disk must be given)."""
        if self.memory_bps is None or self.disk_bps is None:
            raise SchedulerConfigError("bandwidth: memory_bps and disk_bps are required without a node store")
        return NodeBandwidth(self.memory_bps, self.disk_bps, self.remote_bps)


@dataclass(frozen=True)
class ServerConfig:
    """One Triton server behind the scheduler."""

    name: str
    grpc: str
    http: str | None = None
    repository_api_key: str | None = field(default=None, repr=False)
    repository_api_header: str = "x-warmstart-repo-key"
    node_store: str | None = None
    memory_budget_bytes: int = 8 << 30
    bandwidth: BandwidthConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 128:
            raise SchedulerConfigError(f"server name must be a non-empty string, got {self.name!r}")
        _address(f"servers[{self.name}].grpc", self.grpc)
        if self.http is not None:
            _address(f"servers[{self.name}].http", self.http)
        _set_number(self, "memory_budget_bytes", f"servers[{self.name}].memory_budget_bytes", integer=True)
        if self.repository_api_key is not None and not isinstance(self.repository_api_key, str):
            raise SchedulerConfigError(f"servers[{self.name}].repository_api_key must be a string")
        if self.node_store is not None and not (
            isinstance(self.node_store, str) and self.node_store.startswith(("http://", "https://"))
        ):
            raise SchedulerConfigError(f"servers[{self.name}].node_store must be an http(s) URL")
        if self.node_store is None:
            if self.bandwidth is None:
                raise SchedulerConfigError(
                    f"servers[{self.name}]: give a node_store URL (measured bandwidths) or a static bandwidth"
                )
            self.bandwidth.to_node_bandwidth()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from a mapping; unknown keys are rejected."""
        _reject_unknown("server", data, cls)
        values = dict(data)
        if isinstance(values.get("bandwidth"), Mapping):
            _reject_unknown("server.bandwidth", values["bandwidth"], BandwidthConfig)
            values["bandwidth"] = BandwidthConfig(**values["bandwidth"])
        if "name" not in values or "grpc" not in values:
            raise SchedulerConfigError(f"server: 'name' and 'grpc' are required, got {sorted(values)}")
        return cls(**values)

    @property
    def grpc_metadata(self) -> dict[str, str]:
        """gRPC metadata authorizing Triton's repository API (Triton prefixes restricted keys over gRPC)."""
        if self.repository_api_key is None:
            return {}
        return {"triton-grpc-protocol-" + self.repository_api_header: self.repository_api_key}


ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_ADAPTER_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)
DEFAULT_ADAPTER_BYTES = (
    16 << 20
)  # an adapter's size when its config does not say (a rank-16 adapter of a 1B model)
DEFAULT_LORA_SEPARATOR = "_lora_"  # as in the example of Triton's OpenAI front end (--lora-separator=_lora_)


@dataclass(frozen=True)
class AdapterConfig:
    """One LoRA adapter of a base model: its checkpoint reference and size.

    ``checkpoint`` is what the base's ``multi_lora.json`` lists for it (docs/lora.md): an absolute path on
    the servers, a URI (``s3://...``) or a node-store name; it is resolved on the server, through its loader
    tiers. ``size_bytes`` is what loading it reads (the placement's estimate of its load from the tier it
    sits in)."""

    name: str
    checkpoint: str
    size_bytes: int = DEFAULT_ADAPTER_BYTES

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or _ADAPTER_NAME_RE.fullmatch(self.name) is None
            or ".." in self.name
        ):
            raise SchedulerConfigError(
                f"adapter name {str(self.name)[:60]!r} must match {ADAPTER_NAME_PATTERN} (letters, digits, "
                "'.', '_' and '-', never '..')"
            )
        if not isinstance(self.checkpoint, str) or not self.checkpoint.strip():
            raise SchedulerConfigError(f"adapters[{self.name}].checkpoint must be a non-empty string")
        _set_number(self, "size_bytes", f"adapters[{self.name}].size_bytes", minimum=1, integer=True)

    @classmethod
    def from_value(cls, name: str, value: object) -> AdapterConfig:
        """An adapter from its config entry: a checkpoint reference, or ``{checkpoint, size_bytes}``."""
        if isinstance(value, str):
            return cls(name=name, checkpoint=value)
        if isinstance(value, Mapping):
            _reject_unknown(f"adapters[{name}]", value, cls)
            values = dict(value)
            values.pop("name", None)
            if "checkpoint" not in values:
                raise SchedulerConfigError(f"adapters[{name}]: 'checkpoint' is required")
            return cls(name=name, **values)
        raise SchedulerConfigError(
            f"adapters[{name}] must be a checkpoint reference or {{checkpoint, size_bytes}}, got "
            f"{type(value).__name__}"
        )

    def to_value(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "size_bytes": self.size_bytes}


def parse_adapters(where: str, value: object) -> MappingProxyType[str, AdapterConfig]:
    """``adapters`` of a model config: a mapping of adapter name -> reference or ``{checkpoint, size_bytes}``
    (``AdapterConfig`` values are taken as they are)."""
    if not isinstance(value, Mapping):
        raise SchedulerConfigError(f"{where}.adapters must be a mapping of adapter name -> checkpoint")
    out: dict[str, AdapterConfig] = {}
    for name, entry in value.items():
        adapter = entry if isinstance(entry, AdapterConfig) else AdapterConfig.from_value(str(name), entry)
        if adapter.name != name:
            raise SchedulerConfigError(f"{where}.adapters: entry {name!r} names adapter {adapter.name!r}")
        out[adapter.name] = adapter
    return MappingProxyType(out)


@dataclass(frozen=True)
class ModelConfig:
    """A deployable model: checkpoint, engine, size, keep-alive and limits.

    ``triton_config`` (optional) is a full Triton model config sent verbatim with the load; without it the
    warmstart backend renders one from checkpoint and engine.

    ``adapters`` (LoRA, docs/lora.md): ``None`` serves none; a mapping (empty too) loads the model with
    ``enable_lora`` and these adapters in its ``multi_lora.json``; ``max_loras`` adapters are resident at once
    per instance, each of rank at most ``max_lora_rank``. ``lora_memory_bytes`` is what the adapter slots
    take in memory (counted against a server's budget with ``size_bytes``: :attr:`memory_bytes`); by default
    ``max_loras`` times the largest adapter's ``size_bytes``.
    """

    name: str
    checkpoint: str
    engine: str = "torch"
    size_bytes: int = 1 << 30
    keep_alive_s: float = 300.0
    max_concurrency: int = 8
    max_tokens: int = 4096
    triton_config: Mapping[str, Any] | None = None
    adapters: Mapping[str, AdapterConfig] | None = None
    max_loras: int = 4
    max_lora_rank: int = 16
    lora_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        try:
            validate_model_name(self.name)
        except InvalidModelName as e:
            raise SchedulerConfigError(f"models: {e}") from e
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise SchedulerConfigError(f"models[{self.name}].checkpoint must be a non-empty string")
        if self.engine not in ("torch", "jax"):
            raise SchedulerConfigError(
                f"models[{self.name}].engine must be 'torch' or 'jax', got {self.engine!r}"
            )
        _set_number(self, "size_bytes", f"models[{self.name}].size_bytes", minimum=1, integer=True)
        _set_number(self, "keep_alive_s", f"models[{self.name}].keep_alive_s")
        _set_number(self, "max_concurrency", f"models[{self.name}].max_concurrency", minimum=1, integer=True)
        _set_number(self, "max_tokens", f"models[{self.name}].max_tokens", minimum=1, integer=True)
        if self.triton_config is not None:
            if not isinstance(self.triton_config, Mapping):
                raise SchedulerConfigError(f"models[{self.name}].triton_config must be a mapping")
            object.__setattr__(self, "triton_config", MappingProxyType(dict(self.triton_config)))
        if self.adapters is not None:
            object.__setattr__(self, "adapters", parse_adapters(f"models[{self.name}]", self.adapters))
            if self.triton_config is not None:
                raise SchedulerConfigError(
                    f"models[{self.name}]: adapters need the warmstart backend's rendered config (enable_lora, "
                    "multi_lora.json); drop triton_config"
                )
        for key, top in (("max_loras", 64), ("max_lora_rank", 512)):
            _set_number(self, key, f"models[{self.name}].{key}", minimum=1, integer=True)
            if getattr(self, key) > top:
                raise SchedulerConfigError(f"models[{self.name}].{key} must be in 1..{top}")
        if self.lora_memory_bytes is not None:
            _set_number(self, "lora_memory_bytes", f"models[{self.name}].lora_memory_bytes", integer=True)

    @property
    def lora(self) -> bool:
        """Whether the model serves LoRA adapters (``adapters`` given, even empty)."""
        return self.adapters is not None

    @property
    def memory_bytes(self) -> int:
        """What a loaded instance holds: ``size_bytes`` plus, with adapters, their slots
        (``lora_memory_bytes``, by default ``max_loras`` x the largest adapter)."""
        if self.adapters is None:
            return self.size_bytes
        if self.lora_memory_bytes is not None:
            return self.size_bytes + self.lora_memory_bytes
        largest = max((a.size_bytes for a in self.adapters.values()), default=DEFAULT_ADAPTER_BYTES)
        return self.size_bytes + self.max_loras * largest

    def multi_lora(self) -> dict[str, str]:
        """The ``multi_lora.json`` content of this model: adapter name -> checkpoint reference."""
        return {name: a.checkpoint for name, a in sorted((self.adapters or {}).items())}

    def with_adapters(self, adapters: Mapping[str, AdapterConfig]) -> ModelConfig:
        """This model serving ``adapters`` instead (LoRA enabled)."""
        return replace(self, adapters=MappingProxyType(dict(adapters)))

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Self:
        """Build model ``name`` from a mapping; unknown keys are rejected."""
        _reject_unknown(f"models[{name}]", data, cls)
        values = dict(data)
        values.pop("name", None)
        if "checkpoint" not in values:
            raise SchedulerConfigError(f"models[{name}]: 'checkpoint' is required")
        return cls(name=name, **values)

    def to_dict(self) -> dict[str, Any]:
        """This model as its YAML/JSON mapping (what :meth:`from_dict` reads back)."""
        out: dict[str, Any] = {
            "checkpoint": self.checkpoint,
            "engine": self.engine,
            "size_bytes": self.size_bytes,
            "keep_alive_s": self.keep_alive_s,
            "max_concurrency": self.max_concurrency,
            "max_tokens": self.max_tokens,
        }
        if self.triton_config is not None:
            out["triton_config"] = json.loads(json.dumps(dict(self.triton_config)))
        if self.adapters is not None:
            out["adapters"] = {n: a.to_value() for n, a in sorted(self.adapters.items())}
            out["max_loras"] = self.max_loras
            out["max_lora_rank"] = self.max_lora_rank
            if self.lora_memory_bytes is not None:
                out["lora_memory_bytes"] = self.lora_memory_bytes
        return out

    def to_spec(self) -> ModelSpec:
        """The policy's view of this model (its size: what a loaded instance holds, adapter slots included)."""
        return ModelSpec(
            name=self.name,
            checkpoint_uri=self.checkpoint,
            size_bytes=self.memory_bytes,
            engine=self.engine,
            keep_alive_s=float(self.keep_alive_s),
            max_concurrency=self.max_concurrency,
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Everything the scheduler process needs. Listen addresses default to loopback."""

    servers: tuple[ServerConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()
    listen_http: str = "127.0.0.1:8080"
    listen_grpc: str = "127.0.0.1:8081"
    admin_token: str | None = field(default=None, repr=False)
    cold_start_queue: int = 256
    cold_start_timeout_s: float = 120.0
    request_timeout_s: float = 300.0
    upstream_timeout_s: float = 5.0
    max_request_body_bytes: int = 8 << 20  # an HTTP request body larger than this gets 413
    request_body_timeout_s: float = 30.0  # an HTTP request body must arrive within this, else 408
    upstream_retries: int = 3
    max_failovers: int = 3
    health_interval_s: float = 1.0
    store_poll_interval_s: float = 2.0
    reaper_interval_s: float = 0.5
    initial_load_overhead_s: float = 1.0
    initial_release_s: float | None = 0.05
    """What an eviction's engine release is expected to take on a server before one was measured. ``None``:
    expect it to fail, so evictions cost the unload time until a release succeeds there."""
    migration: bool = True
    migration_threshold_tokens: int = 4
    migration_min_gain_s: float = 1.0
    replay_s_per_token: float = 0.002
    lora_separator: str = DEFAULT_LORA_SEPARATOR
    """OpenAI requests name an adapter as ``<base><lora_separator><adapter>`` (Triton's ``--lora-separator``)."""
    policy: str = "warmstart"  # placement rule: warmstart | random | serverlessllm (baselines for benchmarks)
    policy_seed: int = 0  # seeds the random placement baseline
    etcd: str | None = None
    """Cluster state on this etcd (``http://host:port``): servers are the nodes registered there by their
    agents (``warmstart node``), besides any listed under ``servers``. None: in this process's memory."""
    etcd_prefix: str = "/warmstart/"  # the cluster's keys in etcd (the node agents' --prefix)
    node_poll_interval_s: float = 1.0  # how often registered nodes are read from cluster state
    replica_lease_ttl_s: int = 10  # with etcd: this replica's lease (its load claims and in-use counts)

    def __post_init__(self) -> None:
        object.__setattr__(self, "servers", tuple(self.servers))
        object.__setattr__(self, "models", tuple(self.models))
        _address("listen_http", self.listen_http)
        _address("listen_grpc", self.listen_grpc)
        for key in (
            "cold_start_queue",
            "upstream_retries",
            "max_failovers",
            "migration_threshold_tokens",
        ):
            _set_number(self, key, key, integer=True)
        _set_number(self, "replica_lease_ttl_s", "replica_lease_ttl_s", minimum=1, integer=True)
        _set_number(self, "max_request_body_bytes", "max_request_body_bytes", minimum=1, integer=True)
        _set_number(self, "request_body_timeout_s", "request_body_timeout_s", minimum=0.001)
        for key in (
            "cold_start_timeout_s",
            "request_timeout_s",
            "upstream_timeout_s",
            "health_interval_s",
            "store_poll_interval_s",
            "reaper_interval_s",
            "initial_load_overhead_s",
            "migration_min_gain_s",
            "replay_s_per_token",
            "node_poll_interval_s",
        ):
            _set_number(self, key, key)
        if self.etcd is not None and not (
            isinstance(self.etcd, str) and self.etcd.startswith(("http://", "https://"))
        ):
            raise SchedulerConfigError(
                f"etcd must be an http(s) URL like http://127.0.0.1:2379, got {self.etcd!r}"
            )
        if self.initial_release_s is not None:
            _set_number(self, "initial_release_s", "initial_release_s")
        if (
            not isinstance(self.lora_separator, str)
            or not self.lora_separator
            or re.fullmatch(r"[A-Za-z0-9._-]{1,16}", self.lora_separator) is None
        ):
            raise SchedulerConfigError(
                "lora_separator must be 1-16 characters of letters, digits, '.', '_' and '-' (a model name "
                f"holds it), got {self.lora_separator!r}"
            )
        if self.policy not in POLICIES:
            raise SchedulerConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        _set_number(self, "policy_seed", "policy_seed", integer=True)
        if not isinstance(self.migration, bool):
            raise SchedulerConfigError(f"migration must be true or false, got {self.migration!r}")
        if self.admin_token is not None and (
            not isinstance(self.admin_token, str) or len(self.admin_token) < 16
        ):
            raise SchedulerConfigError("admin_token must be a string of at least 16 characters")
        names = [s.name for s in self.servers]
        if len(set(names)) != len(names):
            raise SchedulerConfigError(f"server names must be unique, got {names}")
        model_names = [m.name for m in self.models]
        if len(set(model_names)) != len(model_names):
            raise SchedulerConfigError(f"model names must be unique, got {model_names}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from a mapping (the parsed YAML); unknown keys are rejected at every level."""
        if not isinstance(data, Mapping):
            raise SchedulerConfigError("the scheduler config must be a mapping")
        values = dict(data)
        listen = values.pop("listen", None)
        if listen is not None:
            if not isinstance(listen, Mapping) or set(listen) - {"http", "grpc"}:
                raise SchedulerConfigError("listen: expected a mapping with keys 'http' and/or 'grpc'")
            if "http" in listen:
                values["listen_http"] = listen["http"]
            if "grpc" in listen:
                values["listen_grpc"] = listen["grpc"]
        token_file = values.pop("admin_token_file", None)
        if token_file is not None:
            if "admin_token" in values:
                raise SchedulerConfigError("give admin_token or admin_token_file, not both")
            values["admin_token"] = Path(token_file).read_text().strip()
        _reject_unknown("scheduler config", values, cls)
        servers = values.get("servers") or []
        if not isinstance(servers, list):
            raise SchedulerConfigError("servers must be a list")
        values["servers"] = tuple(ServerConfig.from_dict(s) for s in servers)
        models = values.get("models") or {}
        if not isinstance(models, Mapping):
            raise SchedulerConfigError("models must be a mapping of name -> model")
        values["models"] = tuple(ModelConfig.from_dict(str(n), m) for n, m in models.items())
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: Path | str) -> Self:
        """Read ``path`` (YAML) and build the config."""
        import yaml

        with Path(path).open() as f:
            data = yaml.safe_load(f)
        return cls.from_dict(data or {})
