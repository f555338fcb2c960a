"""What every task shares: the Task base (an indexable, sliceable list of conversations),
mixtures of tasks, the multiple-choice rendering, and the downloader that
fetches a Hugging Face dataset's auto-converted parquet once into $SPEEDCHAT_BASE_DIR/tasks_data/.

A conversation is {"messages": [{"role": "user"|"assistant"|"system", "content": ...}], ...}
where assistant content is a str or a list of parts {"type": "text"|"python"|"python_output",
"text": str}. Eval tasks add what scoring needs (e.g. "letters" for multiple choice) as extra
keys; render_conversation ignores them.
"""

import functools
import gzip
import json
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from common import UserError, atomic_write, file_lock, get_base_dir, print0
from corpora import check_parquet
from download import DownloadError, download_file, request
from tokenizer import conversation_problem

# ---------------------------------------------------------------------------
# Task base


class Task:
    """A list of conversations, viewed through a slice: task[i] is example start + i*step.
    Subclasses implement get_example(index) and, unless they keep a dataset's `rows`,
    num_examples(); eval tasks also set eval_type ("categorical": the answer is one of
    conversation["letters"]; "generative": the model writes an answer) and implement
    evaluate(conversation, completion) -> bool."""

    eval_type = None

    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0 and (stop is None or stop >= start) and step >= 1, (start, stop, step)
        self.start, self.stop, self.step = start, stop, step

    @property
    def name(self) -> str:
        return type(self).__name__

    def num_examples(self):
        return len(self.rows)

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        index += n if index < 0 else 0
        assert 0 <= index < n, f"{self.name}: index {index} out of range for {n} examples"
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskMixture(Task):
    """All examples of several tasks, shuffled together with a fixed seed (the same order on
    every run and every rank). List a task twice to see it twice as often."""

    def __init__(self, tasks, seed=42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        sizes = [len(t) for t in self.tasks]
        self.task_ids = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        self.example_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes] or [np.zeros(0, np.int64)])
        order = np.random.default_rng(seed).permutation(len(self.task_ids))
        self.task_ids, self.example_ids = self.task_ids[order], self.example_ids[order]

    def num_examples(self):
        return len(self.task_ids)

    def get_example(self, index):
        return self.tasks[int(self.task_ids[index])][int(self.example_ids[index])]


# ---------------------------------------------------------------------------
# Multiple choice (ARC, MMLU): the question, lettered options, and a one-letter answer.

LETTERS = "ABCDEFGHIJ"


def render_mc(question: str, choices) -> str:
    """The user turn of a multiple-choice question. Options start at the beginning of a
    line ("A. ...") so the letter is tokenized the same way as the bare answer "A"."""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
    return f"{question.strip()}\n\n{options}\n\nAnswer with the letter of the correct option."


def mc_conversation(question: str, choices, answer_index: int, **extra) -> dict:
    letters = list(LETTERS[:len(choices)])
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, choices)},
            {"role": "assistant", "content": letters[answer_index]},
        ],
        "letters": letters,
        **extra,
    }


class MultipleChoiceTask(Task):
    """Categorical eval: the evaluator restricts the next-token logits to
    conversation["letters"] and passes the chosen letter as the completion."""

    eval_type = "categorical"

    def evaluate(self, conversation, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]


# ---------------------------------------------------------------------------
# Answer parsing shared by generative tasks

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text):
    """'1,000' -> '1000', '$5' -> '5', '3.50' -> '3.5', '7.0' -> '7'."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def last_number(text: str):
    """The last number written in `text` (normalized), or None."""
    found = NUMBER.findall(text or "")
    return normalize_number(found[-1]) if found else None


# ---------------------------------------------------------------------------
# Conversations from files (CustomJSON): the tokenizer's check, and a reply to train on


def check_conversation(messages) -> str | None:
    """Why `messages` is not a conversation to train on, or None when it is."""
    problem = conversation_problem(messages)
    if problem is None and messages[-1]["role"] != "assistant":
        problem = "the last message must be from the assistant"
    return problem


# ---------------------------------------------------------------------------
# Local files in the sources' own formats

def read_jsonl(path):
    """Rows of a .jsonl (or .jsonl.gz) file; blank lines skipped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg})")
    return rows


