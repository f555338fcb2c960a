"""MMLU: 57 subjects of four-option multiple choice (cais/mmlu). The "all" subset is the
benchmark (split test; validation and dev also exist); "auxiliary_train" is ~100k multiple
choice questions from other datasets, used to teach the format in mid-training."""

import csv
from pathlib import Path

import numpy as np

from common import UserError
from tasks.common import MultipleChoiceTask, load_rows, mc_conversation

# Hendrycks' folder names for the Hub's split names
LOCAL_SPLITS = {"test": "test", "validation": "val", "dev": "dev", "train": "auxiliary_train",
                "auxiliary_train": "auxiliary_train"}
SPLIT_FOLDERS = ("test", "val", "dev", "auxiliary_train")


def hendrycks_files(path: Path, split: str) -> list[Path]:
    """The CSVs of one split: the file itself, the folder's `split` subfolder (test/, val/, dev/,
    auxiliary_train/) when it has split subfolders, else the folder's CSVs. Never the CSVs of
    another split: training on dev/ or val/ while evaluating on them would leak the benchmark."""
    folder = LOCAL_SPLITS.get(split, split)
    if path.is_dir() and any((path / name).is_dir() for name in SPLIT_FOLDERS):
        path = path / folder
    files = sorted(path.rglob("*.csv")) if path.is_dir() else [path] if path.suffix == ".csv" else []
    # nor a CSV inside another split's folder (e.g. mmlu/dev/x_dev.csv asked for as test)
    return [f for f in files if f.parent.name not in SPLIT_FOLDERS or f.parent.name == folder]


def read_hendrycks(path: Path, split: str):
    """Rows of one split from the original CSVs (question, A, B, C, D, answer letter; no header):
    one CSV, or a folder of them (see hendrycks_files)."""
    rows = []
    for f in hendrycks_files(path, split):
        subject = f.stem
        for suffix in ("_test", "_val", "_dev", "_auxiliary_train"):
            subject = subject.removesuffix(suffix)
        with open(f, newline="", encoding="utf-8") as fh:
            rows += [{"question": rec[0], "choices": rec[1:5], "answer": "ABCD".index(rec[5].strip()), "subject": subject}
                     for rec in csv.reader(fh) if len(rec) == 6 and rec[5].strip() in ("A", "B", "C", "D")]
    if not rows:
        raise UserError(f"{path}: no MMLU {split} rows (Hendrycks CSVs: question,A,B,C,D,answer)")
    return rows


def _is_hendrycks(path: Path):
    if path.is_dir():
        return any(path.rglob("*.csv")) and not any(path.rglob("*.parquet"))
    return path.suffix == ".csv"


class MMLU(MultipleChoiceTask):
    """MMLU(subset="all", split="test"|"validation"|"dev") or MMLU("auxiliary_train", "train").
    Offline: path is a Hendrycks CSV or folder of CSVs (e.g. ../shared/data/mmlu/val, or
    data/ with test/ val/ dev/ auxiliary_train/ inside: only the asked split's folder is read,
    and it must be there), or the Hub parquet. Rows are shuffled once with a fixed seed,
    because the files are sorted by subject and evals often take a prefix."""

    letters = ("A", "B", "C", "D")
    path_flag = "--mmlu-path"

    def __init__(self, subset="all", split="test", path=None, shuffle=True, **kwargs):
        super().__init__(**kwargs)
        ok = {"all": ("test", "validation", "dev", "auxiliary_train"), "auxiliary_train": ("train",)}
        assert split in ok[subset], (subset, split)
        self.subset, self.split = subset, split
        if path is not None and _is_hendrycks(Path(path).expanduser()):
            self.rows = read_hendrycks(Path(path).expanduser(), split)
        else:
            self.rows = load_rows("cais/mmlu", subset, split, path, "MMLU", self.path_flag,
                                  "Hendrycks CSVs question,A,B,C,D,answer, or the Hub parquet")
        n = len(self.rows)
        self.order = np.random.default_rng(42).permutation(n) if shuffle else np.arange(n)

    def get_example(self, index):
        row = self.rows[int(self.order[index])]
        if "train" in row and isinstance(row["train"], dict):
            row = row["train"]  # the Hub's auxiliary_train rows wrap the fields in a "train" struct
        answer = row["answer"]
        answer = "ABCD".index(answer) if isinstance(answer, str) else int(answer)
        return mc_conversation(row["question"], row["choices"], answer, subject=row.get("subject", ""))
