"""The speedchat tokenizer: byte-level BPE trained by `rustbpe` (Rust, fast), applied by
`tiktoken` (Rust, fast, multi-threaded batches), plus the chat special tokens and the
rendering of conversations into token ids with a loss mask.

    from tokenizer import Tokenizer, get_tokenizer
    tok = Tokenizer.train_from_iterator(texts, vocab_size=65536)   # vocab_size includes specials
    tok.save(path); tok = Tokenizer.load(path)
    ids = tok.encode("hello", prepend="<|bos|>"); text = tok.decode(ids)
    ids, mask = tok.render_conversation({"messages": [...]})

Token ids: 0..255 are the 256 single bytes, 256..N-1 the merges in the order they were
learned (a token's id is its BPE rank), then the special tokens N..N+8 in SPECIAL_TOKENS order.
Ordinary text is always encoded as plain text: "<|bos|>" inside a document is just characters;
special tokens only come from `encode_special`, `prepend` and the chat renderers.

On disk (a directory; plain text, no pickles): mergeable_ranks.tiktoken, tiktoken's own BPE file
("<base64 of the token's bytes> <rank>" per line, ranks 0..N-1); tokenizer.json (format version,
pattern, special-token ids, and the sha256 of the ranks file); token_bytes.pt (written by
`python -m tokenizer.train`), the byte length of each token id, 0 for specials, which turns a loss
into bits per byte. tokenizer.json is written last and pins the ranks file's hash, so a half-finished
save is detected on load instead of silently pairing new merges with old special-token ids.
"""

import base64
import hashlib
import json
from pathlib import Path

import tiktoken

from common import UserError, atomic_path, atomic_write, get_base_dir

# GPT-4 style pre-split, but digits in groups of 1-2 (a small vocab spends fewer ids on numbers).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, written back into the context
]