def read_local_rows(path, what, path_flag):
    """Rows from a local copy: a .parquet / .jsonl / .jsonl.gz / .json file, or a folder of them."""
    path = Path(path).expanduser()
    files = sorted(p for p in path.rglob("*") if _row_file(p)) if path.is_dir() else [path] if _row_file(path) else []
    if not files:
        raise UserError(f"{what}: {path_flag} {path} is not a .parquet/.jsonl/.json file or a folder of them")
    rows = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq
            rows.extend(pq.read_table(f).to_pylist())
        elif f.suffix == ".json":
            data = json.loads(f.read_text(encoding="utf-8"))
            rows.extend(data if isinstance(data, list) else [data])
        else:
            rows.extend(read_jsonl(f))
    return rows


def _row_file(p: Path):
    return p.is_file() and (p.suffix in (".parquet", ".json") or p.name.endswith((".jsonl", ".jsonl.gz")))


class ParquetRows:
    """Random access to the rows of parquet files without turning them all into Python
    objects up front (SmolTalk has ~460k conversations)."""

    def __init__(self, files):
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.table = pa.concat_tables([pq.read_table(f) for f in files])

    def __len__(self):
        return self.table.num_rows

    def __getitem__(self, i):
        return self.table.slice(i, 1).to_pylist()[0]

    def iter_rows(self, batch_rows=4096):
        """Every row in order, converted a batch at a time (memory stays small)."""
        for batch in self.table.to_batches(max_chunksize=batch_rows):
            yield from batch.to_pylist()

    def keep(self, mask):
        """Keep only the rows where `mask` (one bool per row) is true."""
        import pyarrow as pa

        self.table = self.table.filter(pa.array(mask, type=pa.bool_()))


def load_rows(repo, config, split, path, what, path_flag, local_format):
    """Rows of a dataset split: from `path` when given, else downloaded once from the Hub."""
    if path is not None:
        return read_local_rows(path, what, path_flag)
    hint = f"offline, pass {path_flag} PATH (a local copy: {local_format})"
    return ParquetRows(download_hf_parquet(repo, config, split, what=what, hint=hint))


# ---------------------------------------------------------------------------
# Hugging Face parquet downloader: GET {HF}/api/datasets/<repo>/parquet/<config>/<split>
# lists the parquet URLs of one split; each is fetched once (retries, resume, atomic rename).

HF_URL = "https://huggingface.co"
TIMEOUT = 60.0           # seconds without data before a retry
RETRIES = 5
RETRY_BACKOFF = 2.0      # seconds, doubled each retry; tests set it to 0


def download_hf_parquet(repo, config, split, what=None, hint="") -> list[Path]:
    """The local parquet files of one split of a Hub dataset, downloaded on first use into
    $SPEEDCHAT_BASE_DIR/tasks_data/<owner>__<name>/<config>/<split>/. Under torchrun every
    rank may call this: a file lock lets one download while the others wait."""
    what = what or repo
    folder = get_base_dir() / "tasks_data" / repo.replace("/", "__") / config / split
    manifest = folder / "files.json"
    if manifest.exists():
        return [folder / name for name in json.loads(manifest.read_text())]
    with file_lock(folder / ".lock"):
        if not manifest.exists():  # another process may have finished while we waited
            try:
                names = _download_split(repo, config, split, folder, what)
            except (DownloadError, ValueError) as e:  # ValueError: no list of parquet URLs
                problem = " ".join(str(e).split())[:400]  # one line, however the exception printed
                raise UserError(f"{what}: {problem}" + (f"; {hint}" if hint else "")) from None
            atomic_write(manifest, json.dumps(names))
    return [folder / name for name in json.loads(manifest.read_text())]


def _download_split(repo, config, split, folder, what):
    """Fetch the parquet URLs the Hub lists for a split (an unreachable host fails at once), then
    each file through download_file (resumed, retried, checked, renamed into place)."""
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    retry = dict(retries=RETRIES - 1, backoff=RETRY_BACKOFF, timeout=TIMEOUT, headers=headers)
    url = f"{os.environ.get('SPEEDCHAT_HF_URL', HF_URL).rstrip('/')}/api/datasets/{repo}/parquet/{config}/{split}"
    try:
        urls = request(url, **retry).json()
    except ValueError:  # not JSON
        urls = None
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ValueError(f"{url} did not return a list of parquet URLs")
    names = [f"{i:04d}.parquet" for i in range(len(urls))]
    for url, name in zip(urls, names):
        if not (folder / name).exists():
            print0(f"{what}: downloading {url}")
            download_file(url, folder / name, validate=functools.partial(check_parquet, column=None), **retry)
            print0(f"{what}: saved {folder / name} ({(folder / name).stat().st_size / 1e6:.1f} MB)")
    return names
