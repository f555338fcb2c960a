"""rustbpe (the Rust BPE trainer) against a slow, obviously-correct Python reference, its splitter
against the `regex` module, its ranks through tiktoken.

The rule: ids 0..255 are the bytes; each step merges the adjacent pair with the highest count, ties
to the smallest (left_id, right_id); text is pre-split by the pattern and merges never cross chunks."""

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rustbpe

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
OTHER_PATTERN = r"\w+|\s+|[^\w\s]+"
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Characters on which the `regex` module and the Rust regex engine share Unicode tables
# (they disagree only on code points assigned in the newest Unicode versions).
ALPHABET = "aabbcst ZSTlLvVeErRdDmM'  \t\n\r0123456789.,!?-_()é ñ ß日本語😀\u00a0\u3000\u2028²Ⅻſ\u0301\x1c"
REPETITIVE = ["aaaa", "abab", "ab ab", "  ", "\n\n", "12 34", "aaa", ""]  # overlapping pairs, many equal counts


def reference_train(texts, vocab_size, pattern=SPLIT_PATTERN):
    """Recount every pair after every merge."""
    words = Counter(tuple(chunk.encode()) for text in texts for chunk in regex.findall(pattern, text))
    merges = []
    for new_id in range(256, vocab_size):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # highest count, then smallest pair
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                hit = word[i:i + 2] == best
                out.append(new_id if hit else word[i])
                i += 2 if hit else 1
            merged[tuple(out)] += count
        words = merged
    return merges


def train(texts, vocab_size, **kwargs):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(texts, vocab_size, **kwargs)
    return tok


@given(st.text(max_size=60) | st.text(alphabet=ALPHABET, max_size=60))
@settings(max_examples=300, deadline=None)
def test_splitter_matches_the_regex_engines(text):
    """Any text: the hand-written splitter == fancy-regex on the default pattern; on ALPHABET also
    == Python's `regex`."""
    assert rustbpe._split(text) == rustbpe._split(text, use_regex=True)
    assert "".join(rustbpe._split(text)) == text
    if set(text) <= set(ALPHABET):
        assert rustbpe._split(text) == regex.findall(SPLIT_PATTERN, text)


@pytest.mark.parametrize("text", [
    "", "a", " ", "\r\n", " \n ", "Hello,  world!!\n\n", "I'm you're he'll we've they'd it's 'S 'LL 'Ve 're 'x ''s",
    "I'm he'll we've THEY'RE 'x ''s", "don'T", "'", "''", "'ll've're", "x 'll", "1234567 x12y 3.14", "123456 ab12",
    "   leading", "trailing   ", "a  \n\n  b", "  \n\n  x", "\t\tx", "   \t\n\t  x", "a\n \n", "\n\n\n", "x\r\r\n\ny",
    "a  b   ", " !!!\n\n", " !!! \r\n\r\n", "  !!", "!?x", "(hello)", " (\n", "-- --\n--", "$ 100", "\x00\x7fa",
    "\x1c\x1dx", "\u00a0word \u3000字", "\u2028a\u2029", "ſ 'ſ 'K 'k", "日本語のテキスト123", "Ünïcödé ñ", "٣٤٥ ²³ Ⅻ",
    "a\u0301b", "foo\u200bbar", "émoji 😀😀 ok\n"])
def test_splitter_examples(text):
    assert rustbpe._split(text) == regex.findall(SPLIT_PATTERN, text) == rustbpe._split(text, use_regex=True)


@given(st.lists(st.text(alphabet=ALPHABET, max_size=40) | st.sampled_from(REPETITIVE), max_size=10),
       st.integers(256, 330), st.sampled_from([None, OTHER_PATTERN]))
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_merges_match_reference(texts, vocab_size, pattern):
    tok = train(texts, vocab_size, **({"pattern": pattern} if pattern else {}))
    assert tok.get_pattern() == (pattern or SPLIT_PATTERN)
    assert tok.get_merges() == reference_train(texts, vocab_size, pattern or SPLIT_PATTERN)


