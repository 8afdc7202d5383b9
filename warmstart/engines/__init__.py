"""Generation engines: torch (a compact decoder for the families below, else any transformers model) and
JAX (a compact decoder for the same families).

Families both compact engines implement, read from ``config.json`` by the one shared parser
`warmstart.engines.hfconfig.parse_hf_config`: Llama 1-3.x (RoPE scaling linear/dynamic/llama3/yarn), Mistral,
Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 text and Phi-3/3.5 (docs/engines.md has what each needs).

Importing this package imports neither torch nor jax; `build_engine` imports the one it needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from warmstart.devices import check_engine_device, parse_device
from warmstart.engines.base import (
    BadWeightShape,
    ContextFull,
    EmptyPrompt,
    Engine,
    EngineError,
    GeneratorClosed,
    InvalidSamplingParams,
    InvalidTokenId,
    MissingWeight,
    NoFreeSlot,
    PromptTooLong,
    SeqState,
    UnknownEngineKind,
    UnsupportedModel,
)
from warmstart.engines.generator import BatchedGenerator, RequestHandle
from warmstart.engines.sampling import SamplingParams, sample_token
from warmstart.engines.streaming import TextStreamer

ENGINE_KINDS = ("torch", "jax")


def build_engine(
    kind: Literal["torch", "jax"],
    config: Mapping[str, Any],
    weights: Mapping[str, Any],
    *,
    dtype: Any = None,
    max_batch: int = 8,
    max_context: int | None = None,
    device: str | None = None,
) -> Engine:
    """Build an engine from an HF ``config.json`` dict and a flat ``{hf_name: tensor}`` dict.

    ``weights`` values may be numpy arrays, torch tensors or jax arrays. ``dtype`` is the compute
    dtype (a torch dtype or name for "torch", a jnp dtype or name for "jax"); None keeps the
    weights' dtype for torch and uses float32 for JAX (XLA:CPU bf16 is slow). ``max_context``
    defaults to the model's ``max_position_embeddings``, capped at 2048 for JAX's static cache.

    For "torch", architectures `warmstart.engines.torch_llama` implements get that compact engine
    (milliseconds to build, no transformers import); any other goes through transformers.

    ``device`` is ``"cpu"`` (the default), ``"cuda"`` or ``"cuda:N"`` (`warmstart.devices`): weights and KV
    cache live there. Torch weights already on the device are used as they are (no copy); JAX places its
    prepared parameters with ``jax.device_put``. A bad device string raises `warmstart.errors.InvalidDevice`;
    a CUDA device that is not visible, `warmstart.errors.DeviceUnavailable`.
    """
    dev = None if device is None else parse_device(device)
    if dev is not None and kind in ENGINE_KINDS:
        check_engine_device(dev, kind)  # DeviceUnavailable (no CUDA device visible) before any copy
    if kind == "torch":
        try:
            import torch

            from warmstart.engines import torch_llama
        except ImportError as e:
            raise ImportError("the torch engine needs the torch extra: pip install 'warmstart[torch]'") from e
        tdtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if torch_llama.supports(config):  # no transformers import, no model construction
            return torch_llama.TorchLlamaEngine(
                config,
                weights,
                dtype=tdtype,
                max_batch=max_batch,
                max_context=max_context,
                device=None if dev is None else str(dev),
            )
        try:
            from warmstart.engines.torch_engine import TorchEngine
        except ImportError as e:
            raise ImportError(
                f"model_type {config.get('model_type')!r} needs transformers for the torch engine: "
                "pip install 'warmstart[torch]'"
            ) from e
        return TorchEngine.from_state_dict(
            config,
            weights,
            tdtype,
            device=None if dev is None else str(dev),
            max_batch=max_batch,
            max_context=max_context,
        )
    if kind == "jax":
        try:
            from warmstart.engines.jax_llama import JaxEngine
        except ImportError as e:
            raise ImportError("the JAX engine needs the jax extra: pip install 'warmstart[jax]'") from e
        return JaxEngine(
            config, weights, dtype=dtype, max_batch=max_batch, max_context=max_context, device=dev
        )
    raise UnknownEngineKind(f"engine kind {kind!r} unknown; use one of {ENGINE_KINDS}")


__all__ = [
    "ENGINE_KINDS",
    "BadWeightShape",
    "BatchedGenerator",
    "ContextFull",
    "EmptyPrompt",
    "Engine",
    "EngineError",
    "GeneratorClosed",
    "InvalidSamplingParams",
    "InvalidTokenId",
    "MissingWeight",
    "NoFreeSlot",
    "PromptTooLong",
    "RequestHandle",
    "SamplingParams",
    "SeqState",
    "TextStreamer",
    "UnknownEngineKind",
    "UnsupportedModel",
    "build_engine",
    "sample_token",
]
