"""CORE: the DCLM in-context-learning score that nanochat reports for base models.

The eval bundle holds 22 tasks (core.yaml: data file, few-shot count, task type, continuation
delimiter) and their random baselines (eval_meta_data.csv). Every item is rendered into one
prompt per option, the options go through the model as one padded batch, and

  multiple_choice    one context, one continuation per choice: the lowest mean loss over the
                     tokens after the options' common token prefix wins
  schema             one context per option, the same continuation: the lowest mean loss over
                     the options' common token suffix wins
  language_modeling  one context and continuation: correct when greedy argmax reproduces
                     every continuation token

A task's accuracy is centered against its random baseline b: (acc - b) / (1 - b), so chance
scores 0 and perfect scores 1. CORE is the mean of the centered accuracies.

"Time to GPT-2" means beating GPT-2 XL's CORE (0.256525) as nanochat's evaluation computes it,
so which tokens are scored, which items run and which few-shot examples they see follow that
evaluation's rules; our additions (standard errors, the PARTIAL and APPROXIMATE marks) only report.

This file needs only model(ids) -> logits (B, T, V), tokenizer.encode(str, prepend=bos_id) ->
list of ids and tokenizer.get_bos_token_id(), so tests drive it with a fake model and tokenizer.
"""

import bz2
import csv
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from common import UserError, atomic_path, get_base_dir, print0

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_URL_ENV = "SPEEDCHAT_EVAL_BUNDLE_URL"  # override the download address (tests, mirrors)
SHUFFLE_SEED = 1337  # each task's rows are shuffled with random.Random(1337) before anything else
FEWSHOT_SEED = 1234  # item idx (in the shuffled rows) draws its examples with random.Random(1234 + idx)
EXAMPLE_DELIMITER = "\n\n"  # between few-shot examples and before the query
DEFAULT_CONTINUATION_DELIMITER = " "  # the gauntlet's default when core.yaml names none

# ---------------------------------------------------------------------------
# The bundle: core.yaml, eval_meta_data.csv, eval_data/*.jsonl


def read_baselines(meta_csv) -> dict[str, float]:
    """Random baseline per task from eval_meta_data.csv, as a fraction (the file has percent)."""
    with open(meta_csv, newline="", encoding="utf-8") as f:
        return {row["Eval Task"].strip(): float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}


def load_bundle(bundle_dir) -> list[dict]:
    """The CORE tasks in core.yaml order: label, path (of the jsonl, see task_path), type,
    num_fewshot, delimiter, baseline. A missing data file is not an error here (see load_task_data)."""
    bundle_dir = Path(bundle_dir)
    yaml_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    if not (yaml_path.exists() and meta_path.exists()):
        raise UserError(f"{bundle_dir} lacks core.yaml or eval_meta_data.csv: point --bundle at an unzipped "
                        f"eval bundle (or leave --bundle out to download it)")
    baselines = read_baselines(meta_path)
    # has_categories (jeopardy) only splits the gauntlet's logging; CORE scores all items together
    return [dict(label=spec["label"], path=task_path(bundle_dir, spec["dataset_uri"]),
                 type=spec["icl_task_type"], num_fewshot=int(spec["num_fewshot"][0]),
                 delimiter=spec.get("continuation_delimiter", DEFAULT_CONTINUATION_DELIMITER),
                 baseline=baselines[spec["label"]])
            for spec in yaml.safe_load(yaml_path.read_text(encoding="utf-8"))["icl_tasks"]]


def task_path(bundle_dir, uri) -> Path:
    """A task's jsonl: the bundle's own, else one that convert_missing wrote, else the bundle's (missing)."""
    own, converted = Path(bundle_dir) / "eval_data" / uri, get_base_dir() / "core_converted" / uri
    return converted if converted.exists() and not own.exists() else own


def load_task_data(task) -> list[dict] | None:
    """The task's rows in file order, or None when its jsonl file is missing."""
    path = Path(task["path"])
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# The tasks an offline bundle lacks, converted from raw copies. The bundle's own files came
# from preprocessing we cannot see, so these are an approximation and every row says so;
# they are kept apart from any bundle and used only where the bundle has no file of its own.

