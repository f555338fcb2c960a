"""Mid-training: teach the base model the chat format, multiple choice and tool use.

    python -m mid_train                                                   # one GPU (or CPU, slowly)
    torchrun --standalone --nproc_per_node=8 -m mid_train -- --device-batch-size 32

It starts from the latest base checkpoint (--model-tag / --step pick another), keeps its model
config, and trains on a mixture of conversations chosen by --preset:
  full     SmolTalk, MMLU auxiliary_train, GSM8K (calculator tool calls), identity (twice),
           SimpleSpelling and SpellingBee; downloaded once from the Hugging Face Hub, or read
           from local copies given with --smoltalk-path, --mmlu-path, --gsm8k-path
  offline  only generated tasks: identity, spelling (bundled word list or --words-path) and
           arithmetic with the calculator tool; needs no network
(default: full on CUDA, offline otherwise).

Each conversation is rendered by the tokenizer with its loss mask; rendered conversations are
packed into full rows of --max-seq-len + 1 tokens the way the pretraining loader packs
documents (each starts with <|bos|>; best fit from a buffer, the last one cropped to fill the
row). Targets are -1 wherever the mask is 0 (user turns, tool outputs), so the loss is the
assistant's tokens only, averaged over every supervised token of the optimizer step.

The learning rate is --init-lr-frac times base_train's rates, constant, then decays linearly to
--final-lr-frac over the last --warmdown-ratio of training. Training runs for --num-epochs over
the mixture, or exactly --num-iterations steps. Checkpoints go to
$SPEEDCHAT_BASE_DIR/checkpoints/mid/<tag>/; --resume continues where the last one left off
(and refuses when the base checkpoint it was started from has been retrained since).

This file also holds what chat_sft.py shares with it: the task presets and data-path flags,
the conversation batching, and the training loop (train_chat).
"""

import argparse
import hashlib
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
from base_train import (D20_TOTAL_BATCH_SIZE, EVAL_TOKENS_HELP, check_finite_loss, check_training_args,
                        default_eval_tokens, derive_batch, evaluate_bpb, get_rng_state, is_muon, muon_momentum,
                        peak_flops, set_rng_state, show_defaults, step_line, training_dtype)
from common import (UserError, compute_cleanup, compute_init, format_seconds, get_base_dir,
                    init_wandb, print0, run_main)

PRESETS = ("full", "offline")
# local copies of the task datasets: flag -> (environment variable that sets its default, help)
DATA_FLAGS = {
    "smoltalk_path": ("SPEEDCHAT_SMOLTALK_PATH", "local SmolTalk conversations (.json/.jsonl/.parquet, file or folder)"),
    "mmlu_path": ("SPEEDCHAT_MMLU_PATH", "local MMLU: Hendrycks CSVs (file or folder) or the Hub parquet; "
                  "mid_train reads auxiliary_train from it, chat_eval the test questions"),
    "gsm8k_path": ("SPEEDCHAT_GSM8K_PATH", "local GSM8K jsonl (question, answer): the train split for training, "
                   "the test split for chat_eval"),
    "arc_path": ("SPEEDCHAT_ARC_PATH", "folder with the ARC jsonl files (e.g. ARC-Easy-Train.jsonl, "
                 "ARC-Challenge-Test.jsonl) or ARC-Easy/ARC-Challenge subfolders of Hub parquet"),
    "humaneval_path": ("SPEEDCHAT_HUMANEVAL_PATH", "local HumanEval.jsonl(.gz)"),
    "words_path": ("SPEEDCHAT_WORDS_PATH", "word list for the spelling tasks (.txt or .zip; default: the bundled one)"),
    "identity_path": ("SPEEDCHAT_IDENTITY_PATH", "identity conversations jsonl (default: tasks/data/identity.jsonl)"),
}


# ---------------------------------------------------------------------------
# Flags shared by mid_train and chat_sft


def add_data_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--preset", default="", choices=("",) + PRESETS, metavar="{full,offline}",
                   help="task mixture: full (real datasets, downloads) | offline (generated tasks only, no network) "
                        "('' = full on CUDA, offline otherwise)")
    for name, (env, text) in DATA_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), default=os.environ.get(env) or None, help=f"{text} [env {env}]")
    return g


