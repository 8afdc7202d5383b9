"""The family table both compact-engine equivalence tests run (`test_engine_families_jax`, `..._torch`).

Each family gets a float32 model (2 layers, hidden 64) built with transformers' own classes and a seeded
random init that makes every feature show in the logits, handed over as the existing equivalence tests do
(``config.to_dict()`` and a flat numpy state dict). The reference is transformers generating with its own
cache (one sequence at a time: prefill, then one token per forward), which is what a served request sees;
sliding-window families run past their window, LongRoPE past its original context.

Import it after ``pytest.importorskip`` of torch and transformers: it imports both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transformers

from warmstart.engines import Engine

VOCAB = 101
MAX_CONTEXT = 64  # one decode compile (kv bucket 64) and one prefill compile (bucket 16) per family (JAX)
PROMPTS = (12, 5)  # two rows of different lengths, decoded together
STEPS = 8  # row 0 ends at 20 positions: past every window below and LongRoPE's original context (16)
WINDOW = 6


def _common(**extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "max_position_embeddings": MAX_CONTEXT,
        "eos_token_id": None,
        "pad_token_id": None,
        "bos_token_id": None,
        **extra,
    }


@dataclass(frozen=True)
class Family:
    config: Callable[..., Any]
    kwargs: dict[str, Any]
    tie: bool


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # wavelengths of the 16-dim heads fall in all three bands
}
HALF = 8  # rotary dims / 2 of Phi-3 below (head 16, partial_rotary_factor 1.0)

FAMILIES: dict[str, Family] = {
    "llama3-rope-untied": Family(
        transformers.LlamaConfig, _common(rope_theta=500.0, rope_scaling=LLAMA3_ROPE), tie=False
    ),
    "llama-linear-rope-tied": Family(
        transformers.LlamaConfig,
        _common(rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 2.5}),
        tie=True,
    ),
    "llama-yarn-rope-untied": Family(
        transformers.LlamaConfig,
        _common(
            rope_theta=500.0,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        ),
        tie=False,
    ),
    "llama-dynamic-rope-tied": Family(
        transformers.LlamaConfig,
        _common(rope_theta=500.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        tie=True,
    ),
    "qwen2-bias-sliding-tied": Family(
        transformers.Qwen2Config,
        _common(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, rope_theta=300.0),
        tie=True,
    ),
    "qwen3-qk-norm-untied": Family(
        transformers.Qwen3Config, _common(head_dim=32, rope_theta=700.0), tie=False
    ),
    "mistral-sliding-untied": Family(
        transformers.MistralConfig, _common(sliding_window=WINDOW, head_dim=16, rope_theta=900.0), tie=False
    ),
    "gemma2-softcap-tied": Family(
        transformers.Gemma2Config,
        _common(
            head_dim=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=6.0,
            sliding_window=WINDOW,
            rope_theta=800.0,
            hidden_activation="gelu_pytorch_tanh",
        ),
        tie=True,
    ),
    "gemma3-local-global-untied": Family(
        transformers.Gemma3TextConfig,
        _common(
            head_dim=16,
            query_pre_attn_scalar=20,
            final_logit_softcapping=6.0,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 2000.0},
            },
            hidden_activation="gelu_pytorch_tanh",
        ),
        tie=False,
    ),
    "phi3-fused-longrope-sliding": Family(
        transformers.Phi3Config,
        _common(
            sliding_window=WINDOW,
            original_max_position_embeddings=16,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.15 * i for i in range(HALF)],
                "long_factor": [1.5 + 0.5 * i for i in range(HALF)],
            },
        ),
        tie=False,
    ),
    "phi3-partial-rotary": Family(  # Phi-4-mini's kind: RoPE on the first half of each head only
        transformers.Phi3Config, _common(partial_rotary_factor=0.5, rope_theta=600.0), tie=False
    ),
}


def random_model(family: Family, seed: int = 0, **overrides: Any) -> Any:
    """A tiny HF model with weights large enough that each feature moves the logits (``overrides``: config
    keys to change, e.g. ``vocab_size``)."""
    torch.manual_seed(seed)
    cfg = family.config(**{**family.kwargs, **overrides}, tie_word_embeddings=family.tie)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    gemma = "gemma" in cfg.model_type
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(3)
            elif "norm" in name:  # Gemma scales by (1 + w)
                p.uniform_(-0.5, 0.5) if gemma else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.5)
    return model


def flat_weights(model: Any, family: Family) -> dict[str, np.ndarray]:
    """The model's state dict as numpy; a tied family's without ``lm_head.weight`` (a checkpoint may omit it)."""
    flat = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if family.tie:
        flat.pop("lm_head.weight", None)
    return flat


def hf_generation_logits(model: Any, ids: list[int], n_prompt: int) -> np.ndarray:
    """Logits [len(ids) - n_prompt + 1, V] transformers produces with its cache: prefill ``ids[:n_prompt]``,
    then one token per forward."""
    out_logits = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids[:n_prompt]]), use_cache=True)
        out_logits.append(out.logits[0, -1].numpy())
        for t in range(n_prompt, len(ids)):
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            out = model(input_ids=torch.tensor([[ids[t]]]), cache=cache, use_cache=True)
            out_logits.append(out.logits[0, -1].numpy())
    return np.stack(out_logits)


def assert_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= tol, f"{what}: max |d| {err:.3g} > {tol:.3g}"
    assert int(got.argmax()) == int(ref.argmax()), f"{what}: argmax differs"


def check_prefill_batched_decode_and_resume(eng: Engine, model: Any, name: str) -> None:
    """Two rows prefilled, then decoded together at different positions, then row 1 resumed in a fresh
    sequence (prompt + generated) and decoded once more: every logit vector against transformers'."""
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, VOCAB, n + STEPS).tolist() for n in PROMPTS]
    refs = [hf_generation_logits(model, r, n) for r, n in zip(rows, PROMPTS, strict=True)]

    states = [eng.new_sequence(r[:n]) for r, n in zip(rows, PROMPTS, strict=True)]
    for i, s in enumerate(states):
        assert_close(s.logits, refs[i][0], f"{name} prefill row {i}")
    for t in range(STEPS):  # both rows in each step, at different positions
        eng.step(states, [r[n + t] for r, n in zip(rows, PROMPTS, strict=True)])
        for i, s in enumerate(states):
            assert_close(s.logits, refs[i][t + 1], f"{name} decode step {t} row {i}")

    # resume row 1 elsewhere: prefill prompt + generated, then continue alongside row 0
    eng.release(states[1])
    n1 = PROMPTS[1] + STEPS - 1
    resumed = eng.new_sequence(rows[1][:n1])
    assert_close(resumed.logits, refs[1][STEPS - 1], f"{name} resumed prefill")
    eng.step([resumed], [rows[1][n1]])
    assert_close(resumed.logits, refs[1][STEPS], f"{name} resumed decode")
    assert (states[0].length, resumed.length) == (PROMPTS[0] + STEPS, n1 + 1)
