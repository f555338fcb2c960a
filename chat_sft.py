"""Supervised fine-tuning: polish the mid-trained model on a small set of good conversations.

    python -m chat_sft                                                   # one GPU (or CPU, slowly)
    torchrun --standalone --nproc_per_node=8 -m chat_sft

It starts from the latest mid checkpoint (--source base to skip mid-training) and trains on the
conversations of sft_tasks: --preset full (ARC, GSM8K, 10k SmolTalk, identity, spelling) or
offline (generated tasks only; the default without CUDA). --chat-data PATH[:WEIGHT] adds your own.

Unlike mid-training, each row holds ONE conversation (--packing pad, the default): rows are
padded to the longest in the micro-batch, padding and every non-assistant token get target -1,
so the loss is on the completions only (averaged over the supervised tokens of the whole step;
a micro-batch with nothing to learn adds nothing instead of a NaN). --packing pack fills rows
with several conversations the way mid_train does. The learning rate starts at 2% of the flags'
rates and decays linearly to 0 over the run.
"""

import argparse

import numpy as np
import torch

import training
from common import POSITIVE, UserError, parse_args, print0, run_main
from dataloader import ConversationLoader
from tasks.mixtures import add_chat_data_flag, add_data_flags, arc_path, chat_data_tasks, offline_val_tasks


def sft_tasks(preset, split, paths):
    """The SFT conversations for split "train" or "val"."""
    from tasks.arithmetic import Arithmetic
    from tasks.identity import Identity
    from tasks.spelling import SimpleSpelling, SpellingBee

    words = paths["words_path"]
    if split == "val":  # SmolTalk's test split; generated tasks when offline or SmolTalk is a local file
        if preset == "offline" or paths["smoltalk_path"]:
            return offline_val_tasks(words)
        from tasks.smoltalk import SmolTalk
        return [SmolTalk("test")]
    identity = Identity(path=paths["identity_path"])
    spelling = [SimpleSpelling(size=300, split="train", words_path=words),
                SpellingBee(size=300, split="train", words_path=words)]
    if preset == "offline":
        return [identity, identity, *spelling, Arithmetic(size=300, split="train"), *chat_data_tasks(paths)]
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.smoltalk import SmolTalk

    return [ARC("ARC-Easy", "train", path=arc_path(paths["arc_path"], "ARC-Easy", "train")),
            ARC("ARC-Challenge", "train", path=arc_path(paths["arc_path"], "ARC-Challenge", "train")),
            GSM8K("main", "train", path=paths["gsm8k_path"]),
            SmolTalk("train", path=paths["smoltalk_path"], stop=10_000), identity, *spelling, *chat_data_tasks(paths)]


class PaddedBatches:
    """B rows of one conversation each (cut to T + 1 tokens), padded to the longest row of the
    micro-batch; padding has target -1, like every token the assistant did not write. Rank r takes
    examples r, r + world_size, ... epoch after epoch; the state is how many it has taken."""

    def __init__(self, tokenizer, task, B, T, rank=0, world_size=1):
        self.tokenizer, self.task, self.B, self.T = tokenizer, task, B, T
        self.mine = range(rank, len(task), world_size)
        self.taken = 0

    def __next__(self):
        rendered = [self.tokenizer.render_conversation(self.task[self.mine[(self.taken + r) % len(self.mine)]],
                                                       max_tokens=self.T + 1) for r in range(self.B)]
        self.taken += self.B
        ids = np.full((self.B, max(len(ids) for ids, _ in rendered)), self.tokenizer.get_bos_token_id())
        targets = np.full_like(ids, -1)
        for r, (row_ids, row_mask) in enumerate(rendered):
            ids[r, :len(row_ids)] = row_ids
            targets[r, :len(row_ids)] = np.where(np.array(row_mask) == 1, row_ids, -1)
        return (torch.from_numpy(np.ascontiguousarray(ids[:, :-1])),
                torch.from_numpy(np.ascontiguousarray(targets[:, 1:])))

    def state_dict(self):
        return {"taken": self.taken}

    def load_state_dict(self, state):
        self.taken = state["taken"]

    def close(self):
        pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Supervised fine-tuning on conversations (loss on the assistant's "
                                            "tokens only).")
    training.add_flags(p, device_batch_size=4, eval_every=100, save_every=-1, warmdown_ratio=1.0)
    training.add_chat_flags(p, source="mid", init_lr_frac=0.02)
    add_data_flags(p)
    add_chat_data_flag(p)
    g = p.add_argument_group("fine-tuning batch and evaluation")
    g.add_argument("--examples-per-step", type=POSITIVE, default=32,
                   help="rows per optimizer step (a multiple of device batch x processes)")
    g.add_argument("--packing", default="pad", choices=("pad", "pack"),
                   help="pad: one conversation per row; pack: fill rows with several (like mid_train)")
    g.add_argument("--eval-examples", type=POSITIVE, default=3200,
                   help="validation rows per evaluation (at most the size of the validation set)")
    return parse_args(p, argv)


def main(argv=None):
    args = get_args(argv)
    with training.Run(args, "sft", training.chat_tag(args, "sft")) as run:
        model, start, train_set, val_set = training.chat_start(run, args, sft_tasks)
        B, T, per_micro = args.device_batch_size, start["max_seq_len"], args.device_batch_size * run.world_size
        if args.examples_per_step % per_micro:
            raise UserError(f"--examples-per-step {args.examples_per_step} is not a multiple of device batch x "
                            f"processes = {B} x {run.world_size} = {per_micro}")
        grad_accum = args.examples_per_step // per_micro
        eval_steps = max(1, min(args.eval_examples, len(val_set)) // per_micro)  # at most one pass

        def rows(task):
            kind = ConversationLoader if args.packing == "pack" else PaddedBatches
            return kind(run.tokenizer, task, B, T, run.rank, run.world_size)

        batches = rows(train_set)
        run.prepare(model, batches, lr_scale=args.init_lr_frac, compile_default=False,
                    dynamic=False if args.packing == "pack" else None)
        print0(f"batch: {args.examples_per_step} rows/step = {B} x {run.world_size} processes x {grad_accum} "
               f"accumulation, rows of up to {T} tokens")
        run.train(training.masked_step(run, batches, grad_accum),
                  training.bpb_evaluator(run, lambda: rows(val_set), eval_steps),
                  schedule=lambda step, progress: training.lr_multiplier(progress, args.warmdown_ratio,
                                                                         args.final_lr_frac),
                  progress=training.chat_progress(args, batches, len(train_set), run.device),
                  meta=dict(start, grad_accum_steps=grad_accum))
        batches.close()
        return run.report("chat-sft", "Chat SFT", dict(
            started_from=training.describe(start["source_checkpoint"]), preset=start["preset"], max_row_tokens=T,
            training_conversations=len(train_set), validation_conversations=len(val_set),
            examples_per_step=args.examples_per_step, conversations_seen_rank0=batches.taken))


if __name__ == "__main__":
    run_main(main)