def add_training_flags(p, *, source, device_batch_size, eval_every, save_every, init_lr_frac, warmdown_ratio):
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="", help="cuda | cpu | mps ('' = autodetect)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for mid_train on CUDA, off otherwise)")
    g.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g = p.add_argument_group("model")
    g.add_argument("--source", default=source, choices=("base", "mid"), help="which stage's checkpoint to start from")
    g.add_argument("--model-tag", default="", help="checkpoint tag to start from and to write ('' = latest of --source)")
    g.add_argument("--step", type=int, default=-1, help="step of the --source checkpoint (-1 = latest)")
    g.add_argument("--max-seq-len", type=int, default=0, help="tokens per row (0 = the model's context length)")
    g = p.add_argument_group("horizon")
    g.add_argument("--num-epochs", type=float, default=1.0, help="passes over the training mixture")
    g.add_argument("--num-iterations", type=int, default=-1, help="exact number of optimizer steps (overrides --num-epochs)")
    g = p.add_argument_group("batch")
    g.add_argument("--device-batch-size", type=int, default=device_batch_size, help="rows per process per micro-step")
    g = p.add_argument_group("optimization")
    g.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW learning rate of the token embedding")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW learning rate of the lm_head")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate of the transformer matrices")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    g.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="peak learning rates as a fraction of the above")
    g.add_argument("--warmdown-ratio", type=float, default=warmdown_ratio,
                   help="fraction of training over which the lr decays linearly at the end")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="lr at the end, as a fraction of the peak")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=eval_every, help="validation bits-per-byte every N steps (-1 = only at the end)")
    g.add_argument("--log-every", type=int, default=1, help="print a step line every N steps")
    g.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--keep-last", type=int, default=2, help="keep only the newest K checkpoints (-1 = keep all)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this stage and tag")
    g.add_argument("--resume-step", type=int, default=-1, help="with --resume: the step to continue from (-1 = latest)")


def check_args(args):
    check_training_args(args)  # the checks shared with base_train
    if args.max_seq_len < 0:
        raise UserError(f"--max-seq-len must be positive (or 0 for the model's), got {args.max_seq_len}")
    if args.num_iterations <= 0 and args.num_epochs <= 0:
        raise UserError("no training horizon: give --num-epochs > 0 or --num-iterations > 0")
    if not args.init_lr_frac > 0:  # 0 would train nothing
        raise UserError(f"--init-lr-frac must be positive, got {args.init_lr_frac}")
    return args


def resolve_preset(preset, device_type):
    return preset or ("full" if device_type == "cuda" else "offline")


# ---------------------------------------------------------------------------
# Task mixtures


def mid_tasks(preset, split, paths):
    """The tasks of the mid-training mixture for `split` ("train" or "val"). A dataset read from a
    local path (its training data) is left out of the validation mixture."""
    from tasks.arithmetic import Arithmetic
    from tasks.identity import Identity
    from tasks.spelling import SimpleSpelling, SpellingBee

    words = paths.get("words_path")
    if preset == "offline":
        if split == "train":
            identity = Identity(path=paths.get("identity_path"))
            return [identity] * 4 + [SimpleSpelling(size=3000, split="train", words_path=words),
                                     SpellingBee(size=3000, split="train", words_path=words),
                                     Arithmetic(size=3000, split="train")]
        return offline_val_tasks(words)
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk

    if split == "train":
        identity = Identity(path=paths.get("identity_path"))
        return [SmolTalk("train", path=paths.get("smoltalk_path")),
                MMLU("auxiliary_train", "train", path=paths.get("mmlu_path")),
                GSM8K("main", "train", path=paths.get("gsm8k_path")),
                identity, identity,
                SimpleSpelling(size=200_000, split="train", words_path=words),
                SpellingBee(size=80_000, split="train", words_path=words)]
    val = []
    if not paths.get("smoltalk_path"):
        val.append(SmolTalk("test"))
    if not paths.get("mmlu_path"):
        val.append(MMLU("all", "test", stop=5200))
    if not paths.get("gsm8k_path"):
        val.append(GSM8K("main", "test", stop=420))
    return val or offline_val_tasks(words)


