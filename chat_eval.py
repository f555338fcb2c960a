"""Chat evaluation of the mid-trained, fine-tuned (sft) or RL-trained model.

    python -m chat_eval --source sft                                   # every task
    python -m chat_eval --source mid --task-name GSM8K,MMLU --max-problems 100
    torchrun --standalone --nproc_per_node=8 -m chat_eval -- --source sft

Two kinds of task:
- categorical (ARC-Easy, ARC-Challenge, MMLU): the prompt ends where the assistant would write
  the answer letter; the model's logits there, restricted to the option letters' token ids,
  pick the letter (batched, no sampling);
- generative (GSM8K, HumanEval, SpellingBee, Arithmetic): the engine writes a reply (greedy at
  --temperature 0, calculator tool on) and the task checks it; HumanEval runs the code in the
  sandbox of execution.py. With --num-samples k a problem counts as solved if any of its k
  samples is (pass@k; use a temperature > 0 for k > 1).

Each task gets its accuracy +- the binomial standard error sqrt(acc (1 - acc) / n). ChatCORE is
the mean over the evaluated tasks of the centered accuracy (acc - baseline) / (1 - baseline),
baseline 0.25 for the four-way multiple choice and 0 for generative tasks: 0 is chance, 1 is
perfect. Its standard error comes from the tasks' errors. ChatCORE over ARC-Easy, ARC-Challenge,
MMLU, GSM8K, HumanEval and SpellingBee (the default task list with --preset full) is the
nanochat-comparable number; the offline preset evaluates what needs no download (SpellingBee,
Arithmetic) plus any task given a local copy (--arc-path, --mmlu-path, ...). A task whose data
cannot be had is reported as skipped, with the reason.

Under torchrun, rank r takes problems r, r + world_size, ...; the counts are summed over ranks.
"""

import argparse
import math
import time
from contextlib import nullcontext

import torch

from common import (POSITIVE, POSITIVE_OR_ALL, STEP, UserError, compute_cleanup, compute_init, format_seconds,
                    get_dtype, parse_args, print0, run_main, sum_over_ranks)
from tasks.mixtures import add_data_flags, arc_path, data_paths, resolve_preset
from report import CHATCORE_TASKS

TASK_NAMES = CHATCORE_TASKS + ["Arithmetic"]
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25}  # random guessing; 0 for generative tasks
PATH_FLAGS = {"ARC-Easy": "arc_path", "ARC-Challenge": "arc_path", "MMLU": "mmlu_path", "GSM8K": "gsm8k_path",
              "HumanEval": "humaneval_path"}  # tasks that need a download unless given a local copy
GENERATED_SIZE = 256  # problems of the generated test tasks (SpellingBee, Arithmetic)


# ---------------------------------------------------------------------------
# Loading tasks


def build_task(name, paths):
    if name in ("ARC-Easy", "ARC-Challenge"):
        from tasks.arc import ARC
        return ARC(name, "test", path=arc_path(paths.get("arc_path"), name, "test"))
    if name == "MMLU":
        from tasks.mmlu import MMLU
        return MMLU("all", "test", path=paths.get("mmlu_path"))
    if name == "GSM8K":
        from tasks.gsm8k import GSM8K
        return GSM8K("main", "test", path=paths.get("gsm8k_path"))
    if name == "HumanEval":
        from tasks.humaneval import HumanEval
        return HumanEval(path=paths.get("humaneval_path"))
    if name == "SpellingBee":
        from tasks.spelling import SpellingBee
        return SpellingBee(size=GENERATED_SIZE, split="test", words_path=paths.get("words_path"))
    assert name == "Arithmetic", name  # task_names() checked the names
    from tasks.arithmetic import Arithmetic
    return Arithmetic(size=GENERATED_SIZE, split="test")


def load_task(name, paths, preset):
    """(task, None), or (None, why it is skipped): data that cannot be had is never a crash."""
    flag = PATH_FLAGS.get(name)
    if preset == "offline" and flag and not paths.get(flag):
        return None, f"needs a download (offline preset): pass --{flag.replace('_', '-')} PATH for a local copy"
    try:
        task = build_task(name, paths)
        if len(task) == 0:
            return None, "no problems in its data"
        return task, None
    except (UserError, OSError, ValueError, KeyError, ImportError) as e:
        return None, " ".join(str(e).split()) or type(e).__name__


