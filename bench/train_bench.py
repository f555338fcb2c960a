"""Training-step throughput: tokens/s and MFU of one optimizer step (forward, backward, Muon +
AdamW) of the GPT at a given depth, on one device.

    python -m bench.train_bench --depth 20                         # CUDA: compiled vs eager, bf16
    python -m bench.train_bench --depth 20 --fp8 --no-eager        # CUDA: compiled bf16 vs compiled fp8
    python -m bench.train_bench --depth 2 --head-dim 32 --vocab-size 512 --seq-len 128 \
        --device-batch-size 4 --steps 3 --warmup 1 [--fp8]                # CPU smoke, seconds

MFU = FLOPs/token (model.estimate_flops) x tokens/s / the device's bf16 peak (base_train.peak_flops).
On CUDA the peer in the same run is the eager (uncompiled) model, so the printed ratio says what
torch.compile buys; on CPU only the eager model runs.

--fp8 adds a peer whose block matmuls run in float8 (fp8.py; compiled when the main run is),
built from the same initial weights and fed the same batches, and prints its tok/s ratio to the
baseline and both losses after the same steps. Its MFU is against the same bf16 peak (so it says
how much more work the GPU gets through, and may exceed what bf16 can reach). The batches (--data):
  random  one batch of random tokens, repeated every step: the loss falls only by memorising it;
  copy    fresh random tokens every step whose target is the previous token: a rule the
          attention has to learn, so the loss can fall on data the model has not seen (it takes
          a few hundred steps: at d2, vocab 512 on CPU the loss is still ~ln(512) at step 65 and
          ~0.002 at step 305, so pass e.g. --steps 300).
That is a cheap sanity check, not the answer to "does fp8 cost loss": for that, compare two
base_train runs over the same steps, e.g. on one H100

    python -m base_train --depth 20 --num-iterations 2000 --eval-every 250 --model-tag d20-bf16
    python -m base_train --depth 20 --num-iterations 2000 --eval-every 250 --model-tag d20-fp8 --fp8

and their step-line losses and "validation bpb" lines (also in each checkpoint's meta_*.json;
report/base-train.md keeps only the later run). Each run takes steps x 524288 tokens / tok/s
(about 2 h for 2000 steps at d20 and ~135k tok/s); lower --depth or --num-iterations to fit a budget.
"""

import argparse
import time

import torch

from common import autodetect_device, format_seconds
from training import training_dtype, peak_flops, is_muon, muon_momentum
from fp8 import convert_to_fp8, fp8_supported
from model import GPT, config_from_depth


def make_batches(args, device):
    """The (inputs, targets) of every step, made up front on the device (the same for every peer)."""
    B, T, V = args.device_batch_size, args.seq_len, args.vocab_size
    gen = torch.Generator().manual_seed(0)
    if args.data == "random":
        x, y = torch.randint(0, V, (2, B, T), generator=gen).to(device)
        return [(x, y)] * (args.warmup + args.steps)
    batches = []
    for _ in range(args.warmup + args.steps):
        x = torch.randint(0, V, (B, T), generator=gen)
        y = torch.cat([torch.full((B, 1), -1), x[:, :-1]], dim=1)  # target: the previous token
        batches.append((x.to(device), y.to(device)))
    return batches


def measure(args, device, dtype, compile_model, fp8, batches):
    config = config_from_depth(args.depth, args.vocab_size, sequence_len=args.seq_len, head_dim=args.head_dim)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    if fp8:
        convert_to_fp8(model)
    optimizers = model.setup_optimizers()
    step_model = torch.compile(model, dynamic=False) if compile_model else model
    autocast = torch.amp.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    B, T = args.device_batch_size, args.seq_len
    losses = []

    def step(i):
        x, y = batches[i]
        with autocast:
            loss = step_model(x, y)
        loss.backward()
        losses.append(loss.detach())  # read after the timing: no sync per step
        for opt in optimizers:
            if is_muon(opt):
                for group in opt.param_groups:
                    group["momentum"] = muon_momentum(i)
            opt.step()
        model.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync()
    seconds = time.perf_counter() - t0
    tok_per_s = B * T * args.steps / seconds
    peak = peak_flops(device, dtype)
    mfu = model.estimate_flops() * tok_per_s / peak if peak else None
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(params=model.num_params()["total"], tok_per_s=tok_per_s, mfu=mfu, memory=memory,
                step_s=seconds / args.steps, warmup_s=warmup_s, losses=torch.stack(losses).tolist())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="model depth (width = 64 x depth)")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    p.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="", help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager peer (CUDA: saves time)")
    p.add_argument("--fp8", action="store_true",
                   help="add a peer with the block matmuls in float8 (fp8.py; needs compute capability 8.9+ or CPU)")
    p.add_argument("--data", choices=("random", "copy"), default="random",
                   help="random: one random batch repeated; copy: fresh tokens, target = previous token")
    args = p.parse_args(argv)
    device = torch.device(args.device or autodetect_device())
    dtype = training_dtype(device.type)
    if args.fp8:
        ok, reason = fp8_supported(device)
        if not ok:
            p.error(f"--fp8: {reason}")
    # (label, compiled, fp8)
    variants = [("compiled", True, False), ("eager", False, False)] if device.type == "cuda" else [("eager", False, False)]
    if args.no_eager and device.type == "cuda":
        variants = variants[:1]
    baseline = variants[0][0]
    if args.fp8:
        variants.append(("fp8", variants[0][1], True))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} | dtype: {dtype} | d{args.depth} | batch {args.device_batch_size} x {args.seq_len} | "
          f"{args.steps} timed steps after {args.warmup} warmup | data: {args.data}")
    batches = make_batches(args, device)
    results = {}
    for label, compile_model, fp8 in variants:
        r = results[label] = measure(args, device, dtype, compile_model, fp8, batches)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        memory = f"{r['memory']:.1f} GiB" if r["memory"] is not None else "n/a"
        print(f"{label:>8}: {r['params']:,} params | {r['tok_per_s']:,.0f} tok/s | MFU {mfu} | "
              f"step {1000 * r['step_s']:.1f} ms | peak memory {memory} | warmup {format_seconds(r['warmup_s'])} | "
              f"loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    if "compiled" in results and "eager" in results:
        print(f"compiled / eager: {results['compiled']['tok_per_s'] / results['eager']['tok_per_s']:.2f}x")
    if args.fp8:
        base, fp8 = results[baseline], results["fp8"]
        gap = max(abs(a - b) for a, b in zip(fp8["losses"], base["losses"]))
        print(f"fp8 / {baseline} {str(dtype).replace('torch.', '')}: {fp8['tok_per_s'] / base['tok_per_s']:.2f}x tok/s | "
              f"loss after {len(base['losses'])} steps: fp8 {fp8['losses'][-1]:.4f} vs {base['losses'][-1]:.4f} "
              f"({fp8['losses'][-1] - base['losses'][-1]:+.4f}; largest gap on the way {gap:.4f})")


if __name__ == "__main__":
    main()
