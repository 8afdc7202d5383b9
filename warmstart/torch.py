"""Load warmstart checkpoints into PyTorch: ``load_state_dict`` and ``load_model``.

``ckpt`` is a local checkpoint directory, a URI (``s3://``, ``gs://``, ``file://``, ``http(s)://``) or a model
name known to the node store. On CPU the tensors are zero-copy views of the host-memory copy (a private
copy-on-write mapping: writes stay private to the process). On CUDA, bytes go through two pinned staging
buffers with asynchronous copies on a side stream, overlapped with reading the next chunk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from warmstart.errors import CorruptCheckpoint, DeviceUnavailable, MissingDependency
from warmstart.format.index import TensorInfo
from warmstart.loaders.tiers import HostCheckpoint, Tiers, open_host
from warmstart.loaders.views import raw_view, select

if TYPE_CHECKING:
    import torch

__all__ = ["load_model", "load_state_dict"]

STAGING_BYTES = 64 * 1024**2

_TORCH_DTYPES = {
    "float64": "float64",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
    "int64": "int64",
    "int32": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint64": "uint64",
    "uint32": "uint32",
    "uint16": "uint16",
    "uint8": "uint8",
    "bool": "bool",
}


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise MissingDependency(
            "warmstart.torch needs PyTorch: pip install 'warmstart[torch]' (or pip install torch)"
        ) from e
    return torch


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a format dtype name."""
    torch = _torch()
    return getattr(torch, _TORCH_DTYPES[name])


def load_state_dict(
    ckpt: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    names: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    tiers: Tiers | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors (or ``names``) of a checkpoint as torch tensors on ``device``, in model order.

    On CPU without ``dtype`` conversion every tensor is a view of the host-memory copy (no bytes copied).
    ``dtype`` converts floating-point tensors (integer and bool tensors keep theirs). ``tiers`` overrides the
    tier configuration from the environment (see :class:`warmstart.loaders.tiers.Tiers`).
    """
    torch = _torch()
    host = open_host(ckpt, tiers=tiers)
    return tensors_from_host(host, device=torch.device(device), names=names, dtype=dtype)


def tensors_from_host(
    host: HostCheckpoint,
    *,
    device: torch.device,
    names: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint already in host memory (views on CPU, staged copies on CUDA)."""
    torch = _torch()
    infos = select(host, names)
    if device.type == "cpu":
        out = {t.name: _cpu_view(host, t) for t in infos}
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {device} requested but torch.cuda.is_available() is false")
        out = _to_cuda(host, infos, device)
    else:
        raise DeviceUnavailable(f"device {device} is not supported; use 'cpu' or 'cuda[:N]'")
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def _cpu_view(host: HostCheckpoint, t: TensorInfo) -> torch.Tensor:
    torch = _torch()
    dt = torch_dtype(t.dtype)
    if t.nbytes == 0:
        return torch.empty(t.shape, dtype=dt)
    flat = torch.frombuffer(host.buffers[t.partition], dtype=torch.uint8, count=t.nbytes, offset=t.offset)
    return flat.view(dt).view(t.shape)


def _to_cuda(host: HostCheckpoint, infos: list[TensorInfo], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy through two pinned staging buffers: fill one from host memory while the other's DMA runs."""
    torch = _torch()
    stream = torch.cuda.Stream(device=device)
    staging = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done: list[Any] = [None, None]
    out: dict[str, Any] = {}
    k = 0
    with torch.cuda.stream(stream):
        for t in infos:
            dst = torch.empty(t.nbytes, dtype=torch.uint8, device=device)
            if t.nbytes:
                src = torch.from_numpy(raw_view(host, t))
                for off in range(0, t.nbytes, STAGING_BYTES):
                    n = min(STAGING_BYTES, t.nbytes - off)
                    slot = k % 2
                    if done[slot] is not None:
                        done[slot].synchronize()  # that buffer's previous DMA has finished
                    staging[slot][:n].copy_(src[off : off + n])  # host read (page faults land here)
                    dst[off : off + n].copy_(staging[slot][:n], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    done[slot] = ev
                    k += 1
            out[t.name] = dst.view(torch_dtype(t.dtype)).view(t.shape)
    stream.synchronize()
    return out


def load_model(
    ckpt: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tiers: Tiers | None = None,
) -> Any:
    """A transformers causal-LM model from the checkpoint's ``config.json`` and weights, in eval mode.

    The model is built on the meta device (no random init), the checkpoint's tensors are assigned (no copy on
    CPU unless ``dtype`` differs), tied weights are re-tied and non-persistent buffers (RoPE ``inv_freq``)
    are recomputed on ``device``.
    """
    torch = _torch()
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise MissingDependency("load_model needs transformers: pip install 'warmstart[torch]'") from e
    dev = torch.device(device)
    host = open_host(ckpt, tiers=tiers)
    try:
        cfg = json.loads(host.read_file("config.json"))
    except FileNotFoundError:
        raise CorruptCheckpoint(
            f"checkpoint {host.location} has no config.json; convert it from a transformers model (warmstart "
            "convert) or use load_state_dict"
        ) from None
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise CorruptCheckpoint(f"config.json of {host.location} has no model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    state = tensors_from_host(host, device=dev, dtype=dtype)
    build_dtype = dtype or next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=build_dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CorruptCheckpoint(
            f"checkpoint {host.location} has tensors the {type(model).__name__} model does not: "
            f"{sorted(result.unexpected_keys)[:5]}"
        )
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CorruptCheckpoint(
            f"checkpoint {host.location} lacks weights of {type(model).__name__}: {still_meta[:5]}"
        )
    _materialize_buffers(model, dev)
    return model.eval()


def _materialize_buffers(model: Any, device: torch.device) -> None:
    """Give meta buffers (non-persistent: RoPE ``inv_freq`` ...) real, correctly computed values."""
    torch = _torch()
    for mod_name, module in model.named_modules():
        metas = [(n, b) for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not metas:
            continue
        for n, b in metas:
            module.register_buffer(
                n, torch.empty_like(b, device=device), persistent=n not in module._non_persistent_buffers_set
            )
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
            with torch.no_grad():
                model._init_weights(module)  # transformers' own recomputation of inv_freq
        else:
            raise CorruptCheckpoint(
                f"{type(model).__name__}.{mod_name} has buffers {[n for n, _ in metas]} that are neither stored "
                "in the checkpoint nor known to be recomputable; load it with transformers instead"
            )
