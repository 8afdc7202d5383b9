"""The scheduler's Triton upstream against a real tritonserver: finished streams must not pin their model."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import pytest
from backend_support import make_tiny_checkpoint, write_model

from warmstart.scheduler.config import BandwidthConfig, ServerConfig
from warmstart.scheduler.upstream import GenerationRequest, TritonUpstream, UpstreamRequestError
from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MODELS = ("tiny_a", "tiny_b")


def test_streams_whose_reader_stops_after_the_final_response_leave_the_model_unloadable(
    tmp_path: Path,
) -> None:
    """tritonserver 2.51 keeps a model UNLOADING forever when a client cancels a stream whose request just
    finished. The router cancels a generation's reader task right after the final response, and grpc.aio
    cancels a call whose pending read is cancelled: the upstream must keep finished calls out of that.
    Before the fix, about half of these unloads hung (stubs without an engine host reproduce it best).
    A quarter of the requests are refused by the backend (one final error response): those streams are
    drained too."""
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    repo = tmp_path / "repo"
    for name in MODELS:
        write_model(repo, name, str(ckpt), "torch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        server = TritonServer(
            TritonConfig(model_repositories=(repo,), repository_api_key="test-key-123"),
            workdir=tmp_path / "srv",
            engine_host=False,
        ).start()
    config = ServerConfig(
        name="s",
        grpc=server.grpc_url,
        repository_api_key="test-key-123",
        bandwidth=BandwidthConfig(memory_bps=1e10, disk_bps=1e9, remote_bps=1e8),
    )
    rng = random.Random(0)
    refused: list[str] = []

    async def stream(up: TritonUpstream, model: str, rid: str) -> int:
        bad = rng.random() < 0.25  # answered by one error response (INVALID_ARG), as final as a last token
        req = GenerationRequest(
            model=model,
            request_id=rid,
            prompt="Once upon a time " * rng.randint(1, 12),
            sampling={"max_tokens": rng.randint(2, 30), **({"temperature": -1.0} if bad else {})},
        )
        final = asyncio.Event()

        async def read() -> None:
            try:
                async with contextlib.aclosing(up.generate(req, idle_timeout_s=30.0)) as chunks:
                    async for chunk in chunks:
                        if chunk.final:
                            final.set()
            except UpstreamRequestError:
                assert bad
                refused.append(rid)
                final.set()

        task = asyncio.create_task(read())
        await final.wait()
        task.cancel()  # as the router does once it has the final response
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return 1

    async def scenario() -> int:
        up = TritonUpstream(config, timeout_s=10.0, retries=1)
        finals = 0
        try:
            for rnd in range(3):
                for name in MODELS:
                    server.load_model(name)
                done = await asyncio.gather(
                    *(stream(up, name, f"{name}-{rnd}-{i}") for name in MODELS for i in range(12))
                )
                finals += sum(done)
                for name in MODELS:
                    await up.unload(name, wait_s=10.0)  # raises ModelUnloadFailed while still UNLOADING
            return finals
        finally:
            await up.close()

    try:
        assert asyncio.run(scenario()) == 3 * 12 * len(MODELS)
        assert refused  # the error path ran
    finally:
        server.stop()
