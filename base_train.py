"""Pretraining: train a GPT from scratch on a pretraining source.

    python -m base_train --depth 24 --target-param-data-ratio 8 --fp8         # one GPU (or CPU, slowly)
    torchrun --standalone --nproc_per_node=8 -m base_train -- --depth 24 ...   # one node, 8 GPUs

One dial, --depth; the rest follows from it (each derived value has a flag to override):
- the model: n_layer = depth, n_embd = depth * --aspect-ratio (64), heads of --head-dim (128) dims,
  attention windows tiled by --window-pattern (model.config_from_depth);
- the horizon, batch, learning rates and Muon's weight decay: model.pretraining_recipe, which
  carries the d12-tuned constants to any size: tokens = --target-param-data-ratio x the scaling
  parameters, total batch 2^19 x (tokens / d12's)^0.383 as a power of two (--total-batch-size
  overrides it), every learning rate x sqrt(batch / 2^19) (--batch-lr-scale; on CUDA), Muon's decay
  --weight-decay x sqrt(batch / 2^19) x d12's tokens / tokens; plan.py computes the same numbers;
- the schedule: a linear warmup over the first 40 steps, then linear decay over the last
  --warmdown-ratio (65%) of the run to --final-lr-frac (5%) of the peak; Muon's momentum warms up
  0.85 -> 0.95 over the first 300 steps.
The device batch (--device-batch-size rows of --max-seq-len tokens) is halved before training while
one step of it runs out of GPU memory; gradient accumulation keeps the total batch.

Defaults for the device: CUDA -> bf16 autocast (SM80+), torch.compile, source climbmix;
otherwise fp32, no compile, source stdlib-docs (the offline corpus every machine has) and fewer
validation tokens (--eval-tokens).
--fp8 runs the blocks' matmuls in float8 (fp8.py; SM89+ GPUs such as the H100, or CPU for tests).
SPEEDCHAT_DTYPE may force bfloat16 or float32; float16 is refused (it would need a gradient scaler).

Data: --source names a source or a weighted mixture ("climbmix:0.9,dir:/data/math:0.1": shares of
the tokens, whole documents drawn in turn); --source-schedule changes the mixture at fractions of training (dataset.py).
--init-from base[:tag[:step]] continues pretraining from that model's weights (not its optimizer or
data position) with this run's own horizon, schedule and data; the model must have the same shape.

Checkpoints go to $SPEEDCHAT_BASE_DIR/checkpoints/base/<--model-tag, default d<depth>>/ every
--save-every steps and at the end; --resume continues exactly where the last one left off
(model, optimizer, data position, RNG, loss average).
"""


import argparse
from dataclasses import asdict

import torch

import checkpoint
import dataset
import training
from common import (POSITIVE, POSITIVE_OR_ALL, POSITIVE_RATE, UserError, checked, parse_args, print0,
                    run_main, sum_over_ranks)
from dataloader import DataLoader
from fp8 import convert_to_fp8, fp8_supported
from model import MUON_WEIGHT_DECAY, GPT, config_from_depth, pretraining_recipe

