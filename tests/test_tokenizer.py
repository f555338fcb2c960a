"""Tests for tokenizer/: training, encode/decode, special tokens, chat rendering and masks,
the on-disk format, token_bytes, the offline GPT-2 rebuild, and the train/eval scripts."""

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings, strategies as st

from common import UserError
from tokenizer import (SPECIAL_TOKENS, Tokenizer, get_token_bytes, get_tokenizer, load_gpt2_encoding,
                       save_token_bytes)
from tokenizer.eval import SAMPLES

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_DIR = DATA / "gpt2_bpe"

VOCAB = 512
CORPUS = list(SAMPLES.values()) + [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Numbers: 12 345 6789 3.14159 2024-01-31 100% <|bos|> is just text here.",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(iter(CORPUS), VOCAB)


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


# ---------------------------------------------------------------------------
# Training, encode/decode, special tokens


def test_trained_vocab_layout(tok):
    assert tok.get_vocab_size() == VOCAB
    n = VOCAB - len(SPECIAL_TOKENS)
    for b in range(256):  # ranks 0..255 are the single bytes
        assert tok.id_to_token_bytes(b) == bytes([b])
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n, VOCAB))
    assert tok.get_bos_token_id() == n
    # training learned merges: common English compresses better than one token per byte
    assert len(tok.encode(SAMPLES["prose"])) < 0.6 * len(SAMPLES["prose"].encode())


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_text(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.get_bos_token_id() for i in ids)  # never a special token
    assert tok.decode(ids) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=200), max_size=8))
def test_batch_encode_matches_single(tok, texts):
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_special_token_strings_in_text_are_plain_text(tok):
    text = "before <|bos|> middle <|assistant_end|><|user_start|> after"
    ids = tok.encode(text)
    specials = set(range(tok.get_bos_token_id(), tok.get_vocab_size()))
    assert not specials & set(ids)
    assert tok.decode(ids) == text
    assert tok.encode(["<|bos|>"])[0] == tok.encode("<|bos|>") != [tok.get_bos_token_id()]


def test_encode_special_and_prepend_append(tok):
    bos, end = tok.encode_special("<|bos|>"), tok.encode_special("<|assistant_end|>")
    body = tok.encode("hello world")
    assert tok.encode("hello world", prepend="<|bos|>") == [bos] + body
    assert tok.encode("hello world", prepend=bos, append="<|assistant_end|>") == [bos] + body + [end]
    assert tok.encode(["hello world", ""], prepend="<|bos|>") == [[bos] + body, [bos]]
    assert tok.decode([bos] + body) == "<|bos|>hello world"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")
    with pytest.raises(TypeError):
        tok.encode(42)


def test_vocab_size_too_small_raises():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(["abc"], 264)


def test_rustbpe_encode_agrees_with_tiktoken():
    """rustbpe's own encoder (pair merges) and tiktoken on our ranks must give the same ids,
    or the model would be trained on ids the trainer never meant."""
    from rustbpe import Tokenizer as BPETrainer

    trainer = BPETrainer()
    trainer.train_from_iterator(iter(CORPUS), VOCAB - len(SPECIAL_TOKENS))
    ours = Tokenizer(dict(trainer.get_mergeable_ranks()), trainer.get_pattern())
    for text in CORPUS + ["zebra quokka 1234567 ünïcödé 🙂 \n\n\t x"]:
        assert list(trainer.encode(text)) == ours.encode(text)


# ---------------------------------------------------------------------------
# Chat rendering


def ids_of(tok, *pieces):
    """Expected ids: special-token names become their id, other strings are encoded."""
    out = []
    for p in pieces:
        out += [tok.encode_special(p)] if p in SPECIAL_TOKENS else tok.encode(p)
    return out


CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute. "},
        {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": "It is 5."},
    ]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]}


def test_render_conversation_ids_and_mask(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>Be brief.\n\nWhat is 2+3?<|user_end|>"
        "<|assistant_start|>Let me compute. <|python_start|>2+3<|python_end|>"
        "<|output_start|>5<|output_end|>It is 5.<|assistant_end|>"
        "<|user_start|>Thanks<|user_end|><|assistant_start|>You're welcome.<|assistant_end|>")
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == ("Let me compute. <|python_start|>2+3<|python_end|>It is 5.<|assistant_end|>"
                          "You're welcome.<|assistant_end|>")
    unsupervised = [
        "<|bos|>", "<|user_start|>", "Be brief.\n\nWhat is 2+3?", "<|user_end|>", "<|assistant_start|>"]
    expected_ids = ids_of(tok, *unsupervised)
    expected_mask = [0] * len(expected_ids)
    for pieces, m in [(["Let me compute. ", "<|python_start|>", "2+3", "<|python_end|>"], 1),
                      (["<|output_start|>", "5", "<|output_end|>"], 0),
                      (["It is 5.", "<|assistant_end|>"], 1),
                      (["<|user_start|>", "Thanks", "<|user_end|>", "<|assistant_start|>"], 0),
                      (["You're welcome.", "<|assistant_end|>"], 1)]:
        piece_ids = ids_of(tok, *pieces)
        expected_ids += piece_ids
        expected_mask += [m] * len(piece_ids)
    assert ids == expected_ids
    assert mask == expected_mask


