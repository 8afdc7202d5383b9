# ruff: noqa: N806  (B, T, S, H, KV, D name tensor dims, as in the shape comments)
"""A compact Llama / Qwen2 / Mistral in plain torch (gpt-fast shape), and an engine around it.

No transformers import and no module construction: the model is a handful of functions over the
checkpoint's tensors (zero-copy views when the dtype already matches), so building the engine takes
milliseconds, where `transformers` costs seconds to import and to construct a model.

The KV cache is one preallocated tensor per k and v, ``[L, slots, KV, S, hd]``, one slot per live
sequence (``max_batch`` of them). ``S`` starts small and doubles (a copy) when a sequence needs more,
up to ``max_context``, so memory follows the longest sequence rather than the model's context limit.
Decoding attends to a view of the stepped slots when they are contiguous (the lowest free slot is
always taken), a gathered copy otherwise. Grouped-query attention folds the ``rep`` query heads of a
KV head into the query-length axis, so no KV copy is made per step.
"""

from __future__ import annotations

import heapq
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from warmstart.devices import default_device, to_device
from warmstart.engines.base import (
    BadWeightShape,
    ContextFull,
    MissingWeight,
    NoFreeSlot,
    SeqState,
    UnsupportedModel,
    check_prompt,
    check_token_ids,
    eos_ids_from_config,
)

