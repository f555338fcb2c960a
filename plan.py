"""What a pretraining run will need and cost on the GPUs at hand, before a GPU-hour is spent:
parameters, FLOPs, tokens, batch, steps, data shards, peak memory per GPU, hours and dollars.

    python -m plan                                          # the GPUs this machine has, the speedrun's run
    python -m plan --gpus 8 --gpu "NVIDIA H100 80GB HBM3" --depth 24 --ratio 8
    python -m plan --gpus 1 --gpu "NVIDIA GeForce RTX 4090" --json

The model is built on the meta device (no memory, no compute), so parameters and FLOPs are the real
model's. Memory, time and data are estimates from the formulas below, each with its reason; a
measurement on the GPU replaces them (base_train prints the real peak memory and MFU). speedrun.sh
runs this first and stops when the run cannot fit in memory or on disk.
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch

import dataset
from common import POSITIVE, POSITIVE_RATE, get_base_dir, print0, run_main
from model import GPT, config_from_depth, pretraining_recipe

# Dense peak FLOP/s (bf16 with fp32 accumulation; fp8 where the card has it) from the vendors' data
# sheets, and the memory torch reports, in GiB. The most specific name comes first: "H100" alone is
# the SXM card, the PCIe and NVL cards are slower, and an MFU against the wrong peak reads 15-24% low.
GPUS = [  # (part of torch.cuda.get_device_name, memory GiB, bf16 TFLOP/s, fp8 TFLOP/s or None)
    ("H100 PCIe", 79.2, 756.5, 1513.0),
    ("H100 NVL", 93.1, 835.5, 1671.0),
    ("H100", 79.1, 989.4, 1978.9),
    ("H200", 139.8, 989.4, 1978.9),
    ("H800", 79.1, 989.4, 1978.9),
    ("B200", 178.4, 2250.0, 4500.0),
    ("A100-SXM4-40GB", 39.4, 312.0, None),
    ("A100-PCIE-40GB", 39.4, 312.0, None),
    ("A100", 79.2, 312.0, None),
    ("L40S", 44.4, 362.1, 733.0),
    ("L4", 22.0, 121.0, 242.5),
    ("RTX 6000 Ada", 47.5, 364.2, 728.5),
    ("RTX A6000", 47.5, 154.8, None),
    ("RTX 5090", 31.4, 209.5, 419.0),
    ("RTX 4090", 23.6, 165.2, 330.3),
    ("RTX 3090", 23.6, 71.0, None),
]
# Pretraining sources: characters per shard as published and a shard's size on disk (the index of
# the last shard, the validation split, is dataset.REMOTE's).
SOURCES = {
    "fineweb-edu": dict(chars_per_shard=250e6, shard_gb=0.1),
    "climbmix": dict(chars_per_shard=270e6, shard_gb=0.12),
}
CHARS_PER_TOKEN = 4.8  # our BPE on web text (FineWeb-edu, 32k-64k vocab)
# The loader starts every row at a document and crops what does not fit (dataloader.py): nanochat
# measured ~35% of the tokens lost this way at 2048-token rows. Then a 10% margin on top.
CROP_FRACTION, DATA_MARGIN = 0.35, 0.10
# Bytes a compiled bf16 block keeps for backward per token, in units of the width d: the inputs of
# its matmuls (two normed inputs 4d, q k v 6d, attention output 2d, MLP hidden 8d) and the residual
# stream 4d. The softcapped logits cost 6 bytes each (bf16 kept for backward + their fp32 gradient).
ACTIVATION_BYTES_PER_D, LOGIT_BYTES = 24, 6
MEMORY_MARGIN = 0.85  # plan to at most this share of the card: the allocator, the CUDA context, workspaces
DEFAULT_MFU = 0.45
DEFAULT_GPU_HOUR_USD = 3.00


def find_gpu(name):
    """(memory GiB, bf16 FLOP/s, fp8 FLOP/s or None) of a card by its name, or None when unknown."""
    for part, mem, bf16, fp8 in GPUS:
        if part.lower() in name.lower():
            return mem, bf16 * 1e12, fp8 * 1e12 if fp8 else None
    return None


def local_gpus():
    """(count, name, memory GiB) of this machine's CUDA GPUs, or (0, "", 0.0)."""
    if not torch.cuda.is_available():
        return 0, "", 0.0
    props = torch.cuda.get_device_properties(0)
    return torch.cuda.device_count(), props.name, props.total_memory / 2**30


def meta_model(depth, vocab_size, seq_len):
    """The GPT of --depth on the meta device: real shapes, no memory."""
    with torch.device("meta"):
        return GPT(config_from_depth(depth, vocab_size, sequence_len=seq_len))


