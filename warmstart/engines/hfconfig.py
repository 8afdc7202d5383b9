"""One reader of Hugging Face ``config.json`` for both compact engines (torch and JAX).

`parse_hf_config` turns a config dict (transformers v4 or v5 key layout, as saved by ``save_pretrained``
or as ``PretrainedConfig.to_dict()`` gives it) into an `Architecture`: the shapes and the family's
architecture switches the engines specialize on. What it does not implement is refused with
`UnsupportedModel` naming the key and its value; the torch engine then falls back to transformers.

Families: Llama (1-3.x, RoPE scaling "linear", "dynamic", "llama3", "yarn"), Mistral (sliding window),
Qwen2/2.5 (q/k/v biases, sliding window from ``max_window_layers``), Qwen3 (q/k norms), Gemma 2 and Gemma 3
text (scaled embeddings, ``1 + w`` norms, sandwich norms, logit soft-capping, alternating local/global
attention with per-kind RoPE), Phi-3/3.5 (fused qkv and gate_up, LongRoPE, partial rotary).

`rope_inv_freq` computes each layer's RoPE frequencies exactly as transformers' ``ROPE_INIT_FUNCTIONS``
do (float32, same operation order), so both engines' logits match transformers to float rounding.
Pure Python and numpy: importing this module imports neither torch nor jax nor transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from warmstart.engines.base import UnsupportedModel

__all__ = [
    "ROPE_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "Architecture",
    "parse_hf_config",
    "rope_inv_freq",
]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")
_GEMMA = ("gemma2", "gemma3_text")
_GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
# transformers' defaults where a family's config.json may leave a key out
_TIED_BY_DEFAULT = {"gemma2": True, "gemma3_text": True}
_FINAL_SOFTCAP_DEFAULT = {"gemma2": 30.0}
_ATTN_SOFTCAP_DEFAULT = {"gemma2": 50.0}
_GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


@dataclass(frozen=True)
class Architecture:
    """What the compiled functions specialize on: shapes and the family's architecture switches."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    max_position_embeddings: int = 2048
    activation: str = "silu"  # "silu" or "gelu_tanh" (Gemma's gelu_pytorch_tanh)
    norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + w) in float32
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    sandwich_norm: bool = False  # Gemma 2/3: norms on the attention and MLP outputs too
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm of each q and k head before RoPE
    attn_scale: float = 0.0  # 0: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # Gemma 2: cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2/3: on the logits
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window, None = full; () = all full
    layer_rope: tuple[Mapping[str, Any], ...] = ()  # per layer: standardized rope_parameters; () = default
    rope_theta: float = 10000.0  # for the default layer_rope
    longrope_original: int | None = None  # LongRoPE: long factors for forwards past this many positions
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    prefix: str = "model."  # weight names of the decoder stack

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.attn_scale == 0.0:
            object.__setattr__(self, "attn_scale", self.head_dim**-0.5)
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.n_layers)
        if not self.layer_rope:
            default = {"rope_type": "default", "rope_theta": self.rope_theta}
            object.__setattr__(self, "layer_rope", (default,) * self.n_layers)
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModel(
                f"num_attention_heads {self.n_heads} not a multiple of num_key_value_heads {self.n_kv_heads}"
            )
        if len(self.layer_windows) != self.n_layers or len(self.layer_rope) != self.n_layers:
            raise UnsupportedModel(
                f"{len(self.layer_windows)} layer windows / {len(self.layer_rope)} RoPE settings "
                f"for num_hidden_layers {self.n_layers}"
            )

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head RoPE rotates (all of them unless ``partial_rotary_factor`` < 1)."""
        return int(self.head_dim * float(self.layer_rope[0].get("partial_rotary_factor", 1.0) or 1.0))


def _int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    v = config.get(key, default)
    if v is None and default is not None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise UnsupportedModel(f"config {key!r} is {v!r}; expected a positive integer")
    return v


def _reject(config: Mapping[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
    v = config.get(key, default)
    if v is None:
        v = default
    if v not in allowed:
        raise UnsupportedModel(
            f"config {key!r} = {v!r} is not supported by the compact engines (supported: {allowed!r})"
        )


def _layer_types(c: Mapping[str, Any], mt: str, n_layers: int) -> tuple[list[str], int | None]:
    """Each layer's attention kind and the sliding window, as transformers' config classes derive them."""
    window = c.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
        window = None  # Qwen's config ignores sliding_window unless use_sliding_window
    if mt in ("mistral", "phi3"):
        kinds = ["sliding_attention" if window else "full_attention"] * n_layers
    elif c.get("layer_types"):
        kinds = list(c["layer_types"])
    elif mt in ("qwen2", "qwen3"):
        first = int(c.get("max_window_layers", n_layers) or 0)
        kinds = ["sliding_attention" if window and i >= first else "full_attention" for i in range(n_layers)]
    elif mt == "gemma2":
        kinds = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    elif mt == "gemma3_text":
        pattern = int(c.get("sliding_window_pattern", 6) or 6)
        kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    else:
        kinds = ["full_attention"] * n_layers
    if len(kinds) != n_layers:
        raise UnsupportedModel(
            f"config 'layer_types' has {len(kinds)} entries for num_hidden_layers {n_layers}"
        )
    for k in kinds:
        if k not in LAYER_TYPES:
            raise UnsupportedModel(
                f"config 'layer_types' entry {k!r} is not supported (supported: {LAYER_TYPES})"
            )
    if "sliding_attention" in kinds and (
        isinstance(window, bool) or not isinstance(window, int) or window <= 0
    ):
        raise UnsupportedModel(f"config 'sliding_window' is {window!r} for sliding-attention layers")
    return kinds, window


def _rope_params(c: Mapping[str, Any], mt: str, kinds: list[str]) -> tuple[dict[str, Any], ...]:
    """Each layer's standardized ``rope_parameters`` (``rope_type``, ``rope_theta`` and the type's keys)."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise UnsupportedModel(f"config 'rope_scaling' is {rope!r}; expected a mapping")
    if mt == "gemma3_text":
        if "full_attention" in rope or "sliding_attention" in rope:
            per_kind = {k: dict(rope.get(k) or {"rope_type": "default"}) for k in LAYER_TYPES}
        else:  # v4 layout: rope_scaling is the global layers', local layers use rope_local_base_freq
            local = {"rope_type": "default", "rope_theta": c.get("rope_local_base_freq")}
            per_kind = {"full_attention": dict(rope or {"rope_type": "default"}), "sliding_attention": local}
        for k, p in per_kind.items():
            if p.get("rope_theta") is None:
                p["rope_theta"] = (c.get("rope_theta") if k == "full_attention" else None) or _GEMMA3_THETA[k]
    elif "full_attention" in rope or "sliding_attention" in rope:
        per_kind = {k: dict(rope.get(k) or {"rope_type": "default"}) for k in LAYER_TYPES}
    else:
        per_kind = {k: dict(rope) for k in LAYER_TYPES}
    out: dict[str, dict[str, Any]] = {}
    for kind, p in per_kind.items():
        r = dict(p)
        r["rope_type"] = r.get("rope_type", r.get("type", "default"))
        r.pop("type", None)
        if r.get("rope_theta") is None:
            r["rope_theta"] = c.get("rope_theta") or 10000.0
        r["rope_theta"] = float(r["rope_theta"])
        if c.get("partial_rotary_factor") is not None:
            r.setdefault("partial_rotary_factor", c["partial_rotary_factor"])
        if r["rope_type"] in ("llama3", "yarn", "longrope"):
            r.setdefault(
                "original_max_position_embeddings",
                c.get("original_max_position_embeddings") or c.get("max_position_embeddings"),
            )
        if r["rope_type"] not in ROPE_TYPES:
            raise UnsupportedModel(
                f"config 'rope_scaling' rope_type {r['rope_type']!r} is not supported (supported: {ROPE_TYPES})"
            )
        needs = {"linear": ("factor",), "dynamic": ("factor",), "longrope": ("short_factor", "long_factor")}
        needs["llama3"] = ("factor", "low_freq_factor", "high_freq_factor")
        for key in needs.get(r["rope_type"], ()):
            if r.get(key) is None:
                raise UnsupportedModel(f"config 'rope_scaling' of type {r['rope_type']!r} has no {key!r}")
        prf = float(r.get("partial_rotary_factor", 1.0) or 1.0)
        if not 0.0 < prf <= 1.0:
            raise UnsupportedModel(f"config 'partial_rotary_factor' is {prf!r}; expected (0, 1]")
        out[kind] = r
    return tuple(out[k] for k in kinds)


