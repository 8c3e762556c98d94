"""The HTTP side: an OpenAI-compatible API on FastAPI over one `Engine`.

    GET  /v1/models             the base and every adapter (+ kind, method, trainable, size_bytes, world, chat)
    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
    POST /v1/chat/completions    "n", "seed", "stream"} (chat: "messages" instead of "prompt")
    GET  /health, GET /stats    liveness; requests, tokens, batch sizes, queue length
    GET  /                      the playground page (static/playground.html), when installed

Streams are server-sent events in OpenAI's chunk shape (`data: {...}` per piece of text, then
`data: [DONE]`); each request's events come from the scheduler thread through an asyncio queue, so a
token reaches its client as soon as it is decoded. Every error is `{"error": {"message", "type",
"code", "param"}}` with its HTTP status. With an API key, every endpoint but the static page wants
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.serve.engine import Engine, Job, RequestError

STATIC = Path(__file__).parent / "static"
PAGE = STATIC / "playground.html"
PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "n", "seed")


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(error_body(str(e), e.type, e.code, e.param), status_code=e.status)


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class BearerAuth:
    """ASGI middleware: every request but GET / (the static page, which holds no data and asks its user
    for the key) must carry `Authorization: Bearer KEY`; others get 401 in OpenAI's error shape."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not (scope["method"] == "GET" and scope["path"] == "/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                response = JSONResponse(error_body("missing or wrong API key: send `Authorization: Bearer KEY` "
                                                   "with the server's --api-key", code="invalid_api_key"),
                                        status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; its lifespan starts and stops the engine's scheduler."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="gptlab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    if api_key:
        app.add_middleware(BearerAuth, key=api_key)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return error_response(exc)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error",
                                       "internal_error"), status_code=500)

    @app.get("/", include_in_schema=False)
    async def page():
        if not PAGE.is_file():
            raise RequestError("the playground page is not installed (gptlab/serve/static/playground.html)", 404,
                               "not_found")
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.base_id, "adapters": list(engine.adapters)}

    @app.get("/stats")
    async def stats():
        return engine.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": engine.models()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        served = engine.resolve(model_id)
        return next(m for m in engine.models() if m["id"] == served.id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        job = engine.prepare(body.get("model"), prompt=body.get("prompt", ""), **_params(body))
        return await _answer(request, engine, job, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request)
        if "messages" not in body:
            raise RequestError("`messages` is required", 400, "invalid_value", "messages")
        job = engine.prepare(body.get("model"), messages=body["messages"], **_params(body))
        return await _answer(request, engine, job, body, chat=True)

    return app


async def _body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})", 400, "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", 400, "invalid_json")
    return body


def _params(body: dict) -> dict:
    params = {k: body.get(k) for k in PARAMS}
    if body.get("max_completion_tokens") is not None:  # the chat API's newer name
        params["max_tokens"] = body["max_completion_tokens"]
    return params


def _choice(job: Job, i: int, chat: bool) -> dict:
    if chat:
        return {"index": i, "message": {"role": "assistant", "content": job.texts[i]}, "logprobs": None,
                "finish_reason": job.finish[i]}
    return {"index": i, "text": job.texts[i], "logprobs": None, "finish_reason": job.finish[i]}


async def _answer(request: Request, engine: Engine, job: Job, body: dict, chat: bool):
    """Submit the job and answer: one JSON object, or a stream of server-sent events."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    engine.submit(job, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))  # may raise 429
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + job.id, "created": job.created, "model": job.model_id}
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_stream(job, events, head, chat, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return JSONResponse(error_body("client went away", code="cancelled"), status_code=499)
                continue
            if event[0] == "error":
                return error_response(event[1])
            if event[0] == "done":
                break
    finally:
        if not job.ended.is_set():
            job.cancel()
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": [_choice(job, i, chat) for i in range(job.n)], "usage": job.usage()}


async def _stream(job: Job, events: asyncio.Queue, head: dict, chat: bool, include_usage: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse({**head, "object": obj, "choices": [choice]})

    try:
        if chat:
            for i in range(job.n):
                yield chunk(i, None, role=True)
        while True:
            event = await events.get()
            kind = event[0]
            if kind == "delta":
                yield chunk(event[1], event[2])
            elif kind == "finish":
                yield chunk(event[1], None, finish=event[2])
            elif kind == "error":
                e = event[1]
                yield sse({"error": {"message": str(e), "type": e.type, "code": e.code, "param": e.param}})
                break
            else:  # done
                if include_usage:
                    yield sse({**head, "object": obj, "choices": [], "usage": job.usage()})
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away (this generator was cancelled) or the stream ended
        if not job.ended.is_set():
            job.cancel()
