"""Inference: KV-cached, batched sampling with the calculator tool.

    engine = Engine(model, tokenizer)
    for token_column, mask_column in engine.generate(prompt_ids, num_samples=4, max_tokens=64):
        ...                                  # one token per row per step, streamed
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

The prompt is prefilled once with batch size 1; its KV cache is then copied into a cache with
one row per sample, and all rows decode together, one token per step. A row stops at
<|assistant_end|> or <|bos|>; the loop ends when every row has stopped or `max_tokens` is spent.

Tool use: when a row writes <|python_start|> expr <|python_end|>, the expression is evaluated by
`calculator.py` (a tiny ast interpreter: arithmetic and a few string methods, nothing else) and
<|output_start|> result <|output_end|> is forced into that row, token by token. Forced tokens are
not sampled and are reported with mask 0 (sampled tokens have mask 1).

Decode steps (Engine(decode=...)): on CUDA each step is GPT.decode_step, a fixed-shape step over a
preallocated cache, captured once per attention window as a CUDA graph and replayed (batch-1
decoding is otherwise bound by launching several hundred small kernels per token); elsewhere the
plain model(ids, kv_cache=cache). In the static modes the engine launches step t+1 on the sampled
tokens before it copies them to the host (except in steps where a tool forces a token), so the GPU
does not wait for the host's bookkeeping between tokens.
"""

import copy
import re
import threading
from collections import OrderedDict, deque

import torch
import torch.nn as nn

from calculator import calculator
from common import get_dtype
from model import KVCache

# ---------------------------------------------------------------------------
# Sampling


@torch.inference_mode()
def sample_next(logits, generator, temperature=1.0, top_k=None, top_p=None):
    """Sample one token per row from logits (B, V) -> (B,) LongTensor. temperature 0 = argmax."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)  # sorted, descending
    else:
        values, indices = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    if top_p is not None and 0.0 < top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    # what torch.multinomial does for one sample (argmax of p / Exp(1) noise picks i with
    # probability p_i), minus its two input checks, which each wait for the GPU
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    choice = (probs / noise).argmax(dim=-1, keepdim=True)
    return indices.gather(-1, choice).squeeze(-1)


# ---------------------------------------------------------------------------
# The engine


class _Row:
    """Per-sample decoding state that lives on the host."""

    __slots__ = ("forced", "in_python", "python_tokens", "done")

    def __init__(self):
        self.forced = deque()     # tokens to force in before sampling resumes (tool output)
        self.in_python = False    # between <|python_start|> and <|python_end|>
        self.python_tokens = []
        self.done = False


MAX_PYTHON_TOKENS = 256  # a longer tool call is not a calculator expression: ignore it
DECODE_MODES = ("auto", "eager", "static", "graph")
MIN_WINDOW = 64          # the smallest attention window of a static decode step (cache positions read)
GRAPH_WARMUP_STEPS = 3   # eager runs on a side stream before a capture (lazy cuBLAS/attention setup)
CAPTURE_LOCK = threading.Lock()  # one CUDA-graph capture at a time in the process
MAX_DECODERS = 4         # static decoders (a KV cache and its graphs) an Engine keeps, least recently used dropped


def next_pow2(n):
    return 1 << max(n - 1, 0).bit_length()


class StaticDecoder:
    """Decode steps with fixed shapes over one preallocated KV cache (its seq_len a power of two;
    never grown), through GPT.decode_step. The attention window of a step is the next power of
    two above its position (at least MIN_WINDOW), so a whole reply runs through a handful of
    shapes. With graphs=True (CUDA) each window's step is captured once as a CUDA
    graph and then replayed: one launch per token instead of several hundred kernel launches,
    which is what batch-1 decoding is bound by. The graphs read the static inputs self.idx and
    self.pos and write the logits into one static output tensor per window.

    A step writes its keys/values at its position, over whatever was there: a kept decoder's cache
    needs no clearing, as positions past the step's are masked."""

    def __init__(self, model, cache, graphs, compiled=False):
        device = cache.k.device
        self.model, self.cache, self.use_graphs = model, cache, graphs
        # compiled: inductor fuses the step's elementwise work (rotary, norms, residual adds, relu^2)
        # into a few kernels per layer. dynamic=None: the first window compiles for its exact size,
        # the second recompiles with the size symbolic, and later windows reuse that: 2 compilations
        # per batch size (a new batch size adds one; batch 1 always gets its own); each CUDA graph
        # still holds one window
        self.decode_step = model.decode_step
        if compiled:
            self.decode_step = torch.compile(model.decode_step, fullgraph=True, dynamic=None)
        self.idx = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs = {}   # window -> (torch.cuda.CUDAGraph, the logits tensor it writes)
        self.pool = None   # one memory pool for all of this decoder's graphs: they never run at once
        self.stream = None  # the stream its graphs are captured on (made at the first capture)
        self.tables = None  # the rotary table the graphs read (an eager forward may replace it)
        self.busy = False  # a generate() call is using the cache

    def window(self, pos):
        return min(max(next_pow2(pos + 1), MIN_WINDOW), self.cache.seq_len)

    def fits(self, pos):
        return pos < self.cache.seq_len

    def step(self, ids, pos):
        """Logits (B, V) for the tokens ids (B,) or (B, 1) at cache position pos (a Python int,
        pos < seq_len); their keys/values are written at pos. With graphs the logits tensor is
        the graph's output: it is overwritten by the next step, so use it before that."""
        self.idx.copy_(ids.view(-1, 1))
        self.pos.fill_(pos)  # a tiny kernel with pos as its argument: no host-to-device copy, no sync
        window = self.window(pos)
        if not self.use_graphs:
            return self.decode_step(self.idx, self.cache, self.pos, window)
        if self.model.cos is not self.tables:  # a longer prompt grew the rotary tables: recapture
            self.graphs.clear()
            self.tables = self.model.cos
        if window not in self.graphs:
            self._capture(window)
        graph, logits = self.graphs[window]
        graph.replay()
        return logits

    def _capture(self, window):
        """Warm up on a side stream, then capture, as the PyTorch CUDA-graph docs prescribe. The
        warm-up steps really run: they write this position's keys/values from self.idx, exactly
        what the replay that follows writes again (a compiled step compiles in the first one).
        thread_local capture: chat_web decodes on one thread per GPU, and another thread's
        allocations must not break this capture. The capture runs on this decoder's own stream
        (torch.cuda.graph's default one is shared by the process and lives on the GPU that first
        captured) and one capture at a time in the process, as PyTorch allows."""
        device = self.cache.k.device
        decode = lambda: self.decode_step(self.idx, self.cache, self.pos, window)
        with CAPTURE_LOCK, torch.cuda.device(device):
            if self.stream is None:
                self.stream = torch.cuda.Stream(device)
                self.pool = torch.cuda.graph_pool_handle()
            self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream):
                for _ in range(GRAPH_WARMUP_STEPS):
                    decode()
            torch.cuda.current_stream(device).wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                logits = decode()
        self.graphs[window] = (graph, logits)


