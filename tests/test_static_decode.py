"""The static-shape decode step (GPT.decode_step) and the engine's static and CUDA-graph decode
modes: the same logits and the same tokens as the dynamic path. Tiny random models; the CPU
tests take a few seconds, the gpu ones run the CUDA graphs themselves."""

import pytest
import torch
import torch.nn as nn

import engine as engine_module
import model as model_module
from conftest import assert_close
from engine import Engine, StaticDecoder
from model import GPT, GPTConfig, KVCache
from test_engine import TEXT, make_model, make_tokenizer, naive_greedy, script

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))


def random_gpt(n_head=4, n_kv_head=2, n_embd=64, vocab_size=100, sequence_len=256, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=n_head,
                          n_kv_head=n_kv_head, n_embd=n_embd))
    model.init_weights()
    with torch.no_grad():  # zero output projections would hide attention bugs
        for p in model.parameters():
            p.normal_(std=0.5 if p is model.wte.weight else 0.2)
    return model.eval()


def new_cache(model, batch, seq_len, dtype=torch.float32, device="cpu"):
    c = model.config
    return KVCache(batch, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, device, dtype)


# ---------------------------------------------------------------------------
# GPT.decode_step == GPT.forward


@pytest.mark.parametrize("n_kv_head, sdpa_gqa", [(4, True), (2, True), (1, True), (2, False)])
def test_decode_step_matches_forward_across_windows(n_kv_head, sdpa_gqa, monkeypatch):
    """Positions 60..139 cross the 64 and 128 windows; batch 3; stale garbage in the cache past
    the position must not leak into attention (the mask hides it)."""
    monkeypatch.setattr(model_module, "SDPA_HAS_GQA", sdpa_gqa)
    model = random_gpt(n_kv_head=n_kv_head)
    x = torch.randint(0, 100, (3, 140), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = new_cache(model, 3, 256)
        cache.k.normal_(std=100.0)  # garbage everywhere: a mask bug would show
        cache.v.normal_(std=100.0)
        model(x[:, :60], kv_cache=cache)  # prefill with the dynamic path
        assert cache.pos == 60
        windows = set()
        for t in range(60, 140):
            window = min(max(engine_module.next_pow2(t + 1), engine_module.MIN_WINDOW), 256)  # as the engine does
            windows.add(window)
            logits = model.decode_step(x[:, t:t + 1], cache, torch.tensor([t]), window)
            assert logits.shape == (3, 100) and logits.dtype == torch.float32
            assert_close(logits, full[:, t], atol=1e-4, rtol=1e-4, msg=f"position {t}")
        assert cache.pos == 60  # the caller owns the position
        # the whole cache as the window (positions up to 255 hold garbage) gives the same logits
        logits = model.decode_step(x[:, 139:140], cache, torch.tensor(139), 256)
        assert_close(logits, full[:, 139], atol=1e-4, rtol=1e-4)
    assert windows == {64, 128, 256}
    # the keys written at tensor positions are those the dynamic path writes
    with torch.no_grad():
        dynamic = new_cache(model, 3, 256)
        model(x, kv_cache=dynamic)
    assert_close(cache.k[:, :, :, :140], dynamic.k[:, :, :, :140], atol=1e-5, rtol=1e-5)
    assert_close(cache.v[:, :, :, :140], dynamic.v[:, :, :, :140], atol=1e-5, rtol=1e-5)


def test_decode_step_overwrites_its_position_and_checks_shapes():
    model = random_gpt()
    x = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = new_cache(model, 2, 64)
        model(x[:, :9], kv_cache=cache)
        model.decode_step(torch.tensor([[5], [7]]), cache, torch.tensor([9]), 64)  # other tokens first
        logits = model.decode_step(x[:, 9:], cache, torch.tensor([9]), 64)  # overwrite position 9
        assert_close(logits, full[:, 9], atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="attend_len"):
            model.decode_step(x[:, 9:], cache, torch.tensor([9]), 65)
        with pytest.raises(ValueError, match="batch"):
            model.decode_step(x[:, 8:], cache, torch.tensor([9]), 64)


def test_decode_step_in_bf16():
    """bf16 weights and cache (what the engine runs on a GPU): the mask is cast to bf16, and the
    logits stay those of the bf16 forward."""
    model = random_gpt().to(torch.bfloat16)
    x = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = new_cache(model, 2, 64, dtype=torch.bfloat16)
        model(x[:, :12], kv_cache=cache)
        steps = [model.decode_step(x[:, t:t + 1], cache, torch.tensor([t]), 64) for t in range(12, 20)]
        dynamic = new_cache(model, 2, 64, dtype=torch.bfloat16)
        model(x[:, :12], kv_cache=dynamic)
        expected = [model(x[:, t:t + 1], kv_cache=dynamic)[:, -1] for t in range(12, 20)]
    for got, want in zip(steps, expected):
        assert got.dtype == torch.float32
        assert (got - want).abs().max() < 0.05 * want.abs().max()


# ---------------------------------------------------------------------------
# The engine: static mode == eager mode, token for token


class StubTokenizer:
    """Special tokens outside the model's vocab: a random model never stops early."""

    def __init__(self, vocab_size):
        names = ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                 "<|output_end|>"]
        self.ids = {name: vocab_size + i for i, name in enumerate(names)}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]


