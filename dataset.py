"""Pretraining shards: download FineWeb-edu, build the offline `stdlib-docs` corpus, turn any
folder of text into shards, and read documents back for the tokenizer and the dataloader.

Every source has the same layout: $SPEEDCHAT_BASE_DIR/data/<source>/shard_NNNNN.parquet, one
column `text`, row groups of ~1024 documents; the last shard is the validation split.

    python -m dataset -n 240                      # FineWeb-edu: shards 0..239 + the last (validation)
    python -m dataset --source stdlib-docs        # offline: Python standard library documentation
    python -m dataset --source dir:/path/to/texts # .txt / .md / .jsonl / .parquet files, or ready shards
"""

import argparse
import ast
import contextlib
import fcntl
import gc
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from common import UserError, atomic_path, atomic_write, get_base_dir, print0, run_main

SOURCES_HELP = "fineweb-edu | stdlib-docs | dir:PATH"
ROWS_PER_GROUP = 1024          # documents per parquet row group (the unit that ranks split)
GROUPS_PER_SHARD = 8           # row groups per shard for the sources we build
DOC_MIN_CHARS, DOC_MAX_CHARS = 4096, 8192   # long texts are cut into documents of about this size
SHUFFLE_SEED = 1337            # built corpora are shuffled with this, so every machine builds the same
BUILD_VERSION = 1              # bump when the builders change, to rebuild cached corpora

FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_LAST = 1822            # index of the last published shard: our validation split
OFFLINE_HINT = "use an offline source instead: --source stdlib-docs or --source dir:PATH"

# ---------------------------------------------------------------------------
# Sources and their folders


def source_dir(source: str) -> Path:
    """The folder that holds (or will hold) a source's shards."""
    if source in ("fineweb-edu", "stdlib-docs"):
        return get_base_dir() / "data" / source
    if source.startswith("dir:"):
        folder = Path(source[4:]).expanduser().resolve()
        if any(folder.glob("shard_*.parquet")):
            return folder  # already in the layout: used in place, never copied
        digest = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.name) or "root"
        return get_base_dir() / "data" / f"dir-{name}-{digest}"
    raise UserError(f"unknown data source {source!r}: use one of {SOURCES_HELP}")


def ensure_source(source: str) -> Path:
    """Make sure a source has shards (building stdlib-docs or a dir: source when needed) and
    return its folder. UserError, saying what to run, when it has none."""
    if source == "stdlib-docs":
        return build_stdlib_docs()
    if source.startswith("dir:"):
        return build_from_dir(Path(source[4:]).expanduser())
    folder = source_dir(source)
    shards = sorted(folder.glob("shard_*.parquet"))
    if len(shards) < 2:
        raise UserError(f"no {source} shards in {folder}: run `python -m dataset --source {source} -n 240` "
                        f"(or {OFFLINE_HINT})")
    if not (folder / shard_name(FINEWEB_LAST)).exists():
        raise UserError(f"the validation shard {shard_name(FINEWEB_LAST)} is missing in {folder}: "
                        f"rerun `python -m dataset --source {source} -n {len(shards)}`")
    return folder


def list_shards(source: str) -> list[Path]:
    """All shards of a source, in order; the last one is the validation split."""
    return sorted(ensure_source(source).glob("shard_*.parquet"))


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


# ---------------------------------------------------------------------------
# Reading: a split is a list of row groups, each rank reads its own share of them


class ParquetError(Exception):
    """A file that is not a complete, readable parquet shard with a `text` column."""


def check_parquet(path: Path, column: str | None = "text"):
    """Cheap but strict check of a shard: PAR1 magic at both ends, a readable footer, a `text`
    column (`column=None`: any parquet file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise ParquetError(f"not a complete parquet file ({size} bytes, no PAR1 magic at both ends; truncated?)")
    try:
        meta = pq.read_metadata(path)
    except Exception as e:
        raise ParquetError(f"unreadable parquet footer ({e})")
    if column is not None and column not in meta.schema.names:
        raise ParquetError(f"no column '{column}' (columns: {', '.join(meta.schema.names)})")
    return meta


_row_counts_cache = {}


def row_counts(path: Path) -> list[int]:
    """Documents in each row group of a shard (footer only; cached)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _row_counts_cache:
        try:
            meta = check_parquet(path)
        except ParquetError as e:
            raise UserError(f"bad shard {path}: {e}; delete it and rebuild or re-download the source")
        _row_counts_cache[key] = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return _row_counts_cache[key]