class _ColumnReader:
    """Brings each sampled column to the host without waiting for GPU work queued after it
    (a non-blocking copy into pinned memory, then an event), so the next step can be launched
    before the host looks at the column. On CPU: a plain copy."""

    def __init__(self, batch, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = torch.empty(batch, dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None

    def start(self, sampled):
        self.host.copy_(sampled, non_blocking=self.cuda)
        if self.cuda:
            self.event.record(torch.cuda.current_stream(self.device))

    def wait(self):
        if self.cuda:
            self.event.synchronize()
        return self.host.tolist()


class Engine:
    """Generation from a GPT (see the module docstring). decode: how the per-token steps run.
      "eager"  model(ids, kv_cache=cache): shapes that change at every token (the reference);
      "static" model.decode_step over a preallocated cache, attention over a window bucket: fixed
               shapes and the same math (on CPU, how the tests run the graph path's code);
      "graph"  "static" captured as CUDA graphs, one per window, replayed (CUDA only);
      "auto"   "graph" on CUDA, "eager" elsewhere.
    compile_decode: torch.compile the static step ("static"/"graph" only): a few fused kernels per
      layer instead of ~25 (a graph replays every kernel, so their number bounds batch-1 speed);
      about two compilations per batch size (see StaticDecoder), probably tens of seconds each at d20.
    The static modes keep their caches and graphs for the next generate() call (MAX_DECODERS of
    them, keyed by batch and cache length): capturing costs a few eager steps per window, about
    what the first reply's first tokens cost, and chat_web would otherwise pay it per request."""

    def __init__(self, model, tokenizer, decode="auto", compile_decode=False):
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, not {decode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.decode, self.compile_decode = decode, compile_decode
        special = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = special("<|assistant_end|>")
        self.python_start = special("<|python_start|>")
        self.python_end = special("<|python_end|>")
        self.output_start = special("<|output_start|>")
        self.output_end = special("<|output_end|>")
        self.stop_tokens = {self.assistant_end, self.bos}
        self._decoders = OrderedDict()  # (batch, cache length, graphs) -> StaticDecoder
        self._weights = None            # where the model's weights were: see _runner
        self._copy, self._copy_versions = None, None

    def _device(self):
        return next(self.model.parameters()).device

    def _compute_dtype(self):
        """bf16 on a bf16-capable GPU (also for an fp32 model: see _runner), else the weights'
        dtype. The cache holds k/v in this dtype."""
        param = next(self.model.parameters())
        if param.device.type == "cuda" and param.dtype == torch.float32:
            return get_dtype("cuda")
        return param.dtype

    def _runner(self):
        """The module that computes: the model itself, or, for float32 weights on a GPU that
        computes in bf16, a bf16 copy of it. Autocast instead would cast every weight on every
        forward (~2 GB read, 1 GB written per token at d20: about a millisecond, more than a
        graphed decode step), and a CUDA graph cannot keep autocast's cast cache. The copy is made
        once and refreshed in place (the graphs keep pointing at it) when the model's weights
        change in place, as seen by each tensor's _version, which optimizer steps and
        load_state_dict bump (a write through p.data does not, and is not seen); if the weights
        move (.to(), a new tensor), copy and graphs are rebuilt."""
        params = list(self.model.parameters())
        where = [p.data_ptr() for p in params]
        if where != self._weights:  # first call, or weights that moved: graphs would read stale memory
            self._decoders.clear()
            self._copy, self._weights = None, where
        dtype = self._compute_dtype()
        if all(p.dtype == dtype for p in params):
            return self.model
        versions = [p._version for p in params]  # bumped by every in-place write (optimizer, load_state_dict)
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable in any mode
            if self._copy is None:
                memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in params}
                self._copy = copy.deepcopy(self.model, memo)  # the modules, with cast weights
            elif versions != self._copy_versions:
                for source, target in zip(params, self._copy.parameters()):
                    target.copy_(source)
        self._copy_versions = versions
        return self._copy

    def _decode_mode(self, device):
        mode = self.decode
        if mode == "auto":
            mode = "graph" if device.type == "cuda" else "eager"
        if mode == "graph" and device.type != "cuda":
            raise ValueError("decode='graph' needs the model on a CUDA device (use 'static' elsewhere)")
        if mode == "eager" and self.compile_decode:
            raise ValueError(f"compile_decode compiles the static decode step: use decode='static' or 'graph' "
                             f"(decode={self.decode!r} runs {mode} on {device.type})")
        return mode

    def _take_decoder(self, runner, batch, room, graphs):
        """A static decoder with a cache of at least `room` positions (rounded up to a power of
        two, so that replies of similar lengths share one): the kept one, or a new one. One in use
        by another live generate() is not shared: this call gets a private one."""
        seq_len = max(next_pow2(room), MIN_WINDOW)
        key = (batch, seq_len, graphs)
        decoder = self._decoders.get(key)
        if decoder is None or decoder.busy:
            fresh = StaticDecoder(runner, self._new_cache(batch, seq_len), graphs, self.compile_decode)
            if decoder is None:
                self._decoders[key] = fresh
                while len(self._decoders) > MAX_DECODERS:
                    self._decoders.popitem(last=False)
            decoder = fresh
        if self._decoders.get(key) is decoder:
            self._decoders.move_to_end(key)
        decoder.busy = True
        return decoder

    def _drop_decoder(self, decoder):
        for key, kept in list(self._decoders.items()):
            if kept is decoder:
                del self._decoders[key]

    def _prefill(self, runner, tokens, num_samples, room, decoder):
        """(cache, logits (num_samples, V)): the prompt is run once, batch 1, and its keys/values
        end up in every row of the decode cache (the decoder's, else a new one of `room` positions)."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self._device())
        if num_samples == 1:  # decode straight from the prefill cache
            cache = decoder.cache if decoder is not None else self._new_cache(1, room)
            cache.reset()
            return cache, self._forward(runner, ids, cache)
        prompt_cache = self._new_cache(1, len(tokens))
        logits = self._forward(runner, ids, prompt_cache)
        cache = decoder.cache if decoder is not None else self._new_cache(num_samples, room)
        cache.prefill_from(prompt_cache)
        return cache, logits.expand(num_samples, -1)

    def _forward(self, model, ids, cache):
        """Last-position logits (B, V) for ids (B, t) at positions cache.pos .. cache.pos + t."""
        if ids.size(1) == 1:
            return model(ids, kv_cache=cache)[:, -1]
        last = torch.full((ids.size(0),), ids.size(1) - 1, dtype=torch.long, device=ids.device)
        return model(ids, kv_cache=cache, positions=last)

    def _new_cache(self, batch_size, seq_len):
        cfg = self.model.config
        return KVCache(batch_size, cfg.n_kv_head, seq_len, cfg.n_embd // cfg.n_head, cfg.n_layer,
                       self._device(), self._compute_dtype())

    def _tool_output(self, row):
        """The row just closed a python block: queue the calculator's answer as forced tokens."""
        expr = self.tokenizer.decode(row.python_tokens)
        row.in_python, row.python_tokens = False, []
        result = calculator(expr)
        if result is not None:
            row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Stream completions of the prompt `tokens` (list of ids): yields, per step,
        (token_column, mask_column), one entry per sample. Rows that have stopped keep
        appearing in later columns (with whatever was sampled): stop on your side, or use
        generate_batch. `max_tokens` counts generated tokens, forced ones included."""
        assert isinstance(tokens, list) and tokens and isinstance(tokens[0], int), "tokens: a non-empty list of ids"
        assert num_samples >= 1, "num_samples must be at least 1"
        device = self._device()
        mode = self._decode_mode(device)
        runner = self._runner()
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        if max_tokens is None:
            max_tokens = max(self.model.config.sequence_len - len(tokens), 1)
        if max_tokens <= 0:
            return

        # The cache is sized for the whole reply, up to one context's worth; past that the eager
        # path grows it by doubling (the static path hands over to the eager one when it is full).
        room = len(tokens) + min(max_tokens, self.model.config.sequence_len) - 1  # the last token is not fed back
        decoder = None if mode == "eager" else self._take_decoder(runner, num_samples, room, mode == "graph")
        held = decoder  # freed at the end, also when the caller stops iterating early
        try:
            cache, logits = self._prefill(runner, tokens, num_samples, room, decoder)
            rows = [_Row() for _ in range(num_samples)]
            reader = _ColumnReader(num_samples, device)
            pos = len(tokens)  # the cache position of the next token fed to the model
            sampled = sample_next(logits, generator, temperature, top_k, top_p)
            for step in range(max_tokens):
                last_step = step == max_tokens - 1
                if decoder is not None and not decoder.fits(pos):  # full: hand over to the eager path,
                    self._drop_decoder(decoder)  # which grows the cache (the graphs point at this one)
                    decoder = None
                    cache.pos = pos
                reader.start(sampled)
                ahead = None
                if decoder is not None and not last_step and not any(row.forced for row in rows):
                    # run the next step on the sampled tokens now, so the GPU computes while the host
                    # reads the column (the one sync per step: stops and tool calls need it); unless
                    # a tool forces a token into this column: then the sampled tokens are not the input
                    ahead = decoder.step(sampled, pos)
                column = reader.wait()
                masks = [1] * num_samples
                any_forced = False
                for i, row in enumerate(rows):
                    if row.forced:
                        column[i] = row.forced.popleft()
                        masks[i] = 0
                        any_forced = True
                    self._track(row, column[i])
                yield column, masks
                if all(row.done for row in rows) or last_step:
                    return
                # feed the column back; reuse the device tensor unless a row was overridden
                ids = torch.tensor(column, dtype=torch.long, device=device) if any_forced else sampled
                if decoder is None:
                    logits = self._forward(runner, ids.view(num_samples, 1), cache)
                else:
                    logits = ahead if ahead is not None else decoder.step(ids, pos)
                pos += 1
                sampled = sample_next(logits, generator, temperature, top_k, top_p)
        finally:
            if held is not None:
                held.busy = False

    def _track(self, row, token):
        """Update a row's state after it emits `token`."""
        if row.done:
            return
        if token in self.stop_tokens:
            row.done = True
        elif token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            self._tool_output(row)
        elif row.in_python:
            row.python_tokens.append(token)
            if len(row.python_tokens) > MAX_PYTHON_TOKENS:
                row.in_python, row.python_tokens = False, []

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming: (results, masks), one list per sample. Each result is the prompt
        followed by the generated tokens up to (not including) the stop token; masks are
        0 over the prompt and forced tool output, 1 over sampled tokens."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in self.stop_tokens:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks


# ---------------------------------------------------------------------------
# Loading a model to chat with (chat_cli, chat_web)

SOURCE_FALLBACK_HINT = {"sft": " (or --source mid/base)", "mid": " (or --source base)", "base": ""}


def add_decode_flags(p):
    """chat_cli's and chat_web's switches for how the decode steps run (see Engine)."""
    p.add_argument("--decode", default="auto", choices=DECODE_MODES,
                   help="decode steps: auto = CUDA graphs on CUDA, eager elsewhere (see engine.Engine)")
    p.add_argument("--compile-decode", action="store_true",
                   help="torch.compile the static decode step (--decode graph or static; auto is graph on "
                        "CUDA): faster batch-1 tokens after a compilation of tens of seconds on the first replies")


def load_engine(source="sft", device="cpu", tag=None, step=None, decode="auto", compile_decode=False):
    """(Engine, meta) for the latest (or given) checkpoint of stage `source`, with a one-line
    UserError that says which script to run when that stage has no checkpoint yet."""
    import checkpoint
    from common import UserError

    if source not in checkpoint.STAGES:
        raise UserError(f"unknown --source {source!r}: use one of {', '.join(checkpoint.STAGES)}")
    has_any = checkpoint.list_steps(checkpoint.checkpoint_dir(source, tag)) if tag else checkpoint.find_last_tag(source)
    if not has_any:
        what = f"{source} checkpoint" + (f" with tag {tag!r}" if tag else "")
        raise UserError(f"no {what}: run `python -m {checkpoint.STAGE_SCRIPTS[source]}` first"
                        + SOURCE_FALLBACK_HINT[source])
    model, tokenizer, meta = checkpoint.load_model(source, device, tag=tag, step=step, phase="eval")
    engine = Engine(model, tokenizer, decode=decode, compile_decode=compile_decode)
    try:
        engine._decode_mode(torch.device(device))  # a switch that cannot run here fails now, not at the first reply
    except ValueError as e:
        raise UserError(f"--decode {decode}{' --compile-decode' if compile_decode else ''} on {device}: {e}") from None
    return engine, meta


# ---------------------------------------------------------------------------
# Text helpers shared by chat_cli and chat_web

TOOL_MARKERS = {"<|python_start|>": ("<|python_end|>", "python"), "<|output_start|>": ("<|output_end|>", "python_output")}
# how chat_cli and the chat page show a tool call to people: <|python_start|>12*7<|python_end|>
# <|output_start|>84<|output_end|> reads as [calculator: 12*7 -> 84]
SHOWN_MARKERS = {"<|python_start|>": "[calculator: ", "<|python_end|>": "", "<|output_start|>": " -> ", "<|output_end|>": "]"}
_MARKER = re.compile("|".join(map(re.escape, SHOWN_MARKERS)))


def shown(text: str) -> str:
    """`text` as people see it: tool markers replaced by SHOWN_MARKERS (the chat page's JS does the same)."""
    return _MARKER.sub(lambda m: SHOWN_MARKERS[m.group()], text)


def assistant_parts(text: str):
    """An assistant reply as shown to people (tool calls appear as their special-token markers,
    which is what `tokenizer.decode` writes) -> the content for a conversation: a plain str when
    there are no tool calls, else a list of text / python / python_output parts. This lets a
    client send a reply back as history and the model see the same tokens it produced."""
    if not any(m in text for m in TOOL_MARKERS):
        return text
    parts, i = [], 0
    while i < len(text):
        starts = [(text.find(m, i), m) for m in TOOL_MARKERS if text.find(m, i) >= 0]
        if not starts:
            parts.append({"type": "text", "text": text[i:]})
            break
        j, marker = min(starts)
        if j > i:
            parts.append({"type": "text", "text": text[i:j]})
        end_marker, kind = TOOL_MARKERS[marker]
        k = text.find(end_marker, j)
        k = len(text) if k < 0 else k  # an unclosed block runs to the end
        parts.append({"type": kind, "text": text[j + len(marker):k]})
        i = k + len(end_marker)
    return parts


def chat_prompt(tokenizer, messages) -> list[int]:
    """Token ids that prime the model to answer `messages` (dicts with role and content, the
    OpenAI shape): assistant replies are split back into tool parts by assistant_parts."""
    messages = [dict(m, content=assistant_parts(m["content"])) if m["role"] == "assistant" and isinstance(m["content"], str)
                else m for m in messages]
    return tokenizer.render_for_completion({"messages": messages})


class StreamDecoder:
    """Turns a stream of token ids into text pieces without splitting a UTF-8 character:
    a token can end in the middle of a multi-byte character, so text that ends in U+FFFD is
    held back (up to 4 tokens, the longest UTF-8 sequence) until the next token completes it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = []  # ids not yet turned into text
        self.pieces = []

    def add(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        self.pieces.append(text)
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        self.pieces.append(text)
        return text

    def text(self) -> str:
        return "".join(self.pieces) + (self.tokenizer.decode(self.pending) if self.pending else "")
