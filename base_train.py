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
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist

import checkpoint
from fp8 import convert_to_fp8, fp8_supported
from common import (UserError, compute_cleanup, compute_init, format_seconds, get_dtype,
                    init_wandb, print0, run_main)

D20_TOTAL_BATCH_SIZE = 524288  # tokens per step for d20-scale runs (2^19)
# dense bf16 peak FLOP/s per GPU, for MFU; matched against torch.cuda.get_device_name()
GPU_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "Return a new list containing",
]


# ---------------------------------------------------------------------------
# Flags (the helpers here are shared with mid_train and chat_sft)


def default_eval_tokens(device_type):
    """Validation tokens per evaluation when --eval-tokens is not given."""
    # off CUDA a few batches: the d20 amount would be minutes of silent validation on a CPU
    return 20 * D20_TOTAL_BATCH_SIZE if device_type == "cuda" else 32768


EVAL_TOKENS_HELP = (f"validation tokens per evaluation (default: {default_eval_tokens('cuda')} on CUDA, "
                    f"{default_eval_tokens('cpu')} otherwise)")


def show_defaults(parser):
    """Append "(default: X)" to each flag's help, except where the default says nothing (None, '',
    False: the help explains those) or the help already names the default."""
    for action in parser._actions:
        if not action.help or action.help == argparse.SUPPRESS or "default" in action.help:
            continue
        if action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS):
            continue
        action.help += " (default: %(default)s)"


def check_training_args(args):
    """The checks of the flags base_train, mid_train and chat_sft share (each flag where the stage
    has it): a value that is neither valid nor the -1 sentinel would otherwise act like the default."""
    def flag(name):
        return "--" + name.replace("_", "-")

    for name in ("device_batch_size", "log_every"):
        if not getattr(args, name) > 0:
            raise UserError(f"{flag(name)} must be positive, got {getattr(args, name)}")
    for name in ("num_iterations", "total_batch_size", "eval_every", "save_every", "sample_every", "keep_last"):
        value = getattr(args, name, None)  # None: not a flag of this stage, or mid_train's per-device default
        if value is not None and value != -1 and value <= 0:
            raise UserError(f"{flag(name)} must be positive or -1, got {value}")
    for name in ("resume_step", "step"):
        value = getattr(args, name, None)
        if value is not None and value < -1:
            raise UserError(f"{flag(name)} must be >= 0, or -1 for the latest, got {value}")
    for name in ("eval_tokens", "eval_examples"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UserError(f"{flag(name)} must be positive, got {value}")
    # a learning rate of 0 freezes those weights, which is allowed; `not >=` also catches nan
    for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay"):
        if not getattr(args, name) >= 0:
            raise UserError(f"{flag(name)} must be >= 0, got {getattr(args, name)}")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"{flag(name)} must be between 0 and 1, got {value}")
    return args


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain a GPT (the base model). Every size is derived from --depth.")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="", help="cuda | cpu | mps ('' = autodetect)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off otherwise)")
    g.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    g.add_argument("--seed", type=int, default=42, help="random seed (model init)")
    g.add_argument("--fp8", action="store_true",
                   help="run the transformer blocks' matmuls (attention and MLP) in float8 with dynamic "
                        "tensorwise scaling (fp8.py; embedding and lm_head stay in the training dtype); needs a GPU of compute "
                        "capability 8.9+ (H100, L4, RTX 4090), or CPU (slow, for tests)")
    g = p.add_argument_group("data")
    g.add_argument("--source", default="", help="pretraining source: fineweb-edu | stdlib-docs | dir:PATH "
                   "('' = fineweb-edu on CUDA, stdlib-docs otherwise)")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers: the one complexity dial")
    g.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio")
    g.add_argument("--head-dim", type=int, default=128, help="dimension of each attention head")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    g.add_argument("--model-tag", default="", help="checkpoint folder name ('' = d<depth>)")
    g = p.add_argument_group("horizon (first of these that is > 0 wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="number of optimizer steps (-1 = derived)")
    g.add_argument("--target-param-data-ratio", type=float, default=20,
                   help="training tokens per model parameter (20 = Chinchilla)")
    g = p.add_argument_group("batch")
    g.add_argument("--device-batch-size", type=int, default=32, help="sequences per process per micro-step")
    g.add_argument("--total-batch-size", type=int, default=D20_TOTAL_BATCH_SIZE,
                   help="tokens per optimizer step (-1 = device batch x seq len x processes, no accumulation)")
    g = p.add_argument_group("optimization")
    g.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW learning rate of the token embedding")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW learning rate of the lm_head")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate of the transformer matrices")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear lr warmup")
    g.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear lr decay at the end")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="lr at the end, as a fraction of the peak")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=250, help="validation bits-per-byte every N steps (-1 = only at the end)")
    g.add_argument("--eval-tokens", type=int, default=None, help=EVAL_TOKENS_HELP)
    g.add_argument("--sample-every", type=int, default=2000, help="print greedy samples every N steps (-1 = only at the end)")
    g.add_argument("--log-every", type=int, default=1, help="print a step line every N steps (each costs one GPU sync)")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--keep-last", type=int, default=2, help="keep only the newest K checkpoints (-1 = keep all)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --model-tag")
    g.add_argument("--resume-step", type=int, default=-1, help="with --resume: the step to continue from (-1 = latest)")
    show_defaults(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv[1:] if argv[:1] == ["--"] else argv)  # `python -m base_train -- --depth 20` too
    for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return check_training_args(args)


