# ruff: noqa: N806  (B, T, S, H, KV, D name tensor dims, as in the shape comments)
"""A compact Llama-family decoder in plain torch (gpt-fast shape), and an engine around it.

Families, as `warmstart.engines.hfconfig.parse_hf_config` reads them (the parser the JAX engine shares):
Llama 1-3.x (RoPE scaling "linear", "dynamic", "llama3", "yarn"), Mistral (sliding window), Qwen2/2.5
(q/k/v biases, sliding-window layers), Qwen3 (q/k RMSNorm per head), Gemma 2 and Gemma 3 text (embeddings
times sqrt(hidden), ``1 + w`` and sandwich norms, attention and final logit soft-capping, local/global
layers with per-kind RoPE), Phi-3/3.5 (fused qkv_proj and gate_up_proj used as row views, LongRoPE,
partial rotary). Anything else `supports` refuses, and `build_engine` falls back to transformers.

No transformers import and no module construction: the model is a handful of functions over the
checkpoint's tensors (zero-copy views when the dtype already matches), so building the engine takes
milliseconds, where `transformers` costs seconds to import and to construct a model.

The KV cache is one preallocated tensor per k and v, ``[L, slots, KV, S, hd]``, one slot per live
sequence (``max_batch`` of them). ``S`` starts small and doubles (a copy) when a sequence needs more,
up to ``max_context``, so memory follows the longest sequence rather than the model's context limit.
Sliding-window layers keep every position too; their mask limits each query to the last ``window``
positions (itself included), as transformers does. Decoding attends to a view of the stepped slots when
they are contiguous (the lowest free slot is always taken), a gathered copy otherwise. Grouped-query
attention folds the ``rep`` query heads of a KV head into the query-length axis, so no KV copy is made
per step.
"""

from __future__ import annotations

import heapq
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from warmstart.devices import default_device, to_device
from warmstart.engines.adapters import InvalidAdapterSlot, PreparedAdapter
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
from warmstart.engines.hfconfig import SUPPORTED_MODEL_TYPES, Architecture, parse_hf_config, rope_inv_freq
from warmstart.engines.lora import LoraBatch, TorchLoraBank

__all__ = ["SUPPORTED_MODEL_TYPES", "TorchLlamaEngine", "supports"]

_MIN_CACHE = 128  # positions allocated per slot at first; doubled as needed


def supports(config: Mapping[str, Any]) -> bool:
    """Whether the compact engine implements ``config``'s architecture (its RoPE tables included)."""
    try:
        rope_sets(parse_hf_config(config))
    except (UnsupportedModel, KeyError, TypeError, ValueError):
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
    mlp_norm: torch.Tensor  # [D]: the MLP's input norm
    w_gate: torch.Tensor  # [F, D]
    w_up: torch.Tensor  # [F, D]
    w_down: torch.Tensor  # [D, F]
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [hd] Qwen3, Gemma 3: per head, before RoPE
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # [D] Gemma's sandwich: on the attention output
    mlp_out_norm: torch.Tensor | None = None  # [D] and on the MLP output
    rope: int = 0  # index into Weights.ropes
    window: int | None = None  # sliding window (positions attended, itself included); None: full


@dataclass
class Rope:
    """One kind of layer's RoPE: frequencies [rd/2] float32 and the factor cos/sin are scaled by."""

    inv_freq: torch.Tensor
    scale: float = 1.0
    inv_freq_long: torch.Tensor | None = None  # LongRoPE: for forwards past the original context


@dataclass
class Weights:
    embed: torch.Tensor  # [V, D]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]
    layers: list[Layer]
    ropes: list[Rope] = field(default_factory=list)


def rope_sets(a: Architecture) -> tuple[list[Rope], list[int]]:
    """The distinct RoPE settings of ``a``'s layers (one for most models, two for Gemma 3's local/global
    layers) and each layer's index into them; frequencies as transformers computes them."""
    ropes: list[Rope] = []
    seen: list[Mapping[str, Any]] = []
    index = []
    for params in a.layer_rope:
        if params not in seen:
            seen.append(params)
            inv, scale = rope_inv_freq(params, a.head_dim, a.max_position_embeddings)
            long = None
            if a.longrope_original is not None:
                long = torch.from_numpy(
                    rope_inv_freq(params, a.head_dim, a.max_position_embeddings, long=True)[0]
                )
            ropes.append(Rope(torch.from_numpy(inv), scale, long))
        index.append(seen.index(params))
    return ropes, index


