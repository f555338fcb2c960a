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
special tokens only come from `encode_special`, `prepend`/`append` and the chat renderers.

On-disk format (a directory, version 1; plain text, no pickles):

  mergeable_ranks.tiktoken   tiktoken's own BPE file: one line per mergeable token, sorted by
                             rank, "<base64 of the token's raw bytes> <rank>\\n". Ranks are
                             0..N-1 without gaps; ranks 0..255 are the single bytes.
                             (`tiktoken.load.load_tiktoken_bpe` reads it too.)
  tokenizer.json             {"format": "speedchat-tokenizer", "version": 1,
                              "pattern": <pre-split regex, fancy-regex syntax>,
                              "num_mergeable": N, "vocab_size": N + 9,
                              "special_tokens": {"<|bos|>": N, "<|user_start|>": N + 1, ...},
                              "mergeable_ranks_sha256": <sha256 of mergeable_ranks.tiktoken>}
  token_bytes.pt             (written by `python -m tokenizer.train`) torch LongTensor[vocab_size]:
                             the byte length of each token, 0 for special tokens; used to
                             turn a loss into bits per byte.

`tokenizer.json` is written last and pins the hash of the ranks file, so a half-finished save
is detected on load instead of silently pairing new merges with old special-token ids.
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
    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, name: str = "speedchat"):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError("mergeable ranks must be exactly 0..N-1 without gaps or repeats")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"mergeable ranks lack {len(missing)} single bytes (e.g. {missing[0]}): "
                             "every byte needs a token so that any text can be encoded")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=self.mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens["<|bos|>"]

    # ---- training, saving, loading

    @classmethod
    def train_from_iterator(cls, texts, vocab_size: int, pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        """Train byte-level BPE with rustbpe on an iterable of str. `vocab_size` counts the
        special tokens; on a corpus too small for that many merges the vocab comes out smaller."""
        try:
            from rustbpe import Tokenizer as BPETrainer
        except ImportError:  # also when ./rustbpe (the crate folder) shadows a missing install
            raise UserError("the rustbpe extension is not installed: `uv pip install -p .venv/bin/python ./rustbpe`")
        num_mergeable = vocab_size - len(SPECIAL_TOKENS)
        if num_mergeable < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        trainer = BPETrainer()
        trainer.train_from_iterator(texts, num_mergeable, pattern=pattern)
        pairs = trainer.get_mergeable_ranks()
        ranks = {bytes(token): int(rank) for token, rank in pairs}
        if len(ranks) != len(pairs):  # tiktoken needs one id per distinct byte string
            raise ValueError(f"rustbpe returned {len(pairs) - len(ranks)} duplicate token(s): two merges built the same bytes")
        return cls(ranks, trainer.get_pattern())

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
        directory = Path(directory)
        config_path, ranks_path = directory / CONFIG_FILE, directory / RANKS_FILE
        if not config_path.exists() or not ranks_path.exists():
            raise UserError(f"no tokenizer at {directory}: run `python -m tokenizer.train` first")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("format") != FORMAT_NAME or config.get("version") != FORMAT_VERSION:
            raise UserError(f"{config_path} is not a {FORMAT_NAME} v{FORMAT_VERSION} file: "
                            "re-run `python -m tokenizer.train`")
        ranks_bytes = ranks_path.read_bytes()
        if hashlib.sha256(ranks_bytes).hexdigest() != config["mergeable_ranks_sha256"]:
            raise UserError(f"{ranks_path} does not match {config_path} (interrupted save?): "
                            "re-run `python -m tokenizer.train`")
        ranks = {}
        for line in ranks_bytes.decode("ascii").splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        tok = cls(ranks, config["pattern"])
        if tok.special_tokens != config["special_tokens"]:
            raise UserError(f"{config_path}: special tokens differ from this code's SPECIAL_TOKENS "
                            "(saved by another version?): re-run `python -m tokenizer.train`")
        return tok

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
        if name not in self.special_tokens:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(self.special_tokens)}")
        return self.special_tokens[name]

    def _token_id(self, token) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int]; list[str] -> list[list[int]] (encoded in parallel).
        prepend/append: a token id or a special-token name, added to every row."""
        head = [self._token_id(prepend)] if prepend is not None else []
        tail = [self._token_id(append)] if append is not None else []
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, (list, tuple)):
            rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [head + row + tail for row in rows] if head or tail else rows
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def id_to_token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

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
        and tool outputs (those come from the environment, not from the model)."""
        ids, mask = [], []

        def add(tokens, supervised):
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        special = self.special_tokens
        add([self.bos_token_id], 0)
        for role, content in _normalize_messages(conversation):
            if role == "user":
                add([special["<|user_start|>"]], 0)
                add(self.enc.encode_ordinary(content), 0)
                add([special["<|user_end|>"]], 0)
                continue
            add([special["<|assistant_start|>"]], 0)
            for kind, text in content:
                if kind == "text":
                    add(self.enc.encode_ordinary(text), 1)
                elif kind == "python":
                    add([special["<|python_start|>"]], 1)
                    add(self.enc.encode_ordinary(text), 1)
                    add([special["<|python_end|>"]], 1)
                else:  # python_output
                    add([special["<|output_start|>"]], 0)
                    add(self.enc.encode_ordinary(text), 0)
                    add([special["<|output_end|>"]], 0)
            add([special["<|assistant_end|>"]], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Ids that prime the model to answer: the conversation without its final assistant
        message (if any), ending with <|assistant_start|>."""
        _normalize_messages(conversation)  # malformed input fails here, before anything is dropped
        messages = conversation["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=10**12)
        return ids + [self.special_tokens["<|assistant_start|>"]]

    def visualize(self, ids, mask) -> str:
        """Debug view: supervised runs in green, the rest in grey (ANSI colours)."""
        out, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or mask[i] != mask[start]:
                colour = "\033[92m" if mask[start] else "\033[90m"
                out.append(colour + self.decode(ids[start:i]) + "\033[0m")
                start = i
        return "".join(out)


PART_TYPES = ("text", "python", "python_output")


def _normalize_messages(conversation):
    """Check a conversation and return [(role, content)]: the system message folded into
    the first user turn, user content a str, assistant content a list of (type, text)."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError('a conversation must be a dict {"messages": [...]}')
    messages = conversation["messages"]
    if not messages:
        raise ValueError("conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {message['role']!r} (expected system, user or assistant)")
    system = None
    if messages[0]["role"] == "system":
        system = messages[0]["content"]
        if not isinstance(system, str):
            raise ValueError("the system message content must be a string")
        messages = messages[1:]
        if not messages:
            raise ValueError("a system message must be followed by a user message")
    out = []
    for j, message in enumerate(messages):
        i = j + (system is not None)
        role, content = message["role"], message["content"]
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i} has role {role!r} but {expected!r} was expected: after an optional "
                             "leading system message, roles must alternate user, assistant, user, ...")
        if role == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {i}: user content must be a string (parts are for assistant messages only)")
            if j == 0 and system is not None:
                content = system + "\n\n" + content
            out.append((role, content))
        else:
            out.append((role, _assistant_parts(content, i)))
    return out


