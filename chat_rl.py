"""Reinforcement learning on GSM8K (generated arithmetic offline) with the calculator tool.

    python -m chat_rl                                                   # one GPU (or CPU, slowly)
    torchrun --standalone --nproc_per_node=8 -m chat_rl

It starts from the latest sft checkpoint (--source mid to skip SFT). Each step takes
--examples-per-step problems (split over the processes), samples a group of --num-samples
answers to each with the Engine (temperature 1 over the whole vocabulary, calculator on) and
rewards an answer 1 when the task's own check accepts its final answer, else 0:
  full     GSM8K train, checked on the "#### N" line; held out: GSM8K test, or, when --gsm8k-path
           is a local copy of the train split, its first --eval-problems problems (never trained on)
  offline  generated arithmetic, checked on the last number of the reply; held out: the test
           expressions (default: full on CUDA, offline otherwise)

The update is a plain on-policy policy gradient, a REINFORCE / GRPO variant: an answer's advantage
is its reward minus the mean reward of its group (no division by the group's spread), and the loss
is -sum(log p(token) x advantage) over every sampled token of the step, divided by the number of
those tokens on all processes. The prompt and the tokens the calculator forced into an answer are
not the policy's choices and are not trained; the stop token is. Each batch of answers makes one
optimizer step, so they always come from the current policy: no importance ratio, no clipping, no
reference model or KL penalty. A group whose answers all score the same teaches nothing.

The learning rate is --init-lr-frac (5%) of the flags' rates, decaying linearly to 0. Every
--eval-every steps the first --eval-problems held-out problems get --eval-samples answers each
(temperature 1, the same seeds at every evaluation: only the model changes): pass@1 (the mean share
of right answers) and pass@k (problems with any right answer), next to the bits per byte of their
reference solutions. A training answer is sampled with a generator seeded by --seed and its
problem's place in the run, so the data position is also the sampling RNG's: --resume continues
exactly. Checkpoints go to $SPEEDCHAT_BASE_DIR/checkpoints/rl/<tag>/.
"""

import argparse

import torch

import training
from common import POSITIVE, UserError, parse_args, print0, run_main, sum_over_ranks
from dataloader import ConversationLoader
from engine import Engine
from tasks.mixtures import add_data_flags

ARITHMETIC_PROBLEMS = 2000  # offline training problems (one pass = 125 steps of 16)


def rl_tasks(preset, split, paths, held_out):
    """The one task of split "train" (to learn from) or "val" (held out, for pass@k)."""
    if preset == "offline":
        from tasks.arithmetic import Arithmetic
        return [Arithmetic(size=ARITHMETIC_PROBLEMS if split == "train" else held_out,
                           split="train" if split == "train" else "test")]
    from tasks.gsm8k import GSM8K

    if paths["gsm8k_path"]:  # a local copy is the train split: its first problems are held out
        cut = {"start": held_out} if split == "train" else {"stop": held_out}
        return [GSM8K("main", "train", path=paths["gsm8k_path"], **cut)]
    return [GSM8K("main", "train" if split == "train" else "test")]


class Problems:
    """This process's training problems: rank r takes r, r + world_size, ... pass after pass. The
    state is how many it has taken; its k-th is the run's draw number k x world_size + r."""

    def __init__(self, task, rank, world_size):
        self.task, self.rank, self.world_size = task, rank, world_size
        self.mine, self.taken = range(rank, len(task), world_size), 0

    def take(self, n):
        """[(draw number, conversation)] of the next n problems."""
        drawn = [(k * self.world_size + self.rank, self.task[self.mine[k % len(self.mine)]])
                 for k in range(self.taken, self.taken + n)]
        self.taken += n
        return drawn

    def state_dict(self):
        return {"taken": self.taken}

    def load_state_dict(self, state):
        self.taken = state["taken"]


def rollout(engine, prompt, num_samples, max_tokens, seed):
    """num_samples answers to `prompt` at temperature 1, each (tokens, sampled): the tokens up to and
    with the stop token (stopping is a choice too), sampled 0 where the calculator forced the token."""
    results, masks = engine.generate_batch(prompt, num_samples, keep_stop=True, max_tokens=max_tokens,
                                           temperature=1.0, seed=seed)
    return [(tokens[len(prompt):], mask[len(prompt):]) for tokens, mask in zip(results, masks)]