def test_render_conversation_exact_mask_with_empty_texts(tok):
    s = tok.encode_special
    conv = {"messages": [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": [{"type": "python", "text": ""}, {"type": "python_output", "text": ""}]},
    ]}
    ids, mask = tok.render_conversation(conv)
    assert ids == [s("<|bos|>"), s("<|user_start|>"), s("<|user_end|>"), s("<|assistant_start|>"),
                   s("<|python_start|>"), s("<|python_end|>"), s("<|output_start|>"), s("<|output_end|>"),
                   s("<|assistant_end|>")]
    assert mask == [0, 0, 0, 0, 1, 1, 0, 0, 1]


def test_render_conversation_truncates(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    short_ids, short_mask = tok.render_conversation(CONVERSATION, max_tokens=7)
    assert (short_ids, short_mask) == (ids[:7], mask[:7])
    assert len(ids) > 7


def test_render_for_completion(tok):
    ids = tok.render_for_completion(CONVERSATION)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    assert tok.decode(ids).endswith("<|user_start|>Thanks<|user_end|><|assistant_start|>")
    assert "You're welcome." not in tok.decode(ids)
    # a conversation that ends with the user is primed the same way
    without_last = {"messages": CONVERSATION["messages"][:-1]}
    assert tok.render_for_completion(without_last) == ids
    assert CONVERSATION["messages"][-1]["content"] == "You're welcome."  # input not mutated


@pytest.mark.parametrize("messages, match", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "hi"}], "'user' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "'assistant' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
     "'user' was expected"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "unknown part type 'image'"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "user content must be a string"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}], "needs a string"),
])
def test_malformed_conversations_raise(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})
    with pytest.raises(ValueError, match="must be a dict"):
        tok.render_conversation(messages)


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}]}, {"role": "assistant", "content": "b"}],
])
def test_malformed_conversations_raise_for_completion(tok, messages):
    with pytest.raises(ValueError):
        tok.render_for_completion({"messages": messages})


def test_visualize(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    shown = tok.visualize(ids, mask)
    assert "\033[92mLet me compute." in shown and "\033[90m<|bos|>" in shown


# ---------------------------------------------------------------------------
# Saving and loading


def test_save_load_identity(tok, tmp_path):
    import tiktoken.load

    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer.json").read_text())
    assert config["format"] == "speedchat-tokenizer" and config["version"] == 1
    assert config["special_tokens"] == {s: tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert config["vocab_size"] == tok.get_vocab_size()
    lines = (tmp_path / "mergeable_ranks.tiktoken").read_text(encoding="ascii").splitlines()
    assert len(lines) == tok.get_bos_token_id()
    token, rank = lines[300].split(" ")
    assert tok.id_to_token_bytes(int(rank)) == base64.b64decode(token) and int(rank) == 300
    # tiktoken's own reader understands the file
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "mergeable_ranks.tiktoken")) == tok.mergeable_ranks

    loaded = Tokenizer.load(tmp_path)
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    assert [loaded.encode_special(s) for s in SPECIAL_TOKENS] == [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert loaded.pattern == tok.pattern
    for text in CORPUS:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.render_conversation(CONVERSATION) == tok.render_conversation(CONVERSATION)


def test_load_detects_missing_and_inconsistent_files(tok, tmp_path):
    with pytest.raises(UserError, match="run `python -m tokenizer.train` first"):
        Tokenizer.load(tmp_path / "nothing")
    tok.save(tmp_path)
    ranks = tmp_path / "mergeable_ranks.tiktoken"
    ranks.write_text(ranks.read_text().replace(" 300\n", " 301\n", 1))
    with pytest.raises(UserError, match="does not match"):
        Tokenizer.load(tmp_path)


def test_get_tokenizer_uses_base_dir(tok, base_dir):
    with pytest.raises(UserError, match=r"no tokenizer at .*run `python -m tokenizer.train` first"):
        get_tokenizer()
    tok.save(base_dir / "tokenizer")
    assert get_tokenizer().encode("hello there") == tok.encode("hello there")


def test_token_bytes(tok, base_dir):
    import torch

    lengths = tok.token_bytes()
    assert len(lengths) == tok.get_vocab_size()
    for i in range(tok.get_bos_token_id()):
        assert lengths[i] == len(tok.id_to_token_bytes(i))
    assert lengths[:256] == [1] * 256
    assert lengths[tok.get_bos_token_id():] == [0] * len(SPECIAL_TOKENS)
    # summing token_bytes over an encoding gives the text's UTF-8 length (what bits-per-byte needs)
    text = SAMPLES["non-English"]
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))

    with pytest.raises(UserError, match="tokenizer.train"):
        get_token_bytes()
    tok.save(base_dir / "tokenizer")
    save_token_bytes(tok, base_dir / "tokenizer")
    loaded = get_token_bytes("cpu")
    assert loaded.dtype == torch.long and loaded.tolist() == lengths


