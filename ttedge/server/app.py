"""The OpenAI-compatible HTTP API over one loaded engine.

The server validates, tokenizes and renders; everything about generation is the engine's, reached
through :class:`AsyncEngine`. Refusals are decided before the response starts, so a request gets a
proper 4xx even when it asked for a stream.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import ttedge
from ttedge.bootstrap import LoadedEngine
from ttedge.collab.strategies import Strategy
from ttedge.config import ServerSettings
from ttedge.engine.engine import QueueFull, RequestRejected, StrategyUnavailable
from ttedge.engine.sampling import SamplingError, SamplingParams
from ttedge.server.async_engine import AsyncEngine, EngineFailure, EngineStopped, RequestStream
from ttedge.server.errors import APIError, for_status, from_validation
from ttedge.server.metrics import Metrics, RequestTracker
from ttedge.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerationRequest,
    ModelInfo,
    ModelList,
)
from ttedge.server.render import ChatRenderer, CompletionRenderer, Renderer
from ttedge.tokenizer import TokenizerError

log = logging.getLogger(__name__)

# How long a client refused for a full queue should wait: about the time a batch slot takes to free
# up at edge-server rates; clients back off further on repeated refusals.
_RETRY_AFTER_SECONDS = 1

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Malformed request, or prompt + max_tokens beyond the context"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Queue full; retry after Retry-After seconds"),
        (500, "The engine failed while generating"),
        (503, "The server is shutting down"),
    )
}
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The whole response, or with `stream: true` server-sent events of chunks ending "
        "with `data: [DONE]`",
        "content": {"text/event-stream": {}},
    },
    **_ERROR_RESPONSES,
}


class Service:
    """What the routes share: the model's identity and limits, the engine bridge, metrics, draining."""

    def __init__(self, loaded: LoadedEngine, settings: ServerSettings):
        self.settings = settings
        self.tokenizer = loaded.tokenizer
        path = loaded.checkpoint.path
        self.model_id = loaded.card.id if loaded.card else path.stem
        names = {self.model_id, path.name, path.stem, *(loaded.card.names if loaded.card else ())}
        self._model_names = {name.lower() for name in names}
        self.max_model_len = loaded.engine.max_sequence_len
        if self.max_model_len < loaded.engine.runner.max_model_len:
            log.warning(
                "the KV cache holds %d tokens, less than the context of %d: requests are limited to %d",
                self.max_model_len,
                loaded.engine.runner.max_model_len,
                self.max_model_len,
            )
        self.created = int(time.time())
        self.engine = AsyncEngine(loaded.engine)
        self.metrics = Metrics(lambda: self.engine.stats)
        self.draining = False

    def check_model(self, name: str | None) -> None:
        if name is not None and name.lower() not in self._model_names:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                code="model_not_found",
                param="model",
            )

    def max_tokens(self, num_prompt: int, requested: int | None, prompt_param: str, limit_param: str) -> int:
        """The generation budget: as requested when prompt + request fit in the context, else refused
        (never silently cut short); all that remains of the context when not given."""
        context = self.max_model_len
        if num_prompt >= context:
            raise APIError(
                400,
                f"the prompt has {num_prompt} tokens but the model's context holds {context}, "
                "leaving no room to generate",
                code="context_length_exceeded",
                param=prompt_param,
            )
        if requested is None:
            return context - num_prompt
        if num_prompt + requested > context:
            raise APIError(
                400,
                f"the model's context holds {context} tokens but {num_prompt + requested} were asked for "
                f"({num_prompt} in the prompt + {requested} {limit_param}); "
                f"shorten the prompt or lower {limit_param}",
                code="context_length_exceeded",
                param=limit_param,
            )
        return requested

    def reject(self, error: APIError) -> JSONResponse:
        self.metrics.rejected.labels(error.detail.code).inc()
        return error.response()

    async def drain(self) -> None:
        """Refuse new requests from now on and wait (bounded) for those in flight to finish."""
        self.draining = True
        log.warning("draining: refusing new requests, waiting for those in flight")
        if not await self.engine.wait_idle(self.settings.drain_timeout):
            log.warning("requests still in flight after %.0f s; stopping anyway", self.settings.drain_timeout)


