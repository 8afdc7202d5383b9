"""`warmstart.engines.hfconfig.parse_hf_config`: what it refuses (by key and value), and that config.json
layouts transformers reads differently for the same model give the same `Architecture`."""

from __future__ import annotations

from typing import Any

import pytest

from warmstart.engines import UnsupportedModel, build_engine
from warmstart.engines.hfconfig import parse_hf_config

LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 101,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "max_position_embeddings": 64,
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}

# (id, config, strings the message must name: the key and the offending value)
REFUSED: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("unknown-model-type", {**LLAMA, "model_type": "gpt2"}, ("model_type", "'gpt2'")),
    ("multimodal-gemma3", {**LLAMA, "model_type": "gemma3"}, ("model_type", "'gemma3'", "gemma3_text")),
    ("gelu-llama", {**LLAMA, "hidden_act": "gelu"}, ("hidden_act", "'gelu'")),
    ("mlp-bias", {**LLAMA, "mlp_bias": True}, ("mlp_bias", "True")),
    ("pretraining-tp", {**LLAMA, "pretraining_tp": 2}, ("pretraining_tp", "2")),
    (
        "unknown-rope-type",
        {**LLAMA, "rope_scaling": {"rope_type": "ntk-by-parts", "factor": 2.0}},
        ("rope_type", "'ntk-by-parts'"),
    ),
    (
        "llama3-rope-missing-key",
        {**LLAMA, "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}},
        ("rope_scaling", "'llama3'", "'low_freq_factor'"),
    ),
    (
        "bad-layer-type",
        {**LLAMA, "layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention"]},
        ("layer_types", "'chunked_attention'"),
    ),
    (
        "sliding-layers-without-window",
        {**LLAMA, "layer_types": ["sliding_attention"] * 4},
        ("sliding_window", "None"),
    ),
    (
        "heads-not-multiple-of-kv-heads",
        {**LLAMA, "num_attention_heads": 6, "num_key_value_heads": 4, "head_dim": 16},
        ("num_attention_heads 6", "num_key_value_heads 4"),
    ),
    ("float-hidden-size", {**LLAMA, "hidden_size": 64.0}, ("hidden_size", "64.0")),
    ("string-hidden-size", {**LLAMA, "hidden_size": "64"}, ("hidden_size", "'64'")),
    ("missing-hidden-size", {k: v for k, v in LLAMA.items() if k != "hidden_size"}, ("hidden_size", "None")),
]


@pytest.mark.parametrize(("config", "named"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_unimplemented_feature_is_refused_naming_the_key_and_value(
    config: dict[str, Any], named: tuple[str, ...]
) -> None:
    with pytest.raises(UnsupportedModel) as err:
        parse_hf_config(config)
    for text in named:
        assert text in str(err.value)


def test_the_base_config_of_the_refusal_table_is_accepted() -> None:
    a = parse_hf_config(LLAMA)  # so each refusal above is the changed key's doing
    assert (a.dim, a.head_dim, a.n_rep, a.layer_windows) == (64, 16, 2, (None,) * 4)


def _windows_as_transformers_reads(config: dict[str, Any]) -> tuple[int | None, ...]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(**{k: v for k, v in config.items() if k != "model_type"})
    return tuple(cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types)


QWEN2 = {**LLAMA, "model_type": "qwen2", "num_hidden_layers": 6, "max_position_embeddings": 4096}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 2}, (None,) * 6),
        (
            {"use_sliding_window": True, "sliding_window": 512, "max_window_layers": 2},
            (None,) * 2 + (512,) * 4,
        ),
        ({"use_sliding_window": True, "sliding_window": 512, "max_window_layers": 6}, (None,) * 6),
    ],
    ids=["window-off", "window-from-layer-2", "max-window-layers-covers-all"],
)
def test_qwen2_raw_config_json_gives_transformers_layer_windows(
    raw: dict[str, Any], expected: tuple[int | None, ...]
) -> None:
    config = {**QWEN2, **raw}  # as config.json on the Hub has it: no layer_types
    assert parse_hf_config(config).layer_windows == expected
    assert _windows_as_transformers_reads(config) == expected


GEMMA3 = {
    **LLAMA,
    "model_type": "gemma3_text",
    "num_hidden_layers": 7,
    "head_dim": 16,
    "sliding_window": 8,
    "query_pre_attn_scalar": 16,
}


def test_gemma3_v4_rope_layout_equals_the_v5_layout() -> None:
    v4 = {
        **GEMMA3,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }
    v5 = {
        **GEMMA3,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    }
    a4, a5 = parse_hf_config(v4), parse_hf_config(v5)
    assert a4 == a5
    # sliding_window_pattern 6 (transformers' default): every sixth layer global
    assert a4.layer_windows == (8, 8, 8, 8, 8, None, 8)
    assert a4.layer_rope[5] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}
    assert a4.layer_rope[0] == {"rope_type": "default", "rope_theta": 10_000.0}


def test_gemma3_v4_layout_reads_as_transformers_config_class_reads_it() -> None:
    transformers = pytest.importorskip("transformers")
    v4 = {
        **GEMMA3,
        "rope_theta": 123.0,
        "rope_local_base_freq": 7.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }
    cfg = transformers.Gemma3TextConfig(**{k: v for k, v in v4.items() if k != "model_type"})
    a = parse_hf_config(v4)
    assert a.layer_rope == tuple(dict(cfg.rope_parameters[t]) for t in cfg.layer_types)
    assert a.layer_windows == tuple(
        cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types
    )


def test_build_engine_torch_falls_back_to_transformers_for_a_model_the_compact_engine_refuses() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from warmstart.engines.torch_engine import TorchEngine
    from warmstart.engines.torch_llama import supports

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2, eos_token_id=None, bos_token_id=None
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    config = model.config.to_dict()
    flat = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert not supports(config)
    eng = build_engine("torch", config, flat, max_batch=1, max_context=32)
    assert isinstance(eng, TorchEngine)
    state = eng.new_sequence([1, 2, 3])
    with torch.no_grad():
        ref = model(torch.tensor([[1, 2, 3]])).logits[0, -1].numpy()
    assert float(abs(state.logits - ref).max()) <= 1e-4 * max(1.0, float(abs(ref).max()))