def hellaswag_rows(path) -> list[dict]:
    """Rows from hellaswag_val_full.txt.bz2: six lines per item, "activity: ctx", the gold index,
    four endings. The bundle's query capitalizes ctx_b, the trailing fragment of ctx, which this
    file leaves lowercase and does not delimit: the lowercase fragment after the last sentence
    end (or the colon) stands for it."""
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows = []
    for i in range(0, len(lines) - 5, 6):
        m = re.fullmatch(r"(.*[.!?:] )([a-z].*)", lines[i])
        query = m[1] + m[2].capitalize() if m else lines[i]
        rows.append({"query": query, "choices": lines[i + 2:i + 6], "gold": int(lines[i + 1])})
    return rows


def squad_rows(path) -> list[dict]:
    """Rows from SQuAD v1.1 dev (dev-v1.1.json.zip): every question in file order, its first answer."""
    with zipfile.ZipFile(path) as zf:
        dev = json.loads(zf.read("dev-v1.1.json"))
    return [{"context": f"Context: {paragraph['context']}\nQuestion: {qa['question']}\nAnswer:",
             "continuation": qa["answers"][0]["text"]}
            for article in dev["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]


# bundle file -> (raw file, converter); hellaswag.jsonl serves both hellaswag tasks (0- and 10-shot)
CONVERTERS = {"language_understanding/hellaswag.jsonl": ("hellaswag_val_full.txt.bz2", hellaswag_rows),
              "reading_comprehension/squad.jsonl": ("dev-v1.1.json.zip", squad_rows)}


def convert_missing(raw_dir) -> list[Path]:
    """Convert the raw files in raw_dir that CONVERTERS knows into $SPEEDCHAT_BASE_DIR/core_converted,
    where task_path finds them for any bundle that lacks them. Returns the files written."""
    written = []
    for name, (raw_name, convert) in CONVERTERS.items():
        dest, raw = get_base_dir() / "core_converted" / name, Path(raw_dir) / raw_name
        if not raw.exists():
            print0(f"no {raw}: {name} is not converted")
            continue
        rows = convert(raw)
        with atomic_path(dest) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({**row, "converted": raw_name}) + "\n" for row in rows)
        print0(f"{dest}: {len(rows):,} rows from {raw} (an approximation of the bundle's {Path(name).name})")
        written.append(dest)
    return written


# ---------------------------------------------------------------------------
# Prompts: each option of an item becomes (context, continuation), context + continuation = prompt


def task_rows(data, max_per_task=None) -> list[dict]:
    """The rows a task evaluates, in order: shuffled with Random(1337), then cut to max_per_task,
    as the published figures were computed, so that item i here is the reference's item i and
    draws the same few-shot examples (from these rows)."""
    rows = list(data)
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows[:max_per_task] if max_per_task and max_per_task > 0 else rows


def fewshot_examples(rows, idx, k) -> list[dict]:
    """k other rows, drawn as the reference draws them: Random(1234 + idx).sample of the list of
    every index but idx. sample() picks positions from the length alone, so sampling range(n - 1)
    and skipping idx gives the same rows without building that list per item (20k-row tasks)."""
    k = min(k, len(rows) - 1)  # the reference needs k < len(rows); a tiny --max-per-task may not have it
    if k <= 0:
        return []
    picked = random.Random(FEWSHOT_SEED + idx).sample(range(len(rows) - 1), k)
    return [rows[j + (j >= idx)] for j in picked]


def render_item(task, rows, idx) -> tuple[list[tuple[str, str]], int]:
    """The item's options as (context, continuation) string pairs, and the gold option's index.
    The continuation delimiter belongs to the context. Few-shot examples come first, each one
    followed by a blank line."""
    item, delim, shots = rows[idx], task["delimiter"], fewshot_examples(rows, idx, task["num_fewshot"])
    kind = task["type"]
    if kind == "multiple_choice":
        prefix = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}{EXAMPLE_DELIMITER}" for ex in shots)
        context = prefix + item["query"] + delim
        return [(context, choice) for choice in item["choices"]], int(item["gold"])
    if kind == "schema":
        prefix = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}{EXAMPLE_DELIMITER}"
                         for ex in shots)
        return [(prefix + ctx + delim, item["continuation"]) for ctx in item["context_options"]], int(item["gold"])
    assert kind == "language_modeling", kind
    # The gauntlet trims each context and strips the trailing whitespace of the prompt, so a
    # delimiter's final space moves into the continuation (" Paris" is one token, " " + "Paris" two).
    prefix = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}{EXAMPLE_DELIMITER}" for ex in shots)
    full = prefix + item["context"].strip() + delim + item["continuation"]
    context = (prefix + item["context"].strip() + delim).rstrip()
    return [(context, full[len(context):])], 0


