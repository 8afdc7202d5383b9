"""The model configuration of the ``warmstart`` Triton backend: I/O, parameters, full configs.

One source of truth for the inputs and outputs: ``auto_complete_config`` in the backend's ``model.py``,
:func:`model_config` (the JSON config a scheduler sends with ``load_model(config=...)``) and the
``config.pbtxt`` files in ``model_repository/`` (rendered by :func:`to_pbtxt`) all use :data:`INPUTS` and
:data:`OUTPUTS`. Servers run with ``--disable-auto-complete-config``, so every config must be complete.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from warmstart.devices import parse_device, select_device
from warmstart.errors import WarmstartError

__all__ = [
    "BACKEND_NAME",
    "ENGINES",
    "INPUTS",
    "OUTPUTS",
    "BackendConfigError",
    "ModelSettings",
    "model_config",
    "to_pbtxt",
]

BACKEND_NAME = "warmstart"
ENGINES = ("torch", "jax")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_BATCH = 8

# vllm_backend conventions (text_input, stream, sampling_parameters, exclude_input_in_output -> text_output)
# plus token ids in and out for resuming a generation elsewhere.
INPUTS: tuple[dict[str, Any], ...] = (
    {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "stream", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "sampling_parameters", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "exclude_input_in_output", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1], "optional": True},
    {"name": "num_generated", "data_type": "TYPE_INT64", "dims": [1], "optional": True},
    # a chat (JSON array of {role, content}) rendered with the checkpoint's chat template, instead of text_input
    {"name": "messages", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
)
OUTPUTS: tuple[dict[str, Any], ...] = (
    {"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "token_ids", "data_type": "TYPE_INT64", "dims": [-1]},
    {"name": "finish_reason", "data_type": "TYPE_STRING", "dims": [-1]},
    # last response only: the prompt's token count; the EOS id that ended the generation (finish "stop")
    {"name": "prompt_tokens", "data_type": "TYPE_INT64", "dims": [1]},
    {"name": "stop_token_id", "data_type": "TYPE_INT64", "dims": [1]},
)

# parameters this backend reads, and parameters the Python backend itself owns (allowed, ignored here)
_KNOWN_PARAMETERS = (
    "checkpoint",
    "engine",
    "dtype",
    "max_batch",
    "device",
    "enable_lora",
    "max_loras",
    "max_lora_rank",
)
DEFAULT_MAX_LORAS = 4
DEFAULT_MAX_LORA_RANK = 16
_PYTHON_BACKEND_PARAMETERS = ("EXECUTION_ENV_PATH",)


class BackendConfigError(WarmstartError, ValueError):
    """A model's ``config.pbtxt`` parameters are missing, unknown or invalid."""


