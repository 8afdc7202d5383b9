"""The scheduler's gRPC front end: the KServe v2 service Triton implements, served with ``grpc.aio``.

ModelStreamInfer multiplexes many generations on one stream (matched by request id, as Triton does);
ServerLive/Ready, ModelReady, ServerMetadata, ModelMetadata, ModelConfig and RepositoryIndex answer for
the models the scheduler deploys. Unary ModelInfer is refused like Triton refuses it for decoupled models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from warmstart.errors import WarmstartError
from warmstart.names import validate_model_name
from warmstart.scheduler.protocol import (
    BadRequest,
    coerce_sampling,
    model_metadata,
    sampling_from_json,
    status_of,
)
from warmstart.scheduler.router import Router
from warmstart.scheduler.upstream import TokenChunk

logger = logging.getLogger(__name__)


def _bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _decode_bytes(name: str, raw: bytes) -> list[bytes]:
    """A raw BYTES tensor (each element a little-endian uint32 length, then its bytes); BadRequest if torn."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadRequest(f"input {name!r}: raw BYTES contents end inside an element's length prefix")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise BadRequest(f"input {name!r}: a raw BYTES element says {n} bytes but fewer follow")
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


# the inputs the scheduler reads, with their datatype; each holds exactly one element
_INPUT_TYPES = {
    "text_input": "BYTES",
    "sampling_parameters": "BYTES",
    "stream": "BOOL",
    "exclude_input_in_output": "BOOL",
}


MAX_RESUME_TOKENS = 1 << 20  # a generated_ids input longer than this is refused


def _generated_ids(t: Any, data: bytes | None) -> tuple[int, ...]:
    """The ``generated_ids`` input: the token ids a client already received of this generation (INT64 [n]),
    sent to resume it through this scheduler after the one serving it went away."""
    if t.datatype != "INT64":
        raise BadRequest(f"input 'generated_ids' must be INT64, got datatype {t.datatype[:16]!r}")
    shape = list(t.shape)
    if len(shape) != 1 or shape[0] < 0 or shape[0] > MAX_RESUME_TOKENS:
        raise BadRequest(
            f"input 'generated_ids' must have shape [n] (n <= {MAX_RESUME_TOKENS}), got {shape[:8]}"
        )
    if data is not None:
        if len(data) != 8 * shape[0]:
            raise BadRequest(
                f"input 'generated_ids': {len(data)} raw bytes for shape {shape} (8 bytes per id)"
            )
        ids = tuple(int(x) for x in np.frombuffer(data, dtype="<i8"))
    else:
        ids = tuple(int(x) for x in t.contents.int64_contents)
        if len(ids) != shape[0]:
            raise BadRequest(f"input 'generated_ids' holds {len(ids)} ids for shape {shape}")
    if any(i < 0 for i in ids):
        raise BadRequest("input 'generated_ids': token ids are >= 0")
    return ids