def offline_val_tasks(words_path=None):
    from tasks.arithmetic import Arithmetic
    from tasks.spelling import SimpleSpelling, SpellingBee

    return [SimpleSpelling(size=200, split="test", words_path=words_path),
            SpellingBee(size=200, split="test", words_path=words_path),
            Arithmetic(size=200, split="test")]


def arc_path(path, subset, split):
    """The file (or Hub-layout folder) of one ARC subset and split inside --arc-path, e.g.
    ARC-Easy-Test.jsonl; None when no path was given."""
    if not path:
        return None
    path = Path(path).expanduser()
    names = {f"{subset}-{split}".lower()} | ({f"{subset}-dev".lower()} if split == "validation" else set())
    if path.is_file():
        if any(path.name.lower().startswith(n) for n in names):
            return path
        raise UserError(f"--arc-path {path} is a file but not {subset}-{split}: pass the folder that holds "
                        f"the ARC files (e.g. ARC-Easy-Test.jsonl)")
    if not path.is_dir():
        raise UserError(f"--arc-path {path} does not exist")
    for f in sorted(path.rglob("*")):
        if f.is_file() and any(f.name.lower().startswith(n) for n in names) and \
                f.name.lower().endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")):
            return f
    if (path / subset / split).is_dir():
        return path / subset / split
    raise UserError(f"--arc-path {path}: no {subset}-{split.title()}.jsonl (or {subset}/{split}/ folder) in it")


def data_paths(args) -> dict:
    return {name: getattr(args, name, None) for name in DATA_FLAGS}


def mixture(tasks, what):
    from tasks.common import TaskMixture

    mix = TaskMixture(tasks, seed=42)
    if len(mix) == 0:
        raise UserError(f"the {what} mixture is empty: check the data paths")
    return mix


# ---------------------------------------------------------------------------
# Batches of rendered conversations


class ConversationBatches:
    """Rendered conversations of one rank's share of a task: example i of the task goes to rank
    i % world_size, and each rank loops over its share epoch after epoch. Batches are CPU tensors
    (inputs, targets), targets -1 where not supervised. The state is how far the rank has read
    plus the conversations it holds back, so a resumed run gets the same batches."""

    def __init__(self, tokenizer, task, B, T, rank=0, world_size=1, pin_memory=False):
        self.tokenizer, self.task, self.B, self.T = tokenizer, task, B, T
        self.rank, self.world_size, self.pin = rank, world_size, pin_memory
        self.num_local = len(range(rank, len(task), world_size))
        if self.num_local == 0:
            raise UserError(f"{len(task)} conversations cannot be shared among {world_size} processes")
        self.next_index = 0  # local position of the next conversation to render
        self.taken = 0       # conversations placed into rows so far (progress)
        self.tokens = 0      # tokens placed into rows
        self.cropped = 0     # tokens cropped away

    def render(self, k):
        """(ids, mask) of this rank's k-th conversation (wrapping around epochs), as int64 arrays."""
        conversation = self.task[self.rank + (k % self.num_local) * self.world_size]
        ids, mask = self.tokenizer.render_conversation(conversation, max_tokens=self.T + 1)
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64)

    def to_tensors(self, ids, mask):
        """Rows of ids/mask (B, W+1) -> inputs (B, W), targets (B, W) with -1 where mask is 0."""
        targets = np.where(mask[:, 1:] == 1, ids[:, 1:], -1)
        x, y = torch.from_numpy(np.ascontiguousarray(ids[:, :-1])), torch.from_numpy(targets)
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"next_index": self.next_index, "taken": self.taken, "tokens": self.tokens, "cropped": self.cropped}

    def load_state_dict(self, state):
        for key in ("next_index", "taken", "tokens", "cropped"):
            setattr(self, key, int(state[key]))

    @property
    def crop_fraction(self):
        return self.cropped / max(1, self.tokens + self.cropped)


