"""What the chat stages (mid_train, chat_sft, chat_eval) share about their data: the presets,
the flags that point at local copies of the task datasets, your own chat data (--chat-data,
mid_train and chat_sft), and the generated validation tasks.

    full     real datasets (SmolTalk, MMLU, GSM8K, ARC, HumanEval): downloaded once from the
             Hugging Face Hub, or read from the local copies given with the --*-path flags
    offline  only tasks the project generates (identity, spelling, arithmetic): no network
(default: full on CUDA, offline otherwise).
"""

import argparse
import math
import os
from pathlib import Path

from common import UserError

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


def add_data_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--preset", default="", choices=("",) + PRESETS, metavar="{full,offline}",
                   help="task mixture: full (real datasets, downloads) | offline (generated tasks only, no network) "
                        "('' = full on CUDA, offline otherwise)")
    for name, (env, text) in DATA_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), default=os.environ.get(env) or None, help=f"{text} [env {env}]")


def chat_data_arg(text):
    """PATH[:WEIGHT] -> (path, weight): an argparse type (a colon inside the path is no weight)."""
    path, _, weight = text.rpartition(":")
    try:
        weight = float(weight)
    except ValueError:
        return text, 1.0
    if not path or not 0 < weight < math.inf:
        raise argparse.ArgumentTypeError(f"{text}: the weight after the last ':' must be a positive number")
    return path, weight


def add_chat_data_flag(p):
    p.add_argument("--chat-data", type=chat_data_arg, action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="your own conversations, added to the training mixture (repeatable): JSONL of OpenAI "
                        "{\"messages\": [...]} or ShareGPT {\"conversations\": [...]} lines; WEIGHT 2 takes each twice, "
                        "0.5 every other one (default 1); bad lines are reported and skipped")


def chat_data_tasks(paths) -> list:
    """The --chat-data files as tasks, each with its weight."""
    from tasks.customjson import CustomJSON

    return [CustomJSON(path, weight=weight) for path, weight in paths["chat_data"]]


def resolve_preset(preset, device_type):
    return preset or ("full" if device_type == "cuda" else "offline")


def data_paths(args) -> dict:
    return dict({name: getattr(args, name, None) for name in DATA_FLAGS}, chat_data=getattr(args, "chat_data", []))


def arc_path(path, subset, split):
    """The file (or Hub-layout folder) of one ARC subset and split inside --arc-path, e.g.
    ARC-Easy-Test.jsonl; None when no path was given."""
    if not path:
        return None
    names = {f"{subset}-{split}".lower()} | ({f"{subset}-dev".lower()} if split == "validation" else set())
    path = Path(path).expanduser()
    for f in sorted([path] if path.is_file() else path.rglob("*")):
        if f.is_file() and f.name.lower().startswith(tuple(names)) and \
                f.name.lower().endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")):
            return f
    if (path / subset / split).is_dir():
        return path / subset / split
    raise UserError(f"--arc-path {path}: no {subset}-{split.title()}.jsonl (or {subset}/{split}/ folder) in it")


def offline_val_tasks(words_path=None):
    """The validation conversations when no real validation set is at hand: generated, so every
    machine has them."""
    from tasks.arithmetic import Arithmetic
    from tasks.spelling import SimpleSpelling, SpellingBee

    return [SimpleSpelling(size=200, split="test", words_path=words_path),
            SpellingBee(size=200, split="test", words_path=words_path),
            Arithmetic(size=200, split="test")]


def mixture(tasks, what):
    """The tasks shuffled together (the same order on every run and rank)."""
    from tasks.common import TaskMixture

    mix = TaskMixture(tasks, seed=42)
    if len(mix) == 0:
        raise UserError(f"the {what} mixture is empty: check the data paths")
    return mix
