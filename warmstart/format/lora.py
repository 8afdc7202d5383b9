"""LoRA adapter checkpoints: PEFT adapter directories in, validated adapters out (docs/format.md section 10).

Three parts, none of which needs torch or peft:

* :func:`open_peft_adapter` reads a directory as ``peft``'s ``save_pretrained`` writes it
  (``adapter_config.json`` + ``adapter_model.safetensors``), refuses what the engines cannot apply, and gives
  :func:`warmstart.format.convert.convert` the tensors in the format's naming scheme with the
  ``metadata["adapter"]`` section;
* :func:`read_adapter` opens such a checkpoint and returns an :class:`Adapter` whose A/B matrices are numpy
  views of the checkpoint's bytes (zero copy for a local checkpoint: read-only ``mmap``);
* :func:`check_compatible` compares an adapter's shapes with a base model's ``config.json``.

Every refusal has its own exception type under :class:`AdapterError` (and under the converter's
:class:`~warmstart.errors.ConversionError` or the reader's :class:`~warmstart.errors.CorruptCheckpoint`).
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from warmstart.errors import (
    CheckpointError,
    ChecksumMismatch,
    ConversionError,
    CorruptCheckpoint,
    InvalidSource,
    SourceNotFound,
    WarmstartError,
)
from warmstart.format import spec

if TYPE_CHECKING:
    from warmstart.format.convert import ModelSource
    from warmstart.format.index import Index
    from warmstart.format.reader import Checkpoint

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_METADATA_VERSION",
    "ADAPTER_WEIGHTS",
    "SUPPORTED_TARGETS",
    "Adapter",
    "AdapterError",
    "AdapterKeyMismatch",
    "AdapterRankMismatch",
    "IncompatibleBase",
    "InvalidAdapter",
    "LoraModule",
    "MalformedAdapterMetadata",
    "MissingAdapterFile",
    "NotAnAdapter",
    "TargetShape",
    "UnsupportedAdapter",
    "adapter_from_buffers",
    "adapter_summary",
    "check_compatible",
    "expected_target_shapes",
    "lora_scaling",
    "open_peft_adapter",
    "parse_adapter_metadata",
    "read_adapter",
    "tensor_names",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_METADATA_VERSION = 1
METADATA_KEY = "adapter"
KIND = "lora"

SUPPORTED_TARGETS: dict[str, str] = {
    # target module -> the block it sits in (Llama-family names; Phi-3's fused qkv_proj / gate_up_proj)
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "qkv_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "gate_up_proj": "mlp",
    "down_proj": "mlp",
}
"""The modules the engines can apply a LoRA update to, in the order tensors are stored within a layer."""

_TARGET_ORDER = {t: i for i, t in enumerate(SUPPORTED_TARGETS)}
_FLOATING = ("float32", "float16", "bfloat16")
MAX_LAYER = 1 << 20
MAX_CONFIG_BYTES = 1024**2
MAX_ADAPTER_JSON_DEPTH = 32

_PEFT_KEY = re.compile(
    r"^base_model\.model\.(?P<module>(?:[A-Za-z0-9_]+\.)*?layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\."
    r"(?P<target>[A-Za-z0-9_]+))\.lora_(?P<ab>[AB])\.weight$"
)
_LORA_WEIGHT = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_[AB]\.weight$")

# adapter_config.json keys (peft 0.13-0.21 LoraConfig) that do not change what the adapter computes at
# inference, or that are checked below; any other key must be absent or null/false/empty.
_HARMLESS_KEYS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "target_modules",
        "exclude_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "use_rslora",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "megatron_config",
        "megatron_core",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "runtime_config",
        "qalora_group_size",
        "ensure_weight_tying",
        "bias",
        "use_dora",
        "modules_to_save",
        "layer_replication",
        "lora_bias",
        "target_parameters",
        "trainable_token_indices",
        "use_qalora",
        "alora_invocation_tokens",
    }
)
# init_lora_weights values whose adapters only work with a base model that peft modified at init
# (residual base weights); peft's save_pretrained(path_initial_model_for_weight_conversion=...) turns them
# into plain LoRA adapters.
_BASE_MODIFYING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


# --- errors -----------------------------------------------------------------------------------------------


class AdapterError(WarmstartError):
    """A LoRA adapter cannot be converted, read or applied."""


class UnsupportedAdapter(AdapterError, ConversionError):
    """The adapter is of a kind the engines cannot apply (DoRA, IA3, prompt tuning, embeddings, ...)."""


class InvalidAdapter(AdapterError, InvalidSource):
    """The adapter directory is incomplete or contradicts itself (config against weights)."""


class MissingAdapterFile(InvalidAdapter, SourceNotFound):
    """``adapter_config.json`` or ``adapter_model.safetensors`` is missing from the adapter directory."""


class AdapterKeyMismatch(InvalidAdapter):
    """The safetensors keys do not match the config's target modules (missing, extra or unpaired A/B)."""


