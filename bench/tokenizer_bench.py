"""Tokenizer training speed: our rustbpe vs PyPI rustbpe==0.1.0 vs HuggingFace tokenizers.

    python -m bench.tokenizer_bench                        # shards 0-1 of ../shared/data/gutenberg, vocab 32768
    python -m bench.tokenizer_bench --shards 0 --vocab-size 8192 --repeats 1

Each trainer runs in its own subprocess (fresh memory, no module clashes): PyPI rustbpe is
installed with `uv pip install --target` (or pip) into --pypi-dir and imported from there
only. The texts are loaded before the clock starts; the clock covers train_from_iterator.
Reported: best wall seconds over --repeats, peak RSS of the child (texts included), and
bytes-per-token on the validation shard (ours and PyPI through tiktoken built from their
ranks, HF through its own encoder), plus ours' speed ratio to each. Ours and PyPI rustbpe
are also timed with RAYON_NUM_THREADS=1, for information.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import UserError, run_main  # noqa: E402

SHARED_GUTENBERG = REPO.parent / "shared" / "data" / "gutenberg"
PYPI_VERSION = "0.1.0"
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time BPE tokenizer training: ours vs PyPI rustbpe vs HF tokenizers.")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size to train (default 32768)")
    p.add_argument("--shards", default="0-1", help="training shards: '0-1', '0,2' or '3' (default 0-1)")
    p.add_argument("--val-shard", type=int, default=None, help="shard for bytes-per-token (default: the last one)")
    p.add_argument("--data-dir", default=str(SHARED_GUTENBERG), help="folder of shard_NNNNN.parquet files with a `text` column")
    p.add_argument("--repeats", type=int, default=3, help="training runs per trainer; the best time counts (default 3)")
    p.add_argument("--impls", default="ours,pypi,hf", help="comma list of trainers to run: ours, pypi, hf")
    p.add_argument("--no-single-thread", action="store_true", help="skip the RAYON_NUM_THREADS=1 runs")
    p.add_argument("--pypi-dir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / f"speedchat-pypi-rustbpe-{PYPI_VERSION}"),
                   help="where PyPI rustbpe is installed (kept apart from ours)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one trainer and print JSON
    return p.parse_args(argv)


def parse_shards(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UserError(f"--shards {spec!r}: use forms like '0-1', '0,2' or '3'")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def shard_path(data_dir: Path, i: int) -> Path:
    path = data_dir / f"shard_{i:05d}.parquet"
    if not path.exists():
        raise UserError(f"{path} not found: pass --data-dir with shard_NNNNN.parquet files, or other --shards")
    return path


def load_texts(paths) -> list[str]:
    import pyarrow.parquet as pq

    texts = []
    for path in paths:
        texts.extend(pq.read_table(path, columns=["text"]).column("text").to_pylist())
    return texts


# ---------------------------------------------------------------------------
# Child: train one tokenizer, report JSON


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def train_rustbpe(module, texts, vocab_size):
    """Ours and PyPI rustbpe share this API. Returns (seconds, vocab size, token counter)."""
    import tiktoken

    tok = module.Tokenizer()
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=SPLIT_PATTERN)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    ranks = {bytes(b): r for b, r in tok.get_mergeable_ranks()}
    enc = tiktoken.Encoding("bench", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens={})
    return seconds, cpu, len(ranks), lambda batch: [len(ids) for ids in enc.encode_ordinary_batch(batch)]


def train_hf(texts, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    tok.train_from_iterator(iter(texts), trainer=trainer)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return seconds, cpu, tok.get_vocab_size(), lambda batch: [len(e.ids) for e in tok.encode_batch(batch)]


def child(args):
    data_dir = Path(args.data_dir)
    texts = load_texts([shard_path(data_dir, i) for i in parse_shards(args.shards)])
    module_file = None
    if args.child == "hf":
        seconds, cpu, vocab, count_tokens = train_hf(texts, args.vocab_size)
    else:
        import rustbpe  # ours, or PyPI's when the parent put --pypi-dir first on PYTHONPATH

        module_file = rustbpe.__file__
        seconds, cpu, vocab, count_tokens = train_rustbpe(rustbpe, texts, args.vocab_size)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # measured before encoding
    del texts
    val = load_texts([shard_path(data_dir, args.val_shard)])
    n_bytes = sum(len(t.encode("utf-8")) for t in val)
    n_tokens = sum(count_tokens(val))
    print(json.dumps({"module": module_file, "seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak_mb, "vocab": vocab, "bytes_per_token": n_bytes / n_tokens}))


# ---------------------------------------------------------------------------
# Parent: install PyPI rustbpe apart, run each trainer in its own subprocess


def ensure_pypi_rustbpe(target: Path) -> Path:
    if (target / "rustbpe").exists():
        return target
    print(f"installing rustbpe=={PYPI_VERSION} from PyPI into {target} ...", flush=True)
    if shutil.which("uv"):
        cmd = ["uv", "pip", "install", "-p", sys.executable, "--target", str(target), f"rustbpe=={PYPI_VERSION}"]
    else:
        cmd = [sys.executable, "-m", "pip", "install", "--target", str(target), f"rustbpe=={PYPI_VERSION}"]
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"could not install rustbpe=={PYPI_VERSION} from PyPI (need network); or run with --impls ours,hf")
    return target


def run_child(impl: str, args, threads=None) -> dict:
    """One training run of `impl` in a fresh subprocess; returns its JSON report."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if impl == "pypi":
        env["PYTHONPATH"] = args.pypi_dir
    if threads is not None:
        env["RAYON_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "hf" if impl == "hf" else "rustbpe",
           "--vocab-size", str(args.vocab_size), "--shards", args.shards, "--data-dir", args.data_dir,
           "--val-shard", str(args.val_shard)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise UserError(f"{impl} trainer failed:\n{out.stderr.strip()[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if impl != "hf" and (impl == "pypi") != result["module"].startswith(str(Path(args.pypi_dir).resolve())):
        raise UserError(f"{impl} run imported rustbpe from {result['module']}: the two rustbpe builds got mixed up")
    print(f"  {impl}{'' if threads is None else f' ({threads} thread)'}: {result['seconds']:.2f}s", flush=True)
    return result


def main():
    args = parse_args()
    if args.child:
        return child(args)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} does not exist: point it at a folder of shard_NNNNN.parquet files")
    if args.val_shard is None:
        shards = sorted(data_dir.glob("shard_*.parquet"))
        if not shards:
            raise UserError(f"no shard_NNNNN.parquet files in {data_dir}")
        args.val_shard = int(shards[-1].stem.split("_")[1])
    train_paths = [shard_path(data_dir, i) for i in parse_shards(args.shards)]
    shard_path(data_dir, args.val_shard)
    n_chars = sum(len(t) for t in load_texts(train_paths))
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    if unknown := set(impls) - {"ours", "pypi", "hf"}:
        raise UserError(f"--impls: unknown {sorted(unknown)}; choose from ours, pypi, hf")
    if "pypi" in impls:
        ensure_pypi_rustbpe(Path(args.pypi_dir))
    print(f"training on shards {args.shards} ({n_chars / 1e6:.1f}M chars), vocab {args.vocab_size}, "
          f"validation shard {args.val_shard}, {os.cpu_count()} cores, best of {args.repeats}", flush=True)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (timings are wall-clock: "
          f"other work on the machine slows every trainer)", flush=True)

    # Rounds of one run per trainer, so that load from elsewhere on the machine hits all alike.
    jobs = [(impl, impl, None) for impl in impls]
    if not args.no_single_thread:
        jobs += [(f"{impl}-1thread", impl, 1) for impl in impls if impl != "hf"]
    runs = {key: [] for key, _, _ in jobs}
    for round_ in range(args.repeats):
        print(f"round {round_ + 1}/{args.repeats}", flush=True)
        for key, impl, threads in jobs:
            runs[key].append(run_child(impl, args, threads))
    rows = {}
    for key, results in runs.items():
        rows[key] = dict(min(results, key=lambda r: r["seconds"]), peak_mb=max(r["peak_mb"] for r in results))

    names = {"ours": "ours (rustbpe/)", "pypi": f"PyPI rustbpe {PYPI_VERSION}", "hf": "HF tokenizers",
             "ours-1thread": "ours, RAYON_NUM_THREADS=1", "pypi-1thread": f"PyPI rustbpe, RAYON_NUM_THREADS=1"}
    print()
    print("| trainer | seconds (wall) | CPU seconds | peak RSS (MB) | vocab | bytes/token (val) | ours is faster by (wall, same threads) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, r in rows.items():
        ours = "ours-1thread" if key.endswith("-1thread") else "ours"
        ratio = f"{r['seconds'] / rows[ours]['seconds']:.2f}x" if ours in rows and not key.startswith("ours") else ""
        print(f"| {names[key]} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_mb']:.0f} | {r['vocab']} | {r['bytes_per_token']:.4f} | {ratio} |")
    if "ours" in rows and "pypi" in rows:
        diff = rows["ours"]["bytes_per_token"] / rows["pypi"]["bytes_per_token"] - 1
        print(f"\nbytes/token, ours vs PyPI rustbpe: {diff * 100:+.3f}%")


if __name__ == "__main__":
    run_main(main)
