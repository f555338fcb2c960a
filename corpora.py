"""The pretraining corpora we build ourselves, in the shard layout every source shares:
<folder>/shard_NNNNN.parquet, one column `text`, row groups of 1024 documents, the last shard the
validation split.

    build_stdlib_docs(folder)        the documentation strings of the Python standard library
    build_from_dir(texts, folder)    any folder of .txt / .md / .jsonl / .parquet files

A build is cached: a manifest with the input's fingerprint is written last, so an unchanged input
is not rebuilt and a killed build is simply redone. Documents are shuffled with a fixed seed, so
every machine builds the same corpus.
"""

import ast
import gc
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common import UserError, atomic_path, atomic_write, file_lock, print0

ROWS_PER_GROUP = 1024          # documents per parquet row group (the unit that ranks split)
GROUPS_PER_SHARD = 8           # row groups per shard for the sources we build
DOC_MIN_CHARS, DOC_MAX_CHARS = 4096, 8192   # long texts are cut into documents of about this size
SHUFFLE_SEED = 1337            # built corpora are shuffled with this, so every machine builds the same
BUILD_VERSION = 1              # bump when the builders change, to rebuild cached corpora
DIR_FORMATS = ("it needs .txt/.md files, .jsonl with a \"text\" field, or .parquet with a 'text' column "
               "(or ready shard_*.parquet files)")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


class ParquetError(ValueError):
    """A file that is not a complete, readable parquet shard with a `text` column."""


def check_parquet(path: Path, column: str | None = "text"):
    """Cheap but strict check of a shard: PAR1 magic at both ends, a readable footer, a `text`
    column (`column=None`: any parquet file). Returns the footer's metadata."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    try:
        meta = pq.read_metadata(path) if size >= 12 and head == tail == b"PAR1" else None
    except Exception as e:
        raise ParquetError(f"unreadable parquet footer ({e})")
    problem = (f"not a complete parquet file ({size} bytes, no PAR1 magic at both ends; truncated?)" if meta is None
               else f"no column '{column}' (columns: {', '.join(meta.schema.names)})"
               if column not in (None, *meta.schema.names) else None)
    if problem:
        raise ParquetError(problem)
    return meta


def split_text(text: str, lo: int = DOC_MIN_CHARS, hi: int = DOC_MAX_CHARS) -> list[str]:
    """Cut a long text into documents of about lo..hi characters at blank lines
    (a giant paragraph is cut at a space). Short texts stay whole; blank texts vanish."""
    text = text.strip()
    if len(text) <= hi:
        return [text] if text else []
    out, cur, size = [], [], 0

    def flush():
        nonlocal cur, size
        if cur:
            out.append("\n\n".join(cur))
        cur, size = [], 0

    for para in re.split(r"\n[ \t]*\n\s*", text):
        while len(para) > hi:
            flush()
            cut = para.rfind(" ", lo, hi)
            cut = cut if cut > 0 else hi
            out.append(para[:cut].rstrip())
            para = para[cut:].lstrip()
        if size and size + len(para) + 2 > hi:
            flush()
        if para:
            cur.append(para)
            size += len(para) + 2
        if size >= lo:
            flush()
    flush()
    return out


def write_shards(docs: list[str], folder: Path, val_fraction: float = 0.05) -> list[Path]:
    """Write documents as train shards plus one validation shard (the last), each atomically."""
    per_shard = ROWS_PER_GROUP * GROUPS_PER_SHARD
    n_val = min(max(1, round(len(docs) * val_fraction)), per_shard)
    train, val = docs[:-n_val], docs[-n_val:]
    chunks = [train[i:i + per_shard] for i in range(0, len(train), per_shard)] + [val]
    paths = []
    for index, chunk in enumerate(chunks):
        path = folder / shard_name(index)
        with atomic_path(path) as tmp:
            table = pa.table({"text": pa.array(chunk, type=pa.string())})
            pq.write_table(table, tmp, row_group_size=ROWS_PER_GROUP, compression="zstd")
            tmp.chmod(0o644)
        paths.append(path)
    return paths


def _is_complete(folder: Path, fingerprint: str) -> bool:
    try:
        info = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("fingerprint") == fingerprint and all((folder / s).exists() for s in info.get("shards", []))


def build(folder: Path, fingerprint: str, make_docs, label: str) -> Path:
    """Build a corpus into `folder` unless a complete one with the same fingerprint is there.
    The manifest is written last, so a killed build is simply redone."""
    if _is_complete(folder, fingerprint):
        return folder
    with file_lock(folder / ".lock"):  # several ranks may call ensure_source at once
        if _is_complete(folder, fingerprint):
            return folder
        t0 = time.perf_counter()
        print0(f"building {label} into {folder} ...")
        docs = make_docs()
        if len(docs) < 2:
            raise UserError(f"{label}: only {len(docs)} document(s) of text: need at least 2 (one for validation)")
        random.Random(SHUFFLE_SEED).shuffle(docs)  # fixed seed: the same corpus on every machine
        (folder / "manifest.json").unlink(missing_ok=True)
        for old in folder.glob("shard_*.parquet"):
            old.unlink()
        shards = write_shards(docs, folder)
        info = dict(fingerprint=fingerprint, shards=[p.name for p in shards], documents=len(docs),
                    chars=sum(map(len, docs)))
        atomic_write(folder / "manifest.json", json.dumps(info, indent=1))
        print0(f"built {label}: {len(docs):,} documents, {info['chars'] / 1e6:.1f}M chars, "
               f"{len(shards)} shards in {time.perf_counter() - t0:.1f}s")
    return folder


# ---------------------------------------------------------------------------
# stdlib-docs: the documentation strings of the Python standard library (offline, everywhere)

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "config-")))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _definitions(body):
    """Classes and functions of a module or class body, also inside if/try/with blocks."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                          *[h.body for h in getattr(node, "handlers", [])]):
                yield from _definitions(block)


