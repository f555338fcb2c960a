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

Two decode paths (Engine(decode=...)): "eager", the plain loop model(ids, kv_cache=cache), the
reference (CPU, tests); and "compiled", GPT.decode_step over one static cache, compiled by
torch.compile(mode="reduce-overhead") (the default on CUDA; see CompiledDecoder for why).
"""

import bisect
import copy
import re
from collections import deque

import torch
import torch.nn as nn

from calculator import calculator
from common import get_dtype
from attention import KVCache

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
DECODE_MODES = ("auto", "eager", "compiled")


class CompiledDecoder:
    """GPT.decode_step over one static KV cache of the model's whole context, compiled with
    torch.compile(mode="reduce-overhead"), which fuses the step and captures it as a CUDA graph.

    Why this and not hand-captured CUDA graphs: batch-1 decoding is bound by kernel launches, not
    FLOPs (an eager step is several hundred small kernels). A graph of the eager step removes the
    launch cost but still runs every kernel; inductor also fuses the elementwise work (rotary, norms,
    residual scalars, gates, masks) into a few kernels per layer and captures the graph itself, as
    gpt-fast does, in a few lines instead of a hundred of capture, stream, pool and re-capture
    bookkeeping. The price is compile latency: the first reply of a process (per batch size) waits
    for a compilation of tens of seconds (--decode eager avoids it). Sliding windows need nothing
    more: each layer's mask comes from the position tensor on the device, over the one cache, so a
    single compiled step serves every position (no per-length shapes, no recompilation). Reading the
    whole cache costs, at d24 and batch 1, ~0.3 GB of keys/values per token next to ~1.5 GB of
    weights (an estimate); caches sized per reply length would trade that for a recompilation."""

    def __init__(self, model, cache):
        self.cache = cache
        self.idx = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.k.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=cache.k.device)
        for tensor in (cache.k, cache.v, cache.prev, self.idx, self.pos):  # the graph reads and writes
            torch._dynamo.mark_static_address(tensor)  # them in place, never copies them in
        self.step_fn = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)
        self.busy = False  # a live generate() is using the cache

    def step(self, ids, pos):
        """Logits (B, V) for the tokens ids (B,) at cache position pos (a Python int < seq_len): the
        graph's output, overwritten by the next step."""
        self.idx.copy_(ids.view(-1, 1))
        self.pos.fill_(pos)  # a tiny kernel with pos as its argument: no host-to-device copy, no sync
        torch.compiler.cudagraph_mark_step_begin()
        return self.step_fn(self.idx, self.cache, self.pos)


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
    """Generation from a GPT (see the module docstring). decode: "eager" the plain KV-cached loop,
    "compiled" the CompiledDecoder (any device, but only a GPU repays its compilation), "auto"
    compiled on CUDA, eager elsewhere. The compiled path keeps its cache and compiled step per batch
    size for later calls; a call whose reply does not fit the model's context, or that finds the
    decoder busy with another live generate(), runs eager."""

    def __init__(self, model, tokenizer, decode="auto"):
        assert decode in DECODE_MODES, decode
        self.model, self.tokenizer, self.decode = model, tokenizer, decode
        special = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = special("<|assistant_end|>")
        self.python_start = special("<|python_start|>")
        self.python_end = special("<|python_end|>")
        self.output_start = special("<|output_start|>")
        self.output_end = special("<|output_end|>")
        self.stop_tokens = {self.assistant_end, self.bos}
        self._decoders = {}     # batch size -> CompiledDecoder
        self._weights = None    # where the model's weights were: see _runner
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
        step (about a millisecond at d20, more than a compiled decode step). The copy is made once
        and refreshed in place (the compiled graphs keep pointing at it) when the model's weights
        change in place, as seen by each tensor's _version, which optimizer steps and
        load_state_dict bump (a write through p.data is not seen); if the weights move (.to(), a
        new tensor), copy and decoders are rebuilt."""
        params = list(self.model.parameters())
        where = [p.data_ptr() for p in params]
        if where != self._weights:  # first call, or weights that moved: graphs would read stale memory
            self._decoders.clear()
            self._copy, self._weights = None, where
        dtype = self._compute_dtype()
        if all(p.dtype == dtype for p in params):
            return self.model
        versions = [p._version for p in params]
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable in any mode
            if self._copy is None:
                memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in params}
                self._copy = copy.deepcopy(self.model, memo)  # the modules, with cast weights
            elif versions != self._copy_versions:
                for source, target in zip(params, self._copy.parameters()):
                    target.copy_(source)
        self._copy_versions = versions
        return self._copy

    @property
    def compiles(self) -> bool:
        """Whether decode steps run through the compiled static step (auto: on CUDA)."""
        return self.decode == "compiled" or (self.decode == "auto" and self._device().type == "cuda")

    def _take_decoder(self, runner, batch, needed):
        """The compiled decoder for this batch size (made on first use), or None for the eager loop."""
        seq_len = self.model.config.sequence_len
        if not self.compiles or needed > seq_len:
            return None
        if batch not in self._decoders:
            self._decoders[batch] = CompiledDecoder(runner, self._new_cache(batch, seq_len))
        decoder = self._decoders[batch]
        if decoder.busy:
            return None
        decoder.busy = True
        return decoder

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
        last = torch.full((ids.size(0),), ids.size(1) - 1, dtype=torch.long, device=ids.device)
        return model(ids, kv_cache=cache, positions=last)

    def _new_cache(self, batch_size, seq_len):
        return KVCache(self.model.config, batch_size, seq_len, self._device(), self._compute_dtype())

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
        runner = self._runner()
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        if max_tokens is None:
            max_tokens = max(self.model.config.sequence_len - len(tokens), 1)
        if max_tokens <= 0:
            return
        needed = len(tokens) + max_tokens - 1  # cache positions the reply needs (the last token is not fed back)
        decoder = self._take_decoder(runner, num_samples, needed)
        # the eager cache holds up to one context's worth and grows by doubling past that
        room = min(needed, len(tokens) + self.model.config.sequence_len)
        try:
            cache, logits = self._prefill(runner, tokens, num_samples, room, decoder)
            rows = [_Row() for _ in range(num_samples)]
            reader = _ColumnReader(num_samples, device)
            pos = len(tokens)  # the cache position of the next token fed to the model
            sampled = sample_next(logits, generator, temperature, top_k, top_p)
            for step in range(max_tokens):
                last_step = step == max_tokens - 1
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
        finally:  # also when the caller stops iterating early
            if decoder is not None:
                decoder.busy = False

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

    def generate_batch(self, tokens, num_samples=1, keep_stop=False, **kwargs):
        """Non-streaming: (results, masks), one list per sample. Each result is the prompt
        followed by the generated tokens up to the stop token (included when keep_stop: RL trains
        on stopping too); masks are 0 over the prompt and forced tool output, 1 over sampled tokens."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                done[i] = token in self.stop_tokens
                if keep_stop or not done[i]:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks


