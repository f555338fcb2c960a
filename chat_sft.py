"""Supervised fine-tuning: polish the mid-trained model on a small set of good conversations.

    python -m chat_sft                                                   # one GPU (or CPU, slowly)
    torchrun --standalone --nproc_per_node=8 -m chat_sft

It starts from the latest mid checkpoint (--source base to skip mid-training) and trains on
conversations chosen by --preset:
  full     ARC-Easy and ARC-Challenge (train), GSM8K (train), 10k SmolTalk conversations,
           identity, and a few hundred SimpleSpelling / SpellingBee; local copies via
           --arc-path, --gsm8k-path, --smoltalk-path
  offline  generated tasks only: identity, spelling, arithmetic with the calculator tool
(default: full on CUDA, offline otherwise).

Unlike mid-training, each row holds ONE conversation (--packing pad, the default): rows are
padded to the longest in the micro-batch, padding and every non-assistant token get target -1,
so the loss is on the completions only (averaged over the supervised tokens of the whole step;
a micro-batch with nothing to learn adds nothing instead of a NaN). --packing pack fills rows
with several conversations the way mid_train does.

--examples-per-step conversations make one optimizer step, by gradient accumulation over
--device-batch-size rows per process. The learning rate starts at --init-lr-frac (2%) of
base_train's rates and decays linearly to 0 over the run (--warmdown-ratio 1). The loop,
checkpoints and --resume are mid_train's (train_chat); checkpoints go to
$SPEEDCHAT_BASE_DIR/checkpoints/sft/<tag>/.
"""

import argparse

import numpy as np

from base_train import show_defaults
from common import UserError, compute_cleanup, compute_init, run_main
from mid_train import (ConversationBatches, PackedBatches, add_data_flags, add_training_flags, arc_path, check_args,
                       offline_val_tasks, train_chat)


def sft_tasks(preset, split, paths):
    """The SFT conversations for split "train" or "val"."""
    from tasks.arithmetic import Arithmetic
    from tasks.identity import Identity
    from tasks.spelling import SimpleSpelling, SpellingBee

    words = paths.get("words_path")
    if split == "val":  # SmolTalk's test split; generated tasks when offline or SmolTalk is a local file
        if preset == "offline" or paths.get("smoltalk_path"):
            return offline_val_tasks(words)
        from tasks.smoltalk import SmolTalk
        return [SmolTalk("test")]
    identity = Identity(path=paths.get("identity_path"))
    if preset == "offline":
        return [identity, identity, SimpleSpelling(size=300, split="train", words_path=words),
                SpellingBee(size=300, split="train", words_path=words), Arithmetic(size=300, split="train")]
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.smoltalk import SmolTalk

    return [ARC("ARC-Easy", "train", path=arc_path(paths.get("arc_path"), "ARC-Easy", "train")),
            ARC("ARC-Challenge", "train", path=arc_path(paths.get("arc_path"), "ARC-Challenge", "train")),
            GSM8K("main", "train", path=paths.get("gsm8k_path")),
            SmolTalk("train", path=paths.get("smoltalk_path"), stop=10_000),
            identity,
            SimpleSpelling(size=300, split="train", words_path=words),
            SpellingBee(size=300, split="train", words_path=words)]


class PaddedBatches(ConversationBatches):
    """B rows of one conversation each (cut to T + 1 tokens), padded to the longest row of the
    micro-batch. Padding has target -1, like every token the assistant did not write."""

    def __next__(self):
        rendered = [self.render(self.next_index + r) for r in range(self.B)]
        self.next_index += self.B
        self.taken += self.B
        width = max(len(ids) for ids, _ in rendered)
        ids = np.full((self.B, width), self.tokenizer.get_bos_token_id(), dtype=np.int64)
        mask = np.zeros((self.B, width), dtype=np.int64)
        for r, (row_ids, row_mask) in enumerate(rendered):
            ids[r, :len(row_ids)], mask[r, :len(row_mask)] = row_ids, row_mask
            self.tokens += len(row_ids)
        return self.to_tensors(ids, mask)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Supervised fine-tuning on conversations (loss on the assistant's "
                                            "tokens only).")
    add_training_flags(p, source="mid", device_batch_size=4, eval_every=100, save_every=-1,
                       init_lr_frac=0.02, warmdown_ratio=1.0)
    add_data_flags(p)
    g = p.add_argument_group("fine-tuning batch and evaluation")
    g.add_argument("--examples-per-step", type=int, default=32,
                   help="conversations per optimizer step (a multiple of device batch x processes)")
    g.add_argument("--packing", default="pad", choices=("pad", "pack"),
                   help="pad: one conversation per row; pack: fill rows with several (like mid_train)")
    g.add_argument("--eval-examples", type=int, default=3200,
                   help="validation rows per evaluation (at most the size of the validation set)")
    show_defaults(p)
    return check_args(p.parse_args(argv))


def padded_batch(args, T, world_size, device):
    per_micro = args.device_batch_size * world_size
    if args.examples_per_step <= 0 or args.examples_per_step % per_micro:
        raise UserError(f"--examples-per-step {args.examples_per_step} is not a positive multiple of device batch x "
                        f"processes = {args.device_batch_size} x {world_size} = {per_micro}: change "
                        f"--examples-per-step or --device-batch-size")
    accum = args.examples_per_step // per_micro
    unit = "rows" if args.packing == "pack" else "conversations"
    return accum, (f"{args.examples_per_step} {unit}/step = {args.device_batch_size} x {world_size} processes x "
                   f"{accum} accumulation, rows of up to {T} tokens")


def padded_eval_steps(args, T, world_size, device, num_val):
    """--eval-examples rows, at most one pass over the validation set."""
    return max(1, min(args.eval_examples, num_val) // (args.device_batch_size * world_size))


def make_batches(args):
    cls = PackedBatches if args.packing == "pack" else PaddedBatches

    def make(tokenizer, task, T, rank, world_size, pin):
        return cls(tokenizer, task, args.device_batch_size, T, rank, world_size, pin_memory=pin)
    return make


def main(argv=None):
    args = get_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device, seed=args.seed)
    spec = dict(stage="sft", section="chat-sft", title="Chat SFT", muon_warmup=False, compile_default=False,
                dynamic=None if args.packing == "pad" else False,
                train_tasks=lambda preset, paths: sft_tasks(preset, "train", paths),
                val_tasks=lambda preset, paths: sft_tasks(preset, "val", paths),
                batch=padded_batch, make_batches=make_batches(args),
                eval_steps=padded_eval_steps)
    try:
        return train_chat(args, spec, ddp, rank, world_size, device)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_main(main)
