"""Pretraining sources and their mixtures: where each source's shards are, downloading the remote
ones, and reading documents back for the tokenizer and the dataloader.

Every source has the same layout: $SPEEDCHAT_BASE_DIR/data/<source>/shard_NNNNN.parquet, one
column `text`, row groups of ~1024 documents; the last shard is the validation split.

    python -m dataset -n 240                      # FineWeb-edu: shards 0..239 + the last (validation)
    python -m dataset --source climbmix -n 170    # ClimbMix: shards 0..169 + the last (validation)
    python -m dataset --source stdlib-docs        # offline: Python standard library documentation
    python -m dataset --source dir:/path/to/texts # .txt / .md / .jsonl / .parquet files, or ready shards

Wherever a pretraining source is named, a weighted mixture may be too: "climbmix:0.9,dir:/data/math:0.1"
takes 90% of the tokens from ClimbMix and 10% from the folder, whole documents drawn in turn (a source
without a weight weighs 1; weights are normalized). A schedule changes the mixture at fractions of training:
"0:fineweb-edu;0.8:fineweb-edu:0.7,dir:/data/math:0.3" (or a file with one `FRACTION:MIXTURE` a line).
"""

import argparse
import hashlib
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pyarrow.parquet as pq

import download
from common import UserError, checked, get_base_dir, print0, run_main
from corpora import ParquetError, build_from_dir, build_stdlib_docs, check_parquet, shard_name
from download import DownloadError, download_file, request  # noqa: F401  (the project's one download path)

SOURCES_HELP = "fineweb-edu | climbmix | stdlib-docs | dir:PATH, or a mixture such as climbmix:0.9,dir:PATH:0.1"
# the sources published as shards: Hugging Face dataset, index of the last shard (the validation
# split), and the environment variable that points at a mirror of its files
REMOTE = {"fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1822, "SPEEDCHAT_FINEWEB_URL"),
          "climbmix": ("karpathy/climbmix-400b-shuffle", 6542, "SPEEDCHAT_CLIMBMIX_URL")}
HF_URL = "https://huggingface.co/datasets/{}/resolve/main"
OFFLINE_HINT = "use an offline source instead: --source stdlib-docs or --source dir:PATH"


class BadSource(UserError, argparse.ArgumentTypeError):
    """A source, mixture or schedule that cannot be read: a one-line error at the flag (argparse)
    or wherever else it is named (run_main)."""


# ---------------------------------------------------------------------------
# Sources and their folders


def source_dir(source: str) -> Path:
    """The folder that holds (or will hold) a source's shards."""
    if not source.startswith("dir:"):
        return get_base_dir() / "data" / source
    folder = Path(source[4:]).expanduser().resolve()
    if any(folder.glob("shard_*.parquet")):
        return folder  # already in the layout: used in place, never copied
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.name) or "root"
    return get_base_dir() / "data" / f"dir-{name}-{digest}"


def ensure_source(source: str):
    """Make sure every source of a mixture has shards, building stdlib-docs or a dir: source when
    needed; UserError, saying what to run, when one has none."""
    for name, _ in parse_mixture(source):
        _ensure(name)


def _ensure(source: str) -> Path:
    folder = source_dir(source)
    texts = Path(source[4:]).expanduser().resolve() if source.startswith("dir:") else None
    if source == "stdlib-docs":
        build_stdlib_docs(folder)
    elif texts is not None and folder != texts:  # a folder of files, not of ready shards: build them
        if not texts.is_dir():
            raise UserError(f"{source}: {texts} is not a folder")
        build_from_dir(texts, folder)
    shards = sorted(folder.glob("shard_*.parquet"))
    last = shard_name(REMOTE[source][1]) if source in REMOTE else None
    if len(shards) < 2 or last not in (None, shards[-1].name):
        fix = (f"run `python -m dataset --source {source} -n 240` (or {OFFLINE_HINT})" if source in REMOTE
               else "the layout needs 2 or more shards, the last one the validation split")
        raise UserError(f"{len(shards)} {source} shard(s) in {folder}, and no train and validation split: {fix}")
    return folder


def list_shards(source: str) -> list[Path]:
    """All shards of a source, in order; the last one is the validation split."""
    return sorted(_ensure(source).glob("shard_*.parquet"))


# ---------------------------------------------------------------------------
# Mixtures and schedules (the flags' syntax; the dataloader draws the documents)


def is_source(name: str) -> bool:
    return name in REMOTE or name == "stdlib-docs" or (name.startswith("dir:") and len(name) > 4)