def task_names(text, preset):
    if not text:
        return list(TASK_NAMES if preset == "offline" else CHATCORE_TASKS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    by_lower = {n.lower(): n for n in TASK_NAMES}
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown:
        raise UserError(f"unknown --task-name {', '.join(unknown)}: use a comma list of {', '.join(TASK_NAMES)}")
    return [by_lower[n.lower()] for n in names]


# ---------------------------------------------------------------------------
# Running one task on this rank's share of the problems


def letter_token(tokenizer, letter):
    ids = tokenizer.encode(letter)
    assert len(ids) == 1, f"a byte-level BPE has every ASCII letter as one token, got {ids} for {letter!r}"
    return ids[0]


@torch.no_grad()
def run_categorical(model, tokenizer, task, indices, batch_size=8, autocast=None, on_progress=None):
    """Number of problems (of `indices`) answered correctly: per problem, the argmax of the
    next-token logits over its option letters. Prompts of a batch are right-padded, which does not
    change the logits at their last real position (attention is causal)."""
    device = next(model.parameters()).device
    autocast = autocast or nullcontext()
    bos = tokenizer.get_bos_token_id()
    correct = 0
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        x = torch.full((len(prompts), max(map(len, prompts))), bos, dtype=torch.long)
        for r, p in enumerate(prompts):
            x[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        answer_at = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long, device=device)
        with autocast:
            logits = model(x.to(device), positions=answer_at)  # (rows, vocab): the answer position only
        for r, conversation in enumerate(conversations):
            letters = conversation["letters"]
            ids = torch.tensor([letter_token(tokenizer, l) for l in letters], device=logits.device)
            choice = letters[int(logits[r].index_select(0, ids).argmax())]
            correct += bool(task.evaluate(conversation, choice))
        if on_progress:
            on_progress(min(start + batch_size, len(indices)), correct)
    return correct


def run_generative(engine, tokenizer, task, indices, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                   seed=42, context_len=None, on_progress=None):
    """Number of problems (of `indices`) for which at least one of `num_samples` replies is correct."""
    correct = 0
    for done, i in enumerate(indices, 1):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        budget = max_new_tokens if context_len is None else max(1, min(max_new_tokens, context_len - len(prompt)))
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=budget,
                                           temperature=temperature, top_k=top_k, seed=seed + i)
        completions = [tokenizer.decode(r[len(prompt):]) for r in results]
        correct += any(task.evaluate(conversation, c) for c in completions)
        if on_progress:
            on_progress(done, correct)
    return correct


def evaluate_task(task, model, tokenizer, engine, *, rank=0, world_size=1, max_problems=-1, batch_size=8,
                  num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50, autocast=None, label=None):
    """(correct, total) over all ranks. Rank r takes problems r, r + world_size, ..."""
    n = len(task) if max_problems is None or max_problems < 0 else min(len(task), max_problems)
    indices = list(range(rank, n, world_size))
    label = label or task.name
    t0 = time.time()
    every = max(10, len(indices) // 10)

    def progress(done, correct):
        if done % every == 0 or done == len(indices):
            print0(f"  {label}: {done}/{len(indices)} | {correct} correct ({100 * correct / max(done, 1):.1f}%) | "
                   f"{format_seconds(time.time() - t0)}" + (" (rank 0)" if world_size > 1 else ""))

    assert task.eval_type in ("categorical", "generative"), f"{label} is not an eval task"
    if task.eval_type == "categorical":
        correct = run_categorical(model, tokenizer, task, indices, batch_size, autocast, progress)
    else:
        context_len = getattr(getattr(model, "config", None), "sequence_len", None)
        correct = run_generative(engine, tokenizer, task, indices, num_samples, max_new_tokens, temperature, top_k,
                                 context_len=context_len, on_progress=progress)
    correct, total = sum_over_ranks([correct, len(indices)], next(model.parameters()).device)
    return correct, total


# ---------------------------------------------------------------------------
# Scores


def summarize(counts: dict):
    """{task: (correct, total)} -> ({task: {acc, se, correct, total, centered}}, chatcore, chatcore_se).
    chatcore is None when no task was evaluated."""
    results, centered, centered_var = {}, [], []
    for name, (correct, total) in counts.items():
        if total == 0:
            continue
        acc = correct / total
        se = math.sqrt(acc * (1 - acc) / total)
        baseline = BASELINES.get(name, 0.0)
        c = (acc - baseline) / (1 - baseline)
        results[name] = {"acc": acc, "se": se, "correct": correct, "total": total, "centered": c}
        centered.append(c)
        centered_var.append((se / (1 - baseline)) ** 2)
    if not centered:
        return results, None, None
    return results, sum(centered) / len(centered), math.sqrt(sum(centered_var)) / len(centered)


# ---------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a chat model (mid, sft or rl) on categorical and "
                                            "generative tasks.")
    g = p.add_argument_group("model")
    g.add_argument("--source", default="sft", choices=("mid", "sft", "rl"), help="which stage's checkpoint to evaluate")
    g.add_argument("--model-tag", default="", help="checkpoint tag ('' = the latest)")
    g.add_argument("--step", type=STEP, default=-1, help="checkpoint step (-1 = latest)")
    g.add_argument("--device", default="", help="cuda | cpu | mps ('' = autodetect)")
    g = p.add_argument_group("tasks")
    g.add_argument("--task-name", default="",
                   help=f"comma list of {', '.join(TASK_NAMES)} ('' = {', '.join(CHATCORE_TASKS)} with --preset full, "
                        f"all of them with --preset offline)")
    g.add_argument("--max-problems", type=POSITIVE_OR_ALL, default=-1,
                   help="at most this many problems per task (-1 = all)")
    g.add_argument("--batch-size", type=POSITIVE, default=8, help="prompts per forward pass for categorical tasks")
    g.add_argument("--num-samples", type=POSITIVE, default=1, help="samples per problem for generative tasks (pass@k)")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=512, help="longest reply for generative tasks")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens")
    add_data_flags(p)
    args = parse_args(p, argv)
    if args.num_samples > 1 and args.temperature == 0:
        print0("warning: --num-samples > 1 at --temperature 0 gives k identical greedy samples (pass@1)")
    return args


