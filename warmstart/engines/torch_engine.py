# ruff: noqa: N806  (B, S name tensor dims, as in the shape comments)
"""`Engine` over a transformers causal LM, with HF `DynamicCache`s.

`build_engine("torch", ...)` uses it only for architectures the compact `warmstart.engines.torch_llama`
does not implement: importing transformers and constructing a model costs seconds at every cold start.

Each sequence keeps its own cache between steps. Sequences decoded together are merged into one
left-padded batched cache (a "group"); the group is rebuilt only when the set of sequences in a
step changes, so steady-state decoding of N streams is one forward of batch N.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel

from warmstart.devices import to_device
from warmstart.engines.base import (
    BadWeightShape,
    ContextFull,
    MissingWeight,
    SeqState,
    UnsupportedModel,
    check_prompt,
    check_token_ids,
    eos_ids_from_config,
)
from warmstart.engines.torch_llama import _to_tensor

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [1, KV, S, hd]


def model_from_state_dict(
    config: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """Build a transformers causal LM on the meta device and assign ``state_dict``'s tensors (no copy
    when dtypes already match and they are on ``device`` already, default CPU). Ties embeddings and
    recomputes the non-persistent RoPE buffers on ``device``."""
    dev = torch.device("cpu" if device is None else device)
    cfg_dict = dict(config)
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise UnsupportedModel("config has no 'model_type'; pass the model's HF config.json dict")
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    sd = to_device({k: _to_tensor(v) for k, v in state_dict.items()}, dev)
    if dtype is None:
        dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    sd = {k: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for k, t in sd.items()}
    if "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise MissingWeight(f"weights lack {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    for name, t in expected.items():
        if tuple(sd[name].shape) != tuple(t.shape):
            raise BadWeightShape(f"{name} has shape {tuple(sd[name].shape)}, config implies {tuple(t.shape)}")
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        log.warning("ignoring %d tensor(s) the model does not use, e.g. %s", len(unexpected), unexpected[:3])
    model.load_state_dict({k: sd[k] for k in expected}, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    _rebuild_meta_buffers(model, dev)
    return model.eval()


def _rebuild_meta_buffers(model: torch.nn.Module, device: torch.device) -> None:
    # Non-persistent buffers (RoPE inv_freq) are not in the state dict: rebuild their module, move them to ``device``.
    for name, mod in model.named_modules():
        meta = [b for b, t in mod.named_buffers(recurse=False) if t.is_meta]
        if not meta:
            continue
        if not hasattr(mod, "config"):
            raise UnsupportedModel(f"cannot rebuild buffers {meta} of {name} ({type(mod).__name__})")
        fresh = type(mod)(mod.config)
        for b in meta:
            setattr(mod, b, getattr(fresh, b).to(device))


@dataclass(eq=False)
class _Group:
    states: tuple[SeqState, ...]
    cache: DynamicCache  # batch [B], left-padded to a common length
    mask: torch.Tensor  # [B, S] long, 0 over padding
    pads: list[int] = field(default_factory=list)


class TorchEngine:
    """`Engine` around an already-built transformers causal LM (any architecture HF supports)."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        eos_token_ids: frozenset[int] | None = None,
        max_context: int | None = None,
        max_batch: int = 64,
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device  # inputs and masks are made there
        cfg = model.config
        self.vocab_size: int = cfg.vocab_size
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_context = min(max_context or limit, limit)
        self.max_batch = max_batch
        if eos_token_ids is None:
            eos_token_ids = eos_ids_from_config(cfg.to_dict())
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                eos_token_ids |= eos_ids_from_config({"eos_token_id": gen.eos_token_id})
        self.eos_token_ids = eos_token_ids
        self._group: _Group | None = None

    @classmethod
    def from_state_dict(
        cls,
        config: Mapping[str, Any],
        state_dict: Mapping[str, Any],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **kw: Any,
    ) -> TorchEngine:
        """Build the model with `model_from_state_dict` (on ``device``, default CPU) and wrap it; ``kw``
        go to the constructor."""
        return cls(model_from_state_dict(config, state_dict, dtype, device), **kw)

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def new_sequence(self, token_ids: Sequence[int]) -> SeqState:
        check_prompt(token_ids, vocab_size=self.vocab_size, max_context=self.max_context)
        cache = self._new_cache()
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([list(token_ids)], device=self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        logits = out.logits[0, -1].float().cpu().numpy()  # [V]
        return SeqState(length=len(token_ids), logits=logits, handle=_layers_kv(cache))

    def step(self, states: Sequence[SeqState], token_ids: Sequence[int]) -> None:
        if len(states) != len(token_ids):
            raise ValueError(f"{len(states)} states but {len(token_ids)} tokens")
        check_token_ids(token_ids, vocab_size=self.vocab_size)
        for s in states:
            if s.released:
                raise ValueError("step() on a released sequence")
            if s.length >= self.max_context:
                raise ContextFull(f"sequence holds {s.length} tokens, the context limit; finish it")
        g = self._group
        if g is None or g.states != tuple(states):
            self._ungroup()
            g = self._group = self._make_group(tuple(states))
        B = len(states)
        one = torch.ones(B, 1, dtype=g.mask.dtype, device=self.device)
        g.mask = torch.cat([g.mask, one], dim=1)  # [B, S+1]
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor(list(token_ids), device=self.device).view(B, 1),
                attention_mask=g.mask,
                position_ids=torch.tensor([s.length for s in states], device=self.device).view(B, 1),
                past_key_values=g.cache,
                use_cache=True,
            )
        logits = out.logits[:, -1].float().cpu().numpy()  # [B, V]
        for i, s in enumerate(states):
            s.logits = logits[i]
            s.length += 1

    def _make_group(self, states: tuple[SeqState, ...]) -> _Group:
        S = max(s.length for s in states)
        pads = [S - s.length for s in states]
        cache = self._new_cache()
        kvs: list[KV] = [s.handle for s in states]  # type: ignore[misc]
        for i in range(len(kvs[0])):
            k = torch.cat([_left_pad(kv[i][0], p) for kv, p in zip(kvs, pads, strict=True)])  # [B, KV, S, hd]
            v = torch.cat([_left_pad(kv[i][1], p) for kv, p in zip(kvs, pads, strict=True)])
            cache.update(k, v, i)
        mask = torch.ones(len(states), S, dtype=torch.long, device=self.device)
        for b, p in enumerate(pads):
            mask[b, :p] = 0
        for s in states:
            s.handle = None  # the group owns the cache now
        return _Group(states, cache, mask, pads)

    def _ungroup(self) -> None:
        g, self._group = self._group, None
        if g is None:
            return
        S = g.mask.shape[1]
        for b, s in enumerate(g.states):
            if s.released:
                continue
            start = S - s.length
            s.handle = [
                (k[b : b + 1, :, start:].clone(), v[b : b + 1, :, start:].clone())
                for k, v in _layers_kv(g.cache)
            ]

    def release(self, state: SeqState) -> None:
        state.released = True
        state.handle = None


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, 0, n, 0))  # [1, KV, S, hd] -> [1, KV, n + S, hd]


def _layers_kv(cache: DynamicCache) -> KV:
    out: KV = []
    for layer in cache.layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise UnsupportedModel(
                f"cache layer {type(layer).__name__} has no key/value tensors; unsupported model"
            )
        out.append((k, v))
    return out
