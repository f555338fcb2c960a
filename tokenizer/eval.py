"""How well does our tokenizer compress text? Bytes per token (higher = fewer tokens for the
same text) on prose, code, math, non-English text and the validation shard, for our tokenizer
next to GPT-2's and GPT-4's (cl100k_base).

    python -m tokenizer.eval [--data /path/to/shards] [--gpt2-dir DIR] [--offline]

GPT-2 is rebuilt offline from a local folder with its vocab and merges files (--gpt2-dir), else
fetched by tiktoken. cl100k_base comes from tiktoken's cache or the internet; an encoding that
can't be had is shown as n/a with the reason.
"""

import argparse
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from common import UserError, print0, run_main
from tokenizer import Tokenizer, get_tokenizer, get_tokenizer_dir, load_gpt2_encoding

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GPT2_DIR = REPO_ROOT.parent / "shared" / "data" / "gpt2_bpe"  # the --gpt2-dir default when it exists
TIKTOKEN_HOST = ("openaipublic.blob.core.windows.net", 443)  # where tiktoken downloads encodings from

# ---------------------------------------------------------------------------
# Hand-written samples, one per kind of text.

PROSE = """\
The lighthouse keeper had not spoken to another person in eleven days. Each morning he climbed
the hundred and twelve steps, wiped the salt from the great lens, and wrote the same three words
in the log: "Wind from west." On the twelfth day a small boat appeared on the horizon, rising and
falling with the swell, and he watched it for an hour before he was sure it was coming toward him.

It was the supply boat, a week early. The woman at the tiller waved, and he realised, with some
embarrassment, that he had forgotten how to wave back. His arm went up stiffly, like a signal
flag on a rusty pole. She laughed, and the sound carried across the water further than it should
have, the way sounds do on very still days.

"You look terrible," she said when she had tied up. "Have you been eating?"

He considered the question honestly. There had been bread, and then there had been crackers, and
for the last two days there had been tea. "Mostly," he said.

She handed him a crate of oranges, a sack of flour, a newspaper that was already four days old,
and a letter with his sister's careful handwriting on the envelope. He held the letter for a
long time without opening it. The gulls circled overhead, complaining about everything, and the
tide began, very slowly, to turn. Later, when the boat was only a dot again, he sat on the bottom
step and read the letter twice, then folded it into his coat pocket, where it stayed all winter.
"""

CODE = '''\
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Inventory:
    """A tiny in-memory inventory with JSON persistence."""
    items: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, count: int = 1) -> None:
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name: str, count: int = 1) -> bool:
        have = self.items.get(name, 0)
        if have < count:
            return False
        if have == count:
            del self.items[name]
        else:
            self.items[name] = have - count
        return True

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.items, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> "Inventory":
        return cls(json.loads(path.read_text())) if path.exists() else cls()


def most_common(inv: Inventory, k: int = 3) -> list[tuple[str, int]]:
    return sorted(inv.items.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


if __name__ == "__main__":
    inv = Inventory()
    for word in "apple pear apple fig apple pear".split():
        inv.add(word)
    assert inv.remove("fig") and not inv.remove("kiwi")
    print(most_common(inv))  # [('apple', 3), ('pear', 2)]
    for i in range(10):
        x = (i * 37 + 11) % 17
        print(f"{i:>3} -> {x:02d} {'#' * x}")
'''

MATH = r"""
Let $f(x) = 3x^2 - 12x + 7$. Completing the square, $f(x) = 3(x - 2)^2 - 5$, so the minimum value
is $-5$ at $x = 2$. The roots satisfy $(x - 2)^2 = 5/3$, i.e. $x = 2 \pm \sqrt{15}/3 \approx 0.709$
and $3.291$.

Problem 2. A tank holds 1,250 liters. It is filled at 18.5 L/min and drained at 6.25 L/min.
Starting empty, how long until it is full? Net rate: 18.5 - 6.25 = 12.25 L/min, so
1250 / 12.25 = 102.04 minutes, about 1 hour 42 minutes.

Theorem. For every integer $n \ge 1$, $\sum_{k=1}^{n} k^3 = \left(\frac{n(n+1)}{2}\right)^2$.
Proof by induction: for $n = 1$ both sides equal 1. Assume it holds for $n$; then
$\sum_{k=1}^{n+1} k^3 = \frac{n^2(n+1)^2}{4} + (n+1)^3 = \frac{(n+1)^2 (n^2 + 4n + 4)}{4}
= \left(\frac{(n+1)(n+2)}{2}\right)^2$. $\blacksquare$

Matrix check: if $A = \begin{pmatrix} 2 & 1 \\ 1 & 3 \end{pmatrix}$ then $\det A = 6 - 1 = 5$,
$\operatorname{tr} A = 5$, and the eigenvalues are $\lambda = (5 \pm \sqrt{5})/2$, i.e. 3.618 and 1.382.

Arithmetic drill: 47 * 86 = 4042; 1024 / 32 = 32; 2^10 = 1024; 999 + 1 = 1000; 0.125 = 1/8;
17 mod 5 = 2; gcd(84, 36) = 12; lcm(4, 6) = 12; 3.14159 * 2 = 6.28318; 1e-3 = 0.001.
"""

