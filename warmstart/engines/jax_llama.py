# ruff: noqa: N806  (B, T, S, H, KV, D, F name tensor dims, as in the shape comments)
"""A compact Llama / Qwen2 in JAX, and an engine around it with a static slot-based KV cache.

The layer loop is a `lax.scan` over stacked layer weights: one stacking copy at load, but compile
time that does not grow with depth (30 layers: ~1-2 s per shape instead of ~13 s unrolled). The
stacking copy also transposes torch's ``[out, in]`` matrices to ``[in, out]``: XLA:CPU runs a
multi-row ``x @ w.T`` as an Eigen gemm behind a per-call transpose of ``w`` (batch-2 decode of
SmolLM2 measured ~10x slower than batch 1), while ``x @ w`` with ``w`` [in, out] costs about
the same for 2 to 8 rows. A one-row product on [in, out] is slow (strided gemv), so decode
always runs at least two rows.
Prefill lengths are bucketed to powers of two, decode attention lengths likewise, so the number
of compiles stays small.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from warmstart.devices import jax_device
from warmstart.engines.adapters import InvalidAdapterSlot, PreparedAdapter, target_shapes
from warmstart.engines.base import (
    BadWeightShape,
    ContextFull,
    MissingWeight,
    NoFreeSlot,
    SeqState,
    check_prompt,
    check_token_ids,
    eos_ids_from_config,
)
from warmstart.engines.hfconfig import Architecture, parse_hf_config, rope_inv_freq

log = logging.getLogger(__name__)

Params = dict[str, Any]
Cache = tuple[jax.Array, jax.Array]  # k, v: [L, slots, S, KV, hd]
Carry = tuple[jax.Array, jax.Array, jax.Array]  # x, k cache, v cache
CACHE_ENV = "WARMSTART_JAX_CACHE"  # persistent compilation cache dir; empty: off


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Point JAX's persistent compilation cache at ``path`` (default: ``$WARMSTART_JAX_CACHE``, else
    ``~/.cache/warmstart/jax``) unless one is configured already; returns the directory in use.

    Every executable is cached, however fast it compiled: a second load of a model (a cold start on
    the same node) then skips XLA compilation. JAX reads the setting at its first compile in the
    process, so call this before compiling anything. An empty ``$WARMSTART_JAX_CACHE`` turns it off.
    """
    current = getattr(jax.config, "jax_compilation_cache_dir", None)
    if current:
        return str(current)
    if path is None:
        env = os.environ.get(CACHE_ENV)
        if env == "":
            return None
        path = env or os.path.join(os.path.expanduser("~"), ".cache", "warmstart", "jax")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        log.warning("JAX compilation cache %s unusable (%s); compiling without it", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


ModelArgs = Architecture  # the JAX engine's name for the shared parsed config


def model_args(config: Mapping[str, Any]) -> Architecture:
    """The JAX engine's reading of an HF config: `warmstart.engines.hfconfig.parse_hf_config`."""
    return parse_hf_config(config)


# ---------------------------------------------------------------- weights


def _to_numpy(v: Any, dtype: np.dtype) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor; .float() first since numpy has no bf16 bridge
        v = v.detach()
        v = v.float().numpy() if str(v.dtype) != "torch.float32" else v.numpy()
    a = np.asarray(v)
    return a if a.dtype == dtype else a.astype(dtype)


def _transpose_into(out: np.ndarray, a: np.ndarray, rows: int = 256) -> np.ndarray:
    """``out[...] = a.T`` for a 2-D ``a``, a block of ``rows`` rows of ``a`` at a time (numpy's strided
    whole-matrix transpose thrashes the cache: 3-10x slower on a [49152, 576] head)."""
    if a.ndim != 2:
        out[...] = a
        return out
    for j in range(0, a.shape[0], rows):
        out[:, j : j + rows] = a[j : j + rows].T
    return out


NO_WINDOW = 1 << 30  # a full-attention layer's "window": every earlier position


def params_from_flat(flat: Mapping[str, Any], args: ModelArgs, dtype: Any = jnp.float32) -> Params:
    """Stack a flat ``{hf_name: array}`` dict into this model's param tree (layer weights copied once).

    Besides the weights, ``layers`` carries each layer's RoPE frequencies (``inv_freq`` [L, rd/2], LongRoPE's
    ``inv_freq_long``), cos/sin factor ``rope_scale`` [L] and attention window ``window`` [L], so layers of
    different kinds (Gemma's local/global) share one compiled scan body.
    """
    np_dtype = np.dtype(dtype)
    hd, H, KV, D, F = args.head_dim, args.n_heads, args.n_kv_heads, args.dim, args.intermediate_size
    prefix = args.prefix

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in flat:
            raise MissingWeight(f"weights have no {name!r}; is the checkpoint for this config?")
        a = _to_numpy(flat[name], np_dtype)
        if a.shape != shape:
            raise BadWeightShape(f"{name} has shape {a.shape}, config implies {shape}")
        return a

    def stack(suffix: str, shape: tuple[int, ...], part: tuple[str, int, int] | None = None) -> jax.Array:
        # [out, in] weights are stored transposed, [in, out]: XLA:CPU otherwise transposes them on every
        # call of a multi-row product (several times slower batched decode). Same single copy as stacking.
        # ``part`` = (fused name, rows, first row): this matrix is rows [first, first + rows) of a fused one
        # (Phi-3's qkv_proj and gate_up_proj), shape[0] being its own out size.
        out = np.empty((args.n_layers, *shape[::-1]), np_dtype)
        for i in range(args.n_layers):
            if part is None:
                w = get(f"{prefix}layers.{i}.{suffix}", shape)
            else:
                fused, total, first = part
                w = get(f"{prefix}layers.{i}.{fused}", (total, *shape[1:]))[first : first + shape[0]]
            _transpose_into(out[i], w)
        return jax.device_put(out)

    if args.fused_qkv:
        qkv = "self_attn.qkv_proj.weight", (H + 2 * KV) * hd
        wq = stack("", (H * hd, D), (*qkv, 0))
        wk = stack("", (KV * hd, D), (*qkv, H * hd))
        wv = stack("", (KV * hd, D), (*qkv, (H + KV) * hd))
    else:
        wq = stack("self_attn.q_proj.weight", (H * hd, D))  # [L, D, H*hd]
        wk = stack("self_attn.k_proj.weight", (KV * hd, D))  # [L, D, KV*hd]
        wv = stack("self_attn.v_proj.weight", (KV * hd, D))
    if args.fused_gate_up:
        gate_up = "mlp.gate_up_proj.weight", 2 * F
        w_gate, w_up = stack("", (F, D), (*gate_up, 0)), stack("", (F, D), (*gate_up, F))
    else:
        w_gate = stack("mlp.gate_proj.weight", (F, D))  # [L, D, F]
        w_up = stack("mlp.up_proj.weight", (F, D))
    # Gemma's sandwich: post_attention_layernorm is the attention output's norm, pre_feedforward the MLP's input
    mlp_norm = "pre_feedforward_layernorm.weight" if args.sandwich_norm else "post_attention_layernorm.weight"
    layers = {
        "attn_norm": stack("input_layernorm.weight", (D,)),  # [L, D]
        "wq": wq,
        "wk": wk,
        "wv": wv,
        "wo": stack("self_attn.o_proj.weight", (D, H * hd)),  # [L, H*hd, D]
        "mlp_norm": stack(mlp_norm, (D,)),
        "w_gate": w_gate,
        "w_up": w_up,
        "w_down": stack("mlp.down_proj.weight", (D, F)),  # [L, F, D]
    }
    if args.sandwich_norm:
        layers["attn_post_norm"] = stack("post_attention_layernorm.weight", (D,))
        layers["mlp_post_norm"] = stack("post_feedforward_layernorm.weight", (D,))
    if args.qk_norm:
        layers["q_norm"] = stack("self_attn.q_norm.weight", (hd,))  # [L, hd]
        layers["k_norm"] = stack("self_attn.k_norm.weight", (hd,))
    if args.qkv_bias:
        layers["bq"] = stack("self_attn.q_proj.bias", (H * hd,))
        layers["bk"] = stack("self_attn.k_proj.bias", (KV * hd,))
        layers["bv"] = stack("self_attn.v_proj.bias", (KV * hd,))
    if args.o_bias:
        layers["bo"] = stack("self_attn.o_proj.bias", (D,))
    layers.update(_rope_tables(args))
    embed = get(f"{prefix}embed_tokens.weight", (args.vocab_size, D))
    head = (
        embed
        if args.tie_word_embeddings or "lm_head.weight" not in flat
        else get("lm_head.weight", embed.shape)
    )
    return {
        "embed": jax.device_put(embed),  # [V, D], zero-copy when f32 and 64-B aligned
        "norm": jax.device_put(get(f"{prefix}norm.weight", (D,))),
        "lm_head": jax.device_put(_transpose_into(np.empty(head.shape[::-1], np_dtype), head)),  # [D, V]
        "layers": layers,
    }


def _rope_tables(args: ModelArgs) -> dict[str, jax.Array]:
    """Per-layer RoPE frequencies, cos/sin factor and attention window, stacked for the layer scan."""
    short, long, scale = [], [], []
    for rope_params in args.layer_rope:
        inv, s = rope_inv_freq(rope_params, args.head_dim, args.max_position_embeddings)
        short.append(inv)
        scale.append(s)
        if args.longrope_original is not None:
            long.append(rope_inv_freq(rope_params, args.head_dim, args.max_position_embeddings, long=True)[0])
    windows = [NO_WINDOW if w is None else w for w in args.layer_windows]
    tables = {
        "inv_freq": jax.device_put(np.stack(short).astype(np.float32)),  # [L, rd/2]
        "rope_scale": jax.device_put(np.asarray(scale, np.float32)),  # [L]
        "window": jax.device_put(np.asarray(windows, np.int32)),  # [L]
    }
    if long:
        tables["inv_freq_long"] = jax.device_put(np.stack(long).astype(np.float32))
    return tables


# ---------------------------------------------------------------- model


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` with ``w`` stored [in, out]. x: [..., in] -> [..., out]."""
    return jnp.einsum("...d,do->...o", x, w)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, *, offset: bool = False) -> jax.Array:
    """RMSNorm in transformers' order for each family. Llama/Qwen/Mistral/Phi-3: normalize in f32, cast
    back to the input dtype, then scale by ``w``. Gemma (``offset``): scale by ``1 + w`` in f32, then cast."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return (x32 * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w * x32.astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's logit soft-capping, ``cap * tanh(x / cap)``; identity when ``cap`` is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def rope(
    x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: jax.Array | float = 1.0
) -> jax.Array:
    """HF rotate-half RoPE on the first ``2 * inv_freq.shape[-1]`` dims of each head (the rest pass).

    x: [B, T, N, hd]; positions: [B, T]; inv_freq: [rd/2] or one per row [B, rd/2]; ``scale`` multiplies
    cos and sin (YaRN / LongRoPE attention factor).
    """
    inv = inv_freq[:, None, :] if inv_freq.ndim == 2 else inv_freq  # [B, 1, rd/2] or [rd/2]
    freqs = positions[..., None].astype(jnp.float32) * inv  # [B, T, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, rd]
    cos, sin = (jnp.cos(emb) * scale).astype(x.dtype), (jnp.sin(emb) * scale).astype(x.dtype)
    rd = emb.shape[-1]
    xr = x[..., :rd]
    x1, x2 = jnp.split(xr, 2, axis=-1)
    out = (xr * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x.dtype)
    return out if rd == x.shape[-1] else jnp.concatenate([out, x[..., rd:]], axis=-1)


def attention_mask(q_pos: jax.Array, kv_len: int, window: jax.Array) -> jax.Array:
    """[B, T, kv_len] True where query at q_pos [B, T] may attend key position k: causal, and within the
    sliding window (``q - window < k``, transformers' rule) when ``window`` is a real window; full attention
    layers carry `NO_WINDOW`."""
    k = jnp.arange(kv_len)[None, None, :]
    q = q_pos[..., None]
    return (k <= q) & (k > q - window)


def _norm(x: jax.Array, w: jax.Array, a: ModelArgs) -> jax.Array:
    return rms_norm(x, w, a.norm_eps, offset=a.norm_offset)


def _layer_inv_freq(lp: Params, long: jax.Array | None) -> jax.Array:
    """This layer's RoPE frequencies; with LongRoPE, per row: long factors where ``long`` [B]."""
    if long is None:
        return cast(jax.Array, lp["inv_freq"])  # [rd/2]
    return cast(jax.Array, jnp.where(long[:, None], lp["inv_freq_long"], lp["inv_freq"]))  # [B, rd/2]


def _lora(y: jax.Array, x: jax.Array, lo: Params | None, target: str) -> jax.Array:
    """``y`` plus each row's LoRA update of one layer's ``target``: ``lo[target]`` = (``a`` [B, in, R],
    ``b`` [B, R, out], ``scale`` [B]; 0 for rows without an adapter), gathered by `gather_lora`."""
    if lo is None:
        return y
    a, b, s = lo[target]
    h = jnp.einsum("btd,bdr->btr", x, a.astype(x.dtype))
    return y + jnp.einsum("btr,bro->bto", h, b.astype(x.dtype)) * s.astype(x.dtype)[:, None, None]


def gather_lora(bank: Params, index: jax.Array) -> Params:
    """Each row's slot of the adapter ``bank`` (target -> ``a`` [L, N, in, R], ``b`` [L, N, R, out], ``scale``
    [L, N]) for every layer, by ``index`` [B] (-1: no adapter) -> target -> [L, B, ...]."""
    has = index >= 0
    idx = jnp.where(has, index, 0)
    return {t: (a[:, idx], b[:, idx], s[:, idx] * has.astype(s.dtype)) for t, (a, b, s) in bank.items()}


def _qkv(
    lp: Params,
    x: jax.Array,
    positions: jax.Array,
    long: jax.Array | None,
    a: ModelArgs,
    *,
    lo: Params | None = None,
) -> tuple[jax.Array, ...]:
    B, T, _ = x.shape
    h = _norm(x, lp["attn_norm"], a)
    q = linear(h, lp["wq"])  # [B, T, H*hd]
    k = linear(h, lp["wk"])  # [B, T, KV*hd]
    v = linear(h, lp["wv"])
    if a.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    if lo is not None:
        q, k, v = _lora(q, h, lo, "q_proj"), _lora(k, h, lo, "k_proj"), _lora(v, h, lo, "v_proj")
    q = q.reshape(B, T, a.n_heads, a.head_dim)
    k = k.reshape(B, T, a.n_kv_heads, a.head_dim)
    if a.qk_norm:  # per head, before RoPE (Qwen3, Gemma 3)
        q, k = _norm(q, lp["q_norm"], a), _norm(k, lp["k_norm"], a)
    inv_freq = _layer_inv_freq(lp, long)
    q = rope(q, positions, inv_freq, lp["rope_scale"])
    k = rope(k, positions, inv_freq, lp["rope_scale"])
    return q, k, v.reshape(B, T, a.n_kv_heads, a.head_dim)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, a: ModelArgs) -> jax.Array:
    # q: [B, T, H, hd]; k, v: [B, S, KV, hd]; mask: [B, T, S] (True = may attend)
    B, T = q.shape[:2]
    q = q.reshape(B, T, a.n_kv_heads, a.n_rep, a.head_dim)
    s = jnp.einsum("btgrd,bsgd->bgrts", q, k).astype(jnp.float32) * a.attn_scale  # [B, KV, rep, T, S]
    s = softcap(s, a.attn_softcap)
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bgrts,bsgd->btgrd", p, v).reshape(B, T, a.n_heads * a.head_dim)


def _finish(lp: Params, x: jax.Array, o: jax.Array, a: ModelArgs, lo: Params | None = None) -> jax.Array:
    o_in = o
    o = linear(o, lp["wo"])  # [B, T, D]
    if a.o_bias:
        o = o + lp["bo"]
    o = _lora(o, o_in, lo, "o_proj")
    if a.sandwich_norm:
        o = _norm(o, lp["attn_post_norm"], a)
    x = x + o
    h = _norm(x, lp["mlp_norm"], a)
    g = _lora(linear(h, lp["w_gate"]), h, lo, "gate_proj")  # [B, T, F]
    u = _lora(linear(h, lp["w_up"]), h, lo, "up_proj")
    act = jax.nn.silu(g) if a.activation == "silu" else jax.nn.gelu(g, approximate=True)
    m = _lora(linear(act * u, lp["w_down"]), act * u, lo, "down_proj")
    if a.sandwich_norm:
        m = _norm(m, lp["mlp_post_norm"], a)
    return x + m


def _embed(params: Params, tokens: jax.Array, a: ModelArgs) -> jax.Array:
    x = params["embed"][tokens]  # [..., D]
    if a.embed_scale is not None:  # Gemma: sqrt(hidden), rounded to the weights' dtype as transformers does
        x = x * jnp.asarray(np.float32(a.embed_scale), x.dtype)
    return x


def _head(params: Params, h: jax.Array, a: ModelArgs) -> jax.Array:
    h = _norm(h, params["norm"], a)
    return softcap(linear(h, params["lm_head"]).astype(jnp.float32), a.final_softcap)  # [..., V]


def _long_rows(lengths: jax.Array, a: ModelArgs) -> jax.Array | None:
    """LongRoPE's choice per row (long factors for a forward over more than the original context)."""
    return None if a.longrope_original is None else lengths > a.longrope_original


def forward(params: Params, tokens: jax.Array, *, a: ModelArgs) -> jax.Array:
    """Teacher-forced logits without a cache. tokens: [B, T] -> [B, T, V] float32."""
    B, T = tokens.shape
    x = _embed(params, tokens, a)  # [B, T, D]
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    long = _long_rows(jnp.full((B,), T), a)

    def layer(x: jax.Array, lp: Params) -> tuple[jax.Array, None]:
        q, k, v = _qkv(lp, x, pos, long, a)
        mask = attention_mask(pos, T, lp["window"])
        return _finish(lp, x, _attend(q, k, v, mask, a), a), None

    x, _ = lax.scan(layer, x, params["layers"])
    return _head(params, x, a)


def prefill(
    params: Params,
    cache: Cache,
    tokens: jax.Array,
    length: jax.Array,
    slot: jax.Array,
    *,
    lora: Params | None = None,
    lora_index: jax.Array | None = None,
    a: ModelArgs,
) -> tuple[jax.Array, Cache]:
    """Fill cache slot ``slot`` from position 0 with tokens [1, T] (padded past ``length``).

    Returns the logits [V] after token ``length - 1`` and the updated cache. ``lora`` (the engine's adapter
    bank) with ``lora_index`` [1]: the row's adapter slot (-1: none).
    """
    T = tokens.shape[1]
    x = _embed(params, tokens, a)  # [1, T, D]
    pos = jnp.arange(T)[None]  # [1, T]
    long = _long_rows(length[None], a)
    lo_all = None if lora is None or lora_index is None else gather_lora(lora, lora_index)

    def layer(carry: Carry, xs: tuple[Params, jax.Array, Params | None]) -> tuple[Carry, None]:
        x, kc, vc = carry
        lp, i, lo = xs
        q, k, v = _qkv(lp, x, pos, long, a, lo=lo)  # k, v: [1, T, KV, hd]
        kc = lax.dynamic_update_slice(kc, k[None].astype(kc.dtype), (i, slot, 0, 0, 0))
        vc = lax.dynamic_update_slice(vc, v[None].astype(vc.dtype), (i, slot, 0, 0, 0))
        mask = attention_mask(pos, T, lp["window"])
        return (_finish(lp, x, _attend(q, k, v, mask, a), a, lo), kc, vc), None

    (x, kc, vc), _ = lax.scan(layer, (x, *cache), (params["layers"], jnp.arange(a.n_layers), lo_all))
    return _head(params, x[0, length - 1], a), (kc, vc)


def decode(
    params: Params,
    cache: Cache,
    tokens: jax.Array,
    positions: jax.Array,
    *,
    lora: Params | None = None,
    lora_index: jax.Array | None = None,
    a: ModelArgs,
    kv_len: int,
) -> tuple[jax.Array, Cache]:
    """One token for each of the first nb cache slots. tokens, positions: [nb]; attends to cache[:kv_len].

    Returns logits [nb, V] and the updated cache. ``lora`` (the adapter bank) with ``lora_index`` [nb]: each
    row's adapter slot (-1: none).
    """
    B = tokens.shape[0]
    x = _embed(params, tokens, a)[:, None]  # [B, 1, D]
    pos = positions[:, None]  # [B, 1]
    long = _long_rows(positions + 1, a)
    rows = jnp.arange(B)
    lo_all = None if lora is None or lora_index is None else gather_lora(lora, lora_index)

    def layer(carry: Carry, xs: tuple[Params, jax.Array, Params | None]) -> tuple[Carry, None]:
        x, kc, vc = carry
        lp, i, lo = xs
        q, k, v = _qkv(lp, x, pos, long, a, lo=lo)  # k, v: [B, 1, KV, hd]
        kc = kc.at[i, rows, positions].set(k[:, 0].astype(kc.dtype))  # scatter [B, KV, hd]
        vc = vc.at[i, rows, positions].set(v[:, 0].astype(vc.dtype))
        size = (1, B, kv_len, a.n_kv_heads, a.head_dim)
        kl = lax.dynamic_slice(kc, (i, 0, 0, 0, 0), size)[0]  # [B, kv_len, KV, hd]
        vl = lax.dynamic_slice(vc, (i, 0, 0, 0, 0), size)[0]
        mask = attention_mask(pos, kv_len, lp["window"])  # [B, 1, kv_len]
        return (_finish(lp, x, _attend(q, kl, vl, mask, a), a, lo), kc, vc), None

    (x, kc, vc), _ = lax.scan(layer, (x, *cache), (params["layers"], jnp.arange(a.n_layers), lo_all))
    return _head(params, x[:, 0], a), (kc, vc)


def bucket(n: int, *, minimum: int, maximum: int) -> int:
    """Smallest power of two >= n (at least ``minimum``), capped at ``maximum``."""
    return min(max(minimum, 1 << (max(n, 1) - 1).bit_length()), maximum)


# ---------------------------------------------------------------- engine


class JaxEngine:
    """`Engine` over the JAX model: ``max_batch`` cache slots of ``max_context`` tokens each."""

    def __init__(
        self,
        config: Mapping[str, Any],
        weights: Mapping[str, Any],
        *,
        dtype: Any = None,
        max_batch: int = 8,
        max_context: int | None = None,
        device: Any = None,
    ) -> None:
        self.args = a = model_args(config)
        enable_compilation_cache()
        self.dtype = jnp.dtype(dtype or jnp.float32)
        self.device = None if device is None else jax_device(device)  # None: JAX's default device
        with jax.default_device(self.device):  # params are placed there once (device_put in params_from_flat)
            self.params = params_from_flat(weights, a, self.dtype)
        if self.device is not None:  # committed, so every jit runs there (no copy: already on it)
            self.params = jax.device_put(self.params, self.device)
        self.vocab_size = a.vocab_size
        self.max_batch = max_batch
        self.max_context = min(max_context or 2048, a.max_position_embeddings)
        self.eos_token_ids = eos_ids_from_config(dict(config))
        self._slots = max(2, max_batch)  # decode runs >= 2 rows
        shape = (a.n_layers, self._slots, self.max_context, a.n_kv_heads, a.head_dim)
        zeros = partial(jnp.zeros, shape, self.dtype, device=self.device)
        self._cache: Cache = (zeros(), zeros())
        self._free = list(range(max_batch))  # a heap: lowest slots first keeps decode batches small
        self._prefill = jax.jit(partial(prefill, a=a), donate_argnums=(1,))
        self._decode = jax.jit(partial(decode, a=a), static_argnames=("kv_len",), donate_argnums=(1,))
        self.forward = jax.jit(partial(forward, a=a))
        self._shapes: set[tuple[str, int, int]] = set()  # compiled (kind, rows, length)
        self._lora: Params | None = None  # adapter slots, once enable_lora is called
        self.max_loras = 0
        self.max_lora_rank = 0

    # -- LoRA adapters (warmstart.engines.adapters) ------------------------------------------------------
    def enable_lora(self, max_loras: int, max_rank: int) -> None:
        """Allocate ``max_loras`` adapter slots of rank ``max_rank`` (zeros). The compiled shapes depend on
        these two numbers only: loading or swapping adapters later never recompiles."""
        for what, v in (("max_loras", max_loras), ("max_lora_rank", max_rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        L, N, R = self.args.n_layers, max_loras, max_rank
        bank: Params = {}
        for target, (fin, fout) in target_shapes(self.args).items():
            bank[target] = tuple(
                jnp.zeros(shape, self.dtype, device=self.device)
                for shape in ((L, N, fin, R), (L, N, R, fout), (L, N))
            )
        self._lora, self.max_loras, self.max_lora_rank = bank, max_loras, max_rank

    def install_adapter(self, slot: int, prepared: PreparedAdapter) -> None:
        """Load a prepared adapter into ``slot``; between steps (the generator's thread)."""
        if self._lora is None:
            raise InvalidAdapterSlot("LoRA is not enabled on this engine; call enable_lora first")
        self._check_adapter(slot)
        bank = dict(self._lora)
        padded = prepared.padded(target_shapes(self.args), self.args.n_layers, self.max_lora_rank)
        for target, (a, b, s) in bank.items():
            item = padded.get(target)
            if item is None:
                pa = np.zeros(a.shape[2:], np.float32)
                pb = np.zeros(b.shape[2:], np.float32)
                ps = np.zeros(s.shape[0], np.float32)
            else:  # stored [in, R] and [R, out]: x @ a @ b
                pa, pb, ps = item[0].transpose(0, 2, 1), item[1].transpose(0, 2, 1), item[2]
            bank[target] = (
                a.at[:, slot].set(jnp.asarray(pa, self.dtype)),
                b.at[:, slot].set(jnp.asarray(pb, self.dtype)),
                s.at[:, slot].set(jnp.asarray(ps, self.dtype)),
            )
        self._lora = bank

    def remove_adapter(self, slot: int) -> None:
        if self._lora is not None:
            self.install_adapter(slot, PreparedAdapter("<empty>", 0, {}))

    def _check_adapter(self, adapter: int | None) -> int:
        if adapter is None or adapter == -1:
            return -1
        if isinstance(adapter, bool) or not isinstance(adapter, int) or not 0 <= adapter < self.max_loras:
            raise InvalidAdapterSlot(
                f"adapter slot {adapter!r} is not in [0, {self.max_loras}) (enable_lora sets the slot count)"
            )
        return adapter

    def _lora_args(self, index: np.ndarray) -> tuple[Params | None, np.ndarray | None]:
        """The adapter bank and row indices when some row has an adapter, else (None, None): the base path."""
        if self._lora is None or not (index >= 0).any():
            return None, None
        return self._lora, index

    def warm_up(self, max_batch: int) -> None:
        """Compile what the first requests need: a short prefill and a decode step for each batch
        bucket up to ``max_batch`` (runs each once; a cached compile when the persistent cache has it), and
        with LoRA enabled the same with an adapter row (slot 0, whatever it holds: the results are dropped).

        The decode steps use throwaway states in slots nobody holds yet: what they write at position 1
        is overwritten by the prefill that later takes the slot (prefills fill at least 16 positions).
        """
        for adapter in (-1, 0) if self._lora is not None else (-1,):  # with LoRA: its variant too
            first = self.new_sequence([0], adapter=adapter)
            try:
                top = min(max(max_batch, 1), self.max_batch)
                for nb in sorted({bucket(n, minimum=2, maximum=self._slots) for n in range(1, top + 1)}):
                    others = [i for i in range(nb) if i != _slot(first)][: nb - 1]
                    states = [first, *(SeqState(1, first.logits, handle=i) for i in others)]
                    self.step(states, [0] * len(states))
                    first.length = 1
            finally:
                self.release(first)

    def _note_shape(self, kind: str, rows: int, length: int) -> None:
        if (kind, rows, length) not in self._shapes:
            self._shapes.add((kind, rows, length))
            log.info("JAX engine compiling %s for %d row(s) x %d positions", kind, rows, length)

    def new_sequence(self, token_ids: Sequence[int], adapter: int | None = None) -> SeqState:
        """Prefill ``token_ids``; ``adapter``: the LoRA slot this sequence runs with (None: the base)."""
        check_prompt(token_ids, vocab_size=self.vocab_size, max_context=self.max_context)
        lora_slot = self._check_adapter(adapter)
        if not self._free:
            raise NoFreeSlot(f"all {self.max_batch} sequences are in use; release one or raise max_batch")
        n = len(token_ids)
        T = bucket(n, minimum=16, maximum=self.max_context)
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :n] = token_ids
        slot = heapq.heappop(self._free)
        self._note_shape("prefill", 1, T)
        lora, lora_index = self._lora_args(np.asarray([lora_slot], np.int32))
        try:
            logits, self._cache = self._prefill(
                self.params,
                self._cache,
                tokens,
                np.int32(n),
                np.int32(slot),
                lora=lora,
                lora_index=lora_index,
            )
        except BaseException:
            heapq.heappush(self._free, slot)
            raise
        return SeqState(length=n, logits=np.asarray(logits), handle=slot, adapter=lora_slot)

    def step(self, states: Sequence[SeqState], token_ids: Sequence[int]) -> None:
        if len(states) != len(token_ids):
            raise ValueError(f"{len(states)} states but {len(token_ids)} tokens")
        check_token_ids(token_ids, vocab_size=self.vocab_size)
        for s in states:
            if s.released:
                raise ValueError("step() on a released sequence")
            if s.length >= self.max_context:
                raise ContextFull(f"sequence holds {s.length} tokens, the context limit; finish it")
        # Decode the first nb slots (nb a power of two >= 2, see the module docstring).
        nb = bucket(max(_slot(s) for s in states) + 1, minimum=2, maximum=self._slots)
        tokens = np.zeros(nb, np.int32)
        # Rows not stepped write garbage at the last position, which no live sequence has filled
        # yet (a sequence holding max_context tokens can no longer step).
        positions = np.full(nb, self.max_context - 1, np.int32)
        adapters = np.full(nb, -1, np.int32)
        for s, t in zip(states, token_ids, strict=True):
            tokens[_slot(s)], positions[_slot(s)], adapters[_slot(s)] = t, s.length, s.adapter
        kv_len = bucket(max(s.length for s in states) + 1, minimum=64, maximum=self.max_context)
        self._note_shape("decode", nb, kv_len)
        lora, lora_index = self._lora_args(adapters)
        logits, self._cache = self._decode(
            self.params, self._cache, tokens, positions, lora=lora, lora_index=lora_index, kv_len=kv_len
        )
        out = np.asarray(logits)  # [nb, V]
        for s in states:
            s.logits = out[_slot(s)]
            s.length += 1

    def release(self, state: SeqState) -> None:
        if not state.released:
            state.released = True
            heapq.heappush(self._free, _slot(state))


def _slot(state: SeqState) -> int:
    assert isinstance(state.handle, int), "state does not come from a JaxEngine"
    return state.handle
