"""Batched LoRA math for the engines: each row of a batch with its own adapter (torch).

For one adapted linear ``y = x @ W.T`` and a batch whose row ``i`` uses adapter ``index[i]``:

    y_i += (x_i @ A_j.T @ B_j.T) * scale_j      with j = index[i];  rows with index -1 are left unchanged

Adapters of different ranks are stacked by **zero-padding to the largest rank** R: ``A`` becomes
[N, R, in] with rows ``rank..R`` zero, ``B`` [N, out, R] with columns ``rank..R`` zero. The padded part
contributes exact zeros (``0 * x`` sums), so a padded adapter computes the same update as the unpadded one
(to the rounding of a longer sum of the same non-zero terms; in float32 within 1e-5 of peft, tested). The
cost is that every row pays for rank R: stack adapters of similar ranks together. An adapter that does not
adapt this module (a layer or target it leaves out) is stacked as zeros.

The reference math (:func:`lora_delta`, :func:`apply_lora` over a :class:`StackedLoRA`) gathers each row's
adapter's A and B (``index_select``) and runs two batched matmuls, ``[B, T, in] x [B, in, R] -> [B, T, R] x
[B, R, out]``: what the tests compare the engines and peft with.

:class:`TorchLoraBank` is the compact torch engine's adapter slots (`warmstart.engines.adapters`). It avoids
the gather: a forward (:meth:`TorchLoraBank.batch`) takes the block of slots its rows use as two dense
matrices per layer and target (views, no copy) and a per-row mask that keeps each row's own slot's columns
with its scale; :func:`add_lora` adds one layer's update to a linear's output with two matmuls.
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
    "LoraBatch",
    "StackedLoRA",
    "TorchLoraBank",
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


class LoraBatch:
    """One forward's adapters (:meth:`TorchLoraBank.batch`), grouped by slot.

    The rows are laid out per slot the batch uses: ``[K, M * T, in]`` with K the slots in use (in slot
    order), M the most rows any one of them has, T tokens per row (zeros where a slot has fewer rows). The
    used slots fall into runs of consecutive slots, and each run is one block of the bank: a layer's update
    is two batched matmuls per run on the bank's own memory, no copy of A or B, ``[k, M*T, in] x [k, in, R]
    -> [k, M*T, R] x [k, R, out]`` (A holds the adapter's scale); the rows are then added back to the
    linear's output. A row pays for its own adapter only (and the empty places of the layout), and a step
    reads the A and B of the adapters its rows use, not of every resident one. When the layout is the batch
    itself (every row on one slot, or row ``i`` on slot ``lo + i``) nothing is moved at all.
    """

    def __init__(
        self,
        bank: TorchLoraBank,
        *,
        runs: Sequence[tuple[int, int]],
        per_slot: int,
        dest: Sequence[int] | None,
        src: Sequence[int] | None,
        targets: frozenset[str],
        device: torch.device,
    ) -> None:
        self.bank, self.per_slot, self.targets, self.device = bank, per_slot, targets, device
        self.runs = tuple(runs)  # (first slot, end slot) of each run of consecutive slots in use
        self.slots = sum(hi - lo for lo, hi in self.runs)
        # per row with an adapter: its layout place and its batch row (None: the layout is the batch)
        self._dest, self._src = dest, src
        # every place of the layout holds a row (each slot has M rows): one gather in, one scatter-add out
        self._full = dest is not None and len(dest) == self.slots * per_slot
        self._index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _indices(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(layout rows, batch rows) of the flattened [rows * T] tensors, for T tokens per row."""
        got = self._index.get(t)
        if got is None:
            assert self._dest is not None
            src = range(len(self._dest)) if self._src is None else self._src
            offs = torch.arange(t)
            src = list(src)
            if self._full:  # then the batch row of each layout place, in layout order
                by_place = sorted(range(len(self._dest)), key=self._dest.__getitem__)
                src = [src[i] for i in by_place]
            dest = (torch.tensor(self._dest)[:, None] * t + offs).reshape(-1)
            rows = (torch.tensor(src)[:, None] * t + offs).reshape(-1)
            got = self._index[t] = (dest.to(self.device), rows.to(self.device))
        return got

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, T, in] in the per-slot layout [K, M * T, in] (a view when the layout is the batch)."""
        b, t, fin = x.shape
        if self._dest is None:
            return x.reshape(self.slots, self.per_slot * t, fin)
        dest, rows = self._indices(t)
        flat = x.reshape(b * t, fin)
        if self._full:
            return flat.index_select(0, rows).view(self.slots, self.per_slot * t, fin)
        if self._src is not None:
            flat = flat.index_select(0, rows)
        out = x.new_zeros(self.slots * self.per_slot * t, fin)
        out.index_copy_(0, dest, flat)
        return out.view(self.slots, self.per_slot * t, fin)

    def add(self, y: torch.Tensor, xs: torch.Tensor, target: str, layer: int) -> torch.Tensor:
        """``y`` [B, T, out] (the linear's output) plus each row's update at ``layer``, from ``xs``
        (:meth:`rows` of the linear's input); in place. ``y`` when no row's adapter adapts ``target``."""
        if target not in self.targets:
            return y
        a, bt = self.bank.a[target][layer], self.bank.bt[target][layer]  # a holds scale * A, bt B^T
        b, t, fout = y.shape
        if len(self.runs) == 1:
            lo, hi = self.runs[0]
            h = torch.bmm(xs, a[lo:hi].transpose(1, 2))  # [K, M*T, R]
            delta = torch.bmm(h, bt[lo:hi])  # [K, M*T, out]
        else:
            delta = y.new_empty(self.slots, xs.shape[1], fout)
            at = 0
            for lo, hi in self.runs:
                k = hi - lo
                h = torch.bmm(xs[at : at + k], a[lo:hi].transpose(1, 2))
                torch.bmm(h, bt[lo:hi], out=delta[at : at + k])
                at += k
        if self._dest is None:
            y += delta.view(b, t, fout)
            return y
        dest, rows = self._indices(t)
        if self._full:
            y.view(b * t, fout).index_add_(0, rows, delta.view(-1, fout))
            return y
        y.view(b * t, fout).index_add_(0, rows, delta.view(-1, fout).index_select(0, dest))
        return y


class TorchLoraBank:
    """``max_loras`` adapter slots of rank ``max_rank`` for every target linear of every layer (zeros: no-op).

    Per target: ``a`` [L, N, R, in] (A times the scale) and ``bt`` [L, N, R, out] (B transposed). At one layer
    consecutive slots are one contiguous block, which a forward uses in place (:class:`LoraBatch`): no
    per-step gather of every row's A and B. The registry fills the lowest free slot first, so resident
    adapters tend to form one block.
    """

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
        self.n_layers = arch.n_layers
        self.shapes = target_shapes(arch)
        layers, n, r = arch.n_layers, max_loras, max_rank
        self.a: dict[str, torch.Tensor] = {}
        self.bt: dict[str, torch.Tensor] = {}
        for target, (fin, fout) in self.shapes.items():
            self.a[target] = torch.zeros(layers, n, r, fin, dtype=dtype, device=device)
            self.bt[target] = torch.zeros(layers, n, r, fout, dtype=dtype, device=device)
        self._users: dict[str, set[int]] = {t: set() for t in self.a}  # slots holding an update per target
        # numpy views of the bank (CPU, float32/float16): an install copies each part straight into its slot
        self._np = (
            {t: (self.a[t].numpy(), self.bt[t].numpy()) for t in self.a}
            if torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float16)
            else None
        )

    def _check(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_loras:
            raise InvalidAdapterSlot(f"adapter slot must be an int in [0, {self.max_loras}), got {slot!r}")

    def install(self, slot: int, prepared: PreparedAdapter) -> None:
        """Put ``prepared`` in ``slot`` (replacing what it held): one copy of its parts into the slot. Call it
        between forwards."""
        self._check(slot)
        if prepared.rank > self.max_rank:
            raise InvalidAdapterSlot(
                f"prepared for rank {prepared.rank}, the bank holds rank {self.max_rank}"
            )
        if self._np is None:  # another device or dtype: the padded host arrays, copied per target
            padded = prepared.padded(self.shapes, self.n_layers, self.max_rank)
            for target in self.a:
                item = padded.get(target)
                if item is None:
                    self._clear(target, slot)
                    continue
                a, b, s = (torch.from_numpy(x) for x in item)
                self.a[target][:, slot] = (a * s[:, None, None]).to(self.dtype)
                self.bt[target][:, slot] = b.transpose(1, 2).to(self.dtype)
                self._users[target].add(slot)
            return
        for target, (a_np, bt_np) in self._np.items():
            parts = prepared.parts.get(target)
            if not parts:
                self._clear(target, slot)
                continue
            done = set()
            for p in parts:
                r = p.a.shape[0]
                # the scale goes into A (a contiguous pass); B's transpose is a plain copy (a scaled
                # transpose was 1.4x as slow: 5.4 ms of SmolLM2's rank-16 install against 3.8)
                np.multiply(p.a, np.float32(p.scale), out=a_np[p.layer, slot, :r], casting="unsafe")
                np.copyto(bt_np[p.layer, slot, :r], p.b.T, casting="unsafe")
                if r < self.max_rank:
                    a_np[p.layer, slot, r:] = 0
                    bt_np[p.layer, slot, r:] = 0
                done.add(p.layer)
            for layer in set(range(self.n_layers)) - done:
                a_np[layer, slot] = 0
                bt_np[layer, slot] = 0
            self._users[target].add(slot)

    def _clear(self, target: str, slot: int) -> None:
        self.a[target][:, slot] = 0
        self.bt[target][:, slot] = 0
        self._users[target].discard(slot)

    def remove(self, slot: int) -> None:
        """Empty ``slot`` (all zeros)."""
        self._check(slot)
        for target in self.a:
            self._clear(target, slot)

    def batch(self, index: Sequence[int], device: torch.device) -> LoraBatch | None:
        """The layout of one forward whose row ``i`` uses slot ``index[i]`` (-1: none), for the targets some
        row's adapter adapts; None when no row has an adapter (the base runs alone)."""
        used = sorted({i for i in index if i >= 0})
        if not used:
            return None
        for i in used:
            self._check(i)
        runs: list[tuple[int, int]] = []
        for slot in used:
            if runs and runs[-1][1] == slot:
                runs[-1] = (runs[-1][0], slot + 1)
            else:
                runs.append((slot, slot + 1))
        place_of = {slot: p for p, slot in enumerate(used)}  # the slot's place in the layout
        place = [place_of[slot] for slot in index if slot >= 0]
        src = [row for row, slot in enumerate(index) if slot >= 0]
        per_slot = max(place.count(p) for p in range(len(used)))
        dest = [p * per_slot + n for p, n in zip(place, _ordinal(place), strict=True)]
        targets = frozenset(t for t, users in self._users.items() if users & set(used))
        whole = len(src) == len(index)
        if whole and dest == list(range(len(index))) and len(used) * per_slot == len(index):
            return LoraBatch(
                self, runs=runs, per_slot=per_slot, dest=None, src=None, targets=targets, device=device
            )
        return LoraBatch(
            self,
            runs=runs,
            per_slot=per_slot,
            dest=dest,
            src=None if whole else src,
            targets=targets,
            device=device,
        )


def _ordinal(keys: Sequence[int]) -> list[int]:
    """For each item, how many earlier items have the same key (0, 1, ...)."""
    seen: dict[int, int] = {}
    out = []
    for key in keys:
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out