__all__ = ["SUPPORTED_MODEL_TYPES", "LlamaArgs", "TorchLlamaEngine", "supports"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_MIN_CACHE = 128  # positions allocated per slot at first; doubled as needed


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    max_position_embeddings: int

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> LlamaArgs:
        """Read an HF ``config.json`` dict; raise `UnsupportedModel` for a feature not implemented here."""
        mt = config.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(f"model_type {mt!r} unsupported by the compact engine")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {config['hidden_act']!r} unsupported; only silu")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UnsupportedModel(f"RoPE scaling {rope!r} unsupported")
        if config.get("mlp_bias"):
            raise UnsupportedModel("mlp_bias=True unsupported")
        if config.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedModel("pretraining_tp != 1 unsupported")
        window = config.get("sliding_window")
        uses_window = config.get("use_sliding_window", mt == "mistral")
        ctx = config.get("max_position_embeddings", 2048)
        if uses_window and window is not None and window < ctx:
            raise UnsupportedModel(f"sliding-window attention ({window} < {ctx} positions) unsupported")
        if config.get("layer_types") and any(t != "full_attention" for t in config["layer_types"]):
            raise UnsupportedModel("layer types other than full_attention unsupported")
        n_heads = config["num_attention_heads"]
        n_kv = config.get("num_key_value_heads") or n_heads
        if n_heads % n_kv:
            raise UnsupportedModel(f"num_attention_heads {n_heads} not a multiple of kv heads {n_kv}")
        bias = bool(config.get("attention_bias")) or mt == "qwen2"
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        return cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=n_kv,
            intermediate_size=config["intermediate_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bias,
            o_bias=bias and mt != "qwen2",
            max_position_embeddings=ctx,
        )


def supports(config: Mapping[str, Any]) -> bool:
    """Whether the compact engine implements ``config``'s architecture."""
    try:
        LlamaArgs.from_hf_config(config)
    except (UnsupportedModel, KeyError, TypeError):
        return False
    return True


# ---------------------------------------------------------------- weights


def _to_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    a = np.asarray(v)  # numpy, or a jax.Array (aliases on CPU)
    if a.dtype.name == "bfloat16":  # ml_dtypes bf16 has no torch bridge: reinterpret the bits
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    with warnings.catch_warnings():  # read-only mmap views are fine: the model never writes weights
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


@dataclass
class Layer:
    attn_norm: torch.Tensor  # [D]
    wq: torch.Tensor  # [H*hd, D]
    wk: torch.Tensor  # [KV*hd, D]
    wv: torch.Tensor  # [KV*hd, D]
    wo: torch.Tensor  # [D, H*hd]
    mlp_norm: torch.Tensor  # [D]
    w_gate: torch.Tensor  # [F, D]
    w_up: torch.Tensor  # [F, D]
    w_down: torch.Tensor  # [D, F]
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None


@dataclass
class Weights:
    embed: torch.Tensor  # [V, D]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]
    inv_freq: torch.Tensor  # [hd/2] float32
    layers: list[Layer]


def weights_from_flat(flat: Mapping[str, Any], a: LlamaArgs, dtype: torch.dtype | None) -> Weights:
    """Pick this model's tensors from ``{hf_name: tensor}`` (views; cast only when ``dtype`` differs)."""
    if dtype is None:
        first = _to_tensor(flat["model.embed_tokens.weight"]) if "model.embed_tokens.weight" in flat else None
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    hd, H, KV, D, F_ = a.head_dim, a.n_heads, a.n_kv_heads, a.dim, a.intermediate_size

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in flat:
            raise MissingWeight(f"weights have no {name!r}; is the checkpoint for this config?")
        t = _to_tensor(flat[name])
        if tuple(t.shape) != shape:
            raise BadWeightShape(f"{name} has shape {tuple(t.shape)}, config implies {shape}")
        return t if t.dtype == dtype else t.to(dtype)

    layers = []
    for i in range(a.n_layers):
        p = f"model.layers.{i}."
        layer = Layer(
            attn_norm=get(p + "input_layernorm.weight", (D,)),
            wq=get(p + "self_attn.q_proj.weight", (H * hd, D)),
            wk=get(p + "self_attn.k_proj.weight", (KV * hd, D)),
            wv=get(p + "self_attn.v_proj.weight", (KV * hd, D)),
            wo=get(p + "self_attn.o_proj.weight", (D, H * hd)),
            mlp_norm=get(p + "post_attention_layernorm.weight", (D,)),
            w_gate=get(p + "mlp.gate_proj.weight", (F_, D)),
            w_up=get(p + "mlp.up_proj.weight", (F_, D)),
            w_down=get(p + "mlp.down_proj.weight", (D, F_)),
        )
        if a.qkv_bias:
            layer.bq = get(p + "self_attn.q_proj.bias", (H * hd,))
            layer.bk = get(p + "self_attn.k_proj.bias", (KV * hd,))
            layer.bv = get(p + "self_attn.v_proj.bias", (KV * hd,))
        if a.o_bias:
            layer.bo = get(p + "self_attn.o_proj.bias", (D,))
        layers.append(layer)
    embed = get("model.embed_tokens.weight", (a.vocab_size, D))
    untied = not a.tie_word_embeddings and "lm_head.weight" in flat
    head = get("lm_head.weight", (a.vocab_size, D)) if untied else embed
    # as transformers computes it: int64 arange -> float32, then the power in float32
    inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    return Weights(embed, get("model.norm.weight", (D,)), head, inv_freq, layers)


# ---------------------------------------------------------------- model


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' order: normalize in float32, cast back to the input dtype, then scale
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, T, N, hd]; cos, sin: [B, T, 1, hd]; rotate-half convention
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_tables(inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    freqs = pos[..., None].float() * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # [B, T, 1, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def forward(
    w: Weights,
    a: LlamaArgs,
    cache: tuple[torch.Tensor, torch.Tensor],
    tokens: torch.Tensor,
    pos: torch.Tensor,
    *,
    slots: torch.Tensor,
    last_only: bool,
) -> torch.Tensor:
    """Run tokens [B, T] at positions [B, T] into cache rows ``slots`` [B]; each row attends to its
    cached positions up to its own. Returns float32 logits [B, V] (``last_only``) or [B, T, V]."""
    B, T = tokens.shape
    H, KV, rep, hd = a.n_heads, a.n_kv_heads, a.n_rep, a.head_dim
    kc, vc = cache  # [L, slots, KV, S, hd]
    kv_len = int(pos.max()) + 1
    lo = int(slots[0])
    contiguous = bool((slots == torch.arange(lo, lo + B, device=slots.device)).all())
    x = F.embedding(tokens, w.embed)  # [B, T, D]
    cos, sin = rope_tables(w.inv_freq, pos, x.dtype)
    keys = torch.arange(kv_len, device=pos.device)
    mask = (keys[None, None, :] <= pos[:, :, None])[:, None, None]  # [B, 1, 1, T, kv_len]
    mask = mask.expand(B, 1, rep, T, kv_len).reshape(B, 1, rep * T, kv_len)
    at = (slots[:, None], slice(None), pos)  # cache index -> [B, T, KV, hd]
    for i, lw in enumerate(w.layers):
        h = rms_norm(x, lw.attn_norm, a.norm_eps)
        q = rope(F.linear(h, lw.wq, lw.bq).view(B, T, H, hd), cos, sin)  # [B, T, H, hd]
        k = rope(F.linear(h, lw.wk, lw.bk).view(B, T, KV, hd), cos, sin)  # [B, T, KV, hd]
        v = F.linear(h, lw.wv, lw.bv).view(B, T, KV, hd)
        kc[i][at], vc[i][at] = k, v
        if contiguous:  # a view
            kl, vl = kc[i, lo : lo + B, :, :kv_len], vc[i, lo : lo + B, :, :kv_len]  # [B, KV, kv_len, hd]
        else:
            kl, vl = kc[i, slots, :, :kv_len], vc[i, slots, :, :kv_len]
        # GQA: the rep query heads of a KV head ride along the query-length axis
        q = q.view(B, T, KV, rep, hd).permute(0, 2, 3, 1, 4).reshape(B, KV, rep * T, hd)
        o = F.scaled_dot_product_attention(q, kl, vl, attn_mask=mask)  # [B, KV, rep*T, hd]
        o = o.view(B, KV, rep, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H * hd)
        x = x + F.linear(o, lw.wo, lw.bo)
        h = rms_norm(x, lw.mlp_norm, a.norm_eps)
        x = x + F.linear(F.silu(F.linear(h, lw.w_gate)) * F.linear(h, lw.w_up), lw.w_down)
    if last_only:
        x = x[:, -1]  # [B, D]
    return F.linear(rms_norm(x, w.norm, a.norm_eps), w.lm_head).float()


