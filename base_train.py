"""Pretraining: train a GPT from scratch on a pretraining source.

    python -m base_train --depth 20                                        # one GPU (or CPU, slowly)
    torchrun --standalone --nproc_per_node=8 -m base_train -- --depth 20    # one node, 8 GPUs

One dial, --depth. Everything else is derived from it (each derived value has a flag to override):
- the model: n_layer = depth, n_embd = depth * --aspect-ratio (64), heads of --head-dim (128) dims
  (model.config_from_depth);
- the learning rates: AdamW for the embedding (--embedding-lr) and the lm_head (--unembedding-lr),
  scaled by 1/sqrt(n_embd/768) in setup_optimizers; Muon for every matrix (--matrix-lr);
- the horizon: --target-param-data-ratio tokens per parameter (20 = Chinchilla), so
  num_iterations = ratio * params / total_batch_size, unless --num-iterations says otherwise;
- the batch: --total-batch-size tokens per optimizer step (524288 = 2^19, right for d20-scale runs
  on GPUs; -1 = one micro-batch per process, no accumulation), reached by gradient accumulation
  over --device-batch-size x --max-seq-len tokens per process per micro-step.
The learning rate is constant after an optional linear warmup (--warmup-ratio) and decays linearly
to --final-lr-frac over the last --warmdown-ratio of training; Muon's momentum warms up 0.85 -> 0.95
over the first 300 steps.

Defaults for the device: CUDA -> bf16 autocast (SM80+), torch.compile, source fineweb-edu;
otherwise fp32, no compile, source stdlib-docs (the offline corpus every machine has) and fewer
validation tokens (--eval-tokens).
--fp8 runs the blocks' matmuls in float8 (fp8.py; SM89+ GPUs such as the H100, or CPU for tests).
SPEEDCHAT_DTYPE may force bfloat16 or float32; float16 is refused (it would need a gradient scaler).

Checkpoints go to $SPEEDCHAT_BASE_DIR/checkpoints/base/<--model-tag, default d<depth>>/ every
--save-every steps and at the end; --resume continues exactly where the last one left off
(model, optimizer, data position, RNG, loss average).
"""


import argparse
from dataclasses import asdict

import torch

import dataset
import training
from common import FRACTION, POSITIVE, POSITIVE_OR_ALL, POSITIVE_RATE, UserError, parse_args, print0, run_main
from dataloader import DataLoader
from fp8 import convert_to_fp8, fp8_supported
from model import GPT, config_from_depth

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "Return a new list containing",
]


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain a GPT (the base model). Every size is derived from --depth.")
    training.add_flags(p, device_batch_size=32, eval_every=250, save_every=1000, warmdown_ratio=0.2)
    g = p.add_argument_group("pretraining")
    g.add_argument("--source", default="", help="pretraining source: fineweb-edu | stdlib-docs | dir:PATH "
                   "('' = fineweb-edu on CUDA, stdlib-docs otherwise)")
    g.add_argument("--fp8", action="store_true",
                   help="run the transformer blocks' matmuls (attention and MLP) in float8 with dynamic tensorwise "
                        "scaling (fp8.py; embedding and lm_head stay in the training dtype); needs a GPU of compute "
                        "capability 8.9+ (H100, L4, RTX 4090), or CPU (slow, for tests)")
    g.add_argument("--depth", type=POSITIVE, default=20, help="number of transformer layers: the one complexity dial")
    g.add_argument("--aspect-ratio", type=POSITIVE, default=64, help="model width = depth * aspect ratio")
    g.add_argument("--head-dim", type=POSITIVE, default=128, help="dimension of each attention head")
    g.add_argument("--max-seq-len", type=POSITIVE, default=2048, help="context length in tokens")
    g.add_argument("--target-param-data-ratio", type=POSITIVE_RATE, default=20,
                   help="training tokens per model parameter when --num-iterations is -1 (20 = Chinchilla)")
    g.add_argument("--total-batch-size", type=POSITIVE_OR_ALL, default=training.D20_TOTAL_BATCH_SIZE,
                   help="tokens per optimizer step (-1 = device batch x seq len x processes, no accumulation)")
    g.add_argument("--warmup-ratio", type=FRACTION, default=0.0, help="fraction of steps of linear lr warmup")
    g.add_argument("--eval-tokens", type=POSITIVE, default=None,
                   help=f"validation tokens per evaluation (default: {training.default_eval_tokens('cuda')} on "
                        f"CUDA, {training.default_eval_tokens('cpu')} otherwise)")
    g.add_argument("--sample-every", type=POSITIVE_OR_ALL, default=2000,
                   help="print greedy samples every N steps (-1 = only at the end)")
    return parse_args(p, argv)


def lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Linear warmup, constant, linear warmdown to final_lr_frac over the last warmdown_ratio."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown  # 1 -> 0 across the warmdown
    return progress + (1 - progress) * final_lr_frac


def main(argv=None):
    args = get_args(argv)
    with training.Run(args, "base", args.model_tag or f"d{args.depth}") as run:
        return train(run, args)


def train(run, args):
    device, B, T = run.device, args.device_batch_size, args.max_seq_len
    source = args.source or ("fineweb-edu" if device.type == "cuda" else "stdlib-docs")
    if args.fp8 and not fp8_supported(device)[0]:
        raise UserError(f"--fp8: {fp8_supported(device)[1]}: train without --fp8")
    if run.master:
        dataset.ensure_source(source)  # builds stdlib-docs on first use; clear error if shards are missing
    if run.ddp:
        torch.distributed.barrier()

    # the model: every size from --depth
    config = config_from_depth(args.depth, run.tokenizer.get_vocab_size(), sequence_len=T,
                               aspect_ratio=args.aspect_ratio, head_dim=args.head_dim)
    run.check_resumed(model_config=asdict(config), source=source)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    if args.fp8:  # before torch.compile; the parameters stay the same objects
        print0(f"fp8: {convert_to_fp8(model)} linear layers of the blocks compute in float8")
    num_params = model.num_params()["total"]
    total_batch_size, grad_accum = training.derive_batch(B, T, args.total_batch_size, run.world_size)
    num_iterations = (args.num_iterations if args.num_iterations > 0
                      else max(1, int(args.target_param_data_ratio * num_params) // total_batch_size))
    batches = DataLoader(run.tokenizer, B, T, split="train", source=source, device=device, rank=run.rank,
                         world_size=run.world_size)
    run.prepare(model, batches)
    tokens = total_batch_size * num_iterations
    print0(f"model {run.tag}: {asdict(config)}")
    print0(f"parameters: {num_params:,} | FLOPs/token: {run.flops_per_token:.3e} | source: {source}")
    print0(f"batch: {total_batch_size:,} tokens/step = {B} x {T} x {run.world_size} processes x {grad_accum} "
           f"accumulation | steps: {num_iterations:,} | tokens: {tokens:,} ({tokens / num_params:.1f}/param)")

    def train_step():
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            x, y = next(batches)
            with run.autocast:
                loss = run.model(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
        return loss_sum / grad_accum, total_batch_size

    eval_steps = max(1, (args.eval_tokens or training.default_eval_tokens(device.type)) // (B * T * run.world_size))

    def evaluate():
        val = DataLoader(run.tokenizer, B, T, split="val", source=source, device=device, rank=run.rank,
                         world_size=run.world_size)
        bpb = training.evaluate_bpb(run.model, val, eval_steps, run.token_bytes)
        val.close()
        return bpb

    def sample():
        for prompt in SAMPLE_PROMPTS:
            print0(f"sample: {training.sample_greedy(model, run.tokenizer, prompt, 16, device, T)!r}")

    run.train(train_step, evaluate, sample=sample, sample_every=args.sample_every,
              schedule=lambda step, progress: lr_multiplier(step, num_iterations, args.warmup_ratio,
                                                            args.warmdown_ratio, args.final_lr_frac),
              progress=lambda step: step / num_iterations, momentum=training.muon_momentum,
              meta=dict(source=source, total_batch_size=total_batch_size, grad_accum_steps=grad_accum,
                        num_iterations=num_iterations, eval_steps=eval_steps))
    batches.close()
    numbers = dict(depth=config.n_layer, model_dim=config.n_embd, heads=config.n_head, kv_heads=config.n_kv_head,
                   sequence_length=T, vocab_size=config.vocab_size, total_batch_size=total_batch_size,
                   num_iterations=num_iterations, training_tokens=tokens, tokens_per_parameter=tokens / num_params,
                   total_training_flops=run.flops_per_token * tokens, fp8="on" if args.fp8 else "off", source=source)
    if device.type == "cuda":
        numbers["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return run.report("base-train", "Base model training", numbers)


if __name__ == "__main__":
    run_main(main)