def split_row_groups(source: str, split: str = "train", rank: int = 0, world_size: int = 1) -> list[tuple]:
    """This rank's share of a split, in reading order, as units (shard_path, row_group, first, step):
    the unit's documents are rows first::step of that row group. Row group i of the split goes to
    rank i % world_size; a split with fewer row groups than ranks is shared document by document."""
    assert split in ("train", "val") and 0 <= rank < world_size, (split, rank, world_size)
    shards = list_shards(source)  # 2 or more: ensure_source sees to it
    shards = shards[:-1] if split == "train" else shards[-1:]
    groups = [(path, rg, n) for path in shards for rg, n in enumerate(row_counts(path)) if n > 0]
    if len(groups) >= world_size:
        units = [(path, rg, 0, 1) for i, (path, rg, n) in enumerate(groups) if i % world_size == rank]
    else:
        units = [(path, rg, rank, world_size) for path, rg, n in groups if n > rank]
    if not units:
        raise UserError(f"the {split} split of {source} has too few documents for {world_size} ranks")
    return units


def unit_size(unit) -> int:
    """How many documents a unit yields."""
    path, rg, first, step = unit
    return len(range(first, row_counts(path)[rg], step))


def read_unit(unit) -> list[str]:
    """The documents of one unit (row group, or this rank's rows of it)."""
    path, rg, first, step = unit
    try:
        table = pq.ParquetFile(path).read_row_group(rg, columns=["text"])
    except Exception as e:
        raise UserError(f"cannot read row group {rg} of {path} ({e}); delete it and rebuild or re-download")
    texts = table.column(0).to_pylist()
    if first or step != 1:
        texts = texts[first::step]
    return [t if t is not None else "" for t in texts]


def iter_documents(source: str, split: str = "train", rank: int = 0, world_size: int = 1, start=None, epochs=1):
    """Documents (str) of this rank's share of a split, in a fixed order. `start` is the index of
    the first unit to read (see split_row_groups); `epochs=None` loops forever."""
    units = split_row_groups(source, split, rank, world_size)
    epoch, i = 0, start or 0
    while epochs is None or epoch < epochs:
        for unit in units[i:]:
            yield from read_unit(unit)
        epoch, i = epoch + 1, 0


# ---------------------------------------------------------------------------
# Writing shards (the sources we build ourselves)


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
    if len(docs) < 2:
        raise UserError(f"only {len(docs)} document(s) of text: need at least 2 (one for validation)")
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