def sample_seed(seed, draw):
    """The sampling seed of a run's draw-th problem: 32 bits, all that torch's CPU generator uses."""
    return (seed * 0x9E3779B1 + draw) % 2**32  # runs of nearby seeds share no streams (2.6e9 draws apart)


def group_advantages(rewards):
    """Each answer's reward minus the mean reward of its group."""
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def pad_rows(rows, pad):
    """rows [(prompt, tokens, sampled, advantage)] -> inputs x (B, L), targets y (B, L) that are -1
    wherever nothing is trained (the prompt, forced tokens, padding), advantages (B,)."""
    x = torch.full((len(rows), max(len(p) + len(t) for p, t, _, _ in rows) - 1), pad, dtype=torch.long)
    y = torch.full_like(x, -1)
    for r, (prompt, tokens, sampled, _) in enumerate(rows):
        ids = prompt + tokens
        x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[r, len(prompt) - 1:len(ids) - 1] = torch.tensor([t if s else -1 for t, s in zip(tokens, sampled)])
    return x, y, torch.tensor([a for *_, a in rows], dtype=torch.float32)


def policy_loss(model, x, y, advantages):
    """-sum of log p(target) x its row's advantage over the trained targets (the caller normalises)."""
    return (model(x, y, loss_reduction="none") * advantages[:, None]).sum()  # the model gives -log p, 0 at -1


def sample_and_score(run, args, engine, grader, conversation, num_samples, max_len, seed):
    """(prompt, answers, rewards): num_samples answers to the conversation's question, rewarded 1 when right."""
    prompt = run.tokenizer.render_for_completion(conversation)
    answers = rollout(engine, prompt, num_samples, max(1, min(args.max_new_tokens, max_len - len(prompt))), seed)
    return prompt, answers, [int(grader.evaluate(conversation, run.tokenizer.decode(t))) for t, _ in answers]


def rl_step(run, args, engine, problems, grader, max_len):
    """train_step for Run.train: sample, score, one policy-gradient backward (see the docstring)."""
    def train_step():
        rows, right = [], 0
        run.orig_model.eval()
        for draw, conversation in problems.take(args.examples_per_step // run.world_size):
            prompt, answers, rewards = sample_and_score(run, args, engine, grader, conversation, args.num_samples,
                                                        max_len, seed=sample_seed(args.seed, draw))
            right += sum(rewards)
            rows += [(prompt, *answer, a) for answer, a in zip(answers, group_advantages(rewards))]
        run.orig_model.train()
        right, trained = sum_over_ranks([right, sum(sum(sampled) for _, _, sampled, _ in rows)], run.device)
        scale = run.world_size / max(trained, 1)  # x world_size: the optimizers average gradients over ranks
        loss_sum, B = 0, args.device_batch_size
        for i in range(0, len(rows), B):
            x, y, advantages = (t.to(run.device) for t in pad_rows(rows[i:i + B], run.tokenizer.get_bos_token_id()))
            with run.autocast:
                loss = policy_loss(run.model, x, y, advantages)
            (loss * scale).backward()
            loss_sum = loss_sum + loss.detach()
        reward = right / (args.examples_per_step * args.num_samples)
        run.curve.setdefault("reward", []).append(reward)  # one per step, saved and resumed with the curve
        if (run.step + 1) % args.log_every == 0:
            print0(f"step {run.step + 1:05d} | mean reward {reward:.4f} | sampled tokens {trained:,}")
        return loss_sum * scale, trained
    return train_step


def pass_at_k(run, args, engine, val_set, grader, max_len):
    """(pass@1, pass@k) over the first --eval-problems held-out problems, k = --eval-samples."""
    indices = range(run.rank, min(args.eval_problems, len(val_set)), run.world_size)
    right = solved = 0
    for i in indices:
        correct = sum(sample_and_score(run, args, engine, grader, val_set[i], args.eval_samples, max_len, seed=i)[2])
        right, solved = right + correct, solved + (correct > 0)
    right, solved, n = sum_over_ranks([right, solved, len(indices)], run.device)
    return right / (n * args.eval_samples), solved / n


def evaluator(run, args, engine, val_set, grader, max_len):
    """evaluate() for Run.train: pass@1 and pass@k into the curve, the references' bpb returned."""
    B = args.device_batch_size
    steps = max(1, min(args.eval_problems, len(val_set)) // (B * run.world_size))
    bpb = training.bpb_evaluator(run, lambda: ConversationLoader(run.tokenizer, val_set, B, max_len, run.rank,
                                                                 run.world_size, run.device), steps)

    def evaluate():
        p1, pk = pass_at_k(run, args, engine, val_set, grader, max_len)
        for key, value in (("pass_step", run.step), ("pass@1", p1), ("pass@k", pk)):
            run.curve.setdefault(key, []).append(value)
        print0(f"step {run.step:05d} | held out: pass@1 {p1:.4f} | pass@{args.eval_samples} {pk:.4f}")
        return bpb()
    return evaluate


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Reinforcement learning on GSM8K (arithmetic offline) with the "
                                            "calculator tool: an on-policy policy gradient on sampled answers.")
    training.add_flags(p, device_batch_size=8, eval_every=60, save_every=60, warmdown_ratio=1.0)
    training.add_chat_flags(p, source="sft", init_lr_frac=0.05, sources=("mid", "sft"))
    add_data_flags(p)
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--examples-per-step", type=POSITIVE, default=16,
                   help="problems per optimizer step (a multiple of the processes)")
    g.add_argument("--num-samples", type=POSITIVE, default=16, help="answers sampled per problem (its group)")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=256, help="longest answer, tool output included")
    g.add_argument("--eval-problems", type=POSITIVE, default=400, help="held-out problems per evaluation")
    g.add_argument("--eval-samples", type=POSITIVE, default=8, help="answers per held-out problem (the k of pass@k)")
    return parse_args(p, argv)