def long_prompt(n, vocab=100, seed=4):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("num_samples", [1, 3])
def test_static_engine_equals_eager_across_windows(num_samples):
    model = random_gpt()
    tok = StubTokenizer(100)
    prompt = long_prompt(50)  # positions 50..148: windows 64, 128 and 256
    eager, eager_masks = Engine(model, tok, decode="eager").generate_batch(prompt, num_samples, max_tokens=100,
                                                                           temperature=0.0)
    engine = Engine(model, tok, decode="static")
    static, static_masks = engine.generate_batch(prompt, num_samples, max_tokens=100, temperature=0.0)
    assert static == eager and static_masks == eager_masks
    assert all(len(row) == 150 for row in static)
    assert len(set(static[0][50:])) > 10  # the check has teeth: the model does not repeat one token
    decoder, = engine._decoders.values()
    assert decoder.cache.seq_len == 256 and not decoder.busy
    # kept for the next call: another prompt, in a cache that still holds the first reply's keys
    other = long_prompt(40, seed=9)
    expected, _ = Engine(model, tok, decode="eager").generate_batch(other, num_samples, max_tokens=100, temperature=0.0)
    assert engine.generate_batch(other, num_samples, max_tokens=100, temperature=0.0)[0] == expected
    assert list(engine._decoders.values()) == [decoder]


def test_static_engine_matches_naive_recompute_with_the_real_tokenizer():
    tok = make_tokenizer()
    model = make_model(tok.get_vocab_size())
    engine = Engine(model, tok, decode="static")
    for prompt in ([tok.get_bos_token_id()], tok.encode(TEXT[:300], prepend="<|bos|>")):
        expected = naive_greedy(model, prompt, 24, engine.stop_tokens)
        for num_samples in (1, 2):
            results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=24, temperature=0.0)
            assert all(row[len(prompt):] == expected for row in results)


def test_static_engine_sampling_is_seeded_like_eager():
    model = random_gpt()
    tok = StubTokenizer(100)
    prompt = long_prompt(30)
    kw = dict(num_samples=4, max_tokens=40, temperature=1.0, top_k=20, seed=11)
    static = Engine(model, tok, decode="static")
    a, _ = static.generate_batch(prompt, **kw)
    assert a == static.generate_batch(prompt, **kw)[0]
    assert len(set(map(tuple, a))) > 1
    assert a == Engine(model, tok, decode="eager").generate_batch(prompt, **kw)[0]


class ScriptedStatic(nn.Module):
    """The real model (both decode paths), with the token at given absolute positions forced per
    row: scripts[row][position] = token. Records every (position, ids) the model was fed."""

    def __init__(self, model, scripts):
        super().__init__()
        self.inner, self.config, self.scripts = model, model.config, scripts
        self.fed = []

    @property
    def cos(self):  # the rotary table the engine watches (see StaticDecoder.step)
        return self.inner.cos

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
        self._force(logits if positions is not None else logits[:, -1], next_pos)
        return logits

    def decode_step(self, idx, kv_cache, pos, attend_len):
        self.fed.append((int(pos), idx.clone()))
        logits = self.inner.decode_step(idx, kv_cache, pos, attend_len).clone()
        self._force(logits, int(pos) + 1)
        return logits