# ---------------------------------------------------------------------------
# GPT-2 rebuilt offline vs an independent reference BPE

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def reference_gpt2_encode(text, vocab, merges):
    """GPT-2's original algorithm: byte->unicode spelling, then repeatedly merge the adjacent
    pair with the lowest merge index."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_to_char = {b: chr(c) for b, c in zip(bs, cs)}
    merge_rank = {pair: i for i, pair in enumerate(merges)}
    ids = []
    for piece in regex.findall(GPT2_PATTERN, text):
        word = [byte_to_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: merge_rank.get(p, float("inf")))
            if best not in merge_rank:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[t] for t in word]
    return ids


def test_gpt2_rebuild_matches_reference_bpe():
    if not (GPT2_DIR / "gpt2_vocab.json").exists() or not (GPT2_DIR / "gpt2_merges.txt").exists():
        pytest.skip(f"GPT-2 vocab/merges not found in {GPT2_DIR}")
    vocab = json.loads((GPT2_DIR / "gpt2_vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (GPT2_DIR / "gpt2_merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    enc = load_gpt2_encoding(GPT2_DIR)
    assert enc.n_vocab == 50257
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's well-known ids
    texts = list(SAMPLES.values()) + ["  multiple   spaces\n\n\ttabs <|endoftext|> don't I'll 2024 🙂 ñ"]
    for text in texts:
        assert enc.encode_ordinary(text) == reference_gpt2_encode(text, vocab, merges)
        assert enc.decode(enc.encode_ordinary(text)) == text


# ---------------------------------------------------------------------------
# The scripts


def run_script(module, *args, base_dir):
    env = dict(os.environ, SPEEDCHAT_BASE_DIR=str(base_dir), TIKTOKEN_CACHE_DIR=str(base_dir / "tiktoken-cache"))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("corpus")
    pq.write_table(pa.table({"text": CORPUS * 4}), folder / "shard_00000.parquet")
    pq.write_table(pa.table({"text": ["z" * 50000]}), folder / "shard_00001.parquet")  # validation (last)
    (folder / "extra.txt").write_text(SAMPLES["code"] * 3, encoding="utf-8")
    return folder


def test_train_script(corpus_dir, tmp_path):
    base = tmp_path / "base"
    r = run_script("tokenizer.train", "--data", str(corpus_dir), "--vocab-size", "300", "--doc-cap", "500",
                   base_dir=base)
    assert r.returncode == 0, r.stderr
    assert "chars/s" in r.stdout
    tok = Tokenizer.load(base / "tokenizer")
    assert tok.get_vocab_size() == 300
    token_bytes = (base / "tokenizer" / "token_bytes.pt")
    assert token_bytes.exists()
    section = (base / "report" / "tokenizer-train.md").read_text()
    assert "vocab size: 300" in section and "token bytes max" in section
    stats = json.loads((base / "report" / "tokenizer-train.json").read_text())
    # every train document capped at 500 chars, the .txt file cut into pieces, the validation shard held out
    assert stats["characters"] == sum(min(len(d), 500) for d in CORPUS * 4) + len(SAMPLES["code"] * 3)


def test_train_script_bad_input_is_one_line(tmp_path):
    r = run_script("tokenizer.train", "--data", str(tmp_path / "missing"), "--vocab-size", "300", base_dir=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_script_help_shows_defaults(tmp_path):
    train = run_script("tokenizer.train", "--help", base_dir=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "including the 9 special tokens (default: 65536)" in " ".join(train.stdout.split())
    evaluate = run_script("tokenizer.eval", "--help", base_dir=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr
    text = " ".join(evaluate.stdout.split())
    assert "--gpt2-dir" in text and "../shared" not in text  # no developer-only path


def test_eval_script_offline(corpus_dir, tok, tmp_path):
    base = tmp_path / "base"
    tok.save(base / "tokenizer")
    t0 = time.time()
    r = run_script("tokenizer.eval", "--data", str(corpus_dir), "--offline", base_dir=base)
    assert r.returncode == 0, r.stderr
    assert time.time() - t0 < 60
    out = r.stdout
    assert "| text | bytes |" in out
    for kind in list(SAMPLES) + ["validation"]:
        assert f"| {kind} |" in out
    assert "GPT-4: n/a" in out and "cl100k_base" in out
    if GPT2_DIR.exists():
        assert "GPT-2: n/a" not in out
    data = json.loads((base / "report" / "tokenizer-eval.json").read_text())
    assert data["bytes_per_token"]["prose"]["GPT-4"] is None
    assert data["bytes_per_token"]["prose"]["ours"] > 1.0


def test_tiktoken_download_fails_fast_when_unreachable(tmp_path, monkeypatch):
    import tokenizer.eval as tok_eval

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache
    with socket.socket() as s:  # a port that surely nothing listens on: we held it, then let it go
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(tok_eval, "TIKTOKEN_HOST", ("127.0.0.1", port))
    assert not tok_eval.host_reachable()
    t0 = time.time()
    enc, reason = tok_eval.load_tiktoken_encoding("cl100k_base")
    assert enc is None and "cl100k_base" in reason
    assert time.time() - t0 < 30  # cache only, no download attempt that could hang for minutes