@contextlib.contextmanager
def _build_lock(folder: Path):
    """One builder at a time per folder (several ranks may call ensure_source at once)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_complete(folder: Path, fingerprint: str) -> bool:
    manifest = folder / "manifest.json"
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return info.get("fingerprint") == fingerprint and all((folder / s).exists() for s in info.get("shards", []))


def _build(folder: Path, fingerprint: str, make_docs, label: str) -> Path:
    """Build a corpus into `folder` unless a complete one with the same fingerprint is there.
    The manifest is written last, so a killed build is simply redone."""
    if _is_complete(folder, fingerprint):
        return folder
    with _build_lock(folder):
        if _is_complete(folder, fingerprint):
            return folder
        t0 = time.perf_counter()
        print0(f"building {label} into {folder} ...")
        docs = make_docs()
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


def build_stdlib_docs() -> Path:
    root = sysconfig.get_paths()["stdlib"]
    fingerprint = f"stdlib-docs v{BUILD_VERSION} python {sys.version_info[:3]} {root}"
    return _build(source_dir("stdlib-docs"), fingerprint, stdlib_documents, "stdlib-docs")


# ---------------------------------------------------------------------------
# dir:PATH: any folder of .txt / .md / .jsonl / .parquet files


def _read_plain(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start})")
    return split_text(text)


def _read_jsonl(path: Path) -> list[str]:
    docs, bad, first_bad = [], 0, None
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
                if not isinstance(text, str):
                    raise TypeError("'text' is not a string")
            except (ValueError, KeyError, TypeError) as e:
                bad += 1
                first_bad = first_bad or f"line {lineno}: {type(e).__name__} {e}"
                continue
            docs += split_text(text)
    if bad:
        print(f"warning: {path}: skipped {bad} bad line(s) (first: {first_bad}); every line must be "
              "a JSON object with a string field \"text\"", file=sys.stderr, flush=True)
    return docs


def _read_parquet(path: Path) -> list[str]:
    try:
        texts = pq.read_table(path, columns=["text"]).column(0).to_pylist()
    except Exception as e:
        names = None
        with contextlib.suppress(Exception):
            names = pq.read_schema(path).names
        if names is not None and "text" not in names:
            raise ValueError(f"no column 'text' (columns: {', '.join(names)})")
        raise ValueError(f"not a readable parquet file ({str(e).splitlines()[0][:120]})")
    return [doc for t in texts if t for doc in split_text(t)]


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
            file_docs = READERS[path.suffix.lower()](path)
            if not file_docs:
                raise ValueError("no text")
        except (ValueError, OSError) as e:
            bad.append(f"{path.name}: {e}")
            print(f"warning: skipping {path}: {e}", file=sys.stderr, flush=True)
            continue
        docs += file_docs
    if not docs:
        why = f" ({len(bad)} bad file(s), first {bad[0]})" if bad else ""
        raise UserError(f"no usable text in {folder}{why}: it needs .txt/.md files, .jsonl with a \"text\" "
                        "field, or .parquet with a 'text' column")
    return docs


def build_from_dir(folder: Path) -> Path:
    folder = folder.resolve()
    if not folder.is_dir():
        raise UserError(f"dir:{folder} is not a folder")
    shards = sorted(folder.glob("shard_*.parquet"))
    if shards:
        if len(shards) < 2:
            raise UserError(f"{folder} holds only {shards[0].name}: the layout needs 2+ shards (the last is validation)")
        return folder
    files = _input_files(folder)
    h = hashlib.sha1(f"dir v{BUILD_VERSION}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if not files:
        raise UserError(f"no usable text in {folder}: it needs .txt/.md files, .jsonl with a \"text\" field, "
                        "or .parquet with a 'text' column (or ready shard_*.parquet files)")
    return _build(source_dir(f"dir:{folder}"), h.hexdigest(), lambda: dir_documents(folder), f"dir:{folder}")


# ---------------------------------------------------------------------------
# Downloads: the one retry path of every file the project fetches (shards, task data, the CORE
# bundle) and of the small requests around them (file lists)

_stop = threading.Event()  # set on Ctrl-C so the download threads stop between chunks
UNREACHABLE = ("DNS lookup failed", "connection refused", "network unreachable", "no route to host",
               "connect timed out")


class DownloadError(Exception):
    """A download that failed for `reason` (a few words) after `attempts` tries."""

    def __init__(self, message, reason=None, attempts=1):
        super().__init__(message)
        self.reason, self.attempts = reason or message, attempts


class _Retry(Exception):
    """Worth another attempt, which resumes the partial file."""


class _Restart(_Retry):
    """Worth another attempt from zero: the partial file cannot be trusted."""


def network_reason(e: Exception) -> str:
    """A few words for why a request failed (the exception's own text is a page long)."""
    import requests

    text = str(e)
    for needle, reason in (("Name or service not known", "DNS lookup failed"), ("Failed to resolve", "DNS lookup failed"),
                           ("NameResolution", "DNS lookup failed"), ("Connection refused", "connection refused"),
                           ("Network is unreachable", "network unreachable"), ("No route to host", "no route to host")):
        if needle in text:
            return reason
    if isinstance(e, requests.ConnectTimeout):
        return "connect timed out"
    return "timed out" if "timed out" in text.lower() else type(e).__name__


def _retrying(attempt, url, retries, backoff, fail_fast):
    """attempt() until it returns. Dropped or timed-out connections, HTTP 429/5xx and bad bytes are
    retried with exponential backoff (cut short by Ctrl-C); other HTTP errors fail at once, and so
    does an unreachable host when `fail_fast` (the first request of a job: we are offline)."""
    import requests

    for i in range(retries + 1):
        if i:
            _stop.wait(min(backoff * 2 ** (i - 1), 60.0))
        if _stop.is_set():
            raise DownloadError(f"{url}: interrupted", "interrupted", i)
        try:
            return attempt()
        except requests.RequestException as e:
            reason = network_reason(e)
            if fail_fast and reason in UNREACHABLE:
                raise DownloadError(f"cannot reach {urlparse(url).netloc} ({reason})", reason)
        except _Retry as e:
            reason = str(e)
    raise DownloadError(f"{Path(urlparse(url).path).name}: {reason} (after {retries + 1} attempts)", reason, retries + 1)


def _check_status(r, url):
    if r.status_code == 429 or r.status_code >= 500:
        raise _Retry(f"HTTP {r.status_code}")
    if r.status_code >= 400:
        raise DownloadError(f"HTTP {r.status_code} for {url}", f"HTTP {r.status_code}")


def request(url, method="GET", retries=5, backoff=2.0, timeout=60.0, headers=None):
    """A small request (a file list, a probe) with the retry rules above; an unreachable host fails at once."""
    import requests

    def attempt():
        r = requests.request(method, url, headers=headers, timeout=(10, timeout), allow_redirects=True)
        _check_status(r, url)
        return r

    return _retrying(attempt, url, retries, backoff, fail_fast=True)


def _published_sha256(response):
    """The sha256 the server publishes for the file, if any: the Hugging Face Hub sends the LFS
    object id (the content's sha256) as X-Linked-Etag on its redirect to the storage."""
    for r in (*response.history, response):
        tag = r.headers.get("X-Linked-Etag", "").removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return tag
    return None


def _fetch(url: str, part: Path, timeout: float, headers: dict | None = None):
    """One attempt: append to `part` from where it stops (HTTP Range), then check the complete file
    against the size the server reports and the sha256 it publishes."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    headers = {**(headers or {}), "Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    with requests.get(url, headers=headers, stream=True, timeout=(10, timeout)) as r:
        if r.status_code == 416:
            raise _Restart("the server refused to resume (HTTP 416)")
        _check_status(r, url)
        sha256, total = _published_sha256(r), r.headers.get("Content-Length")
        if r.status_code == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", r.headers.get("Content-Range", "").strip())
            if not m or int(m.group(1)) != have:
                raise _Restart(f"the server resumed with Content-Range {r.headers.get('Content-Range')!r}, not at {have}")
            total = m.group(2)
        with open(part, "ab" if r.status_code == 206 else "wb") as f:  # 200: the whole file, from zero
            for chunk in r.iter_content(chunk_size=1 << 16):  # small: a dropped connection loses < 64 KB
                if _stop.is_set():
                    raise DownloadError("interrupted")
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size != int(total):
        raise (_Retry if size < int(total) else _Restart)(f"got {size} of {total} bytes")
    if sha256 is not None and _sha256(part) != sha256:
        raise _Restart("the content does not match the sha256 the server publishes")


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, path: Path, retries: int = 5, backoff: float = 2.0, timeout: float = 60.0,
                  validate=check_parquet, headers: dict | None = None) -> Path:
    """Download `url` to `path`: resume a partial `path.part`, retry (see _retrying), verify the size,
    the published sha256 and `validate(file)` (a parquet shard by default; None skips it) -- bytes
    that fail a check are thrown away and fetched again from zero -- then rename into place. Never
    leaves a bad `path`; another process downloading the same file waits for this one."""
    part = path.with_name(path.name + ".part")

    def attempt():
        try:
            _fetch(url, part, timeout, headers)
            if validate is not None:
                validate(part)
        except (_Restart, ParquetError) as e:
            part.unlink(missing_ok=True)
            raise _Retry(str(e))
        os.replace(part, path)
        return path

    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return path if _is_valid(path, validate) else _retrying(attempt, url, retries, backoff, fail_fast=False)


def _is_valid(path, validate) -> bool:
    try:
        if validate is not None:
            validate(path)  # raises on a missing or bad file
        return path.exists()
    except (OSError, ParquetError):
        return False


def is_complete_shard(path: Path) -> bool:
    return _is_valid(path, check_parquet)


def fineweb_url(url: str | None = None) -> str:
    return (url or os.environ.get("SPEEDCHAT_FINEWEB_URL") or FINEWEB_URL).rstrip("/")


def download_fineweb(num_shards: int, workers: int = 8, url: str | None = None, retries: int = 5,
                     backoff: float = 2.0, timeout: float = 60.0, last: int = FINEWEB_LAST) -> Path:
    """Download the first `num_shards` shards (-1: all) plus the last one (validation)."""
    from tqdm import tqdm

    folder = source_dir("fineweb-edu")
    folder.mkdir(parents=True, exist_ok=True)
    n = last if num_shards < 0 else min(num_shards, last)
    indices = list(range(n)) + [last]
    todo = [i for i in indices if not is_complete_shard(folder / shard_name(i))]
    if not todo:
        print0(f"all {len(indices)} shards already in {folder}")
        return folder
    base = fineweb_url(url)
    try:  # fail fast, in one line, when the server cannot be reached at all or refuses the first file
        request(f"{base}/{shard_name(todo[0])}", "HEAD", retries=0, timeout=5.0)
    except DownloadError as e:
        raise UserError(f"{e}: {OFFLINE_HINT if e.reason in UNREACHABLE else 'check --url / SPEEDCHAT_FINEWEB_URL'}")
    print0(f"downloading {len(todo)} of {len(indices)} shards from {base} to {folder} ({workers} workers)")
    failed = []
    _stop.clear()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = {pool.submit(download_file, f"{base}/{shard_name(i)}", folder / shard_name(i),
                               retries, backoff, timeout): i for i in todo}
        with tqdm(total=len(todo), unit="shard", disable=len(todo) < 2) as bar:
            for future in as_completed(futures):
                if future.exception() is not None:
                    failed.append(str(future.exception()))
                bar.update(1)
    except BaseException:
        _stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        raise UserError(f"{len(failed)} of {len(todo)} shards failed (first: {sorted(failed)[0]}); "
                        "rerun the same command to resume")
    return folder


# ---------------------------------------------------------------------------
# CLI


def _num_shards(text):
    if int(text) < -1:  # -1 means all: a typo like -5 must not download 1822 shards
        raise argparse.ArgumentTypeError(f"must be >= 0, or -1 for all, got {text}")
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download or build pretraining shards.")
    parser.add_argument("--source", default="fineweb-edu", help=f"data source: {SOURCES_HELP} (default fineweb-edu)")
    parser.add_argument("-n", "--num-shards", type=_num_shards, default=8,
                        help="fineweb-edu: download the first N train shards plus the last (validation); "
                             "-1 = all 1822; a d20 run uses 240 (default: %(default)s)")
    parser.add_argument("-w", "--workers", type=int, default=8, help="parallel downloads (default: %(default)s)")
    parser.add_argument("--url", default=None,
                        help=f"base URL of the shards (default $SPEEDCHAT_FINEWEB_URL or {FINEWEB_URL})")
    parser.add_argument("--retries", type=int, default=5,
                        help="retries per shard, with exponential backoff (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds without data before a retry (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.source == "fineweb-edu":
        folder = download_fineweb(args.num_shards, args.workers, args.url, args.retries, timeout=args.timeout)
    else:
        folder = ensure_source(args.source)
    shards = sorted(folder.glob("shard_*.parquet"))
    docs = sum(sum(row_counts(p)) for p in shards)
    print0(f"{args.source}: {len(shards)} shards ({len(shards) - 1} train + 1 validation), {docs:,} documents in {folder}")


if __name__ == "__main__":
    run_main(main)