def test_tool_call_forced_tokens_in_static_mode():
    """Forced tool output: the engine runs step t+1 on the sampled tokens before it reads them,
    except where a tool forces a token; the results equal the eager engine's, and the model is fed
    every position once, the forced tokens included."""
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
    for mode in ("eager", "static"):
        scripted = ScriptedStatic(model, scripts)
        runs[mode] = Engine(scripted, tok, decode=mode).generate_batch(prompt, num_samples=2, max_tokens=60,
                                                                        temperature=0.0), scripted.fed
    (results, masks), fed = runs["static"]
    assert (results, masks) == runs["eager"][0]
    for r, (row, mask, call, out) in enumerate(zip(results, masks, calls, forced)):
        assert row[P:] == call + out + tail[:-1]
        assert mask[P:] == [1] * len(call) + [0] * len(out) + [1] * (len(tail) - 1)
        fed_row = {pos: int(ids[r, 0]) for pos, ids in fed[1:]}
        assert [fed_row[p] for p in range(P, len(row))] == row[P:]
    positions = [pos for pos, _ in fed[1:]]
    assert positions == list(range(P, P + len(positions)))  # each position once, in order


def test_static_engine_hands_over_to_eager_when_the_cache_is_full():
    """max_tokens beyond the context: the static cache (64 positions here) fills up, the eager
    path takes over and grows it; the decoder, whose cache was replaced, is not kept."""
    tok = StubTokenizer(100)
    model = random_gpt(sequence_len=16)
    prompt = long_prompt(12)
    expected, _ = Engine(model, tok, decode="eager").generate_batch(prompt, max_tokens=80, temperature=0.0)
    engine = Engine(model, tok, decode="static")
    results, _ = engine.generate_batch(prompt, max_tokens=80, temperature=0.0)
    assert results == expected and len(results[0]) == 92
    assert not engine._decoders
    short, _ = engine.generate_batch(prompt, max_tokens=20, temperature=0.0)
    assert short[0] == expected[0][:32] and len(engine._decoders) == 1


def test_a_live_generator_keeps_its_decoder():
    """Two streams of one engine at once: the second may not reuse the first one's cache."""
    model = random_gpt()
    tok = StubTokenizer(100)
    first, second = long_prompt(20, seed=5), long_prompt(20, seed=6)
    eager = Engine(model, tok, decode="eager")
    want_first = eager.generate_batch(first, max_tokens=30, temperature=0.0)[0][0]
    want_second = eager.generate_batch(second, max_tokens=30, temperature=0.0)[0][0]
    engine = Engine(model, tok, decode="static")
    stream = engine.generate(first, max_tokens=30, temperature=0.0)
    head = [next(stream)[0][0] for _ in range(10)]
    assert engine.generate_batch(second, max_tokens=30, temperature=0.0)[0][0] == want_second
    assert first + head + [column[0] for column, _ in stream] == want_first
    assert not any(d.busy for d in engine._decoders.values())
    # a consumer that stops early (a chat_web client that disconnects) frees the decoder too
    stream = engine.generate(first, max_tokens=30, temperature=0.0)
    next(stream)
    assert any(d.busy for d in engine._decoders.values())
    stream.close()
    assert not any(d.busy for d in engine._decoders.values())


def test_decoders_are_bounded_and_keyed_by_batch_and_length(monkeypatch):
    monkeypatch.setattr(engine_module, "MAX_DECODERS", 2)
    model = random_gpt()
    tok = StubTokenizer(100)
    engine = Engine(model, tok, decode="static")
    for num_samples, max_tokens in ((1, 10), (2, 10), (1, 10), (1, 100)):
        engine.generate_batch(long_prompt(20), num_samples, max_tokens=max_tokens, temperature=0.0)
    assert list(engine._decoders) == [(1, 64, False), (1, 128, False)]


def test_decode_mode_choice():
    model = random_gpt()
    tok = StubTokenizer(100)
    with pytest.raises(ValueError, match="decode must be"):
        Engine(model, tok, decode="fast")
    with pytest.raises(ValueError, match="CUDA"):
        list(Engine(model, tok, decode="graph").generate([1, 2], max_tokens=2))
    engine = Engine(model, tok)  # auto: eager on CPU
    engine.generate_batch([1, 2, 3], max_tokens=5, temperature=0.0)
    assert not engine._decoders


