"""rustbpe (the Rust BPE trainer) against a slow, obviously-correct Python reference.

Rule being checked: ids 0..255 are the bytes; each step merges the adjacent pair with the
highest count, ties to the smallest (left_id, right_id); text is pre-split by the pattern and
merges never cross chunks.
"""

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
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ---------------------------------------------------------------------------
# Reference trainer: recount every pair after every merge.


def merge_word(word, pair, new_id):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def reference_train(texts, vocab_size, pattern=SPLIT_PATTERN):
    chunks = Counter(chunk for text in texts for chunk in regex.findall(pattern, text))
    words = Counter()
    for chunk, count in chunks.items():
        words[tuple(chunk.encode("utf-8"))] += count
    merges = []
    for new_id in range(256, vocab_size):
        pair_counts = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))  # highest count, then smallest pair
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            merged[merge_word(word, best, new_id)] += count
        words = merged
    return merges


def train(texts, vocab_size, **kwargs):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(texts, vocab_size, **kwargs)
    return tok


def tiktoken_of(tok):
    ranks = dict(tok.get_mergeable_ranks())
    return tiktoken.Encoding("test", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens={})


# Characters on which the `regex` module and the Rust regex engine share Unicode tables
# (they disagree only on code points assigned in the newest Unicode versions).
ALPHABET = "aabbcst lLvVeErRdDmM'  \t\n\r0123456789.,!?-_()é ñ ß日本語😀\u00a0\u3000²"
texts_st = st.lists(st.text(alphabet=ALPHABET, max_size=40), max_size=8)


# ---------------------------------------------------------------------------
# Splitting


@given(st.text(max_size=60))
@settings(max_examples=400, deadline=None)
def test_fast_splitter_matches_regex_engine(text):
    # any unicode: the hand-written splitter vs fancy-regex on the default pattern
    assert rustbpe._split(text) == rustbpe._split(text, use_regex=True)
    assert "".join(rustbpe._split(text)) == text


@given(st.text(alphabet=ALPHABET, max_size=60))
@settings(max_examples=300, deadline=None)
def test_splitter_matches_python_regex(text):
    assert rustbpe._split(text) == regex.findall(SPLIT_PATTERN, text)


@pytest.mark.parametrize("text", [
    "", "Hello world", "I'm he'll we've THEY'RE 'x ''s", "  \n\n  x", "123456 ab12", "a  b   ",
    " !!! \r\n\r\n", "\u00a0word \u3000字", "ſ 'ſ 'K", "x\u0301y", "😀😀 ok\n",
])
def test_splitter_examples(text):
    assert rustbpe._split(text) == regex.findall(SPLIT_PATTERN, text) == rustbpe._split(text, use_regex=True)


# ---------------------------------------------------------------------------
# Training equals the reference


@given(texts_st, st.integers(256, 330))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_merges_match_reference(texts, vocab_size):
    tok = train(texts, vocab_size)
    assert tok.get_merges() == reference_train(texts, vocab_size)


@given(st.lists(st.sampled_from(["aaaa", "abab", "ab ab", "  ", "\n\n", "12 34", "aaa", ""]), max_size=12),
       st.integers(256, 300))
@settings(max_examples=100, deadline=None)
def test_merges_match_reference_repetitive(texts, vocab_size):
    # repeated tokens (aaaa, abab) exercise overlapping pairs and many equal counts
    texts = texts + texts[:3]
    assert train(texts, vocab_size).get_merges() == reference_train(texts, vocab_size)


@given(texts_st, st.integers(256, 300))
@settings(max_examples=50, deadline=None)
def test_custom_pattern_matches_reference(texts, vocab_size):
    pattern = r"\w+|\s+|[^\w\s]+"
    tok = train(texts, vocab_size, pattern=pattern)
    assert tok.get_pattern() == pattern
    assert tok.get_merges() == reference_train(texts, vocab_size, pattern)


def test_ties_go_to_smallest_pair():
    assert train(["cd", "ab"], 257).get_merges() == [(ord("a"), ord("b"))]
    assert train(["ab", "cd", "cd"], 257).get_merges() == [(ord("c"), ord("d"))]


def test_long_chunks_and_batches():
    # chunks longer than 15 bytes take another path in the counter; batches split the input
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 30))) for _ in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    expected = reference_train(texts, 420)
    assert train(texts, 420).get_merges() == expected
    assert train(iter(texts), 420, buffer_size=7).get_merges() == expected
    assert train(reversed(texts), 420).get_merges() == expected


