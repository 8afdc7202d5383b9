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


def test_smollm2_says_when_it_ends_its_answer_at_once_and_min_tokens_holds_that_back(
    server: TritonServer,
) -> None:
    """Greedy SmolLM2 answers "What is Triton Inference Server?" (no chat template) with its EOS token,
    ``<|im_end|>`` (id 2), first: the answer is empty, and the response says why (finish_reason "stop" plus
    ``stop_token_id`` 2); ``min_tokens`` makes it answer."""
    model = "smollm2_torch"
    server.load_model(model)
    try:
        prompt = "What is Triton Inference Server?"
        r = grpc_generate(server.grpc_url, model, prompt, params={"max_tokens": 8})
        assert r.error is None, r.error
        assert (r.ids, r.finish_reason, r.stop_token_id) == ([], "stop", 2)
        assert r.prompt_tokens == 9
        held = grpc_generate(server.grpc_url, model, prompt, params={"max_tokens": 8, "min_tokens": 4})
        assert held.error is None, held.error
        assert len(held.ids) >= 4 and 2 not in held.ids and held.text.strip()
    finally:
        server.unload_model(model)
