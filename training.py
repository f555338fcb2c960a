"""The one training loop. Each training stage (base_train, mid_train, chat_sft, chat_rl) is a short
script that says what differs (its data, defaults, loss and evaluation) and hands the rest to a Run:

    with Run(args, "mid", tag) as run:      # device, dtype, tokenizer; --resume: the checkpoint to continue
        run.prepare(model, batches)         # optimizers, compile; a resume restores model, optimizers,
                                            # data position, RNG and loop state exactly
        run.train(train_step, evaluate, schedule, progress)  # eval / sample / save, step line, curve
        run.report("mid-train", "Mid-training", {...})       # the report section

train_step() does one optimizer step's forwards and backwards and returns (loss, tokens): this
rank's loss, whose mean over ranks is the step's, and the tokens trained on (all ranks). A stage
with another loss (policy gradient on sampled answers, say) supplies another train_step.
progress(step) runs 0 -> 1 (1 = done, the same on every rank); schedule(step, progress) gives
the learning-rate multiplier. Checkpoints go to $SPEEDCHAT_BASE_DIR/checkpoints/<stage>/<tag>/;
a fresh run replaces the checkpoints of an earlier run there at its first save.
"""

import argparse
import gc
import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist

import checkpoint
from tasks.mixtures import data_paths, mixture, resolve_preset
from tokenizer import get_token_bytes, get_tokenizer
from common import (FRACTION, POSITIVE, POSITIVE_OR_ALL, POSITIVE_RATE, RATE, STEP, UserError, compute_cleanup,
                    compute_init, distributed, format_seconds, get_base_dir, get_rng_state, global_mean, init_wandb,
                    peak_flops, print0, set_rng_state, sum_over_ranks, training_dtype)

D20_TOTAL_BATCH_SIZE = 524288  # tokens per step for d20-scale runs (2^19)
EMA_BETA = 0.9  # smoothing of the logged training loss


# ---------------------------------------------------------------------------
# Flags: the ones every trainer shares


def add_flags(p, *, device_batch_size, eval_every, save_every, warmdown_ratio):
    """The flags of every training stage; each stage adds its own (data, horizon, batch)."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="", help="cuda | cpu | mps ('' = autodetect)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: the stage's choice on CUDA, off otherwise)")
    g.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--model-tag", default="", help="checkpoint tag to write ('' = d<depth> for base_train, the "
                   "latest tag of --source for the chat stages)")
    g.add_argument("--num-iterations", type=POSITIVE_OR_ALL, default=-1, help="number of optimizer steps (-1 = derived)")
    g.add_argument("--device-batch-size", type=POSITIVE, default=device_batch_size,
                   help="rows per process per micro-step")
    g = p.add_argument_group("optimization (a learning rate of 0 freezes those weights)")
    g.add_argument("--embedding-lr", type=RATE, default=0.2, help="AdamW learning rate of the token embedding")
    g.add_argument("--unembedding-lr", type=RATE, default=0.004, help="AdamW learning rate of the lm_head")
    g.add_argument("--matrix-lr", type=RATE, default=0.02, help="Muon learning rate of the transformer matrices")
    g.add_argument("--weight-decay", type=RATE, default=0.0,
                   help="Muon's weight decay (the AdamW groups keep their own small fixed decay)")
    g.add_argument("--warmdown-ratio", type=FRACTION, default=warmdown_ratio,
                   help="fraction of training over which the lr decays linearly at the end")
    g.add_argument("--final-lr-frac", type=FRACTION, default=0.0, help="lr at the end, as a fraction of the peak")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=POSITIVE_OR_ALL, default=eval_every,
                   help="validation bits-per-byte every N steps (-1 = only at the end)")
    g.add_argument("--log-every", type=POSITIVE, default=1, help="print a step line every N steps (each costs a GPU sync)")
    g.add_argument("--save-every", type=POSITIVE_OR_ALL, default=save_every,
                   help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--keep-last", type=POSITIVE_OR_ALL, default=2, help="keep only the newest K checkpoints (-1 = all)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this stage and tag")
    g.add_argument("--resume-step", type=STEP, default=-1, help="with --resume: the step to continue from (-1 = latest)")


def add_chat_flags(p, *, source, init_lr_frac, sources=("base", "mid")):
    """The flags of the stages that start from an earlier stage's checkpoint (mid_train, chat_sft, chat_rl)."""
    g = p.add_argument_group("start and horizon")
    g.add_argument("--source", default=source, choices=sources, help="which stage's checkpoint to start from")
    g.add_argument("--step", type=STEP, default=-1, help="step of the --source checkpoint (-1 = latest)")
    g.add_argument("--max-seq-len", type=POSITIVE, default=None, help="tokens per row (default: the model's context)")
    g.add_argument("--num-epochs", type=POSITIVE_RATE, default=1.0, help="passes over the data (or --num-iterations)")
    g.add_argument("--init-lr-frac", type=POSITIVE_RATE, default=init_lr_frac, help="peak lrs as a fraction of the flags'")