def estimate_peak_gib(model, batch_rows, seq_len, world_size):
    """Peak memory of one GPU in a training step at batch_rows x seq_len tokens."""
    adamw, muon = model.setup_optimizers()
    n_adamw = sum(p.numel() for g in adamw.param_groups for p in g["params"])
    n_muon = sum(p.numel() for g in muon.param_groups for p in g["params"])
    c = model.config
    tokens = batch_rows * seq_len
    weights_and_grads = 8 * (n_adamw + n_muon)  # fp32 both
    optimizer = (8 * n_adamw + 4 * n_muon) / world_size  # Adam moments, Muon momentum: sharded over ranks
    activations = ACTIVATION_BYTES_PER_D * c.n_embd * c.n_layer * tokens
    logits = LOGIT_BYTES * tokens * model.padded_vocab_size
    return (weights_and_grads + optimizer + activations + logits) / 2**30


def shards_for(tokens, source):
    """Train shards that hold `tokens` usable tokens after cropping, with the margin."""
    raw_tokens = tokens / (1 - CROP_FRACTION) * (1 + DATA_MARGIN)
    return math.ceil(raw_tokens * CHARS_PER_TOKEN / SOURCES[source]["chars_per_shard"])


def make_plan(depth, ratio, gpus, gpu_name, gpu_mem=None, nodes=1, seq_len=2048, vocab_size=32768,
              source="climbmix", mfu=DEFAULT_MFU, gpu_hour_usd=DEFAULT_GPU_HOUR_USD, device_batch_size=None):
    """The whole plan as a dict (the --json keys). gpu_mem: the card's memory when known from torch."""
    card = find_gpu(gpu_name)
    mem = gpu_mem or (card[0] if card else None)
    world = gpus * nodes
    model = meta_model(depth, vocab_size, seq_len)
    # the batch and horizon of base_train's own rules; the device batch: the most rows per GPU, up to
    # one micro-step per optimizer step, whose estimated peak fits (base_train rounds the total batch
    # to a multiple of the micro-step, as done here)
    batch = pretraining_recipe(model, ratio)["total_batch_size"]
    rows = [device_batch_size] if device_batch_size else [b for b in (64, 32, 16, 8, 4, 2, 1)
                                                          if b == 1 or b * seq_len * world <= batch]
    fits = [b for b in rows if mem is None or estimate_peak_gib(model, b, seq_len, world) <= MEMORY_MARGIN * mem]
    device_batch = fits[0] if fits else rows[-1]
    recipe = pretraining_recipe(model, ratio, tokens_per_micro_step=device_batch * seq_len * world)
    total_batch, steps = recipe["total_batch_size"], recipe["num_iterations"]
    peak = estimate_peak_gib(model, device_batch, seq_len, world)
    flops_per_token = model.estimate_flops()
    tokens = steps * total_batch
    hours = flops_per_token * tokens / (world * card[1] * mfu) / 3600 if card else None
    shards = shards_for(tokens, source)
    return {
        "depth": depth, "ratio": ratio, "params": model.num_params()["total"], "scaling_params": model.num_params()["scaling"],
        "flops_per_token": flops_per_token, "tokens": tokens, "total_batch_size": total_batch,
        "device_batch_size": device_batch, "grad_accum": total_batch // (device_batch * seq_len * world),
        "steps": steps, "lr_scale": recipe["lr_scale"], "muon_weight_decay": recipe["weight_decay"],
        "source": source, "shards_needed": shards,
        "shards_downloaded": min(shards, dataset.REMOTE[source][1]) + 1,  # + the validation shard
        "disk_gb": (shards + 1) * SOURCES[source]["shard_gb"],
        "est_peak_mem_gib": round(peak, 1), "gpu_mem_gib": mem, "fits": bool(fits) and mem is not None,
        "gpu": gpu_name, "gpus": gpus, "nodes": nodes, "gpu_known": card is not None,
        "peak_bf16_flops": card[1] if card else None, "assumed_mfu": mfu,
        "est_hours": hours, "est_cost_usd": hours * world * gpu_hour_usd if hours else None, "gpu_hour_usd": gpu_hour_usd,
    }


