"""Data loader throughput: tokens/s of ONE rank on ONE CPU core, with the real tokenizer,
compared with a reference rate: by default the 135k tokens/s that the issue states one H100
consumes training d20 (~48% MFU by model.estimate_flops; not measured here). Pass
--reference-tok-per-s with a figure measured by bench/train_bench.py to compare with that instead.

    python -m bench.dataloader_bench                       # ../shared/data/gutenberg, 1 core
    python -m bench.dataloader_bench --data dir:/my/texts --cores 2

The tokenizer is $SPEEDCHAT_BASE_DIR/tokenizer when it exists (or --tokenizer-dir); otherwise
one is trained once (--vocab-size, on a slice of the first shard) and cached under
$SPEEDCHAT_BASE_DIR/bench/.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import dataset  # noqa: E402
from common import UserError, get_base_dir, run_main  # noqa: E402
from dataloader import DataLoader  # noqa: E402

# The issue states one H100 training d20 consumes ~135k tok/s (~48% MFU by model.estimate_flops
# at 989 TFLOP/s bf16). Not measured here: --reference-tok-per-s replaces it with a measured figure.
H100_D20_TOKENS_PER_S = 135_000
SHARED_GUTENBERG = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Measure data loader tokens/s on a few CPU cores.")
    p.add_argument("--data", default=f"dir:{SHARED_GUTENBERG}", help="dataset source (default: the shared gutenberg shards)")
    p.add_argument("--tokenizer-dir", default=None,
                   help="saved tokenizer to use (default: $SPEEDCHAT_BASE_DIR/tokenizer if present, else train one)")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocab size of the tokenizer trained for the bench")
    p.add_argument("--train-chars", type=float, default=20e6, help="characters of the first shard to train it on")
    p.add_argument("--cores", type=int, default=1, help="CPU cores the whole process may use (sched_setaffinity)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch (B)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (T)")
    p.add_argument("--tokens", type=float, default=30e6, help="tokens to time (after the warmup batches)")
    p.add_argument("--warmup", type=int, default=5, help="batches before the clock starts")
    p.add_argument("--reference-tok-per-s", type=float, default=H100_D20_TOKENS_PER_S,
                   help="training tokens/s to compare with (default: the 135k tok/s the issue states one H100 "
                        "consumes at d20, not measured here; pass a bench/train_bench.py figure instead)")
    return p.parse_args(argv)


def limit_cores(n: int) -> list[int]:
    """Pin every thread of this process (and so every thread it starts) to the first n allowed cores."""
    cores = sorted(os.sched_getaffinity(0))[:max(1, n)]
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cores)
    torch.set_num_threads(len(cores))
    return cores


def get_bench_tokenizer(args, source):
    from tokenizer import Tokenizer

    if args.tokenizer_dir or (get_base_dir() / "tokenizer" / "tokenizer.json").exists():
        path = Path(args.tokenizer_dir or get_base_dir() / "tokenizer")
        print(f"tokenizer: {path}")
        return Tokenizer.load(path)
    path = get_base_dir() / "bench" / f"tokenizer-{args.vocab_size}"
    if (path / "tokenizer.json").exists():
        print(f"tokenizer: {path} (cached)")
        return Tokenizer.load(path)
    budget, texts = int(args.train_chars), []
    for text in dataset.iter_documents(source, "train"):
        texts.append(text[:budget])
        budget -= len(texts[-1])
        if budget <= 0:
            break
    print(f"training a {args.vocab_size}-token tokenizer on {sum(map(len, texts)) / 1e6:.0f}M chars ...")
    t0 = time.time()
    tok = Tokenizer.train_from_iterator(texts, args.vocab_size)
    tok.save(path)
    print(f"trained in {time.time() - t0:.1f}s, saved to {path}")
    return tok


def main(argv=None):
    args = parse_args(argv)
    if args.reference_tok_per_s <= 0:
        raise UserError("--reference-tok-per-s must be a positive number of tokens/s")
    source = args.data
    if source == f"dir:{SHARED_GUTENBERG}" and not SHARED_GUTENBERG.exists():
        raise UserError(f"{SHARED_GUTENBERG} is missing: pass --data with another source")
    tok = get_bench_tokenizer(args, source)
    cores = limit_cores(args.cores)
    B, T = args.batch_size, args.seq_len
    loader = DataLoader(tok, B, T, split="train", source=source, device="cpu", num_threads=len(cores))
    for _ in range(args.warmup):
        next(loader)
    steps = max(1, int(args.tokens // (B * T)))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(loader)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    loader.close()
    tokens = steps * B * T
    rate, cpu_rate = tokens / wall, tokens / cpu
    ref = args.reference_tok_per_s
    ref_label = (f"the {ref:,.0f} tok/s the issue states one H100 consumes at d20 (not measured here)"
                 if ref == H100_D20_TOKENS_PER_S else f"the reference {ref:,.0f} tok/s (--reference-tok-per-s)")
    print(f"data: {source}")
    print(f"cores: {len(cores)} {cores}   B={B} T={T}   batches: {steps}   tokens: {tokens:,}")
    print(f"time: {wall:.2f}s wall, {cpu:.2f}s CPU ({cpu / wall:.2f} cores busy; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)   crop fraction: {loader.crop_fraction:.4f}")
    print(f"per CPU-second: {cpu_rate:,.0f} tokens/s = {cpu_rate / ref:.2f}x "
          "(what the pinned cores deliver when nothing else runs on them)")
    print(f"throughput: {rate:,.0f} tokens/s = {rate / ref:.2f}x {ref_label}; target >= 3.00x")


if __name__ == "__main__":
    run_main(main)