def default_eval_tokens(device_type):
    """Validation tokens per evaluation when --eval-tokens is not given."""
    # off CUDA a few batches: the d20 amount would be minutes of silent validation on a CPU
    return 20 * D20_TOTAL_BATCH_SIZE if device_type == "cuda" else 32768


def derive_batch(device_batch_size, seq_len, total_batch_size, world_size):
    """(total_batch_size, grad_accum_steps): total_batch_size <= 0 means one micro-batch per process."""
    tokens_per_micro = device_batch_size * seq_len * world_size
    total = total_batch_size if total_batch_size > 0 else tokens_per_micro
    if total % tokens_per_micro:
        raise UserError(f"--total-batch-size {total} is not a multiple of rows x seq len x processes = {tokens_per_micro}")
    return total, total // tokens_per_micro


# ---------------------------------------------------------------------------
# Schedules, and the evaluation pieces (base_eval uses them too)


def lr_multiplier(progress, warmdown_ratio, final_lr_frac=0.0):
    """Constant, then linear decay to final_lr_frac over the last warmdown_ratio of training
    (progress runs 0 -> 1; warmdown_ratio 1 = linear decay from the start)."""
    if warmdown_ratio <= 0:
        return 1.0
    frac = min(1.0, max(0.0, (1 - progress) / warmdown_ratio))  # 1 until the warmdown, then -> 0
    return frac + (1 - frac) * final_lr_frac


def muon_momentum(step, warmup_steps=300):
    """Muon's momentum warms up 0.85 -> 0.95 over the first 300 steps."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def is_muon(opt):
    return "muon" in type(opt).__name__.lower()


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Bits per byte over `steps` batches from `batches`: the targets' losses (nats) / (ln 2 x their
    UTF-8 bytes). Special tokens (0 bytes) and masked targets (-1) count in neither sum, so the number
    does not depend on the tokenizer. Under torchrun each rank passes its own batches, all get the total."""
    device = token_bytes.device
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        loss = model(x, y, loss_reduction="none").reshape(-1).to(acc_dtype)
        y = y.reshape(-1)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        total_nats += torch.where(nbytes > 0, loss, 0.0).sum()
        total_bytes += nbytes.sum()
    if distributed():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    assert total_bytes.item() > 0, "bits per byte of batches without a scorable token"
    return total_nats.item() / (math.log(2) * total_bytes.item())


@torch.no_grad()
def sample_greedy(model, tokenizer, prompt, max_tokens, device, context_len):
    """Greedy continuation of `prompt`: the plain loop, no KV cache (the engine does it fast)."""
    ids = tokenizer.encode(prompt, prepend="<|bos|>")
    start = len(ids)
    for _ in range(max_tokens):
        next_id = int(model(torch.tensor([ids[-context_len:]], device=device))[0, -1].argmax())
        if next_id == tokenizer.get_bos_token_id():
            break
        ids.append(next_id)
    return prompt + tokenizer.decode(ids[start:])


