"""Both compact engines serve LoRA adapters per row, as peft's own model computes them.

A tiny random Llama, a tiny random Qwen2 (q/k/v biases) and a tiny random Phi-3 (fused qkv_proj and
gate_up_proj, adapted as fused modules) are wrapped by peft with two random adapters of
different ranks (one on every target, one rsLoRA on a subset with a rank pattern); each is saved, converted
with `warmstart convert`, read back and loaded into an engine slot through the registry's preparation. In
one batch, rows on adapter one, adapter two and the bare base are prefilled, decoded together at different
positions, and one row is resumed in a fresh sequence: every logit vector must equal peft's
(`peft.PeftModel` with that adapter active, or with adapters disabled) in float32 to 1e-4 of max(1, max|ref|)
with the same argmax.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from warmstart.engines.adapters import (
    AdapterRankTooLarge,
    InvalidAdapterSlot,
    NonFiniteAdapter,
    prepare_adapter,
)
from warmstart.engines.base import SeqState
from warmstart.format.convert import convert
from warmstart.format.lora import read_adapter

pytestmark = pytest.mark.slow

VOCAB = 96
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_RANK = 8
STEPS = 4


def _build(family: str, root: Any) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    targets = (ALL, ["q_proj", "v_proj", "o_proj", "down_proj"], "layers.1.self_attn.q_proj")
    if family == "llama":
        cfg: Any = LlamaConfig(**COMMON, tie_word_embeddings=False)
        model: Any = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(**COMMON, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
    else:  # Phi-3: fused qkv_proj and gate_up_proj, adapted as such
        cfg = Phi3Config(
            **COMMON, tie_word_embeddings=False, pad_token_id=None, bos_token_id=None, eos_token_id=None
        )
        model = Phi3ForCausalLM(cfg)
        fused = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        targets = (fused, ["qkv_proj", "gate_up_proj"], "layers.1.self_attn.qkv_proj")
    model = model.float().eval()
    with torch.no_grad():  # a wider logit spread: argmax is not decided by rounding
        for p in model.parameters():
            p.mul_(3.0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = LoraConfig(r=4, lora_alpha=8, target_modules=targets[0], init_lora_weights=False)
    second = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=targets[1],
        rank_pattern={targets[2]: 2},
        alpha_pattern={targets[1][-1]: 5},
        init_lora_weights=False,
    )
    pm = get_peft_model(model, first, adapter_name="one")
    pm.add_adapter("two", second)
    with torch.no_grad():  # adapters as large as the base's own terms, so a missing update shows
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)
    pm.eval()
    pm.save_pretrained(str(root / "saved"))
    adapters = {}
    for name in ("one", "two"):
        convert(root / "saved" / name, root / f"ws-{name}")
        adapters[name] = read_adapter(root / f"ws-{name}")
    return {"peft": pm, "config": cfg.to_dict(), "state": state, "adapters": adapters}


@pytest.fixture(scope="module", params=["llama", "qwen2", "phi3"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _build(request.param, tmp_path_factory.mktemp(f"lora-{request.param}"))


def _reference(pm: Any, adapter: str | None, ids: list[int]) -> np.ndarray:
    """peft's float32 logits after the last of ``ids`` with ``adapter`` active (None: adapters disabled)."""
    with torch.no_grad():
        if adapter is None:
            with pm.disable_adapter():
                out = pm(input_ids=torch.tensor([ids])).logits
        else:
            pm.set_adapter(adapter)
            out = pm(input_ids=torch.tensor([ids])).logits
    return np.asarray(out[0, -1].float().numpy())


def _close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(np.asarray(got) - ref).max())
    assert err <= tol, f"{what}: max |d| {err:.3g} > {tol:.3g}"
    assert int(np.argmax(got)) == int(ref.argmax()), f"{what}: argmax differs"


def _engine(kind: str, fam: dict[str, Any]) -> Any:
    from warmstart.engines import build_engine

    eng = build_engine(kind, fam["config"], fam["state"], dtype="float32", max_batch=4, max_context=128)
    eng.enable_lora(2, MAX_RANK)
    for slot, name in enumerate(("one", "two")):
        eng.install_adapter(slot, prepare_adapter(fam["adapters"][name], eng.args, MAX_RANK))
    return eng


