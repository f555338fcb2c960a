"""engine.py: the cached engine against a naive recompute loop, sampling, seeds, the tool,
the calculator's refusals, and the text helpers. Tiny random models, CPU, a few seconds."""

import time
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

from calculator import Refused, calculator, safe_eval
from engine import Engine, StreamDecoder, assistant_parts, chat_prompt, sample_next, shown
from model import GPT, GPTConfig
from tokenizer import Tokenizer

TEXT = """The quick brown fox jumps over the lazy dog. How many r are in strawberry? There are 3.
def add(a, b):\n    return a + b\nprint(add(2, 3))\n12 + 30 = 42; 7 * 6 = 42; 100 / 4 = 25.
Hello! How are you today? I am fine, thank you. What is the capital of France? Paris.
"""


# --- Fixtures shared with test_chat_cli.py and test_chat_web.py

def make_tokenizer():
    return Tokenizer.train_from_iterator([TEXT * 20] + TEXT.split("\n"), vocab_size=400)


def make_model(vocab_size, sequence_len=256):
    """A random GPT with weights large enough that its greedy choices are not all the same token."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() == 2 and p.size(0) != model.padded_vocab_size else 1.0)
    return model.eval()


def save_tiny_checkpoint(base_dir, stage="base"):
    """A tokenizer and a one-step checkpoint d2 of `stage` under base_dir (written there whatever
    SPEEDCHAT_BASE_DIR says, which is restored afterwards)."""
    import checkpoint

    tok = make_tokenizer()
    tok.save(base_dir / "tokenizer")
    model = make_model(tok.get_vocab_size())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDCHAT_BASE_DIR", str(base_dir))
        checkpoint.save_checkpoint(stage, "d2", 1, model, None, {"model_config": asdict(model.config)})
    return tok, model


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok.get_vocab_size())


@pytest.fixture
def uncompiled(monkeypatch):
    """The compiled decode path's code with its step run as written (torch.compile = identity)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)


# --- Cached engine == naive recompute

@torch.no_grad()
def naive_greedy(model, prompt, max_tokens, stop_tokens):
    """Recompute the whole sequence every step, take the argmax."""
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids]))[0, -1]
        token = int(torch.argmax(logits))
        if token in stop_tokens:
            break
        out.append(token)
        ids.append(token)
    return out


