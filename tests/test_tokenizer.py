"""tokenizer/: training, encode/decode, special tokens, chat rendering and masks, the conversation
check, the on-disk format, token_bytes, the offline GPT-2 rebuild, and the train/eval scripts."""

import json
import socket
import time
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings, strategies as st

from common import UserError
from tokenizer import (SPECIAL_TOKENS, Tokenizer, conversation_problem, get_token_bytes, get_tokenizer,
                       load_gpt2_encoding, save_token_bytes)
from tokenizer.eval import SAMPLES

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
    assert all(tok.enc.decode_single_token_bytes(b) == bytes([b]) for b in range(256))  # ranks 0..255: the bytes
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n, VOCAB))
    assert tok.get_bos_token_id() == n
    # training learned merges: common English compresses better than one token per byte
    assert len(tok.encode(SAMPLES["prose"])) < 0.6 * len(SAMPLES["prose"].encode())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=200), min_size=1, max_size=8))
def test_roundtrip_arbitrary_text_single_and_batched(tok, texts):
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.get_bos_token_id() for i in ids)  # never a special token
        assert tok.decode(ids) == text
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_special_tokens_come_only_from_encode_special_and_prepend_append(tok):
    text = "before <|bos|> middle <|assistant_end|><|user_start|> after"  # plain text, never control tokens
    assert not set(range(tok.get_bos_token_id(), tok.get_vocab_size())) & set(tok.encode(text))
    assert tok.encode(["<|bos|>"])[0] == tok.encode("<|bos|>") != [tok.get_bos_token_id()]
    bos = tok.encode_special("<|bos|>")
    body = tok.encode("hello world")
    assert tok.encode("hello world", prepend="<|bos|>") == [bos] + body
    assert tok.encode("hello world", prepend=bos) == [bos] + body
    assert tok.encode(["hello world", ""], prepend="<|bos|>") == [[bos] + body, [bos]]
    assert tok.decode([bos] + body) == "<|bos|>hello world"


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
    segments = ["<|bos|>", "<|user_start|>", "Be brief.\n\nWhat is 2+3?", "<|user_end|>", "<|assistant_start|>",
                "Let me compute. ", "<|python_start|>", "2+3", "<|python_end|>", "<|output_start|>", "5", "<|output_end|>",
                "It is 5.", "<|assistant_end|>", "<|user_start|>", "Thanks", "<|user_end|>", "<|assistant_start|>",
                "You're welcome.", "<|assistant_end|>"]
    assert ids == ids_of(tok, *segments)  # each text encoded by itself, never merged across a boundary
    # trained on: what the assistant writes (its calls included), not the tool's output or anyone else's turn
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == (
        "Let me compute. <|python_start|>2+3<|python_end|>It is 5.<|assistant_end|>You're welcome.<|assistant_end|>")
    assert tok.render_conversation(CONVERSATION, max_tokens=7) == (ids[:7], mask[:7])


def test_render_for_completion(tok):
    ids = tok.render_for_completion(CONVERSATION)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    assert tok.decode(ids).endswith("<|user_start|>Thanks<|user_end|><|assistant_start|>")
    assert "You're welcome." not in tok.decode(ids)
    # a conversation that ends with the user is primed the same way
    without_last = {"messages": CONVERSATION["messages"][:-1]}
    assert tok.render_for_completion(without_last) == ids
    assert CONVERSATION["messages"][-1]["content"] == "You're welcome."  # input not mutated


@pytest.mark.parametrize("messages, where", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "hi"}], "message 0"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
     "message 2"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "message 1"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "message 0"),  # parts are the assistant's
    ([{"role": "user"}], "message 0"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}], "message 1"),
    ("not a list", "non-empty"),
])
def test_the_conversation_check_names_the_bad_message(tok, messages, where):
    assert where in conversation_problem(messages)
    with pytest.raises(AssertionError):
        tok.render_conversation({"messages": messages})
    good = CONVERSATION["messages"]
    assert conversation_problem(good) is None and conversation_problem(good[1:2]) is None