@pytest.mark.parametrize("kind", ["torch", "jax"])
def test_mixed_adapter_batch_matches_peft_through_prefill_decode_and_resume(
    family: dict[str, Any], kind: str
) -> None:
    if kind == "torch":
        from warmstart.engines.torch_llama import TorchLlamaEngine

        assert isinstance(_engine(kind, family), TorchLlamaEngine)  # the compact engine, not transformers
    eng = _engine(kind, family)
    pm = family["peft"]
    rng = np.random.default_rng(3)
    rows: list[tuple[str | None, int | None, list[int]]] = [
        ("one", 0, rng.integers(0, VOCAB, 5).tolist()),
        (None, None, rng.integers(0, VOCAB, 9).tolist()),
        ("two", 1, rng.integers(0, VOCAB, 3).tolist()),
    ]
    states: list[SeqState] = []
    for name, slot, ids in rows:
        st = eng.new_sequence(ids, adapter=slot)
        _close(st.logits, _reference(pm, name, ids), f"{kind} prefill {name}")
        states.append(st)
    seqs = [list(ids) for _, _, ids in rows]
    for step in range(STEPS):
        nxt = [int(np.argmax(s.logits)) for s in states]
        for seq, t in zip(seqs, nxt, strict=True):
            seq.append(t)
        eng.step(states, nxt)
        for (name, _, _), st, seq in zip(rows, states, seqs, strict=True):
            _close(st.logits, _reference(pm, name, seq), f"{kind} decode step {step} {name}")
    for st in states:
        eng.release(st)
    # resume: adapter two's row in a fresh sequence (prompt + generated), beside a base row, one more step
    resumed = eng.new_sequence(seqs[2], adapter=1)
    base = eng.new_sequence(seqs[1][:4])
    _close(resumed.logits, _reference(pm, "two", seqs[2]), f"{kind} resume two")
    t_r, t_b = int(np.argmax(resumed.logits)), int(np.argmax(base.logits))
    eng.step([resumed, base], [t_r, t_b])
    _close(resumed.logits, _reference(pm, "two", [*seqs[2], t_r]), f"{kind} resumed decode two")
    _close(base.logits, _reference(pm, None, [*seqs[1][:4], t_b]), f"{kind} resumed decode base")


@pytest.mark.parametrize("kind", ["torch", "jax"])
def test_base_rows_are_unchanged_by_loaded_adapters_and_a_swapped_slot_takes_effect(
    family: dict[str, Any], kind: str
) -> None:
    from warmstart.engines import build_engine

    plain = build_engine(
        kind, family["config"], family["state"], dtype="float32", max_batch=4, max_context=128
    )
    eng = _engine(kind, family)
    ids = [3, 1, 4, 1, 5]
    want = plain.new_sequence(ids).logits
    got = eng.new_sequence(ids).logits
    assert np.array_equal(np.asarray(got), np.asarray(want))  # the base path is the base model, exactly
    # slot 0 now holds adapter two (the swap a registry does between steps)
    eng.install_adapter(0, prepare_adapter(family["adapters"]["two"], eng.args, MAX_RANK))
    _close(eng.new_sequence(ids, adapter=0).logits, _reference(family["peft"], "two", ids), f"{kind} swapped")
    eng.remove_adapter(0)  # an emptied slot adds zeros (JAX: through the LoRA variant's own rounding)
    _close(eng.new_sequence(ids, adapter=0).logits, np.asarray(want), f"{kind} emptied slot")


def test_adapter_slots_and_ranks_are_checked(family: dict[str, Any]) -> None:
    eng = _engine("torch", family)
    with pytest.raises(InvalidAdapterSlot, match=r"not in \[0, 2\)"):
        eng.new_sequence([1, 2], adapter=2)
    with pytest.raises(AdapterRankTooLarge, match="max_lora_rank"):
        prepare_adapter(family["adapters"]["two"], eng.args, 4)


