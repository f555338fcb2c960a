"""The static decode step (GPT.decode_step) and the engine's compiled path: the same logits and the
same tokens as the plain KV-cached loop. On CPU the compiled path runs with torch.compile replaced
by the identity (its bookkeeping), traced by dynamo (no graph break), and once through inductor
(slow); the gpu tests run it with CUDA graphs."""

import pytest
import torch
import torch.nn as nn

from conftest import assert_close
from engine import Engine
from model import GPT, GPTConfig, KVCache
from test_engine import make_model, make_tokenizer, script

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_gpt(n_kv_head=2, sequence_len=256, seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(sequence_len=sequence_len, vocab_size=100, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)
    model = GPT(GPTConfig(**(config | overrides)))
    model.init_weights()
    with torch.no_grad():  # every weight matters (zero projections and scalars would hide bugs)
        for p in model.parameters():
            p.normal_(std=0.5 if p is model.wte.weight else 0.2)
    return model.eval()


def new_cache(model, batch, seq_len, dtype=torch.float32, device="cpu"):
    c = model.config
    return KVCache(batch, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, device, dtype)


def prompt_of(n, seed=4):
    return torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class StubTokenizer:
    """Special tokens outside the model's vocab: a random model never stops early."""

    def __init__(self, vocab_size=100):
        names = ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                 "<|output_end|>"]
        self.ids = {name: vocab_size + i for i, name in enumerate(names)}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]