class AdapterRankMismatch(InvalidAdapter):
    """A module's A and B disagree on the rank, or the rank differs from the config's ``r``/``rank_pattern``."""


class NotAnAdapter(AdapterError, CheckpointError):
    """The checkpoint has no ``metadata["adapter"]`` section: it is not a LoRA adapter checkpoint."""


class MalformedAdapterMetadata(AdapterError, CorruptCheckpoint):
    """The checkpoint's adapter section or its tensors contradict docs/format.md section 10."""


class IncompatibleBase(AdapterError, ValueError):
    """An adapter's shapes or layers do not fit the base model it is applied to."""


# --- the data model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetShape:
    """The base linear a target module's update is added to: ``in_features`` -> ``out_features``."""

    in_features: int
    out_features: int


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One adapted linear: ``y += (x @ a.T @ b.T) * scaling`` with ``a`` [rank, in], ``b`` [out, rank]."""

    layer: int
    target: str
    rank: int
    alpha: float
    scaling: float
    a: np.ndarray
    b: np.ndarray


@dataclass(frozen=True, eq=False)
class Adapter:
    """A validated LoRA adapter checkpoint (see :func:`read_adapter`)."""

    location: str
    base_model: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    dtype: str
    targets: Mapping[str, TargetShape]
    layers: Mapping[int, Mapping[str, LoraModule]]

    @property
    def modules(self) -> list[LoraModule]:
        """Every adapted module, by layer and then in :data:`SUPPORTED_TARGETS` order."""
        return [m for layer in sorted(self.layers) for m in self.layers[layer].values()]

    @property
    def ranks(self) -> dict[tuple[int, str], int]:
        return {(m.layer, m.target): m.rank for m in self.modules}

    @property
    def scalings(self) -> dict[tuple[int, str], float]:
        return {(m.layer, m.target): m.scaling for m in self.modules}

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules)

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules)

    def module(self, layer: int, target: str) -> LoraModule | None:
        """The module adapted at ``layer``/``target``, or None where the adapter leaves the base unchanged."""
        return self.layers.get(layer, {}).get(target)


def lora_scaling(alpha: float, rank: int, *, use_rslora: bool) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA (as peft computes it, in float64)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def tensor_names(layer: int, target: str) -> tuple[str, str]:
    """The checkpoint names of a module's A and B: ``layers.{layer}.{target}.lora_A`` / ``.lora_B``."""
    return f"layers.{layer}.{target}.lora_A", f"layers.{layer}.{target}.lora_B"


# --- PEFT directory -> conversion source ------------------------------------------------------------------


def is_peft_adapter_dir(path: Path) -> bool:
    """True when ``path`` is a directory that holds a PEFT adapter (its config or its weights)."""
    return path.is_dir() and any(
        (path / n).exists() for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin")
    )


def _is_unset(v: object) -> bool:
    return v is None or v is False or v in ("", [], {})


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _read_adapter_config(d: Path) -> dict[str, Any]:
    from warmstart.format.convert import _open_regular
    from warmstart.format.index import JSONDefect, strict_json_loads

    path = d / ADAPTER_CONFIG
    if not path.exists():
        raise MissingAdapterFile(
            f"{d} has no {ADAPTER_CONFIG}; a PEFT adapter directory holds {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS}, as peft's save_pretrained writes them"
        )
    with _open_regular(path, "adapter config") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{path} is larger than {MAX_CONFIG_BYTES} bytes; not an adapter config")
    try:
        cfg = strict_json_loads(raw.decode("utf-8"), max_depth=MAX_ADAPTER_JSON_DEPTH)
    except (UnicodeDecodeError, JSONDefect) as e:
        raise InvalidAdapter(f"{path} is not valid JSON ({e}); re-save the adapter with peft") from e
    if not isinstance(cfg, dict):
        raise InvalidAdapter(f"{path} must hold a JSON object")
    return cfg


_SUPPORTED_TEXT = (
    "supported: plain LoRA (peft_type LORA, bias 'none', no DoRA, no modules_to_save) on the linears "
    + ", ".join(SUPPORTED_TARGETS)
)