@pytest.mark.parametrize("decode", ["eager", "compiled"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_greedy_matches_naive_recompute(tok, model, num_samples, decode, uncompiled):
    """Both decode paths; the compiled one keeps its decoder (static cache) from prompt to prompt."""
    engine = Engine(model, tok, decode=decode)
    prompts = [[tok.get_bos_token_id()], tok.encode("Hello! How are", prepend="<|bos|>"),
               tok.encode(TEXT[:300], prepend="<|bos|>")]
    for prompt in prompts:
        expected = naive_greedy(model, prompt, 24, engine.stop_tokens)
        assert engine.python_start not in expected, "the random model calls the tool: pick another seed"
        results, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=24, temperature=0.0)
        assert results == [prompt + expected] * num_samples
        assert masks == [[0] * len(prompt) + [1] * len(expected)] * num_samples
    assert len(set(naive_greedy(model, prompts[1], 24, engine.stop_tokens))) > 10  # the check has teeth
    assert sorted(engine._decoders) == ([num_samples] if decode == "compiled" else [])


def test_seed_reproducible_and_varied(tok, model, uncompiled):
    prompt = tok.encode("Hello", prepend="<|bos|>")
    kw = dict(num_samples=4, max_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    eager, fast = Engine(model, tok, decode="eager"), Engine(model, tok, decode="compiled")
    a = eager.generate_batch(prompt, seed=7, **kw)[0]
    assert a == eager.generate_batch(prompt, seed=7, **kw)[0] == fast.generate_batch(prompt, seed=7, **kw)[0]
    assert a != eager.generate_batch(prompt, seed=8, **kw)[0] and len(set(map(tuple, a))) > 1


def test_sample_next_follows_the_softmax():
    """Sampled frequencies match softmax(logits / temperature) over the tokens top-k / top-p keep
    (20k draws: each frequency within ~4 standard errors); temperature 0 is the argmax."""
    logits = torch.log(torch.tensor([[0.05, 0.6, 0.3, 0.05]])).repeat(20_000, 1)
    gen = torch.Generator().manual_seed(1)
    for temperature, top_k, top_p, kept in ((1.0, None, None, [0, 1, 2, 3]), (0.5, None, None, [0, 1, 2, 3]),
                                            (1.0, 2, None, [1, 2]), (1.0, None, 0.5, [1]), (1.0, None, 0.8, [1, 2])):
        sampled = sample_next(logits, gen, temperature, top_k=top_k, top_p=top_p)
        freq = torch.bincount(sampled, minlength=4).double() / 20_000
        expect = torch.full((4,), -float("inf"), dtype=torch.double)
        expect[kept] = logits[0, kept].double() / temperature
        assert (freq - expect.softmax(-1)).abs().max() < 4 * (0.25 / 20_000) ** 0.5, (temperature, top_k, top_p, freq)
        assert (freq[expect == -float("inf")] == 0).all()
    assert sample_next(logits[:3], gen, 0.0).tolist() == [1, 1, 1]


# --- Tool use, stops and the token budget, with a model whose choices are scripted

class Scripted(nn.Module):
    """The real model on both decode paths (so the cache advances), with the token at given
    absolute positions forced per row: scripts[row][position] = token (the batch-1 prefill uses
    row 0's). Records every (position, ids) the engine fed it."""

    def __init__(self, model, scripts):
        super().__init__()
        self.inner, self.config, self.scripts = model, model.config, scripts
        self.fed = []

    def _force(self, logits, next_pos):
        for row in range(logits.size(0)):
            token = self.scripts[row].get(next_pos)
            if token is not None:
                logits[row] = -1e9
                logits[row, token] = 10.0
        return logits

    def forward(self, idx, kv_cache=None, positions=None):
        self.fed.append((kv_cache.pos, idx.clone()))
        logits = self.inner(idx, kv_cache=kv_cache, positions=positions).clone()
        return self._force(logits, kv_cache.pos)  # the cache has advanced: the position to come

    def decode_step(self, idx, kv_cache, pos):
        self.fed.append((int(pos), idx.clone()))
        return self._force(self.inner.decode_step(idx, kv_cache, pos).clone(), int(pos) + 1)


def script(start, tokens):
    return {start + i: t for i, t in enumerate(tokens)}


@pytest.mark.parametrize("decode", ["eager", "compiled"])
def test_tool_use_forces_output(tok, model, decode, uncompiled):
    """Calculator answers are forced in (mask 0) and fed to the model instead of what it sampled; a
    refused call gets no output. The compiled path runs step t+1 on the sampled tokens before it reads
    them, except where a tool forces one: every position is still fed exactly once, in order."""
    special = tok.encode_special
    prompt = tok.encode("How many r in strawberry?", prepend="<|bos|>") + [special("<|assistant_start|>")]
    P = len(prompt)
    py = lambda expr: [special("<|python_start|>"), *tok.encode(expr), special("<|python_end|>")]
    calls = [py("12+30"), py("__import__('os').system('ls')"), py("'strawberry'.count('r')")]
    # after each call (and any forced output) the row says "ok" and ends
    forced = [[special("<|output_start|>"), *tok.encode("42"), special("<|output_end|>")], [],
              [special("<|output_start|>"), *tok.encode("3"), special("<|output_end|>")]]
    tail = tok.encode(" ok") + [special("<|assistant_end|>")]
    scripts = [script(P, c) | script(P + len(c) + len(f), tail) for c, f in zip(calls, forced)]
    scripted = Scripted(model, scripts)
    engine = Engine(scripted, tok, decode=decode)
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=60, temperature=0.0)
    for r, (row, mask, call, out) in enumerate(zip(results, masks, calls, forced)):
        assert row[P:] == call + out + tail[:-1]
        assert mask[P:] == [1] * len(call) + [0] * len(out) + [1] * (len(tail) - 1)
        fed = {pos: int(ids[r, 0]) for pos, ids in scripted.fed[1:]}
        assert [fed[p] for p in range(P, len(row))] == row[P:]
    positions = [pos for pos, _ in scripted.fed[1:]]
    assert positions == list(range(P, P + len(positions)))
    # the same through the streaming API at temperature 1: forced tokens are never sampled
    columns = list(engine.generate(prompt, num_samples=3, max_tokens=60, temperature=1.0, seed=5))
    assert sum(1 for _, m in columns if m[0] == 0) == len(forced[0]) and all(m[1] == 1 for _, m in columns)


@pytest.mark.parametrize("decode", ["eager", "compiled"])
def test_rows_that_diverge_each_continue_their_own_history(tok, model, decode, uncompiled):
    """Rows are pushed apart after the shared first token, then decode greedily: each must get the
    logits of its own sequence."""
    prompt = tok.encode("The quick brown", prepend="<|bos|>")
    head = prompt + naive_greedy(model, prompt, 1, set())
    pushes = [tok.encode(words) for words in (" fox", " lazy dog", " 12 +")]
    engine = Engine(Scripted(model, [script(len(head), push) for push in pushes]), tok, decode=decode)
    results, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=14, temperature=0.0)
    for row, push in zip(results, pushes):
        assert row == head + push + naive_greedy(model, head + push, 13 - len(push), engine.stop_tokens)