@dataclass(frozen=True)
class ModelSettings:
    """The ``parameters`` of one warmstart model, validated.

    ``checkpoint`` is as written in the config (path, node-store name or URI; ``${VAR}`` and
    ``${VAR:-default}`` are expanded when it is resolved, see :mod:`warmstart.backend.weights`).
    ``device`` is the instance's device, ``"cpu"`` or ``"cuda:N"`` (:func:`warmstart.devices.select_device`
    of the ``device`` parameter and Triton's instance kind).

    LoRA (the vLLM backend's parameter names): ``enable_lora`` serves the adapters named in the model
    directory's ``multi_lora.json`` (docs/lora.md); at most ``max_loras`` of them are loaded at once (least
    recently used evicted), each of rank at most ``max_lora_rank``.
    """

    checkpoint: str
    engine: str
    dtype: str | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    device: str = "cpu"
    enable_lora: bool = False
    max_loras: int = DEFAULT_MAX_LORAS
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, str) or not self.checkpoint.strip():
            raise BackendConfigError(
                "parameter 'checkpoint' must name a checkpoint (path, store name or URI)"
            )
        if self.engine not in ENGINES:
            raise BackendConfigError(f"parameter 'engine' must be one of {ENGINES}, got {self.engine!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise BackendConfigError(f"parameter 'dtype' must be one of {DTYPES}, got {self.dtype!r}")
        if (
            isinstance(self.max_batch, bool)
            or not isinstance(self.max_batch, int)
            or not 1 <= self.max_batch <= 256
        ):
            raise BackendConfigError(
                f"parameter 'max_batch' must be an integer in 1..256, got {self.max_batch!r}"
            )
        parse_device(self.device)  # InvalidDevice
        if not isinstance(self.enable_lora, bool):
            raise BackendConfigError(f"parameter 'enable_lora' must be a bool, got {self.enable_lora!r}")
        for key, top in (("max_loras", 64), ("max_lora_rank", 512)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise BackendConfigError(f"parameter {key!r} must be an integer in 1..{top}, got {value!r}")

    @classmethod
    def from_model_config(
        cls,
        config: Mapping[str, Any],
        *,
        instance_kind: str | None = None,
        instance_device_id: str | int | None = None,
    ) -> ModelSettings:
        """Read the settings from a Triton model config (the JSON ``args["model_config"]`` parsed).

        ``instance_kind`` and ``instance_device_id`` are Triton's ``args["model_instance_kind"]`` and
        ``args["model_instance_device_id"]``: with ``KIND_GPU`` the instance runs on the GPU Triton gave it;
        otherwise the ``device`` parameter decides (default ``"cpu"``). Raises
        :class:`~warmstart.errors.InvalidDevice` for a bad device string and
        :class:`~warmstart.errors.DeviceConflict` for a ``device`` that contradicts ``KIND_GPU``.
        """
        raw = config.get("parameters") or {}
        if not isinstance(raw, Mapping):
            raise BackendConfigError("model config 'parameters' must be a map")
        values: dict[str, str] = {}
        for key, value in raw.items():
            if key in _PYTHON_BACKEND_PARAMETERS:
                continue
            if key not in _KNOWN_PARAMETERS:
                raise BackendConfigError(
                    f"unknown parameter {key!r} in the model config; known: {', '.join(_KNOWN_PARAMETERS)}"
                )
            if not isinstance(value, Mapping) or not isinstance(value.get("string_value"), str):
                raise BackendConfigError(f'parameter {key!r} must be {{ string_value: "..." }}')
            values[key] = value["string_value"]
        for key in ("checkpoint", "engine"):
            if not values.get(key):
                raise BackendConfigError(
                    f"model config lacks parameter {key!r}: add "
                    f'parameters {{ key: "{key}" value {{ string_value: "..." }} }} to config.pbtxt'
                )
        numbers: dict[str, int] = {}
        for key, default in (
            ("max_batch", DEFAULT_MAX_BATCH),
            ("max_loras", DEFAULT_MAX_LORAS),
            ("max_lora_rank", DEFAULT_MAX_LORA_RANK),
        ):
            text = values.get(key, str(default))
            if not re.fullmatch(r"[0-9]{1,4}", text):
                raise BackendConfigError(f"parameter {key!r} must be an integer, got {text!r}")
            numbers[key] = int(text)
        lora_text = values.get("enable_lora", "false").strip().lower()
        if lora_text not in ("true", "false"):
            raise BackendConfigError(
                f'parameter \'enable_lora\' must be "true" or "false", got {lora_text!r}'
            )
        return cls(
            checkpoint=values["checkpoint"],
            engine=values["engine"],
            dtype=values.get("dtype") or None,
            max_batch=numbers["max_batch"],
            device=str(select_device(values.get("device"), instance_kind, instance_device_id)),
            enable_lora=lora_text == "true",
            max_loras=numbers["max_loras"],
            max_lora_rank=numbers["max_lora_rank"],
        )


def model_config(
    name: str,
    checkpoint: str,
    engine: str,
    *,
    dtype: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    instance_count: int = 1,
    instance_kind: str = "KIND_CPU",
    device: str | None = None,
    gpus: list[int] | None = None,
    enable_lora: bool = False,
    max_loras: int = DEFAULT_MAX_LORAS,
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
) -> dict[str, Any]:
    """The complete Triton model config (JSON field names) of a warmstart model.

    Pass it as ``load_model(name, config=json.dumps(model_config(...)))``; it is valid with
    ``--disable-auto-complete-config``. ``device`` becomes the ``device`` parameter (``"cpu"``, ``"cuda"``,
    ``"cuda:N"``; absent: CPU unless ``instance_kind`` is ``KIND_GPU``); ``gpus`` the instance group's GPU
    list (``KIND_GPU`` only). A ``device`` that contradicts ``KIND_GPU`` (``"cpu"``, or a GPU not in ``gpus``)
    raises :class:`~warmstart.errors.DeviceConflict` here rather than at load. ``enable_lora``,
    ``max_loras``, ``max_lora_rank``: LoRA serving (written only with ``enable_lora``).
    """
    settings = ModelSettings(
        checkpoint=checkpoint,
        engine=engine,
        dtype=dtype,
        max_batch=max_batch,
        enable_lora=enable_lora,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
    )
    if instance_kind not in ("KIND_CPU", "KIND_GPU", "KIND_MODEL"):
        raise BackendConfigError(
            f"instance_kind must be KIND_CPU, KIND_GPU or KIND_MODEL, got {instance_kind!r}"
        )
    if isinstance(instance_count, bool) or not isinstance(instance_count, int) or instance_count < 1:
        raise BackendConfigError(f"instance_count must be a positive integer, got {instance_count!r}")
    parameters = {
        "checkpoint": {"string_value": settings.checkpoint},
        "engine": {"string_value": settings.engine},
        "max_batch": {"string_value": str(settings.max_batch)},
    }
    if settings.dtype is not None:
        parameters["dtype"] = {"string_value": settings.dtype}
    if settings.enable_lora:
        parameters["enable_lora"] = {"string_value": "true"}
        parameters["max_loras"] = {"string_value": str(settings.max_loras)}
        parameters["max_lora_rank"] = {"string_value": str(settings.max_lora_rank)}
    group: dict[str, Any] = {"count": instance_count, "kind": instance_kind}
    if gpus is not None:
        if instance_kind != "KIND_GPU":
            raise BackendConfigError(f"gpus needs instance_kind KIND_GPU, not {instance_kind}")
        if not gpus or any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in gpus):
            raise BackendConfigError(f"gpus must be a non-empty list of GPU indices, got {gpus!r}")
        group["gpus"] = list(gpus)
    if device is not None:
        wanted = parse_device(device)  # InvalidDevice now, not at load
        if instance_kind == "KIND_GPU":  # DeviceConflict now: "cpu", or a GPU the group does not place on
            for gpu in gpus or [wanted.index or 0]:
                select_device(device, instance_kind, gpu)
        parameters["device"] = {"string_value": device.strip()}
    return {
        "name": name,
        "backend": BACKEND_NAME,
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": [dict(i) for i in INPUTS],
        "output": [dict(o) for o in OUTPUTS],
        "instance_group": [group],
        "parameters": parameters,
    }


_ENUM_FIELDS = {"data_type", "kind"}


def _pbtxt_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if key in _ENUM_FIELDS:
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise BackendConfigError(f"cannot render {key}={value!r} as protobuf text")


def _pbtxt_lines(obj: Mapping[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    for key, value in obj.items():
        if key == "parameters" and isinstance(value, Mapping):  # map<string, ModelParameter>
            for pkey, pvalue in value.items():
                lines.append(f"{pad}parameters {{")
                lines.append(f"{pad}  key: {_pbtxt_value('key', pkey)}")
                lines.append(f"{pad}  value {{")
                lines += _pbtxt_lines(pvalue, indent + 2)
                lines.append(f"{pad}  }}")
                lines.append(f"{pad}}}")
        elif isinstance(value, Mapping):
            lines.append(f"{pad}{key} {{")
            lines += _pbtxt_lines(value, indent + 1)
            lines.append(f"{pad}}}")
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                lines.append(f"{pad}  {{")
                lines += _pbtxt_lines(item, indent + 2)
                lines.append(f"{pad}  }}{',' if i < len(value) - 1 else ''}")
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_pbtxt_value(key, v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_pbtxt_value(key, value)}")
    return lines


def to_pbtxt(config: Mapping[str, Any]) -> str:
    """Render a model config (JSON field names, as from :func:`model_config`) as ``config.pbtxt`` text."""
    return "\n".join(_pbtxt_lines(config, 0)) + "\n"
