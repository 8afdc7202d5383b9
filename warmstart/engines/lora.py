"""Batched LoRA math for the engines: each row of a batch with its own adapter (torch).

For one adapted linear ``y = x @ W.T`` and a batch whose row ``i`` uses adapter ``index[i]``:

    y_i += (x_i @ A_j.T @ B_j.T) * scale_j      with j = index[i];  rows with index -1 are left unchanged

Adapters of different ranks are stacked by **zero-padding to the largest rank** R: ``A`` becomes
[N, R, in] with rows ``rank..R`` zero, ``B`` [N, out, R] with columns ``rank..R`` zero. The padded part
contributes exact zeros (``0 * x`` sums), so a padded adapter computes the same update as the unpadded one
(to the rounding of a longer sum of the same non-zero terms; in float32 within 1e-5 of peft, tested). The
cost is that every row pays for rank R: stack adapters of similar ranks together. An adapter that does not
adapt this module (a layer or target it leaves out) is stacked as zeros.

The update is a gathered low-rank product: each row gathers its adapter's A and B (``index_select``) and
runs two batched matmuls, ``[B, T, in] x [B, in, R] -> [B, T, R] x [B, R, out]``. This is the reference math,
not a fused kernel (no segmented/grouped GEMM yet).

:class:`TorchLoraBank` is the compact torch engine's adapter slots (`warmstart.engines.adapters`): per target
``a`` [L, N, R, in], ``b`` [L, N, out, R], ``scale`` [L, N]; :meth:`TorchLoraBank.gather` picks each row's
slot once per forward for all layers, and :func:`add_gathered` adds one layer's update to a linear's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from warmstart.engines.adapters import InvalidAdapterSlot, PreparedAdapter, target_shapes
from warmstart.engines.hfconfig import Architecture
from warmstart.format.lora import Adapter, IncompatibleBase

__all__ = [
    "NO_ADAPTER",
    "Gathered",
    "StackedLoRA",
    "TorchLoraBank",
    "add_gathered",
    "apply_lora",
    "lora_delta",
    "stack_lora",
    "stack_module",
]

NO_ADAPTER = -1
"""The adapter index of a batch row that runs the base model alone."""


@dataclass(frozen=True, eq=False)
class StackedLoRA:
    """N adapters' A/B for one linear, zero-padded to one rank: ``a`` [N, R, in], ``b`` [N, out, R], ``scale`` [N]."""

    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor
    ranks: tuple[int, ...]

    @property
    def max_rank(self) -> int:
        return int(self.a.shape[1])


def _tensor(x: Any, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    arr = np.asarray(x)
    if arr.dtype.name == "bfloat16":  # ml_dtypes: torch cannot read it directly
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16).to(device=device, dtype=dtype)
    return torch.from_numpy(np.array(arr)).to(device=device, dtype=dtype)


