"""The warmstart backend's device selection in a real tritonserver.

On a machine without CUDA (CI): a config asking for a GPU fails its load with a message that says no CUDA
device is visible and how to run on CPU; a bad device string fails with its own message; ``device "cpu"``
serves exactly as the default. With CUDA (``gpu``-marked, skipped elsewhere): a ``KIND_GPU`` model serves
the tokens the CPU model does.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from backend_support import StreamResult, grpc_generate, make_tiny_checkpoint, write_model

from warmstart.triton import ModelLoadError, TritonConfig, TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]

torch = pytest.importorskip("torch")
_NO_CUDA = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the error where no CUDA device is visible"
)
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("device")
    ckpt = str(make_tiny_checkpoint(root / "tiny_llama", "llama"))
    repo = root / "repo"
    write_model(repo, "on_default", ckpt, "torch")
    write_model(repo, "on_cpu", ckpt, "torch", device="cpu")
    write_model(repo, "kind_gpu", ckpt, "torch", instance_kind="KIND_GPU")
    write_model(repo, "cuda_torch", ckpt, "torch", device="cuda")
    write_model(repo, "cuda_jax", ckpt, "jax", device="cuda:0")
    write_model(repo, "kind_model_cuda", ckpt, "torch", device="cuda:1", instance_kind="KIND_MODEL")
    for name, device in (("bad_index", "cuda:x"), ("tpu", "tpu")):
        cfg = write_model(repo, name, ckpt, "torch")  # model_config refuses bad devices: write it by hand
        text = (repo / name / "config.pbtxt").read_text()
        param = f'parameters {{\n  key: "device"\n  value {{\n    string_value: "{device}"\n  }}\n}}\n'
        (repo / name / "config.pbtxt").write_text(text + param)
        assert cfg["name"] == name
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        srv = TritonServer(TritonConfig(model_repositories=(repo,)), workdir=root / "srv")
        srv.start()
    try:
        srv.load_model("on_default")
        yield srv
    finally:
        srv.stop()


def ok(r: StreamResult) -> StreamResult:
    assert r.error is None, r.error
    return r


def _states(server: TritonServer) -> dict[str, str | None]:
    return {m["name"]: m.get("state") for m in server.repository_index()}


def test_device_cpu_serves_exactly_as_the_default(server: TritonServer) -> None:
    server.load_model("on_cpu")
    want = ok(grpc_generate(server.grpc_url, "on_default", PROMPT, params={"max_tokens": 8})).ids
    assert ok(grpc_generate(server.grpc_url, "on_cpu", PROMPT, params={"max_tokens": 8})).ids == want
    assert "on_cpu ready (torch engine on cpu" in server.logs()


@_NO_CUDA
def test_kind_gpu_without_a_gpu_fails_the_load_saying_how_to_run_on_cpu(server: TritonServer) -> None:
    with pytest.raises(ModelLoadError) as e:
        server.load_model("kind_gpu")
    msg = str(e.value)
    assert "KIND_GPU but no GPUs are available" in msg, msg  # Triton's own check, before the backend's
    assert "no CUDA device is visible" in msg and "kind: KIND_CPU" in msg and 'device "cpu"' in msg, msg
    assert _states(server)["kind_gpu"] == "UNAVAILABLE"
    assert len(ok(grpc_generate(server.grpc_url, "on_default", PROMPT, params={"max_tokens": 3})).ids) == 3


@_NO_CUDA
@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "cuda_torch",
            "model 'cuda_torch' asks for device cuda:0 (instance_group KIND_GPU or parameter device), "
            "but no CUDA device is visible to this process",
        ),
        ("kind_model_cuda", "asks for device cuda:1"),
        ("cuda_jax", "has no cuda platform"),
    ],
)
def test_device_cuda_without_a_gpu_fails_the_load_saying_how_to_run_on_cpu(
    server: TritonServer, model: str, message: str
) -> None:
    with pytest.raises(ModelLoadError) as e:
        server.load_model(model)
    msg = str(e.value)
    assert message in msg and "instance_group [{ kind: KIND_CPU }]" in msg and 'device "cpu"' in msg, msg
    assert "Traceback" not in msg
    assert _states(server)[model] == "UNAVAILABLE"
    assert len(ok(grpc_generate(server.grpc_url, "on_default", PROMPT, params={"max_tokens": 3})).ids) == 3


@pytest.mark.parametrize(("model", "device"), [("bad_index", "cuda:x"), ("tpu", "tpu")])
def test_a_bad_device_string_fails_the_load_naming_it(server: TritonServer, model: str, device: str) -> None:
    with pytest.raises(
        ModelLoadError, match=f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'"
    ):
        server.load_model(model)
    assert _states(server)[model] == "UNAVAILABLE"


@pytest.mark.gpu
def test_kind_gpu_model_serves_the_tokens_of_the_cpu_model(server: TritonServer) -> None:
    server.load_model("kind_gpu")
    server.load_model("cuda_torch")
    want = ok(grpc_generate(server.grpc_url, "on_default", PROMPT, params={"max_tokens": 8})).ids
    assert ok(grpc_generate(server.grpc_url, "kind_gpu", PROMPT, params={"max_tokens": 8})).ids == want
    assert ok(grpc_generate(server.grpc_url, "cuda_torch", PROMPT, params={"max_tokens": 8})).ids == want
    assert "kind_gpu ready (torch engine on cuda:0" in server.logs()
