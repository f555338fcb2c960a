"""Mid-training: teach the base model the chat format, multiple choice and tool use.

    python -m mid_train                                                   # one GPU (or CPU, slowly)
    torchrun --standalone --nproc_per_node=8 -m mid_train -- --device-batch-size 32

It starts from the latest base checkpoint, keeps its model config, and trains on a mixture of
conversations (mid_tasks): --preset full (SmolTalk, MMLU auxiliary_train, GSM8K with calculator
calls, identity, spelling; from the Hub or local copies) or offline (generated tasks only; the
default without CUDA). --chat-data PATH[:WEIGHT] adds your own conversations.

Conversations are packed into full rows by the pretraining packer (dataloader.ConversationLoader:
best fit, the last one cropped to fill the row); targets are -1 where the loss mask is 0 (user
turns, tool outputs), so the loss is the assistant's tokens, averaged over the step's supervised
tokens. --resume refuses when the base checkpoint it started from has been retrained since.
"""

import argparse

import training
from common import POSITIVE, POSITIVE_OR_ALL, parse_args, print0, run_main
from dataloader import ConversationLoader
from tasks.mixtures import add_chat_data_flag, add_data_flags, chat_data_tasks, offline_val_tasks


def mid_tasks(preset, split, paths):
    """The tasks of the mixture for `split` ("train" or "val"). A dataset read from a local path
    (its training data) is left out of the validation mixture."""
    from tasks.arithmetic import Arithmetic
    from tasks.identity import Identity
    from tasks.spelling import SimpleSpelling, SpellingBee

    words = paths["words_path"]
    if preset == "offline":
        if split == "train":
            return [Identity(path=paths["identity_path"])] * 4 + [
                SimpleSpelling(size=3000, split="train", words_path=words),
                SpellingBee(size=3000, split="train", words_path=words), Arithmetic(size=3000, split="train"),
                *chat_data_tasks(paths)]
        return offline_val_tasks(words)
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk

    if split == "train":
        identity = Identity(path=paths["identity_path"])
        return [SmolTalk("train", path=paths["smoltalk_path"]),
                MMLU("auxiliary_train", "train", path=paths["mmlu_path"]),
                GSM8K("main", "train", path=paths["gsm8k_path"]),
                identity, identity,
                SimpleSpelling(size=200_000, split="train", words_path=words),
                SpellingBee(size=80_000, split="train", words_path=words), *chat_data_tasks(paths)]
    val = [] if paths["smoltalk_path"] else [SmolTalk("test")]
    val += [] if paths["mmlu_path"] else [MMLU("all", "test", stop=5200)]
    val += [] if paths["gsm8k_path"] else [GSM8K("main", "test", stop=420)]
    return val or offline_val_tasks(words)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Mid-train the base model on a mixture of conversations "
                                            "(chat format, multiple choice, tool use).")
    training.add_flags(p, device_batch_size=32, eval_every=150, save_every=500, warmdown_ratio=0.2)
    training.add_chat_flags(p, source="base", init_lr_frac=1.0)
    add_data_flags(p)
    add_chat_data_flag(p)
    g = p.add_argument_group("mid-training batch and evaluation")
    g.add_argument("--total-batch-size", type=POSITIVE_OR_ALL, default=None,
                   help=f"tokens per optimizer step (-1 = device batch x seq len x processes, no accumulation; "
                        f"default: {training.D20_TOTAL_BATCH_SIZE} on CUDA, -1 otherwise)")
    g.add_argument("--eval-tokens", type=POSITIVE, default=None,
                   help=f"validation tokens per evaluation (default: {training.default_eval_tokens('cuda')} on "
                        f"CUDA, {training.default_eval_tokens('cpu')} otherwise)")
    return parse_args(p, argv)


def main(argv=None):
    args = get_args(argv)
    with training.Run(args, "mid", training.chat_tag(args, "mid")) as run:
        model, start, train_set, val_set = training.chat_start(run, args, mid_tasks)
        B, T, cuda = args.device_batch_size, start["max_seq_len"], run.device.type == "cuda"
        total = args.total_batch_size or (training.D20_TOTAL_BATCH_SIZE if cuda else -1)
        total, grad_accum = training.derive_batch(B, T, total, run.world_size)
        eval_tokens = args.eval_tokens or training.default_eval_tokens(run.device.type)
        eval_steps = max(1, eval_tokens // (B * T * run.world_size))

        def packed(task):
            return ConversationLoader(run.tokenizer, task, B, T, run.rank, run.world_size, run.device)

        batches = packed(train_set)
        run.prepare(model, batches, lr_scale=args.init_lr_frac)
        print0(f"batch: {total:,} tokens/step = {B} x {T} x {run.world_size} processes x {grad_accum} accumulation")
        run.train(training.masked_step(run, batches, grad_accum),
                  training.bpb_evaluator(run, lambda: packed(val_set), eval_steps),
                  schedule=lambda step, progress: training.lr_multiplier(progress, args.warmdown_ratio,
                                                                         args.final_lr_frac),
                  progress=training.chat_progress(args, batches, len(train_set), run.device),
                  momentum=training.muon_momentum, meta=dict(start, grad_accum_steps=grad_accum))
        batches.close()
        return run.report("mid-train", "Mid-training", dict(
            started_from=training.describe(start["source_checkpoint"]), preset=start["preset"], sequence_length=T,
            training_conversations=len(train_set), validation_conversations=len(val_set), total_batch_size=total,
            conversations_seen_rank0=batches.taken, cropped_fraction_rank0=batches.crop_fraction))


if __name__ == "__main__":
    run_main(main)