# ---------------------------------------------------------------------------
# The chat stages (mid_train, chat_sft): from an earlier stage's checkpoint, on conversations


def chat_tag(args, stage):
    """--model-tag, else the latest tag of this stage (--resume) or of --source (or resolve's error)."""
    if args.model_tag:
        return args.model_tag
    return checkpoint.find_last_tag(stage) if args.resume else checkpoint.resolve(args.source)[0]


def source_identity(stage, tag, step):
    """The checkpoint a run starts from; its meta's hash tells a retrained one from the one it replaced."""
    meta = checkpoint._meta_path(checkpoint.checkpoint_dir(stage, tag), step).read_bytes()
    return {"stage": stage, "tag": tag, "step": step, "fingerprint": hashlib.sha256(meta).hexdigest()[:16]}


def chat_start(run, args, tasks):
    """(model, start, train_set, val_set) of a chat stage; `tasks(preset, split, paths)` lists its tasks.
    A fresh run loads the --source checkpoint (--model-tag, --step); a resumed run rebuilds its own
    model while its source is still the checkpoint a fresh run would load: `start` (that checkpoint,
    the preset, the row length) goes into every checkpoint, and a resumed run must match it."""
    source = source_identity(args.source, *checkpoint.resolve(args.source, args.model_tag or None,
                                                               args.step if args.step >= 0 else None))
    if run.resumed is None:
        model, _, _ = checkpoint.load_model(args.source, run.device, source["tag"], source["step"], phase="train")
    else:
        model = checkpoint.build_model(run.resumed, run.device)
    preset = resolve_preset(args.preset, run.device.type)
    start = {"source_checkpoint": source, "preset": preset, "max_seq_len": args.max_seq_len or model.config.sequence_len}
    run.check_resumed(**start)
    paths = data_paths(args)
    train_set, val_set = (mixture(tasks(preset, split, paths), split) for split in ("train", "val"))
    print0(f"{run.stage} {run.tag} from {describe(source)} | preset {preset} | conversations: {len(train_set):,} "
           f"training, {len(val_set):,} validation")
    return model, start, train_set, val_set


def describe(source):  # a source checkpoint, for people
    return f"{source['stage']} {source['tag']} step {source['step']} ({source['fingerprint']})"


def bpb_evaluator(run, make_batches, steps):
    """evaluate() for Run.train: bits per byte over `steps` batches of a fresh make_batches()."""
    def evaluate():
        batches = make_batches()
        bpb = evaluate_bpb(run.model, batches, steps, run.token_bytes)
        batches.close()
        return bpb
    return evaluate


def masked_step(run, batches, grad_accum):
    """train_step for rows whose targets are -1 where nothing is learned: the loss is the mean
    over the supervised tokens of the whole step on all ranks, however they fall into micro-batches
    and ranks; a micro-batch without any adds nothing (0, never the NaN of 0/0)."""
    def train_step():
        micro = [next(batches) for _ in range(grad_accum)]
        supervised = sum_over_ranks([sum(int((y >= 0).sum()) for _, y in micro)], run.device)[0]
        scale = run.world_size / max(supervised, 1)  # x world_size: the optimizers average gradients over ranks
        loss_sum = 0
        for x, y in micro:
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            with run.autocast:
                loss = run.model(x, y, loss_reduction="sum")
            (loss * scale).backward()
            loss_sum = loss_sum + loss.detach()
        return loss_sum * scale, sum(x.numel() for x, _ in micro) * run.world_size
    return train_step


def chat_progress(args, batches, num_conversations, device):
    """progress(step): --num-iterations steps, else --num-epochs passes (counted on all ranks: all stop together)."""
    if args.num_iterations > 0:
        return lambda step: step / args.num_iterations
    return lambda step: sum_over_ranks([batches.taken], device)[0] / (num_conversations * args.num_epochs)


