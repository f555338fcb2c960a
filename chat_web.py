"""Chat in the browser, and an OpenAI-compatible HTTP API, served by FastAPI + uvicorn.

    python -m chat_web                       # http://127.0.0.1:8000, the latest sft checkpoint
    python -m chat_web --source mid --host 0.0.0.0 --port 8080

Endpoints:
    GET  /                      the chat page (inline HTML + JS below, no build step)
    POST /v1/chat/completions   OpenAI chat completions: messages, max_tokens, temperature, top_p,
                                stream (server-sent events "data: {chunk}" ... "data: [DONE]"),
                                seed; top_k as an extension; model is accepted and ignored. A
                                conversation longer than the context keeps its newest whole turns:
                                dropped_messages (an extension) counts the oldest left out. A
                                calculator call reads [calculator: 12*7 -> 84] in content, and
                                reads back as the tool's tokens when sent as history.
    GET  /v1/models             the one model served
    GET  /health                liveness and how many workers are free

With several GPUs, each GPU holds its own copy of the model (a worker); requests wait in a
queue for a free worker. Each worker runs its decode steps on its own thread, so the server
keeps answering while models compute. Every request is bounded before it is used: the body is
capped while it streams in (413), every field is type- and range-checked by a pydantic model
(400, in OpenAI's error shape), and /openapi.json documents that model.
"""

import json
import math
import time
import uuid
import socket
import asyncio
import argparse
import contextlib
from dataclasses import dataclass
from typing import Annotated, Literal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import UserError, checked, print0, resolve_device, run_main
from engine import StreamDecoder, add_model_flags, fit_prompt, load_engine, shown
from tokenizer import conversation_problem


@dataclass
class Limits:
    """What one request may ask for (each one a command-line flag)."""

    max_messages: int = 200
    max_message_chars: int = 20_000
    max_prompt_tokens: int | None = None  # None: the model's context minus one
    max_tokens: int = 2048
    default_max_tokens: int = 512
    default_temperature: float = 0.6
    default_top_k: int = 50
    max_body_bytes: int = 2_000_000


# ---------------------------------------------------------------------------
# Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def error_json(message, status=400, param=None, code=None, headers=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------
# Workers: one model + engine per device, each with one thread for its decode steps


class Worker:
    def __init__(self, engine, device):
        self.engine = engine
        self.device = torch.device(device)
        init = (lambda: torch.cuda.set_device(self.device)) if self.device.type == "cuda" else None
        self.thread = ThreadPoolExecutor(max_workers=1, initializer=init, thread_name_prefix=f"worker-{device}")

    async def stream(self, ids, **sampling):
        """Async iterator over the sampled token ids (the stop token included). Every step runs
        on this worker's thread; if the consumer goes away, the generator is closed on that
        thread too, after any step in flight, so the next request never races it."""
        loop = asyncio.get_running_loop()
        steps = self.engine.generate(ids, num_samples=1, **sampling)
        try:
            while True:
                step = await loop.run_in_executor(self.thread, next, steps, None)
                if step is None:
                    return
                yield step[0][0]
        finally:
            self.thread.submit(steps.close)


class WorkerPool:
    """Free workers wait in an asyncio.Queue; a request takes one and gives it back."""

    def __init__(self, workers):
        self.workers = workers
        self.free = None  # created inside the server's event loop

    def start(self):
        self.free = asyncio.Queue()
        for w in self.workers:
            self.free.put_nowait(w)

    @contextlib.asynccontextmanager
    async def acquire(self):
        worker = await self.free.get()
        try:
            yield worker
        finally:
            self.free.put_nowait(worker)


def load_workers(source, device, tag=None, step=None, num_gpus=0, **engine_kw):
    """One worker per GPU (the first `num_gpus`, 0 = all), else one on `device`; engine_kw: load_engine's
    decode switch."""
    if device == "cuda":
        count = torch.cuda.device_count() if num_gpus <= 0 else min(num_gpus, torch.cuda.device_count())
        devices = [f"cuda:{i}" for i in range(count)]
    else:
        devices = [device]
    workers, meta = [], None
    for dev in devices:
        print0(f"loading the {source} model on {dev}")
        engine, meta = load_engine(source, dev, tag, step, **engine_kw)
        workers.append(Worker(engine, dev))
    return workers, meta


# ---------------------------------------------------------------------------
# Requests: a pydantic model (strict: no "10" for 10, no NaN) checks every field's type and range
# before anything is used, and is the request body the OpenAPI schema shows.