def test_stops_and_budget(tok, model):
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    prompt, words = tok.encode("Hi", prepend="<|bos|>"), tok.encode(" hello there")
    P = len(prompt)
    scripts = [script(P, words + [end]), script(P, words[:1] + [bos])]
    engine = Engine(Scripted(model, scripts), tok)
    results, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=50, temperature=0.0)
    assert [row[P:] for row in results] == [words, words[:1]]
    # the stream ends as soon as every row has stopped
    assert len(list(engine.generate(prompt, num_samples=2, max_tokens=50, temperature=0.0))) == len(words) + 1
    # and never runs past max_tokens
    columns = list(Engine(Scripted(model, [script(P, words * 10)] * 2), tok).generate(prompt, 2, max_tokens=7))
    assert len(columns) == 7 and all(len(c) == 2 for c, _ in columns)
    assert list(Engine(model, tok).generate(prompt, max_tokens=0)) == []


@pytest.mark.parametrize("decode", ["eager", "compiled"])
def test_cache_longer_than_sequence_len(tok, decode, uncompiled):
    """Generating past the model's sequence_len keeps working (the cache and rotary grow); the
    compiled path, whose cache is the context, leaves such a reply to the eager loop."""
    small = make_model(tok.get_vocab_size(), sequence_len=16)
    prompt = tok.encode(TEXT[:60], prepend="<|bos|>")[:12]
    engine = Engine(small, tok, decode=decode)
    expected = naive_greedy(small, prompt, 30, engine.stop_tokens)
    assert len(prompt + expected) > 16
    assert engine.generate_batch(prompt, max_tokens=30, temperature=0.0)[0] == [prompt + expected]
    assert not engine._decoders


# --- The calculator

