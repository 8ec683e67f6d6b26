"""The FastAPI app: routes, the API key, errors in the OpenAI shape, and SSE streaming.

The event loop never runs torch: prompts are tokenized in the thread pool, generations run on
the worker thread (worker.py), and a handler only waits for what its job sends back. A client
that disconnects cancels its job (the worker stops after the current step); while the stream
is quiet (queued, or a long block) an SSE comment goes out now and then, which also finds a
client that has left.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tidecli.decode.diffusion import DecodeSettings
from tidecli.serve.metrics import Metrics
from tidecli.serve.prepare import chat_generation, completion_generation
from tidecli.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    ServeError,
    Shape,
    usage,
    validation_error,
)
from tidecli.serve.worker import Generation, Job, Outcome, Worker

POLL_S = 0.25  # how often a waiting handler checks its client
PING_S = 15.0  # an SSE comment after this long without a chunk
JOIN_S = 120.0  # at shutdown, how long to wait for the current step to end


class CountRequests:
    """ASGI middleware: every HTTP response counted by endpoint and status (streams included)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.request(scope.get("path", ""), status)


class RequireKey:
    """ASGI middleware: every request but /health needs `Authorization: Bearer <key>`, checked
    before anything else is read (a bad body without the key is a 401, not a 400)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        err = ServeError(401, "a valid API key is required (Authorization: Bearer <key>)",
                         type="authentication_error", code="invalid_api_key")
        await JSONResponse(err.body(), status_code=401,
                           headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)

    def _allowed(self, scope: Any) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Any, *, model_name: str, defaults: DecodeSettings,
               api_key: str | None = None, max_queue: int = 16,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The app serving `engine`; its worker starts with the app (lifespan) and ends with it.
    `app.state.worker` and `app.state.metrics` are there for the command and tests."""
    metrics = Metrics()
    worker = Worker(engine, metrics, max_queue=max_queue)
    positions = engine.cfg.max_position_embeddings
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            worker.halt()
            app.state.worker_ended = await asyncio.to_thread(worker.join, JOIN_S)

    app = FastAPI(title="tide", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker, app.state.metrics, app.state.worker_ended = worker, metrics, False
    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: 401s are counted too

    # ---- errors: the OpenAI shape -------------------------------------------------------------

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _serve_error(request, validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return await _serve_error(request, ServeError(exc.status_code, str(exc.detail),
                                                      type=kind))

    # ---- routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        """Open without a key: a readiness probe learns only this."""
        if not worker.ready:
            status = "failed" if worker.failure is not None else "stopping"
            return JSONResponse({"status": status}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_name,
                             "queue_depth": metrics.queue_depth, "running": metrics.running})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "tide",
                                            "max_model_len": positions}]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        gen = await run_in_threadpool(chat_generation, worker, body, defaults)
        return await respond(request, gen, Shape(True, model_name), body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        gen = await run_in_threadpool(completion_generation, worker, body, defaults)
        return await respond(request, gen, Shape(False, model_name), body)

    # ---- answering ----------------------------------------------------------------------------

    async def respond(request: Request, gen: Generation, shape: Shape, body: Any) -> Response:
        job = Job(gen, asyncio.get_running_loop())
        worker.submit(job)  # 429 when the queue is full
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if gen.stream:
            # the background task also runs when the client leaves before the stream began
            return StreamingResponse(stream(job, shape, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(worker.cancel, job))
        try:
            outcome = await wait_outcome(job, request)
        finally:  # a no-op once done; else the client left or the handler was cancelled
            worker.cancel(job)
        if outcome is None:  # the client left: nobody reads this
            return Response(status_code=499)
        return JSONResponse(shape.full(outcome.text, outcome.finish_reason, _usage(outcome),
                                       outcome.tide()))

    async def wait_outcome(job: Job, request: Request) -> Outcome | None:
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if kind == "done":
                return payload
            if kind == "error":
                raise payload

    async def stream(job: Job, shape: Shape, include_usage: bool) -> AsyncIterator[str]:
        # Starlette cancels this generator when the client disconnects: `finally` cancels the job
        try:
            first = shape.first()
            if first is not None:
                yield sse(first)
            quiet = 0.0
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), POLL_S)
                except asyncio.TimeoutError:
                    quiet += POLL_S
                    if quiet >= PING_S:
                        quiet = 0.0
                        yield ": ping\n\n"
                    continue
                quiet = 0.0
                if kind == "delta":
                    yield sse(shape.delta(payload))
                    continue
                if kind == "done":
                    use = _usage(payload)
                    yield sse(shape.last(payload.finish_reason, None if include_usage else use,
                                         payload.tide()))
                    if include_usage:
                        yield sse(shape.usage_chunk(use))
                else:
                    yield sse(payload.body())
                break
            yield "data: [DONE]\n\n"
        finally:
            worker.cancel(job)

    return app


def _usage(o: Outcome) -> dict[str, int]:
    return usage(o.prompt_tokens, o.completion_tokens)