def weights_from_flat(flat: Mapping[str, Any], a: Architecture, dtype: torch.dtype | None) -> Weights:
    """Pick this model's tensors from ``{hf_name: tensor}`` (views; cast only when ``dtype`` differs).

    Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` become row slices of the fused tensor: views, no copy.
    """
    pre = a.prefix
    if dtype is None:
        first = _to_tensor(flat[pre + "embed_tokens.weight"]) if pre + "embed_tokens.weight" in flat else None
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    hd, H, KV, D, F_ = a.head_dim, a.n_heads, a.n_kv_heads, a.dim, a.intermediate_size

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in flat:
            raise MissingWeight(f"weights have no {name!r}; is the checkpoint for this config?")
        t = _to_tensor(flat[name])
        if tuple(t.shape) != shape:
            raise BadWeightShape(f"{name} has shape {tuple(t.shape)}, config implies {shape}")
        return t if t.dtype == dtype else t.to(dtype)

    ropes, rope_index = rope_sets(a)
    layers = []
    for i in range(a.n_layers):
        p = f"{pre}layers.{i}."
        if a.fused_qkv:
            qkv = get(p + "self_attn.qkv_proj.weight", ((H + 2 * KV) * hd, D))
            wq, wk, wv = qkv[: H * hd], qkv[H * hd : (H + KV) * hd], qkv[(H + KV) * hd :]
        else:
            wq = get(p + "self_attn.q_proj.weight", (H * hd, D))
            wk = get(p + "self_attn.k_proj.weight", (KV * hd, D))
            wv = get(p + "self_attn.v_proj.weight", (KV * hd, D))
        if a.fused_gate_up:
            gate_up = get(p + "mlp.gate_up_proj.weight", (2 * F_, D))
            w_gate, w_up = gate_up[:F_], gate_up[F_:]
        else:
            w_gate, w_up = get(p + "mlp.gate_proj.weight", (F_, D)), get(p + "mlp.up_proj.weight", (F_, D))
        # Gemma's sandwich: post_attention_layernorm is the attention output's norm, pre_feedforward the MLP's
        mlp_norm = (
            "pre_feedforward_layernorm.weight" if a.sandwich_norm else "post_attention_layernorm.weight"
        )
        layer = Layer(
            attn_norm=get(p + "input_layernorm.weight", (D,)),
            wq=wq,
            wk=wk,
            wv=wv,
            wo=get(p + "self_attn.o_proj.weight", (D, H * hd)),
            mlp_norm=get(p + mlp_norm, (D,)),
            w_gate=w_gate,
            w_up=w_up,
            w_down=get(p + "mlp.down_proj.weight", (D, F_)),
            rope=rope_index[i],
            window=a.layer_windows[i],
        )
        if a.qkv_bias:
            layer.bq = get(p + "self_attn.q_proj.bias", (H * hd,))
            layer.bk = get(p + "self_attn.k_proj.bias", (KV * hd,))
            layer.bv = get(p + "self_attn.v_proj.bias", (KV * hd,))
        if a.o_bias:
            layer.bo = get(p + "self_attn.o_proj.bias", (D,))
        if a.qk_norm:
            layer.q_norm = get(p + "self_attn.q_norm.weight", (hd,))
            layer.k_norm = get(p + "self_attn.k_norm.weight", (hd,))
        if a.sandwich_norm:
            layer.attn_out_norm = get(p + "post_attention_layernorm.weight", (D,))
            layer.mlp_out_norm = get(p + "post_feedforward_layernorm.weight", (D,))
        layers.append(layer)
    embed = get(pre + "embed_tokens.weight", (a.vocab_size, D))
    untied = not a.tie_word_embeddings and "lm_head.weight" in flat
    head = get("lm_head.weight", (a.vocab_size, D)) if untied else embed
    return Weights(embed, get(pre + "norm.weight", (D,)), head, layers, ropes)


