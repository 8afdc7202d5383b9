"""Load warmstart checkpoints into JAX: ``load_params``.

On CPU each array aliases the host-memory copy: ``jax.device_put`` of a 64-byte-aligned numpy view is zero
copy (every tensor offset is 4096-aligned and mappings are page-aligned). Other devices get a transfer.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from warmstart.errors import DeviceUnavailable, MissingDependency
from warmstart.loaders.tiers import HostCheckpoint, Tiers, open_host
from warmstart.loaders.views import numpy_view, select

if TYPE_CHECKING:
    import jax

__all__ = ["load_params"]


def _jax() -> Any:
    try:
        import jax
    except ImportError as e:
        raise MissingDependency(
            "warmstart.jax needs JAX: pip install 'warmstart[jax]' (or pip install jax)"
        ) from e
    return jax


def _device(device: Any) -> Any:
    jax = _jax()
    if device is None or not isinstance(device, str):
        return device
    kind, _, num = device.partition(":")
    try:
        devs = jax.devices(kind)
    except RuntimeError as e:
        raise DeviceUnavailable(f"no JAX device of kind {kind!r}: {e}") from e
    i = int(num) if num else 0
    if i >= len(devs):
        raise DeviceUnavailable(f"JAX has {len(devs)} {kind} device(s); {device!r} does not exist")
    return devs[i]


def load_params(
    ckpt: str | os.PathLike[str],
    *,
    device: Any = None,
    dtype: Any = None,
    names: Any = None,
    tiers: Tiers | None = None,
) -> dict[str, jax.Array]:
    """All tensors (or ``names``) of a checkpoint as ``jax.Array``s on ``device`` (default: JAX's default).

    ``device`` is a ``jax.Device`` or a string like ``"cpu"`` / ``"gpu:0"``. ``dtype`` converts floating-point
    arrays (a copy). Without it, CPU arrays alias the host-memory copy.
    """
    host = open_host(ckpt, tiers=tiers)
    return params_from_host(host, device=device, dtype=dtype, names=names)


def params_from_host(
    host: HostCheckpoint, *, device: Any = None, dtype: Any = None, names: Any = None
) -> dict[str, jax.Array]:
    """Arrays of a checkpoint already in host memory."""
    jax = _jax()
    import numpy as np

    dev = _device(device)
    out: dict[str, Any] = {}
    for t in select(host, names):
        arr = jax.device_put(numpy_view(host, t), dev)
        if dtype is not None and np.issubdtype(arr.dtype, np.inexact):
            arr = arr.astype(dtype)
        out[t.name] = arr
    return out