def main(argv=None):
    args = get_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device)
    try:
        return evaluate(args, rank, world_size, device)
    finally:
        compute_cleanup()


def evaluate(args, rank, world_size, device):
    import checkpoint
    from engine import Engine

    t0 = time.time()
    preset = resolve_preset(args.preset, device.type)
    names = task_names(args.task_name, preset)
    model, tokenizer, meta = checkpoint.load_model(args.source, device, tag=args.model_tag or None,
                                                   step=args.step if args.step >= 0 else None, phase="eval")
    engine = Engine(model, tokenizer)
    dtype = get_dtype(device.type)
    autocast = torch.amp.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    print0(f"evaluating {args.source} {meta['tag']} step {meta['step']} | preset {preset} | tasks: {', '.join(names)}")

    counts, skipped = {}, {}
    paths = data_paths(args)
    for name in names:
        task, reason = load_task(name, paths, preset)
        loaded, = sum_over_ranks([task is not None], device)  # every rank runs the task, or none does
        if task is not None and loaded < world_size:
            task, reason = None, "its data could not be loaded on every process"
        if task is None:
            skipped[name] = reason
            print0(f"{name}: skipped: {reason}")
            continue
        print0(f"{name}: {task.eval_type}, {len(task) if args.max_problems < 0 else min(len(task), args.max_problems)} problems")
        counts[name] = evaluate_task(task, model, tokenizer, engine, rank=rank, world_size=world_size,
                                     max_problems=args.max_problems, batch_size=args.batch_size,
                                     num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k, autocast=autocast, label=name)
    results, chatcore, chatcore_se = summarize(counts)
    for name, r in results.items():
        print0(f"{name}: {r['acc']:.4f} ± {r['se']:.4f} ({r['correct']}/{r['total']})")
    if chatcore is None:  # a failure, not a result: the report keeps the section of an earlier run
        raise UserError(f"no task could be evaluated ({len(skipped)} skipped, reasons above): "
                        f"the {args.source} report section is left as it was")
    print0(f"ChatCORE ({len(results)} tasks): {chatcore:.4f} ± {chatcore_se:.4f}")

    if rank == 0:
        import report

        title = {"mid": "Chat evaluation: mid-trained model", "sft": "Chat evaluation: SFT model",
                 "rl": "Chat evaluation: RL model"}[args.source]
        report.write_section(f"chat-eval-{args.source}", title, {
            "model": f"{args.source} {meta['tag']} step {meta['step']}", "preset": preset, "tag": meta["tag"],
            "step": meta["step"], "num_samples": args.num_samples, "temperature": args.temperature,
            "max_problems": None if args.max_problems < 0 else args.max_problems,
            "results": {n: {"acc": r["acc"], "se": r["se"], "correct": r["correct"], "total": r["total"]}
                        for n, r in results.items()},
            "chatcore": chatcore, "chatcore_se": chatcore_se, "chatcore_tasks": list(results), "skipped": skipped,
            "seconds": time.time() - t0},
            text="\n".join(f"- {n}: {r['acc']:.4f} ± {r['se']:.4f} ({r['correct']}/{r['total']})"
                           for n, r in results.items()))
    return {"results": results, "chatcore": chatcore, "chatcore_se": chatcore_se, "skipped": skipped}


if __name__ == "__main__":
    run_main(main)