# ---------------------------------------------------------------- model


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """RMSNorm in transformers' order for each family. Llama/Qwen/Mistral/Phi-3: normalize in float32, cast
    back to the input dtype, then scale by ``w``. Gemma (``offset``): scale by ``1 + w`` in float32, then cast."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (x32 * (1.0 + w.float())).to(x.dtype)
    return w * x32.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` dims of each head (the rest pass: partial rotary).

    x: [B, T, N, hd]; cos, sin: [B, T, 1, rd]."""
    rd = cos.shape[-1]
    if rd != x.shape[-1]:
        return torch.cat((rope(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_tables(
    r: Rope, pos: torch.Tensor, long: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, 1, rd] for positions [B, T]; ``long`` [B]: rows that use LongRoPE's long factors."""
    inv = r.inv_freq  # [rd/2]
    if long is not None and r.inv_freq_long is not None:
        inv = torch.where(long[:, None], r.inv_freq_long, r.inv_freq)[:, None]  # [B, 1, rd/2]
    freqs = pos[..., None].float() * inv  # [B, T, rd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # [B, T, 1, rd]
    cos, sin = emb.cos(), emb.sin()
    if r.scale != 1.0:  # YaRN / LongRoPE attention factor
        cos, sin = cos * r.scale, sin * r.scale
    return cos.to(dtype), sin.to(dtype)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's logit soft-capping, ``cap * tanh(x / cap)``; identity when ``cap`` is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, a: Architecture
) -> torch.Tensor:
    """q: [B, KV, R, hd]; k, v: [B, KV, S, hd]; mask: [B, 1, R, S] (True = may attend) -> [B, KV, R, hd]."""
    if a.attn_softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.attn_scale)
    # Gemma 2 (transformers' eager order): scale, cap, mask, softmax in float32
    s = softcap(torch.matmul(q, k.transpose(-1, -2)) * a.attn_scale, a.attn_softcap)
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def attention_mask(pos: torch.Tensor, kv_len: int, window: int | None, rep: int) -> torch.Tensor:
    """[B, 1, rep*T, kv_len]: query at pos [B, T] may attend key k when ``k <= pos`` and, for a sliding
    window, ``k > pos - window`` (transformers' rule); the rep query heads of a KV head share a row block."""
    B, T = pos.shape
    keys = torch.arange(kv_len, device=pos.device)[None, None, :]
    mask = keys <= pos[:, :, None]  # [B, T, kv_len]
    if window is not None:
        mask = mask & (keys > pos[:, :, None] - window)
    return mask[:, None, None].expand(B, 1, rep, T, kv_len).reshape(B, 1, rep * T, kv_len)


def forward(
    w: Weights,
    a: Architecture,
    cache: tuple[torch.Tensor, torch.Tensor],
    tokens: torch.Tensor,
    pos: torch.Tensor,
    *,
    slots: torch.Tensor,
    last_only: bool,
    lora: LoraBatch | None = None,
) -> torch.Tensor:
    """Run tokens [B, T] at positions [B, T] into cache rows ``slots`` [B]; each row attends to its
    cached positions up to its own. Returns float32 logits [B, V] (``last_only``) or [B, T, V].

    LongRoPE picks its long factors per row when the row's forward reaches past the original context
    (``max(pos) + 1 > original_max_position_embeddings``), as transformers decides per forward of one
    sequence; earlier cached keys keep the frequencies they were computed with.

    ``lora`` (`TorchLoraBank.batch`): each row's LoRA update is added to the target linears' outputs."""
    B, T = tokens.shape
    H, KV, rep, hd = a.n_heads, a.n_kv_heads, a.n_rep, a.head_dim
    eps, offset = a.norm_eps, a.norm_offset
    kc, vc = cache  # [L, slots, KV, S, hd]
    kv_len = int(pos.max()) + 1
    lo = int(slots[0])
    contiguous = bool((slots == torch.arange(lo, lo + B, device=slots.device)).all())
    x = F.embedding(tokens, w.embed)  # [B, T, D]
    if a.embed_scale is not None:  # Gemma: sqrt(hidden) as a float32 tensor cast to the compute dtype
        x = x * torch.tensor(a.embed_scale, dtype=torch.float32, device=x.device).to(x.dtype)
    long = None if a.longrope_original is None else pos.amax(dim=1) + 1 > a.longrope_original  # [B]
    tables = [rope_tables(r, pos, long, x.dtype) for r in w.ropes]
    masks = {win: attention_mask(pos, kv_len, win, rep) for win in {lw.window for lw in w.layers}}
    at = (slots[:, None], slice(None), pos)  # cache index -> [B, T, KV, hd]
    for i, lw in enumerate(w.layers):
        cos, sin = tables[lw.rope]
        h = rms_norm(x, lw.attn_norm, eps, offset)
        q, k = F.linear(h, lw.wq, lw.bq), F.linear(h, lw.wk, lw.bk)
        hs = None if lora is None else lora.rows(h)  # h in the adapters' per-slot layout
        if lora is not None and hs is not None:
            q, k = lora.add(q, hs, "q_proj", i), lora.add(k, hs, "k_proj", i)
        q, k = q.view(B, T, H, hd), k.view(B, T, KV, hd)  # [B, T, H, hd], [B, T, KV, hd]
        if lw.q_norm is not None and lw.k_norm is not None:  # per head, before RoPE
            q, k = rms_norm(q, lw.q_norm, eps, offset), rms_norm(k, lw.k_norm, eps, offset)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        v = F.linear(h, lw.wv, lw.bv)
        if lora is not None and hs is not None:
            v = lora.add(v, hs, "v_proj", i)
        v = v.view(B, T, KV, hd)
        kc[i][at], vc[i][at] = k, v
        if contiguous:  # a view
            kl, vl = kc[i, lo : lo + B, :, :kv_len], vc[i, lo : lo + B, :, :kv_len]  # [B, KV, kv_len, hd]
        else:
            kl, vl = kc[i, slots, :, :kv_len], vc[i, slots, :, :kv_len]
        # GQA: the rep query heads of a KV head ride along the query-length axis
        q = q.view(B, T, KV, rep, hd).permute(0, 2, 3, 1, 4).reshape(B, KV, rep * T, hd)
        o = attend(q, kl, vl, masks[lw.window], a)  # [B, KV, rep*T, hd]
        o_in = o.view(B, KV, rep, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H * hd)
        o = F.linear(o_in, lw.wo, lw.bo)
        if lora is not None:
            o = lora.add(o, lora.rows(o_in), "o_proj", i)
        if lw.attn_out_norm is not None:
            o = rms_norm(o, lw.attn_out_norm, eps, offset)
        x = x + o
        h = rms_norm(x, lw.mlp_norm, eps, offset)
        g, u = F.linear(h, lw.w_gate), F.linear(h, lw.w_up)
        if lora is not None:
            hs = lora.rows(h)
            g, u = lora.add(g, hs, "gate_proj", i), lora.add(u, hs, "up_proj", i)
        g = F.silu(g) if a.activation == "silu" else F.gelu(g, approximate="tanh")
        gu = g * u
        m = F.linear(gu, lw.w_down)
        if lora is not None:
            m = lora.add(m, lora.rows(gu), "down_proj", i)
        if lw.mlp_out_norm is not None:
            m = rms_norm(m, lw.mlp_out_norm, eps, offset)
        x = x + m
    if last_only:
        x = x[:, -1]  # [B, D]
    return softcap(F.linear(rms_norm(x, w.norm, eps, offset), w.lm_head), a.final_softcap).float()


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
        self.args = a = parse_hf_config(config)
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
        self.lora: TorchLoraBank | None = None  # adapter slots, once enable_lora is called

    # -- LoRA adapters (warmstart.engines.adapters) ------------------------------------------------------
    @property
    def max_loras(self) -> int:
        return 0 if self.lora is None else self.lora.max_loras

    @property
    def max_lora_rank(self) -> int:
        return 0 if self.lora is None else self.lora.max_rank

    def enable_lora(self, max_loras: int, max_rank: int) -> None:
        """Allocate ``max_loras`` adapter slots of rank ``max_rank`` (zeros) for every target linear."""
        self.lora = TorchLoraBank(self.args, max_loras, max_rank, dtype=self.dtype, device=self.device)

    def install_adapter(self, slot: int, prepared: PreparedAdapter) -> None:
        """Load a prepared adapter into ``slot``; between steps (the generator's thread)."""
        if self.lora is None:
            raise InvalidAdapterSlot("LoRA is not enabled on this engine; call enable_lora first")
        self.lora.install(slot, prepared)

    def remove_adapter(self, slot: int) -> None:
        if self.lora is not None:
            self.lora.remove(slot)

    def _check_adapter(self, adapter: int | None) -> int:
        if adapter is None or adapter == -1:
            return -1
        if isinstance(adapter, bool) or not isinstance(adapter, int) or not 0 <= adapter < self.max_loras:
            raise InvalidAdapterSlot(
                f"adapter slot {adapter!r} is not in [0, {self.max_loras}) (enable_lora sets the slot count)"
            )
        return adapter

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
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        slots: torch.Tensor,
        last_only: bool,
        adapters: Sequence[int] = (),
    ) -> np.ndarray:
        self._reserve(int(pos.max()) + 1)
        if self.device.type != "cpu":
            tokens, pos, slots = (t.to(self.device, non_blocking=True) for t in (tokens, pos, slots))
        # no torch.device mode around forward (its per-op dispatch cost 3.7 ms a SmolLM2 step on CPU):
        # the factory calls in forward name their device
        with torch.inference_mode():
            lora = None if self.lora is None or not adapters else self.lora.batch(adapters, self.device)
            out = forward(
                self.weights, self.args, self._cache, tokens, pos, slots=slots, last_only=last_only, lora=lora
            )
        return out.cpu().numpy()

    def new_sequence(self, token_ids: Sequence[int], adapter: int | None = None) -> SeqState:
        """Prefill ``token_ids``; ``adapter``: the LoRA slot this sequence runs with (None: the base)."""
        check_prompt(token_ids, vocab_size=self.vocab_size, max_context=self.max_context)
        lora_slot = self._check_adapter(adapter)
        if not self._free:
            raise NoFreeSlot(f"all {self.max_batch} sequences are in use; release one or raise max_batch")
        slot = heapq.heappop(self._free)
        n = len(token_ids)
        try:
            logits = self._run(
                torch.tensor([list(token_ids)]),
                torch.arange(n)[None],
                torch.tensor([slot]),
                True,
                [lora_slot],
            )
        except BaseException:
            heapq.heappush(self._free, slot)
            raise
        return SeqState(length=n, logits=logits[0], handle=slot, adapter=lora_slot)

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
        logits = self._run(tokens, pos, slots, True, [states[j].adapter for j in order])  # [B, V]
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
