"""Train the BPE tokenizer (rustbpe) and save it, with token_bytes.pt, into $SPEEDCHAT_BASE_DIR/tokenizer.

    python -m tokenizer.train --data /path/to/shards --vocab-size 65536

--data takes parquet files (column `text`), .txt files, or folders of them. In a folder with
several files the last one (sorted by name) is the validation shard and is not trained on,
like the dataset's shard layout; files named one by one are all trained on. Without --data the
dataset source named by --source (default `stdlib-docs`) is used.
"""

import argparse
import itertools
import json
import time
from pathlib import Path

from common import POSITIVE, UserError, checked, format_seconds, get_base_dir, print0, run_main
from tokenizer import CONFIG_FILE, SPECIAL_TOKENS, Tokenizer, get_tokenizer_dir, save_token_bytes

DATA_SUFFIXES = (".parquet", ".txt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the speedchat BPE tokenizer.")
    min_vocab = 256 + len(SPECIAL_TOKENS)  # every byte and every special token
    p.add_argument("--vocab-size", type=checked(int, lambda v: v >= min_vocab, f"at least {min_vocab}"), default=65536,
                   help="vocabulary size, including the 9 special tokens (default: %(default)s); more than the "
                        "training text can give is refused")
    p.add_argument("--max-chars", type=checked(float, lambda v: v >= 1, "at least 1"), default=2e9,
                   help="train on at most this many characters (default: %(default)g)")
    p.add_argument("--doc-cap", type=POSITIVE, default=10000,
                   help="use at most this many characters of each document (default: %(default)s)")
    p.add_argument("--source", default="stdlib-docs",
                   help="dataset source used when --data is not given: stdlib-docs | fineweb-edu | dir:PATH "
                        "(default: %(default)s)")
    p.add_argument("--data", nargs="*", default=None,
                   help="parquet files (column `text`), .txt files or folders of them; default: the --source")
    p.add_argument("--force", action="store_true",
                   help="replace the tokenizer even when checkpoints were trained with it (they become unusable)")
    return p.parse_args(argv)


def checkpoints_using(directory) -> list[str]:
    """The checkpoint folders (stage/tag) whose models were trained with the tokenizer in `directory`."""
    if not (directory / CONFIG_FILE).exists():
        return []
    fingerprint = Tokenizer.load(directory).fingerprint()
    metas = sorted((get_base_dir() / "checkpoints").glob("*/*/meta_*.json"))
    return sorted({f"{m.parent.parent.name}/{m.parent.name}" for m in metas
                   if json.loads(m.read_text(encoding="utf-8")).get("tokenizer") == fingerprint})


# ---------------------------------------------------------------------------
# Reading local data (shared with tokenizer.eval)


def list_data_files(paths, holdout_last: bool = False) -> list[Path]:
    """Expand --data into .parquet/.txt files (a folder: its files sorted by name). With
    holdout_last, a folder of several files loses its last one: that is the validation shard."""
    files = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.suffix in DATA_SUFFIXES and f.is_file())
            if not found:
                raise UserError(f"no .parquet or .txt files in {path}")
            files += found[:-1] if holdout_last and len(found) > 1 else found
        elif path.is_file():
            if path.suffix not in DATA_SUFFIXES:
                raise UserError(f"{path}: --data takes .parquet or .txt files (or folders of them)")
            files.append(path)
        else:
            raise UserError(f"--data {raw}: no such file or folder")
    return files