@pytest.mark.parametrize("expr, expected", [
    ("12+30", "42"), ("2 + 3 * 4", "14"), ("(1 + 2) ** 3", "27"), ("-5 // 2", "-3"), ("7 / 2", "3.5"),
    ("6 / 3", "2"), ("17 % 5", "2"), ("-(2 - 10)", "8"), ("2 ** -1", "0.5"), ("2 ** 100", str(2 ** 100)),
    ("1.5 * 4", "6"), ("'strawberry'.count('r')", "3"), ("len('hello')", "5"), ("'Hi'.upper()", "HI"),
    ("'Hi'.lower()", "hi"), ("'  x  '.strip()", "x"), ("'a-b'.replace('-', '+')", "a+b"),
    ("'a b c'.split()", "['a', 'b', 'c']"), ("len('a,b,c'.split(','))", "3"), ("'abc'.startswith('ab')", "True"),
    ("'abc'.endswith('x')", "False"), ("'abc'.find('c')", "2"), ("'ab' * 3", "ababab"), ("'a' + 'b'", "ab"),
])
def test_calculator_allows(expr, expected):
    assert calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os')", "__import__('os').system('ls')", "().__class__", "''.__class__.__mro__",
    "'a'.__class__", "(1).__class__.__bases__", "open('/etc/passwd')", "exec('1')", "eval('1')",
    "x", "len", "[1, 2]", "{1: 2}", "lambda: 1", "1 if 1 else 2", "f'{1}'", "'%s' % 5", "1 < 2",
    "2 ** 100000", "9 ** 9 ** 9", "10 ** 10 ** 10", "(10 ** 1000) * (10 ** 1000) * (10 ** 1000) * (10 ** 1000) * (10 ** 1000)",
    "'a' * 10 ** 9", "'ab' * 100000", "'abc'.replace('', 'x' * 5000)", "1 / 0", "5 % 0", "2.0 ** 5000",
    "'abc'.format()", "'abc'.join('x')", "'abc'.count", "len('a', 'b')", "'a'.count(x='a')", "b'bytes'",
    "True + 1", "'a'.count(1.5)", "(-8) ** 0.5", "1; 2", "import os", "1" * 500, "(" * 200 + "1" + ")" * 200,
    "-'a'", "'a' - 'b'", "print(1)", "globals()", "len(1)", "'abc'.split('')", "'abc'.startswith(1)",
])
def test_calculator_refuses(expr):
    t0 = time.perf_counter()
    with pytest.raises(Refused):
        safe_eval(expr)
    assert calculator(expr) is None
    assert time.perf_counter() - t0 < 5  # refused before any costly work (e.g. 'a' * 10 ** 9), busy CI included


# --- Text helpers

def test_stream_decoder_holds_split_characters_and_shown_replaces_markers():
    byte_tok = Tokenizer({bytes([i]): i for i in range(256)})
    decoder = StreamDecoder(byte_tok)
    assert [decoder.add(t) for t in byte_tok.encode("aé€!")] == ["a", "", "é", "", "", "€", "!"]
    assert decoder.text() == "aé€!"
    assert decoder.add(0xE2) == "" and decoder.flush() == "\ufffd"
    # a held-back partial character can arrive in one piece with the marker after it
    assert shown("\ufffd<|python_start|>1+2") == "\ufffd[calculator: 1+2"
    assert shown("<|python_end|><|output_start|>3<|output_end|> ok") == " -> 3] ok"
    assert shown("<|assistant_end|> stays") == "<|assistant_end|> stays"


def test_assistant_parts_round_trip(tok):
    special = tok.encode_special
    reply = (tok.encode("Let me count. ") + [special("<|python_start|>")] + tok.encode("'strawberry'.count('r')")
             + [special("<|python_end|>"), special("<|output_start|>")] + tok.encode("3")
             + [special("<|output_end|>")] + tok.encode(" There are 3."))
    text = shown(tok.decode(reply))  # what the API and the page show, and a client sends back
    assert text == "Let me count. [calculator: 'strawberry'.count('r') -> 3] There are 3."
    assert [p["type"] for p in assistant_parts(text)] == ["text", "python", "python_output", "text"]
    for plain in ("plain words", "<|python_start|>1+1<|python_end|>", "[calculator: 2+2"):  # text stays text
        assert assistant_parts(plain) == plain
    messages = [{"role": "user", "content": "How many r? [calculator: 1+1 -> 2]"}, {"role": "assistant", "content": text},
                {"role": "user", "content": "thanks"}]
    ids = chat_prompt(tok, messages)
    assert reply + [special("<|assistant_end|>")] == ids[ids.index(special("<|assistant_start|>")) + 1:][: len(reply) + 1]
    assert ids.count(special("<|python_start|>")) == 1  # the user's text was not read as a call
    assert ids[-1] == special("<|assistant_start|>")