def test_ties_long_chunks_and_batches():
    assert train(["cd", "ab"], 257).get_merges() == [(ord("a"), ord("b"))]  # a tie goes to the smallest pair
    assert train(["ab", "cd", "cd"], 257).get_merges() == [(ord("c"), ord("d"))]
    # chunks longer than 15 bytes take another path in the counter; batches split the input
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 30))) for _ in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    expected = reference_train(texts, 420)
    assert train(texts, 420).get_merges() == expected
    assert train(iter(texts), 420, buffer_size=7).get_merges() == expected
    assert train(reversed(texts), 420).get_merges() == expected


def test_vocab_ranks_and_small_inputs():
    tok = train(["hello hello world"] * 3, 300)
    ranks = tok.get_mergeable_ranks()
    assert [r for _, r in ranks] == list(range(len(ranks))) and all(b == bytes([i]) for b, i in ranks[:256])
    assert len(ranks) == tok.get_vocab_size() < 300  # ran out of pairs: fewer merges than asked
    for (left, right), (token, rank) in zip(tok.get_merges(), ranks[256:]):
        assert token == ranks[left][0] + ranks[right][0]
    assert tok.get_pattern() == SPLIT_PATTERN == rustbpe.DEFAULT_PATTERN
    tok.train_from_iterator(["xy xy"], 257)  # training again replaces the state
    assert tok.get_merges() == [(ord("x"), ord("y"))]
    assert train([], 1000).get_merges() == [] and train(["hello"], 256).get_merges() == []
    assert train(["", "", "x"], 1000).get_vocab_size() == 256


def failing_source():
    yield "abc"
    raise RuntimeError("source broke")


@pytest.mark.parametrize("texts, vocab_size, kwargs, error", [
    (["abc"], 255, {}, ValueError), (["abc"], 300, {"pattern": "(unclosed"}, ValueError),
    (["abc", 3], 300, {}, TypeError), ([b"abc"], 300, {}, TypeError), (42, 300, {}, TypeError),
    (failing_source, 300, {}, RuntimeError), (["lone \ud800 surrogate"], 300, {}, UnicodeEncodeError)])
def test_bad_input_raises_and_leaves_the_tokenizer_as_it_was(texts, vocab_size, kwargs, error):
    tok = train(["xy xy"], 257)
    with pytest.raises(error):  # a Python exception, never a panic that aborts the process
        tok.train_from_iterator(texts() if callable(texts) else texts, vocab_size, **kwargs)
    assert tok.get_merges() == [(ord("x"), ord("y"))]


THREAD_SCRIPT = """
import json, random, rustbpe
rng = random.Random(7)
words = ["".join(rng.choice("abcdeé ") for _ in range(rng.randint(1, 12))) for _ in range(2000)]
texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
tok = rustbpe.Tokenizer()
tok.train_from_iterator(texts, 1500, buffer_size=500)
print(json.dumps(tok.get_merges()))
"""


def test_same_merges_whatever_the_thread_count():
    """rayon's pool is per process: one subprocess per thread count."""
    run = lambda n: subprocess.run([sys.executable, "-c", THREAD_SCRIPT], capture_output=True, text=True, check=True,
                                   env=dict(os.environ, RAYON_NUM_THREADS=n)).stdout
    results = [json.loads(run(n)) for n in "123"]
    assert len(results[0]) == 1500 - 256 and results[0] == results[1] == results[2]


def test_real_data_roundtrip():
    shard = DATA_DIR / "gutenberg" / "shard_00000.parquet"
    if not shard.exists():
        pytest.skip(f"{shard} not found (real data lives in ../shared/data)")
    import pyarrow.parquet as pq

    texts = pq.read_table(shard, columns=["text"]).column("text").to_pylist()[:50]
    tok = train(texts, 2000)
    enc = tiktoken.Encoding("test", pat_str=tok.get_pattern(), mergeable_ranks=dict(tok.get_mergeable_ranks()),
                            special_tokens={})
    sample = texts[0][:20000]
    ids = enc.encode_ordinary(sample)
    assert tok.get_vocab_size() == 2000 and enc.decode(ids) == sample
    assert len(sample.encode()) / len(ids) > 3.0  # a trained vocab compresses English text