def test_fp32_model_runs_a_bf16_copy_that_follows_the_weights(monkeypatch):
    """Where the engine computes in bf16 (a GPU) an fp32 model runs as a bf16 copy, made once and
    refreshed when the model's weights change in place; the model itself stays fp32."""
    monkeypatch.setattr(Engine, "_compute_dtype", lambda self: torch.bfloat16)
    model = random_gpt()
    tok = StubTokenizer(100)
    engine = Engine(model, tok, decode="static")
    out, _ = engine.generate_batch(long_prompt(20), max_tokens=8, temperature=0.0)
    runner = engine._copy
    assert runner is not None and runner is not model
    assert all(p.dtype == torch.bfloat16 for p in runner.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(runner.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    decoder, = engine._decoders.values()
    assert decoder.cache.k.dtype == torch.bfloat16
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # an in-place update (an optimizer step, load_state_dict)
    flipped, _ = engine.generate_batch(long_prompt(20), max_tokens=8, temperature=0.0)
    assert engine._copy is runner and list(engine._decoders.values()) == [decoder]  # refreshed in place
    assert torch.equal(runner.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert flipped != out
    model.lm_head.weight.data = model.lm_head.weight.data.clone()  # moved: copy and decoders rebuilt
    engine.generate_batch(long_prompt(20), max_tokens=8, temperature=0.0)
    assert engine._copy is not runner and list(engine._decoders.values()) != [decoder]


class FakeGraphDecoder(StaticDecoder):
    """The graph mode's bookkeeping on CPU: a "graph" whose replay recomputes the step into the
    one output tensor it returned at capture (NaN until the first replay, as a real capture leaves
    it undefined), so an engine that used logits after a later replay, or before any, would fail."""

    replays = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_graphs = True

    def _capture(self, window):
        decode = lambda: self.decode_step(self.idx, self.cache, self.pos, window)
        logits = decode().fill_(float("nan"))
        class Graph:
            def replay(self):
                FakeGraphDecoder.replays += 1
                logits.copy_(decode())

        self.graphs[window] = (Graph(), logits)
        self.captured = sorted(self.graphs)


def test_graph_mode_bookkeeping_with_a_fake_graph(monkeypatch):
    """One static output per window, overwritten by every replay: the tokens must still be the
    eager engine's, tool calls included."""
    monkeypatch.setattr(engine_module, "StaticDecoder", FakeGraphDecoder)
    monkeypatch.setattr(FakeGraphDecoder, "replays", 0)
    tok = make_tokenizer()
    model = make_model(tok.get_vocab_size())
    special = tok.encode_special
    prompt = tok.encode(TEXT[:200], prepend="<|bos|>")
    P = len(prompt)  # 79: windows 128, then 256
    call = [special("<|python_start|>"), *tok.encode("12+30"), special("<|python_end|>")]
    scripts = [script(P + 3, call), script(P + 40, call)]  # forced output around the 128 boundary too
    results = {}
    for mode in ("eager", "static"):
        engine = Engine(ScriptedStatic(model, scripts), tok, decode=mode)
        results[mode] = engine.generate_batch(prompt, num_samples=2, max_tokens=70, temperature=0.0)
    assert results["static"] == results["eager"]
    decoder, = engine._decoders.values()
    windows = sorted({decoder.window(pos) for pos in range(P, P + 69)})
    assert isinstance(decoder, FakeGraphDecoder) and decoder.captured == windows and len(windows) == 2
    assert FakeGraphDecoder.replays == 69  # one replay per fed position: none wasted on a forced step
    assert any(m == 0 for m in results["static"][1][0][P:])  # the tool output was forced



def test_graphs_are_recaptured_when_the_rotary_tables_grow(monkeypatch):
    """A prompt longer than the rotary tables makes the model replace them; a kept decoder's graphs
    read the old ones (freed memory on a GPU), so they must be captured again."""
    monkeypatch.setattr(engine_module, "StaticDecoder", FakeGraphDecoder)
    model = random_gpt(sequence_len=16)  # rotary tables of 160 positions
    tok = StubTokenizer(100)
    engine = Engine(model, tok, decode="static")
    short = long_prompt(20)
    first = engine.generate_batch(short, max_tokens=8, temperature=0.0)[0]
    decoder, = engine._decoders.values()
    old_tables, captures = model.cos, []
    capture = decoder._capture
    monkeypatch.setattr(decoder, "_capture", lambda window: (captures.append(window), capture(window)))
    engine.generate_batch(long_prompt(200, seed=9), max_tokens=2, temperature=0.0)  # grows the tables
    assert model.cos is not old_tables
    assert engine.generate_batch(short, max_tokens=8, temperature=0.0)[0] == first
    assert captures == [64]  # the kept decoder captured its window again

# ---------------------------------------------------------------------------
# compile_decode: the static step under torch.compile


@pytest.fixture
def fresh_dynamo():
    yield
    torch._dynamo.reset()


def compiled_engine_equals_eager(model, prompt, max_tokens):
    """A static engine with the compiled step gives the eager engine's greedy tokens for 2 samples;
    -> (that engine, the tokens)."""
    tok = StubTokenizer(100)
    expected, _ = Engine(model, tok, decode="eager").generate_batch(prompt, 2, max_tokens=max_tokens, temperature=0.0)
    engine = Engine(model, tok, decode="static", compile_decode=True)
    assert engine.generate_batch(prompt, 2, max_tokens=max_tokens, temperature=0.0)[0] == expected
    return engine, expected


def test_compiled_decode_step_traces_as_one_graph(monkeypatch, fresh_dynamo):
    """Dynamo only (backend="eager": no code generation, a few seconds): the static step must
    trace without a graph break (fullgraph=True raises on one) and give the eager tokens."""
    compile_ = torch.compile
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **kw, backend=backend))
    model = random_gpt()
    tok = StubTokenizer(100)
    prompt = long_prompt(20)
    compiled_engine_equals_eager(model, prompt, max_tokens=30)
    assert len(graphs) == 1  # one window (64), one shape: traced once, every position replays it
    with pytest.raises(ValueError, match="compile_decode"):
        list(Engine(model, tok, compile_decode=True).generate(prompt, max_tokens=2))  # auto on CPU = eager
    # a reply through windows 64, 128, 256: the window size becomes symbolic at the second window,
    # so the third reuses it (2 compilations); batch 1 then compiles once more (dynamo always
    # specialises size 1)
    graphs.clear()
    engine, expected = compiled_engine_equals_eager(random_gpt(sequence_len=512), prompt, max_tokens=200)
    assert len(graphs) == 2, len(graphs)
    assert engine.generate_batch(prompt, 1, max_tokens=200, temperature=0.0)[0] == expected[:1]
    assert len(graphs) == 3, len(graphs)


@pytest.mark.slow
def test_compiled_static_engine_equals_eager(fresh_dynamo):
    """Inductor for real (C++ on CPU; ~10 s to compile): the same tokens as the eager engine, and
    the cache written in place (the second call reuses the compiled step and its cache)."""
    prompt = long_prompt(20)
    engine, expected = compiled_engine_equals_eager(random_gpt(), prompt, max_tokens=30)
    assert engine.generate_batch(prompt, 2, max_tokens=30, temperature=0.0)[0] == expected


# ---------------------------------------------------------------------------
# CUDA graphs (run these on the GPU machine: pytest -m gpu tests/test_static_decode.py)


def cuda_model(**kw):
    return random_gpt(**kw).cuda()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_samples", [1, 3])
def test_cuda_graph_engine_equals_eager_in_fp32(num_samples, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_DTYPE", "float32")  # the same arithmetic on both paths
    model = cuda_model()
    tok = StubTokenizer(100)
    prompt = long_prompt(50)
    eager, _ = Engine(model, tok, decode="eager").generate_batch(prompt, num_samples, max_tokens=100, temperature=0.0)
    engine = Engine(model, tok, decode="graph")
    graph, _ = engine.generate_batch(prompt, num_samples, max_tokens=100, temperature=0.0)
    assert graph == eager
    decoder, = engine._decoders.values()
    assert sorted(decoder.graphs) == [64, 128, 256]  # one graph per window crossed
    again, _ = engine.generate_batch(prompt, num_samples, max_tokens=100, temperature=0.0)  # replayed, not recaptured
    assert again == eager and list(engine._decoders.values()) == [decoder]


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_the_static_step_exactly_in_bf16():
    """An fp32 model on a bf16 GPU runs as a bf16 copy: the graph replays the kernels of the
    static eager step, so the greedy tokens are the same."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs SM80+")
    model = cuda_model()
    tok = StubTokenizer(100)
    prompt = long_prompt(50)
    static, _ = Engine(model, tok, decode="static").generate_batch(prompt, 4, max_tokens=100, temperature=0.0)
    graph, _ = Engine(model, tok, decode="graph").generate_batch(prompt, 4, max_tokens=100, temperature=0.0)
    assert graph == static
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_decode_step_logits_match_eager_decode_step():
    model = cuda_model(n_kv_head=1)
    x = torch.randint(0, 100, (2, 80), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        full = model(x)
        decoder = StaticDecoder(model, new_cache(model, 2, 128, device="cuda"), graphs=True)
        model(x[:, :60], kv_cache=decoder.cache)
        for t in range(60, 80):  # crosses the 64 window
            logits = decoder.step(x[:, t], t)
            assert_close(logits, full[:, t], atol=1e-3, rtol=1e-3, msg=f"position {t}")
        assert sorted(decoder.graphs) == [64, 128]


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_of_the_compiled_step_equals_eager(monkeypatch, fresh_dynamo):
    """decode="graph" with compile_decode: inductor's kernels captured in our CUDA graphs."""
    monkeypatch.setenv("SPEEDCHAT_DTYPE", "float32")
    model = cuda_model()
    tok = StubTokenizer(100)
    prompt = long_prompt(20)  # one window (64): one compilation
    eager, _ = Engine(model, tok, decode="eager").generate_batch(prompt, 2, max_tokens=40, temperature=0.0)
    engine = Engine(model, tok, decode="graph", compile_decode=True)
    for _ in range(2):
        assert engine.generate_batch(prompt, 2, max_tokens=40, temperature=0.0)[0] == eager


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_tool_calls_and_cache_handover(monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_DTYPE", "float32")
    tok = make_tokenizer()
    model = make_model(tok.get_vocab_size()).cuda()
    special = tok.encode_special
    prompt = tok.encode("How many r in strawberry?", prepend="<|bos|>") + [special("<|assistant_start|>")]
    P = len(prompt)
    call = [special("<|python_start|>"), *tok.encode("12+30"), special("<|python_end|>")]
    out = [special("<|output_start|>"), *tok.encode("42"), special("<|output_end|>")]
    scripts = [script(P, call)] * 2
    results = {}
    for mode in ("eager", "graph"):
        engine = Engine(ScriptedGraphable(model, scripts), tok, decode=mode)
        results[mode] = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    assert results["graph"] == results["eager"]
    assert results["graph"][0][0][P:P + len(call) + len(out)] == call + out
    # past the context: the graphed decoder hands over to the eager path
    small = cuda_model(sequence_len=16)
    stub = StubTokenizer(100)
    expected, _ = Engine(small, stub, decode="eager").generate_batch(long_prompt(12), max_tokens=80, temperature=0.0)
    engine = Engine(small, stub, decode="graph")
    assert engine.generate_batch(long_prompt(12), max_tokens=80, temperature=0.0)[0] == expected
    assert not engine._decoders


class ScriptedGraphable(ScriptedStatic):
    """ScriptedStatic whose decode_step forces its tokens on the device (a table lookup at pos + 1
    and a where), so that it can be captured in a CUDA graph (int(pos) would sync)."""

    def __init__(self, model, scripts, max_len=512):
        super().__init__(model, scripts)
        table = torch.full((len(scripts), max_len), -1, dtype=torch.long)  # -1: not forced
        for row, s in enumerate(scripts):
            for p, token in s.items():
                table[row, p] = token
        self.table = table.to(next(model.parameters()).device)

    def decode_step(self, idx, kv_cache, pos, attend_len):
        logits = self.inner.decode_step(idx, kv_cache, pos, attend_len)
        forced = self.table[:idx.size(0)].index_select(1, pos.reshape(1) + 1)  # (rows, 1)
        vocab = torch.arange(logits.size(-1), device=logits.device)
        return torch.where(forced >= 0, torch.where(vocab == forced, 10.0, -1e9), logits)
