"""Chat in the browser, and an OpenAI-compatible HTTP API, served by FastAPI + uvicorn.

    python -m chat_web                       # http://127.0.0.1:8000, the latest sft checkpoint
    python -m chat_web --source mid --host 0.0.0.0 --port 8080

Endpoints:
    GET  /                      the chat page (inline HTML + JS below, no build step)
    POST /v1/chat/completions   OpenAI chat completions: messages, max_tokens, temperature, top_p,
                                stream (server-sent events "data: {chunk}" ... "data: [DONE]"),
                                seed; top_k as an extension; model is accepted and ignored
    GET  /v1/models             the one model served
    GET  /health                liveness and how many workers are free

With several GPUs, each GPU holds its own copy of the model (a worker); requests wait in a
queue for a free worker. Each worker runs its decode steps on its own thread, so the server
keeps answering while models compute. Bad requests get a 4xx with an OpenAI-style error body.
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
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import UserError, print0, resolve_device, run_main
from engine import SHOWN_MARKERS, StreamDecoder, add_decode_flags, chat_prompt, load_engine


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

    def __post_init__(self):
        """The same bounds a request's own values get (see parse_request), named by their flags."""
        problems = [f"{flag} must be at least 1, got {value}" for flag, value in (
            ("--max-messages", self.max_messages), ("--max-message-chars", self.max_message_chars),
            ("--max-tokens-limit", self.max_tokens), ("--max-tokens", self.default_max_tokens))
            if value < 1]
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            problems.append(f"--max-prompt-tokens must be at least 1 (or 0 for the model's context), got {self.max_prompt_tokens}")
        if self.default_max_tokens > self.max_tokens:
            problems.append(f"--max-tokens {self.default_max_tokens} is above --max-tokens-limit {self.max_tokens}")
        if not 0.0 <= self.default_temperature <= 2.0:
            problems.append(f"--temperature must be in [0, 2], got {self.default_temperature}")
        if self.default_top_k < 0:
            problems.append(f"--top-k must be >= 0 (0 = off), got {self.default_top_k}")
        if problems:
            raise UserError("; ".join(problems))


# ---------------------------------------------------------------------------
# Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    def __init__(self, message, status=400, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind


