"""Which device a model runs on: parsing, the backend's selection rule, and availability checks.

Device strings are ``"cpu"``, ``"cuda"`` (GPU 0 unless Triton placed the instance) and ``"cuda:N"``;
anything else is :class:`~warmstart.errors.InvalidDevice`.

Selection for a model instance of the ``warmstart`` Triton backend (:func:`select_device`, a pure function):

1. ``instance_group [{ kind: KIND_GPU ... }]``: Triton placed the instance on a GPU
   (``args["model_instance_device_id"]``) and that GPU is used. A ``device`` parameter may repeat it
   (``"cuda"`` or ``"cuda:<that id>"``); ``"cpu"`` or another GPU is :class:`~warmstart.errors.DeviceConflict`.
2. ``KIND_CPU``, ``KIND_MODEL`` (or no kind): the ``device`` parameter decides; without one, ``"cpu"``.

CPU is the default everywhere. Whether the chosen device exists is checked where the engine runs (the engine
process or the stub), before any weight is read: :func:`check_available` (pure, over a device count) raises
:class:`~warmstart.errors.DeviceUnavailable` saying that no CUDA device is visible and how to run on CPU.
Nothing here imports torch or jax at module level; :func:`torch_cuda_count` and :func:`jax_devices` do, and
only in the process that will run the engine (the engine host must never touch CUDA before it forks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from warmstart.errors import DeviceConflict, DeviceUnavailable, InvalidDevice

__all__ = [
    "CPU",
    "CPU_HINT",
    "Device",
    "check_available",
    "check_engine_device",
    "default_device",
    "jax_device",
    "jax_devices",
    "parse_device",
    "select_device",
    "to_device",
    "torch_cuda_count",
]

_DEVICE = re.compile(r"(cpu|cuda)(?::([0-9]{1,4}))?")
_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_MODEL", "KIND_AUTO")

CPU_HINT = (
    'to run on CPU, use instance_group [{ kind: KIND_CPU }] and parameter device "cpu" (or leave device out) '
    "in config.pbtxt"
)


@dataclass(frozen=True)
class Device:
    """A device: ``platform`` ``"cpu"`` (``index`` None) or ``"cuda"`` (``index`` None: not chosen yet)."""

    platform: Literal["cpu", "cuda"]
    index: int | None = None

    def __str__(self) -> str:
        if self.platform == "cpu":
            return "cpu"
        return "cuda" if self.index is None else f"cuda:{self.index}"

    @property
    def is_cuda(self) -> bool:
        return self.platform == "cuda"


CPU = Device("cpu")


def parse_device(text: object) -> Device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (surrounding blanks ignored) as a :class:`Device`."""
    if not isinstance(text, str):
        raise InvalidDevice(f"a device must be a string like 'cpu', 'cuda' or 'cuda:0', got {text!r}")
    m = _DEVICE.fullmatch(text.strip())
    if m is None:
        raise InvalidDevice(
            f"device {text!r} is not supported; use 'cpu', 'cuda' or 'cuda:N' (N a GPU index, e.g. 'cuda:0')"
        )
    if m.group(1) == "cpu":
        if m.group(2) is not None:
            raise InvalidDevice(f"device {text!r}: the CPU has no index; use 'cpu'")
        return CPU
    return Device("cuda", None if m.group(2) is None else int(m.group(2)))


def _instance_gpu(kind: str, device_id: object) -> int:
    text = str(device_id).strip() if device_id is not None else ""
    if not re.fullmatch(r"[0-9]{1,4}", text):
        raise InvalidDevice(f"instance kind {kind} came with GPU id {device_id!r}, not a GPU index")
    return int(text)


def select_device(
    requested: str | None, instance_kind: str | None = None, instance_device_id: object = None
) -> Device:
    """The device of one model instance (rules in the module docstring); the CUDA index is always set.

    ``requested`` is the ``device`` parameter of config.pbtxt (None or blank: absent); ``instance_kind`` is
    Triton's ``model_instance_kind`` (``"GPU"``, ``"CPU"``, ``"MODEL"``, with or without ``KIND_``) and
    ``instance_device_id`` its ``model_instance_device_id``.
    """
    wanted = parse_device(requested) if requested is not None and requested.strip() else None
    kind = (instance_kind or "").strip().upper()
    if kind and not kind.startswith("KIND_"):
        kind = "KIND_" + kind
    if kind and kind not in _KINDS:
        raise InvalidDevice(f"unknown instance kind {instance_kind!r}; expected one of {', '.join(_KINDS)}")
    if kind == "KIND_GPU":
        gpu = _instance_gpu(kind, instance_device_id)
        if wanted is not None and (not wanted.is_cuda or wanted.index not in (None, gpu)):
            raise DeviceConflict(
                f"instance_group kind KIND_GPU placed this instance on GPU {gpu}, but parameter device says "
                f"{requested!r}; remove the device parameter (KIND_GPU chooses the GPU, gpus: [...] lists "
                "them), or use KIND_CPU / KIND_MODEL with the device you want"
            )
        return Device("cuda", gpu)
    if wanted is None:
        return CPU
    if wanted.is_cuda and wanted.index is None:
        return Device("cuda", 0)
    return wanted


