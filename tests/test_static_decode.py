"""The engine's compiled path beyond test_engine.py's checks (which run both paths against the naive
loop): the decoder a second live stream does not share, the bf16 copy of an fp32 model, the step
compiled by inductor as one graph (slow), and with CUDA graphs on a GPU."""

import pytest
import torch

from engine import Engine
from test_engine import uncompiled  # noqa: F401 (a fixture)
from test_model import make_model, tiny_config


class StubTokenizer:
    """Special tokens outside the model's vocab: a random model never stops early."""

    def __init__(self):
        names = ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                 "<|output_end|>"]
        self.ids = {name: 100 + i for i, name in enumerate(names)}
        self.encode_special = self.ids.get
        self.get_bos_token_id = lambda: self.ids["<|bos|>"]


def random_gpt(sequence_len=256):
    """2 layers, windows 128 and all at the default context; every weight and scalar random."""
    return make_model(tiny_config(sequence_len=sequence_len), randomize=True)


def prompt_of(n, seed=4):
    return torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(model, prompt, num_samples, max_tokens, decode):
    return Engine(model, StubTokenizer(), decode=decode).generate_batch(prompt, num_samples, max_tokens=max_tokens,
                                                                        temperature=0.0)


def test_a_second_live_stream_runs_eager_and_a_closed_one_frees_the_decoder(uncompiled):
    model = random_gpt()
    engine = Engine(model, StubTokenizer(), decode="compiled")
    first, second = prompt_of(6, seed=5), prompt_of(6, seed=6)
    stream = engine.generate(first, max_tokens=10, temperature=0.0)
    head = [next(stream)[0][0] for _ in range(4)]
    decoder, = engine._decoders.values()
    assert decoder.busy and decoder.cache.seq_len == 256  # the static cache is the model's context
    assert engine.generate_batch(second, max_tokens=10, temperature=0.0) == greedy(model, second, 1, 10, "eager")
    assert first + head + [column[0] for column, _ in stream] == greedy(model, first, 1, 10, "eager")[0][0]
    assert not decoder.busy
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
    runner, (decoder,) = engine._copy, engine._decoders.values()
    assert all(p.dtype == torch.bfloat16 for p in runner.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters()) and decoder.cache.k.dtype == torch.bfloat16
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # an in-place update (an optimizer step, load_state_dict)
    flipped, _ = engine.generate_batch(prompt_of(20), max_tokens=8, temperature=0.0)
    assert engine._copy is runner and list(engine._decoders.values()) == [decoder] and flipped != out
    assert torch.equal(runner.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    model.lm_head.weight.data = model.lm_head.weight.data.clone()  # moved: copy and decoders rebuilt
    engine.generate_batch(prompt_of(20), max_tokens=8, temperature=0.0)
    assert engine._copy is not runner and list(engine._decoders.values()) != [decoder]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_engine_equals_eager(fresh_dynamo):
    """Inductor for real (C++ on CPU, ~20 s to compile): one graph for every position of every reply
    (fullgraph=True raises on a graph break), the eager tokens, and the cache written in place (the
    second call reuses the compiled step and its cache)."""
    model = random_gpt()
    engine = Engine(model, StubTokenizer(), decode="compiled")
    expected = greedy(model, prompt_of(20), 2, 30, "eager")
    for _ in range(2):
        assert engine.generate_batch(prompt_of(20), 2, max_tokens=30, temperature=0.0) == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
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