INIT_FROM = checked(str, lambda v: len(v.split(":")) <= 3 and v.split(":")[0] == "base" and
                    (v.count(":") < 2 or v.split(":")[2].isdigit()), "base, base:TAG or base:TAG:STEP")
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "Return a new list containing",
]
WARMUP_STEPS = 40  # Adam's second moments and Muon's momentum fill before the full rate hits the weights
WINDOW_PATTERN = checked(str, lambda v: v and set(v) <= {"S", "L"}, "letters S and L")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain a GPT (the base model). Every size is derived from --depth.")
    training.add_flags(p, device_batch_size=32, eval_every=250, save_every=1000, warmdown_ratio=0.65)
    # the d12-tuned rates (embeddings and lm_head at width 768); pretraining_recipe scales them
    p.set_defaults(embedding_lr=0.3, unembedding_lr=0.008, weight_decay=MUON_WEIGHT_DECAY, final_lr_frac=0.05)
    g = p.add_argument_group("pretraining")
    g.add_argument("--source", type=dataset.mixture_name, default="", help=f"pretraining source: {dataset.SOURCES_HELP} "
                   "('' = climbmix on CUDA, stdlib-docs otherwise)")
    g.add_argument("--source-schedule", type=dataset.parse_schedule, default=None,
                   help="mixtures that change at fractions of training, replacing --source: "
                        "'0:fineweb-edu;0.8:fineweb-edu:0.7,dir:/data/math:0.3', or a file with one FRACTION:MIXTURE a line")
    g.add_argument("--init-from", type=INIT_FROM, default=None,
                   help="base[:tag[:step]]: start from that base model's weights (not its optimizer or data position)")
    g.add_argument("--fp8", action="store_true",
                   help="run the transformer blocks' matmuls (attention and MLP) in float8 with dynamic tensorwise "
                        "scaling (fp8.py; embedding and lm_head stay in the training dtype); needs a GPU of compute "
                        "capability 8.9+ (H100, L4, RTX 4090), or CPU (slow, for tests)")
    g.add_argument("--depth", type=POSITIVE, default=20, help="number of transformer layers: the one complexity dial")
    g.add_argument("--aspect-ratio", type=POSITIVE, default=64, help="model width = depth * aspect ratio")
    g.add_argument("--head-dim", type=POSITIVE, default=128, help="dimension of each attention head")
    g.add_argument("--max-seq-len", type=POSITIVE, default=2048, help="context length in tokens")
    g.add_argument("--window-pattern", type=WINDOW_PATTERN, default="SSSL",
                   help="attention window per layer, tiled over the layers (the last is always L): S = a quarter "
                        "of the context, L = all of it")
    g.add_argument("--target-param-data-ratio", type=POSITIVE_RATE, default=10.5,
                   help="training tokens per scaling parameter (matrices and lm_head) when --num-iterations is -1 "
                        "(10.5: compute-optimal for this recipe; the speedrun trains d24 at 8)")
    g.add_argument("--total-batch-size", type=POSITIVE_OR_ALL, default=-1,
                   help="tokens per optimizer step (-1 = the rule in model.pretraining_recipe, 2^19 at d12)")
    g.add_argument("--batch-lr-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="learning rates x sqrt(total batch / 2^19) (default: on CUDA; off otherwise: at the ~1k-token "
                        "batches a CPU affords it slows learning, the offline preset's bpb 1.80 -> 2.39)")
    g.add_argument("--eval-tokens", type=POSITIVE, default=None,
                   help=f"validation tokens per evaluation (default: {training.default_eval_tokens('cuda')} on "
                        f"CUDA, {training.default_eval_tokens('cpu')} otherwise)")
    g.add_argument("--sample-every", type=POSITIVE_OR_ALL, default=2000,
                   help="print greedy samples every N steps (-1 = only at the end)")
    return parse_args(p, argv)


def lr_multiplier(step, num_iterations, warmdown_ratio=0.65, final_lr_frac=0.05):
    """The lower of a linear warmup over WARMUP_STEPS and the warmdown: linear decay over the last
    warmdown_ratio of the run to final_lr_frac of the peak (a long decay to 5%, not 0, measured
    best at d12-d26 in nanochat's log)."""
    return min((step + 1) / WARMUP_STEPS, training.lr_multiplier(step / num_iterations, warmdown_ratio, final_lr_frac))


def fit_device_batch(run, rows, seq_len):
    """The largest device batch of at most `rows`, halving, whose forward and backward fit in memory:
    tried on dummy tokens before training (the plan's memory figure is an estimate). Every rank takes
    the smallest; gradient accumulation keeps the total batch."""
    while rows > 1 and sum_over_ranks([not step_fits(run, rows, seq_len)], run.device)[0]:
        torch.cuda.empty_cache()
        print0(f"device batch {rows} x {seq_len} tokens: out of memory, trying {rows // 2}")
        rows //= 2
    return rows


def step_fits(run, rows, seq_len):
    x = torch.zeros((rows, seq_len), dtype=torch.long, device=run.device)
    try:
        with run.autocast:
            run.model(x, x).backward()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        run.model.zero_grad(set_to_none=True)


def init_from(run, model, spec):
    """--init-from base[:tag[:step]]: that checkpoint's identity, for the checkpoint and the report; a
    fresh run copies its weights into `model` (a resumed one has its own), refusing a model of another
    shape or tokenizer."""
    _, tag, step = (spec.split(":") + ["", ""])[:3]
    origin = training.source_identity("base", *checkpoint.resolve("base", tag or None, int(step) if step else None))
    if run.resumed is None:
        state, _, meta = checkpoint.load_checkpoint("base", origin["tag"], origin["step"], run.device)
        state, fingerprint = checkpoint.clean_state_dict(state), run.tokenizer.fingerprint()
        shapes = lambda weights: {k: tuple(v.shape) for k, v in weights.items()}  # noqa: E731
        if shapes(state) != shapes(model.state_dict()) or meta.get("tokenizer", fingerprint) != fingerprint:
            mine, theirs = asdict(model.config), meta["model_config"]
            raise UserError(f"--init-from {spec}: {training.describe(origin)} does not fit this run (its model: "
                            f"{shape(theirs)}, tokenizer {meta.get('tokenizer', fingerprint)}; this run: {shape(mine)}, "
                            f"tokenizer {fingerprint}): pass its --depth, --aspect-ratio, --head-dim, with its tokenizer")
        model.load_state_dict(state)
    return origin


def data_stages(run, args):
    """[(fraction of training, mixture), ...] from --source-schedule or --source, each source ready."""
    stages = args.source_schedule or [(0.0, args.source or ("climbmix" if run.device.type == "cuda" else "stdlib-docs"))]
    if run.master:
        for _, mixture in stages:  # builds stdlib-docs on first use; clear error if shards are missing
            dataset.ensure_source(mixture)
    if run.ddp:
        torch.distributed.barrier()
    return stages


def data_report(batches, stages, origin, device) -> dict:
    """The report's lines on the data: the schedule, the starting point, tokens and epochs of each source."""
    data = batches.source_report(device)  # summed over ranks
    print0("data: " + ", ".join(f"{name} {d['tokens']:,} tokens ({d['epochs']:.3f} epochs)" for name, d in data.items()))
    return dict(**({"source_schedule": spelled(stages)} if len(stages) > 1 else {}),
                init_from=training.describe(origin) if origin else "none (from scratch)",
                tokens={name: d["tokens"] for name, d in data.items()}, epochs={name: d["epochs"] for name, d in data.items()})


def spelled(stages):  # a schedule as --source-schedule spells it; one stage: its mixture
    return ";".join(f"{start:g}:{mixture}" for start, mixture in stages) if len(stages) > 1 else stages[0][1]


def shape(config):
    return (f"{config['n_layer']} layers of width {config['n_embd']}, {config['n_head']} heads "
            f"({config['n_kv_head']} kv), vocab {config['vocab_size']}")


def main(argv=None):
    args = get_args(argv)
    with training.Run(args, "base", args.model_tag or f"d{args.depth}") as run:
        return train(run, args)


def train(run, args):
    device, T = run.device, args.max_seq_len
    if args.fp8 and not fp8_supported(device)[0]:
        raise UserError(f"--fp8: {fp8_supported(device)[1]}: train without --fp8")
    stages = data_stages(run, args)
    source, schedule = stages[-1][1], [list(stage) for stage in stages] if len(stages) > 1 else None

    # the model: every size from --depth
    config = config_from_depth(args.depth, run.tokenizer.get_vocab_size(), sequence_len=T,
                               aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, window_pattern=args.window_pattern)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    origin = init_from(run, model, args.init_from) if args.init_from else None
    run.check_resumed(model_config=asdict(config), source=source, source_schedule=schedule, init_from=origin)
    if args.fp8:  # before torch.compile; the parameters stay the same objects
        print0(f"fp8: {convert_to_fp8(model)} linear layers of the blocks compute in float8")
    num_params = model.num_params()["total"]
    scale_lr = args.batch_lr_scale if args.batch_lr_scale is not None else device.type == "cuda"
    recipe = pretraining_recipe(model, args.target_param_data_ratio, args.total_batch_size,
                                args.device_batch_size * T * run.world_size, args.weight_decay, scale_lr)
    total_batch_size = recipe["total_batch_size"]
    num_iterations = args.num_iterations if args.num_iterations > 0 else recipe["num_iterations"]
    rows = total_batch_size // (T * run.world_size)  # each rank's rows per step, whatever the device batch
    batches = DataLoader(run.tokenizer, args.device_batch_size, T, split="train", device=device, rank=run.rank,
                         world_size=run.world_size,
                         source=[(round(start * num_iterations) * rows, mixture) for start, mixture in stages])
    run.prepare(model, batches, lr_scale=recipe["lr_scale"], weight_decay=recipe["weight_decay"])
    B = batches.B = fit_device_batch(run, args.device_batch_size, T)  # (the loader reads B at its first batch)
    grad_accum = total_batch_size // (B * T * run.world_size)
    tokens = total_batch_size * num_iterations
    print0(f"model {run.tag}: {asdict(config)}")
    print0(f"parameters: {num_params:,} | FLOPs/token: {run.flops_per_token:.3e} | source: {spelled(stages)}"
           + (f" | from {training.describe(origin)}" if origin else ""))
    print0(f"batch: {total_batch_size:,} tokens/step = {B} x {T} x {run.world_size} processes x {grad_accum} "
           f"accumulation | steps: {num_iterations:,} | tokens: {tokens:,} ({tokens / num_params:.1f}/param) | "
           f"learning rates x {recipe['lr_scale']:.3f} | Muon weight decay {recipe['weight_decay']:.4f}")

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
    evaluate = training.bpb_evaluator(run, lambda: DataLoader(run.tokenizer, B, T, split="val", source=source,
                                                              device=device, rank=run.rank, world_size=run.world_size),
                                      eval_steps)

    def sample():
        for prompt in SAMPLE_PROMPTS:
            print0(f"sample: {training.sample_greedy(model, run.tokenizer, prompt, 16, device, T)!r}")

    run.train(train_step, evaluate, sample=sample, sample_every=args.sample_every,
              schedule=lambda step, progress: lr_multiplier(step, num_iterations, args.warmdown_ratio,
                                                            args.final_lr_frac),
              progress=lambda step: step / num_iterations, momentum=training.muon_momentum,
              meta=dict(source=source, source_schedule=schedule, init_from=origin, total_batch_size=total_batch_size, device_batch_size=B,
                        grad_accum_steps=grad_accum, num_iterations=num_iterations, eval_steps=eval_steps))
    batches.close()
    numbers = dict(depth=config.n_layer, model_dim=config.n_embd, heads=config.n_head, kv_heads=config.n_kv_head,
                   window_pattern=config.window_pattern, sequence_length=T, vocab_size=config.vocab_size,
                   total_batch_size=total_batch_size, device_batch_size=B, grad_accum_steps=grad_accum,
                   lr_scale=recipe["lr_scale"], muon_weight_decay=recipe["weight_decay"], num_iterations=num_iterations,
                   training_tokens=tokens, tokens_per_scaling_parameter=tokens / model.num_params()["scaling"],
                   total_training_flops=run.flops_per_token * tokens, fp8="on" if args.fp8 else "off", source=source,
                   **data_report(batches, stages, origin, device))
    if device.type == "cuda":
        numbers["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return run.report("base-train", "Base model training", numbers)


if __name__ == "__main__":
    run_main(main)