def create_app(loaded: LoadedEngine, settings: ServerSettings) -> FastAPI:
    service = Service(loaded, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.engine.start()
        yield
        # In a thread: joining the engine waits out its current step, which must not block the loop.
        await asyncio.to_thread(service.engine.stop)

    app = FastAPI(
        title="ttedge",
        version=ttedge.__version__,
        description="OpenAI-compatible completions and chat completions over one model. "
        "With an API key configured, /v1 routes need `Authorization: Bearer <key>`.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_Gate, service=service)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> Response:
        # A failure after admission ended a request the metrics already track; the rest are refusals.
        return error.response() if error.status == 500 else service.reject(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        return service.reject(from_validation(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        return service.reject(
            for_status(error.status_code, str(error.detail), request.method, request.url.path)
        )

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception) -> Response:
        # The exception goes on to uvicorn after this response, which logs its traceback.
        return APIError(500, "internal server error", type="server_error", code="internal_error").response()

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=_GENERATION_RESPONSES,
        summary="Complete a prompt (text or token ids)",
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        service.check_model(body.model)
        prompt_ids = service.tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        max_tokens = service.max_tokens(len(prompt_ids), body.max_tokens, "prompt", "max_tokens")
        renderer = CompletionRenderer(
            f"cmpl-{uuid.uuid4().hex}", service.model_id, service.tokenizer, body.logprobs is not None
        )
        params = _sampling_params(body, max_tokens, body.logprobs)
        return await _generate(request, service, body, prompt_ids, params, renderer, arrival, "prompt")

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=_GENERATION_RESPONSES,
        summary="Answer a conversation, formatted with the model's chat template",
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        service.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(
                400, "top_logprobs needs logprobs: true", code="invalid_value", param="top_logprobs"
            )
        # Templates know system, user and assistant; OpenAI's newer "developer" role is the system one.
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages
        ]
        try:
            prompt = service.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except (TokenizerError, jinja2.TemplateError) as error:
            raise APIError(
                400,
                f"the chat template refused the conversation: {error}",
                code="invalid_value",
                param="messages",
            ) from error
        prompt_ids = service.tokenizer.encode(prompt, add_bos=False)
        limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = service.max_tokens(len(prompt_ids), requested, "messages", limit_param)
        renderer = ChatRenderer(
            f"chatcmpl-{uuid.uuid4().hex}", service.model_id, service.tokenizer, body.logprobs
        )
        params = _sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        return await _generate(request, service, body, prompt_ids, params, renderer, arrival, "messages")

    @app.get("/v1/models", response_model=ModelList, responses=_ERROR_RESPONSES, summary="The served model")
    async def models() -> ModelList:
        return ModelList(data=[_model_info(service)])

    @app.get("/v1/models/{model:path}", response_model=ModelInfo, responses=_ERROR_RESPONSES)
    async def model(model: str) -> ModelInfo:
        service.check_model(model)
        return _model_info(service)

    @app.get("/health", summary="200 while serving; 503 while draining or when the engine stopped")
    async def health() -> JSONResponse:
        if service.draining or not service.engine.running:
            return JSONResponse({"status": "draining" if service.draining else "engine stopped"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    return app


def _model_info(service: Service) -> ModelInfo:
    return ModelInfo(id=service.model_id, created=service.created, max_model_len=service.max_model_len)


def _sampling_params(body: GenerationRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k or 0,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stop_strings,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )
    except SamplingError as error:
        raise APIError(400, str(error), code="invalid_value") from error


async def _generate(
    request: Request,
    service: Service,
    body: GenerationRequest,
    prompt_ids: list[int],
    params: SamplingParams,
    renderer: Renderer,
    arrival: float,
    prompt_param: str,
) -> Response:
    try:
        strategy = None if body.strategy is None else Strategy(body.strategy)
        stream = await service.engine.submit(prompt_ids, params, renderer.request_id, strategy)
    except StrategyUnavailable as error:
        raise APIError(400, str(error), code="invalid_value", param="strategy") from error
    except RequestRejected as error:
        raise APIError(400, str(error), code="invalid_prompt", param=prompt_param) from error
    except QueueFull as error:
        raise APIError(
            429,
            f"the server is at capacity: {error}; retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(_RETRY_AFTER_SECONDS)},
        ) from error
    except EngineStopped as error:
        raise _unavailable() from error
    tracker = RequestTracker(service.metrics, arrival, len(prompt_ids))
    if body.stream:
        return _EventStream(_events(stream, renderer, tracker, body.include_usage), stream, tracker)
    return await _complete(request, stream, renderer, tracker)


async def _events(
    stream: RequestStream, renderer: Renderer, tracker: RequestTracker, include_usage: bool
) -> AsyncGenerator[str, None]:
    reason = "abort"  # unless the stream ends: the client went away
    try:
        for opening in renderer.opening_chunks():
            yield _event(opening)
        async for timed in stream:
            tracker.observe(timed)
            chunk = renderer.add(timed.output)
            if chunk is not None:
                yield _event(chunk)
        reason = renderer.finish_reason or "stop"
        if include_usage:
            yield _event(renderer.usage_chunk())
    except (EngineFailure, EngineStopped) as error:
        # The status line went out with the first chunk; the error travels as an event, as OpenAI's does.
        reason = "error"
        yield _event(_engine_error(error).body())
    finally:
        stream.abort()  # frees the sequence at once if the client left mid-stream; no-op when it finished
        tracker.finish(reason)
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that abort their request the moment the response ends unfinished: the
    generator's own cleanup runs only if it started and only when it is collected, while a client
    can disconnect before the first event."""

    def __init__(self, events: AsyncGenerator[str, None], stream: RequestStream, tracker: RequestTracker):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events = events
        self._stream = stream
        self._tracker = tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            self._stream.abort()  # both no-ops when the generator saw the request to its end
            self._tracker.finish("abort")


async def _complete(
    request: Request, stream: RequestStream, renderer: Renderer, tracker: RequestTracker
) -> Response:
    async def consume() -> None:
        async for timed in stream:
            tracker.observe(timed)
            renderer.add(timed.output)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_disconnected(request))
    reason = "abort"
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not consumer.done():
            # Nobody is waiting for the answer any more; the empty response goes nowhere.
            return Response(status_code=499)
        try:
            consumer.result()
        except (EngineFailure, EngineStopped) as error:
            reason = "error"
            raise _engine_error(error) from error
        reason = renderer.finish_reason or "stop"
        return Response(renderer.response().model_dump_json(), media_type="application/json")
    finally:
        watcher.cancel()
        consumer.cancel()
        stream.abort()
        tracker.finish(reason)


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next message the server delivers is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _engine_error(error: Exception) -> APIError:
    if isinstance(error, EngineStopped):
        return _unavailable()
    return APIError(500, str(error), type="server_error", code="engine_error")


def _unavailable() -> APIError:
    return APIError(
        503,
        "the server is shutting down; retry on another instance",
        type="service_unavailable",
        code="server_shutting_down",
        headers={"Connection": "close"},
    )


def _event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


class _Gate:
    """Checks made before FastAPI parses anything: draining, the API key, the body size.

    The body is read here in full (the size limit keeps it small) and replayed to the app, so that an
    oversized request is refused after reading at most the limit.
    """

    def __init__(self, app: ASGIApp, service: Service):
        self.app = app
        self.service = service
        key = service.settings.api_key
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check(scope)
        body: bytes | None = b""
        if error is None:
            body, error = await self._read_body(scope, receive)
        if error is not None:
            await self.service.reject(error)(scope, receive, send)
            return
        if body is None:  # the client left before sending its whole request
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _check(self, scope: Scope) -> APIError | None:
        path: str = scope["path"]
        if self.service.draining and path not in ("/health", "/metrics"):
            return _unavailable()
        if self._expected is not None and path.startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                return APIError(
                    401,
                    "missing or wrong API key; send the header `Authorization: Bearer <key>`",
                    type="authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes | None, APIError | None]:
        limit = self.service.settings.max_body_bytes
        too_large = APIError(
            413,
            f"the request body exceeds {limit} bytes",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b"", too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return b"", too_large
            if not message.get("more_body", False):
                return b"".join(chunks), None