@pytest.fixture
def uncompiled(monkeypatch):
    """The compiled path's code with the step run as written (torch.compile = identity)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)


def greedy(model, prompt, num_samples, max_tokens, decode, tok=None):
    return Engine(model, tok or StubTokenizer(), decode=decode).generate_batch(
        prompt, num_samples, max_tokens=max_tokens, temperature=0.0)


# ---------------------------------------------------------------------------
# GPT.decode_step == GPT.forward


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_decode_step_matches_forward(n_kv_head):
    """Batch 3 after a 60-token dynamic prefill; garbage in the cache past the position must not leak
    into attention, and the keys/values written are those the dynamic path writes."""
    model = random_gpt(n_kv_head=n_kv_head)
    x = torch.randint(0, 100, (3, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = new_cache(model, 3, 128)
        cache.k.normal_(std=100.0)
        cache.v.normal_(std=100.0)
        model(x[:, :60], kv_cache=cache)
        for t in range(60, 100):
            logits = model.decode_step(x[:, t:t + 1], cache, torch.tensor([t]))
            assert logits.shape == (3, 100) and logits.dtype == torch.float32
            assert_close(logits, full[:, t], atol=1e-4, rtol=1e-4, msg=f"position {t}")
        assert cache.pos == 60  # the caller owns the position
        dynamic = new_cache(model, 3, 128)
        model(x, kv_cache=dynamic)
    assert_close(cache.k[:, :, :, :100], dynamic.k[:, :, :, :100], atol=1e-5, rtol=1e-5)
    assert_close(cache.v[:, :, :, :100], dynamic.v[:, :, :, :100], atol=1e-5, rtol=1e-5)


def test_decode_step_in_bf16():
    """bf16 weights and cache (what the engine runs on a GPU): the logits of the bf16 forward."""
    model = random_gpt().to(torch.bfloat16)
    x = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache, dynamic = new_cache(model, 2, 64, torch.bfloat16), new_cache(model, 2, 64, torch.bfloat16)
        model(x[:, :12], kv_cache=cache)
        model(x[:, :12], kv_cache=dynamic)
        for t in range(12, 20):
            got = model.decode_step(x[:, t:t + 1], cache, torch.tensor([t]))
            want = model(x[:, t:t + 1], kv_cache=dynamic)[:, -1]
            assert got.dtype == torch.float32 and (got - want).abs().max() < 0.05 * want.abs().max()


# ---------------------------------------------------------------------------
# The engine's compiled path == its eager path, token for token


@pytest.mark.parametrize("num_samples", [1, 3])
def test_compiled_path_equals_eager(num_samples, uncompiled):
    model = random_gpt()
    prompt = prompt_of(50)
    eager = greedy(model, prompt, num_samples, 100, "eager")
    engine = Engine(model, StubTokenizer(), decode="compiled")
    fast = engine.generate_batch(prompt, num_samples, max_tokens=100, temperature=0.0)
    assert fast == eager and all(len(row) == 150 for row in fast[0])
    assert len(set(fast[0][0][50:])) > 10  # the check has teeth: the model does not repeat one token
    decoder, = engine._decoders.values()
    assert decoder.cache.seq_len == 256 and not decoder.busy
    # kept for the next call: another prompt, in a cache that still holds the first reply's keys
    other = prompt_of(40, seed=9)
    assert engine.generate_batch(other, num_samples, max_tokens=100, temperature=0.0) == \
        greedy(model, other, num_samples, 100, "eager")
    assert list(engine._decoders.values()) == [decoder]


def test_compiled_path_sampling_is_seeded_like_eager(uncompiled):
    model = random_gpt()
    kw = dict(num_samples=4, max_tokens=40, temperature=1.0, top_k=20, seed=11)
    fast = Engine(model, StubTokenizer(), decode="compiled")
    a, _ = fast.generate_batch(prompt_of(30), **kw)
    assert a == fast.generate_batch(prompt_of(30), **kw)[0] and len(set(map(tuple, a))) > 1
    assert a == Engine(model, StubTokenizer(), decode="eager").generate_batch(prompt_of(30), **kw)[0]


class ScriptedStatic(nn.Module):
    """The real model (both decode paths), with the token at given absolute positions forced per
    row: scripts[row][position] = token. Records every (position, ids) the model was fed."""

    def __init__(self, model, scripts):
        super().__init__()
        self.inner, self.config, self.scripts = model, model.config, scripts
        self.fed = []

    def _force(self, last, next_pos):
        for row in range(last.size(0)):
            token = self.scripts[row].get(next_pos)
            if token is not None:
                last[row] = -1e9
                last[row, token] = 10.0

    def forward(self, idx, kv_cache=None, positions=None):
        self.fed.append((kv_cache.pos, idx.clone()))
        next_pos = kv_cache.pos + idx.size(1)
        logits = self.inner(idx, kv_cache=kv_cache, positions=positions).clone()
        self._force(logits, next_pos)
        return logits

    def decode_step(self, idx, kv_cache, pos):
        self.fed.append((int(pos), idx.clone()))
        logits = self.inner.decode_step(idx, kv_cache, pos).clone()
        self._force(logits, int(pos) + 1)
        return logits


def test_tool_call_forced_tokens_in_the_compiled_path(uncompiled):
    """The compiled path runs step t+1 on the sampled tokens before it reads them, except where a
    tool forces a token: results equal the eager engine's, and every position is fed once, in order."""
    tok = make_tokenizer()
    model = make_model(tok.get_vocab_size())
    special = tok.encode_special
    prompt = tok.encode("How many r in strawberry?", prepend="<|bos|>") + [special("<|assistant_start|>")]
    P = len(prompt)
    py = lambda expr: [special("<|python_start|>"), *tok.encode(expr), special("<|python_end|>")]
    calls = [py("12+30"), py("'strawberry'.count('r')")]
    forced = [[special("<|output_start|>"), *tok.encode("42"), special("<|output_end|>")],
              [special("<|output_start|>"), *tok.encode("3"), special("<|output_end|>")]]
    tail = tok.encode(" ok") + [special("<|assistant_end|>")]
    scripts = [script(P, c) | script(P + len(c) + len(f), tail) for c, f in zip(calls, forced)]
    runs = {}
    for mode in ("eager", "compiled"):
        scripted = ScriptedStatic(model, scripts)
        runs[mode] = (Engine(scripted, tok, decode=mode).generate_batch(prompt, 2, max_tokens=60, temperature=0.0),
                      scripted.fed)
    (results, masks), fed = runs["compiled"]
    assert (results, masks) == runs["eager"][0]
    for r, (row, mask, call, out) in enumerate(zip(results, masks, calls, forced)):
        assert row[P:] == call + out + tail[:-1]
        assert mask[P:] == [1] * len(call) + [0] * len(out) + [1] * (len(tail) - 1)
        fed_row = {pos: int(ids[r, 0]) for pos, ids in fed[1:]}
        assert [fed_row[p] for p in range(P, len(row))] == row[P:]
    positions = [pos for pos, _ in fed[1:]]
    assert positions == list(range(P, P + len(positions)))


def test_replies_past_the_context_and_concurrent_streams_run_eager(uncompiled):
    """A reply longer than the model's context, or a second live stream while the decoder is busy,
    takes the eager path (which grows its own cache) and still gives the eager tokens."""
    model = random_gpt(sequence_len=16)
    engine = Engine(model, StubTokenizer(), decode="compiled")
    long = engine.generate_batch(prompt_of(12), max_tokens=80, temperature=0.0)
    assert long == greedy(model, prompt_of(12), 1, 80, "eager") and len(long[0][0]) == 92
    assert not engine._decoders
    first, second = prompt_of(6, seed=5), prompt_of(6, seed=6)
    stream = engine.generate(first, max_tokens=10, temperature=0.0)
    head = [next(stream)[0][0] for _ in range(4)]
    decoder, = engine._decoders.values()
    assert decoder.busy
    assert engine.generate_batch(second, max_tokens=10, temperature=0.0) == greedy(model, second, 1, 10, "eager")
    assert first + head + [column[0] for column, _ in stream] == greedy(model, first, 1, 10, "eager")[0][0]
    stream = engine.generate(first, max_tokens=10, temperature=0.0)
    next(stream)
    stream.close()  # a chat_web client that goes away frees the decoder too
    assert not decoder.busy