class PackedBatches(ConversationBatches):
    """Rows of exactly T + 1 tokens filled with whole conversations, like dataloader.py packs
    documents: from a buffer of pending conversations take the longest that fits the space left;
    when none fits, crop the shortest to finish the row (its tail is dropped and counted)."""

    def __init__(self, *args, buffer_size=64, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffer_size = buffer_size
        self.pending = []  # [(k, ids, mask)] in arrival order

    def _refill(self):
        while len(self.pending) < self.buffer_size:
            self.pending.append((self.next_index, *self.render(self.next_index)))
            self.next_index += 1

    def _fill_row(self, ids_row, mask_row):
        pos, size = 0, len(ids_row)
        while pos < size:
            self._refill()
            space = size - pos
            fits = [i for i, (_, ids, _) in enumerate(self.pending) if len(ids) <= space]
            if fits:
                pick = max(fits, key=lambda i: len(self.pending[i][1]))
            else:
                pick = min(range(len(self.pending)), key=lambda i: len(self.pending[i][1]))
            _, ids, mask = self.pending.pop(pick)
            n = min(len(ids), space)
            ids_row[pos:pos + n], mask_row[pos:pos + n] = ids[:n], mask[:n]
            pos += n
            self.taken += 1
            self.tokens += n
            self.cropped += len(ids) - n

    def __next__(self):
        ids = np.empty((self.B, self.T + 1), dtype=np.int64)
        mask = np.empty((self.B, self.T + 1), dtype=np.int64)
        for r in range(self.B):
            self._fill_row(ids[r], mask[r])
        return self.to_tensors(ids, mask)

    def state_dict(self):
        return dict(super().state_dict(), pending=[k for k, _, _ in self.pending])

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pending = [(k, *self.render(k)) for k in state["pending"]]


def on_device(batches, device):
    for x, y in batches:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ---------------------------------------------------------------------------
# Schedule and the optimizer step


def lr_multiplier(progress, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Constant, then linear decay to final_lr_frac over the last warmdown_ratio of training
    (progress runs 0 -> 1; warmdown_ratio 1 = linear decay from the start)."""
    if warmdown_ratio <= 0:
        return 1.0
    frac = min(1.0, max(0.0, (1 - progress) / warmdown_ratio))  # 1 until the warmdown, then -> 0
    return frac + (1 - frac) * final_lr_frac


def forward_backward(model, micro_batches, scale, autocast=None):
    """Backward of `scale` x (sum of the token losses) over the micro-batches; returns the loss
    sum (a tensor: no sync). With scale = world_size / (supervised tokens of the whole step on
    all ranks) and optimizers that average gradients over ranks, the gradient is that of the mean
    loss per supervised token. A micro-batch (or a whole step) with every target masked adds
    nothing: its loss sum is 0, never the NaN of 0/0."""
    autocast = autocast or nullcontext()
    loss_sum = None
    for x, y in micro_batches:
        with autocast:
            loss = model(x, y, loss_reduction="sum")
        (loss * scale).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    return loss_sum


def step_optimizers(model, optimizers, lrm, momentum=None):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if momentum is not None and is_muon(opt):
                group["momentum"] = momentum
        opt.step()
    model.zero_grad(set_to_none=True)


def global_step_loss(loss_sum, n_global, ddp):
    """The step's mean loss per supervised token over all ranks, from this rank's loss sum: the
    same number on every rank, so a NaN or inf on any one of them is seen by all and they stop
    together (a rank that raised alone would leave the others blocked in the next collective)."""
    total = loss_sum.detach().float().clone()
    if ddp:
        dist.all_reduce(total)  # tiny, and no host sync on CUDA
    return total / max(n_global, 1)


def sync_counts(values, device, ddp):
    """Sum small integer counts over ranks (one collective per step); a list of ints back."""
    if not ddp:
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------
# Loading the starting model


def load_start(args, stage, device, rank, world_size):
    """(model, tokenizer, meta, tag, optim_states). A fresh run loads the --source checkpoint
    (optim_states None); a --resume loads this stage's own latest (or --resume-step) checkpoint
    with this rank's optimizer state, after checking that its source was not retrained since."""
    from tokenizer import get_tokenizer

    if args.resume:
        tag = args.model_tag or checkpoint.find_last_tag(stage)
        if tag is None or checkpoint.find_last_step(checkpoint.checkpoint_dir(stage, tag)) is None:
            where = checkpoint.checkpoint_dir(stage, tag) if tag else get_base_dir() / "checkpoints" / stage
            raise UserError(f"--resume: no {stage} checkpoint under {where}: run "
                            f"`python -m {checkpoint.STAGE_SCRIPTS[stage]}` without --resume to start fresh "
                            f"(or check --model-tag)")
        step = args.resume_step if args.resume_step >= 0 else None
        model_state, optim_states, meta = checkpoint.load_checkpoint(stage, tag, step, device, rank, load_optimizer=True)
        if meta.get("world_size", 1) != world_size:
            raise UserError(f"--resume: the checkpoint was written by {meta.get('world_size')} processes, this run "
                            f"has {world_size}: resume with the same number")
        check_same_source(args, stage, checkpoint.checkpoint_dir(stage, tag), meta["source_checkpoint"])
        model = checkpoint.build_model(meta, device, model_state)
        model.train()
        return model, get_tokenizer(), meta, tag, optim_states
    tag = args.model_tag or checkpoint.find_last_tag(args.source)
    if tag is None:
        raise UserError(f"no {args.source} checkpoint under {get_base_dir() / 'checkpoints' / args.source}: "
                        f"run `python -m {checkpoint.STAGE_SCRIPTS[args.source]}` first")
    model, tokenizer, meta = checkpoint.load_model(args.source, device, tag=tag,
                                                   step=args.step if args.step >= 0 else None, phase="train")
    return model, tokenizer, meta, tag, None


def source_identity(stage, meta) -> dict:
    """What a run records about the checkpoint it starts from: stage, tag, step, and a hash of
    that checkpoint's meta. Losses and timings in the meta differ between any two training runs,
    so a retrained source differs even when it has the same tag and step."""
    body = {k: v for k, v in meta.items() if k not in ("tag", "rank_state")}  # as on disk
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"stage": stage, "tag": meta["tag"], "step": meta["step"], "fingerprint": digest}


def describe_source(info) -> str:
    return f"{info['stage']} {info['tag']} step {info['step']}"


def check_same_source(args, stage, ckpt_dir, recorded):
    """--resume continues a run only while its source is still the checkpoint a fresh run would
    start from (the latest of --source, or --model-tag / --step): else it would finish a run built
    on a model that has since been retrained."""
    old = describe_source(recorded)
    if recorded["stage"] != args.source:
        raise UserError(f"--resume: the {stage} checkpoint in {ckpt_dir} was trained from {old}: "
                        f"resume with --source {recorded['stage']}")
    try:
        tag, step = checkpoint.resolve(args.source, args.model_tag or None, args.step if args.step >= 0 else None)
    except UserError:
        print0(f"warning: no {args.source} checkpoint to check the resumed run's source against; continuing")
        return
    meta_path = checkpoint._meta_path(checkpoint.checkpoint_dir(args.source, tag), step)  # the meta, not the weights
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {meta_path} to check the resumed run's source: {e}")
    current = source_identity(args.source, dict(meta, tag=tag, step=step))
    keys = ["tag", "step"] + (["fingerprint"] if "fingerprint" in recorded else [])  # older runs lack it
    if all(recorded.get(k) == current[k] for k in keys):
        return
    new = f"{tag} step {step}"
    if old == describe_source(current):
        new = f"a different {new} (retrained since)"
    hint = f" (or pass --model-tag {recorded['tag']} to continue it)" if recorded["tag"] != tag else ""
    raise UserError(f"the {stage} checkpoint in {ckpt_dir} was trained from {old}, but the latest {args.source} "
                    f"checkpoint is {new}: drop --resume to start over{hint}")


# ---------------------------------------------------------------------------
# The training loop (mid_train and chat_sft)


def train_chat(args, spec, ddp, rank, world_size, device):
    """Train stage spec["stage"] from args. spec holds what differs between the stages:
    stage, section, title, train_tasks(preset, paths), val_tasks(preset, paths),
    make_batches(tokenizer, task, T, rank, world_size, pin) -> ConversationBatches,
    batch(args, T, world_size, device) -> (grad_accum, description),
    eval_steps(args, T, world_size, device, num_val) -> validation micro-batches per rank,
    muon_warmup (bool), compile_default (bool)."""
    t_start = time.time()
    stage = spec["stage"]
    master = rank == 0
    dtype = training_dtype(device.type)  # bf16 or fp32: float16 would need a gradient scaler
    autocast = torch.amp.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    preset = resolve_preset(args.preset, device.type)
    paths = data_paths(args)

    orig_model, tokenizer, start_meta, tag, optim_states = load_start(args, stage, device, rank, world_size)
    config = orig_model.config
    T = args.max_seq_len or config.sequence_len
    from tokenizer import get_token_bytes

    token_bytes = get_token_bytes(device)
    train_set = mixture(spec["train_tasks"](preset, paths), "training")
    val_set = mixture(spec["val_tasks"](preset, paths), "validation")
    grad_accum, batch_text = spec["batch"](args, T, world_size, device)
    eval_steps = spec["eval_steps"](args, T, world_size, device, len(val_set))
    use_compile = args.compile if args.compile is not None else (device.type == "cuda" and spec["compile_default"])
    # packed rows have one shape (compile it static); padded rows vary (let torch make it dynamic)
    model = torch.compile(orig_model, dynamic=spec.get("dynamic", False)) if use_compile else orig_model
    optimizers = orig_model.setup_optimizers(embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
                                             matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"] * args.init_lr_frac
    pin = device.type == "cuda"
    train_batches = spec["make_batches"](tokenizer, train_set, T, rank, world_size, pin)
    ckpt_dir = checkpoint.checkpoint_dir(stage, tag)
    ema_beta = 0.9
    epochs_examples = len(train_set) * args.num_epochs

    # loop state that a resume restores
    step, smooth_loss, training_time, taken_global, supervised_global = 0, torch.zeros((), device=device), 0.0, 0, 0
    seconds_before = 0.0
    val_bpb, min_val_bpb = None, float("inf")
    curve = {"step": [], "loss": [], "val_step": [], "val_bpb": []}
    stale_checkpoints = False
    # the checkpoint this run started from (a resumed run checked in load_start that it is unchanged)
    source_info = source_identity(args.source, start_meta) if optim_states is None else start_meta["source_checkpoint"]
    if optim_states is not None:  # --resume
        for opt, state in zip(optimizers, optim_states, strict=True):
            opt.load_state_dict(state)  # also restores each group's initial_lr
        saved = start_meta.get("train_config", {})
        for key, value in (("preset", preset), ("max_seq_len", T)):
            if saved.get(key) != value:
                raise UserError(f"--resume: the checkpoint was trained with {key} {saved.get(key)!r}, this run has "
                                f"{value!r}: resume with the run's original flags")
        rank_state = start_meta["rank_state"]
        train_batches.load_state_dict(rank_state["batches"])
        set_rng_state(rank_state["rng"], device)
        loop = start_meta["loop_state"]
        step, training_time = start_meta["step"], loop["training_time"]
        smooth_loss = torch.tensor(loop["smooth_loss"], dtype=torch.float32, device=device)
        taken_global, supervised_global = loop["taken_global"], loop["supervised_global"]
        min_val_bpb, curve, val_bpb = loop["min_val_bpb"], loop["curve"], start_meta.get("val_bpb")
        seconds_before = loop.get("seconds", 0.0)
        print0(f"resumed from {ckpt_dir} at step {step}")
    elif checkpoint.find_last_step(ckpt_dir) is not None:
        stale_checkpoints = True
        print0(f"warning: {ckpt_dir} holds checkpoints of an earlier run; they are replaced at the first save "
               f"(pass --resume to continue that run instead)")
    start_step = step

    num_params = orig_model.num_params()["total"]
    flops_per_token = orig_model.estimate_flops()
    train_config = dict(vars(args), preset=preset, model_tag=tag, device=device.type, dtype=str(dtype),
                        compile=use_compile, world_size=world_size, grad_accum_steps=grad_accum, max_seq_len=T)
    print0(f"{stage}: model {tag} from {source_info['stage']} step {source_info['step']} | parameters: {num_params:,}")
    print0(f"preset: {preset} | training conversations: {len(train_set):,} | validation: {len(val_set):,}")
    print0(f"batch: {batch_text} | horizon: " + (f"{args.num_iterations} steps" if args.num_iterations > 0
                                                  else f"{args.num_epochs:g} epoch(s)"))
    print0(f"device: {device} | dtype: {dtype} | compile: {use_compile}")

    def progress_of(step, taken):
        if args.num_iterations > 0:
            return step / args.num_iterations
        return taken / epochs_examples

    wandb_run = init_wandb(args.run, "speedchat", train_config, master)
    peak = peak_flops(device, dtype)
    last_log_time, last_log_step = None, step
    progress = progress_of(step, taken_global)

    while True:
        # --- evaluate, save (the state here: `step` optimizer steps done)
        last_step = step == args.num_iterations if args.num_iterations > 0 else progress >= 1.0
        do_eval = last_step or (args.eval_every > 0 and step % args.eval_every == 0)
        do_save = step > start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0))
        if do_eval:
            model.eval()
            val_batches = spec["make_batches"](tokenizer, val_set, T, rank, world_size, pin)
            with autocast:
                val_bpb = evaluate_bpb(model, on_device(val_batches, device), eval_steps, token_bytes)
            model.train()
            min_val_bpb = min(min_val_bpb, val_bpb)
            if not curve["val_step"] or curve["val_step"][-1] != step:
                curve["val_step"].append(step)
                curve["val_bpb"].append(val_bpb)
            print0(f"step {step:05d} | validation bpb: {val_bpb:.4f}")
            wandb_run.log({"step": step, "val/bpb": val_bpb})
        if do_save:
            if stale_checkpoints:
                if master:
                    checkpoint.clear_checkpoints(ckpt_dir)
                if ddp:
                    dist.barrier()
                stale_checkpoints = False
            meta = {
                "model_config": start_meta["model_config"],
                "tokenizer": tokenizer.fingerprint(),
                "train_config": train_config,
                "step": step,
                "loss": smooth_loss.item() / (1 - ema_beta ** step) if step else None,
                "val_bpb": val_bpb,
                "preset": preset,
                "world_size": world_size,
                "source_checkpoint": source_info,
                "loop_state": {"smooth_loss": smooth_loss.item(), "training_time": training_time, "min_val_bpb": min_val_bpb,
                               "curve": curve, "taken_global": taken_global, "supervised_global": supervised_global,
                               "seconds": seconds_before + time.time() - t_start},
            }
            rank_state = {"batches": train_batches.state_dict(), "rng": get_rng_state(device)}
            checkpoint.save_checkpoint(stage, tag, step, orig_model, optimizers, meta, rank=rank,
                                       rank_state=rank_state, keep_last=args.keep_last if args.keep_last > 0 else None)
        if last_step:
            break
        if step == start_step or do_eval or do_save:  # keep eval/save time out of the step timing
            sync()
            last_log_time, last_log_step = time.perf_counter(), step

        # --- one optimizer step: draw the micro-batches, count supervised targets on all ranks
        taken_before = train_batches.taken
        micro = [next(train_batches) for _ in range(grad_accum)]
        n_local = sum(int((y >= 0).sum()) for _, y in micro)
        n_global, taken_step = sync_counts([n_local, train_batches.taken - taken_before], device, ddp)
        lrm = lr_multiplier(progress, args.warmdown_ratio, args.final_lr_frac)
        momentum = muon_momentum(step) if spec["muon_warmup"] else None
        tokens_step = sum(x.numel() for x, _ in micro) * world_size  # padded rows vary in width
        micro = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in micro]
        loss_sum = forward_backward(model, micro, world_size / max(n_global, 1), autocast)
        step_optimizers(model, optimizers, lrm, momentum)
        step_loss = global_step_loss(loss_sum, n_global, ddp)  # the same on every rank
        smooth_loss = ema_beta * smooth_loss + (1 - ema_beta) * step_loss
        step += 1
        taken_global += taken_step
        supervised_global += n_global
        progress = progress_of(step, taken_global)

        # --- log
        if step % args.log_every == 0 or progress >= 1.0:
            debiased = smooth_loss.item() / (1 - ema_beta ** step)
            check_finite_loss(debiased, step, "--init-lr-frac")  # every rank sees the same value: all stop
            sync()
            now = time.perf_counter()
            dt = (now - last_log_time) / (step - last_log_step)
            if not use_compile or step > start_step + 10:
                training_time += dt * (step - last_log_step)
            last_log_time, last_log_step = now, step
            line, tok_per_sec = step_line(step, progress, debiased, lrm, dt, tokens_step, flops_per_token, peak,
                                          world_size, training_time,
                                          eta=max(0.0, dt * (step / max(progress, 1e-9) - step)))
            print0(line)
            curve["step"].append(step)
            curve["loss"].append(debiased)
            wandb_run.log({"step": step, "train/loss": debiased, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec})

    seconds = seconds_before + time.time() - t_start
    if master:
        import report

        items = {
            "model tag": tag,
            "started from": f"{source_info['stage']} step {source_info['step']}",
            "preset": preset,
            "parameters": f"{num_params:,}",
            "sequence length": T,
            "training conversations": f"{len(train_set):,}",
            "validation conversations": f"{len(val_set):,}",
            "batch": batch_text,
            "steps": f"{step:,}",
            "conversations seen": f"{taken_global:,} ({taken_global / len(train_set):.2f} epochs)",
            "supervised tokens": f"{supervised_global:,}",
            "training time": format_seconds(training_time),
            "stage time": format_seconds(seconds),
            "device": f"{world_size} x {torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}",
            "min validation bpb": f"{min_val_bpb:.4f}",
            "final validation bpb": f"{val_bpb:.4f}",
        }
        if isinstance(train_batches, PackedBatches):
            items["cropped tokens"] = f"{100 * train_batches.crop_fraction:.1f}% (rank 0)"
        data = {"curve": curve, "seconds": seconds, "training_time": training_time, "steps": step,
                "num_params": num_params, "min_val_bpb": min_val_bpb, "final_val_bpb": val_bpb,
                "conversations_seen": taken_global, "supervised_tokens": supervised_global, "preset": preset,
                "tag": tag}
        report.write_section(spec["section"], spec["title"], items, data=data)
    print0(f"done: {step} steps in {format_seconds(training_time)} | min validation bpb {min_val_bpb:.4f}")
    wandb_run.finish()
    return {"step": step, "val_bpb": val_bpb, "min_val_bpb": min_val_bpb, "curve": curve, "tag": tag}