def _check_config(cfg: dict[str, Any], path: Path) -> None:
    """Refuse adapter kinds and options the engines cannot apply (UnsupportedAdapter) or malformed values."""
    where = f"{path / ADAPTER_CONFIG}"
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapter(
            f"{where} has peft_type {peft_type!r}; only LoRA adapters can be converted "
            f"(prompt/prefix tuning, IA3, LoHa, LoKr, AdaLoRA, ... are not). {_SUPPORTED_TEXT}"
        )
    refusals = {
        "use_dora": "DoRA (use_dora: true) adapters",
        "modules_to_save": "adapters with modules_to_save (fully trained copies of base modules)",
        "layer_replication": "adapters with layer_replication",
        "lora_bias": "adapters with a bias on lora_B (lora_bias: true)",
        "target_parameters": "adapters on nn.Parameters (target_parameters)",
        "trainable_token_indices": "adapters that train embedding rows (trainable_token_indices)",
        "use_qalora": "QA-LoRA adapters (use_qalora: true)",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    }
    for key, what in refusals.items():
        if not _is_unset(cfg.get(key)):
            raise UnsupportedAdapter(f"{where}: {what} are not supported. {_SUPPORTED_TEXT}")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise UnsupportedAdapter(
            f"{where} has bias {bias!r}: adapters that train biases are not supported. {_SUPPORTED_TEXT}"
        )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise UnsupportedAdapter(
            f"{where} has init_lora_weights {init!r}: such adapters only work on the base model peft "
            "modified at initialization. Save it as a plain LoRA adapter first (peft: "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    unknown = sorted(k for k, v in cfg.items() if k not in _HARMLESS_KEYS and not _is_unset(v))
    if unknown:
        raise UnsupportedAdapter(
            f"{where} sets {', '.join(unknown)}, which this converter does not know how to apply "
            f"(a newer peft feature?). {_SUPPORTED_TEXT}"
        )
    if not _positive_int(cfg.get("r", 8)):
        raise InvalidAdapter(f"{where}: r must be a positive integer, got {cfg.get('r')!r}")
    if not _number(cfg.get("lora_alpha", 8)):
        raise InvalidAdapter(f"{where}: lora_alpha must be a positive number, got {cfg.get('lora_alpha')!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(key, False), bool):
            raise InvalidAdapter(f"{where}: {key} must be true or false, got {cfg.get(key)!r}")
    for key, ok in (("rank_pattern", _positive_int), ("alpha_pattern", _number)):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and ok(v) for k, v in pattern.items()):
            raise InvalidAdapter(
                f"{where}: {key} must map module name patterns to positive "
                f"{'integers' if key == 'rank_pattern' else 'numbers'}"
            )
        for k in pattern:
            try:
                re.compile(k)
            except re.error as e:
                raise InvalidAdapter(f"{where}: {key} key {k!r} is not a regular expression ({e})") from e
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise InvalidAdapter(f"{where}: base_model_name_or_path must be a string or null")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise InvalidAdapter(f"{where}: target_modules {targets!r} is not a regular expression") from e
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise InvalidAdapter(
            f"{where}: target_modules must be a non-empty list of module names or a regular expression"
        )
    else:
        bad = sorted(t for t in set(targets) if t.rsplit(".", 1)[-1] not in SUPPORTED_TARGETS)
        if bad:
            what = "embedding LoRA" if any("embed" in t for t in bad) else "LoRA"
            raise UnsupportedAdapter(
                f"{where} targets {', '.join(bad)}: {what} on these modules cannot be applied by the engines. "
                f"{_SUPPORTED_TEXT}"
            )


def _names_module(entry: str, module: str) -> bool:
    """peft's match of a ``target_modules`` list entry: the module's name, or a dotted suffix of it."""
    return module == entry or module.endswith("." + entry)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return v
    return default


@dataclass
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _classify_bad_key(key: str, path: Path) -> WarmstartError:
    if "lora_embedding_" in key:
        return UnsupportedAdapter(f"{path} holds {key}: embedding LoRA is not supported. {_SUPPORTED_TEXT}")
    if "lora_magnitude_vector" in key:
        return UnsupportedAdapter(f"{path} holds {key}: DoRA adapters are not supported. {_SUPPORTED_TEXT}")
    if re.search(r"\.lora_[AB]\.bias$", key):
        return UnsupportedAdapter(f"{path} holds {key}: LoRA biases are not supported. {_SUPPORTED_TEXT}")
    m = _LORA_WEIGHT.match(key)
    if m:
        return UnsupportedAdapter(
            f"{path} holds {key}: LoRA on {m['module']} cannot be applied by the engines. {_SUPPORTED_TEXT}"
        )
    return AdapterKeyMismatch(
        f"{path} holds {key!r}, which is not a LoRA weight of a decoder layer "
        "(base_model.model.<...>.layers.<n>.<self_attn|mlp>.<target>.lora_A|lora_B.weight); "
        "re-save the adapter with peft's save_pretrained"
    )


def _safetensors_entries(path: Path) -> tuple[list[_Entry], int]:
    from warmstart.format.convert import SAFETENSORS_DTYPES, _open_regular, read_safetensors_header

    header = read_safetensors_header(path)
    with _open_regular(path, "adapter weights") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    entries = [
        _Entry(k, SAFETENSORS_DTYPES[v["dtype"]], tuple(v["shape"]), *v["data_offsets"])
        for k, v in header.items()
        if k != "__metadata__"
    ]
    return entries, 8 + n


def open_peft_adapter(src: str | os.PathLike[str]) -> ModelSource:
    """Open a PEFT LoRA adapter directory as a :class:`~warmstart.format.convert.ModelSource`.

    The tensors come out as ``layers.{L}.{target}.lora_A`` [rank, in] and ``.lora_B`` [out, rank], by layer
    and then in :data:`SUPPORTED_TARGETS` order; ``base_metadata["adapter"]`` is the section of docs/format.md
    section 10; ``adapter_config.json`` is carried over as a model file. Reads no byte of the weights until
    the tensors are iterated, and needs neither torch nor peft.
    """
    from warmstart.format.convert import ModelSource, TensorSpec, _open_regular

    d = Path(src).resolve()
    cfg = _read_adapter_config(d)
    _check_config(cfg, d)
    weights = d / ADAPTER_WEIGHTS
    if not weights.exists():
        if (d / "adapter_model.bin").exists():
            raise InvalidAdapter(
                f"{d} holds adapter_model.bin (a pickle), not {ADAPTER_WEIGHTS}; re-save the adapter with "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise MissingAdapterFile(f"{d} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; copy the adapter again")
    entries, data_start = _safetensors_entries(weights)
    where = str(weights)

    r_default: int = cfg.get("r", 8)
    alpha_default: float = cfg.get("lora_alpha", 8)
    use_rslora: bool = cfg.get("use_rslora", False)
    rank_pattern: dict[str, int] = cfg.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
    target_modules = cfg["target_modules"]

    pairs: dict[tuple[int, str], dict[str, _Entry]] = {}
    module_names: dict[tuple[int, str], str] = {}
    for e in entries:
        m = _PEFT_KEY.match(e.name)
        if m is None or m["target"] not in SUPPORTED_TARGETS:
            raise _classify_bad_key(e.name, weights)
        target, layer = m["target"], int(m["layer"])
        if SUPPORTED_TARGETS[target] != m["block"]:
            raise AdapterKeyMismatch(
                f"{where} holds {e.name}: {target} belongs in {SUPPORTED_TARGETS[target]}"
            )
        if layer > MAX_LAYER:
            raise AdapterKeyMismatch(f"{where} holds {e.name}: layer {layer} is beyond {MAX_LAYER}")
        if isinstance(target_modules, str):
            if re.fullmatch(target_modules, m["module"]) is None:
                raise AdapterKeyMismatch(
                    f"{where} holds {e.name}, but {m['module']} does not match the config's target_modules "
                    f"{target_modules!r}"
                )
        elif not any(_names_module(t, m["module"]) for t in target_modules):
            raise AdapterKeyMismatch(
                f"{where} holds {e.name}, but {target} is not in the config's target_modules "
                f"{sorted(target_modules)}"
            )
        key = (layer, target)
        if key in module_names and module_names[key] != m["module"]:
            raise AdapterKeyMismatch(
                f"{where} holds LoRA weights for both {module_names[key]} and {m['module']}"
            )
        module_names[key] = m["module"]
        pairs.setdefault(key, {})[m["ab"]] = e
        if e.dtype not in _FLOATING:
            raise InvalidAdapter(
                f"{where}: {e.name} is {e.dtype}; LoRA weights are float32, float16 or bfloat16"
            )
        if len(e.shape) != 2:
            raise InvalidAdapter(f"{where}: {e.name} has shape {list(e.shape)}; LoRA weights are matrices")
    if not pairs:
        raise AdapterKeyMismatch(f"{where} holds no LoRA weights")
    if not isinstance(target_modules, str):
        missing = sorted(
            t for t in set(target_modules) if not any(_names_module(t, m) for m in module_names.values())
        )
        if missing:
            raise AdapterKeyMismatch(
                f"the config of {d} targets {', '.join(missing)}, but {where} has no LoRA weights for "
                f"{'it' if len(missing) == 1 else 'them'}; the adapter files do not belong together"
            )

    targets: dict[str, TargetShape] = {}
    modules: list[dict[str, Any]] = []
    order = sorted(pairs, key=lambda k: (k[0], _TARGET_ORDER[k[1]]))
    for layer, target in order:
        ab = pairs[(layer, target)]
        module = module_names[(layer, target)]
        if set(ab) != {"A", "B"}:
            have, lack = next(iter(ab)), "B" if "A" in ab else "A"
            raise AdapterKeyMismatch(f"{where} has lora_{have} but no lora_{lack} for {module}")
        a, b = ab["A"], ab["B"]
        rank = _pattern_value(rank_pattern, module, r_default)
        alpha = _pattern_value(alpha_pattern, module, alpha_default)
        if a.shape[0] != b.shape[1]:
            raise AdapterRankMismatch(
                f"{where}: {module} has lora_A of rank {a.shape[0]} (shape {list(a.shape)}) but lora_B of "
                f"rank {b.shape[1]} (shape {list(b.shape)})"
            )
        if a.shape[0] != rank:
            raise AdapterRankMismatch(
                f"{where}: {module} has rank {a.shape[0]}, but the config gives it r = {rank} "
                "(r / rank_pattern); the adapter files do not belong together"
            )
        if a.dtype != b.dtype:
            raise InvalidAdapter(f"{where}: {module} has lora_A in {a.dtype} but lora_B in {b.dtype}")
        shape = TargetShape(int(a.shape[1]), int(b.shape[0]))
        if targets.setdefault(target, shape) != shape:
            first = targets[target]
            raise InvalidAdapter(
                f"{where}: {target} maps {shape.in_features} -> {shape.out_features} features in layer {layer} "
                f"but {first.in_features} -> {first.out_features} in an earlier layer"
            )
        modules.append(
            {
                "layer": layer,
                "target": target,
                "rank": rank,
                "alpha": alpha,
                "scaling": lora_scaling(alpha, rank, use_rslora=use_rslora),
            }
        )
    dtypes = sorted({e.dtype for ab in pairs.values() for e in ab.values()})
    if len(dtypes) != 1:
        raise InvalidAdapter(f"{where} mixes dtypes {', '.join(dtypes)}; save the adapter in one dtype")

    section = {
        "kind": KIND,
        "version": ADAPTER_METADATA_VERSION,
        "base_model": cfg.get("base_model_name_or_path"),
        "r": r_default,
        "lora_alpha": alpha_default,
        "use_rslora": use_rslora,
        "fan_in_fan_out": cfg.get("fan_in_fan_out", False),
        "rank_pattern": dict(rank_pattern),
        "alpha_pattern": dict(alpha_pattern),
        "targets": {
            t: {"in_features": s.in_features, "out_features": s.out_features}
            for t, s in sorted(targets.items(), key=lambda kv: _TARGET_ORDER[kv[0]])
        },
        "layers": sorted({layer for layer, _ in pairs}),
        "modules": modules,
    }
    specs: list[TensorSpec] = []
    plan: list[tuple[str, _Entry]] = []
    for layer, target in order:
        ab = pairs[(layer, target)]
        for name, e in zip(tensor_names(layer, target), (ab["A"], ab["B"]), strict=True):
            specs.append(TensorSpec(name, e.dtype, e.shape))
            plan.append((name, e))

    def tensors() -> Iterator[tuple[str, Any]]:
        with _open_regular(weights, "adapter weights") as f:
            for name, e in plan:
                out = np.empty(e.shape, dtype=spec.DTYPES[e.dtype].numpy)
                view = out.reshape(-1).view(np.uint8).data
                n = os.preadv(f.fileno(), [view], data_start + e.begin) if view.nbytes else 0
                if n != e.end - e.begin:
                    raise InvalidAdapter(f"{where} changed while it was being converted; convert it again")
                yield name, out

    config_bytes = (d / ADAPTER_CONFIG).read_bytes()
    return ModelSource(
        "peft-lora",
        str(d),
        "peft",
        specs,
        tensors,
        files={ADAPTER_CONFIG: config_bytes},
        model_config=None,
        base_metadata={METADATA_KEY: section},
    )


# --- reading a converted adapter --------------------------------------------------------------------------

_SECTION_KEYS = {
    "kind",
    "version",
    "base_model",
    "r",
    "lora_alpha",
    "use_rslora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "targets",
    "layers",
    "modules",
}
_MODULE_KEYS = {"layer", "target", "rank", "alpha", "scaling"}


@dataclass(frozen=True)
class _Section:
    base_model: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    targets: Mapping[str, TargetShape]
    layers: tuple[int, ...]
    modules: tuple[tuple[int, str, int, float, float], ...]


def _bad(location: str, what: str) -> MalformedAdapterMetadata:
    return MalformedAdapterMetadata(
        f"{location}: the adapter section of index.json {what} (docs/format.md section 10); re-convert the "
        "adapter"
    )


def _exact_keys(v: object, keys: set[str], location: str, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _bad(location, f"has {what} that is not an object")
    if v.keys() != keys:
        extra, lack = sorted(v.keys() - keys), sorted(keys - v.keys())
        raise _bad(location, f"has {what} with unknown fields {extra} / missing fields {lack}")
    return v


def parse_adapter_metadata(metadata: Mapping[str, Any], location: str = "<checkpoint>") -> _Section:
    """Validate ``metadata["adapter"]`` (no tensor is read); raises :class:`NotAnAdapter` when absent."""
    if METADATA_KEY not in metadata:
        raise NotAnAdapter(
            f"{location} is not a LoRA adapter checkpoint (its index.json has no metadata.adapter); convert "
            "a PEFT adapter directory with `warmstart convert ADAPTER_DIR DST`"
        )
    s = _exact_keys(metadata[METADATA_KEY], _SECTION_KEYS, location, "metadata.adapter")
    if s["kind"] != KIND or s["version"] != ADAPTER_METADATA_VERSION or isinstance(s["version"], bool):
        raise _bad(location, f"has kind {s['kind']!r} version {s['version']!r}, not {KIND!r} version 1")
    if not (s["base_model"] is None or isinstance(s["base_model"], str)):
        raise _bad(location, "has a base_model that is neither a string nor null")
    if not _positive_int(s["r"]) or not _number(s["lora_alpha"]):
        raise _bad(location, "has an r or lora_alpha that is not a positive integer/number")
    if not isinstance(s["use_rslora"], bool) or not isinstance(s["fan_in_fan_out"], bool):
        raise _bad(location, "has a use_rslora or fan_in_fan_out that is not a boolean")
    for key, ok in (("rank_pattern", _positive_int), ("alpha_pattern", _number)):
        p = s[key]
        if not isinstance(p, dict) or not all(ok(v) for v in p.values()):
            raise _bad(location, f"has a malformed {key}")
    raw_targets = s["targets"]
    if not isinstance(raw_targets, dict) or not raw_targets:
        raise _bad(location, "has no targets object")
    targets: dict[str, TargetShape] = {}
    for t, shape in sorted(raw_targets.items(), key=lambda kv: _TARGET_ORDER.get(kv[0], -1)):
        if t not in SUPPORTED_TARGETS:
            raise _bad(location, f"names target {t!r}, which is none of {', '.join(SUPPORTED_TARGETS)}")
        sh = _exact_keys(shape, {"in_features", "out_features"}, location, f"targets.{t}")
        if not (_positive_int(sh["in_features"]) and _positive_int(sh["out_features"])):
            raise _bad(location, f"has non-positive features for target {t}")
        targets[t] = TargetShape(sh["in_features"], sh["out_features"])
    layers = s["layers"]
    if not (
        isinstance(layers, list)
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_LAYER for x in layers)
        and layers == sorted(set(layers))
        and layers
    ):
        raise _bad(location, "has a layers list that is not sorted, unique non-negative integers")
    raw_modules = s["modules"]
    if not isinstance(raw_modules, list) or not raw_modules:
        raise _bad(location, "has no modules list")
    modules: list[tuple[int, str, int, float, float]] = []
    for i, rm in enumerate(raw_modules):
        m = _exact_keys(rm, _MODULE_KEYS, location, f"modules[{i}]")
        layer, target, rank, alpha, scaling = (m[k] for k in ("layer", "target", "rank", "alpha", "scaling"))
        if layer not in layers or target not in targets:
            raise _bad(location, f"has modules[{i}] at layer {layer!r} / target {target!r} not listed")
        if not _positive_int(rank) or not _number(alpha) or not isinstance(scaling, (int, float)):
            raise _bad(location, f"has modules[{i}] with a malformed rank, alpha or scaling")
        if scaling != lora_scaling(alpha, rank, use_rslora=s["use_rslora"]):
            raise _bad(
                location,
                f"gives modules[{i}] scaling {scaling}, but alpha {alpha} and rank {rank} make "
                f"{lora_scaling(alpha, rank, use_rslora=s['use_rslora'])}",
            )
        modules.append((layer, target, rank, float(alpha), float(scaling)))
    keys = [(m[0], _TARGET_ORDER[m[1]]) for m in modules]
    if keys != sorted(set(keys)):
        raise _bad(location, "lists modules out of (layer, target) order or twice")
    if {m[0] for m in modules} != set(layers) or {m[1] for m in modules} != set(targets):
        raise _bad(location, "lists layers or targets that no module uses")
    return _Section(
        s["base_model"],
        s["r"],
        float(s["lora_alpha"]),
        s["use_rslora"],
        s["fan_in_fan_out"],
        MappingProxyType(dict(s["rank_pattern"])),
        MappingProxyType({k: float(v) for k, v in s["alpha_pattern"].items()}),
        MappingProxyType(targets),
        tuple(layers),
        tuple(modules),
    )


def _check_tensors(section: _Section, index: Index, location: str) -> str:
    """The tensors are exactly the modules' A/B, with their shapes, in one floating dtype; returns it."""
    tmap = index.tensor_map()
    expected: list[str] = []
    dtypes: set[str] = set()
    for layer, target, rank, _, _ in section.modules:
        shape = section.targets[target]
        for name, want in zip(
            tensor_names(layer, target),
            ((rank, shape.in_features), (shape.out_features, rank)),
            strict=True,
        ):
            t = tmap.get(name)
            if t is None:
                raise _bad(location, f"lists a module whose tensor {name} is not in the checkpoint")
            if t.shape != want:
                raise _bad(location, f"implies shape {list(want)} for {name}, which has {list(t.shape)}")
            dtypes.add(t.dtype)
            expected.append(name)
    extra = sorted(set(tmap) - set(expected))
    if extra:
        raise _bad(location, f"does not list the tensors {extra[:5]} the checkpoint holds")
    if len(dtypes) != 1 or next(iter(dtypes)) not in _FLOATING:
        raise _bad(
            location, f"covers tensors of dtypes {sorted(dtypes)}; one of {', '.join(_FLOATING)} is needed"
        )
    return dtypes.pop()


def _partition_buffers(ckpt: Checkpoint) -> list[Any]:
    """Each partition's bytes: a read-only mmap for a local checkpoint, else fetched and chunk-verified."""
    from warmstart.format.checksum import xxh3_hex
    from warmstart.format.sources import LocalSource

    out: list[Any] = []
    for part in ckpt.index.partitions:
        if part.size == 0:
            out.append(b"")
        elif isinstance(ckpt.source, LocalSource):
            out.append(ckpt.source.mmap(part.file))
        else:
            data = ckpt.source.read(part.file)
            cs = ckpt.index.chunk_size
            for i, start in enumerate(range(0, part.size, cs)):
                if xxh3_hex(data[start : start + cs]) != part.chunks[i]:
                    end = min(start + cs, part.size)
                    raise ChecksumMismatch(
                        f"checksum mismatch in {part.file} chunk {i} (bytes {start}-{end}) of {ckpt.location}; "
                        "re-upload or re-convert the adapter",
                        file=part.file,
                        chunk=i,
                        start=start,
                        end=end,
                    )
            out.append(data)
    return out


def read_adapter(location: str | os.PathLike[str], *, verify: bool = False) -> Adapter:
    """Open and validate the LoRA adapter checkpoint at a path or URI.

    The A/B arrays are read-only numpy views: of a shared ``mmap`` of the partition files for a local
    checkpoint (no copy), of the fetched (and chunk-verified) bytes for a remote one. ``verify=True`` checks
    every chunk of a local checkpoint first too. Raises :class:`NotAnAdapter` for a checkpoint that is not an
    adapter, :class:`MalformedAdapterMetadata` for one whose adapter section contradicts its tensors.
    """
    from warmstart.format.reader import open_checkpoint

    ckpt = open_checkpoint(location)
    section = parse_adapter_metadata(ckpt.metadata, ckpt.location)
    _check_tensors(section, ckpt.index, ckpt.location)
    if verify:
        ckpt.verify()
    return adapter_from_buffers(ckpt.index, _partition_buffers(ckpt), ckpt.location)


def adapter_from_buffers(index: Index, buffers: list[Any], location: str) -> Adapter:
    """The :class:`Adapter` of a checkpoint already in memory: its index and one buffer per partition.

    This is how the serving side reads an adapter brought in through the loader tiers
    (:func:`warmstart.loaders.tiers.open_host`: a ``HostCheckpoint``'s ``index`` and ``buffers``, which the
    tiers have checked); the arrays are read-only views of ``buffers``. Raises :class:`NotAnAdapter` and
    :class:`MalformedAdapterMetadata` as :func:`read_adapter` does.
    """
    section = parse_adapter_metadata(index.metadata, location)
    dtype = _check_tensors(section, index, location)
    npdt = spec.DTYPES[dtype].numpy
    tmap = index.tensor_map()

    def view(name: str) -> np.ndarray:
        t = tmap[name]
        arr = np.frombuffer(buffers[t.partition], dtype=npdt, count=t.numel, offset=t.offset).reshape(t.shape)
        arr.flags.writeable = False
        return arr

    layers: dict[int, dict[str, LoraModule]] = {}
    for layer, target, rank, alpha, scaling in section.modules:
        a_name, b_name = tensor_names(layer, target)
        layers.setdefault(layer, {})[target] = LoraModule(
            layer, target, rank, alpha, scaling, view(a_name), view(b_name)
        )
    return Adapter(
        location=location,
        base_model=section.base_model,
        r=section.r,
        lora_alpha=section.lora_alpha,
        use_rslora=section.use_rslora,
        fan_in_fan_out=section.fan_in_fan_out,
        dtype=dtype,
        targets=section.targets,
        layers=MappingProxyType({k: MappingProxyType(v) for k, v in layers.items()}),
    )


def adapter_summary(index: Index, location: str = "<checkpoint>") -> dict[str, Any] | None:
    """What ``warmstart inspect`` shows of an adapter (None for a checkpoint that is not one)."""
    if METADATA_KEY not in index.metadata:
        return None
    s = parse_adapter_metadata(index.metadata, location)
    ranks = sorted({m[2] for m in s.modules})
    alphas = sorted({m[3] for m in s.modules})
    return {
        "kind": KIND,
        "base_model": s.base_model,
        "ranks": ranks,
        "alphas": alphas,
        "use_rslora": s.use_rslora,
        "scalings": sorted({m[4] for m in s.modules}),
        "targets": list(s.targets),
        "layers": len(s.layers),
        "modules": len(s.modules),
        "parameters": sum(t.numel for t in index.tensors),
        "tensor_bytes": index.tensor_bytes,
    }


# --- compatibility with a base model ----------------------------------------------------------------------


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
        text: Mapping[str, Any] = config["text_config"]
        return text
    return config


def expected_target_shapes(base_config: Mapping[str, Any]) -> dict[str, TargetShape]:
    """The linears of a base model's decoder layer, from its ``config.json``: target -> in/out features.

    Phi-3 (``model_type: phi3``) has the fused ``qkv_proj`` and ``gate_up_proj``; the other families
    q/k/v_proj and gate/up_proj.
    """
    c = _text_config(base_config)

    def get(key: str, default: int | None = None) -> int:
        v = c.get(key)
        if v is None:
            v = default
        if not _positive_int(v):
            raise IncompatibleBase(f"the base config has no positive integer {key} (got {c.get(key)!r})")
        assert isinstance(v, int)
        return v

    hidden, heads = get("hidden_size"), get("num_attention_heads")
    kv = get("num_key_value_heads", heads)
    head_dim = get("head_dim", hidden // heads if hidden % heads == 0 else None)
    inter = get("intermediate_size")
    q, k = heads * head_dim, kv * head_dim
    shapes = {"o_proj": TargetShape(q, hidden), "down_proj": TargetShape(inter, hidden)}
    if c.get("model_type") == "phi3":
        shapes["qkv_proj"] = TargetShape(hidden, q + 2 * k)
        shapes["gate_up_proj"] = TargetShape(hidden, 2 * inter)
    else:
        shapes.update(
            q_proj=TargetShape(hidden, q),
            k_proj=TargetShape(hidden, k),
            v_proj=TargetShape(hidden, k),
            gate_proj=TargetShape(hidden, inter),
            up_proj=TargetShape(hidden, inter),
        )
    return dict(sorted(shapes.items(), key=lambda kv: _TARGET_ORDER[kv[0]]))


def check_compatible(adapter: Adapter, base_config: Mapping[str, Any]) -> None:
    """Raise :class:`IncompatibleBase` unless every adapted module exists in the base with the same shape.

    ``base_config`` is the base model's ``config.json`` (as a dict). Checks each target's in/out features
    and that every adapted layer exists; the base's name is not compared (a fine-tune of the same
    architecture is a valid base).
    """
    expected = expected_target_shapes(base_config)
    problems: list[str] = []
    for target, shape in adapter.targets.items():
        want = expected.get(target)
        if want is None:
            problems.append(f"the base has no {target} (its linears: {', '.join(expected)})")
        elif want != shape:
            problems.append(
                f"{target} maps {shape.in_features} -> {shape.out_features} features in the adapter but "
                f"{want.in_features} -> {want.out_features} in the base"
            )
    c = _text_config(base_config)
    n_layers = c.get("num_hidden_layers")
    if not isinstance(n_layers, int) or not _positive_int(n_layers):
        problems.append(f"the base config has no positive integer num_hidden_layers (got {n_layers!r})")
    elif max(adapter.layers) >= n_layers:
        problems.append(f"the adapter adapts layer {max(adapter.layers)}, the base has {n_layers} layers")
    if problems:
        base = f" (trained for {adapter.base_model})" if adapter.base_model else ""
        raise IncompatibleBase(
            f"adapter {adapter.location}{base} does not fit this base model: " + "; ".join(problems)
        )
