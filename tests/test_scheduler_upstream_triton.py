"""The scheduler's Triton upstream against a real tritonserver: finished streams must not pin their model."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from backend_support import make_tiny_checkpoint, write_model

from warmstart.scheduler.config import BandwidthConfig, ServerConfig
from warmstart.scheduler.upstream import GenerationRequest, TritonUpstream
from warmstart.triton import TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_many_finished_streams_leave_the_model_unloadable_at_once(tmp_path: Path) -> None:
    """tritonserver 2.51 keeps a model UNLOADING forever when a client cancels a stream whose request just
    finished; the upstream lets finished streams close instead, so the unload completes promptly."""
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    repo = tmp_path / "repo"
    write_model(repo, "tiny", str(ckpt), "torch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        server = TritonServer(
            TritonConfig(model_repositories=(repo,), repository_api_key="test-key-123"),
            workdir=tmp_path / "srv",
        ).start()
    try:
        server.load_model("tiny")
        config = ServerConfig(
            name="s",
            grpc=server.grpc_url,
            repository_api_key="test-key-123",
            bandwidth=BandwidthConfig(memory_bps=1e10, disk_bps=1e9, remote_bps=1e8),
        )

        async def scenario() -> int:
            up = TritonUpstream(config, timeout_s=10.0, retries=1)
            try:
                finals = 0
                for i in range(40):
                    req = GenerationRequest(
                        model="tiny",
                        request_id=f"r{i}",
                        prompt="Once upon a time",
                        sampling={"max_tokens": 2},
                    )
                    if i % 2:
                        async for chunk in up.generate(req, idle_timeout_s=30.0):
                            finals += chunk.final
                        continue
                    # as the router does: a reader task, cancelled once the final response is in
                    final = asyncio.Event()

                    async def read(req: GenerationRequest = req, final: asyncio.Event = final) -> None:
                        async with contextlib.aclosing(up.generate(req, idle_timeout_s=30.0)) as chunks:
                            async for chunk in chunks:
                                if chunk.final:
                                    final.set()

                    task = asyncio.create_task(read())
                    await final.wait()
                    finals += 1
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await up.unload("tiny", wait_s=10.0)  # raises ModelUnloadFailed while still UNLOADING
                return finals
            finally:
                await up.close()

        assert asyncio.run(scenario()) == 40
    finally:
        server.stop()
