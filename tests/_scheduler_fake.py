"""A tiny decoupled Triton Python model that imitates the warmstart backend's I/O with fake tokens.

Token ``k`` of a generation is a pure function of (prompt, seed, k), so a generation resumed elsewhere
with ``input_ids`` + ``num_generated`` continues token-exactly, like the real backend's seeded sampling.
A chat (the ``messages`` input) is the prompt of one ``role: content`` line per message, then ``assistant:``.
Used by the scheduler service tests until (and beside) the real backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_PY = r"""
import asyncio, json
import numpy as np
import triton_python_backend_utils as pb_utils

def fake_token(prompt_ids, seed, k):
    return (sum(prompt_ids) * 31 + len(prompt_ids) * 7 + seed * 1_000_003 + k * 7919) % 997 + 3

class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.delay = float(params.get("token_delay_s", "0.01"))
        load_delay = float(params.get("load_delay_s", "0"))
        self.unload_delay = float(params.get("unload_delay_s", "0"))
        if load_delay:
            import time
            time.sleep(load_delay)
        self.tasks = set()

    async def execute(self, requests):
        for r in requests:
            t = asyncio.get_running_loop().create_task(self.run(r))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
        return None

    def _get(self, r, name):
        t = pb_utils.get_input_tensor_by_name(r, name)
        return None if t is None else t.as_numpy()

    async def run(self, r):
        s = r.get_response_sender()
        FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            text = self._get(r, "text_input")
            if text is None:  # a chat: one "role: content" line per message, then "assistant:"
                chat = json.loads(self._get(r, "messages").reshape(-1)[0])
                prompt = "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant:"
            else:
                prompt = text.reshape(-1)[0]
                prompt = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
            sp = self._get(r, "sampling_parameters")
            params = json.loads(sp.reshape(-1)[0]) if sp is not None else json.loads(r.parameters() or "{}")
            max_tokens = int(params.get("max_tokens", 16))
            seed = int(params.get("seed", 0))
            ids = self._get(r, "input_ids")
            n = self._get(r, "num_generated")
            n = int(n.reshape(-1)[0]) if n is not None else 0
            prompt_ids = list(prompt.encode())
            generated = []
            if ids is not None:
                ids = [int(x) for x in ids.reshape(-1)]
                generated = ids[len(ids) - n:] if n else []
                if len(ids) > n:
                    prompt_ids = ids[: len(ids) - n]
            k = len(generated)
            if k >= max_tokens:
                s.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("text_output", np.array([b""], dtype=np.object_)),
                    pb_utils.Tensor("token_ids", np.zeros([0], dtype=np.int64)),
                    pb_utils.Tensor("finish_reason", np.array([b"length"], dtype=np.object_)),
                ]), flags=FINAL)
                return
            while k < max_tokens:
                if s.is_cancelled():
                    s.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        "cancelled", pb_utils.TritonError.CANCELLED)), flags=FINAL)
                    return
                await asyncio.sleep(self.delay)
                tok = fake_token(prompt_ids, seed, k)
                k += 1
                last = k >= max_tokens
                s.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("text_output", np.array([f" w{tok}".encode()], dtype=np.object_)),
                    pb_utils.Tensor("token_ids", np.array([tok], dtype=np.int64)),
                    pb_utils.Tensor("finish_reason", np.array([b"length" if last else b""], dtype=np.object_)),
                ]), flags=FINAL if last else 0)
        except Exception as e:  # a per-request error, never a crashed model
            s.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(repr(e))), flags=FINAL)

    def finalize(self):
        for t in list(self.tasks):
            t.cancel()
        if self.unload_delay:
            import time
            time.sleep(self.unload_delay)
"""


def fake_token(prompt_ids: list[int], seed: int, k: int) -> int:
    """The ``k``-th token the fake model generates (mirrors ``MODEL_PY``)."""
    return (sum(prompt_ids) * 31 + len(prompt_ids) * 7 + seed * 1_000_003 + k * 7919) % 997 + 3


def expected_tokens(prompt: str, n: int, seed: int = 0) -> list[int]:
    """The tokens of an uninterrupted ``n``-token generation for ``prompt``."""
    ids = list(prompt.encode())
    return [fake_token(ids, seed, k) for k in range(n)]


def expected_text(prompt: str, n: int, seed: int = 0) -> str:
    """The text of an uninterrupted ``n``-token generation for ``prompt``."""
    return "".join(f" w{t}" for t in expected_tokens(prompt, n, seed))


def fake_triton_config(
    name: str, *, token_delay_s: float = 0.01, load_delay_s: float = 0.0, unload_delay_s: float = 0.0
) -> dict[str, Any]:
    """A full Triton config for the fake model, with the warmstart backend's inputs and outputs."""
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": [
            {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
            {"name": "stream", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
            {"name": "sampling_parameters", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
            {"name": "exclude_input_in_output", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
            {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1], "optional": True},
            {"name": "num_generated", "data_type": "TYPE_INT64", "dims": [1], "optional": True},
            {"name": "messages", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
        ],
        "output": [
            {"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]},
            {"name": "token_ids", "data_type": "TYPE_INT64", "dims": [-1]},
            {"name": "finish_reason", "data_type": "TYPE_STRING", "dims": [-1]},
        ],
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
        "parameters": {
            "token_delay_s": {"string_value": str(token_delay_s)},
            "load_delay_s": {"string_value": str(load_delay_s)},
            "unload_delay_s": {"string_value": str(unload_delay_s)},
        },
    }


def write_fake_repository(root: Path, names: list[str]) -> Path:
    """A model repository holding the fake model under each of ``names`` (``<name>/1/model.py``)."""
    for name in names:
        version = root / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        (version / "model.py").write_text(MODEL_PY)
        (root / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\n')
    return root


def config_json(name: str, **kw: Any) -> str:
    """:func:`fake_triton_config` as JSON."""
    return json.dumps(fake_triton_config(name, **kw))