def parse_hf_config(config: Mapping[str, Any]) -> Architecture:
    """Read an HF ``config.json`` dict into an `Architecture`; `UnsupportedModel` names what is not
    implemented (the key and its value)."""
    c = dict(config)
    mt = c.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        hint = (
            " (a multimodal Gemma 3: serve its text model, model_type 'gemma3_text')"
            if mt == "gemma3"
            else ""
        )
        raise UnsupportedModel(
            f"model_type {mt!r} is not supported by the compact engines{hint}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    gemma = mt in _GEMMA
    if gemma:
        act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
        _reject({"hidden_activation": act}, "hidden_activation", _GEMMA_ACTIVATIONS, "gelu_pytorch_tanh")
    else:
        _reject(c, "hidden_act", ("silu",), "silu")
    _reject(c, "mlp_bias", (False,), False)
    _reject(c, "pretraining_tp", (1,), 1)
    if mt == "phi3" and c.get("attention_bias"):
        _reject(c, "attention_bias", (False,), False)
    n_layers = _int(c, "num_hidden_layers")
    n_heads = _int(c, "num_attention_heads")
    dim = _int(c, "hidden_size")
    kinds, window = _layer_types(c, mt, n_layers)
    layer_rope = _rope_params(c, mt, kinds)
    first = layer_rope[0]
    if any(
        r.get("partial_rotary_factor", 1.0) != first.get("partial_rotary_factor", 1.0) for r in layer_rope
    ):
        raise UnsupportedModel("config 'partial_rotary_factor' differs between layer kinds")
    attention_bias = bool(c.get("attention_bias"))
    tie = c.get("tie_word_embeddings")
    scalar = c.get("query_pre_attn_scalar") or c.get("head_dim") or dim // n_heads
    return Architecture(
        vocab_size=_int(c, "vocab_size"),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_int(c, "num_key_value_heads", n_heads),
        intermediate_size=_int(c, "intermediate_size"),
        head_dim=int(c.get("head_dim") or 0),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(_TIED_BY_DEFAULT.get(mt, False) if tie is None else tie),
        qkv_bias=attention_bias or mt == "qwen2",
        o_bias=attention_bias and mt != "qwen2",
        max_position_embeddings=_int(c, "max_position_embeddings", 2048),
        activation="gelu_tanh" if gemma else "silu",
        norm_offset=gemma,
        embed_scale=float(dim) ** 0.5 if gemma else None,
        sandwich_norm=gemma,
        qk_norm=mt in ("qwen3", "gemma3_text"),
        attn_scale=float(scalar) ** -0.5 if gemma and scalar else 0.0,
        attn_softcap=c.get("attn_logit_softcapping", _ATTN_SOFTCAP_DEFAULT.get(mt))
        if mt == "gemma2"
        else None,
        final_softcap=c.get("final_logit_softcapping", _FINAL_SOFTCAP_DEFAULT.get(mt)) if gemma else None,
        layer_windows=tuple(window if k == "sliding_attention" else None for k in kinds),
        layer_rope=layer_rope,
        rope_theta=float(first["rope_theta"]),
        longrope_original=(
            int(first["original_max_position_embeddings"]) if first["rope_type"] == "longrope" else None
        ),
        fused_qkv=mt == "phi3",
        fused_gate_up=mt == "phi3",
    )


# ---------------------------------------------------------------- RoPE


def rope_inv_freq(
    rope: Mapping[str, Any], head_dim: int, max_position_embeddings: int, *, long: bool = False
) -> tuple[np.ndarray, float]:
    """RoPE inverse frequencies [rotary_dim / 2] (float32) and the factor cos/sin are scaled by, for one
    standardized HF ``rope_parameters`` dict, computed as transformers computes them (float32, same order).

    ``long`` picks LongRoPE's long factors (transformers uses them for a forward whose sequence is longer than
    ``original_max_position_embeddings``). "dynamic" NTK only changes frequencies beyond
    ``max_position_embeddings``, which the engines' context never reaches: it equals "default" here.
    """
    kind = rope.get("rope_type", rope.get("type", "default"))
    base = float(rope.get("rope_theta", 10000.0))
    dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0) or 1.0))
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    if kind == "dynamic":
        factor = float(rope["factor"])
        seq_len = max_position_embeddings  # transformers' value at init, kept below that length
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = (1.0 / (np.float32(base) ** exponent)).astype(np.float32)
    scale = 1.0
    if kind in ("default", "dynamic"):
        pass
    elif kind == "linear":
        inv_freq = (inv_freq / np.float32(rope["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor, low, high = (
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
        )
        old = float(rope["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        orig = int(rope["original_max_position_embeddings"])
        factor = float(rope["factor"]) if rope.get("factor") is not None else max_position_embeddings / orig
        scale = _yarn_attention_factor(rope, factor)
        beta_fast = float(rope.get("beta_fast") or 32)
        beta_slow = float(rope.get("beta_slow") or 1)

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(
            np.float32
        )
        extrapolation = (1.0 / pos_freqs).astype(np.float32)
        interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1).astype(np.float32)
        extra = (1 - ramp).astype(np.float32)
        inv_freq = (interpolation * (1 - extra) + extrapolation * extra).astype(np.float32)
    elif kind == "longrope":
        orig = int(rope["original_max_position_embeddings"])
        factor = float(rope["factor"]) if rope.get("factor") is not None else max_position_embeddings / orig
        af = rope.get("attention_factor")
        if af is None:
            af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        scale = float(af)
        ext = np.asarray(rope["long_factor" if long else "short_factor"], np.float32)
        if ext.shape != (dim // 2,):
            raise UnsupportedModel(
                f"LongRoPE {'long' if long else 'short'}_factor has {ext.size} entries; rotary dims / 2 = {dim // 2}"
            )
        inv_freq = (1.0 / (ext * (np.float32(base) ** exponent))).astype(np.float32)
    else:
        raise UnsupportedModel(f"rope_type {kind!r} is not supported (supported: {ROPE_TYPES})")
    return inv_freq, scale


def _yarn_attention_factor(rope: Mapping[str, Any], factor: float) -> float:
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