def describe(plan):
    """The plan as the lines a person reads."""
    p = plan
    card = f"{p['nodes']} x {p['gpus']} x {p['gpu'] or 'no GPU'}" + ("" if p["gpu_known"] else " (unknown card: no peak FLOP/s)")
    lines = [
        f"run:        d{p['depth']}, {p['params']:,} parameters ({p['scaling_params']:,} in matrices and lm_head), "
        f"{p['flops_per_token']:.3e} FLOP/token",
        f"tokens:     {p['tokens']:,} ({p['ratio']:g} x the scaling parameters)",
        f"batch:      {p['total_batch_size']:,} tokens/step = {p['device_batch_size']} rows x {p['grad_accum']} "
        f"accumulation on each GPU; {p['steps']:,} steps; learning rates x {p['lr_scale']:.3f}, Muon weight decay "
        f"{p['muon_weight_decay']:.4f}",
        f"data:       {p['shards_needed']} {p['source']} shards needed (after a {CROP_FRACTION:.0%} crop loss and a "
        f"{DATA_MARGIN:.0%} margin); {p['shards_downloaded']} downloaded with validation, ~{p['disk_gb']:.0f} GB",
        f"hardware:   {card}",
        f"memory:     ~{p['est_peak_mem_gib']} GiB peak per GPU (estimate) of "
        + (f"{p['gpu_mem_gib']:.1f} GiB" if p["gpu_mem_gib"] else "unknown") + ("" if p["fits"] else "  DOES NOT FIT"),
    ]
    if p["est_hours"] is not None:
        lines.append(f"time, cost: ~{p['est_hours']:.2f} h of pretraining at an assumed {p['assumed_mfu']:.0%} MFU, "
                     f"~${p['est_cost_usd']:,.0f} at ${p['gpu_hour_usd']:.2f} per GPU-hour (estimates until measured)")
    return "\n".join(lines)


def problems(plan, base_dir):
    """What stops this run before it starts: memory, disk (for the shards not downloaded yet)."""
    out = []
    if not plan["fits"]:
        out.append(f"d{plan['depth']} does not fit in {MEMORY_MARGIN:.0%} of {plan['gpu_mem_gib']} GiB even at 1 row "
                   f"per GPU (~{plan['est_peak_mem_gib']} GiB): choose a smaller --depth or a larger GPU"
                   if plan["gpu_mem_gib"] else f"unknown GPU {plan['gpu']!r}: give --gpu-mem-gib")
    present = len(list((base_dir / "data" / plan["source"]).glob("shard_*.parquet")))
    missing_gb = max(0, plan["shards_downloaded"] - present) * SOURCES[plan["source"]]["shard_gb"]
    free_gb = shutil.disk_usage(base_dir).free / 1e9
    if free_gb < missing_gb + 10:  # + checkpoints and the rest
        out.append(f"{missing_gb:.0f} GB of shards still to download (+10 GB) do not fit in the {free_gb:.0f} GB free "
                   f"in {base_dir}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Plan a pretraining run: what it needs (tokens, shards, memory) "
                                            "and what it costs on the given GPUs.")
    p.add_argument("--depth", type=POSITIVE, default=24, help="model depth (default: %(default)s)")
    p.add_argument("--ratio", type=POSITIVE_RATE, default=8.0,
                   help="training tokens per scaling parameter (default: %(default)s, the speedrun's)")
    p.add_argument("--gpus", type=POSITIVE, default=None, help="GPUs per node (default: this machine's)")
    p.add_argument("--gpu", default=None, help="GPU name as torch reports it (default: this machine's)")
    p.add_argument("--gpu-mem-gib", type=POSITIVE_RATE, default=None, help="memory per GPU (default: the card's)")
    p.add_argument("--nodes", type=POSITIVE, default=1, help="nodes (default: %(default)s)")
    p.add_argument("--source", choices=sorted(SOURCES), default="climbmix", help="pretraining data (default: %(default)s)")
    p.add_argument("--vocab-size", type=POSITIVE, default=32768, help="vocabulary (default: %(default)s)")
    p.add_argument("--seq-len", type=POSITIVE, default=2048, help="context length (default: %(default)s)")
    p.add_argument("--device-batch-size", type=POSITIVE, default=None, help="rows per GPU (default: the largest that fits)")
    p.add_argument("--mfu", type=POSITIVE_RATE, default=DEFAULT_MFU, help="assumed MFU (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object (and the text to stderr)")
    p.add_argument("--check", action="store_true", help="exit 1 when the run does not fit in memory or on disk")
    args = p.parse_args(argv)
    count, name, mem = local_gpus() if args.gpu is None or args.gpus is None else (0, "", 0.0)
    gpus, gpu = args.gpus or max(count, 1), args.gpu or name
    rate = float(os.environ.get("SPEEDCHAT_GPU_HOUR_USD") or DEFAULT_GPU_HOUR_USD)
    plan = make_plan(args.depth, args.ratio, gpus, gpu, gpu_mem=args.gpu_mem_gib or (mem if name == gpu else None),
                     nodes=args.nodes, seq_len=args.seq_len, vocab_size=args.vocab_size, source=args.source,
                     mfu=args.mfu, gpu_hour_usd=rate, device_batch_size=args.device_batch_size)
    if args.json:  # the description goes to stderr, for the person watching a script that reads the JSON
        print0(json.dumps(plan))
    print0(describe(plan), file=sys.stderr if args.json else sys.stdout)
    found = problems(plan, get_base_dir())
    for line in found:
        print0(f"error: {line}", file=sys.stderr)
    if args.check and found:
        raise SystemExit(1)


if __name__ == "__main__":
    run_main(main)