def error_json(message, status=400, param=None, code=None, kind="invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


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
# Request validation


def _number(body, name, default, lo, hi, integer=False, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool) or not math.isfinite(value):
        raise APIError(f"'{name}' must be {'an integer' if integer else 'a number'}", param=name)
    if value < lo or value > hi or (lo_open and value == lo):
        raise APIError(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", param=name)
    return value


def _content_text(content, i):
    """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def parse_request(body, tokenizer, sequence_len, limits):
    """Check a chat-completions body; return (prompt_ids, sampling kwargs, stream flag)."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages")
    if len(messages) > limits.max_messages:
        raise APIError(f"too many messages: {len(messages)} > {limits.max_messages}", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise APIError(f"messages[{i}] must be an object with role system, user or assistant", param=f"messages[{i}]")
        text = _content_text(m.get("content"), i)
        if len(text) > limits.max_message_chars:
            raise APIError(f"messages[{i}] is too long: {len(text)} > {limits.max_message_chars} characters",
                           param=f"messages[{i}].content")
        clean.append({"role": m["role"], "content": text})
    if clean[-1]["role"] != "user":
        raise APIError("the last message must be from the user", param="messages")
    if body.get("n", 1) != 1:
        raise APIError("only n=1 is supported", param="n")
    if body.get("stop") not in (None, [], ""):
        raise APIError("'stop' is not supported", param="stop")
    if not isinstance(body.get("stream", False), bool):
        raise APIError("'stream' must be true or false", param="stream")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise APIError("'model' must be a string", param="model")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", limits.default_max_tokens, 1, limits.max_tokens, integer=True)
    sampling = dict(
        temperature=_number(body, "temperature", limits.default_temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_number(body, "top_k", limits.default_top_k, 0, 1_000_000, integer=True) or None,
        seed=_number(body, "seed", None, -2**63, 2**63 - 1, integer=True),
    )
    if sampling["seed"] is None:
        sampling["seed"] = int.from_bytes(uuid.uuid4().bytes[:4], "little")
    try:
        ids = chat_prompt(tokenizer, clean)
    except ValueError as e:  # roles out of order and the like
        raise APIError(str(e), param="messages")
    max_prompt = min(limits.max_prompt_tokens or sequence_len, sequence_len - 1)
    if len(ids) > max_prompt:
        raise APIError(f"the prompt is {len(ids)} tokens, more than this model's limit of {max_prompt}",
                       param="messages", code="context_length_exceeded")
    sampling["max_tokens"] = min(max_tokens, sequence_len - len(ids))  # the reply must fit in the context too
    return ids, sampling, body.get("stream", False)


# ---------------------------------------------------------------------------
# The app


def create_app(pool, model_name, sequence_len, limits=None):
    limits = limits or Limits()
    tokenizer = pool.workers[0].engine.tokenizer
    stop_tokens = pool.workers[0].engine.stop_tokens

    @contextlib.asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield

    app = FastAPI(title="speedchat", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def on_api_error(request, e):
        return error_json(e.message, e.status, e.param, e.code, e.kind)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e):
        return error_json(str(e.detail), e.status_code, kind="invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def on_crash(request, e):
        return error_json(f"internal error: {type(e).__name__}", 500, kind="server_error")

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
    async def chat_completions(request: Request):
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:  # refuse before reading it
            raise APIError(f"request body larger than {limits.max_body_bytes} bytes", status=413)
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            raise APIError(f"request body larger than {limits.max_body_bytes} bytes", status=413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"malformed JSON in the request body: {e}")
        ids, sampling, stream = parse_request(body, tokenizer, sequence_len, limits)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}
        if stream:
            return StreamingResponse(stream_chunks(ids, sampling, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, finish, n = "", "length", 0
        async with pool.acquire() as worker:
            decoder = StreamDecoder(tokenizer)
            async with contextlib.aclosing(worker.stream(ids, **sampling)) as tokens:
                async for token in tokens:
                    n += 1
                    if token in stop_tokens:
                        finish = "stop"
                        break
                    decoder.add(token)
            text = decoder.text()
        return dict(meta, object="chat.completion",
                    choices=[{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
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
                        piece = decoder.add(token)
                        if piece:
                            yield chunk({"content": piece})
            except Exception as e:  # the status line is already sent: report it in the stream
                error = {"message": f"generation failed: {type(e).__name__}: {e}", "type": "server_error"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            piece = decoder.flush()
            if piece:
                yield chunk({"content": piece})
        yield chunk({}, finish)
        yield "data: [DONE]\n\n"

    return app


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a speedchat model: a chat page and an OpenAI-compatible API.")
    p.add_argument("--source", default="sft", choices=["base", "mid", "sft"], help="which stage's checkpoint to serve")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. d20 (default: the latest written)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--device", default=None, help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--num-gpus", type=int, default=0, help="on CUDA, serve one model on each of this many GPUs (0 = all)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--temperature", type=float, default=0.6, help="temperature when a request gives none")
    p.add_argument("--top-k", type=int, default=50, help="top-k when a request gives none (0 = off)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="reply length when a request gives no max_tokens (default: 512, or the limit if lower)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-messages", type=int, default=200, help="most messages in one request")
    p.add_argument("--max-message-chars", type=int, default=20_000, help="longest message, in characters")
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt in tokens (0 = the model's context)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (debug|info|warning|error)")
    add_decode_flags(p)
    return p.parse_args(argv)


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
    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        raise UserError("uvicorn is not installed: `uv sync` (it is a project dependency)")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
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


# ---------------------------------------------------------------------------
# The chat page: plain HTML + JS, talking to /v1/chat/completions with stream=true.
# Click a message to edit it; saving a user message regenerates the reply from there.

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>speedchat</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; background: #f6f6f4; }
  header { display: flex; gap: 12px; align-items: center; padding: 8px 16px; background: #fff; border-bottom: 1px solid #ddd; }
  header h1 { font-size: 18px; margin: 0; flex: 1; }
  header label { font-size: 13px; color: #555; }
  header input { width: 60px; }
  #chat { flex: 1; overflow-y: auto; padding: 16px; max-width: 800px; width: 100%; box-sizing: border-box; margin: 0 auto; }
  .msg { white-space: pre-wrap; padding: 10px 14px; margin: 8px 0; border-radius: 10px; cursor: pointer; line-height: 1.4; }
  .msg.user { background: #dbe8ff; margin-left: 15%; }
  .msg.assistant { background: #fff; border: 1px solid #e2e2e2; margin-right: 15%; }
  .msg.error { background: #fde2e2; cursor: default; }
  .msg textarea { width: 100%; min-height: 60px; font: inherit; box-sizing: border-box; }
  footer { display: flex; gap: 8px; padding: 12px 16px; background: #fff; border-top: 1px solid #ddd; max-width: 800px; width: 100%; box-sizing: border-box; margin: 0 auto; }
  #input { flex: 1; font: inherit; padding: 8px; resize: none; height: 44px; }
  button { font: inherit; padding: 6px 14px; }
</style></head>
<body data-busy="0">
<header><h1>speedchat</h1>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" placeholder="default"></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" step="1" placeholder="default"></label>
  <button id="new">New chat</button></header>
<div id="chat"></div>
<footer><textarea id="input" placeholder="Message (Enter to send, Shift+Enter for a new line)"></textarea>
  <button id="send">Send</button></footer>
<script>
const chat = document.getElementById('chat'), input = document.getElementById('input');
const sendButton = document.getElementById('send');
let messages = [], controller = null;
window.chunksReceived = 0;

function setBusy(busy) {
  document.body.dataset.busy = busy ? '1' : '0';
  sendButton.textContent = busy ? 'Stop' : 'Send';
}

// a calculator call reads as [calculator: 12*7 -> 84]; messages keep the tokens (sent back as history)
const SHOWN = __SHOWN_MARKERS__;
function shown(text) {
  return text.replace(/<\\|(python|output)_(start|end)\\|>/g, (marker) => SHOWN[marker]);
}

function render() {
  chat.innerHTML = '';
  messages.forEach((m, i) => {
    const div = document.createElement('div');
    div.className = 'msg ' + m.role;
    div.textContent = m.role === 'assistant' ? shown(m.content) : m.content;
    div.title = 'click to edit';
    div.onclick = () => edit(i, div);
    chat.appendChild(div);
  });
  chat.scrollTop = chat.scrollHeight;
}

function showError(text) {
  const div = document.createElement('div');
  div.className = 'msg error';
  div.textContent = text;
  chat.appendChild(div);
}

function edit(i, div) {
  if (controller || div.querySelector('textarea')) return;
  const area = document.createElement('textarea');
  area.value = messages[i].content;
  div.textContent = '';
  div.appendChild(area);
  area.focus();
  area.onclick = (e) => e.stopPropagation();
  area.onkeydown = (e) => {
    if (e.key === 'Escape') { render(); }
    if (e.key === 'Enter' && !e.shiftKey) {
      e.preventDefault();
      messages[i].content = area.value;
      messages = messages.slice(0, i + 1);  // everything after the edit is regenerated
      render();
      if (messages[i].role === 'user') generate();
    }
  };
}

async function generate() {
  const reply = {role: 'assistant', content: ''};
  const history = messages.slice();
  messages.push(reply);
  render();
  const div = chat.lastChild;
  controller = new AbortController();
  setBusy(true);
  const request = {messages: history, stream: true};  // empty settings: the server's defaults
  const temperature = document.getElementById('temperature').value;
  const maxTokens = document.getElementById('max_tokens').value;
  if (temperature !== '') request.temperature = parseFloat(temperature);
  if (maxTokens !== '') request.max_tokens = parseInt(maxTokens);
  try {
    const response = await fetch('/v1/chat/completions', {
      method: 'POST', headers: {'Content-Type': 'application/json'}, signal: controller.signal,
      body: JSON.stringify(request)});
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).error.message; } catch (e) {}
      throw new Error(message);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = '';
    while (true) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf('\\n\\n')) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith('data: ') || event === 'data: [DONE]') continue;
        const data = JSON.parse(event.slice(6));
        if (data.error) throw new Error(data.error.message);
        const delta = data.choices[0].delta.content;
        if (delta) {
          reply.content += delta;
          div.textContent = shown(reply.content);
          window.chunksReceived += 1;
          chat.scrollTop = chat.scrollHeight;
        }
      }
    }
  } catch (e) {
    if (e.name !== 'AbortError') {
      if (!reply.content) messages.pop();
      render();
      showError('error: ' + e.message);
    }
  } finally {
    controller = null;
    setBusy(false);
  }
}

function send() {
  if (controller) { controller.abort(); return; }
  const text = input.value.trim();
  if (!text) return;
  messages.push({role: 'user', content: text});
  input.value = '';
  generate();
}

sendButton.onclick = send;
input.onkeydown = (e) => { if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); send(); } };
document.getElementById('new').onclick = () => {
  if (controller) controller.abort();
  messages = [];
  render();
  input.focus();
};
</script>
</body></html>
""".replace("__SHOWN_MARKERS__", json.dumps(SHOWN_MARKERS))


if __name__ == "__main__":
    run_main(main)