def main(argv=None):
    args = get_args(argv)
    with training.Run(args, "rl", training.chat_tag(args, "rl")) as run:
        if args.examples_per_step % run.world_size:  # before the model and the tasks load
            raise UserError(f"--examples-per-step {args.examples_per_step} is not a multiple of the {run.world_size} "
                            f"processes")
        model, start, train_set, val_set = training.chat_start(
            run, args, lambda preset, split, paths: rl_tasks(preset, split, paths, args.eval_problems))
        grader, max_len = train_set.tasks[0], start["max_seq_len"]  # a mixture of one task: its check
        problems = Problems(train_set, run.rank, run.world_size)
        run.prepare(model, problems, lr_scale=args.init_lr_frac, compile_default=False, dynamic=None)
        engine = Engine(model, run.tokenizer)
        print0(f"batch: {args.examples_per_step} problems/step x {args.num_samples} answers, "
               f"{args.examples_per_step // run.world_size} problems per process")
        run.train(rl_step(run, args, engine, problems, grader, max_len),
                  evaluator(run, args, engine, val_set, grader, max_len),
                  schedule=lambda step, progress: training.lr_multiplier(progress, args.warmdown_ratio,
                                                                         args.final_lr_frac),
                  progress=training.chat_progress(args, problems, len(train_set), run.device), meta=start)
        curve, tenth = run.curve, max(1, len(run.curve["reward"]) // 10)
        return run.report("chat-rl", "Chat RL", {
            "started_from": training.describe(start["source_checkpoint"]), "preset": start["preset"],
            "training_problems": len(train_set), "examples_per_step": args.examples_per_step,
            "samples_per_problem": args.num_samples,
            "mean_reward": {"first tenth": sum(curve["reward"][:tenth]) / tenth,
                            "last tenth": sum(curve["reward"][-tenth:]) / tenth},
            "held_out_pass@1": {"start": curve["pass@1"][0], "end": curve["pass@1"][-1]},
            f"held_out_pass@{args.eval_samples}": {"start": curve["pass@k"][0], "end": curve["pass@k"][-1]}})


if __name__ == "__main__":
    run_main(main)