def iter_file_documents(path: Path, doc_cap: int):
    """Documents from one file, each cut to doc_cap characters. A parquet row is a document;
    a .txt file is cut into documents of up to doc_cap characters at line breaks."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise UserError(f"{path} has no `text` column (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text[:doc_cap]
        return
    chunk, size = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            while len(line) > doc_cap:  # a single huge line: cut it
                yield line[:doc_cap]
                line = line[doc_cap:]
            if size + len(line) > doc_cap and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
    if chunk:
        yield "".join(chunk)


def iter_source_documents(args):
    """Training documents from --data, or from a dataset source (--source, default stdlib-docs)."""
    if args.data:
        for path in list_data_files(args.data, holdout_last=True):
            yield from iter_file_documents(path, args.doc_cap)
        return
    import dataset

    dataset.ensure_source(args.source)
    for doc in dataset.iter_documents(args.source, "train"):
        yield doc[:args.doc_cap]


def iter_training_texts(args):
    """The training documents, capped per document (--doc-cap) and in total (--max-chars),
    with a progress line every few seconds. Counts go into args.stats."""
    stats = args.stats = {"chars": 0, "docs": 0}
    max_chars, last_print, t0 = int(args.max_chars), time.time(), time.time()
    for doc in iter_source_documents(args):
        doc = doc[:max(0, max_chars - stats["chars"])]
        if not doc:
            if stats["chars"] >= max_chars:
                break
            continue
        stats["chars"] += len(doc)
        stats["docs"] += 1
        yield doc
        if time.time() - last_print > 10:
            last_print = time.time()
            rate = stats["chars"] / (last_print - t0)
            print0(f"read {stats['docs']:,} docs, {stats['chars']:,} chars ({rate:,.0f} chars/s)")
    # every merge joins two tokens of the text, so a text of n UTF-8 bytes (at most 4 per character)
    # gives at most n merges: refuse before the merges start rather than train for nothing
    most = 256 + len(SPECIAL_TOKENS) + 4 * stats["chars"]
    if args.vocab_size > most:
        raise UserError(f"--vocab-size {args.vocab_size:,} is more than {stats['chars']:,} characters of text can "
                        f"give (at most {most:,} tokens): lower it or train on more text")


def main(argv=None):
    args = parse_args(argv)
    users = [] if args.force else checkpoints_using(get_tokenizer_dir())
    if users:
        raise UserError(f"the tokenizer in {get_tokenizer_dir()} is the one the checkpoints {', '.join(users)} were "
                        "trained with, and a new one would make them unusable: pass --force to replace it anyway")
    try:
        from rustbpe import Tokenizer as _  # noqa: F401  (fail before reading any data)
    except ImportError:
        raise UserError("the rustbpe extension is not installed: `uv pip install -p .venv/bin/python ./rustbpe`")

    print0(f"training a {args.vocab_size:,}-token tokenizer on up to {int(args.max_chars):,} chars")
    texts = iter_training_texts(args)
    first = next(texts, None)  # opens (or builds) the source before the clock starts
    if first is None:
        raise UserError("the training data holds no text")
    t0 = time.time()
    tok = Tokenizer.train_from_iterator(itertools.chain([first], texts), args.vocab_size)
    seconds = time.time() - t0
    chars, docs = args.stats["chars"], args.stats["docs"]
    print0(f"trained on {docs:,} docs, {chars:,} chars in {format_seconds(seconds)} "
           f"({chars / seconds:,.0f} chars/s)")
    if tok.get_vocab_size() < args.vocab_size:
        print0(f"warning: the data only allowed {tok.get_vocab_size():,} tokens (asked for {args.vocab_size:,})")

    out_dir = get_tokenizer_dir()
    tok.save(out_dir)
    save_token_bytes(tok, out_dir)
    print0(f"saved the tokenizer to {out_dir}")

    lengths = [n for n in tok.token_bytes() if n > 0]  # ordinary tokens only; specials are 0
    stats = {
        "vocab size": tok.get_vocab_size(),
        "documents": docs,
        "characters": chars,
        "seconds": round(seconds, 2),
        "chars/s": round(chars / seconds),
        "token bytes min": min(lengths),
        "token bytes max": max(lengths),
        "token bytes mean": round(sum(lengths) / len(lengths), 3),
    }
    for key, value in stats.items():
        print0(f"{key}: {value}")
    from report import write_section

    write_section("tokenizer-train", "Tokenizer training",
                  {k.replace(" ", "_").replace("/", "_per_"): v for k, v in stats.items()})


if __name__ == "__main__":
    run_main(main)