# ---------------------------------------------------------------------------
# Tokens: which tokens of each option are scored


def common_prefix_length(seqs) -> int:
    """How many leading tokens all sequences share."""
    return next((i for i, column in enumerate(zip(*seqs)) if len(set(column)) > 1), min(map(len, seqs)))


def tokenize_item(tokenizer, task_type, options, bos) -> tuple[list[list[int]], list[int]]:
    """Token ids of each option's whole prompt (BOS first) and the index of its first scored token.
    The whole prompt: the reference crops from the left only for a model that cannot take the
    length, and ours grows its rotary tables on demand."""
    # one string at a time: a batch call spins up a thread pool, too costly for a few short prompts
    seqs = [tokenizer.encode(ctx + cont, prepend=bos) for ctx, cont in options]
    if task_type == "multiple_choice":
        # Scored from the end of the prefix ALL options share, so words every choice starts with
        # (PIQA's, COPA's) are not scored, exactly as the published figures were computed.
        starts = [common_prefix_length(seqs)] * len(seqs)
    elif task_type == "schema":
        # Scored over the suffix all options share, context tokens included ("an" of "man"/
        # "woman"), exactly as the published Winograd/WinoGrande figures were computed.
        shared = common_prefix_length([s[::-1] for s in seqs])
        starts = [len(s) - shared for s in seqs]
    else:  # the continuation is what follows the context's tokens (a merge across the boundary counts)
        starts = [common_prefix_length([seqs[0], tokenizer.encode(options[0][0], prepend=bos)])]
    return seqs, [min(st, len(s) - 1) for s, st in zip(seqs, starts)]  # at least one token scored


# ---------------------------------------------------------------------------
# Scoring: one padded forward pass per item, everything after it stays on the device


def item_batch(seqs, starts, pad_id):
    """CPU tensors for one item: ids (B, T) right-padded, and for every scored position its row,
    its column (the position whose logits predict the token) and the token itself."""
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    rows, cols = [], []
    for b, (seq, start) in enumerate(zip(seqs, starts)):
        ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        rows += [b] * (len(seq) - start)
        cols += range(start - 1, len(seq) - 1)
    rows, cols = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    return ids, rows, cols, ids[rows, cols + 1]


def _to_device(tensor, device):
    if device.type == "cuda":  # pinned memory: the copy is asynchronous, the CPU moves on
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def score_item(model, seqs, starts, gold, task_type, device, pad_id):
    """0-d bool tensor on `device`: is the item answered correctly? No host sync."""
    ids, rows, cols, targets = (_to_device(t, device) for t in item_batch(seqs, starts, pad_id))
    logits = model(ids)  # (B, T, V)
    picked = logits[rows, cols].float()  # (N, V): only the positions that predict continuation tokens
    if task_type == "language_modeling":
        return (picked.argmax(dim=-1) == targets).all()
    losses = F.cross_entropy(picked, targets, reduction="none")
    loss_sum = torch.zeros(len(seqs), device=device).index_add_(0, rows, losses)
    counts = torch.tensor([len(s) - st for s, st in zip(seqs, starts)], dtype=torch.float32)
    mean_loss = loss_sum / _to_device(counts, device)
    return mean_loss.argmin() == gold  # ties go to the first option (argmin returns the first minimum)