# ---------------------------------------------------------------------------
# Schedules


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


def muon_momentum(step, warmup_steps=300):
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# ---------------------------------------------------------------------------
# Evaluation and samples (evaluate_bpb is shared with base_eval.py)


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Bits per byte over `steps` batches of (inputs, targets) from the iterator `batches`:
    sum of per-token losses (nats) / (ln 2 * sum of the targets' UTF-8 byte lengths).
    Special tokens (0 bytes in token_bytes) and masked targets (-1) count in neither sum,
    so the number does not depend on the tokenizer. Call it inside the autocast context you
    train with; under torchrun every rank passes its own batches and gets the global number."""
    device = token_bytes.device
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)
        loss = model(x, y, loss_reduction="none").reshape(-1).to(acc_dtype)
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[torch.where(valid, y, 0)], 0)
        total_nats += torch.where(nbytes > 0, loss, 0.0).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    nbytes = total_bytes.item()
    if nbytes == 0:
        raise UserError("bits-per-byte: the evaluation batches hold no scorable tokens")
    return total_nats.item() / (math.log(2) * nbytes)


@torch.no_grad()
def sample_greedy(model, tokenizer, prompt, max_tokens, device, context_len):
    """Greedy continuation of `prompt`: the plain loop, no KV cache (the engine does it fast)."""
    ids = tokenizer.encode(prompt, prepend="<|bos|>")
    start = len(ids)
    for _ in range(max_tokens):
        x = torch.tensor([ids[-context_len:]], dtype=torch.long, device=device)
        logits = model(x)
        next_id = int(logits[0, -1].argmax())
        if next_id == tokenizer.get_bos_token_id():
            break
        ids.append(next_id)
    return prompt + tokenizer.decode(ids[start:])


def global_mean(value):
    """The mean of the scalar tensor `value` over all ranks (`value` itself when not distributed),
    so every rank logs, and checks for NaN, the same number."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # not AVG: gloo lacks it on some torch versions
    return total / dist.get_world_size()


def check_finite_loss(loss, step, what_to_lower):
    if not math.isfinite(loss):
        raise UserError(f"the loss became {loss} at step {step}: lower the learning rates "
                        f"({what_to_lower}) or resume from an earlier checkpoint")


def step_line(step, progress, loss, lrm, dt, tokens_per_step, flops_per_token, peak, world_size, elapsed, eta,
              num_iterations=None):
    """The training step line (shared by base, mid and sft) and the tok/s it reports. `progress`
    is the fraction done, `peak` the device's FLOP/s (None: MFU n/a)."""
    tok_per_sec = tokens_per_step / dt
    mfu = f"{100 * flops_per_token * tok_per_sec / (peak * world_size):.2f}%" if peak else "n/a"
    of = f"/{num_iterations:05d}" if num_iterations else ""
    line = (f"step {step:05d}{of} ({100 * min(progress, 1.0):.1f}%) | loss {loss:.4f} | lrm {lrm:.2f} | "
            f"dt {dt * 1000:.1f}ms | tok/s {tok_per_sec:,.0f} | mfu {mfu} | "
            f"elapsed {format_seconds(elapsed)} | eta {format_seconds(eta)}")
    return line, tok_per_sec


def training_dtype(device_type):
    """The autocast dtype to train in: bf16 or fp32 (get_dtype's choice or SPEEDCHAT_DTYPE)."""
    dtype = get_dtype(device_type)
    if dtype not in (torch.bfloat16, torch.float32):
        raise UserError(f"training runs in bfloat16 or float32, not {str(dtype).replace('torch.', '')} "
                        f"(float16 would need a gradient scaler): set SPEEDCHAT_DTYPE=bfloat16 or float32, or unset it")
    return dtype


def peak_flops(device, dtype):
    """The device's dense bf16 peak FLOP/s, or None when unknown (CPU, other GPUs, not bf16)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in GPU_PEAK_BF16_FLOPS.items() if key in name), None)


def get_rng_state(device):
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":  # this rank's GPU only (touching the others would create contexts there)
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ---------------------------------------------------------------------------


def derive_batch(device_batch_size, seq_len, total_batch_size, world_size):
    """(total_batch_size, grad_accum_steps): total_batch_size <= 0 means one micro-batch per process.
    Errors when the total is not a multiple of what the processes take in one micro-step."""
    tokens_per_micro = device_batch_size * seq_len * world_size
    total = total_batch_size if total_batch_size > 0 else tokens_per_micro
    if total % tokens_per_micro != 0:
        raise UserError(f"--total-batch-size {total} is not a multiple of device batch x seq len x processes = "
                        f"{device_batch_size} x {seq_len} x {world_size} = {tokens_per_micro}: "
                        f"change --total-batch-size or --device-batch-size")
    return total, total // tokens_per_micro


def derive_num_iterations(args, num_params, total_batch_size):
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_param_data_ratio > 0:
        return max(1, int(args.target_param_data_ratio * num_params) // total_batch_size)
    raise UserError("no training horizon: give --num-iterations or --target-param-data-ratio > 0")


def main(argv=None):
    args = get_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device, seed=args.seed)
    try:
        return train(args, ddp, rank, world_size, device)
    finally:
        compute_cleanup()


def train(args, ddp, rank, world_size, device):
    from model import GPT, config_from_depth
    from tokenizer import get_tokenizer, get_token_bytes
    from dataloader import DataLoader
    import dataset

    master = rank == 0
    dtype = training_dtype(device.type)
    autocast = torch.amp.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    if args.fp8:
        ok, reason = fp8_supported(device)
        if not ok:
            raise UserError(f"--fp8: {reason}: train without --fp8")
    source = args.source or ("fineweb-edu" if device.type == "cuda" else "stdlib-docs")
    eval_tokens = args.eval_tokens if args.eval_tokens is not None else default_eval_tokens(device.type)
    tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = checkpoint.checkpoint_dir("base", tag)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.resume and checkpoint.find_last_step(ckpt_dir) is None:  # never silently start from scratch
        raise UserError(f"--resume: no base checkpoint under {ckpt_dir}: run `python -m base_train` "
                        f"without --resume to start fresh (or check --model-tag)")

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    if master:
        dataset.ensure_source(source)  # builds stdlib-docs on first use; clear error if shards are missing
    if ddp:
        dist.barrier()

    # model: sizes from --depth
    config = config_from_depth(args.depth, tokenizer.get_vocab_size(), sequence_len=args.max_seq_len,
                               aspect_ratio=args.aspect_ratio, head_dim=args.head_dim)
    with torch.device(device):
        orig_model = GPT(config)
    orig_model.init_weights()
    if args.fp8:  # before torch.compile; the parameters stay the same objects
        print0(f"fp8: {convert_to_fp8(orig_model)} linear layers of the blocks compute in float8")
    num_params = orig_model.num_params()["total"]
    flops_per_token = orig_model.estimate_flops()
    total_batch_size, grad_accum = derive_batch(args.device_batch_size, args.max_seq_len,
                                                 args.total_batch_size, world_size)
    num_iterations = derive_num_iterations(args, num_params, total_batch_size)
    optimizers = orig_model.setup_optimizers(embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
                                             matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    model = torch.compile(orig_model, dynamic=False) if use_compile else orig_model

    train_config = dict(vars(args), source=source, model_tag=tag, device=device.type, dtype=str(dtype),
                        compile=use_compile, world_size=world_size, total_batch_size=total_batch_size,
                        grad_accum_steps=grad_accum, num_iterations=num_iterations, eval_tokens=eval_tokens)
    print0(f"model {tag}: {asdict(config)}")
    print0(f"parameters: {num_params:,} | FLOPs/token: {flops_per_token:.3e} | vocab: {tokenizer.get_vocab_size():,}")
    print0(f"batch: {total_batch_size:,} tokens/step = {args.device_batch_size} x {args.max_seq_len} x "
           f"{world_size} processes x {grad_accum} accumulation | steps: {num_iterations:,} | "
           f"tokens: {total_batch_size * num_iterations:,} ({total_batch_size * num_iterations / num_params:.1f}/param)")
    print0(f"device: {device} | dtype: {dtype} | fp8: {'on' if args.fp8 else 'off'} | compile: {use_compile} | "
           f"source: {source}")

    train_loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, split="train", source=source,
                              device=device, rank=rank, world_size=world_size)
    # loop state that a resume restores
    step, smooth_loss = 0, torch.zeros((), device=device)
    training_time, timed_steps = 0.0, 0  # wall time of the training steps, and how many steps it covers
    val_bpb, min_val_bpb = None, float("inf")
    curve = {"step": [], "loss": [], "val_step": [], "val_bpb": []}
    stale_checkpoints = False
    if args.resume:
        resume_step = args.resume_step if args.resume_step >= 0 else None
        model_state, optim_states, meta = checkpoint.load_checkpoint("base", tag, resume_step, device, rank,
                                                                     load_optimizer=True)
        if meta["model_config"] != asdict(config):
            raise UserError(f"--resume: the checkpoint in {ckpt_dir} is a different model ({meta['model_config']}) "
                            f"from the one these flags give ({asdict(config)}): use the run's original flags")
        if meta.get("world_size", 1) != world_size:
            raise UserError(f"--resume: the checkpoint was written by {meta.get('world_size')} processes, this run "
                            f"has {world_size}: resume with the same number")
        if meta.get("train_config", {}).get("fp8", False) != args.fp8:  # allowed: the weights are the same
            print0(f"note: the checkpoint was trained with fp8 {'off' if args.fp8 else 'on'}, "
                   f"this run continues with it {'on' if args.fp8 else 'off'}")
        orig_model.load_state_dict(model_state, strict=True)
        for opt, state in zip(optimizers, optim_states, strict=True):
            opt.load_state_dict(state)
        del model_state, optim_states
        rank_state = meta["rank_state"]
        train_loader.load_state_dict(rank_state["dataloader"])
        set_rng_state(rank_state["rng"], device)
        loop = meta["loop_state"]
        step, min_val_bpb = meta["step"], loop["min_val_bpb"]
        training_time, timed_steps = loop["training_time"], loop["timed_steps"]
        smooth_loss = torch.tensor(loop["smooth_loss"], dtype=torch.float32, device=device)
        curve, val_bpb = loop["curve"], meta.get("val_bpb")
        print0(f"resumed from {ckpt_dir} at step {step}")
    elif checkpoint.find_last_step(ckpt_dir) is not None:
        stale_checkpoints = True
        print0(f"warning: {ckpt_dir} holds checkpoints of an earlier run; they are replaced at the first save "
               f"(pass --resume to continue that run instead)")
    start_step = step

    wandb_run = init_wandb(args.run, "speedchat", train_config, master)
    peak = peak_flops(device, dtype)
    eval_steps = max(1, eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))
    ema_beta = 0.9
    last_log_time, last_log_step = None, step

    while True:
        # --- evaluate, sample, save (the state here: `step` optimizer steps done)
        last_step = step >= num_iterations
        do_eval = last_step or (args.eval_every > 0 and step % args.eval_every == 0)
        do_eval = do_eval and not (curve["val_step"] and curve["val_step"][-1] == step)  # done before the resume
        do_sample = master and (last_step or (args.sample_every > 0 and step > 0 and step % args.sample_every == 0))
        do_save = step > start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0))
        if do_eval:
            model.eval()
            val_loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, split="val",
                                    source=source, device=device, rank=rank, world_size=world_size)
            with autocast:
                val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            val_loader.close()
            model.train()
            min_val_bpb = min(min_val_bpb, val_bpb)
            curve["val_step"].append(step)
            curve["val_bpb"].append(val_bpb)
            print0(f"step {step:05d} | validation bpb: {val_bpb:.4f}")
            wandb_run.log({"step": step, "val/bpb": val_bpb})
        if do_sample:
            orig_model.eval()
            with autocast:
                for prompt in SAMPLE_PROMPTS:
                    print0(f"sample: {sample_greedy(orig_model, tokenizer, prompt, 16, device, args.max_seq_len)!r}")
            orig_model.train()
        if do_save:
            if stale_checkpoints:
                if master:
                    checkpoint.clear_checkpoints(ckpt_dir)
                if ddp:
                    dist.barrier()  # cleared before any rank writes this step's shard
                stale_checkpoints = False
            loss_value = global_mean(smooth_loss).item() / (1 - ema_beta ** step)
            meta = {
                "model_config": asdict(config),
                "train_config": train_config,
                "step": step,
                "loss": loss_value,
                "val_bpb": val_bpb,
                "source": source,
                "tokenizer": tokenizer.fingerprint(),
                "world_size": world_size,
                "dataloader_state": train_loader.state_dict(),
                "loop_state": {"smooth_loss": smooth_loss.item(), "training_time": training_time,
                               "timed_steps": timed_steps, "min_val_bpb": min_val_bpb, "curve": curve},
            }
            rank_state = {"dataloader": train_loader.state_dict(), "rng": get_rng_state(device)}
            checkpoint.save_checkpoint("base", tag, step, orig_model, optimizers, meta, rank=rank,
                                       rank_state=rank_state, keep_last=args.keep_last if args.keep_last > 0 else None)
        if last_step:
            break
        if step == start_step or do_eval or do_sample or do_save:  # keep eval/sample/save time out of the step timing
            sync()
            last_log_time, last_log_step = time.perf_counter(), step

        # --- one optimizer step
        train_loss = torch.zeros((), device=device)
        for _ in range(grad_accum):
            x, y = next(train_loader)
            with autocast:
                loss = model(x, y)
            train_loss += loss.detach()
            (loss / grad_accum).backward()
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if is_muon(opt):
                    group["momentum"] = muon_momentum(step)
            opt.step()
        model.zero_grad(set_to_none=True)
        smooth_loss = ema_beta * smooth_loss + (1 - ema_beta) * (train_loss / grad_accum)
        step += 1

        # --- log (the only GPU sync of a training step)
        if step % args.log_every == 0 or step == num_iterations:
            debiased = global_mean(smooth_loss).item() / (1 - ema_beta ** step)  # every rank: same value
            check_finite_loss(debiased, step, "--matrix-lr, --embedding-lr")
            sync()
            now = time.perf_counter()
            dt = (now - last_log_time) / (step - last_log_step)
            if not use_compile or step > start_step + 10:  # the first compiled steps are mostly compiling
                training_time += dt * (step - last_log_step)
                timed_steps += step - last_log_step
            last_log_time, last_log_step = now, step
            line, tok_per_sec = step_line(step, step / num_iterations, debiased, lrm, dt, total_batch_size,
                                          flops_per_token, peak, world_size, training_time,
                                          eta=dt * (num_iterations - step), num_iterations=num_iterations)
            print0(line)
            curve["step"].append(step)
            curve["loss"].append(debiased)
            wandb_run.log({"step": step, "train/loss": debiased, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec})

    train_loader.close()

    # --- the report
    tokens = total_batch_size * num_iterations
    timed_tokens = total_batch_size * timed_steps
    mfu_total = flops_per_token * timed_tokens / (training_time * peak * world_size) if peak and training_time else None
    if master:
        import report

        items = {
            "model tag": tag,
            "depth": config.n_layer,
            "model dim": config.n_embd,
            "heads": f"{config.n_head} (kv {config.n_kv_head})",
            "sequence length": config.sequence_len,
            "vocab size": config.vocab_size,
            "parameters": f"{num_params:,}",
            "FLOPs/token": f"{flops_per_token:.3e}",
            "total batch size": f"{total_batch_size:,}",
            "steps": f"{num_iterations:,}",
            "training tokens": f"{tokens:,}",
            "tokens/parameter": f"{tokens / num_params:.1f}",
            "total training FLOPs": f"{flops_per_token * tokens:.3e}",
            "training time": format_seconds(training_time),
            "MFU": f"{100 * mfu_total:.2f}%" if mfu_total is not None else "n/a",
            "device": f"{world_size} x {torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}",
            "dtype": str(dtype).replace("torch.", ""),
            "fp8": "on" if args.fp8 else "off",
            "source": source,
            "min validation bpb": f"{min_val_bpb:.4f}",
            "final validation bpb": f"{val_bpb:.4f}",
        }
        if device.type == "cuda":
            items["peak memory"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        data = {"num_params": num_params, "flops_per_token": flops_per_token, "total_batch_size": total_batch_size,
                "num_iterations": num_iterations, "tokens": tokens, "training_time": training_time, "mfu": mfu_total,
                "min_val_bpb": min_val_bpb, "final_val_bpb": val_bpb, "curve": curve, "tag": tag}
        report.write_section("base-train", "Base model training", items, data=data)
    print0(f"done: {num_iterations} steps in {format_seconds(training_time)} | min validation bpb {min_val_bpb:.4f}")
    wandb_run.finish()
    return {"step": step, "val_bpb": val_bpb, "min_val_bpb": min_val_bpb, "curve": curve, "tag": tag}


def is_muon(opt):
    return "muon" in type(opt).__name__.lower()


if __name__ == "__main__":
    run_main(main)
