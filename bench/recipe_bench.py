"""The pretraining recipe against the previous one, at toy scale on CPU: same data, same tokens.

    python bench/recipe_bench.py --data /work/shared/data/gutenberg   # d4, 3 seeds: ~20 min on 2 shared cores
    python bench/recipe_bench.py --depths 4,6 --tokens 327680 --data /path/to/shards

The previous recipe is the code of --old-commit (the last commit before the redesign: constant
learning rate then a 20% linear warmdown, the classic Newton-Schulz Muon, no value embeddings,
scalars, smear, backout or windows), unpacked with `git archive` and run as a subprocess with its own
base_train flags; the new one is this checkout's base_train with its CPU defaults. Each trains its own
tokenizer (same data, same vocabulary size) in its own base dir; bits per byte does not depend on
the tokenizer. Both see the same number of tokens in the same batch size; the new recipe's horizon is
given as the ratio that makes those tokens, so its weight-decay rule sees the real horizon.

Prints the validation bpb of every run, the mean and spread (sample standard deviation) per recipe
and depth, the difference new - old with its standard error, and whether each new scalar and gate
moved from its initial value (read from the new runs' final checkpoints against a re-made init).
At this scale hyper-parameters dominate: the question is "no regression beyond noise, and every
part trains", not which recipe wins at d24.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import GPT, config_from_depth  # noqa: E402

SCALARS = ["resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda", "smear_gate.weight"]


def sh(cmd, cwd, base_dir, log):
    """Run cmd with SPEEDCHAT_BASE_DIR=base_dir, its output appended to `log`; its stdout."""
    env = dict(os.environ, SPEEDCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", PYTHONPATH=str(cwd))
    cmd = [str(c) for c in cmd]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}\n")
    log.flush()
    if out.returncode:
        sys.exit(f"failed ({out.returncode}): {' '.join(map(str, cmd))}\n{out.stderr[-2000:]}")
    return out.stdout


def config(args, depth):
    return config_from_depth(depth, args.vocab_size, sequence_len=args.seq_len, aspect_ratio=args.aspect_ratio,
                             head_dim=args.head_dim)


def final_bpb(stdout):
    return float(re.findall(r"validation bpb: ([0-9.]+)", stdout)[-1])


def moved(base_dir, tag, config, seed):
    """{name: (max |final - init|, final values)} of the new scalars and gates of one new-recipe run."""
    import checkpoint

    os.environ["SPEEDCHAT_BASE_DIR"] = str(base_dir)
    state = checkpoint.load_checkpoint("base", tag, None, "cpu")[0]
    torch.manual_seed(seed)  # base_train: compute_init seeds, then the model is built and initialised
    init = GPT(config)
    init.init_weights()
    init = init.state_dict()
    names = SCALARS + [k for k in state if k.endswith("ve_gate.weight")]
    return {k: ((state[k].float() - init[k]).abs().max().item(), state[k].flatten()[:4].tolist()) for k in names}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gutenberg"), help="folder of shards")
    p.add_argument("--old-commit", default="9cbda9d")
    p.add_argument("--depths", default="4", help="comma-separated depths")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=163840, help="training tokens of every run")
    p.add_argument("--aspect-ratio", type=int, default=16, help="width = depth x this")
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device-batch-size", type=int, default=8)
    # the CPU preset's batch: at 160 steps the new recipe's fixed 40-step warmup is a quarter of the run
    p.add_argument("--total-batch-size", type=int, default=1024, help="tokens per optimizer step, both recipes")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--new-flags", default="", help="more base_train flags for the new recipe, e.g. --batch-lr-scale")
    p.add_argument("--work-dir", default=None, help="where the base dirs and the old code go (default: a temp dir)")
    args = p.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="recipe_bench_"))
    old_src = work / "old_src"
    if not old_src.exists():
        old_src.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", args.old_commit], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
    log = open(work / "bench.log", "a")
    source, py = f"dir:{Path(args.data).resolve()}", sys.executable
    steps = args.tokens // args.total_batch_size
    recipes = {"old": old_src, "new": REPO}
    for name, src in recipes.items():  # each recipe's own tokenizer, in its own base dir (kept on a re-run)
        if not (work / name / "tokenizer").exists():
            sh([py, "-m", "tokenizer.train", "--source", source, "--vocab-size", args.vocab_size, "--max-chars", "2e7"],
               src, work / name, log)
    print(f"{steps} steps x {args.total_batch_size:,} tokens = {steps * args.total_batch_size:,} tokens per run, "
          f"rows of {args.seq_len}, vocab {args.vocab_size}, {args.seeds} seeds; old = {args.old_commit}; "
          f"new flags: {args.new_flags or '(none)'}")
    results, scalars = {}, {}
    for depth in map(int, args.depths.split(",")):
        with torch.device("meta"):
            n = GPT(config(args, depth)).num_params()["scaling"]
        for seed in range(args.seeds):
            common = ["--device", "cpu", "--depth", depth, "--aspect-ratio", args.aspect_ratio, "--head-dim",
                      args.head_dim, "--source", source, "--max-seq-len", args.seq_len,
                      "--device-batch-size", args.device_batch_size, "--total-batch-size", args.total_batch_size,
                      "--eval-every", "-1", "--eval-tokens", args.eval_tokens, "--sample-every", "-1",
                      "--save-every", "-1", "--seed", seed, "--model-tag", f"d{depth}s{seed}", "--run", "dummy"]
            ratio = steps * args.total_batch_size / n  # the new recipe's horizon: the same tokens
            flags = {"old": ["--num-iterations", steps],
                     "new": ["--target-param-data-ratio", repr(ratio)] + args.new_flags.split()}
            t0 = time.time()  # the two recipes side by side, one thread each: the same load on both
            with ThreadPoolExecutor(2) as pool:
                outs = pool.map(lambda name: sh([py, "-m", "base_train"] + common + flags[name], recipes[name],
                                                work / name, log), recipes)
                for name, out in zip(recipes, outs):
                    results.setdefault((depth, name), []).append(final_bpb(out))
            bpbs = " | ".join(f"{name} val bpb {results[depth, name][-1]:.4f}" for name in recipes)
            print(f"d{depth} seed {seed}: {bpbs} ({time.time() - t0:.0f}s)", flush=True)
            scalars[depth, seed] = moved(work / "new", f"d{depth}s{seed}", config(args, depth), seed)
    print("\nval bpb (mean +- sample std over seeds)")
    for depth in map(int, args.depths.split(",")):
        old, new = results[depth, "old"], results[depth, "new"]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")  # noqa: E731
        diff_se = (sd(old) ** 2 / len(old) + sd(new) ** 2 / len(new)) ** 0.5
        print(f"d{depth}: old {statistics.mean(old):.4f} +- {sd(old):.4f} | new {statistics.mean(new):.4f} +- "
              f"{sd(new):.4f} | new - old {statistics.mean(new) - statistics.mean(old):+.4f} (+- {diff_se:.4f} s.e.)")
    print("\nnew scalars and gates: largest |final - init| over the run's seeds (moved when > 1e-3); first values")
    for depth in map(int, args.depths.split(",")):
        for key in scalars[depth, 0]:
            change = max(scalars[depth, s][key][0] for s in range(args.seeds))
            first = ", ".join(f"{v:.3f}" for v in scalars[depth, 0][key][1])
            verdict = "moved" if change > 1e-3 else "STUCK"
            print(f"d{depth} {key:28s} {verdict} max |delta| {change:.4f} | seed 0: {first}")


if __name__ == "__main__":
    main()