def _inputs(req: pb.ModelInferRequest) -> dict[str, Any]:
    """Input tensors by name, as bytes (BYTES) or bool (BOOL), from raw or typed contents.

    Each must be one of :data:`_INPUT_TYPES` with that datatype, appear once, and hold exactly one element
    (the scheduler serves one prompt per request); anything else is a BadRequest naming the input. The one
    exception is ``generated_ids`` (INT64 [n]), the tokens of a generation a client resumes here.
    """
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise BadRequest(
            f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs: give one per input, or none"
        )
    out: dict[str, Any] = {}
    for i, t in enumerate(req.inputs):
        if t.name == "generated_ids":
            if t.name in out:
                raise BadRequest("input 'generated_ids' is given twice")
            out[t.name] = _generated_ids(t, raw[i] if raw else None)
            continue
        expected = _INPUT_TYPES.get(t.name)
        if expected is None:
            raise BadRequest(
                f"input {t.name[:64]!r} is not accepted by the scheduler; inputs: {', '.join(_INPUT_TYPES)}, "
                "generated_ids (input_ids/num_generated are the scheduler's own, for resuming on a server)"
            )
        if t.datatype != expected:
            raise BadRequest(f"input {t.name!r} must be {expected}, got datatype {t.datatype[:16]!r}")
        if t.name in out:
            raise BadRequest(f"input {t.name!r} is given twice")
        data = raw[i] if raw else None
        values: list[Any]
        if expected == "BYTES":
            values = (
                _decode_bytes(t.name, data)
                if data is not None
                else [bytes(b) for b in t.contents.bytes_contents]
            )
        elif data is not None:
            values = [bool(x) for x in np.frombuffer(data, dtype=np.uint8)]
        else:
            values = list(t.contents.bool_contents)
        if len(values) != 1:
            raise BadRequest(
                f"input {t.name!r} must hold exactly one element, got {len(values)}: the scheduler serves one "
                "prompt per request (send one request per prompt)"
            )
        shape = list(t.shape)
        if math.prod(shape) != 1 or any(d < 0 for d in shape):
            raise BadRequest(f"input {t.name!r} has shape {shape[:8]}; it must hold one element ([1])")
        out[t.name] = values[0]
    return out