FORMAT_NAME = "speedchat-tokenizer"
FORMAT_VERSION = 1
RANKS_FILE = "mergeable_ranks.tiktoken"
CONFIG_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        n = len(mergeable_ranks)
        # every byte needs a token so that any text can be encoded; ranks are ids, so 0..N-1
        assert sorted(mergeable_ranks.values()) == list(range(n)), "mergeable ranks must be 0..N-1"
        assert all(bytes([b]) in mergeable_ranks for b in range(256)), "every single byte needs a rank"
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding("speedchat", pat_str=pattern, mergeable_ranks=self.mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens["<|bos|>"]

    # ---- training, saving, loading

    @classmethod
    def train_from_iterator(cls, texts, vocab_size: int, pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        """Train byte-level BPE with rustbpe on an iterable of str. `vocab_size` counts the
        special tokens; on a corpus too small for that many merges the vocab comes out smaller."""
        from rustbpe import Tokenizer as BPETrainer

        assert vocab_size >= 256 + len(SPECIAL_TOKENS), "the vocab holds at least the 256 bytes and the specials"
        trainer = BPETrainer()
        trainer.train_from_iterator(texts, vocab_size - len(SPECIAL_TOKENS), pattern=pattern)
        return cls({bytes(token): int(rank) for token, rank in trainer.get_mergeable_ranks()}, trainer.get_pattern())

    def save(self, directory):
        """Write mergeable_ranks.tiktoken and tokenizer.json (format in the module docstring)."""
        directory = Path(directory)
        lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                 for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
        ranks_text = "".join(lines)
        config = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "num_mergeable": len(self.mergeable_ranks),
            "vocab_size": self.get_vocab_size(),
            "special_tokens": self.special_tokens,
            "mergeable_ranks_sha256": hashlib.sha256(ranks_text.encode("ascii")).hexdigest(),
        }
        atomic_write(directory / RANKS_FILE, ranks_text)
        atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        """The tokenizer saved in `directory`; a UserError when it is missing, half-written (the ranks do
        not hash to what tokenizer.json pinned) or of another format version."""
        directory = Path(directory)
        config_path, ranks_path = directory / CONFIG_FILE, directory / RANKS_FILE
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        ranks_bytes = ranks_path.read_bytes() if ranks_path.exists() else b""
        # missing, of another format version (which pins the special tokens), or a save cut short
        usable = config.get("format") == FORMAT_NAME and config.get("version") == FORMAT_VERSION
        if not usable or hashlib.sha256(ranks_bytes).hexdigest() != config["mergeable_ranks_sha256"]:
            raise UserError(f"no usable tokenizer at {directory}: run `python -m tokenizer.train` first")
        ranks = {base64.b64decode(token): int(rank) for token, rank in map(str.split, ranks_bytes.decode().splitlines())}
        return cls(ranks, config["pattern"])

    # ---- encoding, decoding

    def get_vocab_size(self) -> int:
        return len(self.mergeable_ranks) + len(self.special_tokens)

    def fingerprint(self) -> str:
        """A short hash of the ranks, pattern and special tokens: checkpoints record it so a model
        is never paired with a different tokenizer of the same size."""
        h = hashlib.sha256(self.pattern.encode())
        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        h.update(json.dumps(self.special_tokens, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    def encode_special(self, name: str) -> int:
        return self.special_tokens[name]

    def encode(self, text, prepend=None, num_threads: int = 8):
        """str -> list[int]; list[str] -> list[list[int]] (encoded in parallel).
        prepend: a token id or a special-token name, put before every row."""
        head = [] if prepend is None else [self.encode_special(prepend) if isinstance(prepend, str) else prepend]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text)
        rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        return [head + row for row in rows] if head else rows

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self) -> list[int]:
        """Byte length of every token id (0 for special tokens: they stand for no text)."""
        lengths = [0] * self.get_vocab_size()
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths

    # ---- chat

    def render_conversation(self, conversation, max_tokens: int = 2048):
        """Conversation -> (ids, mask), both truncated to max_tokens. mask[i] = 1 where the
        token is produced by the assistant (its text, its python calls with their delimiters,
        <|assistant_end|>) and is trained on; 0 for <|bos|>, user turns, <|assistant_start|>
        and tool outputs (those come from the environment, not from the model). A system message
        is folded into the first user turn (the model has no system role)."""
        messages = conversation["messages"]
        assert (problem := conversation_problem(messages)) is None, problem
        ids, mask = [self.bos_token_id], [0]

        def add(text, supervised, start=None, end=None):
            tokens = ([self.special_tokens[start]] if start else []) + self.enc.encode_ordinary(text)
            tokens += [self.special_tokens[end]] if end else []
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else None
        for message in messages[system is not None:]:
            content = message["content"]
            if message["role"] == "user":
                add((system or "") + content, 0, "<|user_start|>", "<|user_end|>")
                system = None
                continue
            add("", 0, "<|assistant_start|>")
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if part["type"] == "text":
                    add(part["text"], 1)
                elif part["type"] == "python":
                    add(part["text"], 1, "<|python_start|>", "<|python_end|>")
                else:  # python_output
                    add(part["text"], 0, "<|output_start|>", "<|output_end|>")
            add("", 1, None, "<|assistant_end|>")
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Ids that prime the model to answer: the conversation without its final assistant
        message (if any), ending with <|assistant_start|>."""
        messages = conversation["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=10**12)
        return ids + [self.special_tokens["<|assistant_start|>"]]


PART_TYPES = ("text", "python", "python_output")


def conversation_problem(messages) -> str | None:
    """Why `messages` is not a conversation this tokenizer renders, or None when it is: an optional
    leading system message, then user and assistant alternating; text content, or for the assistant
    a list of parts {"type": one of PART_TYPES, "text": str}. The one check of conversations that come
    from outside (the chat API, CustomJSON files); a problem names the message it is about."""
    if not isinstance(messages, list) or not messages:
        return "a conversation needs a non-empty list of messages"
    system = int(isinstance(messages[0], dict) and messages[0].get("role") == "system")
    for i, message in enumerate(messages):
        role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
        expected = "system" if i < system else ("user", "assistant")[(i - system) % 2]
        if role != expected:
            return (f"message {i} has role {role!r} where {expected!r} belongs: after an optional system message, "
                    "user and assistant alternate, starting with user")
        parts = content if role == "assistant" and isinstance(content, list) else [{"type": "text", "text": content}]
        if not all(isinstance(p, dict) and p.get("type") in PART_TYPES and isinstance(p.get("text"), str) for p in parts):
            return f"message {i} ({role}): content must be a string" + (
                f" or a list of parts {{type: {'|'.join(PART_TYPES)}, text: string}}" if role == "assistant" else "")
    return "a system message must be followed by a user message" if len(messages) == system else None


# ---------------------------------------------------------------------------
# The run's tokenizer under $SPEEDCHAT_BASE_DIR/tokenizer


def get_tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"


def get_tokenizer() -> Tokenizer:
    return Tokenizer.load(get_tokenizer_dir())


def save_token_bytes(tok: Tokenizer, directory):
    """Write token_bytes.pt (see the module docstring) beside a saved tokenizer."""
    import torch

    with atomic_path(Path(directory) / TOKEN_BYTES_FILE) as tmp:
        torch.save(torch.tensor(tok.token_bytes(), dtype=torch.long), tmp)


def get_token_bytes(device="cpu"):
    """LongTensor[vocab_size] of token byte lengths (0 for specials), from $BASE/tokenizer."""
    import torch

    path = get_tokenizer_dir() / TOKEN_BYTES_FILE
    token_bytes = torch.load(path, map_location=device) if path.exists() else None
    if token_bytes is None or token_bytes.numel() != get_tokenizer().get_vocab_size():
        raise UserError(f"{path} is missing or stale: run `python -m tokenizer.train` first")
    return token_bytes


# ---------------------------------------------------------------------------
# GPT-2's tokenizer rebuilt offline from its vocab.json + merges.txt (for comparisons)

GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's vocab.json spells raw bytes as printable characters: printable latin-1 bytes
    stand for themselves, the other 68 bytes are shifted to chr(256 + k). Returns char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


def load_gpt2_encoding(directory) -> tiktoken.Encoding:
    """tiktoken Encoding for GPT-2 from a folder with gpt2_vocab.json (or vocab.json / encoder.json).
    A token's rank is its vocab id: GPT-2 numbered its tokens in merge order, so the merges file
    adds nothing."""
    directory = Path(directory)
    vocab_path = next((directory / n for n in ("vocab.json", "encoder.json") if (directory / n).exists()),
                      directory / "gpt2_vocab.json")  # a missing file: FileNotFoundError names it
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    decoder = gpt2_byte_decoder()
    special = {"<|endoftext|>": vocab.pop("<|endoftext|>")} if "<|endoftext|>" in vocab else {}
    ranks = {bytes(decoder[c] for c in token): rank for token, rank in vocab.items()}
    return tiktoken.Encoding("gpt2-offline", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)
