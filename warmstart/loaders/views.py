"""Framework tensors as views of a :class:`~warmstart.loaders.tiers.HostCheckpoint`'s buffers.

On CPU nothing is copied: numpy arrays are ``np.frombuffer`` views, torch tensors ``torch.frombuffer`` views,
jax arrays ``jax.device_put`` of 64-byte-aligned numpy views (which XLA's CPU client aliases). Every view
keeps its buffer (and so the cache entry's in-use lock) alive.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from warmstart.errors import TensorNotFound
from warmstart.format import spec
from warmstart.format.index import TensorInfo
from warmstart.loaders.tiers import HostCheckpoint


def select(host: HostCheckpoint, names: Iterable[str] | None) -> list[TensorInfo]:
    """The tensors named (all, in model order, when ``names`` is None)."""
    if names is None:
        return list(host.index.tensors)
    tmap = host.index.tensor_map()
    out = []
    for n in names:
        if n not in tmap:
            raise TensorNotFound(f"checkpoint {host.location} has no tensor {n!r}")
        out.append(tmap[n])
    return out


def numpy_view(host: HostCheckpoint, t: TensorInfo) -> np.ndarray:
    """One tensor as a numpy view of the host buffer (bfloat16 / float8 through ml_dtypes)."""
    dt = spec.DTYPES[t.dtype].numpy
    if t.nbytes == 0:
        return np.empty(t.shape, dtype=dt)
    return np.frombuffer(host.buffers[t.partition], dtype=dt, count=t.numel, offset=t.offset).reshape(t.shape)


def raw_view(host: HostCheckpoint, t: TensorInfo) -> np.ndarray:
    """One tensor's bytes as a flat uint8 numpy view."""
    return np.frombuffer(host.buffers[t.partition], dtype=np.uint8, count=t.nbytes, offset=t.offset)