def test_fp32_model_runs_a_bf16_copy_that_follows_the_weights(monkeypatch, uncompiled):
    """Where the engine computes in bf16 (a GPU) an fp32 model runs as a bf16 copy, made once and
    refreshed in place when the model's weights change in place; rebuilt when they move."""
    monkeypatch.setattr(Engine, "_compute_dtype", lambda self: torch.bfloat16)
    model = random_gpt()
    engine = Engine(model, StubTokenizer(), decode="compiled")
    out, _ = engine.generate_batch(prompt_of(20), max_tokens=8, temperature=0.0)
    runner = engine._copy
    assert all(p.dtype == torch.bfloat16 for p in runner.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    decoder, = engine._decoders.values()
    assert decoder.cache.k.dtype == torch.bfloat16
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # an in-place update (an optimizer step, load_state_dict)
    flipped, _ = engine.generate_batch(prompt_of(20), max_tokens=8, temperature=0.0)
    assert engine._copy is runner and list(engine._decoders.values()) == [decoder] and flipped != out
    assert torch.equal(runner.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    model.lm_head.weight.data = model.lm_head.weight.data.clone()  # moved: copy and decoders rebuilt
    engine.generate_batch(prompt_of(20), max_tokens=8, temperature=0.0)
    assert engine._copy is not runner and list(engine._decoders.values()) != [decoder]


# ---------------------------------------------------------------------------
# Under torch.compile


@pytest.fixture
def fresh_dynamo():
    yield
    torch._dynamo.reset()


def test_compiled_step_traces_as_one_graph(monkeypatch, fresh_dynamo):
    """Dynamo only (backend="eager": no code generation, a few seconds): the step traces without a
    graph break (fullgraph=True raises on one), once for every position of a reply."""
    graphs = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(
        fn, fullgraph=kw["fullgraph"], backend=lambda gm, inputs: graphs.append(gm) or gm.forward))
    model = random_gpt()
    assert greedy(model, prompt_of(20), 2, 30, "compiled") == greedy(model, prompt_of(20), 2, 30, "eager")
    assert len(graphs) == 1


@pytest.mark.slow
def test_inductor_compiled_engine_equals_eager(fresh_dynamo):
    """Inductor for real (C++ on CPU, ~10 s to compile): the eager tokens, and the cache written in
    place (the second call reuses the compiled step and its cache)."""
    model = random_gpt()
    engine = Engine(model, StubTokenizer(), decode="compiled")
    expected = greedy(model, prompt_of(20), 2, 30, "eager")
    for _ in range(2):
        assert engine.generate_batch(prompt_of(20), 2, max_tokens=30, temperature=0.0) == expected


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_samples", [1, 3])
def test_cuda_compiled_engine_equals_eager(num_samples, monkeypatch, fresh_dynamo):
    """CUDA graphs through torch.compile, in fp32 (the same arithmetic on both paths), reused by a
    second call; and a tool call forced into the graphed path."""
    monkeypatch.setenv("SPEEDCHAT_DTYPE", "float32")
    model = random_gpt().cuda()
    eager = greedy(model, prompt_of(50), num_samples, 100, "eager")
    engine = Engine(model, StubTokenizer())  # auto: compiled on CUDA
    for _ in range(2):
        assert engine.generate_batch(prompt_of(50), num_samples, max_tokens=100, temperature=0.0) == eager
    assert len(engine._decoders) == 1


@pytest.mark.gpu
@needs_cuda
def test_cuda_compiled_engine_in_bf16_tracks_eager(fresh_dynamo):
    """An fp32 model on a bf16 GPU runs as a bf16 copy: the compiled step's greedy tokens agree with
    the eager loop's for a good stretch (a near-tie in bf16 may flip one later)."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs SM80+")
    model = random_gpt().cuda()
    eager = greedy(model, prompt_of(50), 4, 60, "eager")[0]
    fast = greedy(model, prompt_of(50), 4, 60, "compiled")[0]
    assert all(a[:70] == b[:70] for a, b in zip(fast, eager))
    assert next(model.parameters()).dtype == torch.float32