def _signature(node) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"({bases})" if bases else ""
    sig = f"({ast.unparse(node.args)})"
    return sig if len(sig) <= 200 else "(...)"


def _indent(text: str) -> str:
    return "\n".join("    " + line if line else line for line in text.splitlines())


def _module_docs(module: str, tree) -> list[str]:
    """One text per module docstring and per top-level class (with its methods) or function."""
    texts = []
    doc = ast.get_docstring(tree)
    if doc:
        texts.append(f"Module {module}\n\n{doc}")
    for node in _definitions(tree.body):
        doc = ast.get_docstring(node)
        kind = "class " if isinstance(node, ast.ClassDef) else ""
        parts = [f"{kind}{module}.{node.name}{_signature(node)}\n\n{doc or ''}".rstrip()]
        if isinstance(node, ast.ClassDef):
            for method in _definitions(node.body):
                mdoc = ast.get_docstring(method)
                if mdoc and not isinstance(method, ast.ClassDef):
                    parts.append(f"{node.name}.{method.name}{_signature(method)}\n\n{_indent(mdoc)}")
        if doc or len(parts) > 1:
            texts.append("\n\n".join(parts))
    return texts


def _pydoc_topics(path: Path) -> list[str]:
    """pydoc_data/topics.py holds the language reference pages that help() shows."""
    try:
        tree = ast.parse(path.read_bytes())
        topics = ast.literal_eval(tree.body[-1].value)
    except Exception:
        return []
    return [f"Python help topic: {name}\n\n{text}" for name, text in sorted(topics.items())]


def stdlib_documents() -> list[str]:
    """All documents of the stdlib-docs corpus, in a deterministic (unshuffled) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # ast trees are large and acyclic: the collector only slows parsing down (~2x)
    try:
        for path in _stdlib_files(root):
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if rel.parts == ("pydoc_data", "topics"):
                texts += _pydoc_topics(path)
                continue
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError):
                continue  # a few stdlib files are deliberately not valid Python
            texts += _module_docs(".".join(parts), tree)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [doc for text in texts for doc in split_text(text)]


def build_stdlib_docs(folder: Path) -> Path:
    root = sysconfig.get_paths()["stdlib"]
    fingerprint = f"stdlib-docs v{BUILD_VERSION} python {sys.version_info[:3]} {root}"
    return build(folder, fingerprint, stdlib_documents, "stdlib-docs")


# ---------------------------------------------------------------------------
# dir:PATH: any folder of .txt / .md / .jsonl / .parquet files


def _read_plain(path: Path) -> list[str]:
    return split_text(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> list[str]:
    docs, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            try:
                text = json.loads(line).get("text") if line.strip() else ""
            except (ValueError, AttributeError):  # not JSON, or not an object
                text = None
            if isinstance(text, str):
                docs += split_text(text)
            else:
                bad.append(lineno)
    if bad:
        print(f"warning: {path}: skipped {len(bad)} bad line(s) (first: line {bad[0]}); every line must be "
              "a JSON object with a string field \"text\"", file=sys.stderr, flush=True)
    return docs


def _read_parquet(path: Path) -> list[str]:
    check_parquet(path)
    return [doc for t in pq.read_table(path, columns=["text"]).column(0).to_pylist() if t for doc in split_text(t)]


READERS = {".txt": _read_plain, ".md": _read_plain, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _input_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in READERS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def dir_documents(folder: Path) -> list[str]:
    """Documents from every usable file of a folder; each bad file is reported by name and skipped."""
    docs, bad = [], []
    for path in _input_files(folder):
        try:
            file_docs, why = READERS[path.suffix.lower()](path), "no text"
        except (ValueError, OSError) as e:
            file_docs, why = [], f"not UTF-8 text (byte {e.start})" if isinstance(e, UnicodeDecodeError) else e
        if not file_docs:
            bad.append(f"{path.name}: {why}")
            print(f"warning: skipping {path}: {why}", file=sys.stderr, flush=True)
        docs += file_docs
    if not docs:
        why = f" ({len(bad)} bad file(s), first {bad[0]})" if bad else ""
        raise UserError(f"no usable text in {folder}{why}: {DIR_FORMATS}")
    return docs


def build_from_dir(texts: Path, folder: Path) -> Path:
    """Shards in `folder` from the files of the folder `texts`, rebuilt when a file changes."""
    h = hashlib.sha1(f"dir v{BUILD_VERSION}".encode())
    for p in _input_files(texts):
        st = p.stat()
        h.update(f"{p.relative_to(texts)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return build(folder, h.hexdigest(), lambda: dir_documents(texts), f"dir:{texts}")