NON_ENGLISH = """\
Deutsch: Gestern Abend sind wir spät nach Hause gekommen, weil der Zug wegen eines Unwetters
fast zwei Stunden Verspätung hatte. Die Kinder haben im Abteil geschlafen, und ich habe endlich
das Buch zu Ende gelesen, das mir meine Großmutter zum Geburtstag geschenkt hatte.

Français : Le marché du samedi matin est toujours plein de monde. On y trouve des fromages de
la région, du pain encore chaud et des fleurs que la vieille dame au chapeau bleu vend depuis
plus de trente ans. « Prenez-en deux, c'est moins cher », dit-elle à chaque client.

Español: Cuando llegamos al pueblo, ya había empezado a llover. Nos refugiamos en un café
pequeño donde el dueño nos contó la historia del puente antiguo, construido, según él, hace
más de cuatrocientos años por un arquitecto que nunca llegó a verlo terminado.

Русский: Осенью в нашем парке особенно красиво. Листья медленно падают на дорожки, а по утрам
над прудом стоит лёгкий туман. Я люблю гулять там с собакой до начала рабочего дня.

中文：今天天气很好，我们一起去公园散步。路上我们看到很多人在放风筝，孩子们笑得特别开心。
晚上回家以后，妈妈做了一桌子好吃的菜，大家边吃边聊，一直到很晚才休息。

日本語：駅の近くに新しいパン屋ができました。毎朝七時に開店するので、通勤の前に寄る人が多いです。
私は特にメロンパンが好きで、週に二回は買ってしまいます。

한국어: 어제 친구와 함께 도서관에 갔습니다. 시험 기간이라서 자리가 거의 없었지만, 운 좋게
창가 자리를 찾아서 오후 내내 조용히 공부할 수 있었습니다.

العربية: ذهبنا في عطلة نهاية الأسبوع إلى البحر، وكان الجو معتدلاً والماء صافياً جداً.

हिन्दी: हर सुबह मेरे दादाजी बगीचे में पौधों को पानी देते हैं और चिड़ियों के लिए दाना डालते हैं।
"""

SAMPLES = {"prose": PROSE, "code": CODE, "math": MATH, "non-English": NON_ENGLISH}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Compare bytes per token of our tokenizer, GPT-2 and GPT-4.")
    p.add_argument("--tokenizer-dir", default=None, help="our tokenizer (default: $SPEEDCHAT_BASE_DIR/tokenizer)")
    p.add_argument("--data", nargs="*", default=None,
                   help="parquet/.txt files or folders; the last file is the validation text "
                        "(default: the stdlib-docs source's validation split, when available)")
    p.add_argument("--source", default="stdlib-docs",
                   help="dataset source whose validation split is measured when no --data is given "
                        "(fineweb-edu | stdlib-docs | dir:PATH; default %(default)s)")
    p.add_argument("--doc-cap", type=int, default=10000,
                   help="characters per document read from --data (default: %(default)s)")
    p.add_argument("--max-val-chars", type=float, default=5e6,
                   help="evaluate on at most this many validation characters (default: %(default)g)")
    gpt2_default = str(DEFAULT_GPT2_DIR) if DEFAULT_GPT2_DIR.exists() else None
    gpt2_default_help = "%(default)s" if gpt2_default else "none: tiktoken downloads GPT-2"
    p.add_argument("--gpt2-dir", default=gpt2_default,
                   help="a local folder with GPT-2's vocab and merges files (gpt2_vocab.json, gpt2_merges.txt), "
                        f"for comparing with GPT-2 offline (default: {gpt2_default_help})")
    p.add_argument("--offline", action="store_true", help="never download: use only local files and tiktoken's cache")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Getting the encodings; each loader returns (encoding, None) or (None, reason).


