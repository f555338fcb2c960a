"""Evaluate a base (or mid/sft) checkpoint: the CORE score, train/val bits per byte, and greedy
samples from a few fixed prompts. Writes $BASE/base_eval/core_<tag>_<step>.csv and the report
section "base-eval".

    python -m base_eval                                   # the latest base checkpoint, everything
    python -m base_eval --max-per-task 100 --eval core    # a quick CORE estimate
    python -m base_eval --convert-missing DIR             # HellaSwag, SQuAD from raw files (approximate)
    torchrun --standalone --nproc_per_node=8 -m base_eval -- --model-tag d20
"""

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import core_eval
from training import default_eval_tokens, evaluate_bpb, sample_greedy
from common import (POSITIVE_OR_ALL, compute_cleanup, compute_init, format_seconds, get_base_dir, get_dtype,
                    print0, run_main)

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]
EVALS = ("core", "bpb", "sample")


def eval_list(text) -> list[str]:
    evals = [e.strip() for e in text.split(",") if e.strip()]
    if not evals or set(evals) - set(EVALS):
        raise argparse.ArgumentTypeError(f"use a comma list of {', '.join(EVALS)}")
    return evals


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["base", "mid", "sft"], default="base", help="which stage's checkpoint to evaluate")
    p.add_argument("--model-tag", default=None, help="checkpoint tag, e.g. d20 (default: the latest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--eval", dest="evals", type=eval_list, default=list(EVALS),
                   help="comma list of what to run: core, bpb, sample (default: all)")
    p.add_argument("--bundle", default=None,
                   help="unzipped CORE eval bundle folder (default: $SPEEDCHAT_BASE_DIR/eval_bundle, downloaded once)")
    p.add_argument("--max-per-task", type=POSITIVE_OR_ALL, default=-1,
                   help="evaluate the first N of each CORE task's rows shuffled with a fixed seed (-1 = all)")
    raw_names = ", ".join(raw for raw, _ in core_eval.CONVERTERS.values())
    p.add_argument("--convert-missing", metavar="DIR", help=f"convert {raw_names} in DIR for bundles that lack "
                   "those tasks (the CORE line marks them APPROXIMATE) and exit")
    p.add_argument("--split-tokens", type=int, default=None,
                   help=f"tokens per split (train, val) for bits per byte (default: {default_eval_tokens('cuda')} "
                        f"on CUDA, {default_eval_tokens('cpu')} otherwise)")
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward pass for bits per byte")
    p.add_argument("--data", default=None,
                   help="pretraining source for bits per byte (default: the one in the checkpoint, else fineweb-edu)")
    p.add_argument("--device", choices=["cuda", "cpu", "mps"], default=None, help="device (default: autodetect)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Bits per byte and samples (the same functions base_train uses during training)


def run_bpb(model, tokenizer, args, meta, device, ddp, rank, world_size, autocast) -> dict:
    import dataset
    from dataloader import DataLoader
    from tokenizer import get_token_bytes

    T = model.config.sequence_len
    B = args.device_batch_size
    split_tokens = args.split_tokens or default_eval_tokens(device.type)
    steps = max(1, split_tokens // (B * T * world_size))  # at least one batch
    source = args.data or meta.get("source") or "fineweb-edu"  # base_train records its source in meta
    if rank == 0:
        dataset.ensure_source(source)  # builds stdlib-docs / dir: shards on first use
    if ddp:
        dist.barrier()
    token_bytes = get_token_bytes(device=device)
    out = {}
    for split in ("train", "val"):
        loader = DataLoader(tokenizer, B, T, split=split, source=source, device=device, rank=rank, world_size=world_size)
        t0 = time.perf_counter()
        with autocast:
            out[split] = evaluate_bpb(model, loader, steps, token_bytes)
        loader.close()
        print0(f"{split} bpb: {out[split]:.4f} ({steps * B * T * world_size:,} tokens of {source}, "
               f"{format_seconds(time.perf_counter() - t0)})")
    return out


# ---------------------------------------------------------------------------
# Report


def core_table(results) -> str:
    lines = ["| task | type | shots | n | accuracy | centered |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        if r.get("missing"):
            lines.append(f"| {label} | {r['type']} | | 0 | missing | missing |")
        else:
            lines.append(f"| {label} | {r['type']} | {r['num_fewshot']} | {r['n']} | "
                         f"{r['accuracy']:.4f} ± {r['accuracy_se']:.4f} | {r['centered']:+.4f} ± {r['centered_se']:.4f} |")
    return "\n".join(lines)


def write_report(args, tag, step, results, summary, bpb, samples, references):
    section = {"model": f"{args.source}/{tag} step {step}", "source": args.source, "tag": tag, "step": step,
               "max_per_task": None if args.max_per_task < 0 else args.max_per_task}
    text = []
    if results is not None:
        section["CORE"] = core_eval.core_line(summary, len(results)).removeprefix("CORE: ")
        section.update(core=summary["core"], core_se=summary["core_se"], core_partial=summary["partial"],
                       core_tasks=summary["tasks"], missing_tasks=summary["missing"], results=results)
        for name, core in references.items():
            section[f"{name} CORE, same tasks (reference)"] = core
        text.append(core_table(results))
    if bpb is not None:
        section["bpb"] = bpb
    if samples is not None:
        section["samples"] = samples
        text.append("Greedy samples:\n\n" + "\n".join(f"- `{s!r}`" for s in samples))
    from report import write_section

    write_section("base-eval", "Base model evaluation", section, text="\n\n".join(text))


# ---------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.convert_missing:
        core_eval.convert_missing(args.convert_missing)
        return
    from checkpoint import load_model, resolve

    ddp, rank, _, world_size, device = compute_init(args.device)
    try:
        tag, step = resolve(args.source, args.model_tag, args.step)
        model, tokenizer, meta = load_model(args.source, device, tag, step)
        print0(f"evaluating {args.source}/{tag} step {step} on {world_size} x {device.type}")
        dtype = get_dtype(device.type)
        autocast = torch.autocast(device.type, dtype=dtype) if device.type == "cuda" and dtype != torch.float32 \
            else nullcontext()
        results = summary = bpb = samples = references = None

        if "core" in args.evals:
            if args.bundle:
                bundle = Path(args.bundle)
            else:  # rank 0 downloads, the others wait and then find it
                if rank == 0:
                    core_eval.ensure_bundle()
                if ddp:
                    dist.barrier()
                bundle = core_eval.ensure_bundle()
            t0 = time.perf_counter()
            with autocast:
                results, summary = core_eval.run_core(model, tokenizer, bundle, device, args.max_per_task,
                                                      rank, world_size)
            references = core_eval.reference_cores(bundle, summary["tasks"]) if summary["tasks"] else {}
            for name, core in references.items():
                print0(f"reference {name}: CORE {core:.4f} on the same {summary['n_tasks']} tasks")
            print0(f"CORE took {format_seconds(time.perf_counter() - t0)}")
            if rank == 0:
                name = f"core_{tag}_{step}.csv" if args.source == "base" else f"core_{args.source}-{tag}_{step}.csv"
                csv_path = get_base_dir() / "base_eval" / name
                core_eval.write_core_csv(csv_path, results, summary)
                print0(f"per-task results: {csv_path}")

        if "bpb" in args.evals:
            bpb = run_bpb(model, tokenizer, args, meta, device, ddp, rank, world_size, autocast)

        if "sample" in args.evals and rank == 0:
            with autocast:
                samples = [sample_greedy(model, tokenizer, prompt, 16, device, model.config.sequence_len)
                           for prompt in SAMPLE_PROMPTS]
            for s in samples:
                print0(f"  {s!r}")

        if rank == 0:
            if args.source == "base":
                write_report(args, tag, step, results, summary, bpb, samples, references)
            else:  # the "base-eval" report section belongs to the base model
                print0(f"not writing the base-eval report section for a {args.source} checkpoint")
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_main(main)
