"""The compact torch engine's adapter bank: every batch layout adds each row's own adapter update, exactly.

`TorchLoraBank.batch` lays a batch's rows out per slot (two rows on one slot, a row without an adapter, a gap
of slots no row uses, several tokens per row) and the update of each row must equal the plain product of its
own adapter's parts (float64 reference), with rows without an adapter left bit for bit unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from warmstart.engines.adapters import AdapterPart, PreparedAdapter, target_shapes
from warmstart.engines.hfconfig import Architecture, parse_hf_config
from warmstart.engines.lora import TorchLoraBank

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
MAX_RANK = 4
RANKS = {0: 2, 1: 4, 2: 3, 3: 1}  # slot -> its adapter's rank


def _prepared(rng: np.random.Generator, arch: Architecture, rank: int, skip: str) -> PreparedAdapter:
    parts: dict[str, tuple[AdapterPart, ...]] = {}
    for target, (fin, fout) in target_shapes(arch).items():
        if target == skip:
            continue
        parts[target] = tuple(
            AdapterPart(
                layer,
                rng.standard_normal((rank, fin)).astype(np.float32),
                rng.standard_normal((fout, rank)).astype(np.float32),
                float(rng.uniform(0.5, 2.0)),
            )
            for layer in (0, 1)
            if not (layer == 1 and target == "o_proj")  # a layer the adapter leaves out
        )
    return PreparedAdapter(f"slot-rank-{rank}", rank, parts)


@pytest.fixture(scope="module")
def bank() -> tuple[TorchLoraBank, dict[int, PreparedAdapter]]:
    arch = parse_hf_config(CONFIG)
    rng = np.random.default_rng(7)
    b = TorchLoraBank(arch, 5, MAX_RANK, dtype=torch.float32)
    installed = {}
    for slot, rank in RANKS.items():
        installed[slot] = _prepared(rng, arch, rank, skip="k_proj" if slot == 2 else "")
        b.install(slot, installed[slot])
    return b, installed


def _want(x: np.ndarray, y: np.ndarray, p: PreparedAdapter | None, target: str, layer: int) -> np.ndarray:
    if p is None:
        return y
    part = next((q for q in p.parts.get(target, ()) if q.layer == layer), None)
    if part is None:
        return y
    return y + (x @ part.a.astype(np.float64).T @ part.b.astype(np.float64).T) * part.scale


LAYOUTS = {
    "row i on slot i (no copy)": [0, 1, 2, 3],
    "all rows on one slot (no copy)": [1, 1, 1],
    "reversed slots": [3, 2, 1, 0],
    "two rows on one slot beside another": [1, 3, 1],
    "two rows on each of two slots, interleaved": [2, 0, 2, 0],
    "rows without an adapter": [-1, 2, -1, 0],
    "a gap of slots no row uses": [0, -1, 3],
    "one row": [2],
}


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("target", ["q_proj", "k_proj", "o_proj", "down_proj"])
def test_each_row_gets_its_own_adapters_update_in_every_batch_layout(
    bank: tuple[TorchLoraBank, dict[int, PreparedAdapter]], layout: str, tokens: int, target: str
) -> None:
    b, installed = bank
    index = LAYOUTS[layout]
    fin, fout = b.shapes[target]
    rng = np.random.default_rng(len(index) * 10 + tokens)
    x = torch.from_numpy(rng.standard_normal((len(index), tokens, fin)).astype(np.float32))
    y = torch.from_numpy(rng.standard_normal((len(index), tokens, fout)).astype(np.float32))
    lb = b.batch(index, torch.device("cpu"))
    assert lb is not None
    for layer in (0, 1):
        got = lb.add(y.clone(), lb.rows(x), target, layer).numpy()
        for row, slot in enumerate(index):
            want = _want(x[row].double().numpy(), y[row].double().numpy(), installed.get(slot), target, layer)
            if slot < 0:
                assert np.array_equal(got[row], y[row].numpy()), f"row {row} without an adapter changed"
            np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-4, err_msg=f"row {row} slot {slot}")


def test_a_batch_laid_out_as_its_slots_is_used_in_place(
    bank: tuple[TorchLoraBank, dict[int, PreparedAdapter]],
) -> None:
    b, _ = bank
    x = torch.zeros(4, 1, 32)
    for index, in_place in (
        ([0, 1, 2, 3], True),
        ([1, 1, 1, 1], True),
        ([1, 0, 2, 3], False),
        ([0, -1], False),
    ):
        lb = b.batch(index, torch.device("cpu"))
        assert lb is not None
        xs = lb.rows(x[: len(index)])
        assert (xs.data_ptr() == x.data_ptr()) is in_place, index


def test_no_adapter_in_the_batch_means_no_lora_work(
    bank: tuple[TorchLoraBank, dict[int, PreparedAdapter]],
) -> None:
    assert bank[0].batch([-1, -1], torch.device("cpu")) is None


def test_an_emptied_slot_adds_nothing_and_a_smaller_rank_clears_the_rest_of_the_slot() -> None:
    arch = parse_hf_config(CONFIG)
    rng = np.random.default_rng(1)
    b = TorchLoraBank(arch, 2, MAX_RANK, dtype=torch.float32)
    b.install(0, _prepared(rng, arch, 4, skip=""))
    small = _prepared(rng, arch, 1, skip="q_proj")
    b.install(0, small)  # rank 1 over rank 4, and q_proj no longer adapted
    x = torch.from_numpy(rng.standard_normal((1, 2, 32)).astype(np.float32))
    y = torch.zeros(1, 2, 32)
    lb = b.batch([0], torch.device("cpu"))
    assert lb is not None
    assert np.array_equal(lb.add(y.clone(), lb.rows(x), "q_proj", 0).numpy(), y.numpy())
    got = lb.add(y.clone(), lb.rows(x), "o_proj", 0).numpy()[0]
    np.testing.assert_allclose(
        got, _want(x[0].double().numpy(), y[0].double().numpy(), small, "o_proj", 0), atol=1e-4
    )
    b.remove(0)
    lb = b.batch([0], torch.device("cpu"))
    assert lb is not None
    assert np.array_equal(lb.add(y.clone(), lb.rows(x), "o_proj", 0).numpy(), y.numpy())