def _assistant_parts(content, i):
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise ValueError(f"message {i}: assistant content must be a string or a list of parts")
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"message {i}: unknown part type {kind!r} (expected one of {', '.join(PART_TYPES)})")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"message {i}: a {part['type']} part needs a string 'text'")
        parts.append((part["type"], part["text"]))
    return parts


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

    directory = get_tokenizer_dir()
    path = directory / TOKEN_BYTES_FILE
    if not path.exists():
        raise UserError(f"no {TOKEN_BYTES_FILE} in {directory}: run `python -m tokenizer.train` first")
    token_bytes = torch.load(path, map_location=device)
    config_path = directory / CONFIG_FILE
    if config_path.exists():
        vocab_size = json.loads(config_path.read_text(encoding="utf-8"))["vocab_size"]
        if token_bytes.numel() != vocab_size:
            raise UserError(f"{path} has {token_bytes.numel()} entries but the tokenizer has {vocab_size} "
                            "tokens: re-run `python -m tokenizer.train`")
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
    """tiktoken Encoding for GPT-2 from a folder with gpt2_vocab.json (or vocab.json / encoder.json)
    and, optionally, gpt2_merges.txt (or merges.txt / vocab.bpe) to cross-check the ranks.
    A token's rank is its vocab id: GPT-2 numbered its tokens in merge order."""
    directory = Path(directory)
    vocab_path = _first_existing(directory, ["gpt2_vocab.json", "vocab.json", "encoder.json"])
    if vocab_path is None:
        raise UserError(f"no gpt2_vocab.json in {directory}: pass --gpt2-dir with GPT-2's vocab.json and merges")
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    decoder = gpt2_byte_decoder()
    special = {"<|endoftext|>": vocab.pop("<|endoftext|>")} if "<|endoftext|>" in vocab else {}
    ranks = {bytes(decoder[c] for c in token): rank for token, rank in vocab.items()}
    merges_path = _first_existing(directory, ["gpt2_merges.txt", "merges.txt", "vocab.bpe"])
    if merges_path is not None:
        lines = [ln for ln in merges_path.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#version")]
        for k, line in enumerate(lines):
            a, b = line.split(" ")
            if vocab.get(a + b) != 256 + k:
                raise ValueError(f"{merges_path}: merge {k} ({line!r}) is not vocab id {256 + k}: "
                                 "vocab and merges do not belong together")
    return tiktoken.Encoding("gpt2-offline", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def _first_existing(directory: Path, names):
    return next((directory / n for n in names if (directory / n).exists()), None)