# ---------------------------------------------------------------------------
# mid_train itself


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Mid-train the base model on a mixture of conversations "
                                            "(chat format, multiple choice, tool use).")
    add_training_flags(p, source="base", device_batch_size=32, eval_every=150, save_every=500,
                       init_lr_frac=1.0, warmdown_ratio=0.2)
    add_data_flags(p)
    g = p.add_argument_group("mid-training batch and evaluation")
    g.add_argument("--total-batch-size", type=int, default=None,
                   help=f"tokens per optimizer step (-1 = device batch x seq len x processes, no accumulation; "
                        f"default: {D20_TOTAL_BATCH_SIZE} on CUDA, -1 otherwise)")
    g.add_argument("--eval-tokens", type=int, default=None, help=EVAL_TOKENS_HELP)
    show_defaults(p)
    return check_args(p.parse_args(argv))


def packed_batch(args, T, world_size, device):
    total = args.total_batch_size
    if total is None:
        total = D20_TOTAL_BATCH_SIZE if device.type == "cuda" else -1
    total, accum = derive_batch(args.device_batch_size, T, total, world_size)
    return accum, (f"{total:,} tokens/step = {args.device_batch_size} x {T} x {world_size} processes x "
                   f"{accum} accumulation")


def make_packed(args):
    def make(tokenizer, task, T, rank, world_size, pin):
        return PackedBatches(tokenizer, task, args.device_batch_size, T, rank, world_size, pin_memory=pin)
    return make


def packed_eval_steps(args, T, world_size, device, num_val):
    tokens = args.eval_tokens if args.eval_tokens is not None else default_eval_tokens(device.type)
    return max(1, tokens // (args.device_batch_size * T * world_size))


MID_SPEC = dict(stage="mid", section="mid-train", title="Mid-training", muon_warmup=True, compile_default=True,
                train_tasks=lambda preset, paths: mid_tasks(preset, "train", paths),
                val_tasks=lambda preset, paths: mid_tasks(preset, "val", paths),
                batch=packed_batch,
                eval_steps=packed_eval_steps)


def main(argv=None):
    args = get_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device, seed=args.seed)
    try:
        return train_chat(args, dict(MID_SPEC, make_batches=make_packed(args)), ddp, rank, world_size, device)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_main(main)
