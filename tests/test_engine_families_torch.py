"""The compact torch engine against transformers, one tiny random model per family feature (the table of
`engine_families`, shared with the JAX engine's test): prefill, a batched decode of two rows at different
positions, a resume; float32 logits within 1e-4 relative and the same argmax. Each family must get the
compact engine from `build_engine`, not the transformers fallback.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine_families import (  # noqa: E402
    FAMILIES,
    MAX_CONTEXT,
    check_prefill_batched_decode_and_resume,
    flat_weights,
    random_model,
)

from warmstart.engines import build_engine  # noqa: E402
from warmstart.engines.torch_llama import TorchLlamaEngine, supports  # noqa: E402


@pytest.mark.parametrize("name", FAMILIES)
def test_compact_torch_engine_matches_transformers_through_prefill_batched_decode_and_resume(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("warmstart.engines.torch_llama._MIN_CACHE", 8)  # the cache grows during the check
    family = FAMILIES[name]
    model = random_model(family)
    config = model.config.to_dict()
    assert supports(config)
    eng = build_engine("torch", config, flat_weights(model, family), max_batch=2, max_context=MAX_CONTEXT)
    assert isinstance(eng, TorchLlamaEngine)
    check_prefill_batched_decode_and_resume(eng, model, name)
