"""The scheduler's HTTP front end (aiohttp): KServe v2 health, metadata and generate endpoints as Triton
serves them, OpenAI-compatible completions, and the token-protected admin API.

Every model name is checked against the allow-list before anything else happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from warmstart.errors import WarmstartError
from warmstart.names import validate_model_name
from warmstart.scheduler.config import AdapterConfig, ModelConfig, SchedulerConfigError, ServerConfig
from warmstart.scheduler.errors import (
    MigrationError,
    RequestBodyTimeout,
    RequestBodyTooLarge,
    UnknownModelError,
    UnknownServerError,
)
from warmstart.scheduler.metrics import metrics_endpoint, response_counter
from warmstart.scheduler.openai_compat import (
    OpenAIRequest,
    completion_response,
    parse_chat,
    parse_completion,
    stream_chunk,
    usage_chunk,
)
from warmstart.scheduler.protocol import (
    BadRequest,
    coerce_sampling,
    model_metadata,
    parse_json_object,
    sampling_from_json,
    status_of,
)
from warmstart.scheduler.router import (
    DuplicateModelError,
    DuplicateServerError,
    Generation,
    Router,
    UnknownGenerationError,
)
from warmstart.scheduler.upstream import TokenChunk

logger = logging.getLogger(__name__)

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
MAX_BODY_BYTES = 8 << 20  # default of the config's max_request_body_bytes
BODY_TIMEOUT_S = 30.0  # default of the config's request_body_timeout_s
_BODY_LIMITS = web.AppKey("body_limits", tuple)  # (max bytes, read deadline in seconds)


def _message(error: BaseException) -> str:
    """What a client is told about ``error``: its message, unless it is a bug (logged, not shown)."""
    if isinstance(error, WarmstartError) or status_of(error).http < 500:
        return str(error)
    logger.error("request failed unexpectedly", exc_info=error)
    return f"internal error ({type(error).__name__}); the scheduler log has the details"


def _openai_error_body(error: BaseException) -> dict[str, Any]:
    """OpenAI's error object (what its client reads ``message`` and ``type`` from)."""
    status = status_of(error).http
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": _message(error), "type": kind, "param": None, "code": status}}


def _openai_error(error: BaseException) -> web.Response:
    return _closing_after_body_error(
        web.json_response(_openai_error_body(error), status=status_of(error).http), error
    )


