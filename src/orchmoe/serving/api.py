"""The HTTP layer: the OpenAI API over a backend (FastAPI; uvicorn runs it). Only checking, formatting and limits.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events in the
OpenAI chunk format with ``stream``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. Every
request is checked against the API key when one is set; bodies over ``max_body_bytes`` are refused
unread (413); a full queue or too many open streams is a 429 with ``Retry-After``; a draining server
answers 503. Errors are OpenAI-style JSON naming the problem; no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchmoe.serving.engine import Overloaded
from orchmoe.serving.metrics import ServerMetrics
from orchmoe.serving.protocol import RequestError, parse_body

__all__ = ["ServerSettings", "create_app"]

log = logging.getLogger("orchmoe.serving")


@dataclass
class ServerSettings:
    """Bounds of the HTTP layer (the engine and request bounds are the backend's)."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_streams: int = 64
    poll_seconds: float = 0.25  # how often a waiting response checks that its client is still there


def _error(e: RequestError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status, headers=headers)


class _State:
    def __init__(self, backend: Any, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.backend, self.settings, self.metrics = backend, settings, metrics
        self.streams = 0
        self.draining = False


def create_app(backend: Any, settings: ServerSettings | None = None, metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI application over ``backend`` (`LocalBackend` or `RouteOnlyBackend`)."""
    settings = settings or ServerSettings()
    metrics = metrics or ServerMetrics()
    state = _State(backend, settings, metrics)
    app = FastAPI(title="orchmoe", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan(state))
    app.state.orchmoe = state
    _add_guards(app, state)
    _add_routes(app, state)
    return app


def _lifespan(state: _State):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.draining = True  # uvicorn has finished the in-flight requests by now
        await state.backend.aclose()

    return lifespan


class _Guard:
    """Pure ASGI middleware (streams pass through untouched): the API key on every request, 503 while
    draining, and the request counts by endpoint and status."""

    def __init__(self, app, state: _State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
        status = [500]

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        key = self.state.settings.api_key
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            if key is not None and not _authorised(headers, key):
                error = RequestError("invalid or missing API key (Authorization: Bearer KEY)", 401)
                await _error(error, {"WWW-Authenticate": "Bearer"})(scope, receive, counted_send)
            elif self.state.draining and endpoint != "/health":
                await _error(RequestError("the server is shutting down", 503), {"Retry-After": "5"})(
                    scope, receive, counted_send
                )
            else:
                await self.app(scope, receive, counted_send)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status[0])).inc()


def _add_guards(app: FastAPI, state: _State) -> None:
    app.add_middleware(_Guard, state=state)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(RequestError(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return _error(exc)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        return _error(RequestError(str(exc), 429, code="overloaded"), headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        e = RequestError(f"internal error ({type(exc).__name__}); the server keeps running", 500)
        e.type = "server_error"
        return _error(e)


def _authorised(headers: dict[str, str], key: str) -> bool:
    given = headers.get("authorization", "")
    token = given[7:].strip() if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
    return hmac.compare_digest(token.encode(), key.encode())


_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body ({declared} bytes) is over the limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is over the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _add_routes(app: FastAPI, state: _State) -> None:
    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", **state.backend.load()}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": m, "object": "model", "created": now, "owned_by": "orchmoe"} for m in state.backend.model_ids()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, state, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _generate(request, state, "chat")


async def _generate(request: Request, state: _State, kind: str) -> Response:
    body = parse_body(await _read_body(request, state.settings.max_body_bytes), kind)
    prepared = await asyncio.to_thread(state.backend.prepare, body)  # tokenising (and routing) off the loop
    if body.stream and state.streams >= state.settings.max_streams:
        raise Overloaded(f"too many open streams ({state.settings.max_streams})")
    stream = await state.backend.open(prepared)
    fmt = _Format(kind, prepared.model_id)
    route = {"x-orchmoe-route": prepared.route_name} if prepared.route_name else {}
    if not body.stream:
        response = await _collect(request, state, stream, fmt)
        response.headers.update(route)
        return response
    usage = bool((body.stream_options or {}).get("include_usage"))
    state.streams += 1
    state.metrics.streams.set(state.streams)
    closed = []

    def cleanup() -> None:  # once, whether the stream ran to its end, broke, or never started
        if not closed:
            closed.append(True)
            stream.close()
            state.streams -= 1
            state.metrics.streams.set(state.streams)

    return _Stream(cleanup, _sse(request, state, stream, fmt, usage, cleanup), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **route})  # fmt: skip


async def _next_or_gone(request: Request, stream, poll: float):
    """The stream's next event, or None once the client has disconnected (checked every ``poll`` seconds)."""
    while True:
        try:
            return await asyncio.wait_for(anext(stream), poll)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None
        except StopAsyncIteration:
            return None


async def _collect(request: Request, state: _State, stream, fmt: _Format) -> Response:
    try:
        while True:
            event = await _next_or_gone(request, stream, state.settings.poll_seconds)
            if event is None:
                return Response(status_code=499)  # the client is gone; nobody reads this
            if event.kind == "done":
                return JSONResponse(fmt.whole(event))
            if event.kind == "error":
                e = RequestError(event.message, 500)
                e.type = "server_error"
                return _error(e)
    finally:
        stream.close()


class _Stream(StreamingResponse):
    """A streaming response that always runs ``cleanup`` (frees the request's row and its stream slot), even
    when the client is gone before the first byte and the body generator never starts."""

    def __init__(self, cleanup, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cleanup()


async def _sse(request: Request, state: _State, stream, fmt: _Format, usage: bool, cleanup):
    try:
        if fmt.chat:
            yield fmt.sse(fmt.chunk("", None, first=True))  # the assistant's role, as OpenAI's first chunk
        while True:
            event = await _next_or_gone(request, stream, state.settings.poll_seconds)
            if event is None:
                return
            if event.kind == "delta":
                yield fmt.sse(fmt.chunk(event.text, None))
            elif event.kind == "done":
                yield fmt.sse(fmt.chunk("", event.finish_reason))
                if usage:
                    yield fmt.sse({**fmt.chunk("", None), "choices": [], "usage": fmt.usage(event)})
                yield "data: [DONE]\n\n"
                return
            else:
                yield fmt.sse(
                    {"error": {"message": event.message, "type": "server_error", "param": None, "code": None}}
                )
                yield "data: [DONE]\n\n"
                return
    finally:
        cleanup()


class _Format:
    """OpenAI response objects: whole completions and stream chunks, text or chat."""

    def __init__(self, kind: str, model_id: str) -> None:
        self.chat = kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.model, self.created = model_id, int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(event) -> dict[str, int]:
        n, m = event.prompt_tokens, event.completion_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def whole(self, event) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": event.text}}
            return {**self._head("chat.completion"), "choices": [{**choice, "finish_reason": event.finish_reason}],
                    "usage": self.usage(event)}  # fmt: skip
        choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(event)}

    def chunk(self, text: str, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}  # fmt: skip
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    @staticmethod
    def sse(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