@contextmanager
def tiktoken_cache_only():
    """Make tiktoken read only its local cache: a download attempt fails at once instead of
    hanging on a network that is not there (tiktoken's requests.get has no timeout)."""
    import tiktoken.load

    real_read_file = tiktoken.load.read_file

    def refuse(blobpath):
        if "://" in blobpath:
            raise ConnectionError(f"offline and not in tiktoken's cache: {blobpath}")
        return real_read_file(blobpath)

    tiktoken.load.read_file = refuse
    try:
        yield
    finally:
        tiktoken.load.read_file = real_read_file


def host_reachable(timeout=3.0):
    try:
        socket.create_connection(TIKTOKEN_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def load_tiktoken_encoding(name: str, offline: bool = False):
    """tiktoken.get_encoding(name), failing fast (with a reason) when it would need a download
    that can't happen."""
    import tiktoken

    try:
        if offline or not host_reachable():
            with tiktoken_cache_only():
                return tiktoken.get_encoding(name), None
        return tiktoken.get_encoding(name), None
    except Exception as e:  # no network, no cache, bad download: report, don't crash
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, f"{name} unavailable ({reason})"


def load_gpt2(gpt2_dir, offline: bool):
    if gpt2_dir:
        try:
            return load_gpt2_encoding(gpt2_dir), None
        except (OSError, ValueError, UserError) as e:
            return None, f"GPT-2 from {gpt2_dir} failed: {e}"
    return load_tiktoken_encoding("gpt2", offline)


# ---------------------------------------------------------------------------


def validation_texts(args) -> tuple[list[str] | None, str]:
    """(documents, where they came from), or (None, why there are none)."""
    import dataset
    from tokenizer.train import iter_file_documents, list_data_files

    out, total = [], 0
    try:
        if args.data:
            path = list_data_files(args.data)[-1]
            docs, where = iter_file_documents(path, args.doc_cap), str(path)
        else:
            dataset.ensure_source(args.source)
            docs, where = dataset.iter_documents(args.source, "val"), f"{args.source} (val)"
        for doc in docs:
            out.append(doc[: int(args.max_val_chars) - total])
            total += len(out[-1])
            if total >= args.max_val_chars:
                break
    except UserError as e:
        return None, str(e)
    return out, where


def main(argv=None):
    args = parse_args(argv)
    ours = Tokenizer.load(args.tokenizer_dir) if args.tokenizer_dir else get_tokenizer()
    encodings, notes = {}, []
    for label, (enc, reason) in [("GPT-2", load_gpt2(args.gpt2_dir, args.offline)),
                                 ("GPT-4", load_tiktoken_encoding("cl100k_base", args.offline))]:
        encodings[label] = enc
        if reason:
            notes.append(f"{label}: n/a, {reason}")
    encodings["ours"] = ours.enc

    texts = {kind: [text] for kind, text in SAMPLES.items()}
    val_docs, where = validation_texts(args)
    if val_docs:
        texts["validation"] = val_docs
        notes.append(f"validation: {where}, {sum(len(d) for d in val_docs):,} chars")
    else:
        notes.append(f"validation: skipped ({where})")

    t0 = time.time()
    rows = {}  # kind -> (UTF-8 bytes, {label: tokens, None where that encoding is n/a})
    for kind, docs in texts.items():
        tokens = {lb: sum(map(len, enc.encode_ordinary_batch(docs))) if enc else None for lb, enc in encodings.items()}
        rows[kind] = (sum(len(d.encode("utf-8")) for d in docs), tokens)
    ratio = lambda n_bytes, n: n_bytes / max(n, 1)  # noqa: E731  (bytes per token)

    labels = list(encodings)
    header = "| text | bytes | " + " | ".join(f"{lb} tokens | {lb} bytes/token" for lb in labels) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(labels))]
    for kind, (n_bytes, tokens) in rows.items():
        cells = [f"{n:,} | {ratio(n_bytes, n):.2f}" if n is not None else "n/a | n/a" for n in tokens.values()]
        lines.append(f"| {kind} | {n_bytes:,} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    text = table + "\n\n" + "\n".join(f"- {n}" for n in notes)
    print0(text)
    print0(f"(encoded in {time.time() - t0:.1f}s)")

    from report import write_section

    data = {kind: {lb: None if n is None else round(ratio(n_bytes, n), 4) for lb, n in tokens.items()}
            for kind, (n_bytes, tokens) in rows.items()}
    write_section("tokenizer-eval", "Tokenizer evaluation",
                  {"tokenizer": args.tokenizer_dir or str(get_tokenizer_dir()), "vocab_size": ours.get_vocab_size(),
                   "bytes_per_token": data}, text="Bytes per token (higher compresses better):\n\n" + text)


if __name__ == "__main__":
    run_main(main)