def test_jax_swapping_adapters_never_recompiles(family: dict[str, Any]) -> None:
    eng = _engine("jax", family)
    eng.warm_up(2)  # compiles the base and the LoRA variants
    compiled = (eng._prefill._cache_size(), eng._decode._cache_size())
    for slot, name in ((0, "two"), (1, "one"), (0, "one")):
        eng.install_adapter(slot, prepare_adapter(family["adapters"][name], eng.args, MAX_RANK))
        a, b = eng.new_sequence([5, 6, 7], adapter=slot), eng.new_sequence([8, 9])
        eng.step([a, b], [1, 2])
        _close(a.logits, _reference(family["peft"], name, [5, 6, 7, 1]), f"jax slot {slot} {name}")
        eng.release(a)
        eng.release(b)
    assert (eng._prefill._cache_size(), eng._decode._cache_size()) == compiled


@pytest.mark.parametrize("kind", ["torch", "jax"])
def test_rows_ignore_an_adapter_in_a_slot_between_theirs_that_no_row_uses(
    family: dict[str, Any], kind: str
) -> None:
    """The torch bank runs a batch over the block of slots its rows span: slot 1 (adapter two, no row on
    it) lies between rows on slots 0 and 2 and must change neither."""
    from warmstart.engines import build_engine

    eng = build_engine(kind, family["config"], family["state"], dtype="float32", max_batch=4, max_context=128)
    eng.enable_lora(3, MAX_RANK)
    for slot, name in ((0, "one"), (1, "two"), (2, "one")):
        eng.install_adapter(slot, prepare_adapter(family["adapters"][name], eng.args, MAX_RANK))
    pm = family["peft"]
    rows = [("one", 0, [7, 3, 9, 2]), (None, None, [4, 4, 1]), ("one", 2, [11, 5])]
    states = [eng.new_sequence(ids, adapter=slot) for _, slot, ids in rows]
    nxt = [int(np.argmax(s.logits)) for s in states]
    eng.step(states, nxt)
    for (name, _, ids), st, t in zip(rows, states, nxt, strict=True):
        _close(st.logits, _reference(pm, name, [*ids, t]), f"{kind} span row {name}")


def test_an_adapter_with_a_nan_is_refused_before_it_reaches_a_slot(family: dict[str, Any]) -> None:
    """A NaN in one slot would reach every row of a batch whose slot span covers it (0 * NaN): refused."""
    import dataclasses

    eng = _engine("torch", family)
    adapter = family["adapters"]["one"]
    layer, modules = next(iter(adapter.layers.items()))
    target, module = next(iter(modules.items()))
    bad_a = np.array(module.a, dtype=np.float32)
    bad_a[0, 0] = np.nan
    bad = dataclasses.replace(
        adapter, layers={**adapter.layers, layer: {**modules, target: dataclasses.replace(module, a=bad_a)}}
    )
    with pytest.raises(NonFiniteAdapter, match=f"layer {layer} {target} holds NaN"):
        prepare_adapter(bad, eng.args, MAX_RANK)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("where", ["a", "b"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_nan_or_infinity_anywhere_in_a_or_b_is_refused(
    family: dict[str, Any], dtype: str, where: str, value: float
) -> None:
    """The check is a dot product (float32) or a sum (other dtypes): a value in the last place counts too."""
    import dataclasses

    import ml_dtypes

    eng = _engine("torch", family)
    adapter = family["adapters"]["one"]
    layer = max(adapter.layers)
    modules = adapter.layers[layer]
    target, module = list(modules.items())[-1]
    npdt = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    arrays = {"a": np.array(module.a, dtype=npdt), "b": np.array(module.b, dtype=npdt)}
    arrays[where][-1, -1] = value
    bad = dataclasses.replace(
        adapter, layers={**adapter.layers, layer: {**modules, target: dataclasses.replace(module, **arrays)}}
    )
    with pytest.raises(NonFiniteAdapter, match=f"layer {layer} {target} holds NaN"):
        prepare_adapter(bad, eng.args, MAX_RANK)
