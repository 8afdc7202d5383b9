"""The engines' batched LoRA math equals peft's LoRA layers, through `warmstart convert` and `read_adapter`.

A tiny random transformers Llama is wrapped by peft with two random, non-zero adapters of different ranks
(one rsLoRA with a rank and an alpha pattern); each is saved with save_pretrained, converted, read back, and
stacked by zero-padding to the larger rank. For every adapted linear, the base output plus the gathered
update of a mixed batch (rows on adapter 1, adapter 2 and none) must equal peft's output for each row's
adapter (float32, 1e-5).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from warmstart.engines.lora import NO_ADAPTER, apply_lora, stack_lora, stack_module
from warmstart.format.convert import convert
from warmstart.format.lora import IncompatibleBase, check_compatible, read_adapter

pytestmark = pytest.mark.slow

LLAMA = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    first = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False)
    second = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"down_proj": 5},
        init_lora_weights=False,
    )
    pm = get_peft_model(model, first, adapter_name="one")
    pm.add_adapter("two", second)
    pm.eval()
    root = tmp_path_factory.mktemp("peft")
    pm.save_pretrained(str(root / "saved"))  # "one" and "two" land in saved/one and saved/two
    out = {}
    for name in ("one", "two"):
        convert(root / "saved" / name, root / f"ws-{name}")
        out[name] = read_adapter(root / f"ws-{name}")
    return {"peft": pm, "adapters": [out["one"], out["two"]]}


def _module(pm: Any, layer: int, target: str) -> Any:
    block = pm.base_model.model.model.layers[layer]
    return getattr(
        block.self_attn if target in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, target
    )


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("target", ALL)
def test_gathered_update_matches_peft_per_row_adapter(
    peft_pair: dict[str, Any], layer: int, target: str
) -> None:
    pm, adapters = peft_pair["peft"], peft_pair["adapters"]
    module = _module(pm, layer, target)
    base_linear = module.base_layer
    stacked = stack_module(
        adapters, layer, target, in_features=base_linear.in_features, out_features=base_linear.out_features
    )
    torch.manual_seed(layer * 10 + ALL.index(target))
    x = torch.randn(5, 3, base_linear.in_features)  # [B, T, in]
    index = torch.tensor([0, NO_ADAPTER, 1, 0, 1])
    with torch.no_grad():
        base = base_linear(x)
        expected = []
        for i, j in enumerate(index.tolist()):
            if j == NO_ADAPTER:
                expected.append(base[i])
                continue
            pm.set_adapter(["one", "two"][j])
            expected.append(module(x[i : i + 1])[0])
        got = apply_lora(base, x, stacked, index)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], base[1])  # a row without adapter is the base output exactly
    if target not in ("q_proj", "v_proj", "down_proj"):  # adapter "two" leaves it out: its rows unchanged
        assert torch.equal(got[2], base[2])
    else:
        assert not torch.allclose(got[2], base[2])


def test_stacking_pads_to_the_largest_rank_and_keeps_each_adapters_scaling(peft_pair: dict[str, Any]) -> None:
    one, two = peft_pair["adapters"]
    stacked = stack_module([one, two], 1, "q_proj", in_features=32, out_features=32)
    assert stacked.ranks == (4, 2)  # rank_pattern gave layer 1's q_proj rank 2 in adapter "two"
    assert stacked.max_rank == 4
    assert torch.count_nonzero(stacked.a[1, 2:]) == 0 and torch.count_nonzero(stacked.b[1, :, 2:]) == 0
    assert stacked.scale.tolist() == pytest.approx([8 / 4, 16 / 2**0.5])  # rsLoRA: alpha / sqrt(r)
    assert two.module(0, "down_proj").scaling == pytest.approx(5 / 8**0.5)  # alpha_pattern
    down = stack_module([one, two], 0, "down_proj", in_features=48, out_features=32)
    assert down.ranks == (4, 8) and down.max_rank == 8


def test_read_adapter_views_are_zero_copy_and_read_only(peft_pair: dict[str, Any]) -> None:
    one = peft_pair["adapters"][0]
    m = one.module(0, "q_proj")
    assert m is not None
    assert not m.a.flags.writeable and not m.a.flags.owndata
    expected = peft_pair["peft"].base_model.model.model.layers[0].self_attn.q_proj.lora_A["one"].weight
    assert torch.equal(torch.from_numpy(m.a.copy()), expected.detach())


def test_peft_adapters_fit_their_base_config_and_not_another(peft_pair: dict[str, Any]) -> None:
    for adapter in peft_pair["adapters"]:
        check_compatible(adapter, LLAMA)
    with pytest.raises(IncompatibleBase, match="k_proj maps 32 -> 16 features in the adapter but 32 -> 32"):
        check_compatible(peft_pair["adapters"][0], {**LLAMA, "num_key_value_heads": 4})


def test_stack_lora_refuses_matrices_that_do_not_fit_the_linear() -> None:
    with pytest.raises(IncompatibleBase, match="do not fit a 8 -> 4 linear"):
        stack_lora([(torch.zeros(2, 8), torch.zeros(5, 2), 1.0)], in_features=8, out_features=4)