# ---------------------------------------------------------------- engine


class TorchLlamaEngine:
    """`Engine` over the compact model: ``max_batch`` KV-cache slots of up to ``max_context`` tokens."""

    def __init__(
        self,
        config: Mapping[str, Any],
        weights: Mapping[str, Any],
        *,
        dtype: torch.dtype | None = None,
        max_batch: int = 8,
        max_context: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.args = a = LlamaArgs.from_hf_config(config)
        self.device = torch.device("cpu" if device is None else device)
        with default_device(self.device):  # tensors made here (RoPE tables) land on the device
            self.weights = to_device(weights_from_flat(weights, a, dtype), self.device)
        self.dtype = self.weights.embed.dtype
        self.vocab_size = a.vocab_size
        self.max_batch = max_batch
        self.max_context = min(max_context or a.max_position_embeddings, a.max_position_embeddings)
        self.eos_token_ids = eos_ids_from_config(dict(config))
        self._free = list(range(max_batch))  # a heap: lowest slots first keeps stepped slots contiguous
        self._cache = self._alloc(min(_MIN_CACHE, self.max_context))

    def _alloc(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        shape = (a.n_layers, self.max_batch, a.n_kv_heads, size, a.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return k, torch.zeros_like(k)

    def _reserve(self, positions: int) -> None:
        """Grow the cache (doubling) to hold ``positions`` positions per slot."""
        size = self._cache[0].shape[3]
        if positions <= size:
            return
        while size < positions:
            size *= 2
        grown = self._alloc(min(size, self.max_context))
        for old, new in zip(self._cache, grown, strict=True):
            new[:, :, :, : old.shape[3]] = old
        self._cache = grown

    def warm_up(self, max_batch: int) -> None:
        """Nothing to compile: torch runs eagerly."""

    def _run(
        self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, last_only: bool
    ) -> np.ndarray:
        self._reserve(int(pos.max()) + 1)
        if self.device.type != "cpu":
            tokens, pos, slots = (t.to(self.device, non_blocking=True) for t in (tokens, pos, slots))
        # no torch.device mode around forward (its per-op dispatch cost 3.7 ms a SmolLM2 step on CPU):
        # the factory calls in forward name their device
        with torch.inference_mode():
            out = forward(self.weights, self.args, self._cache, tokens, pos, slots=slots, last_only=last_only)
        return out.cpu().numpy()

    def new_sequence(self, token_ids: Sequence[int]) -> SeqState:
        check_prompt(token_ids, vocab_size=self.vocab_size, max_context=self.max_context)
        if not self._free:
            raise NoFreeSlot(f"all {self.max_batch} sequences are in use; release one or raise max_batch")
        slot = heapq.heappop(self._free)
        n = len(token_ids)
        try:
            logits = self._run(
                torch.tensor([list(token_ids)]), torch.arange(n)[None], torch.tensor([slot]), True
            )
        except BaseException:
            heapq.heappush(self._free, slot)
            raise
        return SeqState(length=n, logits=logits[0], handle=slot)

    def step(self, states: Sequence[SeqState], token_ids: Sequence[int]) -> None:
        if len(states) != len(token_ids):
            raise ValueError(f"{len(states)} states but {len(token_ids)} tokens")
        check_token_ids(token_ids, vocab_size=self.vocab_size)
        for s in states:
            if s.released:
                raise ValueError("step() on a released sequence")
            if s.length >= self.max_context:
                raise ContextFull(f"sequence holds {s.length} tokens, the context limit; finish it")
        order = sorted(range(len(states)), key=lambda j: _slot(states[j]))  # ascending slots
        slots = torch.tensor([_slot(states[j]) for j in order])
        tokens = torch.tensor([[int(token_ids[j])] for j in order])  # [B, 1]
        pos = torch.tensor([[states[j].length] for j in order])  # [B, 1]
        logits = self._run(tokens, pos, slots, True)  # [B, V]
        for row, j in enumerate(order):
            states[j].logits = logits[row]
            states[j].length += 1

    def release(self, state: SeqState) -> None:
        if not state.released:
            state.released = True
            heapq.heappush(self._free, _slot(state))


def _slot(state: SeqState) -> int:
    assert isinstance(state.handle, int), "state does not come from a TorchLlamaEngine"
    return state.handle