def request_model(limits):
    """The chat-completions body this server accepts, with `limits` as its bounds. Fields of
    OpenAI's API that are not listed are accepted and ignored."""
    Text = Annotated[str, Field(max_length=limits.max_message_chars)]

    class TextPart(BaseModel):
        type: Literal["text"]
        text: Text

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: Text | list[TextPart]

    class ChatRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="allow")
        messages: list[Message] = Field(min_length=1, max_length=limits.max_messages)
        max_tokens: int | None = Field(None, ge=1, le=limits.max_tokens)
        max_completion_tokens: int | None = Field(None, ge=1, le=limits.max_tokens)
        temperature: float = Field(limits.default_temperature, ge=0, le=2, allow_inf_nan=False)
        top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
        top_k: int = Field(limits.default_top_k, ge=0, le=1_000_000, description="0 = off (an extension)")
        seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
        stream: bool = False
        n: Literal[1] = 1
        stop: str | list[str] | None = Field(None, max_length=0, description="not supported: absent or empty")
        model: str | None = Field(None, description="accepted and ignored: one model is served")

    return ChatRequest


def parse_request(req, tokenizer, sequence_len, limits):
    """(prompt ids, sampling kwargs, dropped) of a validated request: the newest whole turns that fit
    the context with room for the reply (up to half of it), `dropped` the oldest messages left out;
    APIError for what only the conversation as a whole can show (roles out of order, a last message
    that does not fit by itself)."""
    messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                 "".join(p.text for p in m.content)} for m in req.messages]
    problem = conversation_problem(messages) or (None if messages[-1]["role"] == "user" else
                                                 "the last message must be from the user")
    max_tokens = min(req.max_completion_tokens or req.max_tokens or limits.default_max_tokens, sequence_len - 1)
    budget = min(limits.max_prompt_tokens or sequence_len, sequence_len - min(max_tokens, sequence_len // 2))
    ids, dropped = (None, 0) if problem else fit_prompt(tokenizer, messages, budget)
    if ids is None:  # a malformed conversation, or a last message too long by itself
        raise APIError(problem or f"the last message alone passes the {budget}-token prompt limit: shorten it",
                       "messages", code=None if problem else "context_length_exceeded")
    seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
    return ids, dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or None, seed=seed,
                     max_tokens=min(max_tokens, sequence_len - len(ids))), dropped


class BodyCap:
    """ASGI middleware: a request body is counted while it streams in (chunked included) and refused
    with a 413 as soon as it passes `max_bytes`, or before any of it is read when its Content-Length
    says it will; so no request costs more than `max_bytes` of memory."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        declared = dict(scope.get("headers", ())).get(b"content-length", b"0")
        seen = int(declared) if declared.isdigit() else 0  # the server already refused a malformed one

        async def capped_receive():
            nonlocal seen
            message = await receive() if seen <= self.max_bytes else {}
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # raised inside the app, so its error handler answers; the server
                raise StarletteHTTPException(  # then hangs up instead of reading the rest
                    413, f"request body larger than {self.max_bytes} bytes", headers={"Connection": "close"})
            return message

        await self.app(scope, capped_receive, send)


# ---------------------------------------------------------------------------
# The app


def add_error_handlers(app):
    """Every error in OpenAI's shape; a bad field names itself in `param`."""

    @app.exception_handler(APIError)
    async def on_api_error(request, e):
        return error_json(e.message, e.status, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def on_bad_request(request, e):
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"][1:])  # loc[0] is "body"
        return error_json(f"{where}: {error['msg']}" if where else error["msg"], param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e):  # 404, 405 (its Allow header kept), 413, ...
        return error_json(str(e.detail), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def on_crash(request, e):
        return error_json(f"internal error: {type(e).__name__}", 500)


def create_app(pool, model_name, sequence_len, limits=None):
    limits = limits or Limits()
    tokenizer = pool.workers[0].engine.tokenizer
    stop_tokens = pool.workers[0].engine.stop_tokens

    @contextlib.asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield

    ChatRequest = request_model(limits)
    app = FastAPI(title="speedchat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyCap, max_bytes=limits.max_body_bytes)
    add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "workers": len(pool.workers), "free_workers": pool.free.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "speedchat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        ids, sampling, dropped = parse_request(req, tokenizer, sequence_len, limits)
        # dropped_messages (an extension): how many of the oldest messages the model did not see
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name,
                "dropped_messages": dropped}
        if req.stream:
            return StreamingResponse(stream_chunks(ids, sampling, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        decoder, finish, n = StreamDecoder(tokenizer), "length", 0
        async with pool.acquire() as worker, contextlib.aclosing(worker.stream(ids, **sampling)) as tokens:
            async for token in tokens:
                n += 1
                if token in stop_tokens:
                    finish = "stop"
                    break
                decoder.add(token)
        message = {"role": "assistant", "content": shown(decoder.text())}
        return dict(meta, object="chat.completion", choices=[{"index": 0, "message": message, "finish_reason": finish}],
                    usage={"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n})

    async def stream_chunks(ids, sampling, meta):
        def chunk(delta, finish=None):
            body = dict(meta, object="chat.completion.chunk",
                        choices=[{"index": 0, "delta": delta, "finish_reason": finish}])
            return f"data: {json.dumps(body)}\n\n"

        async with pool.acquire() as worker:
            yield chunk({"role": "assistant", "content": ""})
            decoder, finish = StreamDecoder(tokenizer), "length"
            try:
                async with contextlib.aclosing(worker.stream(ids, **sampling)) as tokens:
                    async for token in tokens:
                        if token in stop_tokens:
                            finish = "stop"
                            break
                        piece = shown(decoder.add(token))  # a special token is one whole piece
                        if piece:
                            yield chunk({"content": piece})
            except Exception as e:  # the status line is already sent: report it in the stream
                error = {"message": f"generation failed: {type(e).__name__}: {e}", "type": "server_error"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            piece = shown(decoder.flush())
            if piece:
                yield chunk({"content": piece})
        yield chunk({}, finish)
        yield "data: [DONE]\n\n"

    return app


def number(kind, lo, hi=math.inf):
    """argparse type: a `kind` in [lo, hi] (NaN is in no range)."""
    return checked(kind, lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a speedchat model: a chat page and an OpenAI-compatible API.")
    add_model_flags(p, "serve")
    p.add_argument("--num-gpus", type=int, default=0, help="on CUDA, serve one model on each of this many GPUs (0 = all)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=number(int, 1, 65535), default=8000, help="port to listen on")
    p.add_argument("--temperature", type=number(float, 0, 2), default=0.6, help="temperature when a request gives none")
    p.add_argument("--top-k", type=number(int, 0), default=50, help="top-k when a request gives none (0 = off)")
    p.add_argument("--max-tokens", type=number(int, 1), default=None,
                   help="reply length when a request gives no max_tokens (default: 512, or the limit if lower)")
    p.add_argument("--max-tokens-limit", type=number(int, 1), default=2048,
                   help="the largest max_tokens a request may ask for")
    p.add_argument("--max-messages", type=number(int, 1), default=200, help="most messages in one request")
    p.add_argument("--max-message-chars", type=number(int, 1), default=20_000, help="longest message, in characters")
    p.add_argument("--max-prompt-tokens", type=number(int, 0), default=0,
                   help="longest prompt in tokens (0 = the model's context)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (debug|info|warning|error)")
    args = p.parse_args(argv)
    if (args.max_tokens or 0) > args.max_tokens_limit:
        p.error(f"--max-tokens {args.max_tokens} is above --max-tokens-limit {args.max_tokens_limit}")
    return args


def check_port(host, port):
    """A one-line error now if the address cannot be bound (taken, or not this machine's); uvicorn
    binds it again later (with SO_REUSEADDR, as here), so a port another process takes in between
    still fails there."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def main(argv=None):
    import uvicorn

    args = parse_args(argv)
    limits = Limits(max_messages=args.max_messages, max_message_chars=args.max_message_chars,
                    max_prompt_tokens=args.max_prompt_tokens or None, max_tokens=args.max_tokens_limit,
                    default_max_tokens=(min(Limits.default_max_tokens, args.max_tokens_limit) if args.max_tokens is None
                                        else args.max_tokens),
                    default_temperature=args.temperature, default_top_k=args.top_k)
    device = resolve_device(args.device)
    check_port(args.host, args.port)  # before the model loads, which can take a while
    workers, meta = load_workers(args.source, device, args.tag, args.step, args.num_gpus, decode=args.decode)
    model_name = f"speedchat-{args.source}-{meta.get('tag', 'model')}"
    sequence_len = workers[0].engine.model.config.sequence_len
    app = create_app(WorkerPool(workers), model_name, sequence_len, limits)
    print0(f"serving {model_name} on http://{args.host}:{args.port} ({len(workers)} worker(s) on {device})")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


# The chat page (chat_web.html): plain HTML + JS talking to /v1/chat/completions with stream=true.
PAGE = Path(__file__).with_name("chat_web.html").read_text(encoding="utf-8")


if __name__ == "__main__":
    run_main(main)