def check_available(device: Device, cuda_count: int, *, what: str = "the model") -> None:
    """Raise :class:`DeviceUnavailable` unless ``device`` is the CPU or one of ``cuda_count`` visible GPUs."""
    if not device.is_cuda:
        return
    index = device.index or 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    if cuda_count <= 0:
        raise DeviceUnavailable(
            f"{what} asks for device {device} (instance_group KIND_GPU or parameter device), but no CUDA "
            f"device is visible to this process{seen}; {CPU_HINT}"
        )
    if index >= cuda_count:
        raise DeviceUnavailable(
            f"{what} asks for device {device}, but only {cuda_count} CUDA device(s) are visible{seen} "
            f"(cuda:0..cuda:{cuda_count - 1}); name one of them, or {CPU_HINT}"
        )


def torch_cuda_count() -> int:
    """How many CUDA devices torch sees (0 without a CUDA build, a driver or a GPU). Imports torch."""
    import torch

    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except RuntimeError:  # a broken driver install reads as "no GPU", which the caller reports
        return 0


def jax_devices(device: Device) -> list[Any]:
    """JAX's devices of ``device``'s platform; :class:`DeviceUnavailable` when the installed jax has none."""
    import jax

    try:
        devices = list(jax.devices(device.platform))
    except RuntimeError as e:
        hint = "pip install 'jax[cuda12]' (a jax with the CUDA plugin), or " if device.is_cuda else ""
        raise DeviceUnavailable(
            f"the installed jax {jax.__version__} has no {device.platform} platform ({e}); {hint}{CPU_HINT}"
        ) from None
    return devices


def check_engine_device(device: Device, engine: str, *, what: str = "the model") -> None:
    """Check that ``engine`` ("torch" or "jax") can run on ``device`` in this process, before loading."""
    if not device.is_cuda:
        return
    if engine == "jax":
        try:
            devices = jax_devices(device)
        except DeviceUnavailable as e:
            raise DeviceUnavailable(f"{what} asks for device {device}, but {e}") from None
        check_available(device, len(devices), what=what)
    else:
        check_available(device, torch_cuda_count(), what=what)


def default_device(device: Any) -> contextlib.AbstractContextManager[Any]:
    """A context in which torch factory functions (``arange``, ``zeros``, ``tensor``) create tensors on
    ``device`` (a ``torch.device``); nothing at all for the CPU, so the CPU path is unchanged."""
    if getattr(device, "type", "cpu") == "cpu":
        return contextlib.nullcontext()
    cm: contextlib.AbstractContextManager[Any] = device  # torch.device is a context manager (torch >= 2.0)
    return cm


def to_device(obj: Any, device: Any) -> Any:
    """``obj`` with every torch tensor in it (nested dataclasses, lists, tuples, dicts) on ``device``.

    Tensors already there are kept (no copy); dataclass fields are replaced in place. For the CPU nothing
    is walked. Copies from the host are asynchronous (``non_blocking``) and synchronized once at the end.
    """
    if getattr(device, "type", "cpu") == "cpu":
        return obj
    import torch

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x if x.device == device else x.to(device, non_blocking=True)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                object.__setattr__(x, f.name, move(getattr(x, f.name)))  # frozen ones too
            return x
        if isinstance(x, list):
            return [move(v) for v in x]
        if isinstance(x, tuple):
            return tuple(move(v) for v in x)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    out = move(obj)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def jax_device(device: Device | str) -> Any:
    """The ``jax.Device`` for ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``), checked to exist."""
    dev = parse_device(device) if isinstance(device, str) else device
    devices = jax_devices(dev)
    check_available(dev, len(devices))
    return devices[dev.index or 0]