def test_vocab_and_ranks():
    tok = train(["hello hello world"] * 3, 300)
    ranks = tok.get_mergeable_ranks()
    assert [r for _, r in ranks] == list(range(len(ranks)))
    assert all(b == bytes([i]) for b, i in ranks[:256])
    assert len(ranks) == tok.get_vocab_size() < 300  # ran out of pairs: fewer merges than asked
    for (left, right), (token, rank) in zip(tok.get_merges(), ranks[256:]):
        assert token == ranks[left][0] + ranks[right][0]
    assert tok.get_pattern() == SPLIT_PATTERN == rustbpe.DEFAULT_PATTERN


def test_empty_input_and_minimum_vocab():
    assert train([], 1000).get_merges() == []
    assert train(["", "", "x"], 1000).get_vocab_size() == 256
    assert train(["hello"], 256).get_merges() == []
    assert rustbpe.Tokenizer().encode("hé") == list("hé".encode())


def test_retraining_replaces_state():
    tok = train(["aaaa bbbb"], 258)
    tok.train_from_iterator(["xy xy"], 257)
    assert tok.get_merges() == [(ord("x"), ord("y"))]


# ---------------------------------------------------------------------------
# Encoding equals tiktoken


@pytest.fixture(scope="module")
def trained():
    rng = random.Random(1)
    vocab = ["the", " quick", " brown", " fox", "'s", " 123", "\n\n", " ünïcode", " 日本", "!!", "  "]
    texts = ["".join(rng.choice(vocab) for _ in range(50)) for _ in range(200)]
    tok = train(texts, 600)
    return tok, tiktoken_of(tok)


@given(st.text(max_size=80) | st.text(alphabet=ALPHABET + "thequickbrownfox", max_size=80))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_encode_matches_tiktoken(trained, text):
    tok, enc = trained
    assert tok.encode(text) == enc.encode_ordinary(text)


def test_encode_matches_tiktoken_examples(trained):
    trained, enc = trained
    for text in ["the quick brown fox's 123\n\n", "thethethe", " ünïcode 日本!! ", ""]:
        assert trained.encode(text) == enc.encode_ordinary(text)
        assert enc.decode(trained.encode(text)) == text


# ---------------------------------------------------------------------------
# Bad input raises, never aborts


def test_errors():
    tok = rustbpe.Tokenizer()
    with pytest.raises(ValueError, match="vocab_size"):
        tok.train_from_iterator(["abc"], 255)
    with pytest.raises(ValueError, match="pattern"):
        tok.train_from_iterator(["abc"], 300, pattern="(unclosed")
    with pytest.raises(TypeError, match="item 1 is int"):
        tok.train_from_iterator(["abc", 3], 300)
    with pytest.raises(TypeError, match="item 0 is bytes"):
        tok.train_from_iterator([b"abc"], 300)
    with pytest.raises(TypeError, match="iterable"):
        tok.train_from_iterator(42, 300)

    def failing():
        yield "abc"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        tok.train_from_iterator(failing(), 300)
    with pytest.raises(UnicodeEncodeError):
        tok.train_from_iterator(["lone \ud800 surrogate"], 300)
    assert tok.get_merges() == []  # a failed training leaves the tokenizer as it was


# ---------------------------------------------------------------------------
# Determinism across thread counts (rayon's pool is per process: one subprocess each)

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
    results = []
    for threads in ["1", "2", "3"]:
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", THREAD_SCRIPT], env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout))
    assert len(results[0]) == 1500 - 256
    assert results[0] == results[1] == results[2]


# ---------------------------------------------------------------------------
# Real data (skipped without ../shared/data)


def test_real_data_roundtrip():
    shard = DATA_DIR / "gutenberg" / "shard_00000.parquet"
    if not shard.exists():
        pytest.skip(f"{shard} not found (real data lives in ../shared/data)")
    import pyarrow.parquet as pq

    texts = pq.read_table(shard, columns=["text"]).column("text").to_pylist()[:50]
    tok = train(texts, 2000)
    assert tok.get_vocab_size() == 2000
    enc = tiktoken_of(tok)
    sample = texts[0][:20000]
    ids = tok.encode(sample)
    assert ids == enc.encode_ordinary(sample)
    assert enc.decode(ids) == sample
    assert len(sample.encode()) / len(ids) > 3.0  # a trained vocab compresses English text
