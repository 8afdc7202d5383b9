"""Helpers for the LoRA serving tests: a tiny random base checkpoint, two PEFT adapters on it, converted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend_support import TINY_VOCAB, byte_tokenizer_json

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraFixture:
    base: Path  # warmstart checkpoint of the base
    adapters: dict[str, Path]  # name -> converted adapter checkpoint
    peft: Any  # peft.PeftModel holding both adapters ("one", "two")


def make_base_and_adapters(root: Path, arch: str = "llama") -> LoraFixture:
    """A tiny random Llama or Qwen2 (byte tokenizer, no EOS) and two random PEFT adapters of ranks 4 and 8
    (the second rsLoRA on q/v/o/down with a rank pattern), saved by peft and converted by `warmstart convert`."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    import warmstart.format
    from warmstart.format.convert import convert

    common: dict[str, Any] = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": None,
        "bos_token_id": None,
        "pad_token_id": None,
    }
    if arch == "llama":
        cfg: Any = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        model_cls: Any = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model_cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():  # larger logits spread: greedy choices are not decided by rounding
        for p in model.parameters():
            p.mul_(4.0)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    base = root / "base"
    files = {"config.json": cfg.to_json_string().encode(), "tokenizer.json": byte_tokenizer_json().encode()}
    warmstart.format.save(state, base, files=files)
    first = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False)
    second = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        init_lora_weights=False,
    )
    pm = get_peft_model(model, first, adapter_name="one")
    pm.add_adapter("two", second)
    with torch.no_grad():  # updates as large as the base's terms: a missing or wrong adapter changes tokens
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.mul_(6.0)
    pm.eval()
    pm.save_pretrained(str(root / "peft"))
    adapters = {}
    for name in ("one", "two"):
        convert(root / "peft" / name, root / f"lora-{name}")
        adapters[name] = root / f"lora-{name}"
    return LoraFixture(base, adapters, pm)


def peft_greedy(pm: Any, adapter: str | None, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids`` from peft's model with ``adapter`` active (None: adapters disabled)."""
    import contextlib

    import torch

    out = list(ids)
    if adapter is not None:
        pm.set_adapter(adapter)
    ctx = pm.disable_adapter() if adapter is None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for _ in range(n):
            logits = pm(input_ids=torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids) :]
