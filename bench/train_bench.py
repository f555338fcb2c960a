"""Training-step throughput: tokens/s and MFU of one optimizer step (forward, backward, Muon +
AdamW) of the GPT at a given depth, on random tokens, on one device.

    python -m bench.train_bench --depth 20                         # CUDA: compiled vs eager, bf16
    python -m bench.train_bench --depth 2 --head-dim 32 --seq-len 128 --device-batch-size 4   # CPU smoke

MFU = FLOPs/token (model.estimate_flops) x tokens/s / the device's bf16 peak (base_train.peak_flops).
The peer in the same run is the eager (uncompiled) model, so the printed ratio says what
torch.compile buys; on CPU both run eager and the ratio is ~1.
"""

import argparse
import time

import torch

from common import autodetect_device, format_seconds
from base_train import training_dtype, peak_flops, is_muon, muon_momentum
from model import GPT, config_from_depth


def measure(args, device, dtype, compile_model):
    config = config_from_depth(args.depth, args.vocab_size, sequence_len=args.seq_len, head_dim=args.head_dim)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    optimizers = model.setup_optimizers()
    step_model = torch.compile(model, dynamic=False) if compile_model else model
    autocast = torch.amp.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    B, T = args.device_batch_size, args.seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)

    def step(i):
        with autocast:
            loss = step_model(x, y)
        loss.backward()
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
                step_s=seconds / args.steps, warmup_s=warmup_s)


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
    args = p.parse_args(argv)
    device = torch.device(args.device or autodetect_device())
    dtype = training_dtype(device.type)
    variants = [("compiled", True), ("eager", False)] if device.type == "cuda" else [("eager", False)]
    if args.no_eager and device.type == "cuda":
        variants = variants[:1]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} | dtype: {dtype} | d{args.depth} | batch {args.device_batch_size} x {args.seq_len} | "
          f"{args.steps} timed steps after {args.warmup} warmup")
    results = {}
    for label, compile_model in variants:
        r = results[label] = measure(args, device, dtype, compile_model)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        memory = f"{r['memory']:.1f} GiB" if r["memory"] is not None else "n/a"
        print(f"{label:>8}: {r['params']:,} params | {r['tok_per_s']:,.0f} tok/s | MFU {mfu} | "
              f"step {1000 * r['step_s']:.1f} ms | peak memory {memory} | warmup {format_seconds(r['warmup_s'])}")
    if len(results) == 2:
        print(f"compiled / eager: {results['compiled']['tok_per_s'] / results['eager']['tok_per_s']:.2f}x")


if __name__ == "__main__":
    main()
