"""The static decode step (GPT.decode_step) and the engine's compiled path: the same logits and the
same tokens as the plain KV-cached loop. On CPU the compiled path runs with torch.compile replaced
by the identity (its bookkeeping), traced by dynamo (no graph break), and once through inductor
(slow); the gpu tests run it with CUDA graphs."""

import pytest
import torch

from conftest import assert_close
from engine import Engine
from attention import KVCache
from model import GPT, GPTConfig
from test_engine import uncompiled  # noqa: F401 (a fixture)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_gpt(n_kv_head=2, sequence_len=256, seed=0, **overrides):
    """2 layers, windows 128 and all at the default context; every weight and scalar random."""
    torch.manual_seed(seed)
    config = dict(sequence_len=sequence_len, vocab_size=100, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)
    model = GPT(GPTConfig(**(config | overrides)))
    model.init_weights()
    with torch.no_grad():  # every weight matters (zero projections and scalars would hide bugs)
        for p in model.parameters():
            p.normal_(std=0.5 if p is model.wte.weight else 0.2)
    return model.eval()


def new_cache(model, batch, seq_len, dtype=torch.float32):
    return KVCache(model.config, batch, seq_len, "cpu", dtype)


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


def greedy(model, prompt, num_samples, max_tokens, decode, tok=None):
    return Engine(model, tok or StubTokenizer(), decode=decode).generate_batch(
        prompt, num_samples, max_tokens=max_tokens, temperature=0.0)


# ---------------------------------------------------------------------------
# GPT.decode_step == GPT.forward


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_decode_step_matches_forward(n_kv_head):
    """Batch 3 after a 60-token dynamic prefill, past the 128 window; garbage in the cache past the
    position must not leak into attention, and the keys/values written are those the dynamic path
    writes."""
    model = random_gpt(n_kv_head=n_kv_head)
    x = torch.randint(0, 100, (3, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = new_cache(model, 3, 256)
        cache.k.normal_(std=100.0)
        cache.v.normal_(std=100.0)
        model(x[:, :60], kv_cache=cache)
        for t in range(60, 200):
            logits = model.decode_step(x[:, t:t + 1], cache, torch.tensor([t]))
            assert logits.shape == (3, 100) and logits.dtype == torch.float32
            assert_close(logits, full[:, t], atol=1e-4, rtol=1e-4, msg=f"position {t}")
        assert cache.pos == 60  # the caller owns the position
        dynamic = new_cache(model, 3, 256)
        model(x, kv_cache=dynamic)
    assert_close(cache.k[:, :, :200], dynamic.k[:, :, :200], atol=1e-5, rtol=1e-5)
    assert_close(cache.v[:, :, :200], dynamic.v[:, :, :200], atol=1e-5, rtol=1e-5)


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
def test_cuda_compiled_engine_equals_eager(monkeypatch, fresh_dynamo):
    """CUDA graphs through torch.compile: in fp32 the eager loop's tokens (batch 1 and 3, and again
    from the kept decoder); an fp32 model on a bf16 GPU (a bf16 copy) agrees with the eager loop for
    a good stretch (a near-tie in bf16 may flip a later token)."""
    with monkeypatch.context() as fp32:
        fp32.setenv("SPEEDCHAT_DTYPE", "float32")
        model = random_gpt().cuda()
        engine = Engine(model, StubTokenizer())  # auto: compiled on CUDA
        for num_samples in (1, 3, 3):
            assert engine.generate_batch(prompt_of(50), num_samples, max_tokens=100, temperature=0.0) == \
                greedy(model, prompt_of(50), num_samples, 100, "eager")
        assert sorted(engine._decoders) == [1, 3]
    if torch.cuda.get_device_capability()[0] >= 8:
        eager, fast = (greedy(model, prompt_of(50), 4, 60, mode)[0] for mode in ("eager", "compiled"))
        assert all(a[:70] == b[:70] for a, b in zip(fast, eager))
