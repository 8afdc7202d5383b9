"""The JAX compact engine against transformers, one tiny random model per family feature.

The families, the reference (transformers generating with its own cache) and the check (prefill, a
batched decode of two rows at different positions, a resume) live in `engine_families`, shared with the
torch engine's test.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
transformers = pytest.importorskip("transformers")

from engine_families import (  # noqa: E402
    FAMILIES,
    MAX_CONTEXT,
    check_prefill_batched_decode_and_resume,
    flat_weights,
    random_model,
)

from warmstart.engines import build_engine  # noqa: E402
from warmstart.engines.jax_llama import JaxEngine  # noqa: E402


@pytest.mark.parametrize("name", FAMILIES)
def test_jax_engine_matches_transformers_through_prefill_batched_decode_and_resume(name: str) -> None:
    family = FAMILIES[name]
    model = random_model(family)
    eng = build_engine(
        "jax", model.config.to_dict(), flat_weights(model, family), max_batch=2, max_context=MAX_CONTEXT
    )
    assert isinstance(eng, JaxEngine)
    check_prefill_batched_decode_and_resume(eng, model, name)