# ---------------------------------------------------------------------------


class Run:
    """One run of a training stage: device and dtype, the model and its optimizers, and the loop state
    a checkpoint saves (step, smoothed loss, timing, curve). `with Run(...)` tears the process group down."""

    def __init__(self, args, stage, tag):
        self.args, self.stage, self.tag = args, stage, tag
        where = checkpoint.checkpoint_dir(stage, tag) if tag else get_base_dir() / "checkpoints" / stage
        if args.resume and (not tag or checkpoint.find_last_step(where) is None):
            raise UserError(f"--resume: no {stage} checkpoint under {where}: drop --resume (or check --model-tag)")
        # one trainer per checkpoint folder, taken before anything below reads or clears it
        self.ckpt_dir = checkpoint.acquire_lock(stage, tag)
        self.ddp, self.rank, _, self.world_size, self.device = compute_init(args.device, seed=args.seed)
        self._start()

    def _start(self):
        args, self.master, self.dtype = self.args, self.rank == 0, training_dtype(self.device.type)
        self.autocast = (torch.amp.autocast(device_type=self.device.type, dtype=self.dtype)
                         if self.dtype != torch.float32 else nullcontext())
        self.step, self.smooth_loss = 0, torch.zeros((), device=self.device)
        self.training_time, self.timed_tokens, self.seconds = 0.0, 0, 0.0  # seconds: the stage's wall time
        self.val_bpb, self.min_val_bpb = None, float("inf")
        self.curve = {"step": [], "loss": [], "val_step": [], "val_bpb": []}
        self.resumed, self.stale = None, False
        self.tokenizer, self.token_bytes = get_tokenizer(), get_token_bytes(self.device)
        if args.resume:
            step = args.resume_step if args.resume_step >= 0 else None
            self.model_state, self.optim_states, self.resumed = checkpoint.load_checkpoint(
                self.stage, self.tag, step, self.device, self.rank, load_optimizer=True)
            self.check_resumed(world_size=self.world_size)
        elif checkpoint.find_last_step(self.ckpt_dir) is not None:
            self.stale = True
            print0(f"warning: {self.ckpt_dir} holds checkpoints of an earlier run; they are replaced at the first "
                   f"save (pass --resume to continue that run instead)")

    def __enter__(self):
        return self

    def __exit__(self, failure, *_):
        if failure is None:  # a failing rank leaves at once (common.run_main): a process-group teardown
            compute_cleanup()  # would wait for the ranks that wait for it in a collective

    def check_resumed(self, **expected):
        """--resume continues a run only with the values it was started with (model, data, processes)."""
        for key, value in expected.items():
            saved = value if self.resumed is None else self.resumed.get(key)
            if saved != value:
                raise UserError(f"--resume: {self.ckpt_dir} was trained with {key} {saved!r}, not {value!r}: "
                                f"resume with its flags, or drop --resume to start over")

    def prepare(self, model, batches, lr_scale=1.0, weight_decay=None, compile_default=True, dynamic=False):
        """Optimizers (peak learning rates = the flags' x lr_scale, Muon's decay --weight-decay unless
        given) and torch.compile for `model`; a resumed run restores the model, optimizers, data position
        (`batches`, which must not have made a batch yet), RNG and loop state."""
        args = self.args
        self.orig_model, self.batches = model.train(), batches
        self.optimizers = model.setup_optimizers(embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
                                                 matrix_lr=args.matrix_lr,
                                                 weight_decay=args.weight_decay if weight_decay is None else weight_decay)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"] * lr_scale
        self.compiled = args.compile if args.compile is not None else (self.device.type == "cuda" and compile_default)
        # rows of one shape compile static; rows of varying width (dynamic=None) let torch decide
        self.model = torch.compile(model, dynamic=dynamic) if self.compiled else model
        self.flops_per_token, self.num_params = model.estimate_flops(), model.num_params()["total"]
        if self.resumed is None:
            return
        model.load_state_dict(self.model_state)
        for opt, state in zip(self.optimizers, self.optim_states, strict=True):
            opt.load_state_dict(state)  # with each group's initial_lr
        del self.model_state, self.optim_states
        batches.load_state_dict(self.resumed["rank_state"]["data"])
        set_rng_state(self.resumed["rank_state"]["rng"], self.device)
        loop = self.resumed["loop_state"]
        self.step, self.val_bpb, self.curve = self.resumed["step"], self.resumed["val_bpb"], loop["curve"]
        self.smooth_loss = torch.tensor(loop["smooth_loss"], dtype=torch.float32, device=self.device)
        self.training_time, self.timed_tokens = loop["training_time"], loop["timed_tokens"]
        self.min_val_bpb, self.seconds = loop["min_val_bpb"], loop["seconds"]
        print0(f"resumed from {self.ckpt_dir} at step {self.step}")

    def train(self, train_step, evaluate, schedule, progress, momentum=None, sample=None, sample_every=-1, meta=None):
        """Train until progress(step) >= 1. evaluate() -> validation bpb, and sample() (prints), run
        under autocast with the model in eval mode; momentum(step) sets Muon's momentum; `meta` (what
        the stage derived: data, batch, horizon) joins each checkpoint's meta."""
        args, start = self.args, self.step
        self.meta = dict(meta or {}, model_config=asdict(self.orig_model.config), world_size=self.world_size,
                         tokenizer=self.tokenizer.fingerprint())
        self.config = dict(vars(args), model_tag=self.tag, device=self.device.type, dtype=str(self.dtype),
                           compile=self.compiled, world_size=self.world_size)
        self.wandb = init_wandb(args.run, "speedchat", self.config, self.master)
        self.peak = peak_flops(self.device, self.dtype)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t_start, window, lrm = time.time() - self.seconds, None, None  # window: [time, step, tokens] since a log
        while True:
            step, done_frac = self.step, progress(self.step)  # the state here: `step` optimizer steps done
            done = done_frac >= 1
            if step > start and (step % args.log_every == 0 or done):
                sync()  # the only GPU sync of a training step
                self._log(window, lrm, done_frac, timed=step > start + 10 or not self.compiled)
            do_eval = (done or every(args.eval_every, step)) and self.curve["val_step"][-1:] != [step]
            do_sample = sample is not None and self.master and (done or (step > 0 and every(sample_every, step)))
            do_save = step > start and (done or every(args.save_every, step))
            if do_eval:
                self._evaluate(evaluate)
            if do_sample:
                self.orig_model.eval()
                with self.autocast:
                    sample()
                self.orig_model.train()
            if do_save:
                self.seconds = time.time() - t_start
                self._save()
            if done:
                break
            if step == start or do_eval or do_sample or do_save:  # keep their time out of the step timing
                sync()
                window = [time.perf_counter(), step, 0]
            lrm = schedule(step, done_frac)
            loss, tokens = train_step()
            for opt in self.optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
                    if momentum is not None and is_muon(opt):
                        group["momentum"] = momentum(step)
                opt.step()
            self.model.zero_grad(set_to_none=True)
            self.smooth_loss = EMA_BETA * self.smooth_loss + (1 - EMA_BETA) * loss
            self.step += 1
            window[2] += tokens
            if self.step == start + 1:  # what exists now lives all run: the collector skips it from here
                gc.collect()            # on (full collections of it paused steps for ~500 ms in nanochat)
                gc.freeze()
        gc.unfreeze()
        self.seconds = time.time() - t_start

    def loss(self):
        """The smoothed training loss, debiased, averaged over ranks."""
        return global_mean(self.smooth_loss).item() / (1 - EMA_BETA ** self.step)

    def _log(self, window, lrm, progress, timed):
        """The step line, from `window` = [time, step, tokens] of the steps since the last one (reset here)."""
        loss, now = self.loss(), time.perf_counter()
        if not math.isfinite(loss):  # the same number on every rank: they all stop here
            raise UserError(f"the loss became {loss} at step {self.step}: lower the learning rates")
        seconds, steps, tokens = now - window[0], self.step - window[1], window[2]
        if timed:  # the first compiled steps are mostly compiling
            self.training_time += seconds
            self.timed_tokens += tokens
        tok_per_sec, dt = tokens / seconds, seconds / steps
        mfu = f"{100 * self.flops_per_token * tok_per_sec / (self.peak * self.world_size):.2f}%" if self.peak else "n/a"
        eta = dt * (self.step / progress - self.step) if progress > 0 else 0.0
        print0(f"step {self.step:05d} ({100 * min(progress, 1.0):.1f}%) | loss {loss:.4f} | lrm {lrm:.2f} | "
               f"dt {dt * 1000:.1f}ms | tok/s {tok_per_sec:,.0f} | mfu {mfu} | "
               f"elapsed {format_seconds(self.training_time)} | eta {format_seconds(eta)}")
        self.curve["step"].append(self.step)
        self.curve["loss"].append(loss)
        self.wandb.log({"step": self.step, "train/loss": loss, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec})
        window[:] = [now, self.step, 0]

    def _evaluate(self, evaluate):
        self.model.eval()
        with self.autocast:
            self.val_bpb = evaluate()
        self.model.train()
        self.min_val_bpb = min(self.min_val_bpb, self.val_bpb)
        self.curve["val_step"].append(self.step)
        self.curve["val_bpb"].append(self.val_bpb)
        print0(f"step {self.step:05d} | validation bpb: {self.val_bpb:.4f}")
        self.wandb.log({"step": self.step, "val/bpb": self.val_bpb})

    def _save(self):
        if self.stale:  # a fresh run: the earlier run's checkpoints go before this one writes any
            if self.master:
                checkpoint.clear_checkpoints(self.ckpt_dir)
            if self.ddp:
                dist.barrier()
            self.stale = False
        loop = {"smooth_loss": self.smooth_loss.item(), "training_time": self.training_time, "seconds": self.seconds,
                "timed_tokens": self.timed_tokens, "min_val_bpb": self.min_val_bpb, "curve": self.curve}
        meta = dict(self.meta, train_config=self.config, step=self.step, loss=self.loss(), val_bpb=self.val_bpb,
                    loop_state=loop)
        rank_state = {"data": self.batches.state_dict(), "rng": get_rng_state(self.device)}
        checkpoint.save_checkpoint(self.stage, self.tag, self.step, self.orig_model, self.optimizers, meta,
                                   rank=self.rank, rank_state=rank_state,
                                   keep_last=self.args.keep_last if self.args.keep_last > 0 else None)

    def report(self, section, title, numbers):
        """The stage's report section: `numbers` (what the stage adds), then what every stage reports."""
        mfu = (self.flops_per_token * self.timed_tokens / (self.training_time * self.peak * self.world_size)
               if self.peak and self.training_time else None)
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        if self.master:
            import report

            report.write_section(section, title, dict(
                **numbers, parameters=self.num_params, flops_per_token=self.flops_per_token,
                steps=self.step, training_seconds=self.training_time, stage_seconds=self.seconds, mfu=mfu,
                device=f"{self.world_size} x {device}", dtype=str(self.dtype).removeprefix("torch."),
                min_val_bpb=self.min_val_bpb, final_val_bpb=self.val_bpb, curve=self.curve, tag=self.tag))
        print0(f"done: {self.step} steps in {format_seconds(self.training_time)} | "
               f"min validation bpb {self.min_val_bpb:.4f}")
        self.wandb.finish()
        return dict(step=self.step, val_bpb=self.val_bpb, min_val_bpb=self.min_val_bpb, curve=self.curve, tag=self.tag)


def every(n, step):
    return n > 0 and step % n == 0