def parse_mixture(text: str) -> list[tuple[str, float]]:
    """'climbmix:0.9,dir:/data/math:0.1' -> [('climbmix', 0.9), ('dir:/data/math', 0.1)]: each
    source with its share of the tokens (normalized; a source without a weight weighs 1)."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.rpartition(":")
        try:
            pairs.append((name, float(weight)) if is_source(name) else (item, 1.0))
        except ValueError:  # a colon inside a dir: path, not a weight
            pairs.append((item, 1.0))
    names, weights = [name for name, _ in pairs], [w for _, w in pairs]
    unknown = [name for name in names if not is_source(name)]
    if unknown or not names or len(set(names)) < len(names) or not all(0 < w < math.inf for w in weights):
        problem = f"unknown source {unknown[0]!r}" if unknown else "name each source once, with a positive weight"
        raise BadSource(f"{problem} in {text!r}: use {SOURCES_HELP}")
    total = sum(weights)
    return [(name, w / total) for name, w in pairs]


def mixture_name(text: str) -> str:
    """The canonical spelling of a mixture ('a:0.75,b:0.25'; one source: its name; '': the caller's
    default): an argparse type."""
    pairs = parse_mixture(text) if text else [("", 1.0)]
    return pairs[0][0] if len(pairs) == 1 else ",".join(f"{name}:{w:.6g}" for name, w in pairs)


def parse_schedule(text: str) -> list[tuple[float, str]]:
    """'0:fineweb-edu;0.8:fineweb-edu:0.7,dir:/data/math:0.3' -> [(0.0, 'fineweb-edu'), (0.8,
    'fineweb-edu:0.7,dir:/data/math:0.3')]: the mixture from each fraction of training on. `text`
    may name a file with one FRACTION:MIXTURE a line (# starts a comment): an argparse type."""
    if os.path.isfile(text):
        text = ";".join(line.split("#")[0] for line in Path(text).read_text().splitlines())
    stages = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        start, _, mixture = item.partition(":")
        try:
            stages.append((float(start), mixture_name(mixture)))
        except ValueError:  # not a number: refused below
            stages.append((math.nan, mixture))
    starts = [start for start, _ in stages]
    if not stages or starts[0] != 0 or not all(a < b < 1 for a, b in zip(starts, starts[1:])):
        raise BadSource(f"{text!r}: stages FRACTION:MIXTURE separated by ';', the first at 0, "
                        "the fractions increasing and below 1")
    return stages


# ---------------------------------------------------------------------------
# Reading: a split is a list of row groups, each rank reads its own share of them

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
    texts = pq.ParquetFile(path).read_row_group(rg, columns=["text"]).column(0).to_pylist()[first::step]
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
# Downloading the remote sources


def shards_url(source: str, url: str | None = None) -> str:
    repo, _, env = REMOTE[source]
    return (url or os.environ.get(env) or HF_URL.format(repo)).rstrip("/")


def download_shards(source: str, num_shards: int, workers: int = 8, url: str | None = None, retries: int = 5,
                    backoff: float = 2.0, timeout: float = 60.0) -> Path:
    """Download the first `num_shards` shards (-1: all) of a remote source plus its last (validation)."""
    from tqdm import tqdm

    folder, last = source_dir(source), REMOTE[source][1]
    folder.mkdir(parents=True, exist_ok=True)
    indices = list(range(last if num_shards < 0 else min(num_shards, last))) + [last]
    todo = [i for i in indices if not download.is_valid(folder / shard_name(i), check_parquet)]
    if not todo:
        print0(f"all {len(indices)} shards already in {folder}")
        return folder
    base = shards_url(source, url)
    try:  # fail fast, in one line, when the server cannot be reached at all or refuses the first file
        request(f"{base}/{shard_name(todo[0])}", "HEAD", retries=0, timeout=5.0)
    except DownloadError as e:
        fix = OFFLINE_HINT if e.reason in download.UNREACHABLE else f"check --url / {REMOTE[source][2]}"
        raise UserError(f"{e}: {fix}")
    print0(f"downloading {len(todo)} of {len(indices)} shards from {base} to {folder} ({workers} workers)")
    failed = []
    download.stop.clear()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(download_file, f"{base}/{shard_name(i)}", folder / shard_name(i), retries, backoff,
                               timeout, check_parquet) for i in todo]
        with tqdm(total=len(todo), unit="shard", disable=len(todo) < 2) as bar:
            for future in as_completed(futures):
                failed += [str(future.exception())] if future.exception() is not None else []
                bar.update(1)
    except BaseException:
        download.stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        raise UserError(f"{len(failed)} of {len(todo)} shards failed (first: {sorted(failed)[0]}); "
                        "rerun the same command to resume")
    return folder


# ---------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download or build pretraining shards.")
    parser.add_argument("--source", type=mixture_name, default="fineweb-edu",
                        help=f"{SOURCES_HELP} (each source of a mixture is downloaded or built; default fineweb-edu)")
    parser.add_argument("-n", "--num-shards", type=checked(int, lambda v: v >= -1, ">= 0, or -1 for all"), default=8,
                        help="fineweb-edu / climbmix: download the first N train shards plus the last (validation); "
                             "-1 = all; a d20 run uses 240 of fineweb-edu (default: %(default)s)")
    parser.add_argument("-w", "--workers", type=int, default=8, help="parallel downloads (default: %(default)s)")
    parser.add_argument("--url", default=None, help="base URL of the shards (default $SPEEDCHAT_FINEWEB_URL or "
                        "$SPEEDCHAT_CLIMBMIX_URL, else the Hugging Face dataset)")
    parser.add_argument("--retries", type=int, default=5,
                        help="retries per shard, with exponential backoff (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds without data before a retry (default: %(default)s)")
    args = parser.parse_args(argv)
    for source, _ in parse_mixture(args.source):
        if source in REMOTE:
            download_shards(source, args.num_shards, args.workers, args.url, args.retries, timeout=args.timeout)
        shards = list_shards(source)
        docs = sum(sum(row_counts(p)) for p in shards)
        print0(f"{source}: {len(shards)} shards ({len(shards) - 1} train + 1 validation), {docs:,} documents in "
               f"{shards[0].parent}")


if __name__ == "__main__":
    run_main(main)
