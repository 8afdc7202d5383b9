"""The shipped deployments ``model_repository/smollm2_{torch,jax}`` answering with the real SmolLM2 model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_support import convert_smollm2, grpc_generate, http_generate_stream

from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent / "model_repository"
QUESTION = "The capital of France is"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``smollm2/`` (converted once; ``WARMSTART_TEST_MODELS`` reuses an existing one)."""
    given = os.environ.get("WARMSTART_TEST_MODELS")
    if given and (Path(given) / "smollm2" / "index.json").is_file():
        return Path(given)
    root = tmp_path_factory.mktemp("models")
    convert_smollm2(root / "smollm2")
    return root


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WARMSTART_MODELS", str(models_dir))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        srv = TritonServer(TritonConfig(model_repositories=(REPO,)), workdir=tmp_path_factory.mktemp("srv"))
        srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("engine", ["torch", "jax"])
def test_smollm2_knows_the_capital_of_france(server: TritonServer, engine: str) -> None:
    model = f"smollm2_{engine}"
    server.load_model(model)
    try:
        r = grpc_generate(server.grpc_url, model, QUESTION, params={"max_tokens": 8})
        assert r.error is None, r.error
        assert "Paris" in r.text, r.text
        status, events = http_generate_stream(
            server.http_url, model, {"text_input": QUESTION, "parameters": {"stream": True, "max_tokens": 8}}
        )
        assert status == 200
        assert "".join(e["text_output"] for e in events) == r.text
    finally:
        server.unload_model(model)
