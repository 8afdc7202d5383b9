"""Device selection (``warmstart.devices``): the parsing and precedence rules as pure functions, the backend's
settings that carry the device, and the engines on CPU and (``gpu``-marked, skipped without CUDA) on a GPU.

The Triton side (a model config asking for a GPU on a server without one) is in test_backend_device.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from warmstart.devices import CPU, Device, check_available, parse_device, select_device
from warmstart.errors import DeviceConflict, DeviceUnavailable, InvalidDevice
from warmstart.tritonconfig import BackendConfigError, ModelSettings, model_config, to_pbtxt

# ------------------------------------------------------------------------------ parsing (pure)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("cpu", CPU),
        (" cpu ", CPU),
        ("cuda", Device("cuda")),
        ("cuda:0", Device("cuda", 0)),
        ("cuda:3", Device("cuda", 3)),
    ],
)
def test_device_strings_parse_to_platform_and_index(text: str, want: Device) -> None:
    assert parse_device(text) == want


@pytest.mark.parametrize(
    "text", ["cuda:x", "tpu", "gpu", "gpu:0", "cuda:", "cuda:-1", "cpu:0", "CUDA", "", "mps"]
)
def test_bad_device_strings_are_refused_with_their_own_type(text: str) -> None:
    with pytest.raises(InvalidDevice, match=r"not supported|no index") as e:
        parse_device(text)
    assert isinstance(e.value, ValueError)
    if text not in ("cpu:0",):
        assert "'cpu', 'cuda' or 'cuda:N'" in str(e.value)


def test_a_device_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidDevice, match="must be a string"):
        parse_device(0)


def test_device_renders_as_the_string_torch_takes() -> None:
    assert [str(d) for d in (CPU, Device("cuda"), Device("cuda", 2))] == ["cpu", "cuda", "cuda:2"]


# ------------------------------------------------------------------------------ precedence (pure)


@pytest.mark.parametrize(
    ("requested", "kind", "device_id", "want"),
    [
        (None, None, None, "cpu"),  # nothing asked: CPU
        (None, "CPU", "0", "cpu"),
        ("", "KIND_CPU", "0", "cpu"),  # a blank parameter is no parameter
        ("cuda", "CPU", "0", "cuda:0"),  # KIND_CPU / KIND_MODEL: the parameter decides
        ("cuda:2", "KIND_CPU", "0", "cuda:2"),
        ("cuda:1", "MODEL", "0", "cuda:1"),
        ("cpu", "MODEL", "0", "cpu"),
        (None, "GPU", "1", "cuda:1"),  # KIND_GPU: Triton's placement
        (None, "KIND_GPU", 3, "cuda:3"),
        ("cuda", "GPU", "1", "cuda:1"),  # a parameter may repeat it
        ("cuda:1", "GPU", "1", "cuda:1"),
    ],
)
def test_device_selection_follows_kind_gpu_then_the_parameter_then_cpu(
    requested: str | None, kind: str | None, device_id: Any, want: str
) -> None:
    assert str(select_device(requested, kind, device_id)) == want


@pytest.mark.parametrize("requested", ["cpu", "cuda:0"])
def test_a_device_parameter_contradicting_kind_gpu_is_a_conflict(requested: str) -> None:
    with pytest.raises(DeviceConflict, match="KIND_GPU placed this instance on GPU 1") as e:
        select_device(requested, "GPU", "1")
    assert "remove the device parameter" in str(e.value) and isinstance(e.value, InvalidDevice)


@pytest.mark.parametrize(("kind", "device_id"), [("GPU", None), ("GPU", "x"), ("TPU", "0")])
def test_bad_instance_kinds_and_gpu_ids_are_refused(kind: str, device_id: Any) -> None:
    with pytest.raises(InvalidDevice):
        select_device(None, kind, device_id)


def test_bad_device_parameter_is_refused_whatever_the_kind() -> None:
    for kind in ("CPU", "MODEL", "GPU"):
        with pytest.raises(InvalidDevice, match="'tpu' is not supported"):
            select_device("tpu", kind, "0")


# ------------------------------------------------------------------------------ availability (pure)


def test_no_visible_cuda_device_says_so_and_how_to_run_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceUnavailable) as e:
        check_available(Device("cuda", 0), 0, what="model 'm'")
    msg = str(e.value)
    assert "model 'm' asks for device cuda:0" in msg and "no CUDA device is visible" in msg
    assert "CUDA_VISIBLE_DEVICES=''" in msg
    assert "instance_group [{ kind: KIND_CPU }]" in msg and 'device "cpu"' in msg


def test_a_gpu_index_beyond_the_visible_ones_names_the_valid_range() -> None:
    with pytest.raises(DeviceUnavailable, match=r"only 2 CUDA device\(s\) are visible.*cuda:0\.\.cuda:1"):
        check_available(Device("cuda", 2), 2)


def test_cpu_and_visible_gpus_are_available() -> None:
    check_available(CPU, 0)
    check_available(Device("cuda", 1), 2)
    check_available(Device("cuda"), 1)


# ------------------------------------------------------------------------------ backend settings


def _config(**params: str) -> dict[str, Any]:
    base = {"checkpoint": "ck", "engine": "torch", **params}
    return {"parameters": {k: {"string_value": v} for k, v in base.items()}}


def test_model_settings_carry_the_selected_device() -> None:
    assert ModelSettings.from_model_config(_config()).device == "cpu"
    assert ModelSettings.from_model_config(_config(device="cuda")).device == "cuda:0"
    got = ModelSettings.from_model_config(_config(), instance_kind="GPU", instance_device_id="1")
    assert got.device == "cuda:1"
    with pytest.raises(DeviceConflict):
        ModelSettings.from_model_config(_config(device="cpu"), instance_kind="GPU", instance_device_id="0")


@pytest.mark.parametrize("device", ["cuda:x", "tpu"])
def test_model_settings_refuse_a_bad_device_parameter(device: str) -> None:
    with pytest.raises(InvalidDevice, match=f"{device!r} is not supported"):
        ModelSettings.from_model_config(_config(device=device))
    with pytest.raises(InvalidDevice):
        ModelSettings(checkpoint="ck", engine="torch", device=device)


def test_rendered_config_has_the_device_parameter_and_the_gpu_list() -> None:
    cfg = model_config("m", "ck", "torch", device="cuda", instance_kind="KIND_GPU", gpus=[0, 1])
    assert cfg["parameters"]["device"] == {"string_value": "cuda"}
    assert cfg["instance_group"] == [{"count": 1, "kind": "KIND_GPU", "gpus": [0, 1]}]
    text = to_pbtxt(cfg)
    assert "kind: KIND_GPU" in text and "gpus: [ 0, 1 ]" in text and 'string_value: "cuda"' in text
    assert "device" not in model_config("m", "ck", "torch")["parameters"]
    with pytest.raises(InvalidDevice):
        model_config("m", "ck", "torch", device="cuda:x")
    for device, gpus in (("cpu", None), ("cuda:1", [0]), ("cuda:0", [0, 1])):
        with pytest.raises(DeviceConflict):
            model_config("m", "ck", "torch", device=device, instance_kind="KIND_GPU", gpus=gpus)
    assert model_config("m", "ck", "torch", device="cuda:1", instance_kind="KIND_GPU", gpus=[1])
    with pytest.raises(BackendConfigError, match="gpus needs instance_kind KIND_GPU"):
        model_config("m", "ck", "torch", gpus=[0])
    with pytest.raises(BackendConfigError, match="non-empty list"):
        model_config("m", "ck", "torch", instance_kind="KIND_GPU", gpus=[])


# ------------------------------------------------------------------------------ engines

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from warmstart.engines import build_engine  # noqa: E402

_NO_CUDA = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the error where no CUDA device is visible"
)


def _tiny(kind: str = "llama") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    torch.manual_seed(0)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    cfg = cls(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=128,
        eos_token_id=None,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return cfg.to_dict(), {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _logits(engine: Any, prompt: list[int], steps: int) -> np.ndarray:
    """Prefill logits, then the logits after each greedy step, as one [steps + 1, V] array."""
    state = engine.new_sequence(prompt)
    rows = [state.logits.copy()]
    for _ in range(steps):
        engine.step([state], [int(state.logits.argmax())])
        rows.append(state.logits.copy())
    engine.release(state)
    return np.stack(rows)


PROMPT = [5, 17, 3, 42, 8, 1, 90]


@pytest.mark.parametrize("kind", ["torch", "jax"])
def test_engines_on_an_explicit_cpu_device_equal_the_default(kind: Any) -> None:
    cfg, flat = _tiny()
    default = _logits(build_engine(kind, cfg, flat, max_context=64), PROMPT, 4)
    explicit = _logits(build_engine(kind, cfg, flat, max_context=64, device="cpu"), PROMPT, 4)
    np.testing.assert_array_equal(explicit, default)


@pytest.mark.parametrize("kind", ["torch", "jax"])
def test_engines_refuse_a_bad_device_string(kind: Any) -> None:
    cfg, flat = _tiny()
    with pytest.raises(InvalidDevice, match="'tpu' is not supported"):
        build_engine(kind, cfg, flat, device="tpu")


@_NO_CUDA
def test_torch_engine_on_cuda_without_a_gpu_fails_before_touching_torch_cuda() -> None:
    cfg, flat = _tiny()
    with pytest.raises(DeviceUnavailable, match=r"no CUDA device is visible.*KIND_CPU"):
        build_engine("torch", cfg, flat, device="cuda")


def test_jax_engine_on_cuda_without_the_platform_names_it() -> None:
    import jax

    try:
        jax.devices("cuda")
    except RuntimeError:
        pass
    else:
        pytest.skip("this jax has a CUDA platform")
    cfg, flat = _tiny()
    with pytest.raises(DeviceUnavailable, match=r"has no cuda platform.*jax\[cuda12\]"):
        build_engine("jax", cfg, flat, device="cuda:0")


def test_every_tensor_the_compact_forward_creates_names_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU a factory call without ``device=`` would make a CPU tensor and fail (or copy) mid-forward;
    this finds one on CPU: every constructor call inside ``forward`` is recorded with its ``device``."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors

    from warmstart.engines import torch_llama

    unnamed: list[str] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            if func in _device_constructors() and kwargs.get("device") is None:
                unnamed.append(getattr(func, "__name__", str(func)))
            return func(*args, **kwargs)

    forward = torch_llama.forward

    def recorded(*args: Any, **kwargs: Any) -> Any:
        with Record():
            return forward(*args, **kwargs)

    monkeypatch.setattr(torch_llama, "forward", recorded)
    cfg, flat = _tiny()
    engine = build_engine("torch", cfg, flat, max_context=64)
    _logits(engine, PROMPT, 3)
    a, b = engine.new_sequence([1, 2]), engine.new_sequence([3])
    engine.step([b, a], [4, 5])  # scattered and contiguous slots take different paths
    assert unnamed == []


# --- on a GPU (skipped without CUDA) -------------------------------------------------------------------


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    tol = 1e-3 * max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= tol
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compact_torch_engine_logits_on_gpu_equal_cpu(arch: str) -> None:
    cfg, flat = _tiny(arch)
    cpu = _logits(build_engine("torch", cfg, flat, max_context=64), PROMPT, 6)
    engine = build_engine("torch", cfg, flat, max_context=64, device="cuda:0")
    assert engine.weights.embed.is_cuda and engine._cache[0].is_cuda  # type: ignore[attr-defined]
    _assert_close(_logits(engine, PROMPT, 6), cpu)


@pytest.mark.gpu
def test_transformers_torch_engine_logits_on_gpu_equal_cpu() -> None:
    from warmstart.engines.torch_engine import TorchEngine

    cfg, flat = _tiny()
    cpu = _logits(TorchEngine.from_state_dict(cfg, flat, max_context=64), PROMPT, 6)
    engine = TorchEngine.from_state_dict(cfg, flat, device="cuda", max_context=64)
    assert next(engine.model.parameters()).is_cuda
    _assert_close(_logits(engine, PROMPT, 6), cpu)


@pytest.mark.gpu
def test_jax_engine_logits_on_gpu_equal_cpu() -> None:
    import jax

    try:
        jax.devices("cuda")
    except RuntimeError:
        pytest.skip("this jax has no CUDA platform (pip install 'jax[cuda12]')")
    cfg, flat = _tiny()
    cpu = _logits(build_engine("jax", cfg, flat, max_context=64, device="cpu"), PROMPT, 6)
    engine = build_engine("jax", cfg, flat, max_context=64, device="cuda")
    assert engine._cache[0].devices() == {jax.devices("cuda")[0]}  # type: ignore[attr-defined]
    _assert_close(_logits(engine, PROMPT, 6), cpu)


@pytest.mark.gpu
def test_loader_weights_reach_the_gpu_engine_without_a_second_copy(tmp_path: Path) -> None:
    from backend_support import make_tiny_checkpoint

    from warmstart.backend.weights import load_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    loaded = load_checkpoint(str(ckpt), "torch", device="cuda:0")
    assert all(t.is_cuda for t in loaded.weights.values())
    engine = build_engine("torch", loaded.config, loaded.weights, device="cuda:0")
    embed = loaded.weights["model.embed_tokens.weight"]
    assert engine.weights.embed.data_ptr() == embed.data_ptr()  # type: ignore[attr-defined]