def evaluate_task(model, tokenizer, task, data, device, max_per_task=None, rank=0, world_size=1,
                  progress=False) -> tuple[int, int]:
    """(correct, evaluated) over all ranks for the task's rows `data` (in file order). Rank r
    takes items r, r + world_size, ... of task_rows()."""
    device = torch.device(device)
    bos = tokenizer.get_bos_token_id()
    rows = task_rows(data, max_per_task)
    mine = range(rank, len(rows), world_size)
    if progress:
        from tqdm import tqdm

        mine = tqdm(mine, desc=task["label"], leave=False, dynamic_ncols=True)
    results = []
    with torch.no_grad():
        for idx in mine:
            options, gold = render_item(task, rows, idx)
            seqs, starts = tokenize_item(tokenizer, task["type"], options, bos)
            results.append(score_item(model, seqs, starts, gold, task["type"], device, bos))
    correct = torch.stack(results).sum() if results else torch.zeros((), device=device, dtype=torch.long)
    totals = torch.stack([correct.long(), torch.tensor(len(results), device=device)])
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    correct, count = totals.tolist()
    return int(correct), int(count)


# ---------------------------------------------------------------------------
# Statistics


def centered(accuracy, baseline) -> float:
    return (accuracy - baseline) / (1 - baseline)


def task_result(task, correct, count) -> dict:
    acc = correct / count if count else float("nan")
    se = math.sqrt(acc * (1 - acc) / count) if count else float("nan")
    return dict(type=task["type"], num_fewshot=task["num_fewshot"], baseline=task["baseline"], n=count,
                correct=correct, accuracy=acc, accuracy_se=se,
                centered=centered(acc, task["baseline"]), centered_se=se / (1 - task["baseline"]))


def core_summary(results: dict) -> dict:
    """CORE over the tasks that ran. results: label -> task_result() or {"missing": path}.
    core_se = sqrt(sum of centered se^2) / n_tasks (the tasks are independent samples)."""
    done = {k: r for k, r in results.items() if not r.get("missing")}
    missing = [k for k, r in results.items() if r.get("missing")]
    n = len(done)
    core = sum(r["centered"] for r in done.values()) / n if n else None
    core_se = math.sqrt(sum(r["centered_se"] ** 2 for r in done.values())) / n if n else None
    return dict(core=core, core_se=core_se, n_tasks=n, tasks=list(done), missing=missing,
                partial=bool(missing) or not n, approximate=[k for k, r in done.items() if r.get("converted")])


def core_line(summary: dict, total_tasks: int) -> str:
    """The one line that states CORE, and says so loudly when it averages fewer than all tasks
    or scores some on files converted here instead of the bundle's own."""
    if summary["core"] is None:
        return f"CORE: not computed (all {total_tasks} task files are missing)"
    line = f"CORE: {summary['core']:.4f} ± {summary['core_se']:.4f}"
    if summary["partial"]:
        line += (f" (PARTIAL: mean over {summary['n_tasks']} of {total_tasks} tasks; "
                 f"missing {', '.join(summary['missing'])})")
    if summary["approximate"]:
        line += f" (APPROXIMATE: {', '.join(summary['approximate'])} scored on locally converted files)"
    return line


def run_core(model, tokenizer, bundle_dir, device, max_per_task=None, rank=0, world_size=1,
             progress=True) -> tuple[dict, dict]:
    """Evaluate every task of the bundle: (results per task label, core_summary)."""
    tasks = load_bundle(bundle_dir)
    results = {}
    for task in tasks:
        data = load_task_data(task)
        if data is None:
            print0(f"{task['label']:<34} MISSING {task['path']}")
            results[task["label"]] = dict(missing=True, path=str(task["path"]), type=task["type"])
            continue
        t0 = time.perf_counter()
        correct, count = evaluate_task(model, tokenizer, task, data, device, max_per_task, rank, world_size,
                                       progress=progress and rank == 0)
        r = results[task["label"]] = task_result(task, correct, count)
        r["converted"] = data[0].get("converted") if data else None  # the raw file it was converted from
        print0(f"{task['label']:<34} acc {r['accuracy']:.4f} ± {r['accuracy_se']:.4f}  centered "
               f"{r['centered']:+.4f}  n={count}  ({time.perf_counter() - t0:.1f}s)")
    summary = core_summary(results)
    print0(core_line(summary, len(tasks)))
    return results, summary