def _sse_event(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def _closing_after_body_error(resp: web.Response, error: BaseException) -> web.Response:
    if isinstance(error, (RequestBodyTooLarge, RequestBodyTimeout)):
        resp.force_close()  # the rest of the body may still come: never read it as a next request
    return resp


def _error(error: BaseException) -> web.Response:
    return _closing_after_body_error(
        web.json_response({"error": _message(error)}, status=status_of(error).http), error
    )


@web.middleware
async def _errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Any exception a handler lets out becomes a JSON error with its status (a ValueError is a 400)."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as e:
        return _error(e)


async def _read_body(request: web.Request) -> bytes:
    """The request body, bounded in size (413) and in time (408): see ``max_request_body_bytes``."""
    max_bytes, timeout_s = request.app[_BODY_LIMITS]
    too_large = (
        f"the request body is larger than {max_bytes} bytes (the scheduler's max_request_body_bytes); "
        "send a smaller one"
    )
    if request.content_length is not None and request.content_length > max_bytes:
        raise RequestBodyTooLarge(too_large)
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise RequestBodyTimeout(
            f"the request body did not arrive within {timeout_s:g} s (the scheduler's request_body_timeout_s);"
            " send the whole body, as many bytes as Content-Length says"
        ) from None
    except web.HTTPRequestEntityTooLarge:  # a chunked body past client_max_size
        raise RequestBodyTooLarge(too_large) from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    return parse_json_object(await _read_body(request), "the request body")


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {json.dumps(value)[:60]}")
    return value


def _model_from_path(request: web.Request) -> str:
    segments = request.raw_path.split("?", 1)[0].split("/")  # ["", "v2", "models", <raw name>, ...]
    if len(segments) < 4:
        raise BadRequest("no model name in the path")
    validate_model_name(segments[3])  # the name as sent, before any percent-decoding
    return validate_model_name(request.match_info["model"])


async def _first(it: AsyncIterator[TokenChunk]) -> TokenChunk | None:
    """The first chunk (so errors surface before the response status is sent); None if none."""
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _chunks(first: TokenChunk | None, it: AsyncIterator[TokenChunk]) -> AsyncIterator[TokenChunk]:
    if first is not None:
        yield first
        async for c in it:
            yield c


class HttpFrontend:
    """Builds the aiohttp application around a :class:`Router`."""

    def __init__(
        self,
        router: Router,
        *,
        admin_token: str | None,
        max_body_bytes: int = MAX_BODY_BYTES,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self.router = router
        self._admin_token = admin_token
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[_errors_as_json])
        self.app[_BODY_LIMITS] = (max_body_bytes, body_timeout_s)
        r = self.app.router
        self.app.middlewares.insert(0, response_counter(router.metrics))  # outermost: sees every answer
        r.add_get("/metrics", self.metrics)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/models/{model}", self.metadata)
        r.add_get("/v2/models/{model}/ready", self.model_ready)
        r.add_get("/v2/models/{model}/config", self.model_config)
        r.add_post("/v2/models/{model}/generate", self.generate)
        r.add_post("/v2/models/{model}/generate_stream", self.generate_stream)
        r.add_post("/v2/models/{model}/versions/{version}/generate", self.generate)
        r.add_post("/v2/models/{model}/versions/{version}/generate_stream", self.generate_stream)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_get("/v1/models", self.openai_models)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_get("/admin/v1/state", self._admin(self.admin_state))
        r.add_post("/admin/v1/models", self._admin(self.admin_add_model))
        r.add_delete("/admin/v1/models/{name}", self._admin(self.admin_remove_model))
        r.add_post("/admin/v1/models/{name}/adapters", self._admin(self.admin_add_adapter))
        r.add_delete("/admin/v1/models/{name}/adapters/{adapter}", self._admin(self.admin_remove_adapter))
        r.add_post("/admin/v1/servers", self._admin(self.admin_add_server))
        r.add_delete("/admin/v1/servers/{name}", self._admin(self.admin_remove_server))
        r.add_post("/admin/v1/migrate", self._admin(self.admin_migrate))
        r.add_post("/admin/v1/servers/{name}/models/{model}/load", self._admin(self.admin_load))

    # -- health and metadata ------------------------------------------------------------------------------
    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text exposition of the scheduler's metrics (unauthenticated, like Triton's)."""
        return await metrics_endpoint(self.router.metrics)

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        healthy = any(rt.healthy for rt in self.router.servers.values())
        return web.Response(status=200 if healthy else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "warmstart-scheduler", "version": "0.1.0", "extensions": ["generate"]}
        )

    async def metadata(self, request: web.Request) -> web.Response:
        try:
            model = self.router.model_config(_model_from_path(request))
        except WarmstartError as e:  # SchedulerError, and the shared InvalidModelName
            return _error(e)
        return web.json_response(model_metadata(model))

    async def model_config(self, request: web.Request) -> web.Response:
        try:
            model = self.router.model_config(_model_from_path(request))
            return web.json_response(dict(self.router.rendered_config(model)))
        except WarmstartError as e:  # SchedulerError, and the shared InvalidModelName
            return _error(e)

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            self.router.model_config(_model_from_path(request))
        except WarmstartError as e:  # SchedulerError, and the shared InvalidModelName
            return _error(e)
        healthy = any(rt.healthy for rt in self.router.servers.values())
        return web.Response(status=200 if healthy else 400)

    async def repository_index(self, request: web.Request) -> web.Response:
        return web.json_response(self.router.repository_index())

    # -- KServe generate ------------------------------------------------------------------------------------
    def _generation(self, model: str, body: dict[str, Any]) -> tuple[Generation, bool]:
        prompt = body.get("text_input")
        if isinstance(prompt, list):  # a [1]-shaped tensor, as Triton reads JSON arrays
            if len(prompt) != 1:
                raise BadRequest(
                    f"text_input must be one string, got a list of {len(prompt)}: the scheduler serves one "
                    "prompt per request (send one request per prompt)"
                )
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("text_input must be a string (or a list of one string)")
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest("parameters must be an object")
        sampling: dict[str, Any] = {}
        if "sampling_parameters" in body:
            sp = body["sampling_parameters"]
            if isinstance(sp, str):
                sampling.update(sampling_from_json(sp))
            elif isinstance(sp, dict):
                sampling.update(coerce_sampling(sp, strict=True))
            else:
                raise BadRequest("sampling_parameters must be a JSON object (or a string holding one)")
        sampling.update(coerce_sampling(body, strict=False))
        sampling.update(coerce_sampling(params, strict=False))
        exclude = _flag(
            "exclude_input_in_output",
            params.get("exclude_input_in_output", body.get("exclude_input_in_output", False)),
        )
        request_id = body.get("id")
        if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= 256):
            raise BadRequest("id must be a string of at most 256 characters")
        gen = self.router.new_generation(model, prompt, sampling, request_id=request_id or None)
        return gen, exclude

    def _event(self, gen: Generation, chunk: TokenChunk, request_id: Any) -> dict[str, Any]:
        event: dict[str, Any] = {
            "model_name": gen.model,
            "model_version": "1",
            "text_output": chunk.text,
            "token_ids": list(chunk.token_ids),
        }
        if chunk.finish_reason:
            event["finish_reason"] = chunk.finish_reason
        for key in ("prompt_tokens", "stop_token_id"):  # the backend's outputs of its last response
            if (value := getattr(chunk, key)) is not None:
                event[key] = value
        if request_id is not None:
            event["id"] = request_id
        return event

    async def generate(self, request: web.Request) -> web.Response:
        try:
            model = _model_from_path(request)
            body = await _json_body(request)
            gen, exclude = self._generation(model, body)
            async with contextlib.aclosing(self.router.stream(gen)) as it:
                async for _ in it:
                    pass
        except WarmstartError as e:  # SchedulerError, and the shared InvalidModelName
            return _error(e)
        text = "".join(gen.text)
        out: dict[str, Any] = {
            "model_name": gen.model,
            "model_version": "1",
            "text_output": text if exclude else gen.prompt + text,
            "token_ids": list(gen.tokens),
        }
        if gen.finish_reason:
            out["finish_reason"] = gen.finish_reason
        for key in ("prompt_tokens", "stop_token_id"):  # the backend's outputs of its last response
            if (value := getattr(gen, key)) is not None:
                out[key] = value
        if body.get("id") is not None:
            out["id"] = body["id"]
        return web.json_response(out)

    async def _sse(
        self,
        request: web.Request,
        it: AsyncIterator[TokenChunk],
        render: Callable[[TokenChunk], dict[str, Any] | None],
        done: str | None = None,
    ) -> web.StreamResponse:
        """Send the first chunk's error as a plain status, then stream events."""
        try:
            first = await _first(it)
        except Exception as e:  # SchedulerError, the shared InvalidModelName; anything else is logged
            status = status_of(e).http
            return web.Response(
                status=status, text=f"data: {json.dumps({'error': _message(e)})}\n\n", headers=_SSE_HEADERS
            )
        resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        await resp.prepare(request)
        try:
            async for chunk in _chunks(first, it):
                event = render(chunk)
                if event is not None:
                    await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        except ConnectionResetError:
            logger.debug("client went away mid-stream")
            return resp
        except Exception as e:  # SchedulerError, the shared InvalidModelName; anything else is logged
            await resp.write(f"data: {json.dumps({'error': _message(e)})}\n\n".encode())
        if done is not None:
            await resp.write(f"data: {done}\n\n".encode())
        await resp.write_eof()
        return resp

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        try:
            model = _model_from_path(request)
            body = await _json_body(request)
            gen, _ = self._generation(model, body)
        except WarmstartError as e:  # SchedulerError, and the shared InvalidModelName
            return _error(e)
        request_id = body.get("id")
        async with contextlib.aclosing(self.router.stream(gen)) as it:

            def render(chunk: TokenChunk) -> dict[str, Any] | None:
                if chunk.final and not chunk.text and not chunk.token_ids and not chunk.finish_reason:
                    return None
                return self._event(gen, chunk, request_id)

            return await self._sse(request, it, render)

    # -- OpenAI-compatible -----------------------------------------------------------------------------------
    async def openai_models(self, request: web.Request) -> web.Response:
        """Every model, then each LoRA adapter as ``<base><lora_separator><adapter>`` with its base as ``parent``
        and ``root`` (vLLM lists adapters with their base as ``parent``)."""
        sep = self.router.config.lora_separator
        data: list[dict[str, Any]] = []
        for name, model in sorted(self.router.models.items()):
            data.append(
                {"id": name, "object": "model", "owned_by": "warmstart", "root": name, "parent": None}
            )
            for adapter in sorted(model.adapters or {}):
                data.append(
                    {
                        "id": f"{name}{sep}{adapter}",
                        "object": "model",
                        "owned_by": "warmstart",
                        "root": name,
                        "parent": name,
                    }
                )
        return web.json_response({"object": "list", "data": data})

    def _openai_generation(self, req: OpenAIRequest) -> Generation:
        base, adapter = self.router.resolve_model(req.model)  # a model, or <base><separator><adapter>
        return self.router.new_generation(
            base, req.prompt, req.sampling, prompt_ids=req.prompt_ids, messages=req.messages, adapter=adapter
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            req = parse_completion(await _json_body(request))
            gen = self._openai_generation(req)
        except Exception as e:  # a 4xx for bad input (ValueError included), logged 500 otherwise
            return _openai_error(e)
        return await self._openai(request, req, gen)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _json_body(request)
            base, _ = self.router.resolve_model(validate_model_name(body.get("model")))
            req = parse_chat(body, default_max_tokens=self.router.model_config(base).max_tokens)
            gen = self._openai_generation(req)
        except Exception as e:  # a 4xx for bad input (ValueError included), logged 500 otherwise
            return _openai_error(e)
        return await self._openai(request, req, gen)

    async def _openai(self, request: web.Request, req: OpenAIRequest, gen: Generation) -> web.StreamResponse:
        cid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        async with contextlib.aclosing(self.router.stream(gen)) as it:
            if not req.stream:
                try:
                    async for _ in it:
                        pass
                except Exception as e:  # a 4xx for bad input, logged 500 otherwise
                    return _openai_error(e)
                return web.json_response(
                    completion_response(
                        req,
                        cid=cid,
                        created=created,
                        text="".join(gen.text),
                        finish_reason=gen.finish_reason,
                        stop_token_id=gen.stop_token_id,
                        prompt_tokens=gen.prompt_tokens,
                        completion_tokens=len(gen.tokens),
                    )
                )
            try:
                first = await _first(it)
            except Exception as e:  # the request failed before anything was streamed: a plain status
                return _openai_error(e)
            resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
            await resp.prepare(request)
            sent = False
            try:
                async for chunk in _chunks(first, it):
                    finish = (gen.finish_reason or "stop") if chunk.final else None
                    if not chunk.text and finish is None:
                        continue
                    event = stream_chunk(
                        req,
                        cid=cid,
                        created=created,
                        text=chunk.text,
                        finish_reason=finish,
                        stop_token_id=gen.stop_token_id,
                        first=not sent,
                    )
                    sent = True
                    await resp.write(_sse_event(event))
                if req.include_usage:
                    usage = usage_chunk(
                        req,
                        cid=cid,
                        created=created,
                        prompt_tokens=gen.prompt_tokens,
                        completion_tokens=len(gen.tokens),
                    )
                    await resp.write(_sse_event(usage))
            except ConnectionResetError:
                logger.debug("client went away mid-stream")
                return resp
            except Exception as e:  # after the status: an error event (OpenAI's shape), then [DONE]
                await resp.write(_sse_event(_openai_error_body(e)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

    # -- admin -----------------------------------------------------------------------------------------------
    def _admin(
        self, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def guarded(request: web.Request) -> web.Response:
            if self._admin_token is None:
                return web.json_response(
                    {"error": "the admin API is disabled (no admin_token configured)"}, status=403
                )
            supplied = request.headers.get("Authorization", "")
            expected = f"Bearer {self._admin_token}"
            if not hmac.compare_digest(supplied.encode(), expected.encode()):
                return web.json_response(
                    {"error": "admin token missing or wrong"},
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            try:
                return await handler(request)
            except (
                SchedulerConfigError,
                BadRequest,
                DuplicateModelError,
                DuplicateServerError,
                TypeError,
            ) as e:
                return web.json_response({"error": str(e)}, status=400)
            except (UnknownModelError, UnknownServerError, UnknownGenerationError) as e:
                return web.json_response({"error": str(e)}, status=404)
            except MigrationError as e:
                return web.json_response({"error": str(e)}, status=409)
            except WarmstartError as e:  # SchedulerError, and the shared InvalidModelName
                return _error(e)

        return guarded

    async def admin_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.router.describe())

    async def admin_add_model(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        name = body.pop("name", None)
        if not isinstance(name, str):
            raise BadRequest("name is required")
        await self.router.add_model(ModelConfig.from_dict(name, body))
        return web.json_response({"added": name}, status=201)

    async def admin_remove_model(self, request: web.Request) -> web.Response:
        name = validate_model_name(request.match_info["name"])
        await self.router.remove_model(name)
        return web.json_response({"removed": name})

    async def admin_add_adapter(self, request: web.Request) -> web.Response:
        """Serve a new LoRA adapter of a model (``{"name", "checkpoint", "size_bytes"?}``) without reloading it:
        the instances loaded now get it at once; ``servers`` says per server whether it took it."""
        model = validate_model_name(request.match_info["name"])
        body = await _json_body(request)
        name = body.pop("name", None)
        if not isinstance(name, str):
            raise BadRequest("name (the adapter's) is required")
        adapter = AdapterConfig.from_value(name, body)
        servers = await self.router.add_adapter(model, adapter)
        return web.json_response({"added": name, "model": model, "servers": servers}, status=201)

    async def admin_remove_adapter(self, request: web.Request) -> web.Response:
        model = validate_model_name(request.match_info["name"])
        adapter = request.match_info["adapter"]
        servers = await self.router.remove_adapter(model, adapter)
        return web.json_response({"removed": adapter, "model": model, "servers": servers})

    async def admin_add_server(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        server = ServerConfig.from_dict(body)
        await self.router.add_server(server)
        return web.json_response({"added": server.name}, status=201)

    async def admin_remove_server(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self.router.remove_server(name)
        return web.json_response({"removed": name})

    async def admin_migrate(self, request: web.Request) -> web.Response:
        """Move one running generation to another server (e.g. to drain a server before maintenance)."""
        body = await _json_body(request)
        gen_id, server = body.get("generation"), body.get("server")
        if not isinstance(gen_id, str) or not isinstance(server, str):
            raise BadRequest("'generation' and 'server' (strings) are required")
        result = await self.router.migrate_generation(gen_id, server)
        return web.json_response(
            {"outcome": result.outcome.value, "rounds": result.rounds, "source_tokens": result.source_tokens}
        )

    async def admin_load(self, request: web.Request) -> web.Response:
        """Load a model on a given server now (pre-warming), evicting idle models if it must."""
        model = validate_model_name(request.match_info["model"])
        server = request.match_info["name"]
        await self.router.preload(server, model)
        return web.json_response({"loaded": model, "server": server})