def stack_lora(
    adapters: Sequence[tuple[Any, Any, float] | None],
    *,
    in_features: int,
    out_features: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> StackedLoRA:
    """Stack ``(A [r, in], B [out, r], scale)`` per adapter (None: does not adapt this linear) into one rank.

    A and B may be numpy arrays (the views of :func:`warmstart.format.lora.read_adapter`) or torch tensors.
    """
    if not adapters:
        raise ValueError("stack_lora needs at least one adapter")
    ranks: list[int] = []
    for i, item in enumerate(adapters):
        if item is None:
            ranks.append(0)
            continue
        a, b, _ = item
        r = int(a.shape[0])
        if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
            raise IncompatibleBase(
                f"adapter {i}: A {list(a.shape)} / B {list(b.shape)} do not fit a {in_features} -> "
                f"{out_features} linear (A must be [r, {in_features}], B [{out_features}, r])"
            )
        ranks.append(r)
    rmax = max(*ranks, 1)
    n = len(adapters)
    a_stack = torch.zeros(n, rmax, in_features, dtype=dtype, device=device)
    b_stack = torch.zeros(n, out_features, rmax, dtype=dtype, device=device)
    scale = torch.zeros(n, dtype=dtype, device=device)
    for i, item in enumerate(adapters):
        if item is None:
            continue
        a, b, s = item
        r = ranks[i]
        a_stack[i, :r] = _tensor(a, dtype, device)
        b_stack[i, :, :r] = _tensor(b, dtype, device)
        scale[i] = float(s)
    return StackedLoRA(a_stack, b_stack, scale, tuple(ranks))


def stack_module(
    adapters: Sequence[Adapter],
    layer: int,
    target: str,
    *,
    in_features: int,
    out_features: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> StackedLoRA:
    """:func:`stack_lora` of the adapters' module at ``layer``/``target`` (zeros where one leaves it out)."""
    items: list[tuple[Any, Any, float] | None] = []
    for ad in adapters:
        m = ad.module(layer, target)
        items.append(None if m is None else (m.a, m.b, m.scaling))
    return stack_lora(items, in_features=in_features, out_features=out_features, dtype=dtype, device=device)


def lora_delta(x: torch.Tensor, stacked: StackedLoRA, index: torch.Tensor) -> torch.Tensor:
    """The per-row low-rank update: ``(x_i @ A_j.T @ B_j.T) * scale_j``, zero for rows with index -1.

    ``x`` is [B, in] or [B, T, in]; ``index`` [B] integers in ``[-1, N)``. Returns x's shape with ``out``
    as the last dimension, in x's dtype.
    """
    if index.ndim != 1 or index.shape[0] != x.shape[0]:
        raise ValueError(f"index must be [batch] = [{x.shape[0]}], got {list(index.shape)}")
    n = stacked.a.shape[0]
    if index.numel() and (int(index.min()) < NO_ADAPTER or int(index.max()) >= n):
        raise IndexError(f"adapter indices must lie in [-1, {n}); got {index.tolist()}")
    squeeze = x.ndim == 2
    xs = x.unsqueeze(1) if squeeze else x  # [B, T, in]
    has = index >= 0
    slot = torch.where(has, index, torch.zeros_like(index)).to(torch.long)
    a = stacked.a.index_select(0, slot).to(xs.dtype)  # [B, R, in]
    b = stacked.b.index_select(0, slot).to(xs.dtype)  # [B, out, R]
    scale = (stacked.scale.index_select(0, slot) * has).to(xs.dtype)  # [B]; 0 for rows without adapter
    h = torch.bmm(xs, a.transpose(1, 2))  # [B, T, R]
    delta = torch.bmm(h, b.transpose(1, 2)) * scale[:, None, None]  # [B, T, out]
    return delta.squeeze(1) if squeeze else delta


def apply_lora(y: torch.Tensor, x: torch.Tensor, stacked: StackedLoRA, index: torch.Tensor) -> torch.Tensor:
    """``y`` (the base linear's output for ``x``) plus each row's adapter update; rows with -1 are ``y`` exactly."""
    delta = lora_delta(x, stacked, index)
    keep = (index < 0).view(-1, *([1] * (y.ndim - 1)))
    return torch.where(keep, y, y + delta)


Gathered = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""Per target, each batch row's adapter for every layer: ``a`` [L, B, R, in], ``b`` [L, B, out, R], ``scale``
[L, B] (0 for rows without an adapter)."""


class TorchLoraBank:
    """``max_loras`` adapter slots of rank ``max_rank`` for every target linear of every layer (zeros: no-op)."""

    def __init__(
        self,
        arch: Architecture,
        max_loras: int,
        max_rank: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
            raise ValueError(f"max_loras must be a positive integer, got {max_loras!r}")
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_lora_rank must be a positive integer, got {max_rank!r}")
        self.max_loras, self.max_rank, self.dtype = max_loras, max_rank, dtype
        layers, n, r = arch.n_layers, max_loras, max_rank
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.scale: dict[str, torch.Tensor] = {}
        for target, (fin, fout) in target_shapes(arch).items():
            self.a[target] = torch.zeros(layers, n, r, fin, dtype=dtype, device=device)
            self.b[target] = torch.zeros(layers, n, fout, r, dtype=dtype, device=device)
            self.scale[target] = torch.zeros(layers, n, dtype=dtype, device=device)
        self._users: dict[str, set[int]] = {t: set() for t in self.a}  # slots holding an update per target

    def _check(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_loras:
            raise InvalidAdapterSlot(f"adapter slot must be an int in [0, {self.max_loras}), got {slot!r}")

    def install(self, slot: int, prepared: PreparedAdapter) -> None:
        """Put ``prepared`` in ``slot`` (replacing what it held). Call it between forwards."""
        self._check(slot)
        if prepared.tensors:
            first = next(iter(prepared.tensors.values()))[0]
            if first.shape[1] != self.max_rank:
                raise InvalidAdapterSlot(
                    f"prepared for rank {first.shape[1]}, the bank holds rank {self.max_rank}"
                )
        for target in self.a:
            item = prepared.tensors.get(target)
            if item is None:
                self.a[target][:, slot] = 0
                self.b[target][:, slot] = 0
                self.scale[target][:, slot] = 0
                self._users[target].discard(slot)
                continue
            a, b, s = (torch.from_numpy(np.ascontiguousarray(x)) for x in item)
            self.a[target][:, slot] = a.to(self.dtype)
            self.b[target][:, slot] = b.to(self.dtype)
            self.scale[target][:, slot] = s.to(self.dtype)
            self._users[target].add(slot)

    def remove(self, slot: int) -> None:
        """Empty ``slot`` (all zeros)."""
        self.install(slot, PreparedAdapter("<empty>", 0, {}))

    def gather(self, index: Sequence[int], device: torch.device) -> Gathered | None:
        """Each row's slot (``index``, -1: none) for every layer, for the targets some row's adapter adapts;
        None when no row has an adapter (the forward then runs the base alone)."""
        used = {i for i in index if i >= 0}
        if not used:
            return None
        for i in used:
            self._check(i)
        idx = torch.tensor([max(i, 0) for i in index], device=device)
        has = torch.tensor([i >= 0 for i in index], device=device, dtype=self.dtype)
        out: Gathered = {}
        for target, users in self._users.items():
            if users & used:
                scale = self.scale[target].index_select(1, idx) * has  # [L, B]
                out[target] = (
                    self.a[target].index_select(1, idx),
                    self.b[target].index_select(1, idx),
                    scale,
                )
        return out


def add_gathered(
    y: torch.Tensor, x: torch.Tensor, lora: Gathered | None, target: str, layer: int
) -> torch.Tensor:
    """``y`` (a linear's output for ``x`` [B, T, in]) plus each row's update at ``layer``; ``y`` when none."""
    if lora is None or target not in lora:
        return y
    a, b, s = lora[target]
    h = torch.bmm(x, a[layer].transpose(1, 2))  # [B, T, R]
    return y + torch.bmm(h, b[layer].transpose(1, 2)) * s[layer][:, None, None]