# ---------------------------------------------------------------------------
# Result CSVs: ours, and the bundle's GPT-2 references (Task, Accuracy, Centered + a CORE row)


def write_core_csv(path, results: dict, summary: dict):
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Task", "Accuracy", "Accuracy_SE", "Centered", "Centered_SE", "N"])
        for label, r in results.items():
            if r.get("missing"):
                w.writerow([label, "missing", "", "", "", 0])
            else:
                w.writerow([label, f"{r['accuracy']:.6f}", f"{r['accuracy_se']:.6f}", f"{r['centered']:.6f}",
                            f"{r['centered_se']:.6f}", r["n"]])
        if summary["core"] is not None:
            w.writerow(["CORE", "", "", f"{summary['core']:.6f}", f"{summary['core_se']:.6f}", ""])


def read_results_csv(path) -> tuple[dict[str, float], float | None]:
    """(accuracy per task, the CORE value the file states or None) from a per-task CSV: the
    bundle's openai-community-gpt2*.csv (padded `Task , Accuracy , Centered`) or ours."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [[cell.strip() for cell in row] for row in csv.reader(f) if row]
    header, accuracies, stated = rows[0], {}, None
    acc_col, cen_col = header.index("Accuracy"), header.index("Centered")
    for row in rows[1:]:
        if row[0] == "CORE":
            stated = float(row[cen_col])
        elif row[acc_col] not in ("", "missing"):
            accuracies[row[0]] = float(row[acc_col])
    return accuracies, stated


def reference_cores(bundle_dir, tasks=None) -> dict[str, float]:
    """CORE of each reference model in the bundle (openai-community-gpt2*.csv) from its per-task
    accuracies and the bundle's baselines; `tasks` limits the mean to those tasks, to compare
    with a partial CORE on equal terms."""
    baselines = read_baselines(Path(bundle_dir) / "eval_meta_data.csv")
    out = {}
    for path in sorted(Path(bundle_dir).glob("openai-community-*.csv")):
        accuracies, _ = read_results_csv(path)
        cent = [centered(acc, baselines[label]) for label, acc in accuracies.items() if tasks is None or label in tasks]
        out[path.stem.removeprefix("openai-community-")] = sum(cent) / len(cent)
    return out


# ---------------------------------------------------------------------------
# Download: once, into $SPEEDCHAT_BASE_DIR/eval_bundle


def ensure_bundle() -> Path:
    """The eval bundle folder, downloading and unzipping it on first use (atomically: a folder
    named eval_bundle is always complete). URL from $SPEEDCHAT_EVAL_BUNDLE_URL if set."""
    base = get_base_dir()
    dest = base / "eval_bundle"
    if (dest / "core.yaml").exists():
        return dest
    url = os.environ.get(BUNDLE_URL_ENV) or BUNDLE_URL
    zip_path = base / "eval_bundle.zip"
    print0(f"downloading the CORE eval bundle from {url}")
    from dataset import DownloadError, download_file

    try:  # resumed, retried and size-checked; the zip itself is checked when it is opened below
        download_file(url, zip_path, retries=4, backoff=2.0, timeout=60, validate=None)
    except DownloadError as e:
        raise UserError(f"could not download {url} ({e.reason}): check the network, or pass --bundle PATH "
                        f"to an unzipped eval bundle")
    with tempfile.TemporaryDirectory(dir=base, prefix=".eval_bundle.") as tmp:
        unzipped = Path(tmp) / "unzipped"  # inside tmp, so that it can be moved out whatever the zip's layout
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(unzipped)
            found = sorted(unzipped.rglob("core.yaml"), key=lambda p: len(p.parts))
        except zipfile.BadZipFile:
            found = []
        if not found:
            zip_path.unlink(missing_ok=True)
            raise UserError(f"{url} did not give a CORE eval bundle (a zip with core.yaml): check the address "
                            f"(${BUNDLE_URL_ENV}) and retry")
        if dest.exists():  # an incomplete folder from someone else's hand: replace it
            shutil.rmtree(dest)
        os.replace(found[0].parent, dest)
    zip_path.unlink(missing_ok=True)
    return dest