def _param(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _response(
    req: pb.ModelInferRequest, model: str, chunk: TokenChunk, text: str, *, final_flag: bool | None
) -> pb.ModelStreamInferResponse:
    r = pb.ModelInferResponse(model_name=model, model_version="1", id=req.id)
    outputs: list[tuple[str, str, list[int], bytes]] = [
        ("text_output", "BYTES", [1], _bytes_tensor([text.encode()])),
        ("token_ids", "INT64", [len(chunk.token_ids)], np.asarray(chunk.token_ids, dtype=np.int64).tobytes()),
    ]
    if chunk.finish_reason:
        outputs.append(("finish_reason", "BYTES", [1], _bytes_tensor([chunk.finish_reason.encode()])))
    for name in ("prompt_tokens", "stop_token_id"):  # the backend's outputs of its last response
        if (value := getattr(chunk, name)) is not None:
            outputs.append((name, "INT64", [1], np.asarray([value], dtype=np.int64).tobytes()))
    for name, dtype, shape, data in outputs:
        t = r.outputs.add()
        t.name, t.datatype = name, dtype
        t.shape.extend(shape)
        r.raw_output_contents.append(data)
    if final_flag is not None:
        r.parameters["triton_final_response"].bool_param = final_flag
    return pb.ModelStreamInferResponse(infer_response=r)


class GrpcFrontend(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 gRPC service over a :class:`Router`."""

    def __init__(self, router: Router) -> None:
        self.router = router

    # -- health and metadata ----------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=any(rt.healthy for rt in self.router.servers.values()))

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="warmstart-scheduler", version="0.1.0", extensions=["generate"])

    async def _abort(self, context: Any, error: BaseException) -> None:
        await context.abort(getattr(grpc.StatusCode, status_of(error).grpc), str(error))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        try:
            self.router.model_config(request.name)
        except WarmstartError as e:  # SchedulerError, and the shared InvalidModelName
            if status_of(e).http == 404:
                return pb.ModelReadyResponse(ready=False)
            await self._abort(context, e)
        return pb.ModelReadyResponse(ready=any(rt.healthy for rt in self.router.servers.values()))

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        try:
            meta = model_metadata(self.router.model_config(request.name))
        except WarmstartError as e:  # SchedulerError, and the shared InvalidModelName
            await self._abort(context, e)
            raise
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:  # noqa: N802
        try:
            model = self.router.model_config(request.name)
            rendered = dict(self.router.rendered_config(model))
        except WarmstartError as e:  # SchedulerError, and the shared InvalidModelName
            await self._abort(context, e)
            raise
        config = json_format.ParseDict(rendered, mc.ModelConfig(), ignore_unknown_fields=True)
        return pb.ModelConfigResponse(config=config)

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in self.router.repository_index()]
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "ModelInfer RPC doesn't support models with decoupled transaction policy; use ModelStreamInfer",
        )
        raise AssertionError("unreachable")

    # -- streaming ----------------------------------------------------------------------------------------
    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        reading_done = asyncio.Event()

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            out.put_nowait(None)

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    task = asyncio.create_task(self._serve(req, out))
                    tasks.add(task)
                    task.add_done_callback(finished)
            finally:
                reading_done.set()
                out.put_nowait(None)

        reader_task = asyncio.create_task(reader())
        try:
            while True:
                item = await out.get()
                if item is not None:
                    yield item
                elif reading_done.is_set() and not tasks and out.empty():
                    return
        finally:
            reader_task.cancel()
            for t in list(tasks):
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(reader_task, *tasks, return_exceptions=True)

    async def _serve(
        self, req: pb.ModelInferRequest, out: asyncio.Queue[pb.ModelStreamInferResponse | None]
    ) -> None:
        """One generation on a multiplexed stream: responses (or one error) go to ``out``."""
        try:
            model = validate_model_name(req.model_name)
            inputs = _inputs(req)
            params = {k: _param(v) for k, v in req.parameters.items()}
            empty_final = bool(params.pop("triton_enable_empty_final_response", False))
            prompt = inputs.get("text_input")
            if not isinstance(prompt, bytes):
                raise BadRequest("text_input (BYTES) is required")
            try:
                prompt_text = prompt.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRequest(f"text_input is not valid UTF-8: {e}") from None
            sampling: dict[str, Any] = {}
            if "sampling_parameters" in inputs:
                sampling.update(sampling_from_json(inputs["sampling_parameters"]))
            sampling.update(coerce_sampling(params, strict=False))
            stream = bool(inputs.get("stream", False))
            exclude = bool(inputs.get("exclude_input_in_output", False))
            if "generated_ids" in inputs and not stream:
                raise BadRequest("generated_ids resumes a stream: send it with stream=true")
            gen = self.router.new_generation(
                model, prompt_text, sampling, request_id=req.id or None, generated=inputs.get("generated_ids")
            )
            async with contextlib.aclosing(self.router.stream(gen)) as it:
                if stream:
                    async for chunk in it:
                        empty = not chunk.text and not chunk.token_ids and not chunk.finish_reason
                        if chunk.final and empty and not empty_final:
                            continue
                        out.put_nowait(
                            _response(
                                req, model, chunk, chunk.text, final_flag=chunk.final if empty_final else None
                            )
                        )
                else:
                    async for _ in it:
                        pass
                    text = "".join(gen.text)
                    whole = TokenChunk(
                        text,
                        tuple(gen.tokens),
                        gen.finish_reason,
                        True,
                        prompt_tokens=gen.prompt_tokens,
                        stop_token_id=gen.stop_token_id,
                    )
                    out.put_nowait(
                        _response(
                            req,
                            model,
                            whole,
                            text if exclude else gen.prompt + text,
                            final_flag=True if empty_final else None,
                        )
                    )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not isinstance(e, WarmstartError) and status_of(e).grpc in ("INTERNAL", "UNKNOWN"):
                logger.exception("stream request %s failed", req.id)
                message = f"internal error: {e!r}"
            else:  # SchedulerError, the shared InvalidModelName, and a plain ValueError (bad input)
                logger.info("stream request %s failed: %s", req.id, e)
                message = str(e)
            out.put_nowait(
                pb.ModelStreamInferResponse(
                    error_message=message, infer_response=pb.ModelInferResponse(id=req.id)
                )
            )


def add_to_server(server: grpc.aio.Server, router: Router) -> GrpcFrontend:
    """Register the KServe v2 service for ``router`` on ``server``."""
    frontend = GrpcFrontend(router)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(frontend, server)
    return frontend


__all__ = ["GrpcFrontend", "add_to_server"]
