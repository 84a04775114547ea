"""The HTTP entrypoint (FastAPI): OpenAI-compatible completions and chat (SSE streaming), Morph-style /v1/apply,
/v1/models, /health, /metrics.

Handlers are thin: parse and validate (serve.protocol), submit to the scheduler, turn its token outputs into
text. The scheduler's engine thread reports through the request's callback, which hops onto the event loop
with call_soon_threadsafe. A client that disconnects cancels its request, which frees its pages.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.protocol import (
    APIError,
    Job,
    Limits,
    TextStream,
    parse_apply,
    parse_chat,
    parse_completion,
    strip_fences,
    usage,
)
from serve.scheduler import Output, QueueFull, Scheduler, ShuttingDown
from serve.scheduler import Request as EngineRequest

log = logging.getLogger("codegen_jax.serve")


@dataclass
class ServeState:
    tokenizer: object
    scheduler: Scheduler
    limits: Limits
    max_body_bytes: int = 8 << 20
    drain_timeout_s: float = 30.0
    manage_engine: bool = True  # start the engine thread with the app and stop it on shutdown
    speculate_all: bool = False  # every request through the speculative step, not only /v1/apply


def create_app(state: ServeState) -> FastAPI:
    sched, tok, limits = state.scheduler, state.tokenizer, state.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.manage_engine:
            sched.start()
        yield
        if state.manage_engine:
            # uvicorn has already waited for in-flight responses (or its grace period ran out)
            await run_in_threadpool(sched.stop, state.drain_timeout_s)

    app = FastAPI(title="codegen-jax", lifespan=lifespan)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        # unknown routes and methods answer in the same JSON shape as every other error
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        body = {"error": {"message": f"{request.method} {request.url.path}: {e.detail}", "type": kind, "param": None,
                          "code": None}}
        return JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))

    async def read_json(request: Request):
        limit = state.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body has {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        job = parse_completion(await read_json(request), tok, limits)
        return await run(request, job)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        job = parse_chat(await read_json(request), tok, limits)
        return await run(request, job)

    @app.post("/v1/apply")
    async def apply(request: Request):
        job, _ = parse_apply(await read_json(request), tok, limits)
        return await run(request, job)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": limits.model_id, "object": "model", "created": 0,
                                            "owned_by": "codegen-jax", "max_model_len": limits.max_seq_len}]}

    @app.get("/health")
    async def health():
        if sched.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "waiting": sched.num_waiting}

    @app.get("/metrics")
    async def metrics():
        return Response(sched.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def run(request: Request, job: Job):
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()

        def emit(out: Output) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, out)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        req = EngineRequest(job.prompt_ids, job.sampling, emit, id=job.id,  # the response's id names it too
                            speculate=state.speculate_all or job.kind == "apply")
        try:
            sched.submit(req)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", code="queue_full") from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down; retry on another replica", code="shutting_down") from None
        except ValueError as e:
            raise APIError(400, str(e), "prompt" if job.kind == "completion" else "messages") from None
        if job.stream:
            return StreamingResponse(stream(job, req, outputs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(request, job, req, outputs)

    def names(job: Job) -> tuple[str, str]:
        if job.kind == "completion":
            return f"cmpl-{job.id}", "text_completion"
        return f"chatcmpl-{job.id}", "chat.completion"

    async def watch_disconnect(request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)

    async def collect(request: Request, job: Job, req: EngineRequest, outputs: asyncio.Queue) -> Response:
        text, n_tokens, finish, last = TextStream(tok, job.stop), 0, None, None
        watcher = asyncio.create_task(watch_disconnect(request))
        try:
            while finish is None:
                get = asyncio.ensure_future(outputs.get())
                await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    sched.cancel(req.id)
                    return Response(status_code=499)  # nobody reads it: the client is gone
                last = get.result()
                n_tokens += len(last.tokens)
                text.push(last.tokens, final=last.finish_reason is not None)
                if text.stopped:
                    sched.cancel(req.id)
                    finish = "stop"
                else:
                    finish = last.finish_reason
        finally:
            watcher.cancel()
        if finish == "error":
            raise APIError(500, f"generation failed: {last.error}")
        body = text.text[: text.sent] if text.stopped else text.text
        rid, obj = names(job)
        if job.kind == "completion":
            choice = {"index": 0, "text": body, "logprobs": None, "finish_reason": finish}
        else:
            content = strip_fences(body) if job.kind == "apply" else body
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                      "finish_reason": finish}
        return JSONResponse({"id": rid, "object": obj, "created": job.created, "model": limits.model_id,
                             "choices": [choice], "usage": usage(len(job.prompt_ids), n_tokens, last.cached_tokens)})

    async def stream(job: Job, req: EngineRequest, outputs: asyncio.Queue):
        rid, obj = names(job)
        obj = obj if job.kind == "completion" else "chat.completion.chunk"
        text, n_tokens, cached, done = TextStream(tok, job.stop), 0, 0, False

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> str:
            if job.kind == "completion":
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            else:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            return sse({"id": rid, "object": obj, "created": job.created, "model": limits.model_id,
                        "choices": [choice]})

        try:
            if job.kind != "completion":
                yield chunk(None, role=True)
            while True:
                out = await outputs.get()
                n_tokens += len(out.tokens)
                cached = out.cached_tokens
                delta = text.push(out.tokens, final=out.finish_reason is not None)
                if delta:
                    yield chunk(delta)
                finish = "stop" if text.stopped else out.finish_reason
                if finish is None:
                    continue
                if text.stopped:
                    sched.cancel(req.id)
                done = True
                if finish == "error":
                    yield sse(APIError(500, f"generation failed: {out.error}").body())
                else:
                    yield chunk(None, finish)
                    if job.include_usage:
                        yield sse({"id": rid, "object": obj, "created": job.created, "model": limits.model_id,
                                   "choices": [], "usage": usage(len(job.prompt_ids), n_tokens, cached)})
                yield "data: [DONE]\n\n"
                return
        finally:
            if not done:  # the client went away (the response task was cancelled) or the stream broke
                sched.cancel(req.id)

    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