# ---------------------------------------------------------------------------
# Loading a model to chat with (chat_cli, chat_web)

def add_model_flags(p, verb):
    """chat_cli's and chat_web's flags: which checkpoint to `verb`, where, and how the decode steps run."""
    p.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"],
                   help=f"which stage's checkpoint to {verb}")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. d20 (default: the latest written)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--device", default=None, help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--decode", default="auto", choices=DECODE_MODES,
                   help="compiled: one static decode step under torch.compile with CUDA graphs (fast tokens "
                        "after a compilation of tens of seconds on the first reply); eager: the plain KV-cached "
                        "loop; auto: compiled on CUDA, eager elsewhere")


def load_engine(source="sft", device="cpu", tag=None, step=None, decode="auto"):
    """(Engine, meta) for the latest (or given) checkpoint of stage `source` (checkpoint's UserError
    says which script to run when that stage has none yet)."""
    import checkpoint

    model, tokenizer, meta = checkpoint.load_model(source, device, tag=tag, step=step, phase="eval")
    return Engine(model, tokenizer, decode=decode), meta


# ---------------------------------------------------------------------------
# Conversations as people see them (chat_cli, chat_web)

# A calculator call reads [calculator: 12*7 -> 84]: the tokens <|python_start|>12*7<|python_end|>
# <|output_start|>84<|output_end|> as the terminal, the page and the API's `content` show them
SHOWN_MARKERS = {"<|python_start|>": "[calculator: ", "<|python_end|>": "", "<|output_start|>": " -> ", "<|output_end|>": "]"}
_MARKER = re.compile("|".join(map(re.escape, SHOWN_MARKERS)))
_SHOWN_CALL = re.compile(r"\[calculator: (.*?) -> (.*?)\]")


def shown(text: str) -> str:
    """Decoded text as people see it: tool markers replaced by SHOWN_MARKERS."""
    return _MARKER.sub(lambda m: SHOWN_MARKERS[m.group()], text)


def assistant_parts(text: str):
    """An assistant reply as shown (see shown) -> the content the model produced: a str when it made no
    calculator call, else text / python / python_output parts, so that a reply sent back as history
    gives the model the tokens it wrote. Only whole calls ([calculator: EXPR -> RESULT]) are read back;
    user messages are never parsed: people's text never becomes control tokens."""
    pieces = _SHOWN_CALL.split(text)  # text, expr, result, text, expr, result, ..., text
    if len(pieces) == 1:
        return text
    kinds = ("text", "python", "python_output")
    return [{"type": kinds[i % 3], "text": piece} for i, piece in enumerate(pieces) if piece or i % 3]


def chat_prompt(tokenizer, messages) -> list[int]:
    """Token ids that prime the model to answer `messages` (dicts with role and content, the
    OpenAI shape): assistant replies are read back into tool parts by assistant_parts."""
    messages = [dict(m, content=assistant_parts(m["content"])) if m["role"] == "assistant" and isinstance(m["content"], str)
                else m for m in messages]
    return tokenizer.render_for_completion({"messages": messages})


def fit_prompt(tokenizer, messages, budget: int):
    """(ids, dropped): the prompt for the newest whole turns of `messages` (which end with a user
    message) that fit in `budget` tokens, a leading system message always kept; `dropped` counts the
    oldest messages left out. ids is None when even the last user message does not fit."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head):]
    starts = range(0, len(body), 2)  # each start keeps a conversation that begins with a user message
    first = bisect.bisect_left(starts, True, key=lambda s: len(chat_prompt(tokenizer, head + body[s:])) <= budget)
    if first == len(starts):
        return None, len(body) - 1
    return chat_prompt(tokenizer, head + body[starts[first]:]), starts[first]


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