# ---------------------------------------------------------------------------
# Saving and loading


def test_save_load_identity(tok, tmp_path):
    import tiktoken.load

    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer.json").read_text())
    assert config["special_tokens"] == {s: tok.encode_special(s) for s in SPECIAL_TOKENS}
    # tiktoken's own reader understands the ranks file
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "mergeable_ranks.tiktoken")) == tok.mergeable_ranks
    loaded = Tokenizer.load(tmp_path)
    assert loaded.special_tokens == tok.special_tokens and loaded.pattern == tok.pattern
    for text in CORPUS:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.render_conversation(CONVERSATION) == tok.render_conversation(CONVERSATION)


def test_load_refuses_missing_and_half_written_files(tok, base_dir):
    with pytest.raises(UserError, match="run `python -m tokenizer.train` first"):
        get_tokenizer()
    tok.save(base_dir / "tokenizer")
    assert get_tokenizer().encode("hello there") == tok.encode("hello there")
    ranks = base_dir / "tokenizer" / "mergeable_ranks.tiktoken"
    ranks.write_text(ranks.read_text().replace(" 300\n", " 301\n", 1))  # not what tokenizer.json pinned
    with pytest.raises(UserError, match="tokenizer.train"):
        get_tokenizer()


def test_token_bytes(tok, base_dir):
    import torch

    lengths = tok.token_bytes()
    ordinary = [len(tok.enc.decode_single_token_bytes(i)) for i in range(tok.get_bos_token_id())]
    assert lengths == ordinary + [0] * len(SPECIAL_TOKENS)
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
    """GPT-2's original algorithm: bytes spelled as printable characters, then the adjacent pair
    with the lowest merge index merged until no pair has one."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelled = printable + [b for b in range(256) if b not in printable]
    byte_to_char = {b: chr(b if b in printable else 256 + k - len(printable)) for k, b in enumerate(spelled)}
    rank, ids = {pair: i for i, pair in enumerate(merges)}, []
    for piece in regex.findall(GPT2_PATTERN, text):
        word = [byte_to_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            i = min(range(len(word) - 1), key=lambda j: rank.get((word[j], word[j + 1]), float("inf")))
            if (word[i], word[i + 1]) not in rank:
                break
            word[i:i + 2] = [word[i] + word[i + 1]]
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


def test_train_and_eval_scripts(base_dir, tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import tokenizer.eval
    import tokenizer.train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"text": CORPUS * 4}), corpus / "shard_00000.parquet")
    pq.write_table(pa.table({"text": ["z" * 50000]}), corpus / "shard_00001.parquet")  # validation (the last)
    (corpus / "extra.txt").write_text(SAMPLES["code"] * 3, encoding="utf-8")
    tokenizer.train.main(["--data", str(corpus), "--vocab-size", "300", "--doc-cap", "500"])
    assert get_tokenizer().get_vocab_size() == 300 and get_token_bytes().numel() == 300
    stats = json.loads((base_dir / "report" / "tokenizer-train.json").read_text())
    # every train document capped at 500 chars, the .txt file cut into pieces, the validation shard held out
    assert stats["characters"] == sum(min(len(d), 500) for d in CORPUS * 4) + len(SAMPLES["code"] * 3)

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))  # empty: GPT-4 is n/a offline
    capsys.readouterr()
    tokenizer.eval.main(["--data", str(corpus), "--offline"])
    out = capsys.readouterr().out
    assert all(f"| {kind} |" in out for kind in list(SAMPLES) + ["validation"])
    assert "GPT-4: n/a" in out and ("GPT-2: n/a" in out) != GPT2_DIR.exists()
    data = json.loads((base_dir / "report" / "tokenizer-eval.json").read_text())
    assert data["bytes_per_token"]["prose"]["GPT-4"] is None and data["bytes_per_token"]["prose"]["ours"] > 1.0


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
